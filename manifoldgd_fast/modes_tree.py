"""Hierarchical mode discovery: the divisive (bisecting) trees and agglomerative clustering.

- ``divisive_official`` -- the released ManifoldGD rule (``bisecting_tree`` +
  level sweep; medoids);
- ``divisive_paper``    -- the paper's levelwise full bisecting tree;
- ``agglomerative`` / ``agglomerative_modes`` -- bottom-up (Lance-Williams) baseline.

Called through ``modes.discover_modes`` and re-exported by ``modes``; the
2-means splits are ``_modes_common.kmeans``. Same conventions as ``modes``:
(n, D) latents in, modes on ``z``'s device, every draw from a seeded CPU
generator.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._modes_common import (KMEANS_ITERS, KMEANS_TOL, LINKAGES, MODE_POINTS, _as_latents, _choice, _generator, _int,
                            _seed, _set_modes, _sq_dists, _tol, kmeans)
from .errors import DataError


# ----------------------------------------------------------------------------
# divisive, official formulation (released sample_new.py)
# ----------------------------------------------------------------------------
def _bisect(x: Tensor, idx: Tensor, gen: torch.Generator, n_init: int, iters: int,
            tol: float = KMEANS_TOL) -> tuple[Tensor, Tensor]:
    """Split the index set ``idx`` (>= 2 points) by 2-means into (left, right)."""
    sub_seed = int(torch.randint(1 << 31, (1,), generator=gen))
    _, labels = kmeans(x[idx], 2, seed=sub_seed, n_init=n_init, iters=iters, tol=tol)
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


def bisecting_tree(z: Tensor, n_leaves: int, *, seed: int, n_init: int = 10, iters: int = KMEANS_ITERS,
                   tol: float = KMEANS_TOL) -> tuple[list[Tensor], list[int]]:
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
    _int(n_init, "n_init", 1)  # the split parameters are checked here, not at the first split: ipc 1 has none
    _int(iters, "iters", 1)
    _tol(tol)
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
        for child in _bisect(x, idx, gen, n_init, iters, tol):  # left, then right
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
                      n_init: int = 10, iters: int = KMEANS_ITERS, tol: float = KMEANS_TOL) -> Tensor:
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
    leaves, depths = bisecting_tree(x, ipc, seed=seed, n_init=n_init, iters=iters, tol=tol)
    if len(leaves) < ipc:
        raise DataError(f"the bisecting tree yields only {len(leaves)} leaves, fewer than ipc={ipc} "
                        f"(class has {x.shape[0]} latents)")
    # A fresh generator with the same seed, as the released code builds a
    # second RandomState(random_state) for the sweep.
    order = _level_sweep(depths, ipc, level, _generator(seed))
    return _set_modes(x, [leaves[p] for p in order], mode_point)


# ----------------------------------------------------------------------------
# divisive, paper formulation (levelwise)
# ----------------------------------------------------------------------------
def _paper_tree(x: Tensor, max_depth: int, min_leaf: int, gen: torch.Generator, n_init: int,
                iters: int, tol: float = KMEANS_TOL) -> tuple[list[Tensor], list[int], list[bool]]:
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
            for child in _bisect(x, nodes[nid], gen, n_init, iters, tol):
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
                   iters: int = KMEANS_ITERS, tol: float = KMEANS_TOL) -> Tensor:
    """The paper's levelwise divisive modes (SPEC 2, paper formulation).

    Tree: the root (level 0) holds every latent; each node with at least
    ``max(2, min_leaf)`` points is split by 2-means, level by level, down to
    ``max_depth`` (default ``max(start_level, ceil(log2(max(ipc, 2)))) + 1``, one level deeper at a
    time while lopsided splits leave fewer nodes than ipc).
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
    auto_depth = max_depth is None
    if auto_depth:
        max_depth = max(start_level, math.ceil(math.log2(max(ipc, 2)))) + 1
    _int(max_depth, "max_depth", 0)
    _int(min_leaf, "min_leaf", 1)
    _int(n_init, "n_init", 1)  # checked here, not at the first split: a tree of one node has none
    _int(iters, "iters", 1)
    _tol(tol)
    _choice(mode_point, "mode_point", MODE_POINTS)

    def select(nodes, levels, is_leaf):
        picked: list[int] = []
        for level in range(start_level, -1, -1):
            cands = [i for i, lv in enumerate(levels) if lv == level]
            if cands:  # max over (size, -id): most populous, lower id on ties
                picked.append(max(cands, key=lambda i: (nodes[i].numel(), -i)))
        picked = picked[:ipc]
        taken = set(picked)
        return picked, [i for i in range(len(nodes)) if is_leaf[i] and i not in taken]

    while True:
        gen = _generator(_seed(seed))
        nodes, levels, is_leaf = _paper_tree(x, max_depth, min_leaf, gen, n_init, iters, tol)
        picked, pool = select(nodes, levels, is_leaf)
        # the default depth may leave lopsided splits too few leaves for an ipc near the class size: then
        # grow one level deeper (the same splits, the same generator: a deeper tree extends the shallower)
        can_grow = any(is_leaf[i] and levels[i] == max_depth and nodes[i].numel() >= max(2, min_leaf)
                       for i in range(len(nodes)))
        if not (auto_depth and len(picked) + len(pool) < ipc and can_grow):
            break
        max_depth += 1
    if len(picked) < ipc:
        need = ipc - len(picked)
        if len(pool) < need:
            raise DataError(f"the divisive tree yields only {len(picked) + len(pool)} nodes, "
                            f"fewer than ipc={ipc} (class has {x.shape[0]} latents)")
        order = torch.randperm(len(pool), generator=gen)[:need].tolist()
        picked.extend(pool[i] for i in order)
    return _set_modes(x, [nodes[i] for i in picked], mode_point)


# ----------------------------------------------------------------------------
# agglomerative (bottom-up baseline)
# ----------------------------------------------------------------------------
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
