"""Stable Diffusion sampling against diffusers' own schedulers: SD 1.5's DDIM and DDPM, the MGD3 release's
text-to-image rule, v / x0 prediction and diffusers' timestep spacings, StepGuidance in a diffusers loop,
and the scheduler settings that are forced, read or refused."""
import diffusers
import pytest
import torch
from sd_helpers import sd_args, sd_pipe, sd_variant

from manifoldgd_fast import DistillConfig
from manifoldgd_fast import sd as SD
from manifoldgd_fast.cli import main
from manifoldgd_fast.config import derive_seed
from manifoldgd_fast.errors import ConfigError, ModelError
from manifoldgd_fast.guidance import Guidance, is_guided, paper_neighbourhoods
from manifoldgd_fast.sampler import sample
from manifoldgd_fast.schedule import Schedule, make_schedule

pytest.importorskip("transformers", reason="the Stable Diffusion path needs transformers (CLIP; in the dev extra)")


# ---------------------------------------------------------------------------- SD scheduler settings
def test_ddim_matches_diffusers_stable_diffusion_pipeline(sd_world, sd_denoiser):
    """Unguided DDIM over the adapter == diffusers' StableDiffusionPipeline with DDIMScheduler configured as
    SD's (scaled_linear, steps_offset 1, set_alpha_to_one False, clip_sample False), same UNet, noise, prompts."""
    from diffusers import DDIMScheduler

    S = 10
    pipe = sd_pipe(sd_world["model"])
    pipe.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                   clip_sample=False, timestep_spacing="leading")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(["a photo of a dog", "a photo of a cherry"], negative_prompt=["", ""], num_inference_steps=S,
                   guidance_scale=7.5, latents=x_T.clone(), output_type="latent", height=16, width=16).images
    s = make_schedule(S, "ddim", **sd_denoiser.schedule_kwargs)
    assert s.timesteps.flip(0).tolist() == pipe.scheduler.timesteps.tolist() == list(range(901, 0, -100))
    ours = sample(sd_denoiser, s, x_T, torch.tensor([1, 0]), null_class=2, cfg_scale=7.5, cfg_channels="all")
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    # the last step lands on abar(t=0) (set_alpha_to_one=False), not on 1
    assert float(s.alphas_cumprod_prev[0]) == pytest.approx(1 - 0.00085, abs=1e-7)


def test_negative_prompt_is_the_cfg_null_row_as_diffusers(sd_world, sd_denoiser):
    """--negative-prompt: the CFG null row is its embedding, as diffusers' negative_prompt= (DDIM, same UNet,
    noise and prompts), and it moves the samples away from the empty prompt's."""
    from diffusers import DDIMScheduler

    neg = "blurry photo of a cat"
    den = SD.load_sd_denoiser(sd_world["model"], {0: "a photo of a cherry", 1: "a photo of a dog"}, negative_prompt=neg)
    assert den.negative_prompt == neg   # (kept for the manifest)
    pipe = sd_pipe(sd_world["model"])
    pipe.scheduler = DDIMScheduler.from_pretrained(sd_world["model"], subfolder="scheduler")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(["a photo of a dog", "a photo of a cherry"], negative_prompt=[neg] * 2, num_inference_steps=8,
                   guidance_scale=7.5, latents=x_T.clone(), output_type="latent", height=16, width=16).images
    s = make_schedule(8, "ddim", **den.schedule_kwargs)
    ours = sample(den, s, x_T, torch.tensor([1, 0]), null_class=2, cfg_scale=7.5, cfg_channels="all")
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    empty = sample(sd_denoiser, s, x_T, torch.tensor([1, 0]), null_class=2, cfg_scale=7.5, cfg_channels="all")
    assert (ours - empty).abs().max() > 1e-1


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers_scheduler_loop(sd_world, sd_denoiser, variance):
    """SD has no learned sigma: DDPM uses DDPMScheduler's fixed-small (posterior) variance over the
    'leading' + steps_offset timesteps, or beta_t with fixed_large, whose last step (t = 1 > 0) also
    draws noise of variance 1 - abar_1 there, as DDPMScheduler.step does."""
    from diffusers import DDPMScheduler

    S = 8
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1])
    s = make_schedule(S, "ddpm", **{**sd_denoiser.schedule_kwargs, "variance_type": variance})
    assert s.last_step_noise == (variance == "fixed_large")
    ours = sample(sd_denoiser, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all",
                  generators=[torch.Generator().manual_seed(g) for g in (5, 6)])

    sched = DDPMScheduler.from_config({**SD.SD15_SCHEDULER_CONFIG, "variance_type": variance})
    assert sched.config.variance_type == variance and sched.config.steps_offset == 1
    sched.set_timesteps(S)
    assert sched.timesteps.tolist() == s.timesteps.flip(0).tolist()
    gens = [torch.Generator().manual_seed(g) for g in (5, 6)]
    enc = torch.cat([sd_denoiser.embeddings[:2], sd_denoiser.embeddings[2:3].expand(2, -1, -1)])  # cond, then null
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = sd_denoiser.unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
            eps = out[2:] + 7.5 * (out[:2] - out[2:])
            x = sched.step(eps, t, x, generator=gens).prev_sample
    torch.testing.assert_close(ours, x, atol=5e-5, rtol=5e-5)


