"""Mode discovery: the IPC centroids of one class's latents (SPEC 2, 3).

Every function takes the class's latents ``z`` as an (n, D) float tensor
(flattened VAE latents; ``discover_modes`` also flattens (n, C, H, W)) and
returns modes on ``z``'s device. The methods:

- ``kmeans``               -- Lloyd with k-means++ seeding (MGD3's modes);
- ``divisive_official``    -- the released ManifoldGD rule: bisect the
                              largest-SSE leaf until IPC leaves, then order
                              the leaves by a level sweep; modes are medoids;
- ``divisive_paper``       -- the paper's levelwise rule: a full bisecting
                              tree, one node per level from the start level
                              up to the root, then random leaves;
- ``gmm_modes``, ``random_modes``, ``agglomerative_modes`` -- baselines.

Paper formulation neighbourhoods and radius annealing live here too:
``neighbourhood_order``, ``class_radii``, ``anneal_radius``,
``patch_lengths``.

Randomness: every random draw comes from a CPU ``torch.Generator`` seeded by
an explicit integer ``seed`` (indices are drawn on the CPU, then moved), so a
seed gives the same draws on any device. Arithmetic runs in float32 (float64
if ``z`` is float64, which tests use to make ties exact).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigError, DataError

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
MODE_POINTS = ("mean", "medoid")
LINKAGES = ("ward", "average", "complete", "single")
RADIUS_SCHEDULES = ("exponential", "cosine", "linear", "constant")
RADIUS_UNITS = ("quantile", "absolute")

_GMM_TOL = 1e-3      # change of the mean log-likelihood per sample (sklearn's default)
_VAR_FLOOR = 1e-6    # diagonal variance floor of the GMM


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


def _medoid(x: Tensor, idx: Tensor, centre: Tensor) -> Tensor:
    """The row of ``x[idx]`` closest to ``centre`` (D,); ties to the first."""
    d2 = ((x[idx] - centre) ** 2).sum(1)  # (len(idx),) exact differences: few rows
    return x[idx[int(torch.argmin(d2))]]


def _centre_medoids(x: Tensor, centres: Tensor, labels: Tensor) -> Tensor:
    """For each centre (k, D), its cluster member closest to it: (k, D).

    A cluster left empty (only with duplicate latents, where centres
    coincide) takes the closest latent overall instead.
    """
    out = []
    for c in range(centres.shape[0]):
        members = torch.nonzero(labels == c)[:, 0]
        if members.numel() == 0:
            members = torch.arange(x.shape[0], device=x.device)
        out.append(_medoid(x, members, centres[c]))
    return torch.stack(out)


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
        new /= counts.clamp_min(1).to(x.dtype)[:, None]
        empty = counts == 0
        n_empty = int(empty.sum())
        if n_empty:
            # Re-seed empty clusters with the points farthest from their centre
            # (sklearn's rule): they are the worst-explained points.
            far = torch.argsort(mind, descending=True, stable=True)[:n_empty]
            new[empty] = x[far]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if shift <= tol:
            break
    d2 = _sq_dists(x, centres, x_sq)
    mind, labels = d2.min(1)
    return centres, labels, float(mind.sum())


def kmeans(z: Tensor, k: int, *, seed: int, iters: int = 100, tol: float = 1e-6,
           n_init: int = 1) -> tuple[Tensor, Tensor]:
    """k-means (Lloyd, k-means++ seeding), best of ``n_init`` runs by inertia.

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
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"tol must be a number >= 0, got {tol!r}")
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


