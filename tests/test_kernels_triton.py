"""The fused Triton guidance kernels against the references: kNN, counter noise, Gram + Jacobi, projection,
fused ops. The whole pipeline on every kernel is in ``tests/test_kernels_pipeline_triton.py``.

Where these run: ``tests/triton_helpers.py`` (compiled on a GPU; on the CPU under ``TRITON_INTERPRET=1``,
which ``tests/test_kernels_interpreter.py`` sets in a child pytest: that is how CI checks these numerics).
To run it directly: ``TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_triton.py``. The DiT block
kernels (LayerNorm-modulate, gate-residual, attention) are in ``tests/test_dit_ops_triton.py``.

Small shapes (the interpreter runs one program at a time in NumPy). Tolerances per dtype
are stated where used; index selection and noise are compared exactly.
"""
import math

import pytest
import torch

from manifoldgd_fast import ops
from manifoldgd_fast.errors import BackendError

from conftest import anisotropic, check_eig, check_eig_extremes, eig_test_matrices, requires_cuda
from triton_helpers import DEV, RUNNABLE, TRITON_MARKS, assert_graph_replay_equals_eager
from test_ops import near_plane

pytestmark = TRITON_MARKS

if RUNNABLE:
    from manifoldgd_fast.kernels import cloud as cloud_k
    from manifoldgd_fast.kernels import knn_rows, sym_eig as sym_eig_k, tangent
    from manifoldgd_fast.kernels.row_source import Source

# (dtype, rtol against max|reference|): the kernel and the reference see the same rounded
# inputs and accumulate in fp32 (reference: fp32 + float64 eigen); low-precision outputs
# add one rounding of the result (bf16 ulp 2^-8, fp16 2^-11).
DTYPES = [(torch.float32, 2e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]


def _anisotropic(B, M, D, dtype, seed):
    x, rows, g = anisotropic(B, M, D, dtype, seed)
    return rows.to(DEV), x.to(DEV), g.to(DEV)


def _close(got, want, rtol):
    """Elementwise within rtol x max|want| (the output's own scale: the pull's is 0.1 at most)."""
    assert float(want.abs().max()) > 0, "a reference of zeros checks nothing"
    torch.testing.assert_close(got.double(), want.double(), atol=rtol * float(want.abs().max()), rtol=0)


def _no_near_ties(d2_sorted, k, rel=1e-4):
    """True when the k-th and (k+1)-th distances of every sample are apart (the selected set is stable)."""
    gap = d2_sorted[:, k] - d2_sorted[:, k - 1]
    return bool((gap > rel * d2_sorted[:, k].abs().clamp_min(1e-6)).all())


# ---------------------------------------------------------------------------
# counter-based noise
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 12345, 2 ** 40 + 7, 2 ** 63 - 1])
def test_philox_normal_triton_vs_torch(seed):
    """Same integer stream: normals agree to a few ulp; a value does not depend on D; moments are N(0, 1)."""
    sid = torch.tensor([0, 3, 2 ** 31 + 5], device=DEV)
    a = ops.philox_normal(seed, 5, ops.STREAM_CLOUD_DIR, sid, 9, 130, backend="triton")
    b = ops.philox_normal(seed, 5, ops.STREAM_CLOUD_DIR, sid, 9, 130, backend="reference")
    # GPU transcendentals (approximate log/sin/cos) sit further from torch's than NumPy's do
    torch.testing.assert_close(a, b, atol=1e-6 if DEV == "cpu" else 2e-5, rtol=1e-6 if DEV == "cpu" else 2e-5)
    short = ops.philox_normal(seed, 5, ops.STREAM_CLOUD_DIR, sid, 9, 7, backend="triton")
    assert torch.equal(short, a[:, :, :7])
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 1) < 0.1
    other = ops.philox_normal(seed, 6, ops.STREAM_CLOUD_DIR, sid, 9, 130, backend="triton")
    assert float((other == a).float().mean()) < 1e-3                          # fresh every step, element by element