def test_mgd3_ddpm_is_the_release_text_to_image_rule(sd_world, sd_denoiser):
    """MGD3's text-to-image script (sample_mode_guidance_text2img.py) samples SD 1.5 with its
    DDPMModeScheduler, built from the folder's scheduler config: diffusers' DDPM step, then, while the
    timestep is above stop_t = 500, x_prev -= 0.1 * sqrt(fixed-small variance) * (x0_hat - mode), with CFG 8.
    Our --method mgd3 --sampler ddpm with the SD defaults is that loop; stop at timestep 500 is --t-stop 4
    at 10 steps ('leading' timesteps 901, 801, ..., 1: guided while 100 i + 1 > 500)."""
    from diffusers import DDPMScheduler

    S, B, stop_t = 10, 2, 500
    cfg = DistillConfig(steps=S, t_stop=4, ipc=B, method="mgd3", sampler="ddpm", backend="reference").resolve(
        3, backbone="sd")
    assert cfg.cfg_scale == 8.0 and cfg.lambda_m == 0.1 and cfg.kernel == "rbf" and cfg.formulation == "official"
    s = make_schedule(S, "ddpm", **sd_denoiser.schedule_kwargs)
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    modes = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([1, 1])
    seeds = (31, 32)
    run = dict(null_class=2, cfg_scale=cfg.cfg_scale, cfg_channels="all")
    gens = [torch.Generator().manual_seed(g) for g in seeds]
    ours = sample(sd_denoiser, s, x_T, y, guidance=Guidance(cfg, s, modes, gens), generators=gens, **run)

    sched = DDPMScheduler.from_config(SD.read_scheduler_config(sd_world["model"], sd_world["model"]))
    sched.set_timesteps(S)
    gens = [torch.Generator().manual_seed(g) for g in seeds]
    enc = torch.cat([sd_denoiser.embeddings[y], sd_denoiser.embeddings[2:3].expand(B, -1, -1)])
    x, guided = x_T.clone(), 0
    with torch.no_grad():
        for t in sched.timesteps:
            out = sd_denoiser.unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
            res = sched.step(out[B:] + 8.0 * (out[:B] - out[B:]), t, x, generator=gens)
            x = res.prev_sample
            if t > stop_t:
                guided += 1
                x = x - (res.pred_original_sample - modes) * 0.1 * sched._get_variance(t) ** 0.5
    assert guided == 5
    torch.testing.assert_close(ours, x, atol=5e-5, rtol=5e-5)
    plain = sample(sd_denoiser, s, x_T, y, generators=[torch.Generator().manual_seed(g) for g in seeds], **run)
    assert (ours - plain).abs().max() > 1e-2


def _step_slice(s: Schedule, i: int) -> Schedule:
    """The one-step schedule of step index i (its own coefficients)."""
    kw = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in s.__dict__.items()}
    kw["host"] = {k: v[i:i + 1] for k, v in s.host.items()}
    return Schedule(**kw)


@pytest.mark.parametrize("formulation, method", [("official", "manifoldgd"), ("paper", "manifoldgd"),
                                                 ("official", "mgd3")])
