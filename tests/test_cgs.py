"""CGS: closed-form gradients against autograd and finite differences; the set is one set, and several
classes' sets in one batch are each their own."""

import pytest
import torch

from manifoldgd_fast.cgs import CGS, dm_grad, dm_grad_ref, dm_loss, dpp_grad, dpp_grad_ref, dpp_loss
from manifoldgd_fast.models import build_dit, tiny_dit_config
from manifoldgd_fast.sampler import sample
from manifoldgd_fast.schedule import make_schedule


@pytest.mark.parametrize("N,D", [(2, 5), (7, 64), (10, 256), (13, 31)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [1e-3, 1e-1])
@pytest.mark.parametrize("last", [1.0, 1e-4])
def test_dpp_gradient_matches_autograd(N, D, seed, eps, last):
    """``last`` scales the last row: at 1e-4 (norm 2e-4 to 2e-3) its cosine is still its direction's (K is
    scale-free; the norm's floor only guards an exact zero row), and its gradient grows as 1 / |x_i|."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[1] = x[0] + 0.1 * x[1]          # two similar samples: a real repulsion
    x[-1] *= last
    torch.testing.assert_close(dpp_grad(x, eps), dpp_grad_ref(x, eps), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("N,D", [(16, 4), (50, 4), (64, 16)])
def test_dpp_gradient_in_float32_with_more_samples_than_dimensions(N, D):
    """N > D: K is singular and A = K + eps I has eps as its smallest eigenvalue. At the smallest ridge
    the CLI takes (DPP_EPS_MIN), a float32 input still gets the float64 reference's gradient (a float32
    Cholesky was off by 9% to 44% here)."""
    from manifoldgd_fast.config import DPP_EPS_MIN

    x = torch.randn(N, D, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
    g = dpp_grad(x.float(), DPP_EPS_MIN)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g.double(), dpp_grad_ref(x, DPP_EPS_MIN), atol=1e-5, rtol=1e-5)


def test_dpp_gradient_matches_finite_difference():
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = dpp_grad(x, 1e-2)
    h = 1e-6
    for i, j in [(0, 0), (2, 3), (3, 5)]:
        e = torch.zeros_like(x)
        e[i, j] = h
        fd = (dpp_loss(x + e, 1e-2) - dpp_loss(x - e, 1e-2)) / (2 * h)
        assert abs(float(fd) - float(g[i, j])) < 1e-6 * max(1.0, abs(float(fd)))


def test_dpp_gradient_descent_spreads_the_set():
    x = torch.randn(5, 32, dtype=torch.float64) * 0.1 + torch.randn(32, dtype=torch.float64)
    before = dpp_loss(x)
    for _ in range(20):
        x = x - 0.5 * dpp_grad(x)
    assert dpp_loss(x) < before - 1.0        # less similar, lower loss
    assert float(dpp_grad(x[:1]).abs().max()) < 1e-12  # one sample: nothing to repel


def test_dm_gradient_closed_form():
    x = torch.randn(6, 4, 2, 2, dtype=torch.float64)
    mu = torch.randn(4, 2, 2, dtype=torch.float64)
    g = dm_grad(x, mu, 0.3)
    torch.testing.assert_close(g, dm_grad_ref(x, mu, 0.3))
    want = 2 / 6 * (x.mean(0) - 0.3 ** 0.5 * mu)
    assert torch.allclose(g, want.expand_as(x))
    # a step against it moves the set mean towards sqrt(abar) mu
    assert dm_loss(x - 0.5 * g, mu, 0.3) < dm_loss(x, mu, 0.3)


@pytest.mark.parametrize("G,N,D", [(2, 3, 16), (3, 5, 48), (4, 1, 8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_several_sets_are_each_their_own(G, N, D, dtype, tol, seed):
    """sets=G: the batched gradients equal the autograd reference over the sets, and each set's block
    equals that set's own gradient alone (a set never sees another's rows or mean)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(G * N, D, generator=gen, dtype=torch.float64)
    mu = torch.randn(G, D, generator=gen, dtype=torch.float64)
    x, mu = x.to(dtype), mu.to(dtype)
    g = dpp_grad(x, 1e-2, sets=G)
    torch.testing.assert_close(g, dpp_grad_ref(x, 1e-2, sets=G), atol=tol, rtol=tol)
    m = dm_grad(x, mu, 0.4, sets=G)
    torch.testing.assert_close(m, dm_grad_ref(x, mu, 0.4, sets=G), atol=tol, rtol=tol)
    for k in range(G):
        rows = slice(k * N, (k + 1) * N)
        torch.testing.assert_close(g[rows], dpp_grad(x[rows], 1e-2), atol=tol, rtol=tol)
        torch.testing.assert_close(m[rows], dm_grad(x[rows], mu[k], 0.4), atol=tol, rtol=tol)
    if N > 1:  # one set over all the rows is another thing
        assert (dpp_grad(x, 1e-2) - g).abs().max() > 10 * tol
    cgs = CGS(mu.float(), eta_dpp=0.5, eta_dm=0.3, eps=1e-2, sets=G)
    alone = torch.cat([CGS(mu[k].float(), eta_dpp=0.5, eta_dm=0.3, eps=1e-2).correction(
        x[k * N:(k + 1) * N].float(), x[k * N:(k + 1) * N].float(), 0.4) for k in range(G)])
    torch.testing.assert_close(cgs.correction(x.float(), x.float(), 0.4), alone, atol=2e-4, rtol=2e-4)


