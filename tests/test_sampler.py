"""Schedule, sampling loop and guided steps against diffusers and direct transcriptions of SPEC 4 / 4b."""
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from test_ops import spec_manifold_correct, spec_manifold_pull

from manifoldgd_fast import modes as modes_mod
from manifoldgd_fast import ops
from manifoldgd_fast.config import DistillConfig
from manifoldgd_fast.errors import ConfigError
from manifoldgd_fast.guidance import Guidance, kernel_phi_official, mode_grad_paper, paper_neighbourhoods
from manifoldgd_fast.models import build_dit, tiny_dit_config
from manifoldgd_fast.sampler import cfg_forward, sample
from manifoldgd_fast.schedule import linear_betas, make_schedule, space_timesteps

NULL = 3


@pytest.fixture(scope="module")
def model():
    return build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------------------- schedule
def test_respacing_rules():
    ddpm = space_timesteps(1000, 50, "ddpm")
    assert len(ddpm) == 50 and ddpm[0] == 0 and ddpm[-1] == 999 and ddpm[1] == 20 and ddpm[2] == 41
    assert space_timesteps(1000, 50, "ddim") == list(range(0, 1000, 20))
    s = make_schedule(50, "ddpm")
    base = np.cumprod(1 - linear_betas(1000))
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), base[ddpm].astype(np.float32), rtol=1e-6)
    assert float(s.alphas_cumprod_prev[0]) == 1.0


def test_linear_betas_scale_with_the_training_steps_and_host_tables_are_the_device_values():
    """ADM's 'linear' schedule scales 1e-4 -> 2e-2 by 1000 / T (get_named_beta_schedule); Schedule.at reads
    a float64 copy of the float32 device tables, value for value (so host and device arithmetic agree)."""
    np.testing.assert_allclose(linear_betas(4000)[[0, -1]], [2.5e-5, 5e-3], rtol=1e-12)
    np.testing.assert_allclose(linear_betas(1000)[[0, -1]], [1e-4, 2e-2], rtol=1e-12)
    s = make_schedule(7, "ddpm")
    for name in ("alphas_cumprod", "alphas_cumprod_prev", "posterior_log_variance_clipped", "log_betas",
                 "sqrt_recipm1_alphas_cumprod"):
        for i in range(s.steps):
            assert s.at(name, i) == float(getattr(s, name)[i]), (name, i)


def test_zero_terminal_snr_betas_are_diffusers():
    """rescale_zero_terminal_snr is diffusers' (same formula; float64 here, float32 there): abar ends at 0
    exactly, keeps its first value, and an eps schedule that would visit abar = 0 is refused."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs

    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.schedule import rescale_zero_terminal_snr, scaled_linear_betas

    base = scaled_linear_betas()
    ours = rescale_zero_terminal_snr(base)
    np.testing.assert_allclose(ours, theirs(torch.tensor(base)).double().numpy(), rtol=1e-12, atol=1e-15)
    ac = np.cumprod(1 - ours)
    assert ac[-1] == 0.0 and ours[-1] == 1.0 and abs(ac[0] - (1 - base[0])) < 1e-15 and (np.diff(ac) < 0).all()
    kw = dict(betas=ours, spacing="trailing")
    s = make_schedule(10, "ddim", prediction_type="v_prediction", **kw)
    assert s.zero_snr(9) and not s.zero_snr(8) and float(s.alphas_cumprod[9]) == 0.0
    with pytest.raises(ConfigError, match="timestep 999 has abar = 0"):
        make_schedule(10, "ddim", **kw)
    make_schedule(10, "ddim", spacing="leading", betas=ours)       # leading never visits t = 999


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_round_trip_and_hold_at_zero_snr(kind):
    """Schedule.eps_x0 and Schedule.prediction are inverses at every step; x = sqrt(abar) x0 +
    sqrt(1 - abar) eps holds; at abar = 0, eps = x and x0 comes from v or x0 alone, finite."""
    from manifoldgd_fast.schedule import rescale_zero_terminal_snr, scaled_linear_betas

    betas = scaled_linear_betas() if kind == "epsilon" else rescale_zero_terminal_snr(scaled_linear_betas())
    s = make_schedule(8, "ddim", betas=betas, spacing="trailing", prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    for i in range(s.steps):
        eps, x0 = s.eps_x0(i, x, pred)
        assert torch.isfinite(eps).all() and torch.isfinite(x0).all()
        torch.testing.assert_close(s.prediction(i, eps, x0), pred, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(s.sqrt_alphas_cumprod[i] * x0 + s.sqrt_one_minus_alphas_cumprod[i] * eps, x,
                                   atol=2e-5, rtol=1e-5)
        if not s.zero_snr(i):
            torch.testing.assert_close(s.eps_from_x0(i, x, x0), eps, atol=1e-3, rtol=1e-3)
    assert s.zero_snr(s.steps - 1) == (kind != "epsilon")
    if kind != "epsilon":
        i = s.steps - 1
        eps, x0 = s.eps_x0(i, x, pred)
        assert torch.equal(eps, x) and torch.equal(s.eps_from_x0(i, x, x0), x)
        assert torch.equal(x0, -pred if kind == "v_prediction" else pred)


# ---------------------------------------------------------------------------- unguided loops
@pytest.mark.parametrize("cfg_channels", ["all", "3"])
def test_ddim_matches_diffusers_scheduler_loop(model, cfg_channels):
    """lambda_M = 0 (no guidance) with DDIM == a loop over diffusers' DDIMScheduler on the same model and noise."""
    from diffusers import DDIMScheduler

    S = 10
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 2])
    ours = sample(model, make_schedule(S, "ddim"), x_T, y, null_class=NULL, cfg_scale=4.0,
                  cfg_channels=cfg_channels, generators=_gens([0, 1]))

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(S)
    x = x_T.clone()
    ch = 4 if cfg_channels == "all" else 3
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(torch.cat([x, x]), timestep=torch.full((4,), int(t)), class_labels=torch.tensor([0, 2, NULL, NULL])).sample
            cond, uncond = out[:2, :4], out[2:, :4]
            eps = cond.clone()
            eps[:, :ch] = uncond[:, :ch] + 4.0 * (cond[:, :ch] - uncond[:, :ch])
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=2e-5)


