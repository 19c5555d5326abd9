"""Mode discovery (SPEC 2) and the paper's neighbourhoods / radius annealing (SPEC 3)."""
import math

import numpy as np
import pytest
import torch

from manifoldgd_fast.errors import ConfigError, DataError
from manifoldgd_fast.modes import (
    agglomerative,
    agglomerative_modes,
    anneal_radius,
    bisecting_tree,
    class_radii,
    discover_modes,
    divisive_official,
    divisive_paper,
    gmm_modes,
    kmeans,
    neighbourhood_order,
    patch_lengths,
    random_modes,
)


def blobs(centres, sizes, std=0.3, dim=6, seed=0, dtype=torch.float64):
    """Gaussian blobs around ``centres`` (given in the first coordinates).

    Returns z (n, dim), the true blob label of each row (n,), and the centres (c, dim).
    """
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(len(centres), dim, dtype=torch.float64)
    for i, ctr in enumerate(centres):
        c[i, : len(ctr)] = torch.tensor(ctr, dtype=torch.float64)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    z = c[labels] + std * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return z.to(dtype), labels, c.to(dtype)


def partition(index_sets):
    return {frozenset(int(i) for i in idx) for idx in index_sets}


def label_partition(labels):
    labels = torch.as_tensor(np.asarray(labels))
    return partition(torch.nonzero(labels == c)[:, 0] for c in torch.unique(labels))


