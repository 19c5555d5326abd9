"""Stable Diffusion backbone: folder loading, prompts, SD scheduler settings against diffusers,
guidance at SD's latent size, and the whole pipeline on a tiny random-init SD 1.5-layout folder."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from manifoldgd_fast import DistillConfig, distill
from manifoldgd_fast import sd as SD
from manifoldgd_fast.cli import main
from manifoldgd_fast.config import derive_seed
from manifoldgd_fast.errors import ConfigError, ModelError
from manifoldgd_fast.guidance import Guidance, is_guided, paper_neighbourhoods
from manifoldgd_fast.models import dit_info, model_family
from manifoldgd_fast.sampler import sample
from manifoldgd_fast.schedule import Schedule, make_schedule

pytest.importorskip("transformers")

CLASSES = ["n01440764", "golden_retriever", "cherry"]      # sorted labels: cherry 0, golden_retriever 1, n01440764 2
PROMPTS = {"cherry": "a photo of a sweet cherry", "golden_retriever": "a photo of a golden retriever",
           "n01440764": "a photo of a tench"}
FAST = ["--ipc", "2", "--steps", "6", "--t-stop", "3", "--batch-size", "2"]


@pytest.fixture(scope="module")
def sd_world(tmp_path_factory):
    """3 classes x 12 images and a tiny SD folder (UNet on 4x8x8 latents, VAE 16 px <-> 4x8x8)."""
    root = tmp_path_factory.mktemp("sdworld")
    data = make_image_folder(root / "data", CLASSES, 12, size=20)
    model = SD.build_tiny_sd_folder(str(root / "sd"), sample_size=8, vae_sample_size=16)
    return {"root": str(root), "data": data, "model": model, "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def denoiser(sd_world):
    prompts = {0: "a photo of a cherry", 1: "a photo of a dog"}
    return SD.load_sd_denoiser(sd_world["model"], prompts)


def _args(world, out, *extra):
    return ["distill", "--data", world["data"], "--model", world["model"], "--out", str(out),
            "--cache-dir", world["cache"], "--class-names", "cherry=sweet cherry", *FAST, *extra]


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("extra, size", [
    (["--output-size", "24"], 24),                                   # manifoldgd official, DDIM (SD default)
    (["--formulation", "paper", "--sampler", "ddpm", "--method", "manifoldgd"], 16),  # native size
    (["--method", "mgd3", "--output-size", "12"], 12),
])
def test_distill_end_to_end_on_a_tiny_sd_folder(sd_world, tmp_path, extra, size):
    out = tmp_path / "out"
    assert main(_args(sd_world, out, *extra)) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["backbone"] == "sd" and man["config"]["backbone"] == "sd"
    assert man["config"]["cfg_scale"] == 7.5 and man["config"]["cfg_channels"] == "all"
    assert man["config"]["sampler"] == ("ddpm" if "ddpm" in extra else "ddim")
    assert man["image_size"] == 16 and man["output_size"] == size
    assert man["prompts"] == PROMPTS and man["negative_prompt"] == ""
    assert "transformers" in man["versions"]
    for c in CLASSES:
        assert man["classes"][c]["status"] == "done" and man["classes"][c]["prompt"] == PROMPTS[c]
        files = sorted(f for f in os.listdir(out / c) if f.endswith(".png"))
        assert files == ["0.png", "1.png"]
        with Image.open(out / c / "0.png") as im:
            assert im.size == (size, size) and im.mode == "RGB"
        from safetensors.torch import load_file
        lat = load_file(str(out / "latents" / f"{c}.safetensors"))["latents"]
        assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    assert man["classes"]["golden_retriever"]["label"] == 1


def test_fast_loop_gives_the_reference_bytes_on_sd(sd_world, tmp_path):
    """The adapter behind the fast loop's static step: the same PNGs as the reference loop."""
    outs = {}
    for loop in ("fast", "reference"):
        out = tmp_path / loop
        assert main(_args(sd_world, out, "--loop", loop, "--guidance-noise", "philox")) == 0
        outs[loop] = {c: (out / c / "0.png").read_bytes() for c in CLASSES}
    assert outs["fast"] == outs["reference"]