class _Counting(torch.nn.Module):
    """Wraps a DiT and records the batch size of each forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x, timestep, class_labels):
        self.batches.append(x.shape[0])
        return self.inner(x, timestep=timestep, class_labels=class_labels)


@pytest.mark.parametrize("channels", ["3", "all"])
def test_cfg_is_off_at_scale_one_or_below(model, channels):
    """DiT's sample.py and diffusers guide only at a scale > 1: at w <= 1 one forward of the B conditional rows,
    its output as it is (at w = 1 the mix's value to rounding; below, never the mix that leans to the null class)."""
    g = torch.Generator().manual_seed(0)
    x, y, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 1, 2, 0]), torch.tensor([500])
    counting = _Counting(model)
    with torch.no_grad():
        cond = model(x, timestep=t.expand(4), class_labels=y).sample.float()
        both = model(torch.cat([x, x]), timestep=t.expand(8), class_labels=torch.cat([y, torch.full_like(y, NULL)]))
        both = both.sample.float()
        for w in (1.0, 0.5, 0.0):
            out = cfg_forward(counting, x, t, y, null_class=NULL, cfg_scale=w, cfg_channels=channels)
            torch.testing.assert_close(out, cond, rtol=1e-5, atol=1e-5)
        assert counting.batches == [4, 4, 4]
        mixed = cfg_forward(counting, x, t, y, null_class=NULL, cfg_scale=1.5, cfg_channels=channels)
    assert counting.batches[-1] == 8
    ch = 4 if channels == "all" else 3
    torch.testing.assert_close(mixed[:, :ch], both[4:, :ch] + 1.5 * (both[:4, :ch] - both[4:, :ch]))
    torch.testing.assert_close(mixed[:, ch:], both[:4, ch:])


def test_chunked_cfg_forward_keeps_each_rows_class(model):
    """forward_batch: the rows of each chunk keep their own class labels (distinct classes here; a set of one
    class, as the CGS test has, cannot tell), equal to one forward of the whole batch to rounding."""
    g = torch.Generator().manual_seed(2)
    x, y, t = torch.randn(5, 4, 8, 8, generator=g), torch.tensor([0, 1, 2, 1, 0]), torch.tensor([400])
    with torch.no_grad():
        whole = cfg_forward(model, x, t, y, null_class=NULL, cfg_scale=4.0)
        for chunk in (2, 3):
            got = cfg_forward(model, x, t, y, null_class=NULL, cfg_scale=4.0, chunk=chunk)
            torch.testing.assert_close(got, whole, atol=1e-4, rtol=1e-4)


def test_ddpm_learned_sigma_matches_diffusers_scheduler_loop(model):
    """Respaced learned-range DDPM == diffusers' DDPMScheduler (learned_range) over the respaced timesteps."""
    from diffusers import DDPMScheduler

    S = 10
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([1, 0])
    ours = sample(model, make_schedule(S, "ddpm"), x_T, y, null_class=NULL, cfg_scale=4.0, generators=_gens([5, 6]))

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                          clip_sample=False)
    sched.set_timesteps(timesteps=space_timesteps(1000, S, "ddpm")[::-1])
    gens = _gens([5, 6])
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(torch.cat([x, x]), timestep=torch.full((4,), int(t)), class_labels=torch.tensor([1, 0, NULL, NULL])).sample
            mixed = out[:2].clone()
            mixed[:, :3] = out[2:, :3] + 4.0 * (out[:2, :3] - out[2:, :3])
            x = sched.step(mixed, t, x, generator=gens).prev_sample
    torch.testing.assert_close(ours, x, atol=5e-5, rtol=5e-5)


# ---------------------------------------------------------------------------- guided steps
def _cfg(**kw):
    base = dict(steps=10, t_stop=5, ipc=2, formulation="official", method="manifoldgd")
    base.update(kw)
    return DistillConfig(**base).resolve(10)


def _first_step(model, cfg, x_T, y, guidance, gens, sampler="ddpm"):
    seen = {}

    def cb(i, x):
        seen.setdefault("x", x.clone())

    sample(model, make_schedule(cfg.steps, sampler), x_T, y, null_class=NULL, cfg_scale=cfg.cfg_scale,
           formulation=cfg.formulation, guidance=guidance, generators=gens, callback=cb)
    return seen["x"]


class _SpecDDPM:
    """ADM's respaced learned-range DDPM step at index i, in float64, written out from SPEC 4b."""

    def __init__(self, model, sched, i, x_T, y):
        with torch.no_grad():
            out = cfg_forward(model, x_T, sched.timesteps[i], y, null_class=NULL, cfg_scale=4.0)
        self.eps, v = out[:, :4].double(), out[:, 4:].double()
        self.ab, self.ab_prev = float(sched.alphas_cumprod[i]), float(sched.alphas_cumprod_prev[i])
        self.beta = 1 - self.ab / self.ab_prev
        self.x = x_T.double()
        post_var = self.beta * (1 - self.ab_prev) / (1 - self.ab)
        self.logvar = (v + 1) / 2 * math.log(self.beta) + (1 - (v + 1) / 2) * math.log(post_var)

    def x0(self, eps):
        return (self.x - math.sqrt(1 - self.ab) * eps) / math.sqrt(self.ab)

    def mean(self, x0):
        ab, ab_prev, beta = self.ab, self.ab_prev, self.beta
        return beta * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * self.x


@pytest.mark.parametrize("kernel,bandwidth", [("rbf", None), ("laplace", None), ("imq", None),
                                              ("rbf", 0.5), ("laplace", 0.5)])