def canonical(labels):
    """Relabel clusters in order of first appearance (= by smallest member index)."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    rank = {lab: r for r, lab in enumerate(labels[np.sort(first)])}
    return np.array([rank[v] for v in labels])


def row_index(z, rows):
    """Index of each row of ``rows`` in ``z`` (exact match), -1 if absent."""
    out = []
    for r in rows:
        hit = torch.nonzero((z == r).all(1))[:, 0]
        out.append(int(hit[0]) if hit.numel() else -1)
    return out


# Four blobs in two far-apart pairs: the split order of a bisecting tree is
# unambiguous (root -> pairs; the wider pair {0, 1} has the larger SSE, though
# fewer points, so splitting the biggest leaf instead would differ).
PAIRS = dict(centres=[(0, 0), (0, 12), (40, 0), (40, 7)], sizes=[20, 25, 40, 35])


# ----------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_recovers_blob_centres(dtype):
    z, truth, centres = blobs([(0, 0), (10, 0), (0, 10), (10, 10), (-10, 5)], [30, 45, 25, 40, 20],
                              dim=8, dtype=dtype)
    found, labels = kmeans(z, 5, seed=3, n_init=4)
    assert found.shape == (5, 8) and labels.shape == (160,) and labels.dtype == torch.long
    assert label_partition(labels) == label_partition(truth)
    for c in range(5):  # each centre is its blob's mean (Lloyd fixed point) ...
        assert torch.allclose(found[labels[truth == c][0]], z[truth == c].mean(0), atol=1e-4)
    # ... and close to the generating centre
    err = torch.cdist(centres.double(), found.double()).min(1).values
    assert err.max() < 0.25


def test_kmeans_pp_seeds_one_centre_per_blob():
    # Far blobs: D^2 sampling puts one seed in each blob, so a single run
    # always finds them (uniform seeding would often put two in one blob).
    z, truth, _ = blobs([(0, 0), (1000, 0), (0, 1000), (1000, 1000), (500, 2000), (2000, 0)], [10] * 6,
                        std=0.01, dim=3)
    for seed in range(10):
        assert label_partition(kmeans(z, 6, seed=seed)[1]) == label_partition(truth)


def test_kmeans_seed_deterministic():
    z = torch.randn(150, 5, generator=torch.Generator().manual_seed(1))
    a = kmeans(z, 6, seed=11)
    b = kmeans(z, 6, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = kmeans(z, 6, seed=12)
    assert not torch.equal(a[0], c[0])  # other k-means++ draws, other local optimum or order


def test_kmeans_n_init_keeps_lowest_inertia():
    z = torch.randn(200, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def inertia(res):
        cen, lab = res
        return float(((z - cen[lab]) ** 2).sum())

    singles = [inertia(kmeans(z, 7, seed=s)) for s in range(5)]
    assert len(set(singles)) > 1  # restarts do land in different optima here
    best = inertia(kmeans(z, 7, seed=0, n_init=5))
    # the first of the 5 seedings is the single run's seeding
    assert best <= singles[0] + 1e-9


@pytest.mark.parametrize("tol", [0.05, 0.5])
def test_kmeans_tol_is_relative_to_the_data_variance(tol):
    """sklearn's rule: stop when the centre shift falls below tol x the mean feature variance, so
    k-means is scale-equivariant at any tol (scaling by a power of two is exact in floating point);
    an absolute tol would stop the 2^-10-scaled run early and let the 2^10 one run on."""
    z = torch.randn(300, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cen, lab = kmeans(z, 8, seed=4, tol=tol)
    assert not torch.equal(lab, kmeans(z, 8, seed=4, tol=0.0)[1])  # the tol does stop this run early
    for c in (2.0 ** 10, 2.0 ** -10):
        cen_c, lab_c = kmeans(z * c, 8, seed=4, tol=tol)
        assert torch.equal(cen_c, cen * c) and torch.equal(lab_c, lab)


@pytest.mark.parametrize("iters", [1, 20])
def test_lloyd_reseeds_empty_cluster_with_farthest_point_as_sklearn(iters):
    from sklearn.cluster import KMeans

    from manifoldgd_fast._modes_common import _lloyd

    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    # centre 1 (100) wins no point; 10 is the worst-explained point (8.5 from 1.5): it moves to
    # centre 1 and leaves centre 2, which keeps 1 and 2 (mean 1.5, not 13/3)
    init = torch.tensor([[0.0], [100.0], [1.5]], dtype=torch.float64)
    cen, lab, inertia = _lloyd(x, (x * x).sum(1), init, iters, 0.0)
    assert cen[:, 0].tolist() == pytest.approx([0.0, 10.0, 1.5]) and lab.tolist() == [0, 2, 2, 1]
    assert inertia == pytest.approx(0.5)
    ref = KMeans(3, init=init.numpy(), n_init=1, max_iter=iters, tol=0.0).fit(x.numpy())
    np.testing.assert_array_equal(cen.numpy(), ref.cluster_centers_)
    np.testing.assert_array_equal(lab.numpy(), ref.labels_)


def test_kmeans_duplicates_and_empty_clusters():
    # Two distinct points, each repeated: k = 2 must find both, without NaN.
    z = torch.cat([torch.zeros(10, 3), torch.ones(7, 3)])
    cen, lab = kmeans(z, 2, seed=0)
    assert torch.isfinite(cen).all()
    assert sorted(cen[:, 0].tolist()) == [0.0, 1.0]
    assert label_partition(lab) == {frozenset(range(10)), frozenset(range(10, 17))}
    # All points identical: clusters cannot be separated but nothing breaks.
    cen, lab = kmeans(torch.full((5, 2), 3.0), 3, seed=0)
    assert torch.equal(cen, torch.full((3, 2), 3.0)) and lab.min() >= 0 and lab.max() < 3


# ----------------------------------------------------------------------------
# divisive, official
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("ipc", [2, 3, 4])
def test_bisecting_tree_matches_sklearn(ipc):
    from sklearn.cluster import BisectingKMeans

    z, _, _ = blobs(**PAIRS)
    leaves, depths = bisecting_tree(z, ipc, seed=0)
    ref = BisectingKMeans(n_clusters=ipc, bisecting_strategy="biggest_inertia", random_state=0).fit(z.numpy())
    assert partition(leaves) == label_partition(ref.labels_)
    # depths: root split gives two depth-1 leaves; later splits go one deeper
    assert depths == {2: [1, 1], 3: [1, 2, 2], 4: [2, 2, 2, 2]}[ipc]

    modes = divisive_official(z, ipc, level=1, seed=0, mode_point="mean")
    ours = np.array(sorted(modes.numpy().tolist()))
    theirs = np.array(sorted(ref.cluster_centers_.tolist()))
    np.testing.assert_allclose(ours, theirs, atol=1e-8)


def test_official_medoids_are_member_latents():
    z, _, _ = blobs(**PAIRS, dtype=torch.float32)
    leaves, _ = bisecting_tree(z, 4, seed=5)
    modes = divisive_official(z, 4, level=6, seed=5)  # medoid is the default
    idx = row_index(z, modes)
    assert -1 not in idx and len(set(idx)) == 4
    for leaf in leaves:  # every leaf contributes its member closest to its mean
        d = ((z[leaf] - z[leaf].mean(0)) ** 2).sum(1)
        assert int(leaf[torch.argmin(d)]) in idx


def test_medoid_is_searched_within_its_own_set():
    """A leaf's medoid is its own member closest to its mean (the release's argmin over X2[idx]), even
    when a row of another leaf lies nearer that mean: a crescent-shaped leaf whose mean falls in the gap."""
    from manifoldgd_fast._modes_common import _set_modes
    x = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0],   # leaf 0: mean (0, 1/3)
                      [0.0, 0.3], [5.0, 5.0], [4.0, 4.0]])    # leaf 1: (0, 0.3) sits next to leaf 0's mean
    modes = _set_modes(x, [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])], "medoid")
    assert torch.equal(modes[0], x[1])  # not x[3], the nearer non-member
    assert torch.equal(modes[1], x[5])  # leaf 1's mean is (3, 3.1)
    assert torch.equal(_set_modes(x, [torch.tensor([0, 1, 2])], "mean")[0], x[:3].mean(0))


def caterpillar(dim=4, seed=0):
    """Blobs on a line at 0, 100, 110, 111: the tree is root -> {A, rest},
    rest -> {B, rest'}, rest' -> {C, D}, so leaf depths are A:1, B:2, C:3, D:3."""
    return blobs([(0,), (100,), (110,), (111,)], [20, 15, 12, 10], std=0.05, dim=dim, seed=seed)


def test_level_sweep_order():
    z, truth, _ = caterpillar()
    leaves, depths = bisecting_tree(z, 4, seed=0)
    assert partition(leaves) == label_partition(truth)
    depth_of_blob = {int(truth[leaf[0]]): d for leaf, d in zip(leaves, depths)}
    assert depth_of_blob == {0: 1, 1: 2, 2: 3, 3: 3}

    def blob_order(level, seed):
        modes = divisive_official(z, 4, level=level, seed=seed)
        return [int(truth[i]) for i in row_index(z, modes)]

    seen_deep_first = set()
    for seed in range(16):  # C/D's order follows the seed (six seeds show both under torch 2.13, not under 2.4)
        # level 1 (root, no leaf there) -> one leaf at depth 1, 2, 3, then the other at depth 3
        order = blob_order(1, seed)
        assert order[:2] == [0, 1] and sorted(order[2:]) == [2, 3]
        seen_deep_first.add(order[2])
        # level 3 starts at depth 2: B, one of C/D, the other, then A (deepest first fill)
        order = blob_order(3, seed)
        assert order[0] == 1 and sorted(order[1:3]) == [2, 3] and order[3] == 0
        # level 6 is clamped to the deepest depth: C/D, D/C, then B, then A
        order = blob_order(6, seed)
        assert sorted(order[:2]) == [2, 3] and order[2:] == [1, 0]
        # level 0 acts as level 1
        assert blob_order(0, seed) == blob_order(1, seed)
        if seed >= 5 and seen_deep_first == {2, 3}:
            break
    assert seen_deep_first == {2, 3}


def test_level_sweep_choice_within_depth_is_random():
    # The tree's left/right order also varies with the seed, so look at which
    # of the two depth-3 leaves, in tree order, the sweep takes first.
    z, _, _ = caterpillar()
    first_or_second = set()
    for seed in range(8):
        leaves, depths = bisecting_tree(z, 4, seed=seed)
        deep = [leaf for leaf, d in zip(leaves, depths) if d == 3]
        modes = divisive_official(z, 4, level=6, seed=seed)
        first = row_index(z, modes[:1])[0]
        first_or_second.add(0 if first in deep[0].tolist() else 1)
    assert first_or_second == {0, 1}


def test_official_selects_every_leaf_once():
    z, _, _ = blobs(**PAIRS)
    leaves, _ = bisecting_tree(z, 4, seed=1)
    for level in (1, 2, 3, 6):
        modes = divisive_official(z, 4, level=level, seed=1, mode_point="mean")
        means = torch.stack([z[leaf].mean(0) for leaf in leaves])
        match = torch.cdist(modes, means).argmin(1)
        assert sorted(match.tolist()) == [0, 1, 2, 3]
        assert torch.cdist(modes, means).min(1).values.max() < 1e-10


def test_official_duplicates_and_too_few_points():
    # identical latents: 2-means cannot split, the random balanced split does
    z = torch.full((4, 3), 2.0)
    leaves, depths = bisecting_tree(z, 4, seed=0)
    assert partition(leaves) == {frozenset([i]) for i in range(4)} and depths == [2, 2, 2, 2]
    assert torch.equal(divisive_official(z, 4, level=1, seed=0), z)
    with pytest.raises(DataError, match="ipc=5"):
        divisive_official(z[:3], 5, level=1, seed=0)


def test_official_seed_deterministic():
    z = torch.randn(120, 6, generator=torch.Generator().manual_seed(4))
    a = divisive_official(z, 7, level=2, seed=9)
    assert torch.equal(a, divisive_official(z, 7, level=2, seed=9))


# ----------------------------------------------------------------------------
# divisive, paper
# ----------------------------------------------------------------------------
def paper_data():
    """Two groups far apart on x, each two blobs apart on y.

    Levels: 0 root (135); 1 groups {A,B} (70) and {C,D} (65); 2 blobs A 50,
    B 20, C 35, D 30."""
    return blobs([(0, 0), (0, 10), (100, 0), (100, 10)], [50, 20, 35, 30], std=0.3, dim=4)


def test_paper_level_walk_then_leaves():
    z, truth, _ = paper_data()
    mean = {b: z[truth == b].mean(0) for b in range(4)}
    group1 = z[truth <= 1].mean(0)
    for seed in range(4):
        modes = divisive_paper(z, 5, start_level=2, seed=seed, max_depth=2)
        assert modes.shape == (5, 4)
        assert torch.allclose(modes[0], mean[0], atol=1e-10)        # level 2: most populous blob
        assert torch.allclose(modes[1], group1, atol=1e-10)         # level 1: the bigger group
        assert torch.allclose(modes[2], z.mean(0), atol=1e-10)      # level 0: the class mean
        rest = torch.stack([mean[1], mean[2], mean[3]])
        d = torch.cdist(modes[3:], rest)
        assert d.min(1).values.max() < 1e-10 and len(set(d.argmin(1).tolist())) == 2  # distinct leaves
    # ipc below the number of walked levels: the first picks only
    assert torch.allclose(divisive_paper(z, 2, start_level=2, seed=0, max_depth=2), modes[:2])
    # 3 walked nodes + 3 untaken leaves is the most this tree holds
    assert divisive_paper(z, 6, start_level=2, seed=0, max_depth=2).shape == (6, 4)
    with pytest.raises(DataError, match="ipc=7"):
        divisive_paper(z, 7, start_level=2, seed=0, max_depth=2)


def test_paper_seeded_fill():
    z, _, _ = paper_data()
    runs = [divisive_paper(z, 4, start_level=2, seed=s, max_depth=2) for s in range(8)]
    assert torch.equal(runs[0], divisive_paper(z, 4, start_level=2, seed=0, max_depth=2))
    assert all(torch.equal(r[:3], runs[0][:3]) for r in runs)  # the level walk is not random
    assert len({tuple(r[3].tolist()) for r in runs}) > 1         # the leaf fill is


def test_paper_fill_is_not_tree_order():
    # Rebuild each seed's tree to learn node ids: the fill must not simply take
    # the lowest-id untaken leaf every time.
    from manifoldgd_fast._modes_common import _generator
    from manifoldgd_fast.modes_tree import _paper_tree

    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lowest_id = []
    for seed in range(6):
        nodes, levels, is_leaf = _paper_tree(z, 3, 2, _generator(seed), 10, 100)
        modes = divisive_paper(z, 5, start_level=1, seed=seed, max_depth=3)
        means = torch.stack([z[idx].mean(0) for idx in nodes])
        ids = torch.cdist(modes, means).argmin(1).tolist()
        assert [levels[i] for i in ids[:2]] == [1, 0] and all(is_leaf[i] for i in ids[2:])
        untaken = [i for i in range(len(nodes)) if is_leaf[i] and i not in ids[:2]]
        lowest_id.append(ids[2] == untaken[0])
    assert not all(lowest_id)


def test_paper_min_leaf_and_missing_levels():
    z, truth, _ = paper_data()
    # groups hold 70 and 65 < 80 points: they stay leaves, level 2 does not exist
    modes = divisive_paper(z, 3, start_level=2, seed=0, min_leaf=80)
    assert torch.allclose(modes[0], z[truth <= 1].mean(0), atol=1e-10)
    assert torch.allclose(modes[1], z.mean(0), atol=1e-10)
    assert torch.allclose(modes[2], z[truth >= 2].mean(0), atol=1e-10)
    with pytest.raises(DataError):
        divisive_paper(z, 4, start_level=2, seed=0, min_leaf=80)
    # medoid variant returns class latents
    med = divisive_paper(z, 5, start_level=3, seed=0, mode_point="medoid")
    assert -1 not in row_index(z, med)


def test_paper_default_depth_reaches_budget():
    z = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    modes = divisive_paper(z, 20, start_level=3, seed=0)  # default max_depth = max(3, 5) + 1
    assert modes.shape == (20, 5) and len({tuple(m.tolist()) for m in modes}) == 20


@pytest.mark.parametrize("ipc", [19, 20])
def test_paper_default_depth_grows_past_lopsided_splits(ipc):
    """Doubling scales split one point off per level: the default depth (here 6) gave 15 nodes for 20
    latents; it grows a level at a time until the budget is met, and a tree that already meets it is
    unchanged."""
    z = (2.0 ** torch.arange(20.0))[:, None].repeat(1, 2)
    modes = divisive_paper(z, ipc, start_level=2, seed=0)
    assert modes.shape == (ipc, 2) and torch.isfinite(modes).all()
    default = max(2, math.ceil(math.log2(ipc))) + 1
    with pytest.raises(DataError, match="yields only"):                # a depth the user set stays a cap
        divisive_paper(z, ipc, start_level=2, seed=0, max_depth=default)
    for depth in range(default + 1, 20):                               # the first depth that meets the budget
        try:
            first = divisive_paper(z, ipc, start_level=2, seed=0, max_depth=depth)
        except DataError:
            continue
        break
    assert torch.equal(modes, first)
    normal = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))   # met at the default: unchanged
    assert torch.equal(divisive_paper(normal, 20, start_level=3, seed=0),
                       divisive_paper(normal, 20, start_level=3, seed=0, max_depth=6))


# ----------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("linkage", ["ward", "average", "complete", "single"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_agglomerative_matches_sklearn(linkage, k):
    from sklearn.cluster import AgglomerativeClustering

    z = torch.randn(70, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z[:20] += 3.0  # some structure, so the clusters are not all singletons
    labels = agglomerative(z, k, linkage=linkage)
    ref = AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(z.numpy())
    np.testing.assert_array_equal(labels.numpy(), canonical(ref))
    modes = agglomerative_modes(z, k, linkage=linkage)
    expect = torch.stack([z[labels == c].mean(0) for c in range(k)])
    assert torch.allclose(modes, expect, atol=1e-12)


def test_agglomerative_medoids_and_order():
    z, truth, _ = blobs([(5, 0), (-5, 0), (0, 8)], [10, 12, 8], dim=3)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    z, truth = z[perm], truth[perm]
    labels = agglomerative(z, 3)
    assert label_partition(labels) == label_partition(truth)
    assert labels[0] == 0  # clusters numbered by smallest member index
    med = agglomerative_modes(z, 3, mode_point="medoid")
    assert -1 not in row_index(z, med)


def test_gmm_recovers_means_by_weight():
    z, truth, centres = blobs([(0, 0), (8, 0), (0, 8)], [30, 120, 60], std=0.5, dim=5)
    means = gmm_modes(z, 3, seed=0)
    # heaviest component first: blob 1 (120), then blob 2 (60), then blob 0 (30)
    for got, blob in zip(means, [1, 2, 0]):
        assert torch.allclose(got, z[truth == blob].mean(0), atol=1e-3)
    assert torch.equal(means, gmm_modes(z, 3, seed=0))
    for seed in range(1, 5):  # the k-means order varies with the seed; the output order does not
        assert torch.allclose(gmm_modes(z, 3, seed=seed), means, atol=1e-6)


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_a_cluster_of_one_is_never_emptied_to_the_origin(method):
    """Fewer distinct latents than IPC ([a, b, b] at IPC 3, a duplicated row at IPC = n): all distances can be
    0, and the relocation took the farthest point from a cluster of one, leaving that cluster empty with its
    centre on the origin (a zero mode; 160 of 480 small cases). Every mode is now a row of the class."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    sets = [torch.stack([a, b, b]), torch.stack([b, a, b]),
            torch.cat([torch.randn(6, 4, generator=gen), torch.randn(1, 4, generator=gen).repeat(2, 1)])]
    for z in sets:
        for seed in range(20):
            modes = discover_modes(z, z.shape[0] if z.shape[0] > 3 else 3, method=method, seed=seed)
            assert -1 not in row_index(z, modes), (method, seed, modes)


