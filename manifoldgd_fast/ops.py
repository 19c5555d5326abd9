"""Public guidance ops: input checks, backend choice and the pure-PyTorch references.

Two manifold terms (SPEC 4.4 and 4b.3):

* ``manifold_correct`` (paper formulation): project the mode-guidance vector
  ``g`` onto the tangent space of the ``k`` patch rows nearest to ``x`` and
  return ``g - lambda_normal * P_N g``.
* ``manifold_pull`` (official formulation): the normalised normal part of
  ``x - c`` (``c`` the mean of the ``k`` nearest cloud rows), scaled by
  ``scale * tanh(nearest distance / bandwidth)``, pointing back to the plane.

Both estimate the tangent space from the k x k Gram matrix of the centred
neighbours, never from the D x D covariance: with ``X`` (k, D) centred rows,
``X X^T v = mu v`` gives the unit eigenvector ``X^T v / sqrt(mu)`` of
``X^T X`` with the same eigenvalue. A ridge ``rho I`` on the covariance moves
no eigenvector, so it only enters the eigenvalues (reported, not used).

Backends (``backend=`` of ``manifold_correct``, ``manifold_pull`` and the fused ops),
chosen in one place, :func:`manifoldgd_fast.dispatch._pick_backend`:

* ``reference``: the readable PyTorch below; runs anywhere.
* ``triton``: the fused kernels of ``manifoldgd_fast.kernels`` (kNN streamed in
  one pass, Gram + X g, batched Jacobi, projection fused with the eps / mean
  update). CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (how CI
  checks their numerics). An input they cannot take raises ``BackendError``
  naming the tensor and the rule (device, dtype, size limits: B <= 256,
  rows <= 100,000, D <= 65,536, k <= 64). Non-contiguous inputs are made
  contiguous.
* ``auto``: ``triton`` for CUDA tensors it can take, else ``reference`` (warns
  once when Triton is missing on a CUDA machine).

The eigen-step inside the fused path has its own chain, decided once per
device in :func:`manifoldgd_fast.dispatch._eig_backend`: CUDA C++
(``csrc/sym_eig.cu``, compiled at run time by nvcc, else by NVRTC through CuPy;
``MANIFOLDGD_NO_CUDA_EXT=1`` skips it) -> the Triton Jacobi -> the PyTorch Jacobi (``sym_eig`` only). A missing
backend warns once; importing this module never needs Triton, a GPU or a compiler.

The fused ops (``manifold_correct_fused``, ``manifold_pull_fused``) never
materialise the patch or the cloud; their noise is counter-based (Philox4x32-10)
so the references can draw exactly the same numbers. The counter layout, the
references of the noise and the patch / cloud builders that use it live in
:mod:`manifoldgd_fast.noise` (re-exported here).

Ops that run inside a captured step are registered with ``torch.library``
(``manifoldgd_fast::manifold_correct_rows``, ``..._pull_rows``,
``..._correct_fused``, ``..._pull_fused``; ``custom_op`` + ``register_fake``, in
:mod:`manifoldgd_fast.dispatch`): those do no checks and no host synchronisation;
the public functions check, then call them.
"""
from __future__ import annotations

import math
import operator

import torch

from .dispatch import MAX_B, MAX_D, MAX_K, MAX_ROWS, _eig_backend, _kernels, _pick_backend, _triton_reason
from . import noise as _noise
from .errors import BackendError, ConfigError
from .profile import phase
from .noise import (STREAM_CLOUD_DIR, STREAM_CLOUD_RADIUS, STREAM_CLOUD_XI, STREAM_PATCH, _check_counters,
                    official_cloud_philox, official_cloud_radii, philox4x32_ref, philox_normal, philox_normal_ref,
                    philox_uniform_ref, time_aligned_patch_philox)

# the public names, with those of dispatch.py and noise.py that this module re-exports
__all__ = [
    "MAX_B", "MAX_ROWS", "MAX_D", "MAX_K",
    "knn_rows_ref", "tangent_basis_ref",
    "manifold_correct", "manifold_correct_ref", "manifold_pull", "manifold_pull_ref",
    "time_aligned_patch", "official_radius", "official_cloud",
    "STREAM_PATCH", "STREAM_CLOUD_DIR", "STREAM_CLOUD_RADIUS", "STREAM_CLOUD_XI",
    "philox4x32_ref", "philox_normal_ref", "philox_uniform_ref", "philox_normal",
    "time_aligned_patch_philox", "official_cloud_radii", "official_cloud_philox",
    "manifold_correct_fused", "manifold_correct_fused_ref", "manifold_pull_fused", "manifold_pull_fused_ref",
    "sym_eig", "sym_eig_ref",
]


