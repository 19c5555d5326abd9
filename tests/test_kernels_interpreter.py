"""CI's check of the Triton kernels on a CPU-only machine: tests/test_kernels_triton.py under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before Triton decorates a kernel, and setting it in
this process would also make ``backend='triton'`` accept CPU tensors for every
other test module. So the kernel tests run in a child pytest with the variable
set, and this test passes when they all pass (their output is shown when not).
"""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _why_skip():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is already set: test_kernels_triton.py runs in this process"
    if torch.cuda.is_available():
        return "a CUDA GPU is present: test_kernels_triton.py runs compiled in this process"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"Triton is not installed ({type(e).__name__})"
    return None


@pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           os.path.join(HERE, "test_kernels_triton.py")]
    proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted kernel tests failed (rc {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