def test_gmm_with_fewer_distinct_latents_than_components_gives_real_latents():
    """k-means leaves a cluster empty when the class has fewer distinct latents than IPC: that component
    starts (and stays, at weight 0) on its k-means centre, a real latent, not on the origin."""
    a, b = torch.full((4,), 5.0), torch.full((4,), -3.0)
    z = torch.stack([a, a, a, b, b, b])
    means = gmm_modes(z, 4, seed=0)
    assert -1 not in row_index(z, means), means
    assert {tuple(m.tolist()) for m in means} == {tuple(a.tolist()), tuple(b.tolist())}
    assert -1 not in row_index(z[:3], gmm_modes(z[:3], 2, seed=0))   # all equal


def test_gmm_iters_is_its_own_cap():
    """--gmm-iters caps GMM's EM (sklearn GaussianMixture's max_iter, 100); --kmeans-iters no longer does.
    Only GMM runs count it in their run and modes fingerprints."""
    from manifoldgd_fast.config import DistillConfig, fingerprint, modes_fingerprint

    z, _, _ = blobs([(0, 0), (3, 0), (0, 3)], [40, 80, 60], std=1.2, dim=5)
    full = discover_modes(z, 3, method="gmm", seed=1)
    assert not torch.allclose(discover_modes(z, 3, method="gmm", seed=1, gmm_iters=1), full, atol=1e-4)
    assert torch.equal(discover_modes(z, 3, method="gmm", seed=1, kmeans_iters=1), full)
    with pytest.raises(ConfigError, match="--gmm-iters must be an integer >= 1, got 0"):
        discover_modes(z, 3, method="gmm", seed=1, gmm_iters=0)

    def cfg(**kw):
        return DistillConfig(data="d", out="o", **kw).resolve(3, "cpu")

    assert fingerprint(cfg(gmm_iters=7)) == fingerprint(cfg())
    assert fingerprint(cfg(mode_method="gmm", gmm_iters=7)) != fingerprint(cfg(mode_method="gmm"))
    assert modes_fingerprint(cfg(gmm_iters=7), "c", "a") == modes_fingerprint(cfg(), "c", "a")
    assert modes_fingerprint(cfg(mode_method="gmm", gmm_iters=7), "c", "a") != modes_fingerprint(cfg(mode_method="gmm"), "c", "a")
    with pytest.raises(ConfigError, match="--gmm-iters must be an integer >= 1"):
        DistillConfig(gmm_iters=0).validate()