# ----------------------------------------------------------------------------
# divisive, official formulation (released sample_new.py)
# ----------------------------------------------------------------------------
def _bisect(x: Tensor, idx: Tensor, gen: torch.Generator, n_init: int, iters: int) -> tuple[Tensor, Tensor]:
    """Split the index set ``idx`` (>= 2 points) by 2-means into (left, right)."""
    sub_seed = int(torch.randint(1 << 31, (1,), generator=gen))
    _, labels = kmeans(x[idx], 2, seed=sub_seed, n_init=n_init, iters=iters)
    left, right = idx[labels == 0], idx[labels == 1]
    if left.numel() == 0 or right.numel() == 0:
        # 2-means could not separate (duplicate points): random balanced halves.
        perm = torch.randperm(idx.numel(), generator=gen).to(idx.device)
        shuffled = idx[perm]
        mid = idx.numel() // 2
        left, right = shuffled[:mid], shuffled[mid:]
    return left, right


def _sse(x: Tensor, idx: Tensor) -> float:
    if idx.numel() <= 1:
        return 0.0
    pts = x[idx]
    return float(((pts - pts.mean(0)) ** 2).sum())


def bisecting_tree(z: Tensor, n_leaves: int, *, seed: int, n_init: int = 10,
                   iters: int = 100) -> tuple[list[Tensor], list[int]]:
    """Grow the released bisecting tree until it has ``n_leaves`` leaves.

    Repeatedly pops the leaf with the largest SSE (first one on ties), splits
    it by 2-means (``n_init`` restarts, seeds drawn from a generator seeded by
    ``seed``) and appends the children at the end. A leaf of one point cannot
    be split: it goes back to the end, and growth stops if every leaf has one
    point.

    Args:
        z: (n, D) latents.
        n_leaves: target number of leaves (>= 1).
    Returns:
        leaves: list of (n_j,) long index sets into ``z``, in tree order
            (disjoint, covering all rows);
        depths: their depths (root = 0).
        May hold fewer than ``n_leaves`` leaves when n < n_leaves.
    """
    x = _as_latents(z)
    _int(n_leaves, "n_leaves", 1)
    _int(n_init, "n_init", 1)
    gen = _generator(_seed(seed))
    leaves = [torch.arange(x.shape[0], device=x.device)]
    depths = [0]
    sses = [_sse(x, leaves[0])]
    while len(leaves) < n_leaves:
        j = max(range(len(sses)), key=lambda i: (sses[i], -i))  # first max
        idx, depth, sse = leaves.pop(j), depths.pop(j), sses.pop(j)
        if idx.numel() <= 1:
            leaves.append(idx)
            depths.append(depth)
            sses.append(sse)
            if all(leaf.numel() <= 1 for leaf in leaves):
                break
            continue
        for child in _bisect(x, idx, gen, n_init, iters):  # left, then right
            leaves.append(child)
            depths.append(depth + 1)
            sses.append(_sse(x, child))
    return leaves, depths


def _level_sweep(depths: list[int], count: int, level: int, gen: torch.Generator) -> list[int]:
    """Positions of ``count`` leaves in level-sweep order (released rule).

    From depth ``level - 1`` (level 1 = root) down to the deepest, take one
    random unused leaf per depth; fill the rest from the deepest depth up.
    """
    by_depth: dict[int, list[int]] = {}
    for pos, d in enumerate(depths):
        by_depth.setdefault(d, []).append(pos)
    max_depth = max(depths)
    picked: list[int] = []
    used: set[int] = set()
    for d in range(min(max(0, level - 1), max_depth), max_depth + 1):
        pool = [p for p in by_depth.get(d, []) if p not in used]
        if not pool:
            continue
        p = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        picked.append(p)
        used.add(p)
        if len(picked) == count:
            return picked
    for d in range(max_depth, -1, -1):
        if len(picked) == count:
            break
        pool = [p for p in by_depth.get(d, []) if p not in used]
        order = torch.randperm(len(pool), generator=gen).tolist()
        take = [pool[i] for i in order[: count - len(picked)]]
        picked.extend(take)
        used.update(take)
    return picked


