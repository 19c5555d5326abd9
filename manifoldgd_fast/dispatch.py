"""Backend choice of the guidance ops, decided in one place.

:func:`_pick_backend` chooses between the pure-PyTorch references and the fused
Triton kernels (``backend="auto" | "reference" | "triton"``, documented in
:mod:`manifoldgd_fast.ops`); :func:`_triton_reason` says why the kernels cannot take
an input, naming the tensor and the rule; :func:`_eig_backend` decides the
eigen-step's chain once per device (CUDA C++ -> Triton Jacobi -> PyTorch Jacobi)
and :func:`_eig_fn` turns that choice into the solver the fused pipeline calls.
The fused ops' capturable entry points (``torch.ops.manifoldgd_fast.*``: no checks,
no host synchronisation) are registered here, on import.
The kernels package is imported on first use only (:func:`_kernels`), so importing
this module never needs Triton, a GPU or a compiler; a missing backend warns once.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from .errors import BackendError, ConfigError

_BACKENDS = ("auto", "reference", "triton")
# What the fused kernels are written and tested for (SPEC sizes with margin).
MAX_B, MAX_ROWS, MAX_D, MAX_K = 256, 100_000, 65_536, 64
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_WARNED: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load_kernels(*modules: str):
    """(the kernels package, None) with ``kernels.<module>`` imported for each of ``modules``, or
    (None, why they cannot run: no Triton, one too old, or a broken install). Not cached: callers cache."""
    try:
        from . import kernels

        if not kernels.HAVE_TRITON:
            return None, kernels.WHY_NO_TRITON
        for m in modules:
            importlib.import_module(f"{kernels.__name__}.{m}")
        return kernels, None
    except Exception as e:  # no triton, or a broken install: the reference path still works
        return None, f"the Triton kernels cannot be imported ({type(e).__name__}: {e})"


@functools.lru_cache(maxsize=None)
def _kernels():
    """:func:`load_kernels` of the guidance kernels, on first use only."""
    return load_kernels("manifold_correct", "manifold_pull", "philox_normal", "sym_eig")


def device_reason(device: torch.device) -> str | None:
    """Why the guidance kernels cannot run on ``device`` at all (no Triton; not CUDA, or not the CPU under the
    interpreter), or None: for a run that asks for ``backend="triton"`` up front, before hours of encoding."""
    kern, why = _kernels()
    if kern is None:
        return why
    if not kern.triton_device_ok(device):
        return (f"the run is on {device}; the Triton kernels run on CUDA"
                + ("" if kern.INTERPRET else " (on the CPU only under TRITON_INTERPRET=1)"))
    return None


def tensors_reason(kern, tensors: dict, *, all_float: bool = False) -> str | None:
    """The checks every Triton kernel shares: one device the kernels run on (``kern``: the kernels
    package), floating tensors in fp32 / bf16 / fp16 (``all_float``: every tensor floating)."""
    (name0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            return f"{name} is on {t.device} but {name0} is on {t0.device}"
    if not kern.triton_device_ok(t0.device):
        where = "CUDA tensors" if not kern.INTERPRET else "CPU tensors (TRITON_INTERPRET=1 is set)"
        return (f"{name0} is on {t0.device}; the Triton kernels take {where}"
                + ("" if kern.INTERPRET else " (on the CPU only under TRITON_INTERPRET=1)"))
    for name, t in tensors.items():
        if (all_float or t.is_floating_point()) and t.dtype not in _FLOATS:
            return f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    return None


def _triton_reason(tensors: dict, *, B: int, rows: int, D: int, k: int) -> str | None:
    """Why the fused kernels cannot take these inputs (a sentence naming the tensor and the rule), or None.

    ``tensors``: name -> tensor; the floating ones must be fp32/bf16/fp16.
    """
    kern, why = _kernels()
    if kern is None:
        return why
    why = tensors_reason(kern, tensors)
    if why is not None:
        return why
    for what, val, lim in (("B", B, MAX_B), ("the row count", rows, MAX_ROWS), ("D", D, MAX_D), ("k", k, MAX_K)):
        if val > lim:
            return f"{what} = {val} is above the fused kernels' limit {lim}"
    return None


def _pick_backend(backend: str, device: torch.device, why_not, family: str = "guidance") -> str:
    """The one place the manifold ops (and the DiT ops: ``family`` "DiT") choose between 'reference' and 'triton'.

    ``why_not()`` -> None, or why the fused kernels cannot take the input. A fallback on CUDA is said once per
    family and kind (no Triton / an input declined).
    """
    if backend not in _BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return "reference"          # auto off CUDA: the interpreter is for tests, never chosen by itself
    reason = why_not()
    if backend == "triton":
        if reason is not None:
            raise BackendError(f"backend 'triton' cannot take this input: {reason}")
        return "triton"
    if reason is not None:  # on CUDA the reference is far slower: say so, once (e.g. a D above the limit)
        kind = "no_triton" if _kernels()[0] is None else "declined"
        _warn_once(f"{family}:{kind}", f"{family} ops: {reason}; using the PyTorch reference")
    return "triton" if reason is None else "reference"


@functools.lru_cache(maxsize=None)
def _eig_backend(device: torch.device) -> str:
    """The eigen-step's chain, decided once per device: 'cuda' (C++) -> 'triton' -> 'torch'."""
    if device.type == "cuda" and os.environ.get("MANIFOLDGD_NO_CUDA_EXT", "0") != "1":
        from .kernels import cuda_ext

        mod, reason = cuda_ext.load()
        if mod is not None:
            return "cuda"
    else:
        reason = None
    kern, _ = _kernels()
    fallback = "triton" if kern is not None and kern.triton_device_ok(device) else "torch"
    if reason is not None:
        _warn_once("cuda_ext", f"CUDA C++ eigensolver unavailable ({reason}); using the "
                               f"{'Triton' if fallback == 'triton' else 'PyTorch'} Jacobi")
    return fallback


