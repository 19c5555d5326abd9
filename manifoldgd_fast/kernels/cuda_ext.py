"""Run-time build of ``csrc/sym_eig.cu`` (the CUDA C++ batched Jacobi): nvcc through torch, else NVRTC.

Optional by design: nothing imports this unless a CUDA tensor asks for the
eigen-step. Two ways to a module with ``sym_eig(A, max_sweeps, tol, stream) -> [w, V]``:

1. ``nvcc``: the file and a C++ binding built by ``torch.utils.cpp_extension.load_inline``
   (once per machine, torch's extension cache). Needs a CUDA toolkit.
2. ``nvrtc``: where there is no toolkit (a pip-installed torch often has none), the kernel alone
   compiled by NVRTC through CuPy (the ``[cuda]`` extra) and launched from Python on the
   caller's stream, with the launch the C++ launcher makes (one block of ``THREADS`` per matrix).

``MANIFOLDGD_CUDA_EXT=nvcc|nvrtc`` takes one way only (default: nvcc, then nvrtc). Any failure
is reported by :func:`load` as a reason string, never raised; ``ops`` then warns once and falls
back to the Triton eigen-step.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import warnings

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repo's csrc/ beside manifoldgd_fast/ (a source tree, an editable install), else the copy a wheel carries
# in manifoldgd_fast/csrc/ (setup.py's build_py puts it there).
_SRC_CANDIDATES = (os.path.join(os.path.dirname(_PKG), "csrc", "sym_eig.cu"), os.path.join(_PKG, "csrc", "sym_eig.cu"))


def source_path() -> str:
    """The path of sym_eig.cu; FileNotFoundError naming where it looked."""
    for path in _SRC_CANDIDATES:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"sym_eig.cu is in neither {' nor '.join(_SRC_CANDIDATES)}")


def source() -> str:
    """The text of sym_eig.cu (what both ways compile)."""
    with open(source_path(), encoding="utf-8") as f:
        return f.read()

# The binding: C++ compiled by the host compiler, calling the plain-C launcher in sym_eig.cu. The caller
# passes its current stream (``torch.cuda.current_stream().cuda_stream``), so only torch/extension.h is needed.
_BINDING = r"""
#include <torch/extension.h>
#include <ATen/DeviceGuard.h>
#include <vector>

extern "C" int mgd_sym_eig_f32_launch(const float* A, float* w, float* V, int batch, int n,
                                      int max_sweeps, float tol, void* stream);
extern "C" const char* mgd_cuda_error_string(int err);