def test_cloud_radii_kernel_is_exact():
    """The radii kernel and the PyTorch materialisation agree bit for bit (integer stream + one rounding)."""
    sid = torch.tensor([0, 7], device=DEV)
    for N, r in [(300, 0.05), (31, 0.2)]:
        lin = torch.linspace(0.1, r, N // 2, device=DEV)
        got = cloud_k.radii(lin, sid, N, r, 99, 4)
        want = ops.official_cloud_radii(r, seed=99, step=4, n_points=N, sample_ids=sid)
        assert torch.equal(got, want)
        assert float(got[:, N // 2:].max()) < r and float(got[:, N // 2:].min()) >= 0


if RUNNABLE:
    import triton
    import triton.language as tl

    from manifoldgd_fast.kernels.row_source import rows_tile

    @triton.jit
    def _read_rows_kernel(idx_ptr, sid_ptr, out_ptr, src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr, gn_ptr,
                          aux_sb, sqa, sig, seed, step16, D, k, SRC: tl.constexpr, K: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        """out[b, j, :] = row idx[b, j] exactly as every guidance kernel regenerates it (``rows_tile``)."""
        b = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        jj = tl.arange(0, K)
        jmask = jj < k
        rows = tl.load(idx_ptr + b * k + jj, mask=jmask, other=0)
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        p = rows_tile(SRC, b, rows, jmask, d0, cols, cmask, src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr,
                      gn_ptr, aux_sb, sqa, sig, seed, tl.load(sid_ptr + b), step16, BLOCK_D)
        tl.store(out_ptr + (b * k + jj[:, None]) * D + cols[None, :], p, mask=jmask[:, None] & cmask[None, :])


def _read_rows(idx, sid, src, D):
    B, k = idx.shape
    out = torch.full((B, k, D), float("nan"), device=idx.device)
    _read_rows_kernel[(B, triton.cdiv(D, 16))](idx, sid, out, *src.args(), D, k, SRC=src.kind, K=8, BLOCK_D=16)
    return out


def test_in_kernel_noise_is_bit_identical_to_its_materialisation():
    """Rows regenerated inside the kernels (patch xi, cloud g and xi) equal ops.philox_normal(backend='triton').

    Read through ``rows_tile``, the one helper the kNN, Gram and apply kernels read rows with;
    with sqrt(abar) = 0, sigma = 1 the patch row is xi itself, and the cloud row with m = 0, rho = 1,
    |g|^2 := 1 is g (sqrt(abar) = 1, sigma = 0) or xi (sqrt(abar) = 0, sigma = 1).
    """
    B, D, k, n = 3, 37, 5, 40
    seed, step = 2 ** 35 + 11, 9
    sid = torch.tensor([4, 0, 77], device=DEV)
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(B)]).to(DEV)
    pick = torch.arange(B, device=DEV)[:, None], idx                                # rows idx[b, j] of sample b

    lat = torch.randn(n, D, generator=gen).to(DEV)
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(B)]).to(DEV)
    got = _read_rows(idx, sid, Source.patch(lat, order, 0.0, 1.0, seed, step), D)
    xi = ops.philox_normal(seed, step, ops.STREAM_PATCH, sid, n, D, backend="triton")
    assert torch.equal(got, xi[pick])

    rho = torch.ones(B, n, device=DEV)
    gn = torch.ones(B, n, device=DEV)
    for stream, sqa, sig in [(ops.STREAM_CLOUD_DIR, 1.0, 0.0), (ops.STREAM_CLOUD_XI, 0.0, 1.0)]:
        src = Source.cloud(torch.zeros(B, D, device=DEV), rho, gn, sqa, sig, seed, step)
        got = _read_rows(idx, sid, src, D)
        want = ops.philox_normal(seed, step, stream, sid, n, D, backend="triton")[pick]
        assert torch.equal(got, want), stream