def test_random_modes_distinct_rows():
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    modes = random_modes(z, 10, seed=3)
    idx = row_index(z, modes)
    assert -1 not in idx and len(set(idx)) == 10
    assert torch.equal(modes, random_modes(z, 10, seed=3))
    assert not torch.equal(modes, random_modes(z, 10, seed=4))
    assert sorted(row_index(z, random_modes(z, 50, seed=0))) == list(range(50))


# ----------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kmeans", "divisive", "gmm", "random", "agglomerative"])
@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_discover_modes_shapes_and_points(method, formulation):
    z4 = torch.randn(40, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = z4.reshape(40, -1)
    modes = discover_modes(z4, 6, method=method, formulation=formulation, level=2)
    assert modes.shape == (6, 18) and modes.dtype == torch.float32 and modes.device == z4.device
    real = -1 not in row_index(z.float(), modes)
    # auto: medoids for official divisive (and random picks rows); means otherwise
    assert real == (method == "random" or (method == "divisive" and formulation == "official"))
    med = discover_modes(z4, 6, method=method, formulation=formulation, level=2, mode_point="medoid")
    assert -1 not in row_index(z.float(), med)
    assert torch.equal(modes, discover_modes(z4, 6, method=method, formulation=formulation, level=2))


def test_discover_modes_kmeans_equals_kmeans():
    z = torch.randn(60, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(discover_modes(z, 5, method="kmeans", seed=4), kmeans(z, 5, seed=4)[0])


@pytest.mark.parametrize("seed", [5, 17])
def test_kmeans_medoids_are_the_closest_class_latents(seed):
    """kmeans --mode-point medoid: the class latent closest to each centre, searched over the whole
    class (MGD3's "closest sample to the k-means centroid"), not only the centre's own cluster.
    These seeds give a centre whose closest latent lies in another cluster."""
    z = torch.randn(60, 16, generator=torch.Generator().manual_seed(seed))
    centres, labels = kmeans(z, 6, seed=seed)
    nearest = torch.cdist(centres.double(), z.double()).argmin(1)  # (6,) float64 brute force
    assert (labels[nearest] != torch.arange(6)).any()  # the case the rule is about
    assert torch.equal(discover_modes(z, 6, method="kmeans", seed=seed, mode_point="medoid"), z[nearest])


def test_kmeans_medoid_rule_in_fingerprints():
    """Runs made with the cluster-member rule are refused on resume; other fingerprints are unchanged."""
    from manifoldgd_fast.config import DistillConfig, fingerprint_fields, modes_fingerprint

    def cfg(**kw):
        return DistillConfig(data="d", out="o", **kw).resolve(3, "cpu")

    assert fingerprint_fields(cfg(mode_method="kmeans", mode_point="medoid"))["kmeans_medoid"] == "class"
    for kw in ({}, {"mode_method": "kmeans"}, {"mode_point": "medoid"}):
        assert "kmeans_medoid" not in fingerprint_fields(cfg(**kw))
    a, b = cfg(mode_method="kmeans", mode_point="medoid"), cfg(mode_method="kmeans", mode_point="mean")
    assert modes_fingerprint(a, "c", "x") != modes_fingerprint(b, "c", "x")


def test_discover_modes_errors():
    z = torch.randn(10, 4)
    with pytest.raises(ConfigError, match="--mode-method"):
        discover_modes(z, 3, method="spectral")
    with pytest.raises(ConfigError, match="--level"):
        discover_modes(z, 3, method="divisive")
    with pytest.raises(ConfigError, match="--formulation"):
        discover_modes(z, 3, method="kmeans", formulation="fancy")
    with pytest.raises(ConfigError, match="--mode-point"):
        discover_modes(z, 3, method="kmeans", mode_point="median")
    with pytest.raises(ConfigError, match="--linkage"):
        discover_modes(z, 3, method="agglomerative", linkage="centroid")
    with pytest.raises(ConfigError, match="--ipc"):
        discover_modes(z, 0, method="kmeans")
    with pytest.raises(DataError, match="10 latents, fewer than --ipc"):
        discover_modes(z, 11, method="kmeans")
    with pytest.raises(DataError, match="NaN"):
        discover_modes(torch.full((5, 2), math.nan), 2, method="random")
    with pytest.raises(DataError, match="shape"):
        discover_modes(torch.randn(5), 2, method="random")
    with pytest.raises(DataError, match="no latents"):
        discover_modes(torch.randn(0, 3), 1, method="random")
    with pytest.raises(ConfigError, match="seed"):
        kmeans(z, 2, seed=1.5)
    with pytest.raises(DataError):
        kmeans(z, 11, seed=0)


# ----------------------------------------------------------------------------
# neighbourhoods and radii (paper formulation)
# ----------------------------------------------------------------------------
def test_neighbourhood_order_sorted_and_stable():
    z = torch.tensor([[2.0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [0, 0]])
    modes = torch.tensor([[0.0, 0], [2, 0]])
    order, dist = neighbourhood_order(z, modes)
    assert order.dtype == torch.long and order.shape == dist.shape == (2, 6)
    assert order[0].tolist() == [5, 1, 2, 3, 4, 0]  # the four ties at distance 1 keep index order
    assert dist[0].tolist() == [0, 1, 1, 1, 1, 2]
    assert order[1].tolist()[:2] == [0, 1]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(80, 6, generator=g)
    modes = torch.randn(3, 6, generator=g)
    order, dist = neighbourhood_order(z, modes)
    assert (dist[:, 1:] >= dist[:, :-1]).all()
    direct = (z[order] - modes[:, None]).norm(dim=2)
    assert torch.allclose(direct, dist, atol=1e-5)
    assert all(sorted(o.tolist()) == list(range(80)) for o in order)


def test_class_radii():
    g = torch.Generator().manual_seed(0)
    _, dist = neighbourhood_order(torch.randn(50, 3, generator=g), torch.randn(4, 3, generator=g))
    lo, hi = class_radii(dist, 0.2, 0.9)
    ref = np.quantile(dist.numpy().ravel().astype(np.float64), [0.2, 0.9])
    assert lo == pytest.approx(ref[0], rel=1e-6) and hi == pytest.approx(ref[1], rel=1e-6)
    assert class_radii(dist, 0.0, 1.0) == (float(dist.min()), float(dist.max()))
    assert class_radii(dist, 0.5, 3.0, units="absolute") == (0.5, 3.0)
    with pytest.raises(ConfigError, match="--r-max"):
        class_radii(dist, 0.2, 1.5)
    with pytest.raises(ConfigError, match="--r-min"):
        class_radii(dist, 0.8, 0.3)
    with pytest.raises(ConfigError, match="--radius-units"):
        class_radii(dist, 0.2, 0.9, units="pixels")


@pytest.mark.parametrize("schedule", ["exponential", "cosine", "linear", "constant"])
def test_anneal_radius_endpoints(schedule):
    assert anneal_radius(1.0, 0.5, 3.0, schedule) == pytest.approx(3.0)
    start = 3.0 if schedule == "constant" else 0.5
    assert anneal_radius(0.0, 0.5, 3.0, schedule) == pytest.approx(start)
    taus = np.linspace(0, 1, 11)
    rs = [anneal_radius(float(t), 0.5, 3.0, schedule) for t in taus]
    assert all(b >= a - 1e-12 for a, b in zip(rs, rs[1:]))  # shrinks as tau goes 1 -> 0


def test_anneal_radius_values():
    assert anneal_radius(0.5, 1.0, 2.0, "exponential", a=5.0) == pytest.approx(1 + math.expm1(2.5) / math.expm1(5))
    assert anneal_radius(0.5, 1.0, 2.0, "cosine") == pytest.approx(2 - math.cos(math.pi / 4))
    assert anneal_radius(0.3, 1.0, 2.0, "linear") == pytest.approx(1.3)
    assert anneal_radius(0.3, 1.0, 2.0, "exponential", a=0.0) == pytest.approx(1.3)
    with pytest.raises(ConfigError, match="--radius-schedule"):
        anneal_radius(0.5, 1.0, 2.0, "step")
    with pytest.raises(ConfigError, match="tau"):
        anneal_radius(1.5, 1.0, 2.0)


def test_patch_lengths():
    d = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0], [0.0, 3.0, 4.0, 5.0, 6.0]])
    assert patch_lengths(d, 1.0, 1).tolist() == [3, 1]   # inclusive radius
    assert patch_lengths(d, 1.0, 2).tolist() == [3, 2]   # never below k_min
    assert patch_lengths(d, 10.0, 2).tolist() == [5, 5]
    assert patch_lengths(d, 0.1, 20).tolist() == [5, 5]  # k_min capped at n
    assert patch_lengths(d, 1.0, 1).dtype == torch.long
    with pytest.raises(ConfigError, match="--k-min"):
        patch_lengths(d, 1.0, 0)