std::vector<at::Tensor> sym_eig(at::Tensor A, int64_t max_sweeps, double tol, int64_t stream) {
  TORCH_CHECK(A.is_cuda(), "sym_eig: A must be a CUDA tensor");
  TORCH_CHECK(A.scalar_type() == at::kFloat, "sym_eig: A must be float32");
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2) && A.size(1) >= 1 && A.size(1) <= 64,
              "sym_eig: A must be (B, n, n) with 1 <= n <= 64, got ", A.sizes());
  // the launch goes to the thread's current device: make it A's (a caller on cuda:1 while cuda:0 is current)
  const at::OptionalDeviceGuard guard(A.device());
  auto Ac = A.contiguous();
  auto w = at::empty({A.size(0), A.size(1)}, A.options());
  auto V = at::empty_like(Ac);
  if (A.size(0) == 0) return {w, V};  // no matrix: no launch (a grid of 0 blocks is an invalid launch)
  const int err = mgd_sym_eig_f32_launch(Ac.data_ptr<float>(), w.data_ptr<float>(), V.data_ptr<float>(),
                                         static_cast<int>(A.size(0)), static_cast<int>(A.size(1)),
                                         static_cast<int>(max_sweeps), static_cast<float>(tol),
                                         reinterpret_cast<void*>(stream));
  TORCH_CHECK(err >= 0, "sym_eig: an earlier CUDA call left an error pending: ", mgd_cuda_error_string(-err));  // PENDING
  TORCH_CHECK(err == 0, "sym_eig: kernel launch failed: ", mgd_cuda_error_string(err), " (cudaError ", err, ")");
  return {w, V};
}
"""

_MODULE = None
_REASON = None


_CUDA_FLAGS = ["-O3"]
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build (this one takes well under a minute)


def build_name() -> str:
    """The extension's name in torch's cache, keyed by the source, the binding and the flags: two checkouts
    with another sym_eig.cu on one $HOME (torch's cache is per user) never load each other's build."""
    key = "\0".join([source(), _BINDING, *_CUDA_FLAGS]).encode()
    return "manifoldgd_sym_eig_" + hashlib.sha256(key).hexdigest()[:12]


def _clear_stale_lock(name: str, build_directory: str | None) -> None:
    """torch's build lock (a file its FileBaton waits on, forever) that a killed build left: removed, with a
    warning, once older than STALE_LOCK_S. A live build holds it for seconds. The look and the removal hold
    an flock on ``lock.check`` beside it, so that of several processes (torchrun's ranks) that found the same
    stale lock, one removes it and none removes the fresh lock another has taken since."""
    import fcntl

    from torch.utils.cpp_extension import _get_build_directory

    folder = build_directory or _get_build_directory(name, verbose=False)
    lock = os.path.join(folder, "lock")
    if not os.path.exists(lock):
        return
    with open(os.path.join(folder, "lock.check"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            age = time.time() - os.stat(lock).st_mtime
        except OSError:
            return
        if age > STALE_LOCK_S:
            warnings.warn(f"removing the build lock {lock}, {age / 60:.0f} min old: a killed build left it",
                          stacklevel=2)
            with contextlib.suppress(OSError):
                os.remove(lock)


def build(build_directory: str | None = None, verbose: bool = False):
    """Compile sym_eig.cu and the binding with ``load_inline`` (nvcc, torch's CUDA build) and import the module;
    raises on any failure. Needs no GPU: the architectures come from ``TORCH_CUDA_ARCH_LIST`` where no device
    says them. ``build_directory``: torch's extension cache unless given."""
    from torch.utils.cpp_extension import load_inline

    name = build_name()
    with contextlib.suppress(Exception):  # torch's private helper: where it moved, the lock stays torch's concern
        _clear_stale_lock(name, build_directory)
    return load_inline(name=name, cpp_sources=_BINDING, cuda_sources=source(), functions=["sym_eig"],
                       extra_cuda_cflags=_CUDA_FLAGS, build_directory=build_directory, verbose=verbose)


def build_error_summary(text: str, keep: int = 4) -> str:
    """A build failure in a few hundred characters: its first line and the compiler's error lines (torch's
    message starts with the whole nvcc command line, which said nothing of the cause in 300 characters)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    errors = [ln for ln in lines[1:] if re.search(r"\berror\b|fatal|undefined reference|cannot find", ln, re.I)]
    head = lines[0] if len(lines[0]) <= 160 else lines[0][:157] + "..."
    return " | ".join([head, *(ln[:200] for ln in errors[:keep])])


THREADS = 256  # csrc/sym_eig.cu's kThreads: the block of one matrix (a test reads it from the source)
KERNEL = "mgd_sym_eig_f32"  # its extern "C" __global__ kernel
_MAX_N = 64


def launch_args(A, w, V, max_sweeps: int, tol: float) -> tuple:
    """The kernel's arguments as CuPy passes them by value: three device pointers (8 bytes each), then
    ``int n, int max_sweeps, float tol`` as 4-byte scalars (a Python int or float would go as 8 bytes)."""
    import numpy as np

    return (np.uint64(A.data_ptr()), np.uint64(w.data_ptr()), np.uint64(V.data_ptr()), np.int32(A.shape[1]),
            np.int32(max_sweeps), np.float32(tol))


class NvrtcSymEig:
    """``sym_eig(A, max_sweeps, tol, stream) -> [w, V]`` as the nvcc-built extension's: ``mgd_sym_eig_f32``
    compiled by NVRTC through CuPy (one module per device, so each gets its own architecture) and launched
    on the caller's stream. No host synchronisation: CUDA-graph capturable once compiled."""

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._source = source()
        self._functions = {}

    def function(self, device_index: int):
        """The kernel compiled for that device (at the first call: NVRTC, then the module load)."""
        fn = self._functions.get(device_index)
        if fn is None:
            with self._cupy.cuda.Device(device_index):
                module = self._cupy.RawModule(code=self._source, options=("-std=c++17",))
                fn = self._functions[device_index] = module.get_function(KERNEL)
        return fn

    def sym_eig(self, A, max_sweeps: int, tol: float, stream: int):
        import torch

        if not A.is_cuda or A.dtype != torch.float32:
            raise RuntimeError(f"sym_eig: A must be a float32 CUDA tensor, got {A.dtype} on {A.device}")
        if A.dim() != 3 or A.shape[1] != A.shape[2] or not 1 <= A.shape[1] <= _MAX_N:
            raise RuntimeError(f"sym_eig: A must be (B, n, n) with 1 <= n <= {_MAX_N}, got {tuple(A.shape)}")
        Ac = A.contiguous()
        w = torch.empty(A.shape[:2], dtype=A.dtype, device=A.device)
        V = torch.empty_like(Ac)
        if A.shape[0] == 0:
            return [w, V]
        fn = self.function(A.device.index)
        with self._cupy.cuda.Device(A.device.index), self._stream(stream, A.device.index):
            fn((A.shape[0],), (THREADS,), launch_args(Ac, w, V, max_sweeps, tol))
        return [w, V]

    def _stream(self, ptr: int, device_index: int):
        """The caller's stream as CuPy's (``Stream.from_external`` since CuPy 14, ``ExternalStream`` before)."""
        cuda = self._cupy.cuda
        if hasattr(cuda.Stream, "from_external"):
            return cuda.Stream.from_external(_StreamHandle(ptr))
        return cuda.ExternalStream(ptr, device_index)


class _StreamHandle:
    """A raw ``cudaStream_t`` under the CUDA stream protocol (``__cuda_stream__`` -> (version 0, handle))."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def load_nvcc():
    """The nvcc-built extension; raises on any failure."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        raise RuntimeError("this torch has no CUDA")
    if CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit (nvcc) found")
    try:
        module = build()
    except Exception as e:
        # torch takes CUDA_HOME from $CUDA_HOME, else two folders above `which nvcc`: a wrapper script
        # there (e.g. /usr/local/bin/nvcc) gives a folder without the CUDA libraries, and the link fails
        raise RuntimeError(f"{build_error_summary(e)} (CUDA_HOME={CUDA_HOME}: set $CUDA_HOME to the CUDA toolkit "
                           f"if it is not)") from e
    return module


PENDING = "an earlier CUDA call left an error pending"  # the binding's message for the launcher's negative code
SELF_TEST = ([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]], [5.0, 3.0, 1.0])  # A and its eigenvalues


def _current_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def self_test(module, device) -> None:
    """Run ``module.sym_eig`` once on ``device`` on a 3 x 3 matrix of known eigenvalues and wait for it; raises
    RuntimeError where it fails or is wrong. What a build cannot show, a launch does: no kernel image for this
    GPU (a TORCH_CUDA_ARCH_LIST without its architecture), a driver older than the toolkit. Skipped inside a
    CUDA-graph capture (no synchronisation there; the fast loop's warm-up step runs before it)."""
    import torch

    cuda = device.type == "cuda"
    if cuda and torch.cuda.is_current_stream_capturing():
        return
    A = torch.tensor(SELF_TEST[0], dtype=torch.float32, device=device)[None]
    try:
        w, _ = module.sym_eig(A, 20, 1e-7, torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    except RuntimeError as e:
        if PENDING in str(e):  # another call's error, not this build's: the build is taken untested
            return
        raise
    if cuda:
        torch.cuda.synchronize(device)
    got = w.detach().cpu().flatten().tolist()
    if not all(abs(g - e) <= 1e-5 * e for g, e in zip(got, SELF_TEST[1])) or len(got) != 3:
        raise RuntimeError(f"self-test on {device}: eigenvalues {got} where {SELF_TEST[1]} are right")


def load_nvrtc():
    """The kernel through NVRTC (CuPy), compiled for the current device now, so that a compiler error shows
    here; raises on any failure (no CuPy: the message names the wheel for torch's CUDA)."""
    import torch

    try:
        module = NvrtcSymEig()  # imports CuPy
    except ImportError as e:
        raise RuntimeError(f"no CuPy ({e}): pip install cupy-cuda{(torch.version.cuda or '12').split('.')[0]}x") from e
    module.function(torch.cuda.current_device())
    return module


def load():
    """(module, None) with ``module.sym_eig(A, max_sweeps, tol, stream) -> [w, V]``, or (None, reason): each
    way (nvcc, nvrtc) tried in order until one works."""
    global _MODULE, _REASON
    if _MODULE is not None or _REASON is not None:
        return _MODULE, _REASON
    ways = {"nvcc": load_nvcc, "nvrtc": load_nvrtc}
    choice = os.environ.get("MANIFOLDGD_CUDA_EXT", "auto")
    reasons = []
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        if choice not in ("auto", *ways):
            raise RuntimeError(f"MANIFOLDGD_CUDA_EXT={choice!r}: expected nvcc, nvrtc or auto")
        for name, way in ways.items():
            if choice in ("auto", name):
                try:
                    module = way()
                    self_test(module, _current_device())  # a launch, before the run relies on it
                    _MODULE = module
                    break
                except Exception as e:  # any failure: the next way, then a reason, never raised
                    reasons.append(f"{name}: {type(e).__name__}: {e}".strip()[:600])
    except Exception as e:
        reasons.append(f"{type(e).__name__}: {e}".strip()[:600])
    if _MODULE is None:
        _REASON = "; ".join(reasons)
    return _MODULE, _REASON


def sym_eig(A, max_sweeps: int, tol: float):
    """Eigenpairs (w (B, n) descending, V (B, n, n)) of symmetric fp32 CUDA A (B, n, n), n <= 64."""
    import torch

    mod, reason = load()
    if mod is None:
        raise RuntimeError(f"the CUDA C++ eigensolver is unavailable: {reason}")
    w, V = mod.sym_eig(A, int(max_sweeps), float(tol), torch.cuda.current_stream(A.device).cuda_stream)
    return w, V