def divisive_official(z: Tensor, ipc: int, *, level: int, seed: int, mode_point: str = "medoid",
                      n_init: int = 10, iters: int = 100) -> Tensor:
    """The released ManifoldGD modes: bisecting tree + level sweep (SPEC 2).

    Args:
        z: (n, D) latents of one class.
        ipc: number of modes (= leaves of the tree).
        level: 1-based start level of the sweep (1 = root; released: 6 for
            ImageNette/ImageWoof, 1 for ImageNet-100/1k); 0 acts as 1.
        seed: seeds the tree's 2-means and, separately, the sweep.
        mode_point: "medoid" (the member latent closest to the leaf mean, the
            released default) or "mean".
        n_init: 2-means restarts per split.
    Returns:
        (ipc, D) modes in sweep order. With ipc leaves every leaf is used
        once; the sweep only orders them.
    """
    x = _as_latents(z)
    _int(ipc, "ipc", 1)
    _int(level, "level", 0)
    _choice(mode_point, "mode_point", MODE_POINTS)
    leaves, depths = bisecting_tree(x, ipc, seed=seed, n_init=n_init, iters=iters)
    if len(leaves) < ipc:
        raise DataError(f"only {len(leaves)} distinct latents, fewer than ipc={ipc}")
    # A fresh generator with the same seed, as the released code builds a
    # second RandomState(random_state) for the sweep.
    order = _level_sweep(depths, ipc, level, _generator(seed))
    return _set_modes(x, [leaves[p] for p in order], mode_point)


# ----------------------------------------------------------------------------
# divisive, paper formulation (levelwise)
# ----------------------------------------------------------------------------
def _paper_tree(x: Tensor, max_depth: int, min_leaf: int, gen: torch.Generator, n_init: int,
                iters: int) -> tuple[list[Tensor], list[int], list[bool]]:
    """Full bisecting tree grown level by level; nodes in breadth-first id order.

    Returns per node: index set, level, and whether it is a leaf.
    """
    nodes = [torch.arange(x.shape[0], device=x.device)]
    levels = [0]
    has_children = [False]
    frontier = [0]
    threshold = max(2, min_leaf)
    for level in range(max_depth):
        nxt = []
        for nid in frontier:
            if nodes[nid].numel() < threshold:
                continue
            for child in _bisect(x, nodes[nid], gen, n_init, iters):
                nxt.append(len(nodes))
                nodes.append(child)
                levels.append(level + 1)
                has_children.append(False)
            has_children[nid] = True
        if not nxt:
            break
        frontier = nxt
    return nodes, levels, [not c for c in has_children]


def divisive_paper(z: Tensor, ipc: int, *, start_level: int, seed: int, max_depth: int | None = None,
                   min_leaf: int = 2, mode_point: str = "mean", n_init: int = 10,
                   iters: int = 100) -> Tensor:
    """The paper's levelwise divisive modes (SPEC 2, paper formulation).

    Tree: the root (level 0) holds every latent; each node with at least
    ``max(2, min_leaf)`` points is split by 2-means, level by level, down to
    ``max_depth`` (default ``max(start_level, ceil(log2(max(ipc, 2)))) + 1``).
    Selection: for levels ``start_level, ..., 0`` take the most populous
    node of that level (ties: lower node id; missing levels are skipped),
    then fill up with leaves not yet taken, drawn uniformly without
    replacement.

    Args:
        z: (n, D) latents of one class.
        ipc: number of modes.
        start_level: L (SPEC default 3 for <= 10 classes, 2 otherwise).
        seed: seeds the 2-means splits and the leaf draw.
        mode_point: "mean" (the paper's centroid) or "medoid".
    Returns:
        (ipc, D) modes: the level picks (deepest first), then the leaves.
    """
    x = _as_latents(z)
    _int(ipc, "ipc", 1)
    _int(start_level, "start_level", 0)
    if max_depth is None:
        max_depth = max(start_level, math.ceil(math.log2(max(ipc, 2)))) + 1
    _int(max_depth, "max_depth", 0)
    _int(min_leaf, "min_leaf", 1)
    _choice(mode_point, "mode_point", MODE_POINTS)
    gen = _generator(_seed(seed))
    nodes, levels, is_leaf = _paper_tree(x, max_depth, min_leaf, gen, n_init, iters)

    picked: list[int] = []
    for level in range(start_level, -1, -1):
        cands = [i for i, lv in enumerate(levels) if lv == level]
        if cands:  # max over (size, -id): most populous, lower id on ties
            picked.append(max(cands, key=lambda i: (nodes[i].numel(), -i)))
    picked = picked[:ipc]
    if len(picked) < ipc:
        taken = set(picked)
        pool = [i for i in range(len(nodes)) if is_leaf[i] and i not in taken]
        need = ipc - len(picked)
        if len(pool) < need:
            raise DataError(f"the divisive tree yields only {len(picked) + len(pool)} nodes, "
                            f"fewer than ipc={ipc} (class has {x.shape[0]} latents)")
        order = torch.randperm(len(pool), generator=gen)[:need].tolist()
        picked.extend(pool[i] for i in order)
    return _set_modes(x, [nodes[i] for i in picked], mode_point)