@pytest.mark.parametrize("tol, iters", [(0.0, 300), (1e-4, 300), (1e-2, 300), (0.1, 300), (0.0, 2)])
def test_kmeans_lloyd_and_stopping_rule_match_sklearn(tol, iters, monkeypatch):
    # The releases call sklearn's KMeans with its defaults (max_iter 300, tol 1e-4 x the mean feature
    # variance). From the same initial centres our Lloyd must stop where sklearn's does: the tolerances
    # here stop it after different numbers of iterations on this data, so a wrong scale or rule shows.
    from sklearn.cluster import KMeans

    import manifoldgd_fast._modes_common as common

    g = torch.Generator().manual_seed(3)
    z = torch.rand(400, 2, generator=g, dtype=torch.float64) * torch.tensor([4.0, 1.0], dtype=torch.float64)
    init = z[:6].clone()  # poor seeds: Lloyd needs many iterations
    monkeypatch.setattr(common, "_kmeans_pp", lambda x, x_sq, k, gen: init.clone())
    cen, lab = kmeans(z, 6, seed=0, tol=tol, iters=iters)
    ref = KMeans(n_clusters=6, init=init.numpy(), n_init=1, max_iter=iters, tol=tol, algorithm="lloyd").fit(z.numpy())
    np.testing.assert_array_equal(lab.numpy(), ref.labels_)
    np.testing.assert_allclose(cen.numpy(), ref.cluster_centers_, rtol=0, atol=1e-10)