# ---------------------------------------------------------------------------
# kNN
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("B,M,D,k,splits", [(1, 23, 16, 10, 1), (3, 50, 37, 10, 2), (2, 131, 7, 12, 3),
                                            (2, 200, 64, 40, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_knn_matches_reference(B, M, D, k, splits, dtype, seed):
    """Index sets (and order) equal where there are no near-ties; ragged lengths; several splits; two draws."""
    rows, x, _ = _anisotropic(B, M, D, dtype, seed=M + seed)
    lengths = torch.tensor([M - (b * 3) % (M - k) for b in range(B)], device=DEV)
    idx, d2 = knn_rows.knn(x, lengths, lengths, k, Source.rows(rows), splits=splits)
    ri, rd = ops.knn_rows_ref(x, rows, min(k + 1, M), lengths)
    assert _no_near_ties(rd, k)
    assert torch.equal(idx, ri[:, :k])
    torch.testing.assert_close(d2, rd[:, :k].float(), atol=1e-5 * float(rd.max()), rtol=1e-5)


def test_knn_ties_go_to_lower_index_and_padding_is_ignored():
    D = 8
    x = torch.zeros(1, D, device=DEV)
    patch = (torch.randn(1, 40, D) * 5 + 20).to(DEV)
    patch[0, 3] = patch[0, 17] = patch[0, 30] = torch.ones(D, device=DEV)   # exact ties, split across chunks
    patch[0, 38] = 0.5                                                       # nearest, but past the length
    idx, _ = knn_rows.knn(x, torch.tensor([38], device=DEV), torch.tensor([0], device=DEV), 3, Source.rows(patch),
                          splits=3)
    assert idx.tolist() == [[3, 17, 30]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_knn_on_the_implicit_patch(dtype):
    """The patch source (latents gathered by order + in-register xi) selects what the materialised patch selects."""
    B, n, D, k = 3, 70, 24, 10
    gen = torch.Generator().manual_seed(1)
    lat = (torch.randn(n, D, generator=gen) * torch.linspace(2, 0.2, D)).to(dtype).to(DEV)
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(B)]).to(DEV)
    lengths = torch.tensor([70, 41, 12], device=DEV)
    x = torch.randn(B, D, generator=gen).to(DEV)
    sid = torch.tensor([5, 1, 9], device=DEV)
    abar = 0.7
    patch = ops.time_aligned_patch_philox(lat, order, lengths, abar, seed=3, step=11, sample_ids=sid)
    src = Source.patch(lat, order, math.sqrt(abar), math.sqrt(1 - abar), 3, 11)
    idx, d2 = knn_rows.knn(x, lengths, sid, k, src, splits=2)
    ri, rd = ops.knn_rows_ref(x, patch, k + 1, lengths)
    assert _no_near_ties(rd, k)
    assert torch.equal(idx, ri[:, :k])
    torch.testing.assert_close(d2, rd[:, :k], atol=1e-4, rtol=1e-5)


def test_knn_on_the_implicit_cloud():
    """Five dot products give the distances of the never-stored cloud; the k chosen points match."""
    B, D, N, k = 2, 40, 80, 12
    modes = torch.randn(B, D).to(DEV)
    x = (modes * 0.8 + 0.3 * torch.randn(B, D).to(DEV))
    sid = torch.tensor([0, 1], device=DEV)
    for abar in (0.9, 0.3):
        cloud = ops.official_cloud_philox(modes, 0.2, abar, seed=8, step=2, n_points=N, sample_ids=sid)
        rho = cloud_k.radii(torch.linspace(0.1, 0.2, N // 2, device=DEV), sid, N, 0.2, 8, 2)
        idx, d2, gn = cloud_k.knn(x, modes, rho, sid, k, math.sqrt(abar), math.sqrt(1 - abar), 8, 2, splits=2)
        ri, rd = ops.knn_rows_ref(x, cloud, k + 1, torch.full((B,), N, device=DEV))
        assert _no_near_ties(rd, k)
        assert torch.equal(idx, ri[:, :k])
        torch.testing.assert_close(d2, rd[:, :k], atol=1e-4 * float(rd.max()), rtol=1e-4)  # expansion: cancellation


# ---------------------------------------------------------------------------
# eigen-step
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [7, 16, 40])
def test_sym_eig_triton_against_float64(n):
    """Batched Jacobi (Triton): ill-conditioned (cond 1e12), repeated eigenvalues, indefinite, odd n.
    fp32 Jacobi reaches ~n eps |A|; plain torch.linalg.eigh in fp32 is at the same level (see
    test_kernels_torch), so the bound is 2e-6 |A| for n <= 16 and 5e-6 above. Under the interpreter
    (~3 s per 64 x 64 matrix) n = 40 runs the repeated-eigenvalue matrix only."""
    A = eig_test_matrices(n, torch.Generator().manual_seed(n))
    pick = [2] if n == 40 and DEV == "cpu" else list(range(A.shape[0]))
    w, V = ops.sym_eig(A[pick].float().to(DEV), backend="triton")
    check_eig(w.cpu(), V.cpu(), A[pick], 2e-6 if n <= 16 else 5e-6, rep=pick.index(2))


def test_external_eigensolver_path_matches_inline():
    """The two-launch path around an external eigensolver (the CUDA C++ one on GPUs) equals the in-kernel Jacobi;
    here the external solver is the standalone Triton kernel."""
    rows, x, g = _anisotropic(2, 50, 37, torch.float32, seed=4)
    lengths = torch.tensor([50, 30], device=DEV)
    src = Source.rows(rows)
    idx, _ = knn_rows.knn(x, lengths, lengths, 10, src)
    for pull in (False, True):
        parts = tangent.gram(x, None if pull else g, idx, lengths, 10, src)
        c0, a0 = tangent.coef(parts, 10, 3, pull=pull, lam=0.7, scale=0.1, bandwidth=0.2)
        c1, a1 = tangent.coef(parts, 10, 3, pull=pull, lam=0.7, scale=0.1, bandwidth=0.2, eig=sym_eig_k.sym_eig)
        torch.testing.assert_close(a1, a0)
        torch.testing.assert_close(c1, c0, atol=1e-5 * float(c0.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("n", [7, 64])   # 64: |A|_F^2 of a largest entry 2^59 overflows fp32 only there
def test_sym_eig_triton_rescales_huge_and_tiny_matrices_and_propagates_nan(n):
    def solve(A):
        w, V = ops.sym_eig(A.float().to(DEV), backend="triton")
        return w.cpu(), V.cpu()

    check_eig_extremes(solve, n, 2e-6 if n <= 16 else 5e-6)


# ---------------------------------------------------------------------------
# the ops with backend="triton"
# ---------------------------------------------------------------------------
SHAPES = [(1, 23, 16), (3, 50, 37), (2, 131, 7)]  # (B, M, D): primes, B = 1, D < k


# a second draw (seed 1) for fp32 only: each case costs ~2 s under the interpreter
CASES = [(sh, *DTYPES[0], seed) for sh in SHAPES for seed in (0, 1)] + [(SHAPES[1], *dt, 0) for dt in DTYPES[1:]]


@pytest.mark.parametrize("shape,dtype,rtol,seed", CASES)
def test_manifold_correct_triton_matches_reference(shape, dtype, rtol, seed):
    B, M, D = shape
    rows, x, g = _anisotropic(B, M, D, dtype, seed=B * M + seed)
    lengths = torch.tensor([M - (b * 3) % (M - 10) for b in range(B)], device=DEV)
    lam = 1.0 if D != 37 else 0.5
    got = ops.manifold_correct(x, rows, g, k=10, d=3, lambda_normal=lam, lengths=lengths, backend="triton")
    want = ops.manifold_correct_ref(x, rows, g, k=10, d=3, lambda_normal=lam, lengths=lengths)
    assert got.dtype == dtype and got.shape == (B, D)
    _close(got, want, rtol)


def _unsaturated_bandwidth(x, rows):
    """A bandwidth b with tanh(delta_min / b) about 0.76 for every sample (a saturated weight of 1 would
    pass a kernel that dropped it)."""
    return float(torch.cdist(x.double()[:, None], rows.double())[:, 0].min(1).values.mean())


PULL_SHAPES = [(1, 23, 16), (2, 60, 37), (3, 131, 7)]  # (B, N, D): B = 1, primes, D < k


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize("shape,dtype,rtol", [(sh, *DTYPES[0]) for sh in PULL_SHAPES] +
                         [(PULL_SHAPES[1], *dt) for dt in DTYPES[1:]])
def test_manifold_pull_triton_matches_reference(shape, dtype, rtol, seed):
    B, N, D = shape
    cloud, x, _ = _anisotropic(B, N, D, dtype, seed=seed)
    bw = _unsaturated_bandwidth(x, cloud)
    weight = torch.tanh(torch.cdist(x.double()[:, None], cloud.double())[:, 0].min(1).values / bw)
    assert 0.2 < float(weight.min()) and float(weight.max()) < 0.99
    got = ops.manifold_pull(x, cloud, k=12, d=3, scale=0.1, bandwidth=bw, backend="triton")
    want = ops.manifold_pull_ref(x, cloud, k=12, d=3, scale=0.1, bandwidth=bw)
    assert got.dtype == dtype
    _close(got, want, rtol)
    assert float(got.float().norm(dim=1).max()) <= 0.1 * (1 + rtol)


def test_projection_properties_triton():
    """lambda_N = 1: the result is P_T g: idempotent, orthogonal to g - r, no longer than g; lambda_N = 0: g exactly."""
    rows, x, g = _anisotropic(1, 60, 48, torch.float32, seed=3)
    r = ops.manifold_correct(x, rows, g, k=10, d=3, backend="triton")
    r2 = ops.manifold_correct(x, rows, r, k=10, d=3, backend="triton")
    torch.testing.assert_close(r2, r, atol=2e-5 * float(r.abs().max()), rtol=1e-4)
    assert abs(float((r * (g - r)).sum())) < 1e-4 * float(g.norm() ** 2)
    assert float(r.norm()) < float(g.norm())
    assert torch.equal(ops.manifold_correct(x, rows, g, k=10, d=3, lambda_normal=0.0, backend="triton"), g)


def test_pull_is_normal_to_an_exact_plane_triton():
    D = 10
    coords = torch.randn(1, 40, 2, generator=torch.Generator().manual_seed(0))
    cloud = torch.zeros(1, 40, D)
    cloud[..., :2] = coords
    x = torch.zeros(1, D)
    x[0, :2] = 0.05
    x[0, 5] = 3.0
    pull = ops.manifold_pull(x.to(DEV), cloud.to(DEV), k=12, d=2, scale=1.0, bandwidth=1.0, backend="triton").cpu()
    unit = pull / pull.norm()
    assert abs(float(unit[0, 5]) + 1.0) < 1e-5 and float(unit[0, :5].abs().max()) < 1e-5


@pytest.mark.parametrize("delta", [1e-3, 1e-4, 0.0])
def test_pull_near_the_tangent_plane_keeps_its_length(delta):
    """x on a plane of rows at a normal offset ``delta``, far from the rows' centre along the plane (|n| << |u|):
    the pull is at most ``scale`` long and matches the reference. |n| from its k x k expansion cancelled there
    (a pull 10^5 times ``scale`` at delta 1e-3, 70 times at 0); now |n| is summed from n itself. At delta 0,
    n is rounding noise in both: only the length is checked there."""
    D = 16
    gen = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(D, 2, generator=gen))[0]                # an exact 2-D plane in R^16
    cloud = (torch.randn(1, 40, 2, generator=gen) * 0.5 + torch.tensor([6.0, -4.0])) @ basis.T
    normal = torch.linalg.qr(torch.cat([basis, torch.randn(D, 1, generator=gen)], 1))[0][:, 2]
    x = (torch.tensor([[4.0, -3.0]]) @ basis.T) + delta * normal
    kw = dict(k=12, d=2, scale=0.1, bandwidth=1.0)
    got = ops.manifold_pull(x.to(DEV), cloud.to(DEV), backend="triton", **kw).cpu()
    want = ops.manifold_pull_ref(x, cloud, **kw)
    assert float(got.norm()) <= 0.1 * (1 + 1e-5), float(got.norm())
    if delta > 0:   # |n| above fp32 rounding of |u|: the reference's direction and length (at 0, n is rounding)
        torch.testing.assert_close(got, want, atol=1e-3 * 0.1, rtol=1e-2)
        assert float((got @ normal)[0]) < -0.99 * float(got.norm())      # along -normal: towards the plane


@pytest.mark.parametrize("offset", [1e2, 1e3])
@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_far_from_its_rows_the_step_keeps_fp32_accuracy(formulation, offset):
    """x at ``offset`` from a tight neighbourhood (spread ~0.8): the Gram is shifted by the nearest row, so
    C G C keeps fp32 accuracy. Shifted by x it lost (offset / spread)^2 eps: 2 % of the paper step at
    offset 100 and 70 % at 1000 (official: 0.2 % and 5 %)."""
    gen = torch.Generator().manual_seed(7)
    B, N, D = 2, 40, 64
    rows = 0.1 * torch.randn(B, N, D, generator=gen)
    x = rows[:, 0] + offset * torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1)
    g = torch.randn(B, D, generator=gen)
    if formulation == "paper":
        got = ops.manifold_correct(x.to(DEV), rows.to(DEV), g.to(DEV), k=10, d=3, backend="triton")
        want = ops.manifold_correct_ref(x.double(), rows.double(), g.double(), k=10, d=3)
    else:
        got = ops.manifold_pull(x.to(DEV), rows.to(DEV), k=10, d=3, scale=1.0, bandwidth=0.2, backend="triton")
        want = ops.manifold_pull_ref(x.double(), rows.double(), k=10, d=3, scale=1.0, bandwidth=0.2)
    err = (got.cpu().double() - want).norm(dim=1) / want.norm(dim=1)
    assert float(err.max()) < 1e-4, err


def test_pull_weight_keeps_its_accuracy_where_tanh_is_small():
    """tanh(delta_min / b) with delta_min / b ~ 1e-4: 1 - 2 / (e^2a + 1) lost eps / a relative (2e-4 here);
    the kernel's series keeps a few ulps, and delta_min is the exact distance to the nearest row."""
    rows, x, _ = _anisotropic(2, 60, 37, torch.float32, seed=11)
    got = ops.manifold_pull(x, rows, k=12, d=3, scale=1.0, bandwidth=1e4, backend="triton")
    want = ops.manifold_pull_ref(x.cpu().double(), rows.cpu().double(), k=12, d=3, scale=1.0, bandwidth=1e4)
    err = (got.cpu().double() - want).norm(dim=1) / want.norm(dim=1)
    assert float(err.max()) < 1e-5, err


@pytest.mark.parametrize("mag", [1e-19, 1e18])
def test_manifold_correct_is_scale_free_triton(mag):
    """Scaling x and the rows together leaves the paper step unchanged: no absolute floor drops the tangent
    directions of a tiny neighbourhood (Gram ~1e-36), and the centring of a huge one (Gram ~4e37) does not
    overflow before the Jacobi's own rescaling."""
    rows, x, g = _anisotropic(1, 16, 16, torch.float32, seed=0)
    got = ops.manifold_correct(x * mag, rows * mag, g, k=10, d=3, backend="triton")
    want = ops.manifold_correct_ref(x.double(), rows.double(), g.double(), k=10, d=3)
    err = float((got.cpu().double() - want).norm() / want.norm())
    assert err < 1e-5, err


def test_identical_rows_have_no_tangent_direction_triton():
    """k equal rows (zero variance): P_N g = g, so lambda_N = 1 leaves nothing, on the kernel as on the reference."""
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(1, 1, 40, generator=gen) * 3).repeat(1, 16, 1).to(DEV)
    x, g = torch.randn(1, 40, generator=gen).to(DEV), torch.randn(1, 40, generator=gen).to(DEV)
    assert float(ops.manifold_correct(x, rows, g, k=10, d=3, backend="triton").abs().max()) == 0.0
    assert float(ops.manifold_correct_ref(x, rows, g, k=10, d=3).abs().max()) == 0.0


@pytest.mark.parametrize("noise", [1e-5, 1e-4])
@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_a_direction_of_noise_variance_is_dropped_triton(formulation, noise):
    """Rows on a 2-plane plus ``noise``, d = 3 (test_ops.near_plane): the third direction's variance (3e-10 /
    3e-8 of the largest, under fp32's resolution) is below the rank rule's 1e-6 x largest and projects nothing;
    kept, its rounding-level eigenpair moved the result by 60 to 5500 x noise here. Against the hand-built projector
    P onto the plane: P g (paper, lambda_N = 1); the pull -(I - P)(x - c) / |.|. Within 10 x noise."""
    D, k = 16, 12
    x, rows, g, P = near_plane(D, k, noise, seed=1)
    xd, rd = x.float().to(DEV), rows.float().to(DEV)
    if formulation == "paper":
        got = ops.manifold_correct(xd, rd, g.float().to(DEV), k=k, d=3, backend="triton")
        want = g @ P
    else:
        got = ops.manifold_pull(xd, rd, k=k, d=3, scale=1.0, bandwidth=1.0, backend="triton")
        n = (x - rows.mean(1)) @ (torch.eye(D, dtype=torch.float64) - P)            # all k rows: c is their mean
        want = -math.tanh(float((rows[0] - x).norm(dim=1).min())) * n / n.norm()
    torch.testing.assert_close(got.cpu().double(), want, atol=10 * noise, rtol=0)


def test_knn_nan_and_overflowed_rows_tie_as_inf():
    """A NaN row and a row whose distance overflows fp32 both rank as +inf, the lower index first, on both sides."""
    rows = torch.tensor([[[float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1e20, 0.0, 0.0]]], device=DEV)
    x, L = torch.zeros(1, 3, device=DEV), torch.tensor([4], device=DEV)
    idx, d2 = knn_rows.knn(x, L, L, 4, Source.rows(rows))
    ri, rd = ops.knn_rows_ref(x, rows, 4, L)
    assert idx.tolist() == ri.tolist() == [[1, 2, 0, 3]]
    assert torch.isinf(d2[0, 2:]).all() and torch.isinf(rd[0, 2:]).all()


# ---------------------------------------------------------------------------
# fused ops: the patch / cloud never stored
# ---------------------------------------------------------------------------
def _close_update(got, want, base, rtol):
    """The fused update ``base + term`` (eps or the posterior mean): its term, got - base, against the
    reference's, relative to the term's own size, plus one rounding of base in the output dtype (the
    update is written in base's dtype). A tolerance on the sum alone would let a kernel drop the term."""
    term_got, term_want = got.double() - base.double(), want.double() - base.double()
    ulp = torch.finfo(got.dtype).eps * float(base.abs().max())
    torch.testing.assert_close(term_got, term_want, atol=rtol * float(term_want.abs().max()) + ulp, rtol=0)
    assert float(term_want.abs().max()) > 4 * (rtol * float(term_want.abs().max()) + ulp)  # the term is visible


# (B, n latents, D, k): the paper step's shapes, B = 1, k past one power of two (17 -> 32 in registers)
FUSED_CORRECT = [(2, 60, 37, 10), (1, 40, 16, 17), (3, 90, 21, 12)]
FUSED_CASES = [(sh, *DTYPES[0], ext, seed) for sh in FUSED_CORRECT for ext in (False, True) for seed in (2, 3)] + \
    [(FUSED_CORRECT[0], *dt, ext, 2) for dt in DTYPES[1:] for ext in (False, True)]


@pytest.mark.parametrize("shape,dtype,rtol,ext,seed", FUSED_CASES)
def test_manifold_correct_fused_matches_reference(shape, dtype, rtol, ext, seed):
    B, n, D, k = shape
    gen = torch.Generator().manual_seed(seed)
    lat = (torch.randn(n, D, generator=gen) * torch.linspace(3, 0.1, D)).to(dtype).to(DEV)
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(B)]).to(DEV)
    lengths = torch.tensor([[n - 5 - 7 * b, 9] for b in range(B)], device=DEV)[:, 0]  # a strided view: its values
    x = torch.randn(B, D, generator=gen).to(dtype).to(DEV)
    g = torch.randn(B, D, generator=gen).to(dtype).to(DEV)
    eps = torch.randn(B, D, generator=gen).to(dtype).to(DEV)
    kw = dict(alpha_bar=0.6, seed=2 ** 40 + 123, step=7, k=k, d=3, lambda_normal=0.8, lambda_mode=0.1)
    e = eps if ext else None                           # the corrected g, or the fused eps update
    if ext:
        kw["lambda_mode"] = 1.0                        # a term well above one bf16 rounding of eps
    got = ops.manifold_correct_fused(x, lat, order, lengths, g, eps=e, backend="triton", **kw)
    want = ops.manifold_correct_fused_ref(x, lat, order, lengths.clone(), g, eps=e, **kw)
    assert got.dtype == dtype
    _close_update(got, want, eps, rtol) if ext else _close(got, want, rtol)