# ----------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------
def _check_tensor(**tensors) -> None:
    """Each given argument a torch.Tensor (a list or None failed deep inside, as an AttributeError)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _int_lengths(lengths, device) -> torch.Tensor:
    """lengths as a contiguous int64 tensor; float or bool lengths are refused (5.9 was truncated to 5)."""
    t = torch.as_tensor(lengths, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"lengths must be integers, got {t.dtype}")
    return t.long().contiguous()  # the kernels read it with stride 1


def _check_int_tensor(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"{name} must hold integers, got {t.dtype}")


def _check_rows(name: str, x: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor | None, k: int) -> torch.Tensor:
    _check_tensor(x=x, **{name: rows})
    if x.dim() != 2:
        raise ConfigError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if rows.dim() != 3 or rows.shape[0] != x.shape[0] or rows.shape[2] != x.shape[1]:
        raise ConfigError(f"{name} must be (B, M, D) with B == x.shape[0] and D == x.shape[1], "
                          f"got {tuple(rows.shape)} and x {tuple(x.shape)}")
    _check_float(x=x, **{name: rows})
    B, M = rows.shape[:2]
    if lengths is None:
        if B and M < k:  # (an empty batch has no shortest row)
            raise ConfigError(f"k={k} is larger than the {name} (shortest has {M} valid rows)")
        return torch.full((B,), M, dtype=torch.long, device=rows.device)
    lengths = _int_lengths(lengths, rows.device)
    if lengths.shape != (B,):
        raise ConfigError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
    if _noise._capturing(rows.device):  # the value checks read the device: not inside a CUDA graph (the
        return lengths                  # reference twins run them too, as a fused op's fallback may)
    if bool((lengths < 1).any()) or bool((lengths > M).any()):
        raise ConfigError(f"lengths must lie in [1, M={M}], got min {int(lengths.min())} max {int(lengths.max())}")
    if B and int(lengths.min()) < k:
        raise ConfigError(f"k={k} is larger than the {name} (shortest has {int(lengths.min())} valid rows)")
    return lengths


def _check_float(**tensors) -> None:
    """Each given tensor floating point (an integer one was truncated silently by every backend)."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ConfigError(f"{name} must be floating point, got {t.dtype}")


def _as_int(v):
    """v as a Python int where it is an integer (int, numpy integer, 0-d integer tensor; not a bool), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _check_scalars(positive: dict | None = None, **nonnegative) -> None:
    """ConfigError naming the first scalar that is not finite and > 0 (``positive``) or >= 0 (the others):
    a NaN passed the plain comparisons and came back as a NaN guidance."""
    for name, v in {**(positive or {}), **nonnegative}.items():
        pos = name in (positive or {})
        try:
            ok = math.isfinite(v) and (v > 0 if pos else v >= 0)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{name} must be a finite number {'> 0' if pos else '>= 0'}, got {v!r}")


def _check_kd(k: int, d: int) -> tuple[int, int]:
    """(k, d) as Python ints, checked: k >= 2, 1 <= d < k."""
    ki, di = _as_int(k), _as_int(d)
    if ki is None or ki < 2:
        raise ConfigError(f"k must be an integer >= 2, got {k!r}")
    if di is None or di < 1 or di >= ki:
        raise ConfigError(f"d must be an integer with 1 <= d < k={ki}, got {d!r}")
    return ki, di


# ----------------------------------------------------------------------------
# shared pieces of the references
# ----------------------------------------------------------------------------
def _work(t: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def knn_rows_ref(x: torch.Tensor, rows: torch.Tensor, k: int, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, k) of the k valid rows nearest to x (Euclidean), ascending, ties to the lower index,
    and their squared distances (B, k).

    ``torch.topk`` does not promise an order among equal values, so a stable
    sort decides ties.
    """
    xf, rf = _work(x), _work(rows)
    d2 = ((rf - xf[:, None, :]) ** 2).sum(-1)                           # (B, M)
    M = rows.shape[1]
    invalid = torch.arange(M, device=rows.device)[None, :] >= lengths[:, None]
    # a NaN distance ranks as +inf, tied with an overflowed one (as in the kernel), so padding past the
    # length never outranks a valid row
    d2 = d2.nan_to_num(nan=float("inf"), posinf=float("inf")).masked_fill(invalid, float("inf"))
    d2s, idx = torch.sort(d2, dim=1, stable=True)
    return idx[:, :k], d2s[:, :k]