# ----------------------------------------------------------------------------
# baselines: GMM, random, agglomerative
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


def gmm_modes(z: Tensor, k: int, *, seed: int, iters: int = 100) -> Tensor:
    """Means of a diagonal-covariance Gaussian mixture fitted by EM.

    Initialised from ``kmeans(z, k, seed=seed)`` (hard responsibilities);
    variances floored at 1e-6; stops when the mean log-likelihood per sample
    changes by less than 1e-3 or after ``iters`` EM steps.

    Returns:
        (k, D) component means, heaviest component first (stable on ties).
    """
    x = _as_latents(z)
    _int(iters, "iters", 1)
    _, labels = kmeans(x, k, seed=seed)
    x2 = x * x
    resp = torch.nn.functional.one_hot(labels, k).to(x.dtype)              # (n, k)
    weights, means, var = _gmm_m_step(x, x2, resp, None)
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


def agglomerative(z: Tensor, k: int, *, linkage: str = "ward") -> Tensor:
    """Bottom-up clustering cut at k clusters; labels (n,) long.

    Lance-Williams updates on the full n x n matrix (O(n^2) memory, n merges
    of an O(n^2) argmin): ward works on squared Euclidean distances (the
    merge order of sklearn's / scipy's ward), average, complete and single on
    Euclidean ones. All four are monotone, so stopping after n - k merges is
    the same as cutting the full dendrogram at k clusters. Clusters are
    numbered by their smallest member index.
    """
    x = _as_latents(z)
    n = x.shape[0]
    _int(k, "k", 1)
    if k > n:
        raise DataError(f"agglomerative: k={k} clusters but only {n} latents")
    _choice(linkage, "linkage", LINKAGES)
    d = _sq_dists(x, x)
    if linkage != "ward":
        d = d.sqrt_()
    d.fill_diagonal_(math.inf)
    size = torch.ones(n, dtype=x.dtype, device=x.device)
    # The surviving id of a merge is the smaller one, so a cluster's id is
    # always its smallest member index.
    label = torch.arange(n, device=x.device)
    for _ in range(n - k):
        flat = int(torch.argmin(d))           # first minimum: deterministic ties
        i, j = divmod(flat, n)
        i, j = min(i, j), max(i, j)
        di, dj, dij = d[i], d[j], d[i, j]
        ni, nj = size[i], size[j]
        if linkage == "single":
            new = torch.minimum(di, dj)
        elif linkage == "complete":
            new = torch.maximum(di, dj)
        elif linkage == "average":
            new = (ni * di + nj * dj) / (ni + nj)
        else:  # ward on squared distances; inactive columns stay inf
            new = ((ni + size) * di + (nj + size) * dj - size * dij) / (ni + nj + size)
        new[i] = math.inf
        new[j] = math.inf
        d[i, :] = new
        d[:, i] = new
        d[j, :] = math.inf
        d[:, j] = math.inf
        size[i] = ni + nj
        label[label == j] = i
    return torch.unique(label, sorted=True, return_inverse=True)[1]


