"""The parts of the fused path that need no Triton: Philox reference, the PyTorch Jacobi, materialisers,
dispatch, torch.library registration, and importing without Triton."""
import math

import pytest
import torch

from manifoldgd_fast import kernels, ops
from manifoldgd_fast.errors import BackendError, ConfigError
from manifoldgd_fast.kernels import INTERPRET
from manifoldgd_fast.kernels import sym_eig_torch

from conftest import check_eig_extremes, run_without_triton


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (also what Triton's tl.random.philox computes)."""
    z = torch.zeros(1, dtype=torch.long)
    assert [int(v) for v in ops.philox4x32_ref(0, z, z, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF)
    assert [int(v) for v in ops.philox4x32_ref(2 ** 64 - 1, f, f, f, f)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                                             0x6D5451FD]
    pi = [torch.tensor([v]) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    assert [int(v) for v in ops.philox4x32_ref(0xA4093822 | (0x299F31D0 << 32), *pi)] == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _counter_block(seed, c0, c1, c2, c3):
    one = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    return [int(v) for v in ops.philox4x32_ref(seed, one(c0), one(c1), one(c2), one(c3))]


def _uniform(r):
    """Triton's uint_to_uniform_float, written out: r as int32, a negative one bit-flipped, times 2^-31."""
    return float(torch.tensor((r ^ 0xFFFFFFFF) if r >= 2 ** 31 else r, dtype=torch.float32)
                 * torch.tensor(4.6566127342e-10, dtype=torch.float32))


def test_philox_counter_fields_are_held_to_their_widths():
    """A sample id past 32 bits would wrap onto id 0's noise, a stream past 15 onto the next step's stream 0,
    a seed past 63 bits onto another seed: each refused in one line."""
    from manifoldgd_fast.noise import philox_normal

    for kw, msg in [(dict(sample_ids=torch.tensor([2 ** 32])), r"sample_ids must lie in \[0, 2\^32\)"),
                    (dict(sample_ids=torch.tensor([-1])), r"sample_ids must lie in \[0, 2\^32\)"),
                    (dict(stream=16), r"stream must be in \[0, 16\), got 16"),
                    (dict(seed=2 ** 63), r"seed must be an int in \[0, 2\^63\)"),
                    (dict(step=2 ** 28), r"step must be an int in \[0, 2\^28\)")]:
        args = {**dict(seed=0, step=0, stream=0, sample_ids=torch.arange(1), n_rows=1, D=4, backend="reference"), **kw}
        with pytest.raises(ConfigError, match=msg):
            philox_normal(**args)


def test_the_official_clouds_diffusion_noise_is_its_own_stream():
    """At abar < 1 the cloud point is sqrt(abar) (m + rho u) + sqrt(1 - abar) xi with xi from stream 3,
    independent of the direction stream 1 (at abar = 1, which the other tests use, xi never shows)."""
    from manifoldgd_fast.noise import (STREAM_CLOUD_DIR, STREAM_CLOUD_XI, official_cloud_philox,
                                       official_cloud_radii, philox_normal_ref)

    B, N, D, seed, step = 2, 6, 8, 5, 3
    ids = torch.tensor([4, 9])
    modes = torch.randn(B, D, generator=torch.Generator().manual_seed(0))
    got = official_cloud_philox(modes, 2.0, 0.36, seed=seed, step=step, n_points=N, sample_ids=ids, backend="reference")
    g = philox_normal_ref(seed, step, STREAM_CLOUD_DIR, ids, N, D)
    rho = official_cloud_radii(2.0, seed=seed, step=step, n_points=N, sample_ids=ids)
    xi = philox_normal_ref(seed, step, STREAM_CLOUD_XI, ids, N, D)
    want = 0.6 * (modes[:, None] + rho[..., None] * g / g.norm(dim=2, keepdim=True)) + 0.8 * xi
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert STREAM_CLOUD_XI != STREAM_CLOUD_DIR


def test_philox_counters_are_column_quad_row_sample_step_and_stream():
    """The counter of normal (sample id s, row j, column 4q + k) is (q, j, s, step * 16 + stream), keyed by
    the seed (the issue's layout): r0, r1 and r2, r3 go through Box-Muller to columns 4q, 4q + 1 and
    4q + 2, 4q + 3 (cos, sin). A cloud radius j >= N // 2 is radius * U of row j, stream 2, column 0."""
    seed, step, sid = 123456789, 7, torch.tensor([5, 42])
    a = ops.philox_normal_ref(seed, step, ops.STREAM_CLOUD_XI, sid, 6, 11)
    for b, j, q in [(0, 0, 0), (1, 4, 2), (0, 5, 1)]:
        r = _counter_block(seed, q, j, int(sid[b]), step * 16 + ops.STREAM_CLOUD_XI)
        for pair, (r_a, r_b) in enumerate(((r[0], r[1]), (r[2], r[3]))):
            u1, u2 = max(_uniform(r_a), 1e-7), _uniform(r_b)
            rad, th = math.sqrt(-2 * math.log(u1)), 2 * math.pi * u2
            for k, want in enumerate((rad * math.cos(th), rad * math.sin(th))):
                col = 4 * q + 2 * pair + k
                if col < 11:
                    assert float(a[b, j, col]) == pytest.approx(want, rel=1e-5, abs=1e-5), (b, j, col)
    from manifoldgd_fast.noise import official_cloud_radii

    radii = official_cloud_radii(0.5, seed=seed, step=step, n_points=10, sample_ids=sid)
    for b in range(2):
        for j in range(5, 10):
            u = _uniform(_counter_block(seed, 0, j, int(sid[b]), step * 16 + ops.STREAM_CLOUD_RADIUS)[0])
            assert float(radii[b, j]) == pytest.approx(0.5 * u, rel=1e-6), (b, j)


def test_philox_sample_id_is_the_whole_32_bit_counter_word():
    """Global sample ids reach 2^16 (ImageNet-1k at IPC 100 numbers 100,000 samples): the reference must put all
    32 bits of the id in c2, as the kernels do (an id cut to fewer bits gives two samples the same noise, and the
    reference and the kernels would disagree only past the small ids the other tests use)."""
    seed, step = 99, 4
    sid = torch.tensor([7, 7 + 2 ** 16, 7 + 2 ** 24, 2 ** 32 - 1])
    a = ops.philox_normal_ref(seed, step, ops.STREAM_PATCH, sid, 2, 4)
    u = ops.philox_uniform_ref(seed, step, ops.STREAM_CLOUD_RADIUS, sid, 2)
    for b in range(4):
        r = _counter_block(seed, 0, 1, int(sid[b]), step * 16 + ops.STREAM_PATCH)
        rad = math.sqrt(-2 * math.log(max(_uniform(r[0]), 1e-7)))
        assert float(a[b, 1, 0]) == pytest.approx(rad * math.cos(2 * math.pi * _uniform(r[1])), rel=1e-5, abs=1e-5), b
        r = _counter_block(seed, 0, 1, int(sid[b]), step * 16 + ops.STREAM_CLOUD_RADIUS)
        assert float(u[b, 1]) == _uniform(r[0]), b
    assert len({tuple(v.tolist()) for v in a.flatten(1)}) == 4                # four ids, four different draws


def test_philox_uniform_zero_gives_tritons_clamped_normal():
    """A Philox word of 0 or 2^32 - 1 is the uniform 0 (Triton's uint_to_uniform_float), which Box-Muller clamps
    to 1e-7 as Triton's pair_uniform_to_normal does: radius sqrt(-2 ln 1e-7) = 5.68, not inf or another clamp's
    value (one normal in 2^31, where the reference would leave the kernels' noise)."""
    from manifoldgd_fast.noise import _box_muller, _unit_float

    u = _unit_float(torch.tensor([0, 2 ** 32 - 1, 2 ** 31 - 1]))
    assert u[:2].tolist() == [0.0, 0.0] and float(u[2]) < 1.0
    n0, n1 = _box_muller(u[:2], torch.tensor([0.0, 0.25]))
    r = math.sqrt(-2 * math.log(float(torch.tensor(1e-7, dtype=torch.float32))))
    assert float(n0[0]) == pytest.approx(r, rel=1e-6) and float(n1[0]) == 0.0
    assert float(n1[1]) == pytest.approx(r, rel=1e-6) and abs(float(n0[1])) < 1e-5


def test_philox_normal_reference_layout():
    """A value depends on (seed, step, stream, sample, row, col) only: not on D, rows drawn or the batch."""
    sid = torch.tensor([3, 9])
    a = ops.philox_normal_ref(7, 2, ops.STREAM_PATCH, sid, 50, 33)
    assert torch.equal(ops.philox_normal_ref(7, 2, ops.STREAM_PATCH, sid, 20, 5), a[:, :20, :5])
    assert torch.equal(ops.philox_normal_ref(7, 2, ops.STREAM_PATCH, sid[1:], 50, 33), a[1:])
    for other in (ops.philox_normal_ref(8, 2, 0, sid, 50, 33), ops.philox_normal_ref(7, 3, 0, sid, 50, 33),
                  ops.philox_normal_ref(7, 2, 3, sid, 50, 33)):
        assert float((other - a).abs().mean()) > 0.5                    # a different stream, not a shifted copy
    big = ops.philox_normal_ref(11, 0, 0, torch.arange(4), 256, 256)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    assert abs(float((big ** 4).mean()) - 3) < 0.1                     # Gaussian kurtosis
    u = ops.philox_uniform_ref(11, 0, 2, torch.arange(4), 5000)
    assert float(u.min()) >= 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def _spectrum_cases(n, gen):
    X = torch.randn(n, n, generator=gen, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    ill = Q @ torch.diag(torch.logspace(0, -12, n, dtype=torch.float64)) @ Q.T
    m = min(3, n)
    rep = Q @ torch.diag(torch.tensor([3.0] * m + [1e-3] * (n - m), dtype=torch.float64)) @ Q.T
    return torch.stack([X @ X.T, ill, rep, (X + X.T) / 2])


@pytest.mark.parametrize("n", [1, 2, 5, 10, 16, 33, 64])
def test_torch_jacobi_against_float64(n):
    """The portable Jacobi: eigenvalues within ~2x plain fp32 eigh's error (+ 1e-7 |A| slack), orthonormal
    eigenvectors, and the repeated eigenvalue's 3-dim invariant subspace as a projector."""
    A = _spectrum_cases(n, torch.Generator().manual_seed(n))
    w, V = sym_eig_torch.jacobi_eigh(A.float())
    wr, Vr = ops.sym_eig_ref(A)
    nrm = wr.abs().max(1).values
    err = (w.double() - wr).abs().max(1).values / nrm
    w32 = torch.linalg.eigvalsh(A.float()).flip(-1).double()
    err32 = (w32 - wr).abs().max(1).values / nrm
    assert bool((err <= 2 * err32 + 1e-7 * max(1, n / 8)).all()), (err, err32)
    Vd = V.double()
    assert float((Vd.transpose(1, 2) @ Vd - torch.eye(n, dtype=torch.float64)).abs().max()) < 2e-6
    res = (A @ Vd - Vd * w.double()[:, None, :]).norm(dim=1).max(1).values / nrm
    assert float(res.max()) < 5e-6
    if n > 3:
        P, Pr = Vd[2, :, :3] @ Vd[2, :, :3].T, Vr[2, :, :3] @ Vr[2, :, :3].T
        assert float((P - Pr).abs().max()) < 1e-5
    # float64 input: the same algorithm at float64 accuracy
    w64, _ = sym_eig_torch.jacobi_eigh(A)
    assert float(((w64 - wr).abs().max(1).values / nrm).max()) < 1e-12


@pytest.mark.parametrize("n", [3, 8])
def test_sym_eig_uses_the_symmetric_part_of_an_asymmetric_matrix(n):
    """sym_eig's contract: only A's symmetric part (A + A^T) / 2 is used. Every other test passes exactly symmetric
    matrices, so a reference reading one triangle (eigh's default) or a Jacobi rotating the raw A passed. Checked
    against numpy's float64 eigh of the symmetric part, for the float64 reference and the PyTorch Jacobi."""
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(n, n, generator=gen, dtype=torch.float64)
    S, K = X @ X.T / n, torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = (S + (K - K.T))[None]                                            # symmetric part S, a large skew part
    want = np.linalg.eigvalsh(S.numpy())[::-1].copy()
    Pw = np.linalg.eigh(S.numpy())[1][:, ::-1][:, :2]
    for backend, tol in [("reference", 1e-12), ("torch", 1e-5)]:
        w, V = ops.sym_eig(A if backend == "reference" else A.float(), backend=backend)
        assert float(np.abs(w[0].double().numpy() - want).max()) < tol * float(want.max()), backend
        Vn = V[0, :, :2].double().numpy()
        assert float(np.abs(Vn @ Vn.T - Pw @ Pw.T).max()) < 100 * tol, backend   # the top-2 subspace


@pytest.mark.parametrize("triton_there", [True, False])
def test_eig_chain_warns_naming_the_solver_it_falls_back_to(monkeypatch, triton_there):
    """Without the CUDA C++ solver the chain says why, once, and names the solver it really uses (it always
    said "the Triton Jacobi", also where the chain ended at PyTorch's)."""
    from manifoldgd_fast import dispatch
    from manifoldgd_fast.kernels import cuda_ext

    monkeypatch.delenv("MANIFOLDGD_NO_CUDA_EXT", raising=False)
    monkeypatch.setattr(cuda_ext, "load", lambda: (None, "nvcc: no CUDA toolkit; nvrtc: no CuPy"))
    kern = type("Kernels", (), {"triton_device_ok": staticmethod(lambda device: True)})
    monkeypatch.setattr(dispatch, "_kernels", lambda: (kern, None) if triton_there else (None, "no Triton"))
    monkeypatch.setattr(dispatch, "_WARNED", set())
    dispatch._eig_backend.cache_clear()
    try:
        with pytest.warns(RuntimeWarning) as got:
            assert dispatch._eig_backend(torch.device("cuda", 7)) == ("triton" if triton_there else "torch")
    finally:
        dispatch._eig_backend.cache_clear()
    want = "Triton" if triton_there else "PyTorch"
    assert [str(w.message) for w in got] == [f"CUDA C++ eigensolver unavailable (nvcc: no CUDA toolkit; nvrtc: no "
                                             f"CuPy); using the {want} Jacobi"]


def test_sym_eig_dispatch_and_checks():
    A = _spectrum_cases(6, torch.Generator().manual_seed(0)).float()
    w, V = ops.sym_eig(A, backend="torch")
    wr, _ = ops.sym_eig_ref(A)
    torch.testing.assert_close(w.double(), wr, atol=1e-5, rtol=1e-5)
    assert ops.sym_eig(A, backend="reference")[0].dtype == torch.float64
    if not torch.cuda.is_available():
        assert ops._eig_backend(torch.device("cpu")) == ("triton" if INTERPRET else "torch")
        with pytest.raises(BackendError, match="CUDA"):
            ops.sym_eig(A, backend="cuda")
    with pytest.raises(ConfigError, match="n <= 64"):
        ops.sym_eig(torch.zeros(2, 65, 65))
    with pytest.raises(ConfigError, match="backend"):
        ops.sym_eig(A, backend="lapack")


def test_materialisers():
    """abar = 1: the patch is the latents (zero past each length); the cloud sits at rho from the mode."""
    n, D = 30, 12
    lat = torch.randn(n, D)
    order = torch.stack([torch.randperm(n), torch.randperm(n)])
    lengths = torch.tensor([7, 20])
    p = ops.time_aligned_patch_philox(lat, order, lengths, 1.0, seed=1, step=0)
    assert p.shape == (2, 20, D)
    assert torch.equal(p[0, :7], lat[order[0, :7]]) and torch.equal(p[0, 7:], torch.zeros(13, D))
    noisy = ops.time_aligned_patch_philox(lat, order, lengths, 0.25, seed=1, step=0, backend="reference")
    xi = ops.philox_normal_ref(1, 0, ops.STREAM_PATCH, torch.arange(2), 20, D)
    torch.testing.assert_close(noisy[1], 0.5 * lat[order[1, :20]] + math.sqrt(0.75) * xi[1])
    modes = torch.randn(2, D)
    cl = ops.official_cloud_philox(modes, 0.05, 1.0, seed=4, step=9, n_points=300, backend="reference")
    dist = (cl - modes[:, None]).norm(dim=2)
    torch.testing.assert_close(dist[:, :150], torch.linspace(0.1, 0.05, 150).expand(2, -1), atol=1e-5, rtol=1e-5)
    assert float(dist[:, 150:].max()) <= 0.05 + 1e-6
    again = ops.official_cloud_philox(modes, 0.05, 1.0, seed=4, step=9, n_points=300, backend="reference")
    assert torch.equal(cl, again)
    other_step = ops.official_cloud_philox(modes, 0.05, 1.0, seed=4, step=10, n_points=300, backend="reference")
    assert not torch.equal(cl, other_step)                                  # fresh every step


@pytest.mark.parametrize("abar", [0.3, 0.8])      # not 0.5, where sqrt(abar) = sqrt(1 - abar)
def test_fused_references_compose_the_existing_ones(abar):
    """The fused eps update is eps - lambda_M sqrt(1 - abar) g_corrected (SPEC 4.5); the fused mean update is
    mean + the pull term."""
    n, D, B = 40, 16, 2
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(n, D, generator=gen)
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(B)])
    lengths = torch.tensor([40, 25])
    x, g, eps = (torch.randn(B, D, generator=gen) for _ in range(3))
    kw = dict(alpha_bar=abar, seed=3, step=1, k=10, d=3)
    assert torch.equal(ops.manifold_correct_fused(x, lat, order, lengths, g, lambda_normal=0.0, **kw), g)
    gc = ops.manifold_correct_fused(x, lat, order, lengths, g, **kw)
    e = ops.manifold_correct_fused(x, lat, order, lengths, g, eps=eps, lambda_mode=0.1, **kw)
    torch.testing.assert_close(e, eps - 0.1 * math.sqrt(1 - abar) * gc)
    modes = torch.randn(B, D, generator=gen)
    pk = dict(radius=0.1, alpha_bar=abar, seed=2, step=0, n_points=50, k=12, d=3, bandwidth=0.2)
    term = ops.manifold_pull_fused(x, modes, **pk)
    torch.testing.assert_close(ops.manifold_pull_fused(x, modes, mean=eps, **pk), eps + term)
    assert float(term.norm(dim=1).max()) <= 0.1 + 1e-6


@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="here backend='triton' can take CPU/CUDA tensors")
@pytest.mark.skipif(not kernels.HAVE_TRITON, reason=f"the kernels are not offered at all here: "
                                                  f"{kernels.WHY_NO_TRITON}")
def test_forced_triton_on_cpu_names_the_device():
    x, patch, g = torch.randn(2, 16), torch.randn(2, 30, 16), torch.randn(2, 16)
    with pytest.raises(BackendError, match="x is on cpu.*TRITON_INTERPRET=1"):
        ops.manifold_correct(x, patch, g, k=10, d=3, backend="triton")
    lat, order = torch.randn(30, 16), torch.stack([torch.randperm(30)] * 2)
    with pytest.raises(BackendError, match="x is on cpu"):
        ops.manifold_correct_fused(x, lat, order, torch.tensor([30, 30]), g, alpha_bar=0.5, seed=0, step=0, k=10,
                                   d=3, backend="triton")
    with pytest.raises(BackendError, match="x is on cpu"):
        ops.manifold_pull_fused(x, torch.randn(2, 16), radius=0.1, alpha_bar=0.5, seed=0, step=0, backend="triton")
    # auto on the CPU is the reference, bit for bit
    assert torch.equal(ops.manifold_correct(x, patch, g, k=10, d=3),
                       ops.manifold_correct_ref(x, patch, g, k=10, d=3))


def test_fused_ops_check_their_inputs():
    x, g = torch.randn(2, 16), torch.randn(2, 16)
    lat, order = torch.randn(30, 16), torch.stack([torch.randperm(30)] * 2)
    kw = dict(alpha_bar=0.5, seed=0, step=0, k=10, d=3)
    with pytest.raises(ConfigError, match="latents must be"):
        ops.manifold_correct_fused(x, lat[:, :15], order, torch.tensor([30, 30]), g, **kw)
    with pytest.raises(ConfigError, match="larger than the patch"):
        ops.manifold_correct_fused(x, lat, order, torch.tensor([30, 9]), g, **kw)
    with pytest.raises(ConfigError, match="order must index"):
        ops.manifold_correct_fused(x, lat[:20], order, torch.tensor([30, 30]), g, **kw)
    with pytest.raises(ConfigError, match="seed"):
        ops.manifold_correct_fused(x, lat, order, torch.tensor([30, 30]), g, **{**kw, "seed": -1})
    with pytest.raises(ConfigError, match="step"):
        ops.manifold_pull_fused(x, x, radius=0.1, alpha_bar=0.5, seed=0, step=2 ** 28)
    with pytest.raises(ConfigError, match="alpha_bar"):
        ops.manifold_pull_fused(x, x, radius=0.1, alpha_bar=0.0, seed=0, step=0)
    with pytest.raises(ConfigError, match="n_points"):
        ops.manifold_pull_fused(x, x, radius=0.1, alpha_bar=0.5, seed=0, step=0, n_points=5)
    with pytest.raises(ConfigError, match="sample_ids"):
        ops.manifold_pull_fused(x, x, radius=0.1, alpha_bar=0.5, seed=0, step=0, sample_ids=torch.tensor([0]))


def test_sample_ids_are_read_on_the_host_once_per_tensor_version():
    """The guidance passes the same ids tensor every step: its range is read on the host (a GPU sync) the
    first time only; an in-place change (a new _version) is checked again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from manifoldgd_fast.noise import _check_counters

    class CountReductions(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.min.default, torch.ops.aten.max.default):
                CountReductions.n += 1
            return func(*args, **(kwargs or {}))

    ids = torch.tensor([3, 0, 7])
    with CountReductions():
        for _ in range(4):
            assert torch.equal(_check_counters(1, 2, ids, 3, "cpu"), ids)
    assert CountReductions.n == 2                                       # min and max, once
    ids[1] = -1
    with pytest.raises(ConfigError, match=r"sample_ids must lie in \[0, 2\^32\)"):
        _check_counters(1, 2, ids, 3, "cpu")
    with torch.inference_mode():                                        # no version counter: checked each time
        bad = torch.tensor([0, 2 ** 33])
        for _ in range(2):
            with pytest.raises(ConfigError, match="sample_ids must lie"):
                _check_counters(1, 2, bad, 2, "cpu")


def test_library_ops_have_fake_kernels():
    """The registered ops trace without running (FakeTensorMode): what torch.compile needs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, modes = torch.empty(4, 64), torch.empty(4, 64, dtype=torch.bfloat16)
        out = torch.ops.manifoldgd_fast.manifold_pull_fused(x, x, torch.empty(150), torch.zeros(4, dtype=torch.long),
                                                            modes, 0.1, 0.5, 1, 2, 300, 12, 3, 0.1, 0.1, "triton")
        assert out.shape == (4, 64) and out.dtype == torch.bfloat16
        out = torch.ops.manifoldgd_fast.manifold_correct_rows(x, torch.empty(4, 50, 64), x.half(),
                                                              torch.zeros(4, dtype=torch.long), 10, 3, 1.0, "triton")
        assert out.dtype == torch.float16


@pytest.mark.skipif(not hasattr(torch.library, "infer_schema"), reason="torch.library.infer_schema is torch >= 2.5")
def test_library_op_schemas_are_what_torch_infers():
    """The written-out schemas (torch 2.4 cannot infer them here) equal what torch infers from each function."""
    from manifoldgd_fast import dispatch, dit_ops  # noqa: F401  (dit_ops registers its three ops on import)

    assert set(dispatch.LIBRARY_OPS) == {"manifold_correct_rows", "manifold_pull_rows", "manifold_correct_fused",
                                         "manifold_pull_fused", "layernorm_modulate", "gate_residual", "attention"}
    for name, fn in dispatch.LIBRARY_OPS.items():
        registered = str(getattr(torch.ops.manifoldgd_fast, name).default._schema)
        assert registered == f"manifoldgd_fast::{name}" + torch.library.infer_schema(fn, mutates_args=()), name


def test_a_triton_older_than_the_kernels_need_runs_the_references():
    """torch 2.4 to 2.6 bring Triton 3.0 to 3.2 (no tl.gather): the kernels are not offered, and say why."""
    run_without_triton(
        "from manifoldgd_fast import dit_ops, kernels, ops\n"
        "assert not kernels.HAVE_TRITON and kernels.WHY_NO_TRITON.startswith('Triton 3.2.0 is older than 3.3')\n"
        "x, p, g = torch.randn(2, 8), torch.randn(2, 20, 8), torch.randn(2, 8)\n"
        "assert torch.equal(ops.manifold_correct(x, p, g, k=5, d=2), ops.manifold_correct_ref(x, p, g, k=5, d=2))\n"
        "assert ops._eig_backend(torch.device('cpu')) == 'torch'\n"
        "assert dit_ops.device_reason(torch.device('cuda')) == kernels.WHY_NO_TRITON\n"
        "try:\n"
        "    ops.manifold_pull(x, p, k=5, d=2, backend='triton')\n"
        "except ops.BackendError as e:\n"
        "    assert 'Triton 3.2.0 is older than 3.3' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no BackendError')\n"
        "print('ok')\n", old_version="3.2.0")


def test_ops_import_and_run_without_triton():
    """No Triton (simulated): the package imports, auto runs the reference, the eigen-step falls back to torch."""
    run_without_triton(
        "from manifoldgd_fast import ops\n"
        "x, p, g = torch.randn(2, 8), torch.randn(2, 20, 8), torch.randn(2, 8)\n"
        "assert torch.equal(ops.manifold_correct(x, p, g, k=5, d=2), ops.manifold_correct_ref(x, p, g, k=5, d=2))\n"
        "assert ops._eig_backend(torch.device('cpu')) == 'torch'\n"
        "ops.sym_eig(torch.eye(3)[None])\n"
        "try:\n"
        "    ops.manifold_pull(x, p, k=5, d=2, backend='triton')\n"
        "except ops.BackendError as e:\n"
        "    assert 'cannot be imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no BackendError')\n"
        "print('ok')\n"
    )


@pytest.mark.parametrize("n", [5, 10, 64])
def test_jacobi_torch_rescales_huge_and_tiny_matrices_and_propagates_nan(n):
    check_eig_extremes(lambda A: sym_eig_torch.jacobi_eigh(A.float()), n, 2e-6)
