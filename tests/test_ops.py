"""The guidance ops against direct transcriptions of SPEC 4.4 / 4b.3 (D x D covariance + eigh)."""
import math
import warnings

import pytest
import torch

from manifoldgd_fast import ops
from manifoldgd_fast.errors import BackendError, ConfigError

from conftest import anisotropic

# (dtype of the inputs, atol, rtol): the op accumulates in fp32; the direct
# transcription runs in float64 on the same (rounded) inputs.
# fp32: the worst case here is 1.7e-7 (about 1.5 ulp), so 2e-6 keeps a 10x margin for another BLAS's order.
DTYPES = [(torch.float32, 2e-6, 2e-6), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 5e-3, 5e-3)]
SHAPES = [(1, 23, 16), (3, 50, 37), (4, 64, 64), (2, 131, 7)]  # (B, M, D): primes, B = 1, D < k


def spec_manifold_correct(x, patch, g, k, d, lam, ridge, lengths):
    """SPEC 4.4 literally: k nearest rows, (1/k) covariance + ridge, D x D eigh, P_N = I - U U^T."""
    out = []
    for b in range(x.shape[0]):
        rows = patch[b, : lengths[b]].double()
        dist = ((rows - x[b].double()) ** 2).sum(1)
        idx = sorted(range(rows.shape[0]), key=lambda j: (float(dist[j]), j))[:k]
        nb = rows[idx]
        X = nb - nb.mean(0)
        cov = X.T @ X / k + ridge * torch.eye(X.shape[1], dtype=torch.float64)
        _, V = torch.linalg.eigh(cov)
        U = V[:, -d:]
        PN = torch.eye(X.shape[1], dtype=torch.float64) - U @ U.T
        gb = g[b].double()
        out.append(gb - lam * PN @ gb)
    return torch.stack(out)