def _eig_fn(eig: str):
    """The external eigensolver the fused pipeline calls (None: the Triton Jacobi inside the coef kernel)."""
    if eig != "cuda":
        return None
    from .kernels import cuda_ext, sym_eig as sym_eig_k

    return functools.partial(cuda_ext.sym_eig, max_sweeps=sym_eig_k.MAX_SWEEPS, tol=sym_eig_k.TOL)


# ----------------------------------------------------------------------------
# torch.library registration of the fused ops (check-free, no host sync: capturable)
# ----------------------------------------------------------------------------
LIBRARY_OPS: dict = {}  # op name -> the Python function registered as torch.ops.manifoldgd_fast.<name>


def library_op(name: str, schema: str):
    """``torch.library.custom_op("manifoldgd_fast::<name>")`` with its schema written out.

    torch 2.4 cannot infer a schema from string annotations (this package's
    ``from __future__ import annotations``); the schemas are what later torch
    infers from the same functions (ints as ``SymInt``), which a test checks.
    """
    def register(fn):
        LIBRARY_OPS[name] = fn
        return torch.library.custom_op(f"manifoldgd_fast::{name}", mutates_args=(), schema=schema)(fn)

    return register


def _register_library_ops() -> None:
    @library_op("manifold_correct_rows", "(Tensor x, Tensor patch, Tensor g, Tensor lengths, SymInt k, SymInt d, "
                                          "float lambda_normal, str eig) -> Tensor")
    def _correct_rows(x: torch.Tensor, patch: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, k: int, d: int,
                      lambda_normal: float, eig: str) -> torch.Tensor:
        from .kernels import manifold_correct as mc

        return mc.rows(x, patch, g, lengths, k, d, lambda_normal, eig=_eig_fn(eig))

    @_correct_rows.register_fake
    def _(x, patch, g, lengths, k, d, lambda_normal, eig):
        return torch.empty_like(g)

    @library_op("manifold_pull_rows", "(Tensor x, Tensor cloud, Tensor lengths, SymInt k, SymInt d, float scale, "
                                       "float bandwidth, str eig) -> Tensor")
    def _pull_rows(x: torch.Tensor, cloud: torch.Tensor, lengths: torch.Tensor, k: int, d: int, scale: float,
                   bandwidth: float, eig: str) -> torch.Tensor:
        from .kernels import manifold_pull as mp

        return mp.rows(x, cloud, lengths, k, d, scale, bandwidth, eig=_eig_fn(eig))

    @_pull_rows.register_fake
    def _(x, cloud, lengths, k, d, scale, bandwidth, eig):
        return torch.empty_like(x)

    @library_op("manifold_correct_fused", "(Tensor x, Tensor latents, Tensor order, Tensor lengths, Tensor g, "
                                          "Tensor sample_ids, Tensor? eps, float alpha_bar, SymInt seed, "
                                          "SymInt step, SymInt k, SymInt d, float lambda_normal, float lambda_mode, "
                                          "str eig) -> Tensor")
    def _correct_fused(x: torch.Tensor, latents: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor,
                       g: torch.Tensor, sample_ids: torch.Tensor, eps: torch.Tensor | None, alpha_bar: float,
                       seed: int, step: int, k: int, d: int, lambda_normal: float, lambda_mode: float,
                       eig: str) -> torch.Tensor:
        from .kernels import manifold_correct as mc

        return mc.patch(x, latents, order, lengths, g, sample_ids, alpha_bar=alpha_bar, seed=seed, step=step, k=k,
                        d=d, lambda_normal=lambda_normal, eps=eps, lambda_mode=lambda_mode, eig=_eig_fn(eig))

    @_correct_fused.register_fake
    def _(x, latents, order, lengths, g, sample_ids, eps, alpha_bar, seed, step, k, d, lambda_normal, lambda_mode, eig):
        return torch.empty_like(g if eps is None else eps)

    @library_op("manifold_pull_fused", "(Tensor x, Tensor modes, Tensor rho_lin, Tensor sample_ids, Tensor? mean, "
                                        "float radius, float alpha_bar, SymInt seed, SymInt step, SymInt n_points, "
                                        "SymInt k, SymInt d, float scale, float bandwidth, str eig) -> Tensor")
    def _pull_fused(x: torch.Tensor, modes: torch.Tensor, rho_lin: torch.Tensor, sample_ids: torch.Tensor,
                    mean: torch.Tensor | None, radius: float, alpha_bar: float, seed: int, step: int, n_points: int,
                    k: int, d: int, scale: float, bandwidth: float, eig: str) -> torch.Tensor:
        from .kernels import manifold_pull as mp

        return mp.cloud(x, modes, rho_lin, sample_ids, radius=radius, alpha_bar=alpha_bar, seed=seed, step=step,
                        n_points=n_points, k=k, d=d, scale=scale, bandwidth=bandwidth, mean=mean, eig=_eig_fn(eig))

    @_pull_fused.register_fake
    def _(x, modes, rho_lin, sample_ids, mean, radius, alpha_bar, seed, step, n_points, k, d, scale, bandwidth, eig):
        return torch.empty_like(x if mean is None else mean)


_register_library_ops()