def test_guided_and_unguided_steps_differ_only_before_t_stop(sd_denoiser, formulation, method):
    """Along the guided trajectory, re-run each step unguided from the same latent: it differs from the
    guided step exactly while guidance is on (before t_stop), and is identical after."""
    S, t_stop, B = 8, 4, 2
    cfg = DistillConfig(steps=S, t_stop=t_stop, ipc=B, formulation=formulation, method=method, sampler="ddim",
                        backend="reference").resolve(3, backbone="sd")   # DDIM: an unguided re-run is deterministic
    assert cfg.cfg_scale == 8.0 and cfg.cfg_channels == "all"
    s = make_schedule(S, cfg.sampler, **sd_denoiser.schedule_kwargs)
    lat = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    modes = lat[:B] + 0.05
    gens = [torch.Generator().manual_seed(derive_seed(0, "sample", b)) for b in range(B)]
    kw = {}
    if formulation == "paper":
        kw = paper_neighbourhoods(cfg, lat, modes)
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 1])
    run = dict(null_class=2, cfg_scale=cfg.cfg_scale, cfg_channels=cfg.cfg_channels, formulation=formulation)
    traj = {}
    sample(sd_denoiser, s, x_T, y, guidance=Guidance(cfg, s, modes, gens, **kw), generators=gens,
           callback=lambda i, x: traj.__setitem__(i, x.clone()), **run)
    guided_steps = []
    for i in reversed(range(S)):
        x_in = x_T if i == S - 1 else traj[i + 1]
        plain = sample(sd_denoiser, _step_slice(s, i), x_in, y, **run)
        if is_guided(formulation, i, S, t_stop):
            guided_steps.append(i)
            assert (plain - traj[i]).abs().max() > 1e-4, f"step {i} should be guided"
        else:
            torch.testing.assert_close(plain, traj[i], atol=1e-6, rtol=0)
    assert guided_steps == ([7, 6, 5] if formulation == "official" else [7, 6, 5, 4])


# ---------------------------------------------------------------------------- against diffusers' schedulers, in detail
def _ddim_loop(sd_denoiser, sched, x_T, y, S, eta=0.0, noises=None):
    """A hand-written diffusers DDIM loop over the adapter's UNet (CFG 7.5 on all channels)."""
    sched.set_timesteps(S)
    B = x_T.shape[0]
    null = sd_denoiser.embeddings[len(sd_denoiser.prompts):len(sd_denoiser.prompts) + 1].expand(B, -1, -1)
    enc = torch.cat([sd_denoiser.embeddings[y], null])
    x = x_T.clone()
    with torch.no_grad():
        for j, t in enumerate(sched.timesteps):
            out = sd_denoiser.unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
            eps = out[B:] + 7.5 * (out[:B] - out[B:])
            kw = dict(eta=eta, variance_noise=noises[j]) if noises is not None else {}
            x = sched.step(eps, t, x, **kw).prev_sample
    return x


def _diffusers_before(major: int, minor: int) -> bool:
    return tuple(int(p) for p in diffusers.__version__.split(".")[:2]) < (major, minor)


