"""Mode discovery: the IPC centroids of one class's latents (SPEC 2, 3).

Every function takes the class's latents ``z`` as an (n, D) float tensor
(flattened VAE latents; ``discover_modes`` also flattens (n, C, H, W)) and
returns modes on ``z``'s device. The methods (``discover_modes`` dispatches):

- ``kmeans``               -- Lloyd with k-means++ seeding (MGD3's modes);
- ``divisive_official``    -- the released ManifoldGD rule: bisect the
                              largest-SSE leaf until IPC leaves, then order
                              the leaves by a level sweep; modes are medoids;
- ``divisive_paper``       -- the paper's levelwise rule: a full bisecting
                              tree, one node per level from the start level
                              up to the root, then random leaves;
- ``gmm_modes``, ``random_modes``, ``agglomerative_modes`` -- baselines.

This module is the entry point: ``discover_modes``, the GMM and random
baselines, and the paper formulation's neighbourhoods and radius annealing
(``neighbourhood_order``, ``class_radii``, ``anneal_radius``,
``patch_lengths``). The hierarchical methods (both divisive trees,
agglomerative) live in ``modes_tree``; k-means, with the input checks and
helpers every method shares, in ``_modes_common``. All are importable from here.

Randomness: every random draw comes from a CPU ``torch.Generator`` seeded by
an explicit integer ``seed`` (indices are drawn on the CPU, then moved), so a
seed gives the same draws on any device. Arithmetic runs in float32 (float64
if ``z`` is float64, which tests use to make ties exact).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._modes_common import (KMEANS_ITERS, KMEANS_TOL, LINKAGES, MODE_POINTS, _as_latents, _choice, _closest_latents,
                            _generator, _int, _seed, _tol, kmeans)
from .errors import ConfigError, DataError
from .modes_tree import agglomerative, agglomerative_modes, bisecting_tree, divisive_official, divisive_paper

__all__ = [
    "kmeans",
    "bisecting_tree",
    "divisive_official",
    "divisive_paper",
    "gmm_modes",
    "random_modes",
    "agglomerative",
    "agglomerative_modes",
    "discover_modes",
    "neighbourhood_order",
    "class_radii",
    "anneal_radius",
    "patch_lengths",
]

MODE_METHODS = ("kmeans", "divisive", "gmm", "random", "agglomerative")
FORMULATIONS = ("official", "paper")
RADIUS_SCHEDULES = ("exponential", "cosine", "linear", "constant")
RADIUS_UNITS = ("quantile", "absolute")

_GMM_TOL = 1e-3      # change of the mean log-likelihood per sample (sklearn's default)
GMM_ITERS = 100      # EM steps at most (sklearn GaussianMixture's max_iter)
_VAR_FLOOR = 1e-6    # diagonal variance floor of the GMM


# ----------------------------------------------------------------------------
# baselines: GMM, random (agglomerative: modes_tree)
# ----------------------------------------------------------------------------
def _gmm_m_step(x: Tensor, x2: Tensor, resp: Tensor, prev: tuple[Tensor, Tensor] | None):
    """Weights (k,), means (k, D), diagonal variances (k, D) from responsibilities (n, k)."""
    nk = resp.sum(0)                                   # (k,)
    safe = nk.clamp_min(torch.finfo(x.dtype).tiny)[:, None]
    means = resp.T @ x / safe
    var = (resp.T @ x2 / safe - means * means).clamp_min(_VAR_FLOOR)
    if prev is not None:
        # A component that lost all its points keeps its last parameters rather
        # than collapsing to 0/0; its weight is 0 so it stays inert.
        dead = (nk <= 10 * torch.finfo(x.dtype).eps)[:, None]
        means = torch.where(dead, prev[0], means)
        var = torch.where(dead, prev[1], var)
    return nk / x.shape[0], means, var


def _gmm_log_prob(x: Tensor, x2: Tensor, weights: Tensor, means: Tensor, var: Tensor) -> Tensor:
    """log w_j + log N(x_i | mu_j, diag var_j): (n, k), without an (n, k, D) tensor."""
    prec = 1.0 / var                                                       # (k, D)
    maha = x2 @ prec.T - 2.0 * (x @ (means * prec).T) + (means * means * prec).sum(1)
    maha = maha.clamp_min(0.0)                                             # (n, k)
    log_det = torch.log(var).sum(1)                                        # (k,)
    d = x.shape[1]
    return torch.log(weights) - 0.5 * (d * math.log(2 * math.pi) + log_det + maha)


def gmm_modes(z: Tensor, k: int, *, seed: int, iters: int = GMM_ITERS) -> Tensor:
    """Means of a diagonal-covariance Gaussian mixture fitted by EM.

    Initialised from ``kmeans(z, k, seed=seed)`` (hard responsibilities);
    variances floored at 1e-6; stops when the mean log-likelihood per sample
    changes by less than 1e-3 or after ``iters`` EM steps.

    Returns:
        (k, D) component means, heaviest component first (stable on ties).
    """
    x = _as_latents(z)
    _int(iters, "iters", 1)
    centres, labels = kmeans(x, k, seed=seed)
    x2 = x * x
    resp = torch.nn.functional.one_hot(labels, k).to(x.dtype)              # (n, k)
    # a cluster k-means left empty (fewer distinct latents than k) starts, and stays at weight 0, on its
    # centre (a duplicate of a real one), not on the origin that 0 / tiny would give
    start = (centres.to(x.dtype), x.var(0, unbiased=False).clamp_min(_VAR_FLOOR).expand(k, -1))
    weights, means, var = _gmm_m_step(x, x2, resp, start)
    prev_ll = -math.inf
    for _ in range(iters):
        log_prob = _gmm_log_prob(x, x2, weights, means, var)
        log_norm = torch.logsumexp(log_prob, 1)                            # (n,)
        resp = torch.exp(log_prob - log_norm[:, None])
        weights, means, var = _gmm_m_step(x, x2, resp, (means, var))
        ll = float(log_norm.mean())
        if abs(ll - prev_ll) < _GMM_TOL:
            break
        prev_ll = ll
    order = torch.argsort(weights, descending=True, stable=True)
    return means[order]


def random_modes(z: Tensor, k: int, *, seed: int) -> Tensor:
    """k distinct rows of ``z`` (distinct indices), chosen uniformly: (k, D)."""
    x = _as_latents(z)
    _int(k, "k", 1)
    if k > x.shape[0]:
        raise DataError(f"random modes: k={k} but only {x.shape[0]} latents")
    idx = torch.randperm(x.shape[0], generator=_generator(_seed(seed)))[:k]
    return x[idx.to(x.device)]


# ----------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------
def discover_modes(z: Tensor, ipc: int, *, method: str, formulation: str = "official", seed: int = 0,
                   level: int | None = None, mode_point: str = "auto", max_depth: int | None = None,
                   min_leaf: int = 2, linkage: str = "ward", kmeans_iters: int = KMEANS_ITERS,
                   bisect_inits: int = 10, kmeans_tol: float = KMEANS_TOL, gmm_iters: int = GMM_ITERS) -> Tensor:
    """The IPC centroids of one class (SPEC 2).

    Args:
        z: (n, ...) latents of one class; flattened to (n, D).
        ipc: number of modes, 1 <= ipc <= n.
        method: kmeans | divisive | gmm | random | agglomerative.
        formulation: official | paper (selects the divisive rule).
        level: divisive only and required: the official start level i, or the
            paper start level L (the caller resolves the 6/1 or 3/2 default).
        mode_point: auto (medoid for official divisive, mean otherwise) |
            mean | medoid (for divisive and agglomerative the member closest
            to its set's mean; for kmeans and gmm the class latent closest to
            each centre, as MGD3's "closest sample to the k-means centroid").
    Returns:
        (ipc, D) float32 modes on ``z``'s device.
    """
    _choice(method, "--mode-method", MODE_METHODS)
    _choice(formulation, "--formulation", FORMULATIONS)
    _choice(mode_point, "--mode-point", ("auto",) + MODE_POINTS)
    _int(ipc, "--ipc", 1)
    _seed(seed)
    _int(kmeans_iters, "--kmeans-iters", 1)
    _int(gmm_iters, "--gmm-iters", 1)
    _int(bisect_inits, "--bisect-inits", 1)
    _tol(kmeans_tol, "--kmeans-tol")
    _int(min_leaf, "--min-leaf", 1)
    if max_depth is not None:
        _int(max_depth, "--max-depth", 0)
    if method == "divisive":
        if level is None:
            raise ConfigError("--level is required for --mode-method divisive")
        _int(level, "--level", 0)
    if method == "agglomerative":
        _choice(linkage, "--linkage", LINKAGES)
    x = _as_latents(z)
    n = x.shape[0]
    if ipc > n:
        raise DataError(f"class has {n} latents, fewer than --ipc={ipc}")
    if mode_point == "auto":
        mode_point = "medoid" if (method == "divisive" and formulation == "official") else "mean"

    if method == "kmeans":
        modes = kmeans(x, ipc, seed=seed, iters=kmeans_iters, tol=kmeans_tol)[0]
        if mode_point == "medoid":  # MGD3's "closest sample to the k-means centroid": over the whole class
            modes = _closest_latents(x, modes)
    elif method == "divisive" and formulation == "official":
        modes = divisive_official(x, ipc, level=level, seed=seed, mode_point=mode_point,
                                  n_init=bisect_inits, iters=kmeans_iters, tol=kmeans_tol)
    elif method == "divisive":
        modes = divisive_paper(x, ipc, start_level=level, seed=seed, max_depth=max_depth, min_leaf=min_leaf,
                               mode_point=mode_point, n_init=bisect_inits, iters=kmeans_iters, tol=kmeans_tol)
    elif method == "gmm":
        modes = gmm_modes(x, ipc, seed=seed, iters=gmm_iters)
        if mode_point == "medoid":
            modes = _closest_latents(x, modes)
    elif method == "random":
        modes = random_modes(x, ipc, seed=seed)
    else:
        modes = agglomerative_modes(x, ipc, linkage=linkage, mode_point=mode_point)
    return modes.to(torch.float32)


# ----------------------------------------------------------------------------
# paper formulation: neighbourhoods and radius annealing (SPEC 2 end, 3)
# ----------------------------------------------------------------------------
def neighbourhood_order(z: Tensor, modes: Tensor) -> tuple[Tensor, Tensor]:
    """Class latents sorted by Euclidean distance to each mode.

    Args:
        z: (n, D) class latents; modes: (m, D).
    Returns:
        order (m, n) long (stable: equal distances keep the lower index first)
        and the sorted distances (m, n).
    """
    x = _as_latents(z)
    mo = _as_latents(modes, "modes").to(x.dtype)
    if mo.shape[1] != x.shape[1]:
        raise DataError(f"modes must be (m, D) with D == z.shape[1], got {tuple(mo.shape)} and {x.shape[1]}")
    # Direct differences, not the matmul expansion: exact zeros and exact ties
    # matter for the order, and m x n x D is small next to one DiT step.
    dist = torch.cdist(mo, x, compute_mode="donot_use_mm_for_euclid_dist")  # (m, n)
    sorted_dist, order = torch.sort(dist, dim=1, stable=True)
    return order, sorted_dist


def _quantile(sorted_values: Tensor, q: float) -> float:
    """Linear-interpolation quantile of an ascending 1-D tensor (numpy's default).

    Hand-rolled because torch.quantile refuses inputs above 2^24 elements.
    """
    pos = q * (sorted_values.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, sorted_values.numel() - 1)
    a, b = float(sorted_values[lo]), float(sorted_values[hi])
    return a + (b - a) * (pos - lo)


def class_radii(sorted_dists: Tensor, r_min: float, r_max: float, units: str = "quantile") -> tuple[float, float]:
    """Absolute (r_min, r_max) of a class.

    Args:
        sorted_dists: (m, n) distances from ``neighbourhood_order``.
        r_min, r_max: quantiles in [0, 1] of all mode-to-member distances of
            the class (units="quantile"; SPEC defaults 0.2 and 0.9) or
            absolute distances (units="absolute").
    """
    _choice(units, "--radius-units", RADIUS_UNITS)
    for name, v in (("--r-min", r_min), ("--r-max", r_max)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if units == "quantile" and v > 1:
            raise ConfigError(f"{name} is a quantile and must lie in [0, 1], got {v!r}")
    if r_min > r_max:
        raise ConfigError(f"--r-min ({r_min}) must not exceed --r-max ({r_max})")
    if units == "absolute":
        return float(r_min), float(r_max)
    if not isinstance(sorted_dists, Tensor) or sorted_dists.numel() == 0:
        raise DataError("class_radii: no mode-to-member distances")
    flat = torch.sort(sorted_dists.reshape(-1).double())[0]
    return _quantile(flat, r_min), _quantile(flat, r_max)


def anneal_radius(tau: float, r_min: float, r_max: float, schedule: str = "exponential", a: float = 5.0) -> float:
    """r = r_min + (r_max - r_min) * s(tau); tau = t / T goes 1 -> 0 along denoising.

    s: exponential (exp(a tau) - 1) / (exp(a) - 1) (a = 0 is its linear limit),
    cosine 1 - cos(pi tau / 2), linear tau, constant 1.
    """
    _choice(schedule, "--radius-schedule", RADIUS_SCHEDULES)
    if not isinstance(tau, (int, float)) or not -1e-9 <= tau <= 1 + 1e-9:
        raise ConfigError(f"tau must lie in [0, 1], got {tau!r}")
    tau = min(max(float(tau), 0.0), 1.0)
    if schedule == "exponential":
        if not math.isfinite(a):
            raise ConfigError(f"--radius-a must be finite, got {a!r}")
        s = tau if a == 0 else math.expm1(a * tau) / math.expm1(a)
    elif schedule == "cosine":
        s = 1.0 - math.cos(math.pi * tau / 2.0)
    elif schedule == "linear":
        s = tau
    else:
        s = 1.0
    return r_min + (r_max - r_min) * s


def patch_lengths(sorted_dists: Tensor, radius: float | Tensor, k_min: int, n: int | Tensor | None = None) -> Tensor:
    """Neighbourhood prefix lengths: points within ``radius`` (inclusive),
    never fewer than ``min(k_min, n)``.

    Args:
        sorted_dists: (m, n) ascending distances per mode (or padded with +inf beyond the class's n).
        radius: a float, or a 0-dim float64 tensor (the same comparison: both are rounded to
            sorted_dists' dtype), as the fast loop's CUDA graphs keep a class's radius on the device;
            or (m,) per row (rows of several classes in one batch), rounded the same way.
        n: the class size when sorted_dists is padded, an int or a 0-dim integer tensor, or (m,)
            per row (default: sorted_dists' width).
    Returns:
        (m,) long on sorted_dists' device.
    """
    _int(k_min, "--k-min", 1)
    if not isinstance(sorted_dists, Tensor) or sorted_dists.dim() != 2:
        raise DataError(f"sorted_dists must be (m, n), got {getattr(sorted_dists, 'shape', type(sorted_dists))}")
    if isinstance(radius, Tensor) and radius.dim() == 1:  # per row: compared in sorted_dists' dtype, as a scalar is
        radius = radius.to(sorted_dists.dtype).unsqueeze(1)
    counts = (sorted_dists <= radius).sum(1)
    if isinstance(n, Tensor):
        return torch.maximum(counts, n.clamp_max(k_min)).long()
    return counts.clamp_min(min(k_min, sorted_dists.shape[1] if n is None else n)).long()
