"""Shared pieces of mode discovery (``modes``, ``modes_tree``): input checks, the
seeded CPU generator, squared distances, medoids, and k-means, which the
``kmeans`` method returns, ``gmm_modes`` starts from and the bisecting trees
split with. Randomness and dtypes follow the ``modes`` docstring.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigError, DataError

MODE_POINTS = ("mean", "medoid")
# sklearn.cluster.KMeans's defaults (max_iter=300, tol=1e-4), which the releases call
KMEANS_ITERS = 300
KMEANS_TOL = 1e-4
LINKAGES = ("ward", "average", "complete", "single")


# ----------------------------------------------------------------------------
# checks and small helpers
# ----------------------------------------------------------------------------
def _as_latents(z, name: str = "z") -> Tensor:
    """(n, ...) tensor -> (n, D) float tensor in the working dtype."""
    if not isinstance(z, Tensor):
        raise DataError(f"{name} must be a torch.Tensor of latents, got {type(z).__name__}")
    if z.dim() < 2:
        raise DataError(f"{name} must be (n, D) or (n, C, H, W) latents, got shape {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise DataError(f"{name}: the class has no latents")
    x = z.reshape(z.shape[0], -1)
    if x.shape[1] == 0:
        raise DataError(f"{name}: latents have zero features, shape {tuple(z.shape)}")
    # float64 stays float64 (exact ties in tests); everything else runs in float32.
    x = x if x.dtype == torch.float64 else x.float()
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name}: latents contain NaN or inf")
    return x.contiguous()


def _int(v, name: str, minimum: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _tol(v, name: str = "tol") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
    return v


def _seed(seed) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return seed


def _choice(v, name: str, allowed) -> str:
    if v not in allowed:
        raise ConfigError(f"{name}: unknown value {v!r}; choose one of {', '.join(allowed)}")
    return v


def _generator(seed: int) -> torch.Generator:
    # manual_seed takes [-2^63, 2^64); fold anything else into range.
    return torch.Generator(device="cpu").manual_seed(seed % (1 << 64))


def _sq_dists(a: Tensor, b: Tensor, a_sq: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances (m, D) x (k, D) -> (m, k), clamped at 0.

    The expansion ||a||^2 - 2 a.b + ||b||^2 is one matmul, which is what makes
    k-means on 4096-dim latents cheap; the clamp removes the rounding below 0.
    """
    if a_sq is None:
        a_sq = (a * a).sum(1)
    d2 = a_sq[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d2.clamp_min_(0.0)


def _medoid(x: Tensor, idx: Tensor | None, centre: Tensor) -> Tensor:
    """The row of ``x[idx]`` (``idx`` None: of all of ``x``) closest to ``centre`` (D,); ties to the first."""
    rows = x if idx is None else x[idx]
    d2 = ((rows - centre) ** 2).sum(1)  # (len(rows),) exact differences
    return rows[int(torch.argmin(d2))]


def _closest_latents(x: Tensor, points: Tensor) -> Tensor:
    """For each of ``points`` (k, D), the row of ``x`` (n, D) closest to it: (k, D).

    Searched over all of ``x`` (MGD3's "closest sample to the k-means
    centroid"), with exact differences (ties to the first row), so two points
    may pick the same row.
    """
    return torch.stack([_medoid(x, None, p) for p in points])


def _set_modes(x: Tensor, index_sets: list[Tensor], mode_point: str) -> Tensor:
    """Mean or medoid of each index set, stacked: (len(index_sets), D)."""
    out = []
    for idx in index_sets:
        mu = x[idx].mean(0)
        out.append(mu if mode_point == "mean" else _medoid(x, idx, mu))
    return torch.stack(out)


# ----------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------
def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; sklearn's default): (k, D).

    Each new centre is the best of ``2 + floor(ln k)`` candidates sampled
    prop. to D^2 (the one that lowers the total D^2 most); a single candidate
    per centre too often puts two centres in one blob.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k)) if k > 1 else 1
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    closest = _sq_dists(x, x[first][None], x_sq)[:, 0]  # (n,)
    for _ in range(1, k):
        w = closest.double().cpu()
        total = float(w.sum())
        if total > 0.0:
            cand = torch.multinomial(w / total, trials, replacement=True, generator=gen)
        else:  # every point sits on a chosen centre (duplicates): any point will do
            cand = torch.randint(n, (trials,), generator=gen)
        cand = cand.to(x.device)
        d_cand = torch.minimum(closest[None, :], _sq_dists(x[cand], x, x_sq[cand]))  # (trials, n)
        best = int(torch.argmin(d_cand.sum(1)))                                    # first on ties
        centres.append(x[cand[best]])
        closest = d_cand[best]
    return torch.stack(centres)