@pytest.mark.parametrize("pred, spacing, sampler, S, zero_snr", [
    ("v_prediction", "leading", "ddim", 10, False),
    ("v_prediction", "trailing", "ddim", 30, False),     # uneven: DDIM steps to t - 33, not to the next kept t
    ("epsilon", "linspace", "ddim", 10, False),          # uneven, and the last step starts at t = 0
    ("epsilon", "trailing", "ddpm", 30, False),          # DDPM steps to the next kept t
    ("v_prediction", "linspace", "ddpm", 10, False),
    ("sample", "leading", "ddim", 10, False),
    # rescale_betas_zero_snr: trailing and linspace start at t = 999, where abar = 0 and eps = x_t
    ("v_prediction", "trailing", "ddim", 10, True),
    ("v_prediction", "trailing", "ddpm", 10, True),
    ("sample", "linspace", "ddim", 10, True),
    ("v_prediction", "leading", "ddim", 10, True),       # rescaled betas, no abar = 0 step
])
def test_prediction_types_and_spacings_sample_as_diffusers(sd_world, tmp_path, pred, spacing, sampler, S, zero_snr):
    """A folder whose scheduler asks for v / x0 prediction, diffusers' trailing / linspace spacing or zero
    terminal SNR: unguided sampling over the adapter equals a loop over diffusers' own scheduler of that
    folder, on the UNet's raw output, same noise; the fast loop gives the reference's latents."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from manifoldgd_fast.fastloop import FastSampler
    from manifoldgd_fast.sampler import Sampling

    folder = sd_variant(sd_world, tmp_path, {**SD.SD15_SCHEDULER_CONFIG, "prediction_type": pred,
                                             "timestep_spacing": spacing, "rescale_betas_zero_snr": zero_snr})
    den = SD.load_sd_denoiser(folder, {0: "a cherry", 1: "a dog"})
    assert den.prediction_type == pred and den.schedule_kwargs["spacing"] == spacing
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    sched = cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert sched.config.prediction_type == pred and sched.config.timestep_spacing == spacing
    s = make_schedule(S, sampler, **den.schedule_kwargs)
    sched.set_timesteps(S)
    assert s.timesteps.flip(0).tolist() == sched.timesteps.tolist()
    if sampler == "ddpm" and _diffusers_before(0, 32) and (-sched.timesteps.diff() != 1000 // S).any():
        pytest.skip(f"diffusers {diffusers.__version__}'s DDPMScheduler steps to t - T // S, not to the next "
                    "kept timestep, where the spacing is uneven (fixed in 0.32); ours steps to the next one")
    assert s.zero_snr(S - 1) == (zero_snr and spacing != "leading") and not s.zero_snr(S - 2)
    torch.testing.assert_close(s.alphas_cumprod.flip(0), sched.alphas_cumprod[sched.timesteps].float(),
                               atol=1e-6, rtol=0)
    if sampler == "ddim":   # abar of the step's target as DDIMScheduler.step takes it: t - T // S
        prev = sched.timesteps - 1000 // S
        want = torch.where(prev >= 0, sched.alphas_cumprod[prev.clamp(min=0)], sched.final_alpha_cumprod)
        torch.testing.assert_close(s.alphas_cumprod_prev.flip(0), want.float(), atol=1e-6, rtol=0)  # diffusers: fp32 cumprod

    B, seeds = 2, (31, 32)
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([1, 0])
    gens = lambda: [torch.Generator().manual_seed(g) for g in seeds]  # noqa: E731
    ours = sample(den, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all", generators=gens())
    enc = torch.cat([den.embeddings[y], den.embeddings[2:3].expand(B, -1, -1)])
    x, g = x_T.clone(), gens()
    with torch.no_grad():
        for t in sched.timesteps:
            out = den.unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample   # v, x0 or eps
            mixed = out[B:] + 7.5 * (out[:B] - out[B:])
            x = sched.step(mixed, t, x, **({"generator": g} if sampler == "ddpm" else {})).prev_sample
    torch.testing.assert_close(ours, x, atol=5e-5, rtol=5e-5)
    fast, _ = FastSampler(Sampling(den, s, B, cfg_scale=7.5, cfg_channels="all")).sample(x_T, y, gens())
    torch.testing.assert_close(fast, ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_step_guidance_takes_and_returns_v(sd_world, tmp_path, zero_snr):
    """StepGuidance in a diffusers DDIM loop over a v-prediction UNet (prediction_type read from the
    scheduler): the loop's v, guided, equals our guided sampler over the adapter. With zero terminal SNR
    and trailing spacing the first, guided step is at abar = 0, where only x0 carries the guidance."""
    from diffusers import DDIMScheduler

    from manifoldgd_fast.guidance import StepGuidance

    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_snr else {}
    folder = sd_variant(sd_world, tmp_path, {**SD.SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction", **extra})
    den = SD.load_sd_denoiser(folder, {0: "a cherry", 1: "a dog"})
    S, B = 6, 2
    modes = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 1])
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    sched.set_timesteps(S)
    guide = StepGuidance(modes, scheduler=sched, formulation="official", method="mgd3", n_classes=3, t_stop=3)
    assert guide.prediction_type == "v_prediction"
    enc = torch.cat([den.embeddings[y], den.embeddings[2:3].expand(B, -1, -1)])
    x = x_T.clone()
    with torch.no_grad():
        for step, t in enumerate(sched.timesteps):
            out = den.unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
            x = sched.step(guide(x, out[B:] + 7.5 * (out[:B] - out[B:]), step), t, x).prev_sample
    s = make_schedule(S, "ddim", **den.schedule_kwargs)
    gens = [torch.Generator().manual_seed(b) for b in range(B)]
    ours = sample(den, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all", generators=gens,
                  guidance=Guidance(guide.cfg, s, modes, gens))
    plain = sample(den, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all")
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3
    assert s.zero_snr(S - 1) == zero_snr and guide.schedule.zero_snr(S - 1) == zero_snr
    with pytest.raises(ConfigError, match="prediction_type"):
        StepGuidance(modes, scheduler=sched, prediction_type="flow")
    if zero_snr:   # an eps model cannot be stepped at abar = 0; the paper formulation cannot guide it
        with pytest.raises(ConfigError, match="abar = 0"):
            StepGuidance(modes, scheduler=sched, prediction_type="epsilon")
        with pytest.raises(ConfigError, match="--formulation paper guides timestep 999"):
            StepGuidance(modes, scheduler=sched, formulation="paper", method="mgd3", n_classes=3, t_stop=3)


def test_ddim_eta_adds_noise_on_the_last_step_as_diffusers(sd_denoiser):
    """eta > 0: DDIMScheduler.step adds std_dev_t * noise on every step, the last included; with
    set_alpha_to_one=False (SD) that last sigma is nonzero. Same per-step noise -> same latents. The
    fast loop pre-draws that last step's noise too; DiT's schedule (ending at abar = 1) draws none there."""
    from diffusers import DDIMScheduler

    from manifoldgd_fast.fastloop import FastSampler, predraw_noise
    from manifoldgd_fast.sampler import Sampling, draws_noise

    S, B = 6, 2
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    y = torch.tensor([1, 0])
    s = make_schedule(S, "ddim", **sd_denoiser.schedule_kwargs)
    assert s.last_step_noise and draws_noise(s, 0, 1.0) and not draws_noise(s, 0, 0.0)
    assert not make_schedule(S, "ddim").last_step_noise and not draws_noise(make_schedule(S, "ddim"), 0, 1.0)
    assert not draws_noise(make_schedule(S, "ddpm", **sd_denoiser.schedule_kwargs), 0)
    seeds = (21, 22)
    ours = sample(sd_denoiser, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all", ddim_eta=1.0,
                  generators=[torch.Generator().manual_seed(g) for g in seeds])
    gens = [torch.Generator().manual_seed(g) for g in seeds]
    noises = [torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens]) for _ in range(S)]  # step-major
    sched = DDIMScheduler.from_config(SD.SD15_SCHEDULER_CONFIG)
    assert sched.config.set_alpha_to_one is False and sched.config.clip_sample is False
    ref = _ddim_loop(sd_denoiser, sched, x_T, y, S, eta=1.0, noises=noises)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)

    run = Sampling(sd_denoiser, s, 2, cfg_scale=7.5, cfg_channels="all", ddim_eta=1.0)
    pre = predraw_noise(run, (4, 8, 8), [torch.Generator().manual_seed(g) for g in seeds], "cpu")
    torch.testing.assert_close(pre[0], noises[-1], atol=0, rtol=0)       # the last step (i = 0) has its noise
    fast, _ = FastSampler(run).sample(x_T, y, [torch.Generator().manual_seed(g) for g in seeds])
    torch.testing.assert_close(fast, ours, atol=1e-6, rtol=0)


def test_a_scheduler_config_other_than_sd15_is_read_as_diffusers_reads_it(sd_world, tmp_path):
    """beta_start / beta_end differing from SD 1.5's: our schedule and unguided DDIM equal
    DDIMScheduler.from_pretrained(folder, subfolder="scheduler") over the same UNet."""
    from diffusers import DDIMScheduler

    cfg = {**SD.SD15_SCHEDULER_CONFIG, "beta_start": 0.0009, "beta_end": 0.013}
    folder = sd_variant(sd_world, tmp_path, cfg)
    den = SD.load_sd_denoiser(folder, {0: "a cherry", 1: "a dog"})
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert sched.config.beta_end == 0.013 and sched.config.set_alpha_to_one is False
    S = 5
    s = make_schedule(S, "ddim", **den.schedule_kwargs)
    sched.set_timesteps(S)
    assert s.timesteps.flip(0).tolist() == sched.timesteps.tolist()
    torch.testing.assert_close(s.alphas_cumprod.flip(0), sched.alphas_cumprod[sched.timesteps], atol=1e-6, rtol=0)
    sd15 = make_schedule(S, "ddim", **SD.diffusers_schedule_kwargs(SD.SD15_SCHEDULER_CONFIG))
    assert (s.alphas_cumprod - sd15.alphas_cumprod).abs().max() > 1e-3     # the file's betas, not SD 1.5's
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1])
    ours = sample(den, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all")
    torch.testing.assert_close(ours, _ddim_loop(den, sched, x_T, y, S), atol=2e-5, rtol=2e-5)


def test_steps_offset_and_clip_sample_are_forced_as_the_pipeline_does(sd_world, tmp_path, caplog):
    """StableDiffusionPipeline sets steps_offset 1 and clip_sample False (deprecation warnings); so do we,
    with a warning naming the folder. A folder without scheduler/ samples with SD 1.5's settings, saying so."""
    cfg = {**SD.SD15_SCHEDULER_CONFIG, "steps_offset": 0, "clip_sample": True}
    folder = sd_variant(sd_world, tmp_path, cfg)
    want = SD.diffusers_schedule_kwargs(SD.SD15_SCHEDULER_CONFIG)
    with caplog.at_level("WARNING", logger="manifoldgd_fast"):
        got = SD.read_scheduler_config(folder, folder)
    assert got["steps_offset"] == 1 and got["clip_sample"] is False
    msgs = [r.getMessage() for r in caplog.records]
    assert any("steps_offset 0" in m and folder in m for m in msgs)
    assert any("clip_sample true" in m and folder in m for m in msgs)
    with pytest.warns(FutureWarning) as w:                        # diffusers' own deprecation warnings
        pipe = sd_pipe(folder)
    assert any("steps_offset" in str(x.message) for x in w) and any("clip_sample" in str(x.message) for x in w)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    kw = SD.diffusers_schedule_kwargs(got)
    assert kw["steps_offset"] == 1 and (kw["betas"] == want["betas"]).all()

    bare = sd_variant(sd_world, tmp_path, drop_scheduler=True, name="bare")
    caplog.clear()
    with caplog.at_level("WARNING", logger="manifoldgd_fast"):
        den = SD.load_sd_denoiser(bare, {0: "a cherry"})
    assert any("SD 1.5's scheduler settings" in r.getMessage() and bare in r.getMessage() for r in caplog.records)
    assert {k: v for k, v in den.schedule_kwargs.items() if k != "betas"} == \
        {k: v for k, v in want.items() if k != "betas"}
    # a key missing from the file takes SD 1.5's value in both readers (not DDIMScheduler's linear betas)
    partial = {k: v for k, v in SD.SD15_SCHEDULER_CONFIG.items() if k not in ("beta_schedule", "beta_end")}
    assert (SD.diffusers_schedule_kwargs(partial)["betas"] == want["betas"]).all()
    assert SD.read_scheduler_config(sd_variant(sd_world, tmp_path, partial, name="partial"), "x")["beta_end"] == 0.012