def spec_manifold_pull(x, cloud, k, d, scale, bw, ridge):
    """The released sampler's distribution_aware_guidance, per sample, in float64."""
    out = []
    for b in range(x.shape[0]):
        rows = cloud[b].double()
        xb = x[b : b + 1].double()
        dist = torch.cdist(xb, rows)[0]
        idx = sorted(range(rows.shape[0]), key=lambda j: (float(dist[j]), j))[:k]
        nb = rows[idx]
        mu = nb.mean(0, keepdim=True)
        C = nb - mu
        cov = C.T @ C / (k - 1) + ridge * torch.eye(C.shape[1], dtype=torch.float64)
        e, V = torch.linalg.eigh(cov)
        V = V[:, torch.argsort(e, descending=True)]
        U = V[:, :d]
        to_mu = xb - mu
        normal = to_mu - to_mu @ U @ U.T
        vec = -normal
        direction = vec / (vec.norm() + 1e-8)
        out.append((scale * math.tanh(float(dist.min()) / bw) * direction)[0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("B,M,D", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_manifold_correct_matches_spec(B, M, D, dtype, atol, rtol, seed, lam):
    k, d = 10, 3
    x, patch, g = anisotropic(B, M, D, dtype, seed)
    lengths = torch.tensor([M - (b * 3) % (M - k) for b in range(B)])
    got = ops.manifold_correct(x, patch, g, k=k, d=d, lambda_normal=lam, ridge=1e-4, lengths=lengths)
    want = spec_manifold_correct(x.float(), patch.float(), g.float(), k, d, lam, 1e-4, lengths)
    assert got.dtype == dtype and got.shape == (B, D)
    torch.testing.assert_close(got.double(), want, atol=atol * max(1.0, float(want.abs().max())), rtol=rtol)


def test_lambda_zero_is_mode_guidance():
    x, patch, g = anisotropic(3, 40, 32, torch.float32, 5)
    assert torch.equal(ops.manifold_correct(x, patch, g, k=10, d=3, lambda_normal=0.0), g)


def test_tangent_projection_properties():
    """lambda_N = 1: result is P_T g, idempotent, orthogonal to the normal space."""
    x, patch, g = anisotropic(2, 60, 48, torch.float64, 3)
    k, d = 10, 3
    r = ops.manifold_correct(x, patch, g, k=k, d=d)
    r2 = ops.manifold_correct(x, patch, r, k=k, d=d)
    torch.testing.assert_close(r2, r, atol=1e-10, rtol=1e-10)          # idempotent
    # the normal part of r vanishes: r lies in span of the neighbours' top-d directions
    normal = r - ops.manifold_correct(x, patch, r, k=k, d=d, lambda_normal=1.0)
    assert normal.abs().max() < 1e-10
    # and r is orthogonal to g - r (an orthogonal projection)
    assert abs(float((r * (g - r)).sum())) < 1e-8 * float(g.norm() ** 2)
    assert float(r.norm()) < float(g.norm())


def test_knn_ties_go_to_lower_index_and_padding_is_ignored():
    D = 8
    x = torch.zeros(1, D)
    base = torch.randn(30, D) * 5 + 20
    patch = base.clone()[None]
    # rows 3 and 17 are exact duplicates at the same distance; k=1 must take 3
    patch[0, 17] = patch[0, 3] = torch.ones(D)
    idx, _ = ops.knn_rows_ref(x, patch, 2, torch.tensor([30]))
    assert idx.tolist() == [[3, 17]]
    # rows beyond `lengths` never count, however close they are
    padded = torch.cat([patch, torch.zeros(1, 5, D)], 1)
    g = torch.randn(1, D)
    a = ops.manifold_correct(x, patch, g, k=10, d=3)
    b = ops.manifold_correct(x, padded, g, k=10, d=3, lengths=torch.tensor([30]))
    assert torch.equal(a, b)


def test_knn_ref_breaks_every_tie_to_the_lower_index():
    """Rows on a {-1, 0, 1} grid: dozens of rows at each distance. The reference's order must be (distance, index),
    SPEC 4.4's tie rule, which the kernels' keys encode too: an unstable sort (sort without stable=True, topk) orders
    equal distances its own way past a few dozen rows, and the two backends would then disagree while each passed."""
    gen = torch.Generator().manual_seed(0)
    B, M, D, k = 3, 200, 4, 40
    rows = torch.randint(-1, 2, (B, M, D), generator=gen).float()
    x = torch.randint(-1, 2, (B, D), generator=gen).float()
    lengths = torch.tensor([200, 120, 57])
    idx, d2 = ops.knn_rows_ref(x, rows, k, lengths)
    for b in range(B):
        dist = ((rows[b, : lengths[b]] - x[b]) ** 2).sum(1).tolist()
        want = sorted(range(int(lengths[b])), key=lambda j: (dist[j], j))[:k]
        assert idx[b].tolist() == want, b
        assert d2[b].tolist() == [dist[j] for j in want]


@pytest.mark.parametrize("B,N,D", [(1, 300, 64), (3, 50, 37), (2, 40, 5)])
@pytest.mark.parametrize("seed", [0, 7])
def test_manifold_pull_matches_released_code(B, N, D, seed):
    """The bandwidth is the mean nearest distance, so tanh(delta_min / b) stays in (0.2, 0.99) for every
    sample: at the release's 0.2 the weight saturates to 1 and a pull weighted by another distance passes."""
    gen = torch.Generator().manual_seed(seed)
    cloud = torch.randn(B, N, D, generator=gen) * torch.linspace(2, 0.2, D)
    x = torch.randn(B, D, generator=gen)
    dmin = torch.cdist(x.double()[:, None], cloud.double())[:, 0].min(1).values
    bw = float(dmin.mean())
    weight = torch.tanh(dmin / bw)
    assert 0.2 < float(weight.min()) and float(weight.max()) < 0.99
    got = ops.manifold_pull(x, cloud, k=12, d=3, scale=0.1, bandwidth=bw, ridge=1e-5)
    want = spec_manifold_pull(x, cloud, 12, 3, 0.1, bw, 1e-5)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    # a unit direction times scale * tanh(.) <= scale
    assert float(got.norm(dim=1).max()) <= 0.1 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_manifold_pull_comes_back_in_x_dtype(dtype):
    """The term is returned in x's dtype (the contract manifold_correct keeps for g); float64 inputs are worked in
    float64 throughout: the float64 transcription of the released code agrees to 1e-12, not to fp32's 1e-7."""
    gen = torch.Generator().manual_seed(3)
    cloud = torch.randn(2, 60, 12, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.2, 12, dtype=torch.float64)
    x = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    got = ops.manifold_pull(x.to(dtype), cloud.to(dtype), k=12, d=3, scale=0.1, bandwidth=1.0, ridge=1e-5)
    assert got.dtype == dtype and got.shape == (2, 12)
    if dtype == torch.float64:
        torch.testing.assert_close(got, spec_manifold_pull(x, cloud, 12, 3, 0.1, 1.0, 1e-5), atol=1e-12, rtol=1e-10)


def test_manifold_pull_direction_is_normal_to_the_plane():
    """Cloud on an exact 2-plane through the origin; x off the plane: the pull is -x's normal part."""
    D = 10
    gen = torch.Generator().manual_seed(0)
    coords = torch.randn(1, 40, 2, generator=gen)
    cloud = torch.zeros(1, 40, D)
    cloud[..., :2] = coords
    x = torch.zeros(1, D)
    x[0, :2] = 0.05
    x[0, 5] = 3.0
    pull = ops.manifold_pull(x, cloud, k=12, d=2, scale=1.0, bandwidth=1.0, ridge=0.0)
    unit = pull / pull.norm()
    assert abs(float(unit[0, 5]) + 1.0) < 1e-5          # straight back down the normal
    assert float(unit[0, :5].abs().max()) < 1e-5


def test_official_cloud_structure_and_determinism():
    B, D, N, r = 2, 16, 300, 0.05
    modes = torch.randn(B, D)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    clean = ops.official_cloud(modes, r, 1.0, gens, n_points=N)       # abar = 1: no diffusion noise
    dist = (clean - modes[:, None]).norm(dim=2)
    torch.testing.assert_close(dist[:, : N // 2], torch.linspace(0.1, r, N // 2).expand(B, -1), atol=1e-5, rtol=1e-5)
    assert float(dist[:, N // 2:].max()) <= r + 1e-6
    again = ops.official_cloud(modes, r, 1.0, [torch.Generator().manual_seed(s) for s in (1, 2)], n_points=N)
    assert torch.equal(clean, again)
    noisy = ops.official_cloud(modes, r, 0.25, [torch.Generator().manual_seed(s) for s in (1, 2)], n_points=N)
    # with abar = 0.25 the cloud is 0.5 * points + sqrt(0.75) * xi: mean near 0.5 m, spread ~ sqrt(0.75)
    assert abs(float((noisy - 0.5 * modes[:, None]).std()) - math.sqrt(0.75)) < 0.03


def test_official_radius_warmup():
    kw = dict(steps=50, t_stop=25, radius=0.1, warm_steps=5, warm_mult=2.0)
    assert ops.official_radius(49, schedule="exp", **kw) == pytest.approx(0.2)       # p = 1
    assert ops.official_radius(44, schedule="exp", **kw) == pytest.approx(0.1)       # end of warm-up
    assert ops.official_radius(10, schedule="exp", **kw) == pytest.approx(0.1)
    p = 0.4  # i = 46
    assert ops.official_radius(46, schedule="exp", **kw) == pytest.approx(0.1 * (1 + (math.exp(p) - 1) / (math.e - 1)))
    assert ops.official_radius(46, schedule="linear", **kw) == pytest.approx(0.1 * (1 + p))
    assert ops.official_radius(46, schedule="cosine", **kw) == pytest.approx(0.1 * (1 + (1 + math.cos(math.pi * (1 - p))) / 2))


def test_official_radius_warmup_ends_at_t_stop():
    """10 steps, t_stop 5, W = 5: the window i = 9 ... 4 would run past the last guided step (6); the released
    sampler ends it at t_stop instead (t_cut = max(t_stop, S - 1 - W) = 5), so p = (i - 5) / 4 over i = 9 ... 6."""
    kw = dict(steps=10, t_stop=5, radius=0.05, warm_steps=5, warm_mult=2.0, schedule="exp")
    for i, p in [(9, 1.0), (8, 0.75), (7, 0.5), (6, 0.25)]:
        want = 0.05 * (1 + (math.exp(p) - 1) / (math.e - 1))
        assert ops.official_radius(i, **kw) == pytest.approx(want, rel=1e-12), i
    # by hand: 0.1, 0.08250, 0.06888, 0.05826 (a window of 5 steps, p = (i - 4) / 5, gives 0.0857 at i = 8)
    by_hand = [0.1, 0.0825, 0.06888, 0.05826]
    assert [ops.official_radius(i, **kw) for i in (9, 8, 7, 6)] == pytest.approx(by_hand, abs=1e-5)
    assert ops.official_radius(5, **kw) == 0.05                            # guidance off: r


def test_time_aligned_patch():
    n, D = 20, 6
    lat = torch.randn(n, D)
    order = torch.stack([torch.randperm(n), torch.randperm(n)])
    lengths = torch.tensor([5, 12])
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    p = ops.time_aligned_patch(lat, order, lengths, 1.0, gens)            # abar = 1: no noise
    assert p.shape == (2, 12, D)
    assert torch.equal(p[0, :5], lat[order[0, :5]]) and torch.equal(p[0, 5:], torch.zeros(7, D))
    assert torch.equal(p[1], lat[order[1, :12]])
    with pytest.raises(ConfigError, match=r"lengths must lie in \[1, n_order=20\]"):
        ops.time_aligned_patch(lat, order, torch.tensor([5, 21]), 1.0, gens)
    with pytest.raises(ConfigError, match="lengths must be"):
        ops.time_aligned_patch(lat, order, torch.tensor([5]), 1.0, gens)
    with pytest.raises(ConfigError, match="order must index rows of latents"):
        ops.time_aligned_patch(lat[:10], order, lengths, 1.0, gens)
    with pytest.raises(ConfigError, match="order must be"):
        ops.time_aligned_patch(lat, order.float(), lengths, 1.0, gens)
    with pytest.raises(ConfigError, match="alpha_bar"):
        ops.time_aligned_patch(lat, order, lengths, 1.5, gens)


def test_an_order_index_one_past_the_latents_is_refused():
    """order indexes rows of latents: n itself is one past the end, where the reference's patch clamps to row n - 1
    and the fused kernels would read past the tensor. The check's boundary is refused like every larger index
    (the other tests used indices up to 2n), within each sample's length only."""
    n, D = 12, 8
    lat = torch.randn(n, D)
    order = torch.arange(n).flip(0)[None].repeat(2, 1)
    order[1, 3] = n
    x, g = torch.randn(2, D), torch.randn(2, D)
    with pytest.raises(ConfigError, match=r"order must index rows of latents in \[0, 12\)"):
        ops.time_aligned_patch(lat, order, torch.tensor([12, 12]), 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"order must index rows of latents in \[0, 12\)"):
        ops.manifold_correct_fused(x, lat, order, torch.tensor([12, 12]), g, alpha_bar=0.5, seed=0, step=0, k=4, d=2)
    # past a sample's own length the entry is padding and never read
    got = ops.manifold_correct_fused(x, lat, order, torch.tensor([12, 3]), g, alpha_bar=0.5, seed=0, step=0, k=3, d=2)
    assert got.shape == (2, D) and bool(torch.isfinite(got).all())


def test_bad_inputs_name_the_tensor():
    x, patch, g = anisotropic(2, 30, 16, torch.float32, 0)
    with pytest.raises(ConfigError, match="x must be floating point"):
        ops.manifold_pull(x.long(), patch, k=10, d=3)
    with pytest.raises(ConfigError, match="cloud must be floating point"):
        ops.manifold_pull(x, patch.int(), k=10, d=3)
    # integer g / modes / mean / eps / latents were truncated silently by every backend
    with pytest.raises(ConfigError, match="g must be floating point, got torch.int64"):
        ops.manifold_correct(x, patch, g.long(), k=10, d=3)
    fused = dict(alpha_bar=0.5, seed=1, step=3, k=10, d=3)
    with pytest.raises(ConfigError, match="modes must be floating point"):
        ops.manifold_pull_fused(x, x.long(), radius=0.1, **fused)
    with pytest.raises(ConfigError, match="x must be floating point"):
        ops.manifold_pull_fused(x.long(), x, radius=0.1, **fused)
    with pytest.raises(ConfigError, match="mean must be floating point"):
        ops.manifold_pull_fused(x, x, radius=0.1, mean=x.int(), **fused)
    order, lengths = torch.arange(30).repeat(2, 1), torch.tensor([30, 30])
    lat = patch[0]
    with pytest.raises(ConfigError, match="latents must be floating point"):
        ops.manifold_correct_fused(x, lat.long(), order, lengths, g, **fused)
    with pytest.raises(ConfigError, match="eps must be floating point"):
        ops.manifold_correct_fused(x, lat, order, lengths, g, eps=g.long(), **fused)
    with pytest.raises(ConfigError, match="patch must be"):
        ops.manifold_correct(x, patch[:, :, :15], g, k=10, d=3)
    with pytest.raises(ConfigError, match="larger than the patch"):
        ops.manifold_correct(x, patch, g, k=10, d=3, lengths=torch.tensor([30, 9]))
    # a length past the patch / cloud (M = 30) is refused, not read as all M rows; so is a zero length
    for lengths in ((30, 31), (0, 30)):
        msg = rf"^lengths must lie in \[1, M=30\], got min {min(lengths)} max {max(lengths)}$"
        with pytest.raises(ConfigError, match=msg):
            ops.manifold_correct(x, patch, g, k=10, d=3, lengths=torch.tensor(lengths))
        with pytest.raises(ConfigError, match=msg):
            ops.manifold_pull(x, patch, k=10, d=3, lengths=torch.tensor(lengths))
    with pytest.raises(ConfigError, match="d must be"):
        ops.manifold_correct(x, patch, g, k=10, d=10)
    with pytest.raises(ConfigError, match="g must have"):
        ops.manifold_correct(x, patch, g[:1], k=10, d=3)
    with pytest.raises(BackendError, match="triton"):
        ops.manifold_correct(x, patch, g, k=10, d=3, backend="triton")
    with pytest.raises(ConfigError, match="backend"):
        ops.manifold_pull(x, patch, backend="cuda")
    with pytest.raises(ConfigError, match="bandwidth"):
        ops.manifold_pull(x, patch, bandwidth=0.0)
    # k and d: any integer (numpy's, a 0-d integer tensor), not a bool or a float
    import numpy as np
    want = ops.manifold_correct(x, patch, g, k=10, d=3)
    assert torch.equal(ops.manifold_correct(x, patch, g, k=np.int64(10), d=torch.tensor(3)), want)
    for k, d in ((True, 1), (10.0, 3), (10, 2.5)):
        with pytest.raises(ConfigError, match=r"^(k must be an integer >= 2|d must be an integer)"):
            ops.manifold_correct(x, patch, g, k=k, d=d)


def test_builders_take_one_generator_or_one_per_sample():
    modes = torch.randn(2, 8)
    one = ops.official_cloud(modes, 0.1, 0.5, torch.Generator().manual_seed(3), n_points=10)
    g = torch.Generator().manual_seed(3)
    two = ops.official_cloud(modes, 0.1, 0.5, [g, g], n_points=10)
    assert torch.equal(one, two)
    with pytest.raises(ConfigError, match="generators"):
        ops.official_cloud(modes, 0.1, 0.5, [g], n_points=10)


def test_forced_reference_backend_imports_no_kernel():
    """ARCHITECTURE: the reference path never imports a kernel, the counter-based noise included."""
    import subprocess
    import sys

    code = """
import sys, torch
from manifoldgd_fast import ops
x, m, g = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64)
z = torch.randn(30, 64)
order = torch.stack([torch.randperm(30)[:20] for _ in range(2)])
ops.manifold_pull_fused(x, m, radius=0.1, alpha_bar=0.5, seed=1, step=3, n_points=20, k=5, d=2, backend="reference")
ops.manifold_correct_fused(x, z, order, torch.tensor([20, 15]), g, alpha_bar=0.5, seed=1, step=3, k=5, d=2,
                           backend="reference")
print(sorted(n for n in sys.modules if n == "triton" or n.startswith("manifoldgd_fast.kernels")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_knn_ref_ranks_nan_rows_last_and_never_takes_padding():
    """A NaN distance ranks as +inf, as in the fused kernel: a valid NaN row still beats padding past the length."""
    x = torch.zeros(1, 3)
    rows = torch.arange(8 * 3, dtype=torch.float32).view(1, 8, 3) / 10
    rows[0, 1] = float("nan")
    rows[0, 2] = float("nan")
    idx, d2 = ops.knn_rows_ref(x, rows, 5, torch.tensor([5]))
    assert idx.tolist() == [[0, 3, 4, 1, 2]]          # finite first, then the NaN rows by index; rows 5..7 never
    assert torch.isinf(d2[0, 3:]).all()


def test_knn_ref_ties_an_overflowed_distance_with_a_nan_row():
    """A distance that overflows fp32 is +inf, tied with a NaN row (the kernel's rule), not FLT_MAX ahead of it."""
    rows = torch.tensor([[[float("nan"), 0.0], [1.0, 0.0], [2.0, 0.0], [1e20, 0.0]]])
    idx, d2 = ops.knn_rows_ref(torch.zeros(1, 2), rows, 4, torch.tensor([4]))
    assert idx.tolist() == [[1, 2, 0, 3]]
    assert torch.isinf(d2[0, 2:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_neighbours_have_no_tangent_direction(dtype):
    """k identical rows: no variance, so the paper term removes all of g's normal part (P_N g = g) and the pull
    points straight from x to the row. An fp32 mean of equal rows is not exact: its rounding must not become
    a direction."""
    gen = torch.Generator().manual_seed(0)
    D, k = 40, 10
    rows = (torch.randn(1, 1, D, generator=gen) * 3).repeat(1, 16, 1).to(dtype)
    x, g = torch.randn(1, D, generator=gen).to(dtype), torch.randn(1, D, generator=gen).to(dtype)
    got = ops.manifold_correct_ref(x, rows, g, k=k, d=3)
    assert float(got.abs().max()) == 0.0
    pull = ops.manifold_pull_ref(x, rows, k=k, d=3, scale=1.0, bandwidth=0.2)
    u = (rows[:, 0] - x).double()
    want = math.tanh(float(u.norm()) / 0.2) * u / u.norm()
    torch.testing.assert_close(pull.double(), want, atol=1e-6, rtol=0)


def near_plane(D, k, noise, seed):
    """(x (1, D), rows (1, k, D), g (1, D), P (D, D)): k rows on a 2-plane through a point c0 plus ``noise``
    in every direction, x off the plane, and the hand-built projector P = Q Q^T onto the plane."""
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, 2, generator=gen, dtype=torch.float64))[0]      # (D, 2) orthonormal
    c0 = torch.randn(D, generator=gen, dtype=torch.float64)
    rows = c0 + torch.randn(k, 2, generator=gen, dtype=torch.float64) @ Q.T \
        + noise * torch.randn(k, D, generator=gen, dtype=torch.float64)
    x = c0 + torch.randn(D, generator=gen, dtype=torch.float64)
    g = torch.randn(D, generator=gen, dtype=torch.float64)
    return x[None], rows[None], g[None], Q @ Q.T


@pytest.mark.parametrize("noise", [1e-5, 1e-4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_direction_of_noise_variance_is_dropped(dtype, noise):
    """Rows on a 2-plane plus ``noise`` in every direction, d = 3: the third direction's variance (3e-10 / 3e-8
    of the largest) is below the rank rule's 1e-6 x largest, so it projects nothing (else P_T is the plane plus a
    direction of noise). Paper: lambda_N = 1 gives P g; official: the pull is -(I - P)(x - c) / |.|, c the rows'
    mean. Within 10 x noise (the fitted plane tilts by ~noise)."""
    D, k = 16, 12
    x, rows, g, P = near_plane(D, k, noise, seed=1)
    got = ops.manifold_correct_ref(x.to(dtype), rows.to(dtype), g.to(dtype), k=k, d=3)
    torch.testing.assert_close(got.double(), g @ P, atol=10 * noise, rtol=0)
    pull = ops.manifold_pull_ref(x.to(dtype), rows.to(dtype), k=k, d=3, scale=1.0, bandwidth=1.0)
    n = (x - rows.mean(1)) @ (torch.eye(D, dtype=torch.float64) - P)                     # all k rows: c is their mean
    dmin = float((rows[0] - x).norm(dim=1).min())
    torch.testing.assert_close(pull.double(), -math.tanh(dmin) * n / n.norm(), atol=10 * noise, rtol=0)


def test_ragged_order_padding_past_each_length_is_accepted():
    """order may hold padding (-1) past a shorter sample's length: only each sample's own prefix must index latents."""
    from manifoldgd_fast import noise

    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(20, 6, generator=gen)
    order = torch.stack([torch.randperm(20, generator=gen) for _ in range(2)])
    order[1, 12:] = -1
    lengths = torch.tensor([18, 12])
    x, g = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    kw = dict(alpha_bar=0.5, seed=3, step=2, k=4, d=2)
    out = ops.manifold_correct_fused(x, lat, order, lengths, g, backend="reference", **kw)
    patch = noise.time_aligned_patch_philox(lat, order, lengths, 0.5, seed=3, step=2)
    assert torch.isfinite(out).all() and (patch[1, 12:] == 0).all()
    order[1, 3] = -1                                   # inside the length: refused, naming the rule
    with pytest.raises(ConfigError, match="within each sample's length"):
        ops.manifold_correct_fused(x, lat, order, lengths, g, backend="reference", **kw)


def test_auto_on_cuda_says_once_when_the_fused_kernels_decline(monkeypatch):
    """backend auto on CUDA with an input the fused kernels cannot take (e.g. D above their limit) runs the
    reference, far slower: one RuntimeWarning naming why, not a silent fallback."""
    from manifoldgd_fast import dispatch

    monkeypatch.setattr(dispatch, "_kernels", lambda: (object(), None))    # as if Triton imported
    monkeypatch.setattr(dispatch, "_WARNED", set())
    cuda = torch.device("cuda")
    why = "D = 70000 is above the fused kernels' limit 65536"
    with pytest.warns(RuntimeWarning, match=f"guidance ops: {why}; using the PyTorch reference"):
        assert dispatch._pick_backend("auto", cuda, lambda: why) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch._pick_backend("auto", cuda, lambda: why) == "reference"      # once
        assert dispatch._pick_backend("auto", cuda, lambda: None) == "triton"
        assert dispatch._pick_backend("auto", torch.device("cpu"), lambda: why) == "reference"
        # auto never picks the interpreter off CUDA, even for an input the kernels could take
        assert dispatch._pick_backend("auto", torch.device("cpu"), lambda: None) == "reference"
    # the DiT ops say it under their own name, once of their own (it was "guidance ops", and silent after)
    dit_why = "attention: head_dim 300 is above the kernel's 256"
    with pytest.warns(RuntimeWarning, match=f"DiT ops: {dit_why}; using the PyTorch reference"):
        assert dispatch._pick_backend("auto", cuda, lambda: dit_why, "DiT") == "reference"


def test_the_kernels_checks_name_a_tensor_on_another_device():
    """tensors_reason: the first tensor on another device than the first one's is named with both devices."""
    from types import SimpleNamespace

    from manifoldgd_fast import dispatch

    kern = SimpleNamespace(triton_device_ok=lambda dev: True, INTERPRET=False)
    assert dispatch.tensors_reason(kern, {"x": torch.zeros(1), "g": torch.zeros(1, device="meta")}) == \
        "g is on meta but x is on cpu"
    assert dispatch.tensors_reason(kern, {"x": torch.zeros(1), "g": torch.zeros(1)}) is None
    assert dispatch.tensors_reason(kern, {"x": torch.zeros(1, dtype=torch.float64)}) == \
        "x has dtype torch.float64; the Triton kernels take float32, bfloat16 or float16"


# ---------------------------------------------------------------------------- found by an API audit (2026-12-07)
def _fused_inputs():
    g = torch.Generator().manual_seed(0)
    x, g_, eps = (torch.randn(3, 16, generator=g) for _ in range(3))
    latents = torch.randn(40, 16, generator=g)
    order = torch.stack([torch.randperm(40, generator=g) for _ in range(3)])
    return x, latents, order, torch.tensor([10, 12, 14]), g_, eps


def test_what_was_truncated_or_taken_for_an_int_is_refused():
    """Float lengths were truncated (5.9 -> 5, the same result as 5), a bool seed / step / order / sample_ids
    was taken as 1 or as rows 0 and 1, and lambda_mode went unchecked (NaN gave an all-NaN eps): each is a
    one-line ConfigError naming it."""
    X, P, gv = torch.randn(3, 16), torch.randn(3, 20, 16), torch.randn(3, 16)
    for op in (lambda **kw: ops.manifold_correct(X, P, gv, k=5, d=2, **kw),
               lambda **kw: ops.manifold_pull(X, P, k=5, d=2, **kw)):
        with pytest.raises(ConfigError, match=r"^lengths must be integers, got torch.float32$"):
            op(lengths=torch.tensor([5.9, 6.9, 7.9]))
        with pytest.raises(ConfigError, match=r"^lengths must be integers, got torch.bool$"):
            op(lengths=torch.tensor([True, True, True]))
    x, latents, order, lengths, g, eps = _fused_inputs()

    def fused(**kw):
        args = dict(x=x, latents=latents, order=order, lengths=lengths, g=g, alpha_bar=0.5, seed=1, step=3, k=5,
                    d=2, eps=eps)
        args.update(kw)
        return ops.manifold_correct_fused(args.pop("x"), args.pop("latents"), args.pop("order"),
                                          args.pop("lengths"), args.pop("g"), **args)

    fused()  # (the valid call runs)
    for kw, says in ((dict(seed=True), r"^seed must be an int"), (dict(step=True), r"^step must be an int"),
                     (dict(order=order > 20), r"^order must be \(B, n_order\) integers"),
                     (dict(sample_ids=torch.tensor([True, False, True])), r"^sample_ids must be \(B,\)"),
                     (dict(lengths=lengths.float() + 0.5), r"^lengths must be integers"),
                     (dict(lambda_mode=float("nan")), r"^lambda_mode must be a finite number >= 0, got nan$"),
                     (dict(lambda_mode=-1.0), r"^lambda_mode must be a finite number >= 0"),
                     (dict(alpha_bar="0.5x"), r"^alpha_bar must be a number in \(0, 1\], got '0.5x'$"),
                     (dict(g=None), r"^g must be a torch.Tensor, got NoneType$"),
                     (dict(x=x.tolist()), r"^x must be a torch.Tensor, got list$")):
        with pytest.raises(ConfigError, match=says):
            fused(**kw)
    with pytest.raises(ConfigError, match=r"^order must be \(B, n_order\) integers"):
        ops.time_aligned_patch(latents, order > 20, lengths, 0.5, torch.Generator())
    with pytest.raises(ConfigError, match=r"^generators must be one torch.Generator or a list of B=3, got NoneType$"):
        ops.time_aligned_patch(latents, order, lengths, 0.5, None)
    with pytest.raises(ConfigError, match=r"^g must be a torch.Tensor, got NoneType$"):
        ops.manifold_correct(X, P, None, k=5, d=2)
    with pytest.raises(ConfigError, match=r"^modes must be a torch.Tensor, got NoneType$"):
        ops.manifold_pull_fused(x, None, radius=0.1, alpha_bar=0.5, seed=0, step=0, n_points=30, k=5, d=2)


def test_official_cloud_checks_its_arguments():
    """official_cloud took a NaN radius or alpha_bar (an all-NaN cloud), and failed on the others with
    'math domain error', 'too many values to unpack' or torch's linspace error."""
    modes = torch.randn(3, 16)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for args, kw, says in (((float("nan"), 0.5), {}, r"^radius must be a finite number >= 0, got nan$"),
                           ((0.1, float("nan")), {}, r"^alpha_bar must be a number in \[0, 1\], got nan$"),
                           ((0.1, 1.5), {}, r"^alpha_bar must be a number in \[0, 1\], got 1.5$"),
                           ((0.1, 0.5), {"n_points": -3}, r"^n_points must be an integer >= 1, got -3$"),
                           ((0.1, 0.5), {"n_points": True}, r"^n_points must be an integer >= 1, got True$")):
        with pytest.raises(ConfigError, match=says):
            ops.official_cloud(modes, *args, gens, **kw)
    with pytest.raises(ConfigError, match=r"^modes must be \(B, D\), got shape \(3, 4, 2, 2\)$"):
        ops.official_cloud(modes.view(3, 4, 2, 2), 0.1, 0.5, gens)
    with pytest.raises(ConfigError, match=r"^radius must be a finite number >= 0, got nan$"):
        ops.official_radius(40, steps=50, t_stop=25, radius=float("nan"))
    assert ops.official_cloud(modes, 0.1, 0.5, gens, n_points=30).shape == (3, 30, 16)


def test_an_empty_batch_gives_an_empty_result():
    """B = 0 failed in the checks ('min(): Expected reduction dim to be specified'); manifold_pull_fused
    already gave (0, D): every op now gives its empty result."""
    X, P, gv = torch.randn(0, 16), torch.randn(0, 20, 16), torch.randn(0, 16)
    assert ops.manifold_correct(X, P, gv, k=5, d=2).shape == (0, 16)
    assert ops.manifold_pull(X, P, k=5, d=2).shape == (0, 16)
    x, latents, order, lengths, g, eps = _fused_inputs()
    out = ops.manifold_correct_fused(x[:0], latents, order[:0], lengths[:0], g[:0], alpha_bar=0.5, seed=1, step=3,
                                     k=5, d=2, eps=eps[:0].double())
    assert out.shape == (0, 16) and out.dtype == torch.float64


def test_x_in_float64_beside_a_float32_cloud_is_computed_in_float64():
    """manifold_pull (and its fused twin) with x in fp64 and the cloud in fp32 failed ('expected scalar type
    Float but found Double'), where manifold_correct computed in the wider type: both do now, and the result
    is the all-fp64 one's to fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    X, P = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(3, 20, 16, generator=g)
    mixed = ops.manifold_pull(X, P, k=5, d=2, backend="reference")
    wide = ops.manifold_pull(X, P.double(), k=5, d=2, backend="reference")
    assert mixed.dtype == torch.float64 and torch.allclose(mixed, wide, rtol=1e-5, atol=1e-7)
    modes = torch.randn(3, 16, generator=g)
    out = ops.manifold_pull_fused(X, modes, radius=0.1, alpha_bar=0.5, seed=0, step=0, n_points=30, k=5,
                                  d=2, backend="reference")
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_official_cloud_takes_a_zero_terminal_snr_step():
    """alpha_bar = 0 (a zero-terminal-SNR schedule's last step) is a cloud of pure noise, not an error."""
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    cloud = ops.official_cloud(torch.randn(2, 8), 0.1, 0.0, gens, n_points=6)
    assert cloud.shape == (2, 6, 8) and torch.isfinite(cloud).all()
    with pytest.raises(ConfigError, match=r"^alpha_bar must be a number in \[0, 1\], got -0.1$"):
        ops.official_cloud(torch.randn(2, 8), 0.1, -0.1, gens)


@pytest.mark.parametrize("twin", ["manifold_correct", "manifold_pull"])
def test_the_reference_twins_check_their_inputs_as_the_ops_do(twin):
    """manifold_correct_ref / manifold_pull_ref ("same signature", in ops.__all__) checked nothing: a list of
    lengths was a TypeError, an int64 g came back truncated, d >= k, bandwidth 0 or a NaN lambda_normal ran
    silently (a Python API audit). They take and refuse what their ops do, with the same messages."""
    torch.manual_seed(0)
    x, rows = torch.randn(3, 6), torch.randn(3, 20, 6)
    op, ref = getattr(ops, twin), getattr(ops, twin + "_ref")
    base = dict(k=4, d=2) if twin == "manifold_correct" else dict(k=4, d=2, scale=0.1, bandwidth=0.1)
    args = (x, rows, torch.randn(3, 6)) if twin == "manifold_correct" else (x, rows)
    lengths = [20, 15, 10]
    want = op(*args, **base, lengths=lengths, backend="reference")
    assert torch.equal(ref(*args, **base, lengths=lengths), want)
    bad = [dict(d=4), dict(d=0), dict(k=30), dict(lengths=[20, 15, 30])]
    bad += [dict(lambda_normal=float("nan"))] if twin == "manifold_correct" else [dict(bandwidth=0.0)]
    for kw in bad:
        with pytest.raises(ConfigError) as want_e:
            op(*args, **{**base, **kw}, backend="reference")
        with pytest.raises(ConfigError) as got_e:
            ref(*args, **{**base, **kw})
        assert str(got_e.value) == str(want_e.value), kw
    if twin == "manifold_correct":
        with pytest.raises(ConfigError, match="^g must be floating point, got torch.int64$"):
            ref(x, rows, torch.ones(3, 6, dtype=torch.long), **base)


def test_time_aligned_patch_takes_no_lengths_as_every_row():
    """lengths=None (as manifold_correct takes it: every row) was torch's 'Could not infer dtype of NoneType'."""
    latents, order = torch.randn(10, 4), torch.stack([torch.randperm(10) for _ in range(2)])
    a = ops.time_aligned_patch(latents, order, None, 0.5, torch.Generator().manual_seed(0))
    b = ops.time_aligned_patch(latents, order, [10, 10], 0.5, torch.Generator().manual_seed(0))
    assert a.shape == (2, 10, 4) and torch.equal(a, b)