def agglomerative_modes(z: Tensor, k: int, *, linkage: str = "ward", mode_point: str = "mean") -> Tensor:
    """Means (or medoids) of the k agglomerative clusters, ordered by their
    smallest member index: (k, D)."""
    x = _as_latents(z)
    _choice(mode_point, "mode_point", MODE_POINTS)
    labels = agglomerative(x, k, linkage=linkage)
    return _set_modes(x, [torch.nonzero(labels == c)[:, 0] for c in range(k)], mode_point)


# ----------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------
def discover_modes(z: Tensor, ipc: int, *, method: str, formulation: str = "official", seed: int = 0,
                   level: int | None = None, mode_point: str = "auto", max_depth: int | None = None,
                   min_leaf: int = 2, linkage: str = "ward", kmeans_iters: int = 100,
                   bisect_inits: int = 10) -> Tensor:
    """The IPC centroids of one class (SPEC 2).

    Args:
        z: (n, ...) latents of one class; flattened to (n, D).
        ipc: number of modes, 1 <= ipc <= n.
        method: kmeans | divisive | gmm | random | agglomerative.
        formulation: official | paper (selects the divisive rule).
        level: divisive only and required: the official start level i, or the
            paper start level L (the caller resolves the 6/1 or 3/2 default).
        mode_point: auto (medoid for official divisive, mean otherwise) |
            mean | medoid (the member closest to the mean; for gmm the
            closest class latent).
    Returns:
        (ipc, D) float32 modes on ``z``'s device.
    """
    _choice(method, "--mode-method", MODE_METHODS)
    _choice(formulation, "--formulation", FORMULATIONS)
    _choice(mode_point, "--mode-point", ("auto",) + MODE_POINTS)
    _int(ipc, "--ipc", 1)
    _seed(seed)
    _int(kmeans_iters, "--kmeans-iters", 1)
    _int(bisect_inits, "--bisect-inits", 1)
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
        centres, labels = kmeans(x, ipc, seed=seed, iters=kmeans_iters)
        modes = centres if mode_point == "mean" else _centre_medoids(x, centres, labels)
    elif method == "divisive" and formulation == "official":
        modes = divisive_official(x, ipc, level=level, seed=seed, mode_point=mode_point,
                                  n_init=bisect_inits, iters=kmeans_iters)
    elif method == "divisive":
        modes = divisive_paper(x, ipc, start_level=level, seed=seed, max_depth=max_depth, min_leaf=min_leaf,
                               mode_point=mode_point, n_init=bisect_inits, iters=kmeans_iters)
    elif method == "gmm":
        modes = gmm_modes(x, ipc, seed=seed, iters=kmeans_iters)
        if mode_point == "medoid":
            modes = x[torch.argmin(_sq_dists(modes, x), 1)]
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


def patch_lengths(sorted_dists: Tensor, radius: float, k_min: int) -> Tensor:
    """Neighbourhood prefix lengths: points within ``radius`` (inclusive),
    never fewer than ``min(k_min, n)``.

    Args:
        sorted_dists: (m, n) ascending distances per mode.
    Returns:
        (m,) long on sorted_dists' device.
    """
    _int(k_min, "--k-min", 1)
    if not isinstance(sorted_dists, Tensor) or sorted_dists.dim() != 2:
        raise DataError(f"sorted_dists must be (m, n), got {getattr(sorted_dists, 'shape', type(sorted_dists))}")
    n = sorted_dists.shape[1]
    counts = (sorted_dists <= radius).sum(1)
    return counts.clamp_min(min(k_min, n)).long()