def test_sets_need_equal_runs_of_one_label_and_a_mean_each():
    from manifoldgd_fast.errors import ConfigError

    cgs = CGS(torch.zeros(2, 4), eta_dpp=1.0, eta_dm=0.1, sets=2)
    cgs.check_labels(torch.tensor([3, 3, 5, 5]))
    with pytest.raises(ConfigError, match=r"labels of a set must all be equal, got \[\[3, 5\], \[5\]\]"):
        cgs.check_labels(torch.tensor([3, 5, 5, 5]))
    with pytest.raises(ConfigError, match="a batch of 5 samples does not split into 2 equal sets"):
        cgs.check_labels(torch.tensor([3, 3, 3, 5, 5]))
    # one set of two samples (IPC 2, the smallest set with a DPP term) of two classes
    with pytest.raises(ConfigError, match=r"labels of a set must all be equal, got \[\[0, 1\]\]"):
        CGS(torch.zeros(4), eta_dpp=1.0, eta_dm=0.1).check_labels(torch.tensor([0, 1]))
    CGS(torch.zeros(4), eta_dpp=1.0, eta_dm=0.1).check_labels(torch.tensor([7]))
    for sets in (0, -1):
        with pytest.raises(ConfigError, match=f"CGS with {sets} sets needs one class mean per set"):
            CGS(torch.zeros(2, 4), eta_dpp=1.0, eta_dm=0.1, sets=sets)
    with pytest.raises(ConfigError, match=r"CGS with 3 sets needs one class mean per set \(3, ...\), got \(2, 4\)"):
        CGS(torch.zeros(2, 4), eta_dpp=1.0, eta_dm=0.1, sets=3)


def test_set_is_one_set_with_chunked_forward():
    """A set larger than the forward batch is still one set: chunked forwards give the same result."""
    model = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)
    sched = make_schedule(8, "ddpm")
    x_T = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.full((5,), 1)
    mu = torch.randn(4, 8, 8)

    def run(chunk, **kw):
        gens = [torch.Generator().manual_seed(s) for s in range(5)]
        return sample(model, sched, x_T, y, null_class=3, generators=gens, forward_batch=chunk, **kw)

    cgs = CGS(mu, eta_dpp=1.0, eta_dm=0.5)
    whole, chunked = run(None, cgs=cgs), run(2, cgs=cgs)
    # the DiT forward on another batch shape rounds otherwise (up to ~3e-4 here on AVX-512 CPUs); CGS
    # per chunk instead of per set would move the samples by ~500
    torch.testing.assert_close(chunked, whole, atol=1e-3, rtol=1e-4)
    plain = run(None)
    assert not torch.allclose(plain, whole, atol=1.0)
    # the coupling is real: a sample's result depends on the others in its set
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    first3 = sample(model, sched, x_T[:3], y[:3], null_class=3, generators=gens, cgs=cgs)
    assert not torch.allclose(first3, whole[:3], atol=1.0)
    # the set mean ends closer to the class mean than without CGS (strong eta_dm)
    strong = run(None, cgs=CGS(mu, eta_dpp=0.0, eta_dm=1.0))
    assert (strong.mean(0) - mu).norm() < (plain.mean(0) - mu).norm()