def test_official_ddpm_step_matches_spec(model, kernel, bandwidth):
    """SPEC 4b, one step at i = S-1: mu += lambda_M phi (x0 - m) s + manifold term; x = mu + s z. phi's
    sigma is --kernel-bandwidth (1 by default). (imq's c^2 is lost beside |x0 - m|^2 here: test_mode_terms
    checks c.)"""
    cfg = _cfg(kernel=kernel, kernel_bandwidth=bandwidth)
    S = cfg.steps
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    m = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1])
    sched = make_schedule(S, "ddpm")
    gs = _gens([10, 11])  # one generator per sample, shared by guidance and step noise (as the pipeline does)
    got = _first_step(model, cfg, x_T, y, Guidance(cfg, sched, m, gs), gs)

    i = S - 1
    st = _SpecDDPM(model, sched, i, x_T, y)
    ab, x = st.ab, st.x
    x0 = st.x0(st.eps)
    mu = st.mean(x0)
    s = torch.exp(0.5 * st.logvar)
    diff = x0 - m.double()
    r = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    sig = 1.0 if bandwidth is None else bandwidth
    phi = {"rbf": -torch.ones_like(r) / sig ** 2, "laplace": -1 / (sig * r), "imq": -1 / (r ** 2 + sig ** 2)}[kernel]
    mode_term = 0.1 * phi * diff * s
    # the same cloud the sampler drew (cloud first, then the step noise, per sample)
    gens = _gens([10, 11])
    radius = 0.05 * 2.0  # warm-up at p = 1: r * M
    cloud = ops.official_cloud(m.flatten(1), radius, ab, gens, n_points=300)
    pull = spec_manifold_pull(x.flatten(1), cloud.double(), 12, 3, 0.1, 0.2, 1e-5).view_as(x)
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens]).double()
    want = mu + mode_term + pull + s * noise
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_official_ddim_step_matches_spec(model):
    """DDIM: x0 <- x0 + lambda_M phi (x0 - m) + manifold term; eps recomputed; DDIM update."""
    cfg = _cfg(sampler="ddim")
    S = cfg.steps
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    m = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2])
    sched = make_schedule(S, "ddim")
    gs = _gens([7])
    got = _first_step(model, cfg, x_T, y, Guidance(cfg, sched, m, gs), gs, sampler="ddim")

    i = S - 1
    with torch.no_grad():
        eps = cfg_forward(model, x_T, sched.timesteps[i], y, null_class=NULL, cfg_scale=4.0)[:, :4].double()
    ab = float(sched.alphas_cumprod[i]); ab_prev = float(sched.alphas_cumprod_prev[i])
    x = x_T.double()
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    cloud = ops.official_cloud(m.flatten(1), 0.1, ab, _gens([7]), n_points=300)
    pull = spec_manifold_pull(x.flatten(1), cloud.double(), 12, 3, 0.1, 0.2, 1e-5).view_as(x)
    x0g = x0 - 0.1 * (x0 - m.double()) + pull
    eps_g = (x / math.sqrt(ab) - x0g) / math.sqrt(1 / ab - 1)
    want = x0g * math.sqrt(ab_prev) + math.sqrt(1 - ab_prev) * eps_g
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def _paper_setup(cfg, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 4 * 8 * 8, generator=g) * torch.linspace(2, 0.2, 256)
    m = lat[:2] + 0.01
    order, dists = modes_mod.neighbourhood_order(lat, m)
    radii = modes_mod.class_radii(dists, cfg.r_min, cfg.r_max, cfg.radius_units)
    return lat, m, order, dists, radii


def test_paper_ddpm_step_matches_spec(model):
    """SPEC 4: g = m - x0; patch; g <- g - lambda_N P_N g; eps_hat = eps - lambda_M sigma g; DDPM step with eps_hat."""
    cfg = _cfg(formulation="paper")
    S = cfg.steps
    lat, m, order, dists, radii = _paper_setup(cfg)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1])
    sched = make_schedule(S, "ddpm")
    gs = _gens([1, 2])
    gd = Guidance(cfg, sched, m.view(2, 4, 8, 8), gs, class_latents=lat, order=order,
                  sorted_dists=dists, radii=radii)
    got = _first_step(model, cfg, x_T, y, gd, gs)

    i = S - 1
    st = _SpecDDPM(model, sched, i, x_T, y)
    ab, x, eps = st.ab, st.x, st.eps
    x0 = st.x0(eps)
    g = (m.double() - x0.flatten(1))
    tau = float(sched.timesteps[i]) / 1000             # SPEC 3: tau = t / T
    a = cfg.radius_a
    r_t = radii[0] + (radii[1] - radii[0]) * (math.exp(a * tau) - 1) / (math.exp(a) - 1)
    lengths = torch.clamp((dists <= r_t).sum(1), min=min(cfg.k_min, lat.shape[0]))
    gens = _gens([1, 2])
    patch = ops.time_aligned_patch(lat, order, lengths, ab, gens)
    g = spec_manifold_correct(x.flatten(1), patch.double(), g, cfg.k, cfg.d, 1.0, cfg.ridge, lengths)
    eps_hat = eps - 0.1 * math.sqrt(1 - ab) * g.view_as(eps)
    mu = st.mean(st.x0(eps_hat))
    logvar = st.logvar
    noise = torch.stack([torch.randn(4, 8, 8, generator=gg) for gg in gens]).double()
    want = mu + torch.exp(0.5 * logvar) * noise
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_paper_lambda_n_zero_is_mgd3(model):
    """Paper formulation: ManifoldGD with lambda_N = 0 is exactly MGD3, over a whole run."""
    cfg_m = _cfg(formulation="paper", lambda_n=0.0)
    cfg_g = _cfg(formulation="paper", method="mgd3")
    lat, m, order, dists, radii = _paper_setup(cfg_m)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 2])
    sched = make_schedule(10, "ddpm")
    kw = dict(class_latents=lat, order=order, sorted_dists=dists, radii=radii)
    ga, gb = _gens([3, 4]), _gens([3, 4])
    a = sample(model, sched, x_T, y, null_class=NULL, formulation="paper", generators=ga,
               guidance=Guidance(cfg_m, sched, m.view(2, 4, 8, 8), ga, **kw))
    b = sample(model, sched, x_T, y, null_class=NULL, formulation="paper", generators=gb,
               guidance=Guidance(cfg_g, sched, m.view(2, 4, 8, 8), gb, **kw))
    c = sample(model, sched, x_T, y, null_class=NULL, generators=_gens([3, 4]))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # and the guidance did something


def test_guidance_runs_only_before_t_stop():
    sched = make_schedule(10, "ddpm")
    m = torch.zeros(1, 4, 8, 8)
    off = Guidance(_cfg(), sched, m, _gens([0]))
    assert [i for i in range(10) if off.active(i)] == [6, 7, 8, 9]          # i > t_stop = 5
    pap = Guidance(_cfg(formulation="paper", method="mgd3"), sched, m, _gens([0]))
    assert [i for i in range(10) if pap.active(i)] == [5, 6, 7, 8, 9]       # the first t_stop = 5 steps