def test_kmeans_defaults_are_sklearns():
    import inspect

    from sklearn.cluster import KMeans

    from manifoldgd_fast.config import DistillConfig

    sk = inspect.signature(KMeans).parameters
    ours = inspect.signature(kmeans).parameters
    assert ours["iters"].default == sk["max_iter"].default == DistillConfig().kmeans_iters
    assert ours["tol"].default == sk["tol"].default == DistillConfig().kmeans_tol


def test_discover_modes_passes_kmeans_tol():
    z, _, _ = blobs([(0, 0), (1.2, 0), (2.4, 0), (0, 1.2)], [30, 30, 30, 30], std=0.5, dim=3)
    loose = discover_modes(z, 4, method="kmeans", seed=1, kmeans_tol=1e3)  # stops after one Lloyd step
    tight = discover_modes(z, 4, method="kmeans", seed=1, kmeans_tol=0.0)
    assert not torch.allclose(loose, tight)
    with pytest.raises(ConfigError, match="--kmeans-tol must be a number >= 0"):
        discover_modes(z, 4, method="kmeans", seed=1, kmeans_tol=-1.0)


# ----------------------------------------------------------------------------
# gaps a mutation audit found (each test fails on the stated mutation)
# ----------------------------------------------------------------------------
def test_kmeans_keeps_the_lowest_inertia_of_its_n_init_runs(monkeypatch):
    """n_init independent seedings, the run of lowest inertia kept (the first on ties): ignoring n_init, or
    keeping the last run, passed every other test."""
    from manifoldgd_fast import _modes_common as mc

    z = torch.randn(200, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    runs, real = [], mc._lloyd

    def lloyd(*a, **k):
        out = real(*a, **k)
        runs.append(out)
        return out

    monkeypatch.setattr(mc, "_lloyd", lloyd)
    centres, labels = kmeans(z, 7, seed=0, n_init=5)
    assert len(runs) == 5
    inertias = [float(r[2]) for r in runs]
    assert len(set(inertias)) > 1                       # structureless data: the seedings do differ
    best = runs[inertias.index(min(inertias))]
    assert torch.equal(labels, best[1]) and torch.equal(centres, best[0])


def test_each_bisection_draws_its_own_seed():
    """Each 2-means split of the official tree is seeded by a draw from the tree's generator (the release's
    random_state passed down); a fixed sub-seed gives every run the same tree on structureless data."""
    z = torch.randn(200, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    trees = {tuple(sorted(tuple(sorted(map(int, leaf))) for leaf in bisecting_tree(z, 6, seed=s, n_init=1)[0]))
             for s in range(6)}
    assert len(trees) > 1


@pytest.mark.parametrize("narrow", [0.3, 0.01])
def test_gmm_is_sklearns_diagonal_em_from_the_same_start(narrow):
    """Our EM equals sklearn's GaussianMixture(covariance_type='diag') started from the same parameters
    (those of k-means' hard responsibilities), with the log-determinant in the E step (two blobs of very
    different spread) and a variance floor (1e-6) that a narrow component's variances (1e-4) stay above."""
    from sklearn.mixture import GaussianMixture

    g = torch.Generator().manual_seed(0)
    tight = torch.randn(150, 3, generator=g, dtype=torch.float64) * torch.tensor([narrow, narrow, 0.3], dtype=torch.float64)
    wide = torch.randn(150, 3, generator=g, dtype=torch.float64) * 3.0 + torch.tensor([1.5, 0, 0], dtype=torch.float64)
    z = torch.cat([tight, wide])
    ours = gmm_modes(z, 2, seed=0)
    _, labels = kmeans(z, 2, seed=0)
    x = z.numpy()
    resp = np.eye(2)[labels.numpy()]
    nk = resp.sum(0)
    means = resp.T @ x / nk[:, None]
    var = resp.T @ (x * x) / nk[:, None] - means ** 2
    ref = GaussianMixture(2, covariance_type="diag", tol=1e-3, reg_covar=1e-12, max_iter=100,
                          weights_init=nk / nk.sum(), means_init=means, precisions_init=1 / var).fit(x)
    np.testing.assert_allclose(ours.numpy(), ref.means_[np.argsort(-ref.weights_, kind="stable")], atol=1e-8)


def test_bisect_splits_identical_latents_into_seeded_random_halves():
    """When 2-means cannot separate a leaf (all its latents identical) it is cut into balanced halves of a seeded
    random permutation: the same seed gives the same halves, other seeds other ones (not always the first half of
    the leaf's indices)."""
    z = torch.full((8, 3), 2.0)
    lefts = set()
    for seed in range(8):
        leaves, depths = bisecting_tree(z, 2, seed=seed)
        assert [leaf.numel() for leaf in leaves] == [4, 4] and depths == [1, 1]
        assert partition(leaves) == partition(bisecting_tree(z, 2, seed=seed)[0])
        lefts.add(frozenset(leaves[0].tolist()))
    assert len(lefts) > 1


def test_official_sweep_draws_from_a_fresh_generator_seeded_as_the_tree():
    """The released code builds a second RandomState(random_state) for the level sweep: the sweep's draws come
    from a fresh generator with the run's seed, not from the tree's generator or another seed."""
    from manifoldgd_fast._modes_common import _generator, _set_modes
    from manifoldgd_fast.modes_tree import _level_sweep

    z, _, _ = caterpillar()
    for seed in range(6):
        leaves, depths = bisecting_tree(z, 4, seed=seed)
        for level in (1, 3, 6):
            order = _level_sweep(depths, 4, level, _generator(seed))
            assert torch.equal(divisive_official(z, 4, level=level, seed=seed),
                               _set_modes(z, [leaves[p] for p in order], "medoid"))


@pytest.mark.parametrize("kw,name", [(dict(level=-1), "level"), (dict(level=1.5), "level"), (dict(ipc=0), "ipc"),
                                     (dict(level=True), "level"), (dict(n_init=0), "n_init"),
                                     (dict(mode_point="median"), "mode_point")])
def test_official_rejects_bad_arguments(kw, name):
    z, _, _ = caterpillar()
    args = {"ipc": 2, "level": 1, "seed": 0, **kw}
    with pytest.raises(ConfigError, match=f"^{name}[ :]"):
        divisive_official(z, args.pop("ipc"), **args)


@pytest.mark.parametrize("kw,name", [(dict(min_leaf=0), "min_leaf"), (dict(max_depth=-1), "max_depth"),
                                     (dict(start_level=-1), "start_level"), (dict(ipc=0), "ipc"),
                                     (dict(mode_point="median"), "mode_point")])
def test_paper_rejects_bad_arguments(kw, name):
    z, _, _ = paper_data()
    args = {"ipc": 2, "start_level": 2, "seed": 0, **kw}
    with pytest.raises(ConfigError, match=f"^{name}[ :]"):
        divisive_paper(z, args.pop("ipc"), **args)


def test_paper_never_splits_a_node_of_one_latent():
    """min_leaf=1 still leaves nodes of one latent unsplit (2-means of one point would raise): a tree grown to
    single latents gives every latent as a mode."""
    z = torch.tensor([[0.0, 0.0], [0.0, 10.0], [100.0, 0.0], [100.0, 10.0]], dtype=torch.float64)
    modes = divisive_paper(z, 4, start_level=0, seed=0, min_leaf=1, max_depth=5)
    # the root's mean first (level 0), then 3 of the 4 single-latent leaves
    assert torch.equal(modes[0], z.mean(0))
    assert len({tuple(m.tolist()) for m in modes[1:]} & {tuple(r.tolist()) for r in z}) == 3


def test_paper_level_pick_ties_go_to_the_lower_node_id():
    """Two nodes of one level equally populous: the level's pick is the one of lower (breadth-first) id."""
    from manifoldgd_fast._modes_common import KMEANS_ITERS, KMEANS_TOL, _generator
    from manifoldgd_fast.modes_tree import _paper_tree

    z, _, _ = blobs([(0, 0), (100, 0)], [30, 30], dim=4)
    for seed in range(4):
        nodes, levels, _ = _paper_tree(z, 1, 2, _generator(seed), 10, KMEANS_ITERS, KMEANS_TOL)
        assert levels == [0, 1, 1] and nodes[1].numel() == nodes[2].numel() == 30
        modes = divisive_paper(z, 1, start_level=1, seed=seed, max_depth=1)
        assert torch.equal(modes[0], z[nodes[1]].mean(0))


def test_agglomerative_refuses_more_clusters_than_latents():
    z, _, _ = paper_data()
    with pytest.raises(DataError, match=f"^agglomerative: k={len(z) + 1} clusters but only {len(z)} latents$"):
        agglomerative(z, len(z) + 1)
    with pytest.raises(DataError, match="clusters but only"):
        agglomerative_modes(z[:3], 4)
    assert agglomerative(z[:3], 3).tolist() == [0, 1, 2]


def test_kmeans_input_and_seed_checks():
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match="zero features"):
        kmeans(torch.zeros(4, 0), 2, seed=0)
    with pytest.raises(ConfigError, match="^seed must be an integer, got True$"):
        kmeans(z, 2, seed=True)
    for tol in (-1e-4, math.nan, math.inf, "0.1"):
        with pytest.raises(ConfigError, match="^tol must be a number >= 0"):
            kmeans(z, 2, seed=0, tol=tol)
    # a seed outside torch's range is folded into it, not refused: 2**64 + 3 draws as 3
    for a, b in zip(kmeans(z, 2, seed=2**64 + 3), kmeans(z, 2, seed=3)):
        assert torch.equal(a, b)


def test_kmeans_n_init_keeps_the_first_of_equal_inertias():
    """Runs that find the same clusters tie on inertia: the first run's centres (and label order) are kept, as
    with n_init=1 and the same seed."""
    z = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [50.0, 50.0], [50.0, 51.0], [51.0, 50.0]],
                     dtype=torch.float64)
    orders = set()
    for seed in range(8):
        cen, lab = kmeans(z, 2, seed=seed, n_init=6)
        cen1, lab1 = kmeans(z, 2, seed=seed, n_init=1)
        assert torch.equal(cen, cen1) and torch.equal(lab, lab1)
        orders.add(int(lab[0]))
    assert orders == {0, 1}  # the label order does follow the seeding