def test_correction_names_the_bad_tensor():
    from manifoldgd_fast.errors import ConfigError

    cgs = CGS(torch.zeros(4, 2, 2), eta_dpp=0.1, eta_dm=0.1)
    x = torch.randn(3, 4, 2, 2)
    assert cgs.correction(x, x.clone(), 0.5).shape == x.shape
    with pytest.raises(ConfigError, match="x0 must have x_t's shape"):
        cgs.correction(x, x[:2], 0.5)
    with pytest.raises(ConfigError, match="16 values per sample"):
        cgs.correction(torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3), 0.5)
    # an x0 of other per-sample shape that would broadcast against x_t (one channel for four)
    with pytest.raises(ConfigError, match=r"x0 must have x_t's shape \(3, 4, 2, 2\), got \(3, 1, 2, 2\)"):
        cgs.correction(x, x[:, :1].clone(), 0.5)
    two = CGS(torch.zeros(2, 4, 2, 2), eta_dpp=0.1, eta_dm=0.1, sets=2)
    with pytest.raises(ConfigError, match=r"N a multiple of the 2 set\(s\), got \(3, 4, 2, 2\)"):
        two.correction(x, x.clone(), 0.5)
    # the Python API checks what the config checks for the CLI: a negative step was skipped, eps 0 factored
    for kw, msg in ((dict(eta_dpp=-1.0), "CGS eta_dpp must be a finite number >= 0, got -1.0"),
                    (dict(eta_dm=float("nan")), "CGS eta_dm must be a finite number >= 0, got nan"),
                    (dict(eps=0.0), "CGS eps must be a finite number > 0, got 0.0"),
                    (dict(eps="1e-3"), "CGS eps must be a finite number > 0, got '1e-3'"),
                    (dict(eta_dpp=float("inf")), "CGS eta_dpp must be a finite number >= 0, got inf"),
                    (dict(eps=float("inf")), "CGS eps must be a finite number > 0, got inf")):
        with pytest.raises(ConfigError, match=msg):
            CGS(torch.zeros(4), **{"eta_dpp": 0.1, "eta_dm": 0.1, **kw})
    CGS(torch.zeros(4), eta_dpp=0, eta_dm=0.0, eps=1)   # zero steps and int values are fine


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("zero", [0, 3])
def test_an_all_zero_sample_leaves_the_others_gradient_as_without_it(dtype, tol, zero):
    """A zero row has no direction: its cosine row of K is 0 (the clamp of its norm), so A is block diagonal and
    det(A) factors: its gradient is 0 and the other rows' is that of the set without it (not NaN for all)."""
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(zero), dtype=dtype)
    x[zero] = 0
    g = dpp_grad(x, 1e-2)
    rest = [i for i in range(5) if i != zero]
    assert bool(torch.isfinite(g).all()) and bool((g[zero] == 0).all())
    torch.testing.assert_close(g[rest], dpp_grad(x[rest], 1e-2), atol=tol, rtol=tol)
    torch.testing.assert_close(g, dpp_grad_ref(x, 1e-2), atol=tol, rtol=tol)


@pytest.mark.parametrize("fn", [lambda x: dpp_loss(x), lambda x: dpp_grad(x), lambda x: dm_loss(x, x[:1], 0.5),
                                lambda x: dm_grad(x, x[:1], 0.5)], ids=["dpp_loss", "dpp_grad", "dm_loss", "dm_grad"])