def test_ddpm_variance_type_is_read_as_diffusers_does():
    """DDPMScheduler's variance_type: fixed_small (its default, and a file without the key), fixed_large,
    and their *_log forms (the same variance); the DDPM chain takes the posterior's or beta_t."""
    from manifoldgd_fast.schedule import make_schedule

    base = dict(SD.SD15_SCHEDULER_CONFIG)
    for given, want in [(None, "fixed_small"), ("fixed_small", "fixed_small"), ("fixed_small_log", "fixed_small"),
                        ("fixed_large", "fixed_large"), ("fixed_large_log", "fixed_large")]:
        kw = SD.diffusers_schedule_kwargs(base if given is None else {**base, "variance_type": given})
        assert kw["variance_type"] == want
        s = make_schedule(10, "ddpm", **kw)
        assert s.variance_type == want
        # DDPMScheduler draws noise at the last step (t = 1): of variance 1 - abar_1 with fixed_large
        assert s.last_step_noise == (want == "fixed_large")
    # DiT's (ADM's) fixed_large never does, nor a diffusers chain that ends at t = 0 (linspace)
    assert not make_schedule(10, "ddpm").last_step_noise
    lin = SD.diffusers_schedule_kwargs({**base, "variance_type": "fixed_large", "timestep_spacing": "linspace"})
    assert not make_schedule(10, "ddpm", **lin).last_step_noise