def test_kmeans_pp_takes_the_candidate_that_lowers_the_potential_most():
    """Greedy k-means++: of the 2 + floor(ln k) candidates drawn prop. to D^2, the new centre is the one leaving
    the smallest total D^2 (not simply the first drawn). Checked for the second centre, whose draws are known."""
    from manifoldgd_fast._modes_common import _generator, _kmeans_pp, _sq_dists

    z, _, _ = blobs(**PAIRS)
    x_sq = (z * z).sum(1)
    not_first = 0
    for seed in range(12):
        g = _generator(seed)
        first = int(torch.randint(len(z), (1,), generator=g))
        closest = _sq_dists(z, z[first][None], x_sq)[:, 0]
        cand = torch.multinomial(closest / closest.sum(), 2, replacement=True, generator=g)
        potential = torch.minimum(closest[None], _sq_dists(z[cand], z, x_sq[cand])).sum(1)
        best = int(torch.argmin(potential))
        not_first += best != 0
        centres = _kmeans_pp(z, x_sq, 2, _generator(seed))
        assert torch.equal(centres[0], z[first]) and torch.equal(centres[1], z[cand[best]])
    assert not_first > 0


@pytest.mark.parametrize("bad, match", [
    ({"iters": 0}, r"^iters must be an integer >= 1, got 0$"),
    ({"n_init": 0}, r"^n_init must be an integer >= 1, got 0$"),
    ({"tol": -1.0}, r"^tol must be a number >= 0, got -1.0$"),
    ({"tol": math.nan}, r"^tol must be a number >= 0, got nan$"),
    ({"tol": True}, r"^tol must be a number >= 0, got True$"),
])
@pytest.mark.parametrize("ipc", [1, 3])
def test_divisive_split_parameters_are_checked_even_with_no_split(bad, match, ipc):
    """divisive_official / divisive_paper / bisecting_tree checked iters, tol (and the paper's n_init) only when
    a node was split: at ipc 1 the official tree has none, so any value passed; each is refused before the tree."""
    z = torch.randn(12, 4)
    with pytest.raises(ConfigError, match=match):
        divisive_official(z, ipc, level=1, seed=0, **bad)
    with pytest.raises(ConfigError, match=match):
        bisecting_tree(z, ipc, seed=0, **bad)
    with pytest.raises(ConfigError, match=match):
        divisive_paper(torch.randn(1, 4), 1, start_level=0, seed=0, **bad)  # one latent: a tree of one node
    with pytest.raises(ConfigError, match=match):
        divisive_paper(z, ipc, start_level=1, seed=0, **bad)
    if "tol" in bad:
        with pytest.raises(ConfigError, match=match):
            kmeans(z, ipc, seed=0, **bad)