def test_a_set_must_have_one_row_per_sample(fn):
    """A 1-D tensor is no set of samples (it would pass for N samples of one value each): refused in one line."""
    from manifoldgd_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=r"the set must be \(N, ...\) with one row per sample, got shape \(5,\)"):
        fn(torch.randn(5))


def test_losses_match_a_direct_transcription():
    """dpp_loss / dm_loss against SPEC 5 written out with other primitives (cosine_similarity, logdet)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    flat = x.flatten(1)
    K = torch.nn.functional.cosine_similarity(flat[:, None, :], flat[None, :, :], dim=-1)
    want = -torch.logdet(K + 1e-2 * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(dpp_loss(x, 1e-2), want)
    mu = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    want = sum(float(v) ** 2 for v in (flat.sum(0) / 5 - 0.4 ** 0.5 * mu.flatten()))
    assert abs(float(dm_loss(x, mu, 0.4)) - want) < 1e-12


def _abar(schedule, i):
    """alpha_bar of respaced step i from DiT's 1,000-step linear betas, independent of the Schedule tables."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return float(torch.cumprod(1 - betas, 0)[int(schedule.timesteps[i])])


@pytest.mark.parametrize("sampler,formulation,method", [
    ("ddpm", "official", "dit"), ("ddpm", "official", "manifoldgd"), ("ddim", "official", "mgd3"),
    ("ddpm", "paper", "mgd3"), ("ddim", "paper", "manifoldgd")])
@pytest.mark.parametrize("B", [2, 4])
def test_one_cgs_step_is_spec5_on_the_models_own_x0(sampler, formulation, method, B):
    """One denoise_step with CGS minus the same step without it is -(eta_dpp dL_dpp/dx0 + eta_dm dL_dm/dx_t),
    from the autograd references, with x0 the model's own CFG prediction (before any guidance), x_t the
    step's input and alpha_bar of the step's own timestep: on every sampler and formulation."""
    from manifoldgd_fast.config import DistillConfig
    from manifoldgd_fast.guidance import Guidance
    from manifoldgd_fast.sampler import Sampling, cfg_forward, denoise_step

    steps = 6
    model = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)
    sched = make_schedule(steps, sampler)
    # step i = 3 of 6 is guided under both formulations with these t_stop
    cfg = DistillConfig(method=method, formulation=formulation, sampler=sampler, steps=steps, ipc=B,
                        t_stop=1 if formulation == "official" else 4, eta_dpp=0.7, eta_dm=0.3, cgs=True,
                        dpp_eps=0.5, lambda_m=5.0, manifold_scale=5.0).resolve(10, "cpu")   # strong guidance: x0 moves
    run = Sampling(model, sched, 3, cfg_scale=4.0, formulation=formulation)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 4, 8, 8, generator=g)
    mu = torch.randn(4, 8, 8, generator=g)
    lat = torch.randn(30, 256, generator=g)
    y = torch.full((B,), 2)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    i = 3
    cgs = CGS.for_run(cfg, mu)

    def step(with_cgs):
        gd = None
        if method != "dit":
            kw = {}
            if formulation == "paper" and method == "manifoldgd":
                from manifoldgd_fast.guidance import paper_neighbourhoods
                kw = paper_neighbourhoods(cfg, lat, lat[:B])
            gens = [torch.Generator().manual_seed(b) for b in range(B)]
            gd = Guidance(cfg, sched, lat[:B].view(B, 4, 8, 8), gens, noise_seed=1, sample_ids=list(range(B)), **kw)
        return denoise_step(run, i, x, y, lambda z: noise, guidance=gd, cgs=cgs if with_cgs else None)

    abar = _abar(sched, i)
    eps = cfg_forward(model, x, sched.timesteps[i], y, null_class=3, cfg_scale=4.0)[:, :4]
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
    want = -(0.7 * dpp_grad_ref(x0.double(), 0.5) + 0.3 * dm_grad_ref(x.double(), mu.double(), abar))
    got = (step(True) - step(False)).double()
    torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=1e-3)