def tangent_basis_ref(X: torch.Tensor, d: int, rel_tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (B, D, d) of the top-d principal directions of centred rows X (B, k, D).

    Through the k x k Gram matrix in float64; directions whose variance is
    below ``rel_tol`` x the largest (rank-deficient neighbourhoods) get a zero
    column instead of an arbitrary null-space vector, so they project nothing.
    """
    Xd = X.double()
    G = Xd @ Xd.transpose(1, 2)                                          # (B, k, k)
    mu, V = torch.linalg.eigh(G)                                         # ascending
    mu, V = mu.flip(-1)[:, :d], V.flip(-1)[:, :, :d]                     # top-d, descending
    keep = mu > rel_tol * mu[:, :1].clamp_min(1e-300)
    U = Xd.transpose(1, 2) @ V / mu.clamp_min(1e-300).sqrt()[:, None, :]  # (B, D, d)
    U = U * keep[:, None, :]
    return U.to(X.dtype)


def _centred(nb: torch.Tensor) -> torch.Tensor:
    """Rows nb (B, k, D) less their mean, in float64, shifted by the first row before the mean (as the
    kernel shifts): identical rows centre to exact zeros, not to the rounding of an fp32 mean."""
    Y = (nb - nb[:, :1]).double()
    return Y - Y.mean(1, keepdim=True)


def _project_tangent(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U U^T v for U (B, D, d), v (B, D), in the wider dtype of the two (x in fp64 beside an fp32 cloud)."""
    wide = torch.promote_types(U.dtype, v.dtype)
    U, v = U.to(wide), v.to(wide)
    return (U @ (U.transpose(1, 2) @ v[:, :, None]))[:, :, 0]


# ----------------------------------------------------------------------------
# paper formulation: tangent projection of the guidance (SPEC 4.4)
# ----------------------------------------------------------------------------
def manifold_correct(x, patch, g, *, k, d, lambda_normal=1.0, ridge=0.0, lengths=None, backend="auto"):
    """Corrected guidance ``g - lambda_normal * P_N g`` (B, D).

    Args:
        x: (B, D) current latents x_t (flattened).
        patch: (B, M, D) time-aligned patch rows per sample (padded beyond ``lengths``).
        g: (B, D) mode-guidance vectors.
        k: nearest patch rows used for the covariance (ties to the lower index).
        d: tangent dimension, 1 <= d < k.
        lambda_normal: share of the normal component removed (1 = pure tangent projection).
        ridge: ridge of the covariance; moves no eigenvector (accepted for completeness).
        lengths: (B,) valid rows per patch, None = all M.
        backend: "auto" | "reference" | "triton" (see the module docstring).
    Returns: (B, D) in g's dtype.

    Values are not checked for NaN / inf (that would sync with the host): a non-finite patch row ranks
    as the farthest, and a non-finite x gives a finite result from arbitrary neighbours. Check the inputs
    upstream (the pipeline checks each class's latents once, after sampling).
    """
    k, d, lengths = _correct_args(x, patch, g, k, d, lambda_normal, ridge, lengths)
    if x.shape[0] == 0:  # an empty batch: nothing to correct
        return g.clone()
    why = lambda: _triton_reason({"x": x, "patch": patch, "g": g}, B=x.shape[0], rows=patch.shape[1],  # noqa: E731
                                 D=x.shape[1], k=k)
    if _pick_backend(backend, x.device, why) == "triton":
        return torch.ops.manifoldgd_fast.manifold_correct_rows(
            x.contiguous(), patch.contiguous(), g.contiguous(), lengths, k, d, float(lambda_normal),
            _eig_backend(x.device))
    return _manifold_correct_checked(x, patch, g, k, d, lambda_normal, lengths)   # (checked above: not twice)


def _correct_args(x, patch, g, k, d, lambda_normal, ridge, lengths):
    """:func:`manifold_correct`'s (and its twin's) checks: (k, d, lengths as a (B,) int64 tensor)."""
    k, d = _check_kd(k, d)
    lengths = _check_rows("patch", x, patch, lengths, k)
    _check_tensor(g=g)
    _check_bd("g", g, x)
    _check_scalars(lambda_normal=lambda_normal, ridge=ridge)
    return k, d, lengths


def manifold_correct_ref(x, patch, g, *, k, d, lambda_normal=1.0, ridge=0.0, lengths=None):
    """Reference of :func:`manifold_correct` (same signature and checks, no backend)."""
    k, d, lengths = _correct_args(x, patch, g, k, d, lambda_normal, ridge, lengths)
    return _manifold_correct_checked(x, patch, g, k, d, lambda_normal, lengths)


def _manifold_correct_checked(x, patch, g, k, d, lambda_normal, lengths):
    """:func:`manifold_correct_ref`'s maths on checked arguments (lengths a (B,) tensor)."""
    B, M, D = patch.shape
    with phase("knn"):  # the profiler's phases, as the kernels' (no-ops unless profiling)
        idx, _ = knn_rows_ref(x, patch, k, lengths)
    with phase("gram_eig"):
        nb = torch.gather(_work(patch), 1, idx[:, :, None].expand(B, k, D))  # (B, k, D)
        U = tangent_basis_ref(_centred(nb), d).to(nb.dtype)                    # (B, D, d)
    with phase("projection"):
        gf = _work(g)
        normal = gf - _project_tangent(U, gf)                                  # P_N g
        return (gf - lambda_normal * normal).to(g.dtype)


# ----------------------------------------------------------------------------
# official formulation: pull back to the local tangent plane (SPEC 4b.3)
# ----------------------------------------------------------------------------
def manifold_pull(x, cloud, *, k=12, d=3, scale=0.1, bandwidth=0.1, ridge=1e-5, lengths=None, backend="auto"):
    """Official manifold term (B, D): ``scale * tanh(delta_min / bandwidth) * (-n / (|n| + 1e-8))``.

    ``n = (x - c) - U U^T (x - c)``, ``c`` the mean of the k cloud rows nearest
    to x, ``U`` the top-d eigenvectors of their covariance (/(k-1) + ridge I),
    ``delta_min`` the distance to the nearest row.

    Args:
        x: (B, D) current latents x_t.
        cloud: (B, N, D) forward-diffused cloud rows around each sample's mode.
        k, d: neighbours and tangent dimension (1 <= d < k).
        scale: lambda_man. bandwidth: b of the tanh weight. ridge: covariance ridge.
        lengths: (B,) valid rows per cloud, None = all N.
        backend: "auto" | "reference" | "triton" (see the module docstring).
    Returns: (B, D) in x's dtype.
    """
    k, d, lengths = _pull_args(x, cloud, k, d, scale, bandwidth, ridge, lengths)
    if x.shape[0] == 0:  # an empty batch: no term
        return torch.zeros_like(x)
    why = lambda: _triton_reason({"x": x, "cloud": cloud}, B=x.shape[0], rows=cloud.shape[1],  # noqa: E731
                                 D=x.shape[1], k=k)
    if _pick_backend(backend, x.device, why) == "triton":
        return torch.ops.manifoldgd_fast.manifold_pull_rows(
            x.contiguous(), cloud.contiguous(), lengths, k, d, float(scale), float(bandwidth), _eig_backend(x.device))
    return _manifold_pull_checked(x, cloud, k, d, scale, bandwidth, lengths)   # (checked above: not twice)


def _pull_args(x, cloud, k, d, scale, bandwidth, ridge, lengths):
    """:func:`manifold_pull`'s (and its twin's) checks: (k, d, lengths as a (B,) int64 tensor)."""
    k, d = _check_kd(k, d)
    lengths = _check_rows("cloud", x, cloud, lengths, k)
    _check_scalars({"bandwidth": bandwidth}, scale=scale, ridge=ridge)
    return k, d, lengths


def manifold_pull_ref(x, cloud, *, k=12, d=3, scale=0.1, bandwidth=0.1, ridge=1e-5, lengths=None):
    """Reference of :func:`manifold_pull` (same signature and checks, no backend)."""
    k, d, lengths = _pull_args(x, cloud, k, d, scale, bandwidth, ridge, lengths)
    return _manifold_pull_checked(x, cloud, k, d, scale, bandwidth, lengths)


def _manifold_pull_checked(x, cloud, k, d, scale, bandwidth, lengths):
    """:func:`manifold_pull_ref`'s maths on checked arguments (lengths a (B,) tensor; the ridge moves no
    eigenvector)."""
    B, N, D = cloud.shape
    with phase("knn"):  # the profiler's phases, as the kernels' (no-ops unless profiling)
        idx, d2 = knn_rows_ref(x, cloud, k, lengths)
    with phase("gram_eig"):
        nb = torch.gather(_work(cloud), 1, idx[:, :, None].expand(B, k, D))  # (B, k, D)
        c = nb.mean(1)                                                         # (B, D)
        U = tangent_basis_ref(_centred(nb), d).to(nb.dtype)                    # (B, D, d)
    with phase("projection"):
        off = _work(x) - c
        n = off - _project_tangent(U, off)                                     # normal part of x - c
        direction = -n / (n.norm(dim=1, keepdim=True) + 1e-8)
        weight = torch.tanh(d2[:, :1].clamp_min(0).sqrt() / bandwidth)        # (B, 1)
        return (scale * weight * direction).to(x.dtype)


# ----------------------------------------------------------------------------
# builders of the rows the terms look at
# ----------------------------------------------------------------------------
def _per_sample(generators, B: int) -> list:
    """One generator per sample; a single Generator serves all samples in order."""
    if isinstance(generators, torch.Generator):
        return [generators] * B
    if not isinstance(generators, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generators):
        raise ConfigError(f"generators must be one torch.Generator or a list of B={B}, got {type(generators).__name__}")
    if len(generators) != B:
        raise ConfigError(f"generators must be one torch.Generator or a list of B={B}, got {len(generators)}")
    return list(generators)


def time_aligned_patch(latents, order, lengths, alpha_bar, generators):
    """Paper patch ``P_t = sqrt(abar) z + sqrt(1 - abar) xi`` (B, M, D), fresh xi each call.

    Args:
        latents: (n, D) class latents.
        order: (B, n) each sample's neighbourhood order (nearest to its mode first).
        lengths: (B,) rows in each patch (prefix of the order), None = all of order's; M = max(lengths).
        alpha_bar: float, cumulative alpha of the current step.
        generators: a torch.Generator, or a list of B (one per sample, so a
            sample's noise does not depend on which batch it was drawn in).
    Rows beyond a sample's length are zero.
    """
    _check_alpha_bar(alpha_bar)
    _check_tensor(latents=latents, order=order)
    if latents.dim() != 2:
        raise ConfigError(f"latents must be (n, D), got shape {tuple(latents.shape)}")
    if order.dim() != 2 or order.is_floating_point() or order.dtype == torch.bool:
        raise ConfigError(f"order must be (B, n_order) integers, got {tuple(order.shape)} {order.dtype}")
    B = order.shape[0]
    lengths = _check_order(latents, order, lengths, k=1)
    generators = _per_sample(generators, B)
    D = latents.shape[1]
    M = int(lengths.max())
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    patch = torch.zeros(B, M, D, device=latents.device, dtype=torch.float32)
    for b in range(B):
        L = int(lengths[b])
        xi = torch.randn(L, D, generator=generators[b], device=latents.device)
        patch[b, :L] = a * latents[order[b, :L]].float() + s * xi
    return patch


def official_radius(i: int, *, steps: int, t_stop: int, radius: float, warm_steps: int = 5,
                    warm_mult: float = 2.0, schedule: str = "exp") -> float:
    """Radius warm-up of the released sampler (SPEC 4b.3) at respaced step index i (S-1 ... 0).

    ``r (1 + (M - 1) s(p))`` during the first ``warm_steps`` steps, p going 1 -> 0 over them, then r.
    """
    _check_scalars(radius=radius)
    if i <= t_stop or warm_mult <= 1.0:
        return float(radius)
    t_hi = steps - 1
    t_cut = max(t_stop, t_hi - warm_steps)
    if i <= t_cut:
        return float(radius)
    p = min(max((i - t_cut) / max(1, t_hi - t_cut), 0.0), 1.0)
    if schedule == "linear":
        s = p
    elif schedule == "cosine":
        s = 0.5 * (1.0 + math.cos(math.pi * (1.0 - p)))
    elif schedule == "exp":
        s = (math.exp(p) - 1.0) / (math.e - 1.0)
    else:
        raise ConfigError(f"--warm-schedule must be exp, linear or cosine, got {schedule!r}")
    return float(radius * (1.0 + (warm_mult - 1.0) * s))


def official_cloud(modes, radius, alpha_bar, generators, n_points=300):
    """The released sampler's synthetic cloud around each mode, forward-diffused (B, N, D).

    Point j: ``m + rho_j u_j`` with u_j uniform on the unit sphere of R^D and
    rho = [N//2 values evenly spaced from 0.1 to radius, then N - N//2 uniform in
    [0, radius)], then ``sqrt(abar) p + sqrt(1 - abar) xi``. Drawn per sample from
    its own generator (or one shared torch.Generator) in a fixed order:
    directions, uniform radii, xi.
    """
    _check_tensor(modes=modes)
    if modes.dim() != 2:
        raise ConfigError(f"modes must be (B, D), got shape {tuple(modes.shape)}")
    _check_float(modes=modes)
    _check_scalars(radius=radius)
    _check_alpha_bar(alpha_bar, zero=True)  # (the released sampler draws it at a zero-terminal-SNR step too)
    n_int = _as_int(n_points)
    if n_int is None or n_int < 1:
        raise ConfigError(f"n_points must be an integer >= 1, got {n_points!r}")
    n_points = n_int
    B, D = modes.shape
    generators = _per_sample(generators, B)
    dev = modes.device
    n_lin = n_points // 2
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    rho_lin = torch.linspace(0.1, radius, n_lin, device=dev)
    out = torch.empty(B, n_points, D, device=dev, dtype=torch.float32)
    for b in range(B):
        gen = generators[b]
        u = torch.randn(n_points, D, generator=gen, device=dev)
        u = u / u.norm(dim=1, keepdim=True)
        rho = torch.cat([rho_lin, torch.rand(n_points - n_lin, generator=gen, device=dev) * radius])
        pts = modes[b].float()[None, :] + rho[:, None] * u
        xi = torch.randn(n_points, D, generator=gen, device=dev)
        out[b] = a * pts + s * xi
    return out


# ----------------------------------------------------------------------------
# fused ops: the patch / cloud drawn in registers, never stored
# ----------------------------------------------------------------------------
def _check_bd(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is not None:
        _check_tensor(**{name: t})
    if t is not None and t.shape != x.shape:
        raise ConfigError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    _check_float(**{name: t})


def _check_alpha_bar(alpha_bar, zero: bool = False) -> None:
    """alpha_bar a number in (0, 1] (``zero``: [0, 1], a zero-terminal-SNR schedule's last step)."""
    try:
        a = float(alpha_bar) if not isinstance(alpha_bar, (bool, str, bytes)) else math.nan
        ok = (0.0 <= a if zero else 0.0 < a) and a <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"alpha_bar must be a number in {'[' if zero else '('}0, 1], got {alpha_bar!r}")


def _check_patch_inputs(x, latents, order, lengths, k):
    _check_tensor(x=x, latents=latents, order=order)
    if x.dim() != 2:
        raise ConfigError(f"x must be (B, D), got shape {tuple(x.shape)}")
    B, D = x.shape
    if latents.dim() != 2 or latents.shape[1] != D:
        raise ConfigError(f"latents must be (n, D) with D == x.shape[1], got {tuple(latents.shape)} and {D}")
    _check_float(x=x, latents=latents)
    if order.dim() != 2 or order.shape[0] != B or order.is_floating_point() or order.dtype == torch.bool:
        raise ConfigError(f"order must be (B, n_order) integers with B == x.shape[0], got {tuple(order.shape)} {order.dtype}")
    return _check_order(latents, order, lengths, k)


def _check_order(latents, order, lengths, k):
    """lengths (B,) in [max(1, k), n_order]; the used prefix of ``order`` indexes rows of ``latents``."""
    B = order.shape[0]
    if lengths is None:  # (as manifold_correct's: every row; it was torch's "Could not infer dtype of NoneType")
        lengths = torch.full((B,), order.shape[1], dtype=torch.long, device=latents.device)
    lengths = _int_lengths(lengths, latents.device)
    if lengths.shape != (B,):
        raise ConfigError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
    n_order = order.shape[1]
    if _noise._capturing(latents.device):   # the value checks read the device: not inside a CUDA graph
        return lengths
    if bool((lengths < 1).any()) or bool((lengths > n_order).any()):
        raise ConfigError(f"lengths must lie in [1, n_order={n_order}], got min {int(lengths.min())} max {int(lengths.max())}")
    if B and int(lengths.min()) < k:  # (an empty batch has no shortest row)
        raise ConfigError(f"k={k} is larger than the patch (shortest has {int(lengths.min())} valid rows)")
    # each sample's own prefix (ragged: past a shorter sample's length, order may hold padding such as -1)
    used = torch.arange(n_order, device=order.device)[None, :] < lengths[:, None]
    if bool(((order < 0) | (order >= latents.shape[0]))[used].any()):
        raise ConfigError(f"order must index rows of latents in [0, {latents.shape[0]}) within each sample's length")
    return lengths


def manifold_correct_fused(x, latents, order, lengths, g, *, alpha_bar, seed, step, k, d, lambda_normal=1.0,
                           ridge=0.0, sample_ids=None, eps=None, lambda_mode=0.1, backend="auto"):
    """Paper step 4 (+5) on the time-aligned patch, which the fused kernels never materialise.

    The patch is ``sqrt(abar) latents[order[b, j]] + sqrt(1 - abar) xi(b, j)``, j < lengths[b], with xi
    the counter-based stream ``STREAM_PATCH`` (fresh per ``step``); then as :func:`manifold_correct`.

    Args:
        x: (B, D) current latents x_t. g: (B, D) mode guidance.
        latents: (n, D) class latents (fp32/bf16/fp16). order: (B, n_order) each sample's
            neighbourhood order (rows of ``latents``). lengths: (B,) patch lengths (prefixes of order).
        alpha_bar: abar_t in (0, 1]. seed, step: the noise counters (:mod:`manifoldgd_fast.noise`).
        k, d, lambda_normal, ridge: as :func:`manifold_correct`.
        sample_ids: (B,) noise ids (default the batch positions).
        eps: (B, D) or None. Given, returns ``eps - lambda_mode sqrt(1 - abar) g_corrected`` (SPEC 4.5)
            in eps's dtype; else the corrected g in g's dtype.
        backend: "auto" | "reference" | "triton".
    """
    k, d = _check_kd(k, d)
    _check_alpha_bar(alpha_bar)
    lengths = _check_patch_inputs(x, latents, order, lengths, k)
    _check_tensor(g=g)
    _check_bd("g", g, x)
    _check_bd("eps", eps, x)
    _check_scalars(lambda_normal=lambda_normal, ridge=ridge, lambda_mode=lambda_mode)
    sample_ids = _check_counters(seed, step, sample_ids, x.shape[0], x.device)
    if x.shape[0] == 0:  # an empty batch: nothing to correct
        return (g if eps is None else eps).clone()
    tens = {"x": x, "latents": latents, "order": order, "g": g, **({"eps": eps} if eps is not None else {})}
    why = lambda: _triton_reason(tens, B=x.shape[0], rows=order.shape[1], D=x.shape[1], k=k)  # noqa: E731
    if _pick_backend(backend, x.device, why) == "triton":
        return torch.ops.manifoldgd_fast.manifold_correct_fused(
            x.contiguous(), latents.contiguous(), order.contiguous(), lengths, g.contiguous(), sample_ids,
            None if eps is None else eps.contiguous(), float(alpha_bar), seed, step, k, d, float(lambda_normal),
            float(lambda_mode), _eig_backend(x.device))
    return manifold_correct_fused_ref(x, latents, order, lengths, g, alpha_bar=alpha_bar, seed=seed, step=step, k=k,
                                      d=d, lambda_normal=lambda_normal, ridge=ridge, sample_ids=sample_ids, eps=eps,
                                      lambda_mode=lambda_mode, noise_backend=_noise_backend(backend))


def _noise_backend(backend: str) -> str:
    """A forced reference backend draws its noise in PyTorch too (the reference path imports no kernel);
    otherwise the noise comes from the kernels' own helper where it runs, bit-identical to the fused kernels."""
    return "reference" if backend == "reference" else "auto"


def manifold_correct_fused_ref(x, latents, order, lengths, g, *, alpha_bar, seed, step, k, d, lambda_normal=1.0,
                               ridge=0.0, sample_ids=None, eps=None, lambda_mode=0.1, noise_backend="auto"):
    """Reference of :func:`manifold_correct_fused`: materialise the patch, then :func:`manifold_correct_ref`.

    ``noise_backend`` ("auto" | "reference") draws the patch noise (:func:`time_aligned_patch_philox`):
    "auto" matches the fused kernels bit for bit on a GPU, "reference" is PyTorch alone (a few ulp apart).
    """
    patch = time_aligned_patch_philox(latents, order, lengths, alpha_bar, seed=seed, step=step, sample_ids=sample_ids,
                                      backend=noise_backend)
    lengths = torch.as_tensor(lengths, device=latents.device).long()
    if eps is None:
        return manifold_correct_ref(x, patch, g, k=k, d=d, lambda_normal=lambda_normal, ridge=ridge, lengths=lengths)
    gc = manifold_correct_ref(x, patch, _work(g), k=k, d=d, lambda_normal=lambda_normal, ridge=ridge, lengths=lengths)
    return (_work(eps) - lambda_mode * math.sqrt(1.0 - alpha_bar) * gc).to(eps.dtype)


def manifold_pull_fused(x, modes, *, radius, alpha_bar, seed, step, n_points=300, k=12, d=3, scale=0.1,
                        bandwidth=0.1, ridge=1e-5, sample_ids=None, mean=None, backend="auto"):
    """Official step 3's manifold term on the synthetic cloud, which the fused kernels never materialise.

    The cloud is :func:`official_cloud_philox` (counter-based, fresh per ``step``); the term is
    :func:`manifold_pull`'s.

    Args:
        x: (B, D) current latents x_t. modes: (B, D) each sample's mode.
        radius: r_eff of the step (:func:`official_radius`). alpha_bar: abar_i in (0, 1].
        seed, step: the noise counters. n_points: N (300).
        k, d, scale, bandwidth, ridge: as :func:`manifold_pull`. sample_ids: (B,) noise ids.
        mean: (B, D) or None. Given, returns ``mean + term`` (the posterior-mean update) in mean's dtype;
            else the term in x's dtype.
        backend: "auto" | "reference" | "triton".
    """
    k, d = _check_kd(k, d)
    _check_alpha_bar(alpha_bar)
    _check_tensor(x=x, modes=modes)
    if x.dim() != 2:
        raise ConfigError(f"x must be (B, D), got shape {tuple(x.shape)}")
    _check_float(x=x)
    _check_bd("modes", modes, x)
    _check_bd("mean", mean, x)
    _check_scalars({"bandwidth": bandwidth}, scale=scale, ridge=ridge, radius=radius)
    if not isinstance(n_points, int) or n_points < k:
        raise ConfigError(f"n_points must be an int >= k={k}, got {n_points!r}")
    sample_ids = _check_counters(seed, step, sample_ids, x.shape[0], x.device)
    tens = {"x": x, "modes": modes, **({"mean": mean} if mean is not None else {})}
    why = lambda: _triton_reason(tens, B=x.shape[0], rows=n_points, D=x.shape[1], k=k)  # noqa: E731
    if _pick_backend(backend, x.device, why) == "triton":
        rho_lin = torch.linspace(0.1, radius, n_points // 2, device=x.device)
        return torch.ops.manifoldgd_fast.manifold_pull_fused(
            x.contiguous(), modes.contiguous(), rho_lin, sample_ids, None if mean is None else mean.contiguous(),
            float(radius), float(alpha_bar), seed, step, n_points, k, d, float(scale), float(bandwidth),
            _eig_backend(x.device))
    return manifold_pull_fused_ref(x, modes, radius=radius, alpha_bar=alpha_bar, seed=seed, step=step,
                                   n_points=n_points, k=k, d=d, scale=scale, bandwidth=bandwidth, ridge=ridge,
                                   sample_ids=sample_ids, mean=mean, noise_backend=_noise_backend(backend))


def manifold_pull_fused_ref(x, modes, *, radius, alpha_bar, seed, step, n_points=300, k=12, d=3, scale=0.1,
                            bandwidth=0.1, ridge=1e-5, sample_ids=None, mean=None, noise_backend="auto"):
    """Reference of :func:`manifold_pull_fused`: materialise the cloud, then :func:`manifold_pull_ref`.

    ``noise_backend``: as in :func:`manifold_correct_fused_ref` (for :func:`official_cloud_philox`).
    """
    cloud = official_cloud_philox(modes, radius, alpha_bar, seed=seed, step=step, n_points=n_points,
                                  sample_ids=sample_ids, backend=noise_backend)
    if mean is None:
        return manifold_pull_ref(x, cloud, k=k, d=d, scale=scale, bandwidth=bandwidth, ridge=ridge)
    term = manifold_pull_ref(_work(x), cloud, k=k, d=d, scale=scale, bandwidth=bandwidth, ridge=ridge)
    return (_work(mean) + term).to(mean.dtype)


# ----------------------------------------------------------------------------
# batched eigenpairs of small symmetric matrices (the eigen-step on its own)
# ----------------------------------------------------------------------------
_EIG_BACKENDS = ("auto", "reference", "cuda", "triton", "torch")


def sym_eig(A: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of a batch of small symmetric matrices, eigenvalues descending.

    Args:
        A: (B, n, n) symmetric (only its symmetric part is used), 1 <= n <= 64, float.
        backend: "auto" (chain CUDA C++ -> Triton -> torch, :func:`_eig_backend`), "cuda",
            "triton", "torch" (parallel Jacobi in PyTorch ops, no ``torch.linalg``, capturable)
            or "reference" (float64 ``torch.linalg.eigh``).
    Returns: (w (B, n), V (B, n, n) with eigenvectors as columns); fp32 from the Jacobi backends.
    """
    if A.dim() != 3 or A.shape[1] != A.shape[2] or not 1 <= A.shape[1] <= MAX_K or not A.is_floating_point():
        raise ConfigError(f"A must be (B, n, n) floats with 1 <= n <= {MAX_K}, got {tuple(A.shape)} {A.dtype}")
    if backend not in _EIG_BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(_EIG_BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return sym_eig_ref(A)
    chosen = _eig_backend(A.device) if backend == "auto" else backend
    if chosen == "cuda":
        if A.device.type != "cuda":
            raise BackendError(f"backend 'cuda' needs a CUDA tensor, A is on {A.device}")
        from .kernels import cuda_ext, sym_eig as sym_eig_k

        mod, reason = cuda_ext.load()
        if mod is None:
            raise BackendError(f"backend 'cuda': the CUDA C++ eigensolver is unavailable ({reason})")
        return cuda_ext.sym_eig(A.float().contiguous(), sym_eig_k.MAX_SWEEPS, sym_eig_k.TOL)
    if chosen == "triton":
        kern, why = _kernels()
        if kern is None or not kern.triton_device_ok(A.device):
            raise BackendError(f"backend 'triton' cannot take A: {why or f'A is on {A.device}'}")
        from .kernels import sym_eig as sym_eig_k

        return sym_eig_k.sym_eig(A.float())
    from .kernels import sym_eig_torch

    return sym_eig_torch.jacobi_eigh(A)


def sym_eig_ref(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`sym_eig`: float64 ``torch.linalg.eigh`` of the symmetric part, descending."""
    Ad = A.double()
    w, V = torch.linalg.eigh(0.5 * (Ad + Ad.transpose(1, 2)))
    return w.flip(-1), V.flip(-1)