# (B, D, N cloud points, k): the release's N = 300 and the kernels' largest k, 64, among them
FUSED_PULL = [(2, 33, 64, 12), (1, 16, 300, 12), (3, 24, 80, 64)]
FUSED_PULL_CASES = [(sh, *DTYPES[0], ext, seed) for sh in FUSED_PULL for ext in (False, True)   # k = 64: one seed
                    for seed in ((5, 6) if sh[3] < 64 else (5,))] + \
    [(FUSED_PULL[0], *dt, ext, 5) for dt in DTYPES[1:] for ext in (False, True)]


@pytest.mark.parametrize("shape,dtype,rtol,ext,seed", FUSED_PULL_CASES)
def test_manifold_pull_fused_matches_reference(shape, dtype, rtol, ext, seed):
    B, D, N, k = shape
    gen = torch.Generator().manual_seed(seed)
    modes = torch.randn(B, D, generator=gen).to(dtype).to(DEV)
    x = (0.5 * modes.float() + torch.randn(B, D, generator=gen).to(DEV)).to(dtype)
    mean = torch.randn(B, D, generator=gen).to(dtype).to(DEV)
    # bandwidth sqrt(D): the nearest cloud point lies ~0.8 sqrt(D) away at alpha_bar 0.3, so tanh ~ 0.6 (unsaturated)
    kw = dict(radius=0.2, alpha_bar=0.3, seed=seed, step=3, n_points=N, k=k, d=3, scale=0.1, bandwidth=D ** 0.5)
    m = mean if ext else None                          # the term, or the fused posterior-mean update
    if ext:
        kw["scale"] = 1.0                              # a term well above one bf16 rounding of the mean
    got = ops.manifold_pull_fused(x, modes, mean=m, backend="triton", **kw)
    want = ops.manifold_pull_fused_ref(x, modes, mean=m, **kw)
    assert got.dtype == dtype
    _close_update(got, want, mean, rtol) if ext else _close(got, want, rtol)