def test_no_guidance_after_t_stop_changes_nothing(model):
    """With t_stop = steps the official loop is never guided and equals plain sampling (the config refuses
    such a window for a run; the loop's own rule is tested here, on a config edited past its checks)."""
    with pytest.raises(ConfigError, match="acts on no step with --t-stop 10 and --steps 10"):
        _cfg(t_stop=10)
    cfg = dataclasses.replace(_cfg(), t_stop=10)
    sched = make_schedule(10, "ddpm")
    x_T = torch.randn(1, 4, 8, 8)
    m = torch.randn(1, 4, 8, 8)
    gs = _gens([9])
    a = sample(model, sched, x_T, torch.tensor([1]), null_class=NULL, generators=gs,
               guidance=Guidance(cfg, sched, m, gs))
    b = sample(model, sched, x_T, torch.tensor([1]), null_class=NULL, generators=_gens([9]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,msg", [
    # the default t_stop 25 is a step index: at 25 / 26 steps the official window (i > 25) is empty
    (dict(steps=26, t_stop=None), r"^--method manifoldgd: the guidance acts on no step with the default --t-stop 25 "
                                  r"and --steps 26 \(official formulation: .*below 25, e\.g\. --t-stop 13$"),
    (dict(steps=25, t_stop=None, method="mgd3"), "--method mgd3: the guidance acts on no step with the default"),
    (dict(steps=10, t_stop=9), "acts on no step with --t-stop 9 and --steps 10"),
    (dict(steps=10, t_stop=0, formulation="paper", method="mgd3"), r"paper formulation: the first t_stop steps\); "
                                                                  "give a --t-stop above 0$"),
    (dict(steps=10, t_stop=9, method="dit", cgs=True, cgs_steps="guided"), "^--cgs-steps guided: the guidance acts"),
    # a DDIM count no integer stride gives (DiT: 1,000 training steps), refused before any encoding
    (dict(steps=249, t_stop=5, sampler="ddim", backbone="dit"), "--steps 249: DDIM needs an integer stride"),
])
def test_empty_guidance_window_and_ddim_count_refused(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**kw)


def test_guidance_window_counts():
    from manifoldgd_fast.config import guided_steps
    from manifoldgd_fast.guidance import is_guided

    for S in (1, 2, 7, 26, 27, 50):
        for t in range(S + 1):
            for f in ("official", "paper"):
                assert guided_steps(f, S, t) == sum(is_guided(f, i, S, t) for i in range(S)), (f, S, t)
    assert _cfg(steps=27, t_stop=None).t_stop == 25          # one guided step: taken
    assert _cfg(steps=10, t_stop=10, method="dit").t_stop == 10   # no guidance to act: no window to check
    assert _cfg(steps=250, t_stop=5, sampler="ddim", backbone="dit").steps == 250
    assert _cfg(steps=249, t_stop=5, sampler="ddim").steps == 249   # no DiT model named: its own scheduler's rule


@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_step_guidance_default_window_guides_short_and_long_loops(formulation):
    """StepGuidance's default t_stop (config.suggest_t_stop) guides a step of a 2-step loop in either formulation
    (steps // 2 = 1 left the official window i > 1 empty), and a loop past DiT's 1,000 training steps is taken
    (a scheduler of its own: no DiT stride rule applies)."""
    from manifoldgd_fast.config import guided_steps, suggest_t_stop
    from manifoldgd_fast.guidance import StepGuidance

    lat = torch.randn(30, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    modes = lat[:2] + 0.05
    for S in (2, 3, 50):
        assert guided_steps(formulation, S, suggest_t_stop(formulation, S)) >= 1
    assert suggest_t_stop("official", 50) == 25 and suggest_t_stop("paper", 50) == 25
    lat = lat if formulation == "paper" else None  # (the official formulation reads no class latents)
    g = StepGuidance(modes, timesteps=[700, 200], formulation=formulation, class_latents=lat, n_classes=10)
    assert g.cfg.t_stop == (0 if formulation == "official" else 1)
    long = StepGuidance(modes, timesteps=list(range(1499, -1, -1)), formulation=formulation, class_latents=lat,
                        n_classes=10, num_train_timesteps=2000, betas=torch.linspace(1e-4, 0.02, 2000))
    assert long.cfg.steps == 1500


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=2, t_stop=None), r"^--steps 2: fewer than the DiT default --t-stop 25 .* e\.g\. --t-stop 0$"),
    (dict(steps=2, t_stop=None, formulation="paper"), r"e\.g\. --t-stop 1$"),
    (dict(steps=2, t_stop=1), r"give a --t-stop below 1, e\.g\. --t-stop 0$"),
    (dict(steps=1, t_stop=0), r"it guides no step of a 1-step run: give --steps 2 or more$"),
])
def test_short_runs_hint_a_t_stop_that_guides(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**kw)


@pytest.mark.parametrize("bandwidth", [None, 0.5, 2.0])
def test_mode_terms(bandwidth):
    """--kernel-bandwidth: sigma of rbf / laplace, c of the official imq, h of the paper's imq (None: 1, 1,
    sqrt(D)); |m - x0| = 5 and 0.5 (where c^2 against c in |x0 - m|^2 + c^2 shows)."""
    x0 = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    m = torch.zeros(2, 2)
    r = torch.tensor([[5.0], [0.5]])
    s = 1.0 if bandwidth is None else bandwidth
    h = math.sqrt(2) if bandwidth is None else bandwidth
    # paper (SPEC 4.3): g = grad log k(x0, m)
    assert torch.allclose(mode_grad_paper(x0, m, "rbf", bandwidth), -x0 / s ** 2)
    assert torch.allclose(mode_grad_paper(x0, m, "laplace", bandwidth), -x0 / (s * r))
    assert torch.allclose(mode_grad_paper(x0, m, "imq", bandwidth), -x0 * h ** 3 / (h * h + r ** 2) ** 1.5)
    # official (SPEC 4b.2): phi, (B, 1) for diff (B, D)
    diff = x0 - m
    assert torch.allclose(kernel_phi_official(diff, "rbf", bandwidth), torch.full((2, 1), -1 / s ** 2))
    assert torch.allclose(kernel_phi_official(diff, "laplace", bandwidth), -1 / (s * r))
    assert torch.allclose(kernel_phi_official(diff, "imq", bandwidth), -1 / (r ** 2 + s ** 2))
    if bandwidth is None:       # the written-out defaults
        assert torch.allclose(kernel_phi_official(x0[:1], "imq", None), torch.tensor([[-1 / 26.0]]))
        assert torch.allclose(mode_grad_paper(x0[:1], m[:1], "laplace", None), -x0[:1] / 5)