def test_cgs_acts_on_every_step_or_on_the_guidance_steps():
    """cgs_steps all (the default, as the source: "at each denoising step") vs guided (the guidance's t_stop window)."""
    from manifoldgd_fast.config import DistillConfig
    from manifoldgd_fast.sampler import Sampling, denoise_step

    mu = torch.zeros(4, 8, 8)
    for formulation, guided in (("official", [4, 5, 6, 7, 8, 9]), ("paper", [7, 8, 9])):
        for method in ("cgs", "manifoldgd"):
            c = DistillConfig(method=method, formulation=formulation, steps=10, t_stop=3, cgs=True).resolve(10)
            assert [i for i in range(10) if CGS.for_run(c, mu).active(i)] == list(range(10))
            c = DistillConfig(method=method, formulation=formulation, steps=10, t_stop=3, cgs=True,
                              cgs_steps="guided").resolve(10)
            assert [i for i in range(10) if CGS.for_run(c, mu).active(i)] == guided
    # an unguided step (i = 0 <= t_stop) moves under "all", not under "guided"
    model = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)
    sched = make_schedule(10, "ddpm")
    run = Sampling(model, sched, 3)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.full((3,), 1)
    plain = denoise_step(run, 0, x, y, None)
    c = DistillConfig(method="cgs", steps=10, t_stop=3).resolve(10)
    assert not torch.allclose(denoise_step(run, 0, x, y, None, cgs=CGS.for_run(c, mu)), plain)
    c = DistillConfig(method="cgs", steps=10, t_stop=3, cgs_steps="guided").resolve(10)
    assert torch.equal(denoise_step(run, 0, x, y, None, cgs=CGS.for_run(c, mu)), plain)


def test_dpp_guidance_spreads_the_sampled_set():
    """Over a whole run, eta_dpp > 0 leaves the final set less similar (lower L_dpp) than eta_dpp = 0.
    (The random tiny DiT's x0 has norms in the thousands and the DPP gradient scales as 1 / |x0|: a large eta.)"""
    model = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)
    sched = make_schedule(10, "ddpm")
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_T = 0.3 * x_T + x_T[:1]                         # four similar starting points
    y = torch.full((4,), 1)
    mu = torch.zeros(4, 8, 8)

    def run(eta_dpp):
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        return sample(model, sched, x_T, y, null_class=3, generators=gens,
                      cgs=CGS(mu, eta_dpp=eta_dpp, eta_dm=1e-3))

    assert float(dpp_loss(run(2000.0))) < float(dpp_loss(run(0.0))) - 0.5


def test_cgs_set_must_be_one_class():
    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.fastloop import FastSampler
    from manifoldgd_fast.sampler import Sampling

    model = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)
    sched = make_schedule(4, "ddpm")
    x_T = torch.randn(3, 4, 8, 8)
    cgs = CGS(torch.zeros(4, 8, 8), eta_dpp=1.0, eta_dm=0.1)
    y = torch.tensor([0, 1, 1])
    with pytest.raises(ConfigError, match=r"labels of a set must all be equal, got \[\[0, 1\]\]"):
        sample(model, sched, x_T, y, null_class=3, cgs=cgs)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    with pytest.raises(ConfigError, match="labels of a set must all be equal"):
        FastSampler(Sampling(model, sched, 3), cuda_graph=False).sample(x_T, y, gens, cgs=cgs)