def test_forced_triton_names_what_it_cannot_take():
    rows, x, g = _anisotropic(2, 30, 16, torch.float32, seed=0)
    with pytest.raises(BackendError, match="x has dtype torch.float64"):
        ops.manifold_correct(x.double(), rows.double(), g.double(), k=10, d=3, backend="triton")
    big = torch.zeros(2, 80, 16, device=DEV)
    with pytest.raises(BackendError, match="k = 65"):
        ops.manifold_pull(x, big, k=65, d=3, backend="triton")
    wide = torch.zeros(1, ops.MAX_D + 4, device=DEV)
    with pytest.raises(BackendError, match="D = 65540 is above the fused kernels' limit 65536"):
        ops.manifold_pull_fused(wide, wide, radius=0.1, alpha_bar=0.5, seed=0, step=0, n_points=16, k=4, d=2,
                                backend="triton")


# ---------------------------------------------------------------------------
# GPU only: full shapes, CUDA C++ eigensolver, graph capture
# ---------------------------------------------------------------------------
@requires_cuda()
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_full_shape_fused_paper_step_gpu(dtype, rtol):
    B, n, D, k = 64, 20_000, 4096, 10
    lat = torch.randn(n, D, device="cuda").to(dtype)
    order = torch.stack([torch.randperm(n, device="cuda") for _ in range(B)])
    lengths = torch.randint(500, 5000, (B,), device="cuda")
    x, g, eps = (torch.randn(B, D, device="cuda").to(dtype) for _ in range(3))
    kw = dict(alpha_bar=0.5, seed=1, step=3, k=k, d=3, lambda_normal=1.0, lambda_mode=0.1)
    got = ops.manifold_correct_fused(x, lat, order, lengths, g, eps=eps, backend="triton", **kw)
    want = ops.manifold_correct_fused_ref(x, lat, order, lengths, g, eps=eps, **kw)
    _close(got, want, rtol)