def _lloyd(x: Tensor, x_sq: Tensor, centres: Tensor, iters: int, tol: float) -> tuple[Tensor, Tensor, float]:
    """Lloyd iterations from ``centres`` (k, D); returns centres, labels (n,), inertia."""
    k = centres.shape[0]
    for _ in range(iters):
        d2 = _sq_dists(x, centres, x_sq)                     # (n, k)
        mind, labels = d2.min(1)
        counts = torch.bincount(labels, minlength=k)          # (k,)
        # cluster sums as one (k, n) @ (n, D) matmul: fast on CPU (index_add_ is a serial
        # scatter there) and deterministic on CUDA (index_add_ uses atomics)
        new = torch.nn.functional.one_hot(labels, k).to(x.dtype).T @ x
        empty = (counts == 0).nonzero()[:, 0].tolist()
        if empty:
            # sklearn's relocation: each empty cluster takes one of the points farthest from
            # their centre (the worst explained), which leaves its old cluster; never the last
            # point of a cluster (with duplicate latents all distances can be 0, and a point
            # taken from a cluster of one left that cluster empty: its centre became 0)
            far = torch.argsort(mind, descending=True, stable=True).tolist()
            pos = 0
            for j in empty:
                while int(counts[labels[far[pos]]]) < 2:   # n >= k: enough clusters of two or more
                    pos += 1
                f = far[pos]
                pos += 1
                donor = int(labels[f])
                new[donor] -= x[f]
                new[j] = x[f]
                counts[donor] -= 1
                counts[j] = 1
                labels[f] = j
        new /= counts.clamp_min(1).to(x.dtype)[:, None]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if shift <= tol:
            break
    d2 = _sq_dists(x, centres, x_sq)
    mind, labels = d2.min(1)
    return centres, labels, float(mind.sum())


def kmeans(z: Tensor, k: int, *, seed: int, iters: int = KMEANS_ITERS, tol: float = KMEANS_TOL,
           n_init: int = 1) -> tuple[Tensor, Tensor]:
    """k-means (Lloyd, k-means++ seeding), best of ``n_init`` runs by inertia.

    The algorithm of ``sklearn.cluster.KMeans`` (greedy k-means++ with ``2 + ln k`` candidates,
    Lloyd, empty clusters re-seeded by the farthest points, the relative ``tol`` rule, a final
    relabelling) with its defaults, as the releases call it: MGD³ ``KMeans(IPC, n_init="auto")``
    (one run), ManifoldGD's bisections ``KMeans(2, n_init=10)``. Its draws come from a torch
    generator, not NumPy's, so the clusters are sklearn's in law, not bit for bit.

    Args:
        z: (n, D) latents.
        k: number of clusters, 1 <= k <= n.
        seed: seeds the CPU generator of all ``n_init`` seedings.
        iters: maximum Lloyd iterations per run.
        tol: stop when the squared centre shift falls below
            ``tol * mean per-feature variance`` (sklearn's relative rule).
        n_init: independent runs; the lowest inertia wins (first on ties).
    Returns:
        centres (k, D) and labels (n,) long, on ``z``'s device.
    """
    x = _as_latents(z)
    n = x.shape[0]
    _int(k, "k", 1)
    if k > n:
        raise DataError(f"k-means: k={k} clusters but only {n} latents")
    _int(iters, "iters", 1)
    _int(n_init, "n_init", 1)
    _tol(tol)
    gen = _generator(_seed(seed))
    x_sq = (x * x).sum(1)
    tol_abs = tol * float(x.var(0, unbiased=False).mean()) if n > 1 else 0.0
    best = None
    for _ in range(n_init):
        centres = _kmeans_pp(x, x_sq, k, gen)
        run = _lloyd(x, x_sq, centres, iters, tol_abs)
        if best is None or run[2] < best[2]:
            best = run
    return best[0], best[1]
