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
chosen in one place, :func:`_pick_backend`:

* ``reference``: the readable PyTorch below; runs anywhere.
* ``triton``: the fused kernels of ``manifoldgd_fast.kernels`` (kNN streamed in
  one pass, Gram + X g, batched Jacobi, projection fused with the eps / mean
  update). CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (how CI
  checks their numerics). An input they cannot take raises ``BackendError``
  naming the tensor and the rule (device, dtype, size limits: B <= 256,
  rows <= 100,000, D <= 16,384, k <= 64). Non-contiguous inputs are made
  contiguous.
* ``auto``: ``triton`` for CUDA tensors it can take, else ``reference`` (warns
  once when Triton is missing on a CUDA machine).

The eigen-step inside the fused path has its own chain, decided once per
device in :func:`_eig_backend`: CUDA C++ (``csrc/sym_eig.cu``, compiled at run
time; ``MANIFOLDGD_NO_CUDA_EXT=1`` skips it) -> the Triton Jacobi -> the
PyTorch Jacobi (``sym_eig`` only). A missing backend warns once; importing this
module never needs Triton, a GPU or a compiler.

The fused ops (``manifold_correct_fused``, ``manifold_pull_fused``) never
materialise the patch or the cloud; their noise is counter-based (Philox4x32-10)
so the references can draw exactly the same numbers. Counter layout (one
normal per (seed, step, stream, sample, row, col), independent of D, blocks,
batch composition and launch order):

    key      (seed mod 2^32, seed >> 32), 0 <= seed < 2^63
    counter  (col // 4, row, sample_id, step * 16 + stream), 0 <= step < 2^28
    normals  Box-Muller (Triton's pair_uniform_to_normal) on (u0, u1) -> cols 4q, 4q+1
             and on (u2, u3) -> cols 4q+2, 4q+3; u_i = Triton's uint_to_uniform_float(r_i)
    uniform  r0 of counter (0, row, sample_id, step * 16 + stream)
    streams  0 patch xi (row = patch row j, i.e. position j of the sample's order)
             1 cloud direction g_j (u_j = g_j / |g_j|), 2 cloud radius (points j >= N//2),
             3 cloud xi

``sample_ids`` (B,) default to the batch positions; pass global ids to make a
sample's noise independent of the batch it is drawn in. The Triton
materialisation (:func:`philox_normal`, backend triton) is bit-identical to the
in-kernel noise on the same device; the pure-PyTorch one has the same integer
stream exactly and normals within a few ulp (the transcendental functions differ).

Ops that run inside a captured step are registered with ``torch.library``
(``manifoldgd_fast::manifold_correct_rows``, ``..._pull_rows``,
``..._correct_fused``, ``..._pull_fused``; ``custom_op`` + ``register_fake``):
those do no checks and no host synchronisation; the public functions check, then call them.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from .errors import BackendError, ConfigError

_BACKENDS = ("auto", "reference", "triton")
# What the fused kernels are written and tested for (SPEC sizes with margin).
MAX_B, MAX_ROWS, MAX_D, MAX_K = 256, 100_000, 16_384, 64
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_WARNED: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _kernels():
    """(the kernels package, None) or (None, why it cannot be imported). Imported on first use only."""
    try:
        from . import kernels
        from .kernels import manifold_correct, manifold_pull, philox_normal, sym_eig  # noqa: F401
        return kernels, None
    except Exception as e:  # no triton, or a broken install: the reference path still works
        return None, f"the Triton kernels cannot be imported ({type(e).__name__}: {e})"


# ----------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------
def _check_rows(name: str, x: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor | None, k: int) -> torch.Tensor:
    if x.dim() != 2:
        raise ConfigError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if rows.dim() != 3 or rows.shape[0] != x.shape[0] or rows.shape[2] != x.shape[1]:
        raise ConfigError(f"{name} must be (B, M, D) with B == x.shape[0] and D == x.shape[1], "
                          f"got {tuple(rows.shape)} and x {tuple(x.shape)}")
    B, M = rows.shape[:2]
    if lengths is None:
        lengths = torch.full((B,), M, dtype=torch.long, device=rows.device)
    else:
        lengths = torch.as_tensor(lengths, device=rows.device).long()
        if lengths.shape != (B,):
            raise ConfigError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > M).any()):
            raise ConfigError(f"lengths must lie in [1, M={M}], got min {int(lengths.min())} max {int(lengths.max())}")
    if int(lengths.min()) < k:
        raise ConfigError(f"k={k} is larger than the {name} (shortest has {int(lengths.min())} valid rows)")
    return lengths


def _check_kd(k: int, d: int) -> None:
    if not isinstance(k, int) or k < 2:
        raise ConfigError(f"k must be an integer >= 2, got {k!r}")
    if not isinstance(d, int) or d < 1 or d >= k:
        raise ConfigError(f"d must be an integer with 1 <= d < k={k}, got {d!r}")


def _triton_reason(tensors: dict, *, B: int, rows: int, D: int, k: int) -> str | None:
    """Why the fused kernels cannot take these inputs (a sentence naming the tensor and the rule), or None.

    ``tensors``: name -> tensor; the floating ones must be fp32/bf16/fp16.
    """
    kern, why = _kernels()
    if kern is None:
        return why
    (name0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            return f"{name} is on {t.device} but {name0} is on {t0.device}"
    if not kern.triton_device_ok(t0.device):
        where = "CUDA tensors" if not kern.INTERPRET else "CPU tensors (TRITON_INTERPRET=1 is set)"
        return (f"{name0} is on {t0.device}; the Triton kernels take {where}"
                + ("" if kern.INTERPRET else " (on the CPU only under TRITON_INTERPRET=1)"))
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype not in _FLOATS:
            return f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    for what, val, lim in (("B", B, MAX_B), ("the row count", rows, MAX_ROWS), ("D", D, MAX_D), ("k", k, MAX_K)):
        if val > lim:
            return f"{what} = {val} is above the fused kernels' limit {lim}"
    return None


def _pick_backend(backend: str, device: torch.device, why_not) -> str:
    """The one place the manifold ops choose between 'reference' and 'triton'.

    ``why_not()`` -> None, or why the fused kernels cannot take the input.
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
    if reason is not None and _kernels()[0] is None:
        _warn_once("no_triton", f"guidance ops: {reason}; using the PyTorch reference")
    return "triton" if reason is None else "reference"


@functools.lru_cache(maxsize=None)
def _eig_backend(device: torch.device) -> str:
    """The eigen-step's chain, decided once per device: 'cuda' (C++) -> 'triton' -> 'torch'."""
    if device.type == "cuda" and os.environ.get("MANIFOLDGD_NO_CUDA_EXT", "0") != "1":
        from .kernels import cuda_ext

        mod, reason = cuda_ext.load()
        if mod is not None:
            return "cuda"
        _warn_once("cuda_ext", f"CUDA C++ eigensolver unavailable ({reason}); using the Triton Jacobi")
    kern, _ = _kernels()
    if kern is not None and kern.triton_device_ok(device):
        return "triton"
    return "torch"


def _eig_fn(eig: str):
    """The external eigensolver the fused pipeline calls (None: the Triton Jacobi inside the coef kernel)."""
    if eig != "cuda":
        return None
    from .kernels import cuda_ext, sym_eig as sym_eig_k

    return functools.partial(cuda_ext.sym_eig, max_sweeps=sym_eig_k.MAX_SWEEPS, tol=sym_eig_k.TOL)


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
    d2 = d2.masked_fill(invalid, float("inf"))
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


def _project_tangent(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U U^T v for U (B, D, d), v (B, D)."""
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
    """
    _check_kd(k, d)
    lengths = _check_rows("patch", x, patch, lengths, k)
    if g.shape != x.shape:
        raise ConfigError(f"g must have x's shape {tuple(x.shape)}, got {tuple(g.shape)}")
    if lambda_normal < 0 or ridge < 0:
        raise ConfigError(f"lambda_normal and ridge must be >= 0, got {lambda_normal} and {ridge}")
    why = lambda: _triton_reason({"x": x, "patch": patch, "g": g}, B=x.shape[0], rows=patch.shape[1],  # noqa: E731
                                 D=x.shape[1], k=k)
    if _pick_backend(backend, x.device, why) == "triton":
        return torch.ops.manifoldgd_fast.manifold_correct_rows(
            x.contiguous(), patch.contiguous(), g.contiguous(), lengths, k, d, float(lambda_normal),
            _eig_backend(x.device))
    return manifold_correct_ref(x, patch, g, k=k, d=d, lambda_normal=lambda_normal, ridge=ridge, lengths=lengths)


def manifold_correct_ref(x, patch, g, *, k, d, lambda_normal=1.0, ridge=0.0, lengths=None):
    """Reference of :func:`manifold_correct` (same signature, no backend)."""
    B, M, D = patch.shape
    if lengths is None:
        lengths = torch.full((B,), M, dtype=torch.long, device=patch.device)
    idx, _ = knn_rows_ref(x, patch, k, lengths)
    nb = torch.gather(_work(patch), 1, idx[:, :, None].expand(B, k, D))  # (B, k, D)
    X = nb - nb.mean(1, keepdim=True)                                      # (B, k, D)
    U = tangent_basis_ref(X, d)                                            # (B, D, d)
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
    _check_kd(k, d)
    lengths = _check_rows("cloud", x, cloud, lengths, k)
    if bandwidth <= 0 or scale < 0 or ridge < 0:
        raise ConfigError(f"bandwidth must be > 0 and scale, ridge >= 0, got {bandwidth}, {scale}, {ridge}")
    why = lambda: _triton_reason({"x": x, "cloud": cloud}, B=x.shape[0], rows=cloud.shape[1],  # noqa: E731
                                 D=x.shape[1], k=k)
    if _pick_backend(backend, x.device, why) == "triton":
        return torch.ops.manifoldgd_fast.manifold_pull_rows(
            x.contiguous(), cloud.contiguous(), lengths, k, d, float(scale), float(bandwidth), _eig_backend(x.device))
    return manifold_pull_ref(x, cloud, k=k, d=d, scale=scale, bandwidth=bandwidth, ridge=ridge, lengths=lengths)


def manifold_pull_ref(x, cloud, *, k=12, d=3, scale=0.1, bandwidth=0.1, ridge=1e-5, lengths=None):
    """Reference of :func:`manifold_pull` (same signature, no backend)."""
    B, N, D = cloud.shape
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.long, device=cloud.device)
    idx, d2 = knn_rows_ref(x, cloud, k, lengths)
    nb = torch.gather(_work(cloud), 1, idx[:, :, None].expand(B, k, D))  # (B, k, D)
    c = nb.mean(1)                                                         # (B, D)
    U = tangent_basis_ref(nb - c[:, None, :], d)                           # (B, D, d)
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
    if len(generators) != B:
        raise ConfigError(f"generators must be one torch.Generator or a list of B={B}, got {len(generators)}")
    return list(generators)


def time_aligned_patch(latents, order, lengths, alpha_bar, generators):
    """Paper patch ``P_t = sqrt(abar) z + sqrt(1 - abar) xi`` (B, M, D), fresh xi each call.

    Args:
        latents: (n, D) class latents.
        order: (B, n) each sample's neighbourhood order (nearest to its mode first).
        lengths: (B,) rows in each patch (prefix of the order); M = max(lengths).
        alpha_bar: float, cumulative alpha of the current step.
        generators: a torch.Generator, or a list of B (one per sample, so a
            sample's noise does not depend on which batch it was drawn in).
    Rows beyond a sample's length are zero.
    """
    B = order.shape[0]
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
# counter-based noise (the layout is in the module docstring)
# ----------------------------------------------------------------------------
STREAM_PATCH, STREAM_CLOUD_DIR, STREAM_CLOUD_RADIUS, STREAM_CLOUD_XI = 0, 1, 2, 3
_M32 = 0xFFFFFFFF
_MAX_SEED, _MAX_STEP = 2 ** 63, 2 ** 28


def _check_counters(seed, step, sample_ids, B: int, device) -> torch.Tensor:
    if not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ConfigError(f"seed must be an int in [0, 2^63), got {seed!r}")
    if not isinstance(step, int) or not 0 <= step < _MAX_STEP:
        raise ConfigError(f"step must be an int in [0, 2^28), got {step!r}")
    if sample_ids is None:
        return torch.arange(B, device=device, dtype=torch.long)
    sample_ids = torch.as_tensor(sample_ids, device=device)
    if sample_ids.shape != (B,) or sample_ids.is_floating_point():
        raise ConfigError(f"sample_ids must be (B,) = ({B},) integers, got {tuple(sample_ids.shape)} {sample_ids.dtype}")
    if B and (int(sample_ids.min()) < 0 or int(sample_ids.max()) > _M32):
        raise ConfigError("sample_ids must lie in [0, 2^32)")
    return sample_ids.long().contiguous()


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * x for a constant a < 2^32 and int64 x in [0, 2^32), overflow-free."""
    xh, xl = x >> 16, x & 0xFFFF
    pl, ph = a * xl, a * xh                                  # < 2^48 each
    return (ph + (pl >> 16)) >> 16, (pl + ((ph & 0xFFFF) << 16)) & _M32


def philox4x32_ref(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32-10 (Salmon et al. 2011; Triton's ``tl.random.philox``) on int64 tensors holding uint32.

    Key (seed mod 2^32, seed >> 32). Returns the four output words as int64 tensors in [0, 2^32).
    """
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hb, lb = _mulhilo32(0xCD9E8D57, c2)
        ha, la = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hb ^ c1 ^ k0, lb, ha ^ c3 ^ k1, la
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _unit_float(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: r as int32, negative -> ~r, times 4.6566127342e-10 (fp32), in [0, 1)."""
    v = torch.where(r >= 2 ** 31, r ^ _M32, r)
    return v.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=r.device)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal, in fp32."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32, device=u1.device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def _counters(seed, step, stream, sample_ids, n_rows, n_cols):
    B = sample_ids.shape[0]
    dev = sample_ids.device
    shape = (B, n_rows, n_cols)
    c0 = torch.arange(n_cols, device=dev).view(1, 1, n_cols).expand(shape)
    c1 = torch.arange(n_rows, device=dev).view(1, n_rows, 1).expand(shape)
    c2 = (sample_ids.long() & _M32).view(B, 1, 1).expand(shape)
    c3 = torch.full(shape, (step * 16 + stream) & _M32, device=dev, dtype=torch.long)
    return philox4x32_ref(seed, c0, c1, c2, c3)


def philox_normal_ref(seed: int, step: int, stream: int, sample_ids: torch.Tensor, n_rows: int, D: int) -> torch.Tensor:
    """Reference of :func:`philox_normal` in PyTorch: (B, n_rows, D) fp32 (integer stream exact, normals to a few ulp)."""
    nq = (D + 3) // 4
    r = _counters(seed, step, stream, sample_ids, n_rows, nq)
    n0, n1 = _box_muller(_unit_float(r[0]), _unit_float(r[1]))
    n2, n3 = _box_muller(_unit_float(r[2]), _unit_float(r[3]))
    return torch.stack([n0, n1, n2, n3], -1).reshape(sample_ids.shape[0], n_rows, 4 * nq)[..., :D]


def philox_uniform_ref(seed: int, step: int, stream: int, sample_ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(B, n_rows) fp32 uniforms in [0, 1): r0 of counter (0, row, sample, step * 16 + stream). Exact on any device."""
    return _unit_float(_counters(seed, step, stream, sample_ids, n_rows, 1)[0][..., 0])


def philox_normal(seed: int, step: int, stream: int, sample_ids, n_rows: int, D: int, *, backend: str = "auto"):
    """(B, n_rows, D) fp32 standard normals of ``stream`` at ``step`` (counter layout in the module docstring).

    Args:
        seed: int in [0, 2^63). step: int in [0, 2^28). stream: 0..15 (``STREAM_*``).
        sample_ids: (B,) integers in [0, 2^32), the c2 counter of each sample.
        n_rows, D: rows and columns drawn (a value does not depend on D).
        backend: "triton" (the kernels' own helper: bit-identical to the in-kernel noise on the
            same device), "reference" (PyTorch) or "auto" (triton where it can run, else reference).
    """
    if not 0 <= stream < 16:
        raise ConfigError(f"stream must be in [0, 16), got {stream}")
    dev = torch.as_tensor(sample_ids).device
    sample_ids = _check_counters(seed, step, sample_ids, torch.as_tensor(sample_ids).shape[0], dev)
    kern, why = _kernels()
    usable = kern is not None and kern.triton_device_ok(dev)
    if backend == "triton" and not usable:
        raise BackendError(f"backend 'triton' cannot draw the noise: {why or f'sample_ids are on {dev}'}")
    if backend not in ("auto", "triton", "reference"):
        raise ConfigError(f"backend must be auto, triton or reference, got {backend!r}")
    if backend == "reference" or not usable:
        return philox_normal_ref(seed, step, stream, sample_ids, n_rows, D)
    from .kernels import philox_normal as pn

    return pn.philox_normal(seed, step, stream, sample_ids, n_rows, D)


def time_aligned_patch_philox(latents, order, lengths, alpha_bar, *, seed, step, sample_ids=None, backend="auto"):
    """:func:`time_aligned_patch` with counter-based noise: exactly the patch the fused kernels see.

    ``P_t[b, j] = sqrt(abar) latents[order[b, j]] + sqrt(1 - abar) xi(b, j)`` for j < lengths[b]
    (xi: stream ``STREAM_PATCH``, row counter j), zero beyond. Returns (B, M, D) fp32, M = max(lengths).
    """
    B = order.shape[0]
    sample_ids = _check_counters(seed, step, sample_ids, B, latents.device)
    lengths = torch.as_tensor(lengths, device=latents.device).long()
    M, D = int(lengths.max()), latents.shape[1]
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    xi = philox_normal(seed, step, STREAM_PATCH, sample_ids, M, D, backend=backend)      # (B, M, D)
    patch = a * latents[order[:, :M]].float() + s * xi
    valid = torch.arange(M, device=latents.device)[None, :] < lengths[:, None]
    return patch * valid[:, :, None]


def official_cloud_radii(radius: float, *, seed: int, step: int, n_points: int, sample_ids) -> torch.Tensor:
    """(B, N) fp32 radii of the cloud: ``linspace(0.1, radius, N//2)``, then ``radius * U[0, 1)`` (stream 2, row j)."""
    sample_ids = torch.as_tensor(sample_ids)
    dev = sample_ids.device
    n_lin = n_points // 2
    lin = torch.linspace(0.1, radius, n_lin, device=dev).expand(sample_ids.shape[0], n_lin)
    u = philox_uniform_ref(seed, step, STREAM_CLOUD_RADIUS, sample_ids, n_points)[:, n_lin:]
    return torch.cat([lin, u * radius], 1)


def official_cloud_philox(modes, radius, alpha_bar, *, seed, step, n_points=300, sample_ids=None, backend="auto"):
    """:func:`official_cloud` with counter-based noise: exactly the cloud the fused kernels never store.

    Point j: ``sqrt(abar) (m + rho_j g_j / |g_j|) + sqrt(1 - abar) xi_j`` with g (stream 1), rho
    (:func:`official_cloud_radii`), xi (stream 3). Returns (B, N, D) fp32.
    """
    B, D = modes.shape
    sample_ids = _check_counters(seed, step, sample_ids, B, modes.device)
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    g = philox_normal(seed, step, STREAM_CLOUD_DIR, sample_ids, n_points, D, backend=backend)   # (B, N, D)
    u = g / g.norm(dim=2, keepdim=True)
    rho = official_cloud_radii(radius, seed=seed, step=step, n_points=n_points, sample_ids=sample_ids)
    pts = modes.float()[:, None, :] + rho[:, :, None] * u
    xi = philox_normal(seed, step, STREAM_CLOUD_XI, sample_ids, n_points, D, backend=backend)
    return a * pts + s * xi


# ----------------------------------------------------------------------------
# fused ops: the patch / cloud drawn in registers, never stored
# ----------------------------------------------------------------------------
def _check_bd(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is not None and t.shape != x.shape:
        raise ConfigError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def _check_alpha_bar(alpha_bar) -> None:
    if not 0.0 < float(alpha_bar) <= 1.0:
        raise ConfigError(f"alpha_bar must lie in (0, 1], got {alpha_bar}")


def _check_patch_inputs(x, latents, order, lengths, k):
    if x.dim() != 2:
        raise ConfigError(f"x must be (B, D), got shape {tuple(x.shape)}")
    B, D = x.shape
    if latents.dim() != 2 or latents.shape[1] != D:
        raise ConfigError(f"latents must be (n, D) with D == x.shape[1], got {tuple(latents.shape)} and {D}")
    if order.dim() != 2 or order.shape[0] != B or order.is_floating_point():
        raise ConfigError(f"order must be (B, n_order) integers with B == x.shape[0], got {tuple(order.shape)} {order.dtype}")
    lengths = torch.as_tensor(lengths, device=latents.device).long()
    if lengths.shape != (B,):
        raise ConfigError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
    n_order = order.shape[1]
    if bool((lengths < 1).any()) or bool((lengths > n_order).any()):
        raise ConfigError(f"lengths must lie in [1, n_order={n_order}], got min {int(lengths.min())} max {int(lengths.max())}")
    if int(lengths.min()) < k:
        raise ConfigError(f"k={k} is larger than the patch (shortest has {int(lengths.min())} valid rows)")
    used = order[:, : int(lengths.max())]
    if int(used.min()) < 0 or int(used.max()) >= latents.shape[0]:
        raise ConfigError(f"order must index rows of latents in [0, {latents.shape[0]})")
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
        alpha_bar: abar_t in (0, 1]. seed, step: the noise counters (module docstring).
        k, d, lambda_normal, ridge: as :func:`manifold_correct`.
        sample_ids: (B,) noise ids (default the batch positions).
        eps: (B, D) or None. Given, returns ``eps - lambda_mode sqrt(1 - abar) g_corrected`` (SPEC 4.5)
            in eps's dtype; else the corrected g in g's dtype.
        backend: "auto" | "reference" | "triton".
    """
    _check_kd(k, d)
    _check_alpha_bar(alpha_bar)
    lengths = _check_patch_inputs(x, latents, order, lengths, k)
    _check_bd("g", g, x)
    _check_bd("eps", eps, x)
    if lambda_normal < 0 or ridge < 0:
        raise ConfigError(f"lambda_normal and ridge must be >= 0, got {lambda_normal} and {ridge}")
    sample_ids = _check_counters(seed, step, sample_ids, x.shape[0], x.device)
    tens = {"x": x, "latents": latents, "order": order, "g": g, **({"eps": eps} if eps is not None else {})}
    why = lambda: _triton_reason(tens, B=x.shape[0], rows=order.shape[1], D=x.shape[1], k=k)  # noqa: E731
    if _pick_backend(backend, x.device, why) == "triton":
        return torch.ops.manifoldgd_fast.manifold_correct_fused(
            x.contiguous(), latents.contiguous(), order.contiguous(), lengths, g.contiguous(), sample_ids,
            None if eps is None else eps.contiguous(), float(alpha_bar), seed, step, k, d, float(lambda_normal),
            float(lambda_mode), _eig_backend(x.device))
    return manifold_correct_fused_ref(x, latents, order, lengths, g, alpha_bar=alpha_bar, seed=seed, step=step, k=k,
                                      d=d, lambda_normal=lambda_normal, ridge=ridge, sample_ids=sample_ids, eps=eps,
                                      lambda_mode=lambda_mode)


def manifold_correct_fused_ref(x, latents, order, lengths, g, *, alpha_bar, seed, step, k, d, lambda_normal=1.0,
                               ridge=0.0, sample_ids=None, eps=None, lambda_mode=0.1):
    """Reference of :func:`manifold_correct_fused`: materialise the patch, then :func:`manifold_correct_ref`."""
    patch = time_aligned_patch_philox(latents, order, lengths, alpha_bar, seed=seed, step=step, sample_ids=sample_ids)
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
    _check_kd(k, d)
    _check_alpha_bar(alpha_bar)
    if x.dim() != 2:
        raise ConfigError(f"x must be (B, D), got shape {tuple(x.shape)}")
    _check_bd("modes", modes, x)
    _check_bd("mean", mean, x)
    if bandwidth <= 0 or scale < 0 or ridge < 0 or radius < 0:
        raise ConfigError(f"bandwidth must be > 0 and scale, ridge, radius >= 0, got {bandwidth}, {scale}, {ridge}, {radius}")
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
                                   sample_ids=sample_ids, mean=mean)


def manifold_pull_fused_ref(x, modes, *, radius, alpha_bar, seed, step, n_points=300, k=12, d=3, scale=0.1,
                            bandwidth=0.1, ridge=1e-5, sample_ids=None, mean=None):
    """Reference of :func:`manifold_pull_fused`: materialise the cloud, then :func:`manifold_pull_ref`."""
    cloud = official_cloud_philox(modes, radius, alpha_bar, seed=seed, step=step, n_points=n_points,
                                  sample_ids=sample_ids)
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


# ----------------------------------------------------------------------------
# torch.library registration of the fused ops (check-free, no host sync: capturable)
# ----------------------------------------------------------------------------
def _register_library_ops() -> None:
    lib = torch.library

    @lib.custom_op("manifoldgd_fast::manifold_correct_rows", mutates_args=())
    def _correct_rows(x: torch.Tensor, patch: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, k: int, d: int,
                      lambda_normal: float, eig: str) -> torch.Tensor:
        from .kernels import manifold_correct as mc

        return mc.rows(x, patch, g, lengths, k, d, lambda_normal, eig=_eig_fn(eig))

    @_correct_rows.register_fake
    def _(x, patch, g, lengths, k, d, lambda_normal, eig):
        return torch.empty_like(g)

    @lib.custom_op("manifoldgd_fast::manifold_pull_rows", mutates_args=())
    def _pull_rows(x: torch.Tensor, cloud: torch.Tensor, lengths: torch.Tensor, k: int, d: int, scale: float,
                   bandwidth: float, eig: str) -> torch.Tensor:
        from .kernels import manifold_pull as mp

        return mp.rows(x, cloud, lengths, k, d, scale, bandwidth, eig=_eig_fn(eig))

    @_pull_rows.register_fake
    def _(x, cloud, lengths, k, d, scale, bandwidth, eig):
        return torch.empty_like(x)

    @lib.custom_op("manifoldgd_fast::manifold_correct_fused", mutates_args=())
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

    @lib.custom_op("manifoldgd_fast::manifold_pull_fused", mutates_args=())
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