def _official_bandwidth(x, modes, kw):
    """An unsaturated bandwidth for the official term on the materialised cloud (at b = 0.1, delta_min ~ sqrt(D)
    saturates tanh and a kernel that dropped the weight would pass), and whether its kNN has no near-tie."""
    cloud = ops.official_cloud_philox(modes, kw["radius"], kw["alpha_bar"], seed=kw["seed"], step=kw["step"],
                                      n_points=kw["n_points"])
    d2 = torch.cdist(x.double()[:, None], cloud.double())[:, 0] ** 2
    # apart by 1e-6 relative: some 16 fp32 ulps (at D = 65,536 the points crowd: 1.4e-5 apart in the SD test)
    return _unsaturated_bandwidth(x, cloud), _no_near_ties(d2.sort(1).values, kw["k"], rel=1e-6)


@requires_cuda()
def test_full_shape_fused_official_step_gpu():
    B, D = 128, 4096
    gen = torch.Generator().manual_seed(4)
    modes = torch.randn(B, D, generator=gen).cuda()
    x = torch.randn(B, D, generator=gen).cuda()
    kw = dict(radius=0.1, alpha_bar=0.4, seed=2, step=40, n_points=300, k=12, d=3, scale=0.1)
    bw, stable = _official_bandwidth(x, modes, kw)
    assert stable, "a near-tie at the k-th neighbour: pick another seed"
    kw["bandwidth"] = bw
    _close(ops.manifold_pull_fused(x, modes, backend="triton", **kw), ops.manifold_pull_fused_ref(x, modes, **kw), 2e-4)


