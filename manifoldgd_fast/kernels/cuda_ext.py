"""Run-time build of ``csrc/sym_eig.cu`` (the CUDA C++ batched Jacobi) through ``torch.utils.cpp_extension``.

Optional by design: nothing imports this unless a CUDA tensor asks for the
eigen-step, the build happens once per machine (torch's extension cache), and
any failure (no nvcc, no CUDA build of torch, a compiler error) is reported by
:func:`load` as a reason string, never raised; ``ops`` then warns once and
falls back to the Triton eigen-step.
"""
from __future__ import annotations

import os

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

# The binding: C++ compiled by the host compiler, calling the plain-C launcher in sym_eig.cu. The caller
# passes its current stream (``torch.cuda.current_stream().cuda_stream``), so only torch/extension.h is needed.
_BINDING = r"""
#include <torch/extension.h>
#include <vector>

extern "C" int mgd_sym_eig_f32_launch(const float* A, float* w, float* V, int batch, int n,
                                      int max_sweeps, float tol, void* stream);

std::vector<at::Tensor> sym_eig(at::Tensor A, int64_t max_sweeps, double tol, int64_t stream) {
  TORCH_CHECK(A.is_cuda(), "sym_eig: A must be a CUDA tensor");
  TORCH_CHECK(A.scalar_type() == at::kFloat, "sym_eig: A must be float32");
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2) && A.size(1) >= 1 && A.size(1) <= 64,
              "sym_eig: A must be (B, n, n) with 1 <= n <= 64, got ", A.sizes());
  auto Ac = A.contiguous();
  auto w = at::empty({A.size(0), A.size(1)}, A.options());
  auto V = at::empty_like(Ac);
  const int err = mgd_sym_eig_f32_launch(Ac.data_ptr<float>(), w.data_ptr<float>(), V.data_ptr<float>(),
                                         static_cast<int>(A.size(0)), static_cast<int>(A.size(1)),
                                         static_cast<int>(max_sweeps), static_cast<float>(tol),
                                         reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "sym_eig: kernel launch failed with cudaError ", err);
  return {w, V};
}
"""

_MODULE = None
_REASON = None


def build(build_directory: str | None = None, verbose: bool = False):
    """Compile sym_eig.cu and the binding with ``load_inline`` (nvcc, torch's CUDA build) and import the module;
    raises on any failure. Needs no GPU: the architectures come from ``TORCH_CUDA_ARCH_LIST`` where no device
    says them. ``build_directory``: torch's extension cache unless given."""
    from torch.utils.cpp_extension import load_inline

    with open(source_path(), encoding="utf-8") as f:
        cuda_src = f.read()
    return load_inline(name="manifoldgd_sym_eig", cpp_sources=_BINDING, cuda_sources=cuda_src,
                       functions=["sym_eig"], extra_cuda_cflags=["-O3"], build_directory=build_directory,
                       verbose=verbose)


def load():
    """(module, None) with ``module.sym_eig(A, max_sweeps, tol, stream) -> [w, V]``, or (None, reason)."""
    global _MODULE, _REASON
    if _MODULE is not None or _REASON is not None:
        return _MODULE, _REASON
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        if not torch.cuda.is_available() or torch.version.cuda is None:
            raise RuntimeError("this torch has no CUDA")
        if CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit (nvcc) found")
        try:
            _MODULE = build()
        except Exception as e:
            # torch takes CUDA_HOME from $CUDA_HOME, else two folders above `which nvcc`: a wrapper script
            # there (e.g. /usr/local/bin/nvcc) gives a folder without the CUDA libraries, and the link fails
            raise RuntimeError(f"{e} (CUDA_HOME={CUDA_HOME}: set $CUDA_HOME to the CUDA toolkit if it is not)") from e
    except Exception as e:  # any failure: report, never raise
        _REASON = f"{type(e).__name__}: {e}".strip()[:300]
    return _MODULE, _REASON


def sym_eig(A, max_sweeps: int, tol: float):
    """Eigenpairs (w (B, n) descending, V (B, n, n)) of symmetric fp32 CUDA A (B, n, n), n <= 64."""
    import torch

    mod, reason = load()
    if mod is None:
        raise RuntimeError(f"the CUDA C++ eigensolver is unavailable: {reason}")
    w, V = mod.sym_eig(A, int(max_sweeps), float(tol), torch.cuda.current_stream(A.device).cuda_stream)
    return w, V