@pytest.mark.parametrize("kw,msg", [
    (dict(method="cgs", cgs=False), "--method cgs is CGS alone"),
    (dict(cgs="no"), "--cgs must be true or false"),
    (dict(cgs=True, eta_dpp=0.0, eta_dm=0.0), "changes nothing"),
    (dict(method="cgs", cgs_steps="some"), "--cgs-steps must be one of all, guided"),
    (dict(method="cgs", cgs_steps="guided", t_stop=49), "acts on no step"),
    (dict(method="cgs", cgs_steps="guided", formulation="paper", t_stop=0), "acts on no step"),
    (dict(method="cgs", eta_dpp=-1.0), "--eta-dpp must be a number >= 0"),
    (dict(method="cgs", eta_dm=float("nan")), "--eta-dm must be a number >= 0"),
    (dict(method="cgs", eta_dpp=float("inf")), "--eta-dpp must be a number >= 0"),
    (dict(method="cgs", dpp_eps=0.0), "--dpp-eps must be a number > 0"),
    (dict(method="cgs", dpp_eps=1e-30), r"--dpp-eps must be at least 1e-05, got 1e-30: K \+ eps I is singular with "
                                        "more samples than latent dimensions"),
    (dict(method="cgs", dpp_eps=None), "--dpp-eps must be at least 1e-05, got None"),
    (dict(method="cgs", ipc=1, eta_dm=0.0), "CGS at --ipc 1 with --eta-dm 0 changes nothing"),
    (dict(method="cgs", ipc=4, eta_dm=4.5), "--eta-dm 4.5 is more than --ipc 4: .* the set diverges"),
    (dict(cgs=True, ipc=1, eta_dm=1e6), "--eta-dm 1e\\+06 is more than --ipc 1"),
])
def test_cgs_settings_one_line_errors(kw, msg):
    from manifoldgd_fast.config import DistillConfig
    from manifoldgd_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=msg) as e:
        DistillConfig(**kw).resolve(10)
    assert "\n" not in str(e.value)
    # valid neighbours: CGS off with zero steps, --no-cgs without --method cgs, IPC 1 with mean matching
    # alone, and a mean-matching step up to IPC
    DistillConfig(cgs=False, eta_dpp=0.0, eta_dm=0.0).resolve(10)
    DistillConfig(dpp_eps=None).resolve(10)             # CGS off: the ridge is not used (a config may say null)
    DistillConfig(method="cgs", ipc=1, eta_dm=0.5).resolve(10)
    DistillConfig(method="cgs", ipc=4, eta_dm=4.0, dpp_eps=1e-5).resolve(10)


def test_a_mean_matching_step_above_ipc_diverges():
    """Why --eta-dm above IPC is refused: the set's mean error is multiplied by 1 - 2 eta_dm / N per step."""
    from manifoldgd_fast.cgs import CGS

    N, mu = 4, torch.zeros(2, 3)
    x = torch.randn(N, 2, 3, generator=torch.Generator().manual_seed(0)) + 1.0
    err = []
    for eta in (N / 2, N, 1.5 * N):
        y = x.clone()
        for _ in range(20):
            y = y - CGS(mu, eta_dpp=0.0, eta_dm=eta).correction(y, y, 1.0)
        err.append(float(y.mean(0).norm()))
    assert err[0] < 1e-5 and abs(err[1] - float(x.mean(0).norm())) < 1e-4 and err[2] > 1e5


def test_cgs_steps_count_in_the_fingerprint_only_where_cgs_runs():
    """With CGS off, eta_dpp / eta_dm / cgs_steps change no byte, so they do not change the run's fingerprint (a resume
    with other values is the same run); with CGS on they do. Runs made before hashed the defaults: still valid."""
    from manifoldgd_fast.config import DistillConfig, fingerprint

    def fp(**kw):
        return fingerprint(DistillConfig(data="d", out="o", **kw).resolve(3, "cpu"))

    assert fp(eta_dpp=3.0, eta_dm=0.5) == fp()
    assert fp(cgs_steps="guided") == fp()   # (dpp_eps counts even so: older fingerprints hashed its value)
    assert fp(method="cgs", eta_dpp=3.0) != fp(method="cgs")
    assert fp(cgs=True, eta_dm=0.5) != fp(cgs=True)
    assert fp(cgs=True, dpp_eps=0.5) != fp(cgs=True)
    assert fp(method="cgs", cgs_steps="guided") != fp(method="cgs")