@requires_cuda()
@pytest.mark.parametrize("n", [10, 33, 64])
def test_sym_eig_cuda_cpp_against_float64(n):
    from manifoldgd_fast.kernels import cuda_ext

    mod, reason = cuda_ext.load()
    if mod is None:
        pytest.skip(f"CUDA C++ eigensolver not built here: {reason}")
    A = eig_test_matrices(n, torch.Generator().manual_seed(n))
    w, V = ops.sym_eig(A.float().cuda(), backend="cuda")
    check_eig(w.cpu(), V.cpu(), A, 2e-6 if n <= 16 else 5e-6)


@requires_cuda()
def test_fused_step_captures_in_a_cuda_graph():
    B, n, D = 8, 2000, 1024
    lat = torch.randn(n, D, device="cuda")
    order = torch.stack([torch.randperm(n, device="cuda") for _ in range(B)])
    lengths = torch.full((B,), 1500, device="cuda")
    sid = torch.arange(B, device="cuda")
    x, g = torch.randn(B, D, device="cuda"), torch.randn(B, D, device="cuda")
    eig = ops._eig_backend(x.device)

    def step():
        return torch.ops.manifoldgd_fast.manifold_correct_fused(x, lat, order, lengths, g, sid, None, 0.5, 1, 3, 10, 3,
                                                                1.0, 0.1, eig)

    assert_graph_replay_equals_eager(step)


