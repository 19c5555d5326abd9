"""CI's check of the Triton kernels on a CPU-only machine: the kernel test modules under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before Triton decorates a kernel, and setting it in
this process would also make ``backend='triton'`` accept CPU tensors for every
other test module. So the kernel tests run in a child pytest with the variable
set, and this test passes when they all pass (their output is shown when not).
"""
import functools
import os
import subprocess
import sys

import pytest
import torch
from conftest import triton_interpreting

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ["test_kernels_triton.py", "test_kernels_pipeline_triton.py", "test_dit_ops_triton.py"]     # their skip rule: tests/triton_helpers.py

# A kernel whose loop bound is a run-time argument. Triton 3.6's interpreter turns that bound into a
# one-element array and calls int() on it, which NumPy >= 2.3 refuses; compiled kernels are unaffected.
_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(o, n):
    acc = 0
    for i in range(0, n, 1):
        acc += i
    tl.store(o, acc)
o = torch.zeros(1, dtype=torch.int32)
k[(1,)](o, 4)
assert int(o) == 6, int(o)
"""


def _interpreter_takes_runtime_loop_bounds():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode == 0


@functools.lru_cache(maxsize=None)
def _why_skip():
    if triton_interpreting():
        return "TRITON_INTERPRET is already set: the kernel modules run in this process"
    if torch.cuda.is_available():
        return "a CUDA GPU is present: the kernel modules run compiled in this process"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"Triton is not installed ({type(e).__name__})"
    from manifoldgd_fast import kernels

    if not kernels.HAVE_TRITON:
        return kernels.WHY_NO_TRITON
    if not _interpreter_takes_runtime_loop_bounds():
        import numpy
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time bound beside "
                f"NumPy {numpy.__version__} (NumPy < 2.3, or Triton 3.9, runs them)")
    return None


def _kernels_run_elsewhere() -> bool:
    """The skip reasons that mean the kernel modules run anyway: in this process (interpreter set, or a GPU)."""
    return triton_interpreting() or torch.cuda.is_available()


@pytest.mark.skipif(_why_skip() is not None and (_kernels_run_elsewhere() or os.environ.get("CI", "") in ("", "0",
                    "false")), reason=str(_why_skip()))
def test_triton_kernels_under_the_interpreter():
    """On CI (CPU only, ``CI`` set) this is the only check of the kernels' numerics: an environment that cannot
    run them (no Triton, an interpreter that cannot run our loops) fails here instead of skipping them all."""
    why = _why_skip()
    if why is not None:
        pytest.fail(f"CI cannot check the Triton kernels: {why}")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           *(os.path.join(HERE, m) for m in MODULES)]
    # about 10 minutes on 2 idle cores; a shared machine took over 15 (CI's whole run has 90)
    proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=2400)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted kernel tests failed (rc {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