@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_step_guidance_in_a_diffusers_loop_equals_our_sampler(model, formulation):
    """The backend object plugged into a hand-written diffusers DDIM loop == our DDIM sampler, guided."""
    from diffusers import DDIMScheduler

    from manifoldgd_fast.config import derive_seed
    from manifoldgd_fast.guidance import StepGuidance

    S, B = 10, 2
    lat = torch.randn(30, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    modes = lat[:B] + 0.05
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 1])
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(S)
    lat = lat if formulation == "paper" else None  # (the official formulation reads no class latents)
    guide = StepGuidance(modes, timesteps=sched.timesteps, formulation=formulation, class_latents=lat,
                         n_classes=10, t_stop=5, seed=3, guidance_noise="generator")  # our CPU sampler's noise
    x = x_T.clone()
    with torch.no_grad():
        for step, t in enumerate(sched.timesteps):
            out = model(torch.cat([x, x]), timestep=torch.full((2 * B,), int(t)),
                        class_labels=torch.tensor([1, 1, NULL, NULL])).sample
            eps = out[:B, :4].clone()
            eps[:, :3] = out[B:, :3] + 4.0 * (out[:B, :3] - out[B:, :3])
            eps = guide(x, eps, step)
            x = sched.step(eps, t, x).prev_sample

    cfg = _cfg(formulation=formulation, sampler="ddim")
    s = make_schedule(S, "ddim")
    gens = [torch.Generator().manual_seed(derive_seed(3, "sample", b)) for b in range(B)]
    kw = {}
    if formulation == "paper":
        kw = paper_neighbourhoods(cfg, lat, modes)
    ours = sample(model, s, x_T, y, null_class=NULL, formulation=formulation, generators=gens,
                  guidance=Guidance(cfg, s, modes, gens, **kw))
    plain = sample(model, s, x_T, y, null_class=NULL, generators=gens)
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-3)


@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_step_guidance_calls_are_stateless_and_checked(formulation):
    """By default a StepGuidance call depends on its inputs alone (counter-based noise): a repeated or retried
    step gives the same eps, whatever ran before. A step index out of range (e.g. the timestep passed instead),
    a float step, a CFG-sized batch and another device are one-line ConfigErrors, not silently unguided steps."""
    from manifoldgd_fast.guidance import StepGuidance

    B = 2
    lat = torch.randn(30, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    modes = lat[:B] + 0.05
    ts = list(range(900, -1, -100))
    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(timesteps=ts, formulation=formulation, class_latents=lat if formulation == "paper" else None,
              n_classes=10, t_stop=5)
    g1, g2 = StepGuidance(modes, **kw), StepGuidance(modes, **kw)
    assert g1.cfg.guidance_noise == "philox"
    step = 1 if formulation == "paper" else 0               # guided: paper the first t_stop, official i > t_stop
    a = g1(x, eps, step)
    assert not torch.equal(a, eps)
    assert torch.equal(g1(x, eps, step), a)                  # the same step again
    g2(x, eps, step - 1 if step else 1)                      # another step first
    assert torch.equal(g2(x, eps, torch.tensor(step)), a)    # (a 0-d integer tensor is an index too)
    for bad, why in [(ts[0], r"step 900 is outside \[0, 10\): pass the step's index"), (-1, "outside"),
                     (2.0, "expected the step's index in the loop")]:
        with pytest.raises(ConfigError, match=why):
            g1(x, eps, bad)
    with pytest.raises(ConfigError, match=r"must be \(2, 4, 8, 8\), the modes' shape .* got \(4, 4, 8, 8\)"):
        g1(torch.cat([x, x]), torch.cat([eps, eps]), step)
    with pytest.raises(ConfigError, match=r"must be on the modes' device cpu, got meta"):
        g1(x.to("meta"), eps.to("meta"), step)
    with pytest.raises(ConfigError, match="expected the step's index in the loop"):
        g1(x, eps, True)                                    # (a bool was step 1)


def test_step_guidance_refuses_what_it_cannot_guide_in_one_line():
    """method dit / cgs ran MGD3's guidance silently; a misspelt method was a KeyError and IPC 0 a division by
    zero deep in the config; 1-D or numpy modes, a float timestep and seed None failed later or not at all."""
    from manifoldgd_fast.guidance import StepGuidance

    modes = torch.randn(2, 4, 8, 8)
    ts = list(range(900, -1, -100))
    for kw, why in [(dict(method="dit"), "method must be manifoldgd or mgd3, got 'dit'"),
                    (dict(method="cgs"), "method must be manifoldgd or mgd3, got 'cgs'"),
                    (dict(method="manifoldGD"), "method must be manifoldgd or mgd3, got 'manifoldGD'"),
                    (dict(modes=modes[:0]), r"modes must be a floating tensor \(B, C, h, w\)"),
                    (dict(modes=modes.flatten()), r"modes must be a floating tensor \(B, C, h, w\)"),
                    (dict(modes=modes.numpy()), "modes must be a floating tensor .* got ndarray"),
                    (dict(seed=None), "seed must be an integer, got None"),
                    (dict(timesteps=[900.5, 800]), "timesteps must be integers .* got 900.5")]:
        args = {**dict(modes=modes, timesteps=ts, n_classes=10, t_stop=5), **kw}
        with pytest.raises(ConfigError, match=why):
            StepGuidance(args.pop("modes"), **args)
    for kw, why in [(dict(method="manifoldGD"), "--method: unknown value 'manifoldGD'"),
                    (dict(ipc=0), "--ipc must be an integer >= 1, got 0")]:
        with pytest.raises(ConfigError, match=why):
            DistillConfig(**kw).resolve(10)


@pytest.mark.parametrize("name", ["lambda_normal", "ridge"])
def test_manifold_correct_refuses_negative_or_nan_scalars(name):
    x, p, g = torch.randn(1, 8), torch.randn(1, 20, 8), torch.randn(1, 8)
    for v in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=f"{name} must be a finite number >= 0, got {v!r}"):
            ops.manifold_correct(x, p, g, k=10, d=3, **{name: v})


@pytest.mark.parametrize("kw, why", [(dict(bandwidth=float("nan")), "bandwidth must be a finite number > 0"),
                                     (dict(bandwidth=0.0), "bandwidth must be a finite number > 0"),
                                     (dict(scale=float("nan")), "scale must be a finite number >= 0")])