@pytest.mark.parametrize("side", [64, 128], ids=["sd-512px", "max-1024px"])
@pytest.mark.parametrize("formulation", ["paper", "official"])
def test_fused_ops_at_sd_widths(formulation, side):
    """D = 4 x side^2: Stable Diffusion's latents at 512 px (16,384) and the widest D the kernels take
    (65,536, 1024 px; SD 2.x at 768 px, 36,864, lies between)."""
    B, n, D = 1, 24, 4 * side * side
    if side == 128:
        assert D == ops.MAX_D
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(B, D, generator=gen).to(DEV)
    if formulation == "paper":
        lat = (torch.randn(n, D, generator=gen) * torch.linspace(2, 0.1, D)).to(DEV)
        order = torch.randperm(n, generator=gen)[None].to(DEV)
        lengths = torch.tensor([n], device=DEV)
        g = torch.randn(B, D, generator=gen).to(DEV)
        kw = dict(alpha_bar=0.5, seed=3, step=4, k=10, d=3, lambda_normal=1.0)
        got = ops.manifold_correct_fused(x, lat, order, lengths, g, backend="triton", **kw)
        want = ops.manifold_correct_fused_ref(x, lat, order, lengths, g, **kw)
    else:
        modes = torch.randn(B, D, generator=gen).to(DEV)
        kw = dict(radius=0.1, alpha_bar=0.5, seed=3, step=4, n_points=n, k=12, d=3, scale=0.1)
        kw["bandwidth"], stable = _official_bandwidth(x, modes, kw)
        assert stable, "a near-tie at the k-th neighbour: pick another seed"
        got = ops.manifold_pull_fused(x, modes, backend="triton", **kw)
        want = ops.manifold_pull_fused_ref(x, modes, **kw)
    assert got.shape == (B, D)
    _close(got, want, DTYPES[0][1])