def test_prompts_reach_the_text_encoder_once_per_class(sd_world, tmp_path, monkeypatch):
    """The class prompts (and the empty negative prompt) are what the CLIP text encoder sees, in one
    batch before sampling, never per step; different prompts give different embedding rows."""
    from transformers import CLIPTextModel

    seen = []
    real = CLIPTextModel.forward

    def spy(self, input_ids=None, *a, **k):
        seen.append(input_ids.clone())
        return real(self, input_ids, *a, **k)

    monkeypatch.setattr(CLIPTextModel, "forward", spy)
    res = distill(DistillConfig(data=sd_world["data"], model=sd_world["model"], out=str(tmp_path / "o"),
                                cache_dir=sd_world["cache"], ipc=2, steps=4, t_stop=2, method="mgd3",
                                class_names={"cherry": "sweet cherry"}, contact_sheet=False))
    assert len(seen) == 1                                     # one text-encoder pass for the whole run
    tok = SD.load_sd(sd_world["model"])["tokenizer"]
    texts = tok.batch_decode(seen[0], skip_special_tokens=True)
    assert texts == [PROMPTS[c] for c in ("cherry", "golden_retriever", "n01440764")] + [""]
    assert {c: v["prompt"] for c, v in res.classes.items()} == PROMPTS

    # the table rows are those prompts' embeddings, and the rows (and the UNet outputs) differ by class
    from manifoldgd_fast.pipeline import prepare

    ctx = prepare(DistillConfig(data=sd_world["data"], model=sd_world["model"], cache_dir=sd_world["cache"],
                                prompt_template="{name}, high quality"))
    model = ctx["model"]
    assert model.prompts == {0: "cherry, high quality", 1: "golden retriever, high quality", 2: "tench, high quality"}
    parts = SD.load_sd(sd_world["model"])
    want = SD.encode_prompts(parts["text_encoder"], parts["tokenizer"], [model.prompts[v] for v in range(3)] + [""])
    torch.testing.assert_close(model.embeddings[:4], want)
    assert all((want[a] - want[b]).abs().max() > 1e-3 for a in range(4) for b in range(a))
    x = torch.randn(1, 4, 8, 8).expand(4, -1, -1, -1)
    with torch.no_grad():
        out = model(x, timestep=torch.full((4,), 500), class_labels=torch.tensor([0, 1, 2, 3])).sample
    assert all((out[a] - out[b]).abs().max() > 1e-5 for a in range(4) for b in range(a))


def test_class_names_and_prompt_template():
    assert SD.class_prompts(["n01440764", "golden_retriever", "b"], "{name}", "b=banana split") == {
        "n01440764": "tench", "golden_retriever": "golden retriever", "b": "banana split"}
    assert SD.class_prompts(["n02102040"])["n02102040"] == "a photo of a English springer"
    for bad in ("a photo", "a {name} of {kind}", "{0} {name}"):
        with pytest.raises(ConfigError, match="prompt-template"):
            DistillConfig(prompt_template=bad).validate()
    with pytest.raises(ConfigError, match="class-names"):
        SD.class_prompts(["a"], class_names="a=,b=x")