def test_guidance_noise_counts_in_the_fingerprint_only_for_manifoldgd():
    """Only ManifoldGD draws cloud / patch noise: mgd3, dit and cgs resumed on another device (auto resolves
    to philox on CUDA) or with another --guidance-noise are the same run; ManifoldGD's is not (its noise differs)."""
    from manifoldgd_fast.config import DistillConfig, fingerprint

    def fp(device="cpu", **kw):
        return fingerprint(DistillConfig(data="d", out="o", **kw).resolve(3, device))

    for method in ("mgd3", "dit", "cgs"):
        assert fp("cuda", method=method) == fp("cpu", method=method) == fp(method=method, guidance_noise="philox")
    assert fp("cuda", method="manifoldgd") != fp("cpu", method="manifoldgd")
    assert fp(method="manifoldgd", guidance_noise="philox") == fp("cuda", method="manifoldgd")


@pytest.mark.parametrize("sets,N", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3)])
def test_the_correction_is_spec5_at_the_smallest_sets(sets, N):
    """correction(x_t, x0) = eta_dpp dL_dpp/dx0 + eta_dm dL_dm/dx_t from the autograd references, on unit-scale
    latents (the DPP term is visible), down to IPC 2 (the smallest set with a repulsion) and IPC 1 (none)."""
    g = torch.Generator().manual_seed(10 * sets + N)
    x_t = torch.randn(sets * N, 4, 3, 3, generator=g)
    x0 = torch.randn(sets * N, 4, 3, 3, generator=g)
    x0[N - 1] = 0.2 * x0[N - 1] + x0[0]                                 # a near pair where N >= 2
    mu = torch.randn(sets, 4, 3, 3, generator=g) if sets > 1 else torch.randn(4, 3, 3, generator=g)
    got = CGS(mu, eta_dpp=0.9, eta_dm=0.4, eps=1e-2, sets=sets).correction(x_t, x0, 0.6).double()
    dpp = dpp_grad_ref(x0.double(), 1e-2, sets=sets)
    want = 0.9 * dpp + 0.4 * dm_grad_ref(x_t.double(), mu.double(), 0.6, sets=sets)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (float(dpp.abs().max()) > 0.05) == (N > 1)                   # a set of one has nothing to repel


def test_a_set_with_identical_samples_and_the_smallest_ridge():
    """Identical rows make K singular; with the ridge at DPP_EPS_MIN the DPP gradient is finite (zero by symmetry:
    a duplicate is a saddle of L_dpp, it is not pushed apart), the other rows' gradient is autograd's; a ridge
    below DPP_EPS_MIN, which the CLI refuses, is refused by the Python API too (the Cholesky fails: NaN samples)."""
    from manifoldgd_fast.config import DPP_EPS_MIN
    from manifoldgd_fast.errors import ConfigError

    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 16, generator=g)
    x[1] = x[0]
    x[3] = x[0]
    c = CGS(torch.zeros(16), eta_dpp=1.0, eta_dm=0.0, eps=DPP_EPS_MIN).correction(x, x, 0.5)
    assert bool(torch.isfinite(c).all())
    torch.testing.assert_close(c.double(), dpp_grad_ref(x.double(), DPP_EPS_MIN), atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"CGS eps 1e-30 is below 1e-05"):
        CGS(torch.zeros(16), eta_dpp=1.0, eta_dm=0.0, eps=1e-30)


def test_cgs_steps_that_name_no_step_are_refused():
    """``CGS(steps=[])`` would act on no step (plain sampling under CGS's name, as a --cgs-steps guided window
    holding no step, which the config refuses); a negative index names no respaced step. Both: ConfigError."""
    from manifoldgd_fast.errors import ConfigError

    mu = torch.zeros(16)
    for steps in ([], (), [3, -1]):
        with pytest.raises(ConfigError, match=r"CGS steps= must hold respaced step indices >= 0"):
            CGS(mu, eta_dpp=1.0, eta_dm=0.0, steps=steps)
    assert CGS(mu, eta_dpp=1.0, eta_dm=0.0, steps=[0]).active(0)
    assert CGS(mu, eta_dpp=1.0, eta_dm=0.0, steps=None).active(7)