def test_modes_says_it_does_not_read_modes_dir(tmp_path, monkeypatch, caplog, capsys):
    """`modes --modes-dir D` (or a --config shared with distill) wrote OUT/modes/ and said nothing of D, which its
    --help listed as distill's "read each class's modes from DIR": a user asking for D found nothing there."""
    import logging

    from manifoldgd_fast import pipeline
    from manifoldgd_fast.cli import build_parser

    class Stop(Exception):
        pass

    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    out = tmp_path / "o"
    for modes_dir, warned in [(tmp_path / "d", True), (out / "modes", False)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="manifoldgd_fast"), pytest.raises(Stop):
            pipeline.compute_modes({"out": str(out), "data": str(tmp_path / "data"), "modes_dir": str(modes_dir)})
        said = [r.getMessage() for r in caplog.records if "--modes-dir" in r.getMessage()]
        assert said == ([f"--modes-dir {modes_dir} is not read by `modes`: it writes the modes to {out / 'modes'}"]
                        if warned else []), said
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["modes"]
    text = next(a.help for a in sub._actions if a.dest == "modes_dir")
    assert text.startswith("not read by `modes`"), text


@pytest.mark.parametrize("bad", [3, ""])
def test_modes_refuses_a_modes_dir_that_is_no_path_in_one_line(bad, tmp_path):
    """The warning about --modes-dir took its realpath first: modes_dir=3 through the Python API was a TypeError
    traceback, and '' was warned about as a folder, before validate's one line naming --modes-dir."""
    from manifoldgd_fast import pipeline

    with pytest.raises(ConfigError, match=r"^--modes-dir must be a folder path, got "):
        pipeline.compute_modes({"out": str(tmp_path / "o"), "data": str(tmp_path / "data"), "modes_dir": bad})