# ---------------------------------------------------------------------------- the adapter and loading
def test_adapter_info_and_family_detection(sd_world, tiny_world, denoiser):
    assert model_family(sd_world["model"]) == "sd" and model_family(tiny_world["model"]) == "dit"
    assert dit_info(denoiser) == {"num_classes": 2, "null_class": 2, "latent_size": 8, "in_channels": 4,
                                  "out_channels": 4, "learned_sigma": False, "patch_size": None, "backbone": "sd"}
    kw = denoiser.schedule_kwargs
    assert kw["steps_offset"] == 1 and kw["set_alpha_to_one"] is False and kw["variance_type"] == "fixed_small"
    assert kw["betas"][0] == pytest.approx(0.00085) and kw["betas"][-1] == pytest.approx(0.012)
    gap = SD.TextConditionedDenoiser(denoiser.unet, denoiser.embeddings[:3], [0, 2])  # label 1 has no prompt
    assert dit_info(gap)["null_class"] == 3
    with pytest.raises(ValueError, match="without a prompt"):
        gap(torch.zeros(1, 4, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([1]))


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer", "unet"])
def test_incomplete_sd_folder_is_one_line_naming_it(sd_world, tmp_path, capsys, part):
    broken = tmp_path / "sd"
    shutil.copytree(sd_world["model"], broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ModelError) as e:
        SD.load_sd(str(broken))
    msg = str(e.value)
    assert "\n" not in msg and str(broken) in msg and f"no {part}/" in msg
    if part != "unet":  # without unet/ the folder is no longer recognised as SD; --backbone sd forces it
        rc = main(_args({**sd_world, "model": str(broken)}, tmp_path / "out"))
    else:
        rc = main(_args({**sd_world, "model": str(broken)}, tmp_path / "out", "--backbone", "sd"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(broken) in err[0] and f"no {part}/" in err[0]


# ---------------------------------------------------------------------------- SD scheduler settings
def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ddim_matches_diffusers_stable_diffusion_pipeline(sd_world, denoiser):
    """Unguided DDIM over the adapter == diffusers' StableDiffusionPipeline with DDIMScheduler configured as
    SD's (scaled_linear, steps_offset 1, set_alpha_to_one False, clip_sample False), same UNet, noise, prompts."""
    from diffusers import DDIMScheduler

    S = 10
    pipe = _pipe(sd_world["model"])
    pipe.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                   clip_sample=False, timestep_spacing="leading")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(["a photo of a dog", "a photo of a cherry"], negative_prompt=["", ""], num_inference_steps=S,
                   guidance_scale=7.5, latents=x_T.clone(), output_type="latent", height=16, width=16).images
    s = make_schedule(S, "ddim", **denoiser.schedule_kwargs)
    assert s.timesteps.flip(0).tolist() == pipe.scheduler.timesteps.tolist() == list(range(901, 0, -100))
    ours = sample(denoiser, s, x_T, torch.tensor([1, 0]), null_class=2, cfg_scale=7.5, cfg_channels="all")
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    # the last step lands on abar(t=0) (set_alpha_to_one=False), not on 1
    assert float(s.alphas_cumprod_prev[0]) == pytest.approx(1 - 0.00085, abs=1e-7)


def test_ddpm_fixed_small_matches_diffusers_scheduler_loop(sd_world, denoiser):
    """SD has no learned sigma: DDPM uses DDPMScheduler's fixed-small (posterior) variance over the
    'leading' + steps_offset timesteps."""
    from diffusers import DDPMScheduler

    S = 8
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1])
    s = make_schedule(S, "ddpm", **denoiser.schedule_kwargs)
    ours = sample(denoiser, s, x_T, y, null_class=2, cfg_scale=7.5, cfg_channels="all",
                  generators=[torch.Generator().manual_seed(g) for g in (5, 6)])

    sched = DDPMScheduler.from_config(SD.SD15_SCHEDULER_CONFIG)
    assert sched.config.variance_type == "fixed_small" and sched.config.steps_offset == 1
    sched.set_timesteps(S)
    assert sched.timesteps.tolist() == s.timesteps.flip(0).tolist()
    gens = [torch.Generator().manual_seed(g) for g in (5, 6)]
    enc = torch.cat([denoiser.embeddings[:2], denoiser.embeddings[2:3].expand(2, -1, -1)])  # cond, then null
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = denoiser.unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
            eps = out[2:] + 7.5 * (out[:2] - out[2:])
            x = sched.step(eps, t, x, generator=gens).prev_sample
    torch.testing.assert_close(ours, x, atol=5e-5, rtol=5e-5)


def _step_slice(s: Schedule, i: int) -> Schedule:
    """The one-step schedule of step index i (its own coefficients)."""
    kw = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in s.__dict__.items()}
    kw["host"] = {k: v[i:i + 1] for k, v in s.host.items()}
    return Schedule(**kw)


@pytest.mark.parametrize("formulation, method", [("official", "manifoldgd"), ("paper", "manifoldgd"),
                                                 ("official", "mgd3")])
def test_guided_and_unguided_steps_differ_only_before_t_stop(denoiser, formulation, method):
    """Along the guided trajectory, re-run each step unguided from the same latent: it differs from the
    guided step exactly while guidance is on (before t_stop), and is identical after."""
    S, t_stop, B = 8, 4, 2
    cfg = DistillConfig(steps=S, t_stop=t_stop, ipc=B, formulation=formulation, method=method,
                        backend="reference").resolve(3, backbone="sd")
    assert cfg.sampler == "ddim" and cfg.cfg_scale == 7.5 and cfg.cfg_channels == "all"
    s = make_schedule(S, cfg.sampler, **denoiser.schedule_kwargs)
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
    sample(denoiser, s, x_T, y, guidance=Guidance(cfg, s, modes, gens, **kw), generators=gens,
           callback=lambda i, x: traj.__setitem__(i, x.clone()), **run)
    guided_steps = []
    for i in reversed(range(S)):
        x_in = x_T if i == S - 1 else traj[i + 1]
        plain = sample(denoiser, _step_slice(s, i), x_in, y, **run)
        if is_guided(formulation, i, S, t_stop):
            guided_steps.append(i)
            assert (plain - traj[i]).abs().max() > 1e-4, f"step {i} should be guided"
        else:
            torch.testing.assert_close(plain, traj[i], atol=1e-6, rtol=0)
    assert guided_steps == ([7, 6, 5] if formulation == "official" else [7, 6, 5, 4])


