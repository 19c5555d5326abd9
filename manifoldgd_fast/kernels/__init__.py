"""Triton kernels (and the loader of the optional CUDA C++ ones), imported as ``manifoldgd_fast.kernels``.

Nothing here is imported by the reference path; ``manifoldgd_fast.ops`` (with
its helpers ``dispatch`` and ``noise``) and ``manifoldgd_fast.dit_ops`` are the
only doors to these kernels, and they import the kernel modules lazily, so
``import manifoldgd_fast`` never needs Triton, a GPU or a CUDA toolchain.

Modules (the public functions, their checks and references live in ``ops.py``, ``dit_ops.py``):

* ``philox_normal``    counter-based normals/uniforms: the one helper every noisy kernel draws through,
                       and the standalone materialisation (``ops.philox_normal``);
* ``row_source``       where a kernel's rows come from: materialised, the time-aligned patch, the cloud;
* ``knn_rows``         streaming k-nearest rows (64-bit keys, ties to the lower row, ragged lengths);
* ``cloud``            the official cloud's kNN from five dot products per point, and its radii;
* ``tangent``          gather + k x k Gram + X g; the eigen-step (in-register Jacobi) to coefficients;
                       the apply pass fused with the eps / posterior-mean update;
* ``sym_eig``          batched parallel Jacobi for small symmetric matrices (Triton);
* ``sym_eig_torch``    the same Jacobi in PyTorch ops (portable, capturable; imports no Triton);
* ``cuda_ext``         run-time build of ``csrc/sym_eig.cu`` (CUDA C++ Jacobi, optional);
* ``manifold_correct`` / ``manifold_pull``  the launch sequences behind the ops' ``triton`` backend;
* ``adaln``            the DiT block's LayerNorm + adaLN modulate and gate + residual (``dit_ops``);
* ``attention``        non-causal attention for head dim 72 in two power-of-two slabs, token-major output (``dit_ops``).

Whether a Triton kernel runs on the CPU is decided when its ``@triton.jit``
decorator runs (``TRITON_INTERPRET=1`` at import of the kernel module makes it
an interpreted function); ``INTERPRET`` records that once, here.
"""
from __future__ import annotations

import os

# The oldest Triton the kernels run on: tl.gather is 3.3's. Checked under 3.3, 3.5, 3.6, 3.7, 3.8 and 3.9
# (interpreted, and compiled ahead of time for sm_90 / sm_86 / sm_80); 3.0 to 3.2 fail. torch 2.4 to 2.6
# bring those older ones: there the guidance and DiT ops run their PyTorch references, with a warning.
MIN_TRITON = (3, 3)

try:  # triton is a Linux-only dependency; never let its absence break the import
    import triton

    TRITON_VERSION = triton.__version__
    _v = tuple(int(p) for p in TRITON_VERSION.split("+")[0].split(".")[:2] if p.isdigit())
    HAVE_TRITON = _v >= MIN_TRITON
    WHY_NO_TRITON = None if HAVE_TRITON else (
        f"Triton {TRITON_VERSION} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest the kernels run on "
        f"(torch >= 2.7 brings a newer one)")
except Exception as e:  # pragma: no cover - depends on the platform
    TRITON_VERSION, HAVE_TRITON = None, False
    WHY_NO_TRITON = f"the Triton kernels cannot be imported ({type(e).__name__}: {e})"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_device_ok(device) -> bool:
    """Can the Triton kernels take tensors on ``device``? CUDA when compiled, the CPU when interpreted."""
    if not HAVE_TRITON:
        return False
    kind = getattr(device, "type", str(device))
    return kind == "cpu" if INTERPRET else kind == "cuda"
