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

Backends: ``reference`` is the readable PyTorch below and runs anywhere.
``triton`` (fused kernels, CUDA) is not part of this release; asking for it
raises ``BackendError``. ``auto`` picks the fastest backend that can take the
input, today the reference.
"""
from __future__ import annotations

import math

import torch

from .errors import BackendError, ConfigError

_BACKENDS = ("auto", "reference", "triton")


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


def _pick_backend(backend: str, *tensors: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "triton":
        raise BackendError("backend 'triton': the fused guidance kernels are not part of this release; "
                           "use backend='reference' or 'auto'")
    return "reference"


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
        backend: "auto" | "reference" | "triton".
    Returns: (B, D) in g's dtype.
    """
    _check_kd(k, d)
    lengths = _check_rows("patch", x, patch, lengths, k)
    if g.shape != x.shape:
        raise ConfigError(f"g must have x's shape {tuple(x.shape)}, got {tuple(g.shape)}")
    if lambda_normal < 0 or ridge < 0:
        raise ConfigError(f"lambda_normal and ridge must be >= 0, got {lambda_normal} and {ridge}")
    _pick_backend(backend, x, patch, g)
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
    Returns: (B, D) in x's dtype.
    """
    _check_kd(k, d)
    lengths = _check_rows("cloud", x, cloud, lengths, k)
    if bandwidth <= 0 or scale < 0 or ridge < 0:
        raise ConfigError(f"bandwidth must be > 0 and scale, ridge >= 0, got {bandwidth}, {scale}, {ridge}")
    _pick_backend(backend, x, cloud)
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
