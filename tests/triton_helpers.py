"""Where the Triton kernel tests run, decided once for the modules test_kernels_interpreter.MODULES lists.

* on a CUDA GPU, compiled, in the normal ``python -m pytest -q tests`` (GPU-only full-shape tests too);
* on the CPU only when ``TRITON_INTERPRET=1`` was set before Triton decorated the kernels. The normal CPU
  run cannot set it safely in-process (the decision is made at import, and it would also change what
  ``backend='triton'`` accepts for every other test module), so there these modules skip and
  ``tests/test_kernels_interpreter.py`` re-runs them in a subprocess with ``TRITON_INTERPRET=1``: that
  is how CI checks these numerics.
"""
import pytest
import torch

try:
    from manifoldgd_fast import kernels

    RUNNABLE = kernels.HAVE_TRITON and (kernels.INTERPRET or torch.cuda.is_available())
    WHY_NOT = kernels.WHY_NO_TRITON
except Exception as e:  # pragma: no cover
    RUNNABLE, WHY_NOT = False, f"manifoldgd_fast.kernels cannot be imported ({type(e).__name__}: {e})"

DEV = "cuda" if RUNNABLE and not kernels.INTERPRET and torch.cuda.is_available() else "cpu"

TRITON_MARKS = [
    pytest.mark.skipif(not RUNNABLE, reason=WHY_NOT or "Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (CI runs "
                                                      "the kernel modules under the interpreter from "
                                                      "tests/test_kernels_interpreter.py)"),
    # NumPy (the interpreter) warns where the Jacobi angle overflows on purpose (handled: t ~ 1 / (2 theta))
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def assert_graph_replay_equals_eager(step):
    """Warm ``step`` up on a side stream, capture it in a CUDA graph, replay: equal to an eager call."""
    eager = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def count_kernel_calls(monkeypatch, *targets) -> dict:
    """Wrap each ``(module, name, ...)`` target's entry points (kernels/ functions, looked up at call time by
    the custom ops that run them) so that every call is counted: ``{name: calls}``, for tests that a
    fused path really took its kernels."""
    calls = {}
    for module, *names in targets:
        for name in names:
            calls[name] = 0
            fn = getattr(module, name)

            def counted(*a, _fn=fn, _name=name, **kw):
                calls[_name] += 1
                return _fn(*a, **kw)

            monkeypatch.setattr(module, name, counted)
    return calls