# ---------------------------------------------------------------------------- SD's latent size
def test_cache_modes_and_guidance_at_4x64x64(tmp_path):
    """512 px SD latents are 4x64x64 (D = 16,384): the latent cache, mode discovery and both guidance
    formulations run at that size (a 2-block VAE on 128 px images gives the same latent shape on a CPU)."""
    from manifoldgd_fast import modes as modes_mod
    from manifoldgd_fast.latents import load_class_latents
    from manifoldgd_fast.models import build_vae, save_pretrained_folder, tiny_vae_config
    from manifoldgd_fast.pipeline import prepare
    from manifoldgd_fast.schedule import diffusers_schedule_kwargs

    data = make_image_folder(tmp_path / "data", ["a", "b"], 6, size=128)
    vae = save_pretrained_folder(build_vae(tiny_vae_config(sample_size=128, block_out_channels=(4, 4))),
                                 str(tmp_path / "vae"))
    ctx = prepare(DistillConfig(data=data, vae=vae, image_size=128, cache_dir=str(tmp_path / "cache")),
                  need_models=False)
    z, _ = load_class_latents(ctx["cache"], "a")
    assert z.shape == (6, 4, 64, 64)

    class Stub(torch.nn.Module):  # an eps model on any latent size: the sampler's call, nothing else
        def forward(self, x, timestep, class_labels):
            return SimpleNamespace(sample=0.1 * x + 0.01 * class_labels.view(-1, 1, 1, 1).float())

    S, B = 3, 2
    s = make_schedule(S, "ddim", **diffusers_schedule_kwargs(SD.SD15_SCHEDULER_CONFIG))
    x_T = torch.randn(B, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(B, dtype=torch.long)
    plain = sample(Stub(), s, x_T, y, null_class=1, cfg_scale=7.5, cfg_channels="all")
    for formulation, mode_method in (("official", "divisive"), ("paper", "divisive"), ("official", "kmeans")):
        cfg = DistillConfig(steps=S, t_stop=1, ipc=B, formulation=formulation, mode_method=mode_method, k=4,
                            cloud_size=16, backend="reference").resolve(2, backbone="sd")
        modes = modes_mod.discover_modes(z.flatten(1), B, method=mode_method, formulation=formulation, seed=0,
                                         level=cfg.level, mode_point=cfg.mode_point, max_depth=cfg.max_depth,
                                         min_leaf=cfg.min_leaf, kmeans_iters=10, bisect_inits=2)
        assert modes.shape == (B, 4 * 64 * 64)
        modes = modes.view(B, 4, 64, 64)
        kw = {}
        if formulation == "paper":
            kw = paper_neighbourhoods(cfg, z, modes)
        gens = [torch.Generator().manual_seed(b) for b in range(B)]
        out = sample(Stub(), s, x_T, y, null_class=1, cfg_scale=7.5, cfg_channels="all", formulation=formulation,
                     guidance=Guidance(cfg, s, modes, gens, **kw), generators=gens)
        assert out.shape == (B, 4, 64, 64) and torch.isfinite(out).all()
        assert (out - plain).abs().max() > 1e-4


def test_sd15_size_configs_have_the_published_parameter_counts():
    """The benchmark's random-init models are SD 1.5's: UNet 859.52 M, VAE 83.65 M, CLIP text 123.06 M
    (built on the meta device: no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        counts = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(**SD.sd15_unet_config()), AutoencoderKL(**SD.sd15_vae_config()),
            CLIPTextModel(CLIPTextConfig(**SD.sd15_text_config())))]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


# ---------------------------------------------------------------------------- the GPU benchmark script
def test_bench_sd_tiny_runs_on_cpu(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_sd.py")
    spec = importlib.util.spec_from_file_location("bench_sd", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parse_args(["--tiny", "--batch", "2", "--steps", "3", "--repeats", "1"])
    assert args.tiny and args.batch == 2 and args.device == "cpu"
    rows = mod.run(args)
    assert {r["what"] for r in rows} == {"diffusers StableDiffusionPipeline", "ours unguided", "ours mgd3",
                                         "ours manifoldgd"}
    assert all(r["images_per_s"] > 0 for r in rows)