def test_manifold_pull_refuses_nan_scalars(kw, why):
    x, cloud = torch.randn(1, 8), torch.randn(1, 20, 8)
    with pytest.raises(ConfigError, match=why):
        ops.manifold_pull(x, cloud, k=10, d=3, **{**dict(scale=1.0, bandwidth=0.1), **kw})


def test_official_cloud_is_sqrt_abar_points_plus_sqrt_one_minus_abar_noise():
    """The released cloud at abar = 0.25: sqrt(abar) (m + rho u) + sqrt(1 - abar) xi, drawn from each sample's
    generator in the release's order (directions, uniform radii, noise); test_sampler's own expectations build
    it with ops.official_cloud, so a sqrt dropped there showed nowhere else."""
    B, D, N, r, ab = 2, 16, 10, 0.3, 0.25
    modes = torch.randn(B, D)
    got = ops.official_cloud(modes, r, ab, [torch.Generator().manual_seed(s) for s in (1, 2)], n_points=N)
    for b, s in enumerate((1, 2)):
        g = torch.Generator().manual_seed(s)
        u = torch.randn(N, D, generator=g)
        u = u / u.norm(dim=1, keepdim=True)
        rho = torch.cat([torch.linspace(0.1, r, N // 2), torch.rand(N - N // 2, generator=g) * r])
        xi = torch.randn(N, D, generator=g)
        torch.testing.assert_close(got[b], 0.5 * (modes[b] + rho[:, None] * u) + math.sqrt(0.75) * xi)


def test_time_aligned_patch_is_sqrt_abar_z_plus_sqrt_one_minus_abar_xi():
    n, D = 20, 6
    lat = torch.randn(n, D)
    order = torch.stack([torch.randperm(n), torch.randperm(n)])
    lengths = torch.tensor([5, 12])
    p = ops.time_aligned_patch(lat, order, lengths, 0.25, [torch.Generator().manual_seed(s) for s in (0, 1)])
    for b, s in enumerate((0, 1)):
        L = int(lengths[b])
        xi = torch.randn(L, D, generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(p[b, :L], 0.5 * lat[order[b, :L]] + math.sqrt(0.75) * xi)


def test_guidance_passes_the_warm_up_radius_of_every_step(monkeypatch):
    """The official cloud's radius at each guided step is the warm-up's r (1 + (M - 1) s(p)), p = (i - (S - 1 -
    W)) / W (in a 50-step run the warm-up moves the cloud by ~1e-6: no trajectory test can see an off-by-one)."""
    cfg = DistillConfig(steps=50, t_stop=25, ipc=1, formulation="official", method="manifoldgd",
                        guidance_noise="generator").resolve(10)
    seen, real = {}, ops.official_cloud
    cur = [None]

    def spy(modes, radius, *a, **k):
        seen[cur[0]] = radius
        return real(modes, radius, *a, **k)

    monkeypatch.setattr(ops, "official_cloud", spy)
    gd = Guidance(cfg, make_schedule(50, "ddpm"), torch.zeros(1, 4, 8, 8), [torch.Generator().manual_seed(0)])
    x = torch.randn(1, 4, 8, 8)
    for i in range(49, 42, -1):
        cur[0] = i
        gd.official_term(i, x, x, None)
    r, W = cfg.manifold_radius, cfg.warm_steps
    assert len(seen) == 7
    for i, rr in seen.items():
        p = max(0.0, (i - (49 - W)) / W)
        assert rr == pytest.approx(r * (1 + (cfg.warm_mult - 1) * (math.exp(p) - 1) / (math.e - 1))), i


def test_the_paper_patch_is_never_shorter_than_k_min(monkeypatch):
    """A radius that holds no latent still gives each sample k_min = 2k patch rows."""
    cfg = DistillConfig(steps=10, t_stop=5, ipc=2, formulation="paper", method="manifoldgd", guidance_noise="generator",
                        radius_units="absolute", r_min=0.0, r_max=0.0).resolve(10)
    lat = torch.randn(40, 256)
    m = lat[:2] + 0.01
    seen, real = [], ops.manifold_correct
    monkeypatch.setattr(ops, "manifold_correct", lambda *a, **k: (seen.append(k["lengths"].tolist()), real(*a, **k))[1])
    gd = Guidance(cfg, make_schedule(10, "ddpm"), m.view(2, 4, 8, 8), [torch.Generator().manual_seed(s) for s in (0, 1)],
                  **paper_neighbourhoods(cfg, lat, m))
    x = torch.randn(2, 4, 8, 8)
    gd.paper_eps(9, x, x, x)
    assert seen == [[cfg.k_min, cfg.k_min]] and cfg.k_min == 20


def test_step_guidance_paper_v_prediction_returns_the_v_of_the_guided_eps():
    """Paper formulation on a v-prediction loop: the returned v is the one of the guided eps (x0 re-derived
    from it), as the eps loop's guided eps."""
    from manifoldgd_fast.guidance import StepGuidance

    lat = torch.randn(30, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    modes = lat[:2] + 0.05
    kw = dict(timesteps=list(range(900, -1, -100)), formulation="paper", method="mgd3", n_classes=10, t_stop=5)
    gv = StepGuidance(modes, prediction_type="v_prediction", **kw)
    ge = StepGuidance(modes, **kw)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    s, step = gv.schedule, 1
    i = s.steps - 1 - step
    eps, _ = s.eps_x0(i, x, v)
    e2, _ = s.eps_x0(i, x, gv(x, v, step))
    torch.testing.assert_close(e2, ge(x, eps, step), atol=1e-5, rtol=1e-5)


def test_the_backend_api_is_exported_from_the_package():
    import manifoldgd_fast as mf
    from manifoldgd_fast.guidance import StepGuidance

    assert mf.StepGuidance is StepGuidance and mf.manifold_correct is ops.manifold_correct
    assert mf.manifold_pull is ops.manifold_pull
    assert all(getattr(mf, name) is not None for name in mf.__all__)
    with pytest.raises(AttributeError):
        mf.no_such_name


def test_step_guidance_takes_a_batch_of_several_classes():
    """Paper formulation, a batch mixing two classes: with one latent tensor per class and classes=, each sample's
    neighbourhood is its own class's (radii, rows), as the pipeline's class batches build it; pooling the classes'
    latents into one tensor would give every sample the pooled radii."""
    from manifoldgd_fast.guidance import StepGuidance, merge_paper_neighbourhoods, paper_neighbourhoods

    la = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    lb = 5 + 3 * torch.randn(25, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    modes = torch.stack([la[0], lb[0], la[1]]) + 0.01
    kw = dict(timesteps=list(range(900, -1, -100)), formulation="paper", n_classes=10, t_stop=5)
    g = StepGuidance(modes, class_latents=[la, lb], classes=[0, 1, 0], **kw)
    cfg = g.cfg
    want = merge_paper_neighbourhoods([paper_neighbourhoods(cfg, la, modes[[0, 2]]),
                                       paper_neighbourhoods(cfg, lb, modes[[1]])], [(0, 0), (1, 0), (0, 1)])
    got = g.guidance
    assert torch.equal(got.order, want["order"]) and torch.equal(got.radii[1], want["radii"][1])
    assert float(got.radii[1][0]) != float(got.radii[1][1])          # each class its own r_max
    pooled = StepGuidance(modes, class_latents=torch.cat([la, lb]), **kw).guidance.radii
    assert float(pooled[1]) != float(got.radii[1][0])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(g(x, torch.randn_like(x), 1)).all()
    with pytest.raises(ConfigError, match="classes= must give each of the 3 modes its class index in \\[0, 2\\)"):
        StepGuidance(modes, class_latents=[la, lb], classes=[0, 2, 0], **kw)


@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_philox_guidance_noise_uses_the_fused_ops(model, formulation):
    """guidance_noise='philox': the manifold term is the fused op's (here its reference), keyed by
    (seed, step, sample id) — so a sample's term does not depend on the batch it is in."""
    cfg = _cfg(formulation=formulation, guidance_noise="philox")
    sched = make_schedule(cfg.steps, "ddpm")
    lat, m, order, dists, radii = _paper_setup(cfg)
    kw = dict(class_latents=lat, order=order, sorted_dists=dists, radii=radii) if formulation == "paper" else {}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    i = cfg.steps - 1
    gd = Guidance(cfg, sched, m.view(2, 4, 8, 8), _gens([0, 1]), noise_seed=11, sample_ids=[4, 9], **kw)
    abar = float(sched.alphas_cumprod[i])
    if formulation == "official":
        got = gd.official_term(i, x, x0, None)
        want = -0.1 * (x0 - m.view(2, 4, 8, 8)) + ops.manifold_pull_fused_ref(
            x.flatten(1), m, radius=0.1, alpha_bar=abar, seed=11, step=i, k=12, d=3, scale=0.1, bandwidth=0.2,
            ridge=1e-5, sample_ids=torch.tensor([4, 9])).view_as(x)
    else:
        eps = torch.randn(2, 4, 8, 8)
        got = gd.paper_eps(i, x, x0, eps)
        g = mode_grad_paper(x0.flatten(1), m, "rbf", None)
        lengths = modes_mod.patch_lengths(dists, gd.paper_radius(i), cfg.k_min)
        g = ops.manifold_correct_fused_ref(x.flatten(1), lat, order, lengths, g, alpha_bar=abar, seed=11, step=i,
                                           k=cfg.k, d=cfg.d, ridge=cfg.ridge, sample_ids=torch.tensor([4, 9]))
        want = eps - 0.1 * math.sqrt(1 - abar) * g.view_as(eps)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # sample 9 alone in its batch gets the same term
    solo = Guidance(cfg, sched, m[1:].view(1, 4, 8, 8), _gens([1]), noise_seed=11, sample_ids=[9],
                    **({k: (v[1:] if k in ("order", "sorted_dists") else v) for k, v in kw.items()}))
    if formulation == "official":
        torch.testing.assert_close(solo.official_term(i, x[1:], x0[1:], None), got[1:], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(solo.paper_eps(i, x[1:], x0[1:], eps[1:]), got[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("noise", ["generator", "philox"])
@pytest.mark.parametrize("sizes", [(40, 25), (17, 40, 33)])
def test_several_classes_paper_rows_are_their_own(noise, sizes):
    """merge_paper_neighbourhoods: in one batch of several classes (different sizes, so padded orders, and
    different radii), each row's guided eps equals what its class's batch alone gives, at every step."""
    from manifoldgd_fast.guidance import merge_paper_neighbourhoods

    cfg = _cfg(formulation="paper", guidance_noise=noise)
    sched = make_schedule(cfg.steps, "ddpm")
    parts, modes = [], []
    for c, n in enumerate(sizes):
        lat, m, *_ = _paper_setup(cfg, n=n, seed=c)
        lat = lat * (1 + c)                                     # other scales: other radii per class
        parts.append(paper_neighbourhoods(cfg, lat, m + c))
        modes.append(m + c)
    rows = [(c, j) for c in range(len(sizes)) for j in range(2)]
    kw = merge_paper_neighbourhoods(parts, rows)
    assert kw["order"].shape == (len(rows), max(sizes)) and kw["class_latents"].shape[0] == sum(sizes)
    assert kw["radii"][0].shape == (len(rows),) and kw["n_latents"].tolist() == [n for n in sizes for _ in range(2)]
    ids = [10 * c + j for c, j in rows]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(rows), 4, 8, 8, generator=g)
    x0 = torch.randn(len(rows), 4, 8, 8, generator=g)
    eps = torch.randn(len(rows), 4, 8, 8, generator=g)
    seeds = [100 + r for r in range(len(rows))]
    both = Guidance(cfg, sched, torch.cat(modes).view(-1, 4, 8, 8), _gens(seeds), noise_seed=3, sample_ids=ids, **kw)
    alone = [Guidance(cfg, sched, modes[c].view(2, 4, 8, 8), _gens(seeds[2 * c:2 * c + 2]), noise_seed=3,
                      sample_ids=ids[2 * c:2 * c + 2], **parts[c]) for c in range(len(sizes))]
    for i in reversed(range(cfg.steps)):
        if not both.active(i):
            continue
        got = both.paper_eps(i, x, x0, eps)
        want = torch.cat([a.paper_eps(i, x[2 * c:2 * c + 2], x0[2 * c:2 * c + 2], eps[2 * c:2 * c + 2])
                          for c, a in enumerate(alone)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - eps).abs().max() > 1e-3


@pytest.mark.parametrize("noise", ["generator", "philox"])
def test_half_precision_neighbourhoods(model, noise):
    """--neighbourhood-dtype bfloat16: the patch rows are held in bf16 (half the bytes the kNN + Gram
    passes stream), ranked exactly as in fp32; the guided eps moves by about bf16's rounding of the
    rows, not more, and the run's fingerprint changes (other bytes)."""
    from manifoldgd_fast.config import fingerprint

    c32 = _cfg(formulation="paper", guidance_noise=noise)
    c16 = _cfg(formulation="paper", guidance_noise=noise, neighbourhood_dtype="bfloat16")
    lat, m, *_ = _paper_setup(c32)
    k32, k16 = paper_neighbourhoods(c32, lat, m), paper_neighbourhoods(c16, lat, m)
    assert k32["class_latents"].dtype == torch.float32 and k16["class_latents"].dtype == torch.bfloat16
    assert torch.equal(k16["class_latents"].float(), lat.bfloat16().float())
    assert torch.equal(k16["order"], k32["order"]) and torch.equal(k16["sorted_dists"], k32["sorted_dists"])
    sched = make_schedule(c32.steps, "ddpm")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    i = c32.steps - 1
    out = [Guidance(c, sched, m.view(2, 4, 8, 8), _gens([0, 1]), noise_seed=11, sample_ids=[4, 9], **kw)
           .paper_eps(i, x, x0, eps) for c, kw in ((c32, k32), (c16, k16))]
    moved = float((out[1] - out[0]).abs().max() / (out[0] - eps).abs().max())
    assert 0 < moved < 2.0 ** -8, moved                    # relative to the correction: under bf16 rounding
    assert fingerprint(c16) != fingerprint(c32)
    assert fingerprint(c32) == fingerprint(_cfg(formulation="paper", guidance_noise=noise))


def test_paper_lambda_m_zero_is_plain_dit(model):
    """SPEC 4: with lambda_M = 0 the paper formulation is plain DiT, bit for bit, also where the patch noise
    would come from the step-noise generators (no patch is drawn)."""
    from manifoldgd_fast.guidance import paper_neighbourhoods

    cfg = _cfg(formulation="paper", lambda_m=0.0, guidance_noise="generator")
    sched = make_schedule(10, "ddpm")
    g = torch.Generator().manual_seed(4)
    lat = torch.randn(30, 256, generator=g)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([1, 1])
    gs = _gens([3, 4])
    gd = Guidance(cfg, sched, lat[:2].view(2, 4, 8, 8), gs, **paper_neighbourhoods(cfg, lat, lat[:2]))
    a = sample(model, sched, x_T, y, null_class=NULL, generators=gs, guidance=gd, formulation="paper")
    b = sample(model, sched, x_T, y, null_class=NULL, generators=_gens([3, 4]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", ["exponential", "cosine", "linear", "constant"])
def test_paper_radius_anneals_as_spec3_over_the_steps(schedule):
    """r_t = r_min + (r_max - r_min) s(tau), tau = t / T with t each step's own timestep, written out here."""
    r_min, r_max, a = 0.3, 2.0, 5.0
    s = {"exponential": lambda u: (math.exp(a * u) - 1) / (math.exp(a) - 1),
         "cosine": lambda u: 1 - math.cos(math.pi * u / 2), "linear": lambda u: u, "constant": lambda u: 1.0}[schedule]
    cfg = _cfg(formulation="paper", radius_schedule=schedule, radius_a=a)
    for sampler, steps in (("ddpm", 50), ("ddim", 20)):
        sched = make_schedule(steps, sampler)
        gd = Guidance(cfg, sched, torch.zeros(1, 4, 8, 8), _gens([0]), class_latents=torch.zeros(3, 256),
                      order=torch.zeros(1, 3, dtype=torch.long), sorted_dists=torch.zeros(1, 3), radii=(r_min, r_max))
        got = [gd.paper_radius(i) for i in range(steps)]
        want = [r_min + (r_max - r_min) * s(int(t) / 1000) for t in sched.timesteps.tolist()]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
        if schedule != "constant":
            assert got[0] < got[-1] < r_max          # shrinks along denoising (i = S-1 first)


def test_paper_formulation_defaults():
    """SPEC 2-4's defaults of the paper formulation, as resolved for small subsets and ImageNet-100/1k."""
    small, large = (DistillConfig(formulation="paper").resolve(n) for n in (10, 100))
    for c in (small, large):
        assert (c.k, c.k_min, c.d, c.ridge, c.lambda_n, c.lambda_m, c.t_stop, c.cfg_scale, c.steps) == \
               (10, 20, 3, 1e-4, 1.0, 0.1, 25, 4.0, 50)
        assert (c.radius_schedule, c.radius_a, c.radius_units, c.r_min, c.r_max) == ("exponential", 5.0, "quantile",
                                                                                      0.2, 0.9)
        assert (c.mode_method, c.mode_point) == ("divisive", "mean")
        assert c.cfg_channels == "all"  # SPEC 4: eps_u + w (eps_c - eps_u) on every channel
    assert (small.level, large.level) == (3, 2)
    # the official formulation keeps the released DiT sampler's CFG on the first 3 channels; a choice stands
    assert DistillConfig().resolve(10).cfg_channels == "3"
    assert DistillConfig(formulation="paper", cfg_channels="3").resolve(10).cfg_channels == "3"


def _adm_space_timesteps(num_timesteps, count):
    """ADM's respace.space_timesteps for one section (as DiT and the ManifoldGD release call it), written out."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return sorted(set(taken))


def test_ddpm_respacing_is_adms_for_every_step_count():
    """A running float sum, rounded per step: round(j * frac) keeps timestep 500 instead of 499 at S = 21."""
    assert space_timesteps(1000, 21, "ddpm")[10] == 499
    for S in range(1, 1001):
        assert space_timesteps(1000, S, "ddpm") == _adm_space_timesteps(1000, S), S


def test_step_guidance_official_warns_in_a_ddpm_loop():
    from diffusers import DDIMScheduler, DDPMScheduler

    from manifoldgd_fast.guidance import StepGuidance

    modes = torch.zeros(2, 4, 8, 8)
    for cls, warns in ((DDPMScheduler, True), (DDIMScheduler, False)):
        sched = cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        sched.set_timesteps(10)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            StepGuidance(modes, scheduler=sched, formulation="official")
        assert any("DDIM rule" in str(x.message) for x in w) == warns, cls.__name__