@pytest.mark.parametrize("key, value, why", [
    ("prediction_type", "flow", "prediction_type 'flow' is not supported (epsilon, v_prediction, sample)"),
    ("timestep_spacing", "karras", "timestep_spacing 'karras' is not supported (leading, trailing, linspace)"),
    ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr true needs prediction_type v_prediction or sample"),
    ("beta_schedule", "squaredcos_cap_v2", "beta_schedule 'squaredcos_cap_v2' is not supported (scaled_linear or linear)"),
    ("variance_type", "learned_range", "variance_type 'learned_range' is not supported (fixed_small or fixed_large"),
    ("thresholding", True, "thresholding true (dynamic thresholding of x0, for pixel-space models) is not supported"),
    # damaged values: a ValueError / TypeError / IndexError traceback, or a line that named no file (audit)
    ("num_train_timesteps", "abc", "num_train_timesteps must be an integer >= 1, got 'abc'"),
    ("num_train_timesteps", 0, "num_train_timesteps must be an integer >= 1, got 0"),
    ("beta_start", None, "beta_start must be a number in (0, 1), got None"),
    ("beta_end", 2.0, "beta_end must be a number in (0, 1), got 2.0"),
    ("trained_betas", [], "trained_betas must be a non-empty list of numbers in (0, 1]"),
    ("trained_betas", [0.5, 1.5], "trained_betas must be a non-empty list of numbers in (0, 1]"),
    ("trained_betas", ["x"], "trained_betas must be a non-empty list of numbers in (0, 1]"),
])
def test_unsupported_scheduler_settings_fail_before_any_weights_load(sd_world, tmp_path, capsys, monkeypatch,
                                                                     key, value, why):
    from transformers import CLIPTextModel

    folder = sd_variant(sd_world, tmp_path, {**SD.SD15_SCHEDULER_CONFIG, key: value})

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the scheduler config was checked")

    monkeypatch.setattr(SD, "_load_from_folder", no_load)
    monkeypatch.setattr(CLIPTextModel, "from_pretrained", no_load)
    with pytest.raises(ModelError) as e:
        SD.load_sd(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--model {folder}: ") and why in msg and "scheduler_config.json" in msg
    rc = main(sd_args({**sd_world, "model": folder}, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and folder in err[0] and why in err[0]


def test_step_guidance_reads_a_diffusers_scheduler(sd_denoiser):
    """StepGuidance(scheduler=) takes the noise levels from the scheduler's alphas_cumprod: in a diffusers
    DDIM loop on SD's schedule it equals our guided sampler; the DiT default betas would not."""
    from diffusers import DDIMScheduler

    from manifoldgd_fast.guidance import StepGuidance

    S, B = 6, 2
    lat = torch.randn(30, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    modes = lat[:B] + 0.05
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 1])
    sched = DDIMScheduler.from_config(SD.SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(S)
    guide = StepGuidance(modes, scheduler=sched, formulation="official", method="mgd3", n_classes=3, t_stop=3)
    dit_betas = StepGuidance(modes, timesteps=sched.timesteps, formulation="official", method="mgd3",
                             n_classes=3, t_stop=3)
    s = make_schedule(S, "ddim", **sd_denoiser.schedule_kwargs)
    torch.testing.assert_close(guide.schedule.alphas_cumprod, s.alphas_cumprod, atol=1e-6, rtol=0)
    assert (dit_betas.schedule.alphas_cumprod - s.alphas_cumprod).abs().max() > 1e-2
    enc = torch.cat([sd_denoiser.embeddings[y], sd_denoiser.embeddings[2:3].expand(B, -1, -1)])
    x = x_T.clone()
    with torch.no_grad():
        for step, t in enumerate(sched.timesteps):
            out = sd_denoiser.unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
            eps = guide(x, out[B:] + 7.5 * (out[:B] - out[B:]), step)
            x = sched.step(eps, t, x).prev_sample
    cfg = guide.cfg
    gens = [torch.Generator().manual_seed(b) for b in range(B)]
    ours = sample(sd_denoiser, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all", generators=gens,
                  guidance=Guidance(cfg, s, modes, gens))
    plain = sample(sd_denoiser, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all")
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="not both"):
        StepGuidance(modes, scheduler=sched, betas=SD.diffusers_schedule_kwargs({})["betas"])


def test_sd_defaults_follow_the_mgd3_text_to_image_script():
    """Unset, SD samples with DDPM, CFG 8 and guidance while the timestep > 500 (SD 1.5's leading
    spacing: step i is timestep i * (1000 // S) + 1): official t_stop 24 at 50 steps (guided while
    i > 24), paper 25 (the first 25 steps), 12 / 12 at 25 steps; a DiT keeps 25; a given value stays."""
    from manifoldgd_fast.guidance import is_guided

    def res(backbone, **kw):
        return DistillConfig(**kw).resolve(10, "cpu", backbone=backbone)

    for S, formulation in [(50, "official"), (50, "paper"), (25, "official"), (25, "paper"), (100, "official")]:
        c = res("sd", steps=S, formulation=formulation)
        ratio = 1000 // S
        assert [is_guided(formulation, i, S, c.t_stop) for i in range(S)] == [i * ratio + 1 > 500 for i in range(S)]
    assert res("sd", steps=50).t_stop == 24 and res("sd", steps=50, formulation="paper").t_stop == 25
    assert res("sd").sampler == "ddpm" and res("sd").cfg_scale == 8.0
    assert res("dit").t_stop == 25 and res("dit", steps=100).t_stop == 25 and res("sd", t_stop=7).t_stop == 7
    # a DiT run shorter than its default t_stop: the message names --steps and what to give, not a --t-stop never given
    with pytest.raises(ConfigError, match=r"^--steps 20: fewer than the DiT default --t-stop 25 .* e\.g\. --t-stop 10$"):
        res("dit", steps=20)
    assert res("dit", steps=20, t_stop=10).t_stop == 10 and res("sd", steps=20).t_stop < 20
    # the model's own spacing places it (trailing at 25 / 30 steps and linspace at 30 have a step at
    # t = 519, 532, 517 that SD 1.5's leading rule would leave unguided)
    from manifoldgd_fast.schedule import space_timesteps

    for spacing, offset in [("trailing", 0), ("linspace", 0), ("leading", 1), ("leading", 0)]:
        kw = {**SD.diffusers_schedule_kwargs({"timestep_spacing": spacing, "steps_offset": offset})}
        for S in (25, 30, 50):
            ts = space_timesteps(1000, S, "ddpm", spacing=spacing, steps_offset=offset)
            for formulation in ("official", "paper"):
                c = DistillConfig(steps=S, formulation=formulation).resolve(10, "cpu", backbone="sd", schedule_kw=kw)
                assert [is_guided(formulation, i, S, c.t_stop) for i in range(S)] == [t > 500 for t in ts]


# ---------------------------------------------------------------------------- schedule tables by hand
def test_prev_timestep_zero_is_a_real_timestep_not_the_end_of_the_chain():
    """prev_timesteps [0, 10, 20] for kept [10, 20, 30]: the first step goes to training timestep 0, whose
    abar is 1 - beta_0 (diffusers' DDIMScheduler with set_alpha_to_one False), not the chain's end (1)."""
    import numpy as np

    from manifoldgd_fast.schedule import schedule_from_timesteps

    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1.0 - betas)
    s = schedule_from_timesteps([10, 20, 30], "ddim", betas=betas, prev_timesteps=[0, 10, 20])
    expect = torch.tensor([abar[0], abar[10], abar[20]], dtype=torch.float32)
    assert float(s.alphas_cumprod_prev[0]) == pytest.approx(1.0 - 1e-4, abs=1e-7)
    torch.testing.assert_close(s.alphas_cumprod_prev, expect, atol=0, rtol=0)
    # the chain written out (first prev -1) is the chain itself: ends at 1
    c = schedule_from_timesteps([10, 20, 30], "ddim", betas=betas, prev_timesteps=[-1, 10, 20])
    assert float(c.alphas_cumprod_prev[0]) == 1.0


def test_clipped_posterior_log_variance_takes_the_second_value_at_the_first_step():
    """ADM: the posterior variance is 0 at the first step of the chain; its clipped log repeats step 1's
    value there: log(beta_1 (1 - abar_0) / (1 - abar_1)), finite."""
    import math

    import numpy as np

    from manifoldgd_fast.schedule import schedule_from_timesteps

    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1.0 - betas)
    s = schedule_from_timesteps([0, 10, 20], "ddpm", betas=betas)
    a0, a1 = abar[0], abar[10]
    b1 = 1.0 - a1 / a0
    lv = s.posterior_log_variance_clipped
    assert torch.isfinite(lv).all()
    assert float(lv[0]) == float(lv[1])
    assert float(lv[1]) == pytest.approx(math.log(b1 * (1.0 - a0) / (1.0 - a1)), rel=1e-6)
