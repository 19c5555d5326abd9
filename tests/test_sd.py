"""Stable Diffusion backbone: the whole pipeline on a tiny random-init SD 1.5-layout folder, prompts,
folder loading and its one-line errors, and guidance at SD's latent size. Sampling against diffusers'
own schedulers is in test_sd_scheduler.py."""
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from sd_helpers import CLASSES, FAST, PROMPTS, sd_args, sd_pipe, sd_variant

from manifoldgd_fast import DistillConfig, distill
from manifoldgd_fast import sd as SD
from manifoldgd_fast.cli import main
from manifoldgd_fast.errors import ConfigError, ModelError
from manifoldgd_fast.guidance import Guidance, paper_neighbourhoods
from manifoldgd_fast.models import dit_info, model_family
from manifoldgd_fast.sampler import sample
from manifoldgd_fast.schedule import make_schedule

pytest.importorskip("transformers", reason="the Stable Diffusion path needs transformers (CLIP; in the dev extra)")


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("extra, size", [
    (["--output-size", "24"], 24),                                   # manifoldgd official, DDPM (SD default)
    (["--formulation", "paper", "--sampler", "ddim", "--method", "manifoldgd"], 16),  # native size
    (["--method", "mgd3", "--output-size", "12"], 12),
])
def test_distill_end_to_end_on_a_tiny_sd_folder(sd_world, tmp_path, extra, size):
    out = tmp_path / "out"
    assert main(sd_args(sd_world, out, *extra)) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["backbone"] == "sd" and man["config"]["backbone"] == "sd"
    assert man["config"]["cfg_scale"] == SD.SD_CFG_SCALE == 8.0 and man["config"]["cfg_channels"] == "all"
    assert man["config"]["sampler"] == ("ddim" if "ddim" in extra else "ddpm")
    assert man["image_size"] == 16 and man["output_size"] == size
    assert man["prompts"] == PROMPTS and man["negative_prompt"] == ""
    assert man["sd_scheduler"] == {"prediction_type": "epsilon", "timestep_spacing": "leading"}
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


def test_distill_a_v_prediction_trailing_folder(sd_world, tmp_path, capsys):
    """An SD 2.x-style folder (v-prediction, trailing spacing): the pipeline runs guided, records both
    settings, and its latents differ from the same UNet read as an eps model (the v is not taken for eps).
    Resuming after the folder's scheduler settings changed is refused, naming them."""
    from safetensors.torch import load_file

    cfg = {**SD.SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    lat = {}
    for name, sched in (("v", cfg), ("eps", {**cfg, "prediction_type": "epsilon"})):
        folder = sd_variant(sd_world, tmp_path, sched, name=name)
        out = tmp_path / f"out-{name}"
        assert main(sd_args({**sd_world, "model": folder}, out, "--sampler", "ddim")) == 0
        man = json.loads((out / "manifest.json").read_text())
        assert man["sd_scheduler"] == {"prediction_type": sched["prediction_type"], "timestep_spacing": "trailing"}
        lat[name] = load_file(str(out / "latents" / "cherry.safetensors"))["latents"]
        assert torch.isfinite(lat[name]).all()
    assert (lat["v"] - lat["eps"]).abs().max() > 1e-2
    (tmp_path / "v" / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "timestep_spacing": "linspace"}))
    capsys.readouterr()
    assert main(sd_args({**sd_world, "model": str(tmp_path / "v")}, tmp_path / "out-v", "--sampler", "ddim")) == 2
    err = capsys.readouterr().err      # (transformers may draw its weight-loading bars there too)
    assert "Traceback" not in err and "holds a run made with other scheduler settings" in err.splitlines()[-1], err


@pytest.mark.parametrize("change", ["text_encoder", "tokenizer"])
def test_a_resume_with_another_text_encoder_or_tokenizer_is_refused(sd_world, tmp_path, capsys, change):
    """The prompt embeddings are made by the text encoder and the tokenizer, neither part of the UNet's
    weights: the manifest names them, and a resume after either changed in the same folder is refused
    (it would mix two conditionings in one distilled set)."""
    folder = sd_variant(sd_world, tmp_path)
    out = tmp_path / "out"
    assert main(sd_args({**sd_world, "model": folder}, out, "--ipc", "1", "--classes", "cherry,golden_retriever")) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["weights"]) == {"model", "vae", "scheduler", "text"}
    shutil.rmtree(out / "golden_retriever")
    if change == "text_encoder":  # same config, other weights
        te = SD.build_clip_text_encoder(json.loads(open(os.path.join(folder, "text_encoder", "config.json")).read()),
                                        seed=7)
        te.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    else:  # prompts padded to another length: other states reach the UNet
        _set_json(os.path.join(folder, "tokenizer"), "model_max_length", 12, file="tokenizer_config.json")
    capsys.readouterr()
    assert main(sd_args({**sd_world, "model": folder}, out, "--ipc", "1", "--classes", "cherry,golden_retriever")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "holds a run made with other text encoder or tokenizer (sha256 " + man["weights"]["text"] in err[-1], err
    assert not (out / "golden_retriever").exists()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_distill_a_zero_terminal_snr_folder(sd_world, tmp_path, capsys, sampler):
    """rescale_betas_zero_snr with v-prediction and trailing spacing: the first step is at abar = 0. The
    official formulation guides it through x0 (finite latents, guided != unguided), the manifest says so;
    the paper formulation, which guides eps there, is refused in one line before anything is sampled."""
    from safetensors.torch import load_file

    cfg = {**SD.SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
           "rescale_betas_zero_snr": True}
    folder = sd_variant(sd_world, tmp_path, cfg)
    world = {**sd_world, "model": folder}
    lat = {}
    for method in ("manifoldgd", "dit"):
        out = tmp_path / f"out-{method}"
        assert main(sd_args(world, out, "--sampler", sampler, "--method", method)) == 0
        man = json.loads((out / "manifest.json").read_text())
        assert man["sd_scheduler"] == {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                       "zero_terminal_snr": True}
        lat[method] = load_file(str(out / "latents" / "cherry.safetensors"))["latents"]
        assert torch.isfinite(lat[method]).all()
    assert (lat["manifoldgd"] - lat["dit"]).abs().max() > 1e-3
    capsys.readouterr()
    out = tmp_path / "out-paper"
    assert main(sd_args(world, out, "--sampler", sampler, "--formulation", "paper")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and "--formulation paper guides timestep 999" in err[-1], err
    assert not (out / "latents").exists()


def test_fast_loop_gives_the_reference_bytes_on_sd(sd_world, tmp_path):
    """The adapter behind the fast loop's static step: the same PNGs as the reference loop."""
    outs = {}
    for loop in ("fast", "reference"):
        out = tmp_path / loop
        assert main(sd_args(sd_world, out, "--loop", loop, "--guidance-noise", "philox")) == 0
        outs[loop] = {c: (out / c / "0.png").read_bytes() for c in CLASSES}
    assert outs["fast"] == outs["reference"]


def test_classes_sampled_together_on_sd(sd_world, tmp_path):
    """--class-batch 2 on SD: each row takes its own class's prompt embedding; a resume that redoes one
    class alone (a padded batch) writes its bytes again, and one class a batch differs by rounding only."""
    import shutil

    from safetensors.torch import load_file
    from test_pipeline import _digest

    two = tmp_path / "two"
    assert main(sd_args(sd_world, two, "--class-batch", "2")) == 0
    man = json.loads((two / "manifest.json").read_text())
    order = sorted(CLASSES)  # the run's class order
    assert man["config"]["class_batch"] == 2 and man["classes"][order[0]]["sampled_with"] == order[:2]
    before = _digest(two)
    shutil.rmtree(two / order[0])
    assert main(sd_args(sd_world, two, "--class-batch", "2")) == 0
    assert _digest(two) == before
    assert main(sd_args(sd_world, tmp_path / "one", "--class-batch", "1")) == 0
    for c in CLASSES:
        a, b = (load_file(str(d / "latents" / f"{c}.safetensors"))["latents"] for d in (two, tmp_path / "one"))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # a row under another class's prompt would not be


def test_prompts_reach_the_text_encoder_once_per_class(sd_world, tmp_path, monkeypatch):
    """The class prompts (and the empty negative prompt) are what the CLIP text encoder sees, once each
    before sampling (one prompt per call, so that a class's embedding does not depend on the prompts
    beside it), never per step; different prompts give different embedding rows."""
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
    assert len(seen) == 4 and all(ids.shape[0] == 1 for ids in seen)   # once per prompt for the whole run
    tok = SD.load_sd(sd_world["model"])["tokenizer"]
    texts = tok.batch_decode(torch.cat(seen), skip_special_tokens=True)
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
    assert SD.class_prompts(["n02102040"])["n02102040"] == "English springer"    # the paper's: the name alone
    assert SD.class_prompts(["n02102040"], "a photo of a {name}")["n02102040"] == "a photo of a English springer"
    assert DistillConfig().prompt_template == SD.DEFAULT_PROMPT_TEMPLATE == "{name}"
    for bad in ("a photo", "a {name} of {kind}", "{0} {name}"):
        with pytest.raises(ConfigError, match="prompt-template"):
            DistillConfig(prompt_template=bad).validate()
    with pytest.raises(ConfigError, match="class-names"):
        SD.class_prompts(["a"], class_names="a=,b=x")


# ---------------------------------------------------------------------------- the adapter and loading
def test_adapter_info_and_family_detection(sd_world, tiny_world, sd_denoiser):
    assert model_family(sd_world["model"]) == "sd" and model_family(tiny_world["model"]) == "dit"
    assert dit_info(sd_denoiser) == {"num_classes": 2, "null_class": 2, "latent_size": 8, "in_channels": 4,
                                  "out_channels": 4, "learned_sigma": False, "patch_size": None, "backbone": "sd"}
    kw = sd_denoiser.schedule_kwargs
    assert kw["steps_offset"] == 1 and kw["set_alpha_to_one"] is False and kw["variance_type"] == "fixed_small"
    assert kw["betas"][0] == pytest.approx(0.00085) and kw["betas"][-1] == pytest.approx(0.012)
    gap = SD.TextConditionedDenoiser(sd_denoiser.unet, sd_denoiser.embeddings[:3], [0, 2])  # label 1 has no prompt
    assert dit_info(gap)["null_class"] == 3
    with pytest.raises(ValueError, match="without a prompt"):
        gap(torch.zeros(1, 4, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([1]))


def _drop_files(folder, *names):
    for n in names:
        if os.path.exists(os.path.join(folder, n)):
            os.remove(os.path.join(folder, n))


def _set_max_length(folder, value):
    path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.loads(open(path).read())
    cfg.pop("model_max_length")
    if value is not None:
        cfg["model_max_length"] = value
    open(path, "w").write(json.dumps(cfg))


def _set_json(folder, key, value, file="config.json"):
    path = os.path.join(folder, file)
    cfg = json.loads(open(path).read())
    cfg[key] = value
    open(path, "w").write(json.dumps(cfg))


@pytest.mark.parametrize("damage, sub, why", [
    # transformers would build a default-size CLIP text model and print a mismatch table
    (lambda d: _drop_files(d, "config.json"), "text_encoder", "text_encoder has no config.json"),
    (lambda d: _drop_files(d, "config.json"), "unet", "unet has no config.json"),
    # transformers would build a 2-token tokenizer: every prompt the same embedding, no error
    (lambda d: _drop_files(d, "vocab.json", "merges.txt", "tokenizer.json"), "tokenizer",
     "has neither vocab.json + merges.txt nor tokenizer.json"),
    # model_max_length would be 1e30: OverflowError when padding the prompts
    (lambda d: _set_max_length(d, None), "tokenizer", "gives no model_max_length, but the text encoder has 32 "
                                                      "positions"),
    (lambda d: _set_max_length(d, 77), "tokenizer", "gives model_max_length 77, but the text encoder has 32"),
    # more tokens than the text encoder embeds (another model's tokenizer): an IndexError deep in CLIP
    (lambda d: _set_json(d, "vocab_size", 300), "text_encoder", "tokens, but the text encoder embeds 300 ("),
    # a UNet for another text encoder: found from the two configs, not after loading both models' weights
    (lambda d: _set_json(d, "cross_attention_dim", 64), "unet",
     "gives cross_attention_dim 64, but the text encoder gives 32-dim states"),
    (lambda d: _set_json(d, "cross_attention_dim", [32, 64]), "unet",
     "gives cross_attention_dim [32, 64], but the text encoder gives 32-dim states"),
], ids=["text-encoder-config", "unet-config", "tokenizer-vocab", "no-max-length", "max-length-too-long", "vocab-size",
        "cross-attention", "cross-attention-list"])
def test_damaged_text_side_is_one_line_naming_it(sd_world, tmp_path, capsys, monkeypatch, damage, sub, why):
    from manifoldgd_fast import models

    folder = sd_variant(sd_world, tmp_path)
    damage(os.path.join(folder, sub))
    with pytest.raises(ModelError) as e:
        SD.load_sd(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--model {folder}: ") and why in msg
    loaded = []  # distill refuses before any weights load, the VAE's included
    real = models._load_from_folder
    spy = lambda cls, *a, **k: loaded.append(cls) or real(cls, *a, **k)  # noqa: E731
    monkeypatch.setattr(models, "_load_from_folder", spy)   # the VAE's
    monkeypatch.setattr(SD, "_load_from_folder", spy)       # the UNet's
    rc = main(sd_args({**sd_world, "model": folder}, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and why in err[0] and loaded == []


def test_a_unet_with_per_block_cross_attention_widths_equal_to_the_text_encoders_loads(sd_world, tmp_path):
    folder = sd_variant(sd_world, tmp_path)
    n = len(json.loads(open(os.path.join(folder, "unet", "config.json")).read())["down_block_types"])
    _set_json(os.path.join(folder, "unet"), "cross_attention_dim", [32] * n)
    assert SD.load_sd(folder)["unet"].config.cross_attention_dim == [32] * n


def test_cached_hf_id_runs_without_network(sd_world, tmp_path, monkeypatch):
    """--model org/id of an SD folder in the Hugging Face cache (as snapshot_download leaves it) is found,
    recognised as SD and distilled with every socket refused: nothing is fetched."""
    import socket

    import huggingface_hub.constants

    snap = tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / ("0123456789abcdef" * 3)[:40]
    shutil.copytree(sd_world["model"], snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(snap.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    real = socket.socket.connect

    def connect(self, address):  # the DataLoader's workers talk over local (AF_UNIX) sockets: those pass
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    assert model_family("org/tiny-sd") == "sd"
    out = tmp_path / "out"
    assert main(sd_args({**sd_world, "model": "org/tiny-sd"}, out, "--ipc", "1", "--classes", "cherry")) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["model"] == "org/tiny-sd" and man["backbone"] == "sd" and man["classes"]["cherry"]["status"] == "done"


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
        rc = main(sd_args({**sd_world, "model": str(broken)}, tmp_path / "out"))
    else:
        rc = main(sd_args({**sd_world, "model": str(broken)}, tmp_path / "out", "--backbone", "sd"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(broken) in err[0] and f"no {part}/" in err[0]


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
    emitted = []
    rows = mod.run(args, emitted.append)
    assert {r["what"] for r in rows} == {"diffusers StableDiffusionPipeline", "ours unguided", "ours mgd3",
                                         "ours manifoldgd"}
    assert all(r["images_per_s"] > 0 for r in rows)
    assert emitted == rows                     # each row handed out as it is measured (a cut run keeps them)
    # main appends each row to --csv as it comes (one header in a new file)
    csv_path = tmp_path / "sd.csv"
    assert mod.main(["--tiny", "--batch", "2", "--steps", "2", "--repeats", "1", "--methods", "unguided",
                     "--no-diffusers", "--csv", str(csv_path)]) == 0
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("gpu,dtype,batch,steps,what,") and len(lines) == 2 and lines[1].startswith("cpu,")


# ---------------------------------------------------------------------------- outputs, prompts and loading, in detail
def test_same_seed_same_bytes_and_output_size_is_a_pil_bicubic_resize(sd_world, tmp_path):
    """Two runs with one seed write identical PNGs (another seed or --negative-prompt: other PNGs); --output-size writes
    PIL's bicubic resize of the native decode."""
    def run(out, *extra):
        assert main(sd_args(sd_world, tmp_path / out, "--no-contact-sheet", *extra)) == 0
        return {c: (tmp_path / out / c / "0.png").read_bytes() for c in CLASSES}

    a, b = run("a"), run("b")
    assert a == b
    assert run("seed1", "--seed", "1") != a
    assert run("neg", "--negative-prompt", "blurry photo") != a      # the CLI's prompt reaches the CFG null row
    assert json.loads((tmp_path / "neg" / "manifest.json").read_text())["negative_prompt"] == "blurry photo"
    run("big", "--output-size", "24")
    for c in CLASSES:
        with Image.open(tmp_path / "a" / c / "0.png") as im:
            assert im.size == (16, 16)
            want = np.asarray(im.convert("RGB").resize((24, 24), resample=Image.BICUBIC))
        with Image.open(tmp_path / "big" / c / "0.png") as im:
            np.testing.assert_array_equal(np.asarray(im), want)


def test_cfg_channels_3_is_refused_for_sd(sd_world, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="cfg-channels 3"):
        DistillConfig(backbone="sd", cfg_channels="3").validate()
    with pytest.raises(ConfigError, match="all 4 latent channels"):
        DistillConfig(cfg_channels="3").resolve(3, backbone="sd")
    assert DistillConfig(cfg_channels="3").resolve(3, backbone="dit").cfg_channels == "3"
    # the SD default guidance scale is sd.SD_CFG_SCALE
    monkeypatch.setattr(SD, "SD_CFG_SCALE", 5.5)
    assert DistillConfig().resolve(3, backbone="sd").cfg_scale == 5.5
    assert DistillConfig().resolve(3, backbone="dit").cfg_scale == 4.0
    monkeypatch.setattr(SD, "load_sd_denoiser", lambda *a, **k: pytest.fail("SD models loaded"))
    rc = main(sd_args(sd_world, tmp_path / "out", "--cfg-channels", "3"))      # backbone found from the folder
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--cfg-channels 3" in err[0]


def test_class_names_unknown_keys_synonyms_and_equal_prompts(tmp_path, sd_world, capsys):
    names = tmp_path / "names.txt"
    names.write_text("n01440764 tench, Tinca tinca\ncherry sweet cherry\nn01443537 goldfish, Carassius auratus\n")
    # LOC_synset_mapping.txt style: the first synonym; ImageNet wnids without a folder are fine
    assert SD.class_prompts(["n01440764", "cherry"], class_names=str(names)) == {
        "n01440764": "tench", "cherry": "sweet cherry"}
    assert SD.class_prompts(["a"], class_names={"a": "apple, malus"}) == {"a": "apple, malus"}  # (as given)
    # a key for a folder of the data set that this run does not select is fine, any other is not
    assert SD.class_prompts(["a"], class_names="a=apple,b=banana", folders=["a", "b"]) == {"a": "apple"}
    names.write_text("cherry sweet cherry\nchery cherry\nbananna banana\n")
    with pytest.raises(ConfigError) as e:
        SD.class_prompts(["cherry", "golden_retriever"], class_names=str(names))
    assert str(e.value) == f"--class-names {names}: 2 name(s) match no class folder: 'chery', 'bananna'"
    with pytest.raises(ConfigError, match=r"^--class-names: 1 name\(s\) match no class folder: 'b'$"):
        SD.class_prompts(["a"], class_names="a=apple,b=banana")
    # equal prompts once lowercased (CLIP's tokenizer lowercases): one line naming both folders
    with pytest.raises(ConfigError) as e:
        SD.class_prompts(["a", "b"], class_names="a=Crane,b=crane ")
    msg = str(e.value)
    assert "\n" not in msg and "'a' and 'b'" in msg and "lowercased" in msg
    with pytest.raises(ConfigError, match="'a' and 'b'"):
        SD.class_prompts(["a", "b"], "a photo of a {name}", class_names="a=Cardigan,b=cardigan")
    # the shipped ImageNet names give 1000 distinct prompts
    from manifoldgd_fast.classes import imagenet_wnids

    assert len(set(SD.class_prompts(imagenet_wnids()).values())) == 1000
    rc = main(sd_args(sd_world, tmp_path / "out")[:-6] + ["--class-names", "cherry=tree,golden_retriever=Tree", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'cherry' and 'golden_retriever'" in err[0]


def test_prompts_read_as_the_same_tokens_are_refused_before_the_unet_loads(sd_world, tmp_path, capsys, monkeypatch):
    """class_prompts compares the prompts lowercased; CLIP's tokenizer also drops the spaces around punctuation, and
    the text encoder sees at most model_max_length tokens (32 here). Two classes whose prompts are the same tokens
    got one embedding (one class's images under two labels) with no error: refused in one line naming both classes,
    before the UNet's weights load."""
    long = "a photo " * 20                                        # past 32 tokens: the class name is cut off
    pairs = [("golden-retriever", "golden - retriever"), (long + "cherry", long + "dog")]
    monkeypatch.setattr(SD, "load_sd", lambda *a, **k: pytest.fail("weights loaded"))
    for a, b in pairs:
        assert SD.class_prompts(["x", "y"], class_names={"x": a, "y": b}) == {"x": a, "y": b}   # distinct lowercased
        with pytest.raises(ConfigError, match="^classes 'x' and 'y' get the same text embedding"):
            SD.load_sd_denoiser(sd_world["model"], {0: a, 1: b}, names={0: "x", 1: "y"})
    monkeypatch.undo()
    args = ["distill", "--data", sd_world["data"], "--model", sd_world["model"], "--out", str(tmp_path / "o"),
            "--cache-dir", sd_world["cache"], "--class-names", f"cherry={pairs[1][0]},golden_retriever={pairs[1][1]}",
            *FAST]
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "'cherry' and 'golden_retriever' get the same text embedding" in err[-1], err
    # under --shard too, where each shard samples one of the two (each checked only its own: both ran)
    for shard in ("0/2", "1/2"):
        rc = main([*args, "--shard", shard])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "'cherry' and 'golden_retriever' get the same text embedding" in err[-1], (shard, err)
    # distinct tokens pass: a prompt cut short still differs from one that is not
    SD.check_distinct_text_inputs(SD.load_sd(sd_world["model"])["tokenizer"], {0: long + "cherry", 1: "cherry"})


def test_a_class_prompt_that_is_empty_or_the_negative_prompt_is_refused(sd_world, tmp_path, capsys, monkeypatch):
    """A class whose prompt is CFG's null prompt (a folder "_" under the default empty --negative-prompt, or a
    --negative-prompt naming a class) had conditional and null rows of one embedding: CFG was a no-op and the
    class was sampled unconditionally, without a word (found by an SD-backbone audit)."""
    with pytest.raises(ConfigError, match="^class folder '_' gets an empty prompt: give it a name with --class-names"):
        SD.class_prompts(["_", "cherry"], negative_prompt="")
    with pytest.raises(ConfigError, match="^class folder 'cherry' gets the prompt 'Cherry', the --negative-prompt"):
        SD.class_prompts(["cherry"], "{name}", class_names={"cherry": "Cherry"}, negative_prompt="cherry ")
    assert SD.class_prompts(["cherry"], negative_prompt="blurry") == {"cherry": "cherry"}
    monkeypatch.setattr(SD, "load_sd", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match="^class 'x' gets the text embedding of the --negative-prompt"):
        SD.load_sd_denoiser(sd_world["model"], {0: "golden-retriever", 1: "tench"}, names={0: "x"},
                            negative_prompt="golden - retriever")
    monkeypatch.undo()
    base = ["distill", "--data", sd_world["data"], "--model", sd_world["model"], "--out", str(tmp_path / "o"),
            "--cache-dir", sd_world["cache"], *FAST]
    assert main([*base, "--negative-prompt", "Cherry"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class folder 'cherry' gets the prompt 'cherry', the --negative-prompt" in err[0], err
    assert not os.path.exists(tmp_path / "o" / "cherry")


def test_text_encoder_attention_mask_and_truncation_as_diffusers(sd_world, caplog):
    """use_attention_mask in the text encoder's config is honoured as encode_prompt does; a prompt
    longer than the tokenizer's length is cut there, with one warning naming its class."""
    pipe = sd_pipe(sd_world["model"])
    parts = SD.load_sd(sd_world["model"])
    te, tok = parts["text_encoder"], parts["tokenizer"]
    long = "a photo of a very " + "very " * 40 + "long cherry"
    prompts = ["a photo of a cherry", long]
    plain = SD.encode_prompts(te, tok, prompts)
    ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(plain, ref.float(), atol=1e-6, rtol=0)
    for m in (te, pipe.text_encoder):
        m.config.use_attention_mask = True
    masked = SD.encode_prompts(te, tok, prompts)
    ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(masked, ref.float(), atol=1e-6, rtol=0)
    assert (masked[0] - plain[0]).abs().max() > 1e-4                  # the mask changes the padded rows
    caplog.clear()
    with caplog.at_level("WARNING", logger="manifoldgd_fast"):
        SD.encode_prompts(te, tok, prompts, names=["class cherry", "class long_cherry"])
    cut = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("class long_cherry: ") and "long cherry" in cut[0]


def test_the_cut_warning_starts_one_token_past_the_tokenizers_length(sd_world, caplog):
    """The warning is the only sign of a cut prompt: a prompt of exactly model_max_length tokens (bos and eos
    included) is whole and draws none; one token more is cut and draws it, naming the token left out."""
    parts = SD.load_sd(sd_world["model"])
    te, tok = parts["text_encoder"], parts["tokenizer"]
    L = tok.model_max_length
    fits, over = "a " * (L - 3) + "z", "a " * (L - 2) + "z"
    assert len(tok(fits).input_ids) == L and len(tok(over).input_ids) == L + 1
    for prompt, n in [(fits, 0), (over, 1)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="manifoldgd_fast"):
            SD.encode_prompts(te, tok, [prompt], names=["class c"])
        cut = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
        assert len(cut) == n, prompt
    assert cut[0].startswith("class c: ") and cut[0].endswith("without 'z'")


@pytest.mark.parametrize("value", [None, "0.18215", 0, float("nan")])
def test_a_damaged_vae_scaling_factor_is_one_line_naming_it(sd_world, tmp_path, capsys, value):
    """scaling_factor null / a string in vae/config.json was a TypeError traceback mid-run (audit)."""
    folder = tmp_path / "sd"
    shutil.copytree(sd_world["model"], folder)
    cfg_path = folder / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "scaling_factor": value}))
    rc = main(sd_args({**sd_world, "model": str(folder)}, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"--model {folder}: the VAE's config.json sets scaling_factor" in err[0], err
    assert not os.path.exists(tmp_path / "out" / "cherry")


def test_a_stale_model_index_and_an_hw_sample_size(sd_world, tmp_path):
    """A model_index.json naming a transformer in a folder of unet/ (and no transformer/) was "no model ...
    nor a Stable Diffusion folder: unet/"; a UNet sample_size [h, h], which diffusers takes, was "config file
    ... is damaged" (audit)."""
    from manifoldgd_fast.models import check_model_source

    folder = tmp_path / "sd"
    shutil.copytree(sd_world["model"], folder)
    (folder / "model_index.json").write_text('{"_class_name": "DiTPipeline", "transformer": ["diffusers", "X"]}')
    assert model_family(str(folder)) == "sd"
    check_model_source(str(folder))
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    size = cfg["sample_size"]
    cfg_path.write_text(json.dumps({**cfg, "sample_size": [size, size]}))
    assert SD.sd_info(str(folder), 3)["latent_size"] == size
    assert SD.load_sd_denoiser(str(folder), {0: "cherry"}, num_classes=3).denoiser_info()["latent_size"] == size
    cfg_path.write_text(json.dumps({**cfg, "sample_size": [size, 2 * size]}))
    with pytest.raises(ModelError, match=re.escape(f"sets sample_size [{size}, {2 * size}]: only square latents")):
        SD.sd_info(str(folder), 3)


def test_vae_that_does_not_fit_the_unet_is_one_line(sd_world, tmp_path, capsys, monkeypatch):
    """A 9-channel (inpainting) UNet, or a VAE with a shift_factor (SD3 / Flux), is refused in prepare
    before the UNet loads, naming the folder."""
    inpaint = sd_variant(sd_world, tmp_path, name="inpaint")
    unet = SD.build_sd_unet({**SD.tiny_sd_unet_config(sample_size=8, cross_attention_dim=32), "in_channels": 9})
    shutil.rmtree(os.path.join(inpaint, "unet"))
    unet.save_pretrained(os.path.join(inpaint, "unet"), safe_serialization=True)
    monkeypatch.setattr(SD, "load_sd_denoiser", lambda *a, **k: pytest.fail("SD models loaded"))
    rc = main(sd_args({**sd_world, "model": inpaint}, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and inpaint in err[0] and "takes 9" in err[0] and "latent_channels 4" in err[0]

    shifted = sd_variant(sd_world, tmp_path, name="shifted")
    path = os.path.join(shifted, "vae", "config.json")
    with open(path) as f:
        vcfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**vcfg, "shift_factor": 0.0609}, f)
    rc = main(sd_args({**sd_world, "model": shifted}, tmp_path / "out2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and shifted in err[0] and "shift_factor 0.0609" in err[0]


@pytest.mark.parametrize("change, why", [
    ({"addition_embed_type": "text_time"}, "SDXL-style model (its UNet has addition_embed_type 'text_time'"),
    ("text_encoder_2", "SDXL-style model (it has a second text encoder (text_encoder_2/)"),
    ("refiner", "SDXL-style model (it has a second text encoder (text_encoder_2/)"),
    ({"class_embed_type": "timestep"}, "its UNet sets class_embed_type 'timestep'"),
    ({"num_class_embeds": 1000}, "its UNet sets num_class_embeds 1000"),
    ({"time_cond_proj_dim": 256}, "its UNet sets time_cond_proj_dim 256 (a guidance-distilled model, e.g. LCM"),
], ids=["sdxl-unet", "sdxl-folder", "sdxl-refiner", "upscaler", "class-embeds", "lcm"])
def test_unets_not_text_to_image_are_refused_before_loading(sd_world, tmp_path, capsys, monkeypatch, change, why):
    """SDXL (a second text encoder, or a UNet asking for pooled text and size / crop ids) and UNets with
    a class or noise-level input: refused from the configs, one line naming the folder, before any weights
    load (the UNet would fail mid-sampling for want of added_cond_kwargs or class_labels). SDXL's refiner
    (text_encoder_2/ alone) is named as SDXL, not as an SD folder missing its text_encoder/."""
    folder = sd_variant(sd_world, tmp_path)
    if change == "text_encoder_2":
        shutil.copytree(os.path.join(folder, "text_encoder"), os.path.join(folder, "text_encoder_2"))
    elif change == "refiner":
        os.rename(os.path.join(folder, "text_encoder"), os.path.join(folder, "text_encoder_2"))
    else:
        path = os.path.join(folder, "unet", "config.json")
        with open(path) as f:
            cfg = json.load(f)
        with open(path, "w") as f:
            json.dump({**cfg, **change}, f)
    with pytest.raises(ModelError, match=re.escape(why)):
        SD.sd_info(folder, 3)
    monkeypatch.setattr(SD, "_load_from_folder", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ModelError, match=re.escape(why)):
        SD.load_sd(folder)
    rc = main(sd_args({**sd_world, "model": folder}, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and why in err[0] and folder in err[0], err


def test_loading_draws_no_transformers_bars(sd_world, capsys):
    """transformers 5 draws a "Loading weights" bar for the CLIP text encoder: not on our stderr; the
    caller's own setting is restored after."""
    from transformers.utils import logging as tlog

    tlog.enable_progress_bar()
    capsys.readouterr()
    SD.load_sd(sd_world["model"])
    assert "Loading weights" not in capsys.readouterr().err
    assert tlog.is_progress_bar_enabled()


def test_fp16_variant_only_sd_folder_loads(sd_world, tmp_path, sd_denoiser):
    """A folder or HF cache made by ``from_pretrained(..., variant="fp16")`` holds only
    ``diffusion_pytorch_model.fp16.safetensors`` / ``model.fp16.safetensors``: every part still loads
    (neither diffusers nor transformers looks for them unless the variant is named)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src, dst = sd_world["model"], tmp_path / "sd"
    shutil.copytree(src, dst)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        part = cls.from_pretrained(os.path.join(src, sub))
        shutil.rmtree(dst / sub)
        part.save_pretrained(str(dst / sub), variant="fp16")
        assert all(".fp16." in n for n in os.listdir(dst / sub) if n != "config.json" and "generation" not in n)
    got = SD.load_sd_denoiser(str(dst), {0: "a photo of a cherry", 1: "a photo of a dog"})
    torch.testing.assert_close(got.embeddings, sd_denoiser.embeddings, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(got.unet.state_dict().values(), sd_denoiser.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_sd_folder_without_vae_runs_with_vae_given(sd_world, tmp_path, capsys):
    """--vae replaces the folder's vae/, so a UNet + text side without vae/ runs with --vae (the same bytes
    as the full folder) and, without --vae, stops with one line naming the missing VAE."""
    part = tmp_path / "sd"
    shutil.copytree(sd_world["model"], part, ignore=shutil.ignore_patterns("vae"))
    vae = os.path.join(sd_world["model"], "vae")
    full, out = tmp_path / "full", tmp_path / "out"
    assert main(sd_args(sd_world, full, "--vae", vae, "--classes", "cherry")) == 0
    assert main(sd_args(dict(sd_world, model=str(part)), out, "--vae", vae, "--classes", "cherry")) == 0
    for f in ("0.png", "1.png"):
        assert (out / "cherry" / f).read_bytes() == (full / "cherry" / f).read_bytes()
    capsys.readouterr()
    assert main(sd_args(dict(sd_world, model=str(part)), tmp_path / "o3", "--classes", "cherry")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("manifoldgd-fast: error: --model ") and "Traceback" not in "".join(err), err


# ---------------------------------------------------------------------------- pinned by a mutation audit of sd.py
def _emb(sd_denoiser, n):
    """n class rows + the negative prompt's row, from the fixture's table (its rows are 2 classes + negative)."""
    e = sd_denoiser.embeddings[:3]
    return torch.cat([e[:2].repeat(n, 1, 1)[:n], e[2:]])


@pytest.mark.parametrize("labels, kw, why", [
    ([-1, 0], {}, "labels must be distinct and >= 0, got [-1, 0]"),     # -1 would index the null class's row
    ([1, 1], {}, "labels must be distinct and >= 0, got [1, 1]"),
    ([0, 2], {"num_classes": 2}, "label 2 is outside num_classes 2"),  # label 2 would be the null class itself
    ([0, 1], {"schedule_kwargs": {"prediction_type": "epsilon"}, "prediction_type": "v_prediction"},
     "prediction_type 'v_prediction' is not schedule_kwargs' 'epsilon'"),
], ids=["negative", "repeated", "the-null-class", "prediction-type"])
def test_the_adapter_refuses_labels_and_prediction_types_it_cannot_map(sd_denoiser, labels, kw, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        SD.TextConditionedDenoiser(sd_denoiser.unet, _emb(sd_denoiser, len(labels)), labels, **kw)


def test_the_adapter_maps_labels_to_rows_and_sets_the_prediction_type(sd_denoiser):
    """The largest label num_classes - 1 is a class (not the null class); schedule_kwargs without a
    prediction_type get the adapter's, which the sampler's schedule reads."""
    emb = _emb(sd_denoiser, 2)
    den = SD.TextConditionedDenoiser(sd_denoiser.unet, emb, [0, 1], num_classes=2,
                                     schedule_kwargs={"spacing": "leading"}, prediction_type="v_prediction")
    assert den.schedule_kwargs == {"spacing": "leading", "prediction_type": "v_prediction"}
    assert SD.TextConditionedDenoiser(sd_denoiser.unet, emb, [0, 1]).schedule_kwargs == {"prediction_type": "epsilon"}
    assert den.rows.tolist() == [0, 1, 2]


def test_a_bfloat16_unet_gets_its_text_states_in_bfloat16(sd_world, sd_denoiser):
    """load_sd_denoiser(dtype=) loads the UNet in that dtype (the text encoder stays float32, so the
    embeddings table is float32); the adapter gives the UNet its text states in the UNet's dtype."""
    den = SD.load_sd_denoiser(sd_world["model"], {0: "a photo of a cherry", 1: "a photo of a dog"},
                              dtype=torch.bfloat16)
    assert den.dtype == den.unet.dtype == torch.bfloat16 and den.embeddings.dtype == torch.float32
    torch.testing.assert_close(den.embeddings, sd_denoiser.embeddings, rtol=0, atol=0, equal_nan=True)
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([500, 500])
    with torch.no_grad():
        got = den(x, timestep=t, class_labels=torch.tensor([1, 2])).sample
        want = den.unet(x, t, encoder_hidden_states=sd_denoiser.embeddings[[1, 2]].to(torch.bfloat16)).sample
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_a_diffusers_dit_pipeline_folder_is_not_taken_for_stable_diffusion(tmp_path):
    """facebook/DiT-XL-2-256's layout: model_index.json naming a transformer that the folder holds."""
    folder = tmp_path / "dit"
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiTPipeline", "transformer": ["diffusers", "Transformer2DModel"],
         "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "KarrasDiffusionSchedulers"]}))
    assert not SD.is_sd_folder(str(folder)) and model_family(str(folder)) == "dit"


@pytest.mark.parametrize("file, key, value, why", [
    # one token more than the text encoder embeds (the tiny tokenizer has 519)
    ("text_encoder/config.json", "vocab_size", 518, "has 519 tokens, but the text encoder embeds 518 ("),
    # a UNet with encoder_hid_dim projects the text states itself: that width, not cross_attention_dim, is checked
    ("unet/config.json", "encoder_hid_dim", 16, "gives encoder_hid_dim 16, but the text encoder gives 32-dim states"),
    ("unet/config.json", "cross_attention_dim", 16, None),
    ("text_encoder/config.json", "vocab_size", 519, None),
], ids=["vocab-one-short", "encoder-hid-dim", "projected-cross-attention", "vocab-exact"])
def test_the_text_side_widths_are_checked_at_their_boundaries(sd_world, tmp_path, file, key, value, why):
    folder = sd_variant(sd_world, tmp_path)
    path = os.path.join(folder, file)
    cfg = json.loads(open(path).read())
    cfg[key] = value
    if file.startswith("unet/"):  # both keys set: text states of width 32 projected to a cross-attention of 16
        cfg.update(encoder_hid_dim_type="text_proj", **{k: v for k, v in (("encoder_hid_dim", 32),
                                                                           ("cross_attention_dim", 16)) if k != key})
    open(path, "w").write(json.dumps(cfg))
    if why is None:
        assert SD.check_sd_folder(folder)["root"] == folder
        return
    with pytest.raises(ModelError) as e:
        SD.check_sd_folder(folder)
    assert str(e.value).startswith(f"--model {folder}: ") and why in str(e.value)


def test_a_unet_projecting_the_text_states_loads_and_denoises(sd_world, tmp_path):
    """encoder_hid_dim 32 (the text encoder's width) with cross_attention_dim 16: passes the check and runs."""
    folder = sd_variant(sd_world, tmp_path)
    cfg = {**SD.tiny_sd_unet_config(sample_size=8, cross_attention_dim=16), "encoder_hid_dim": 32,
           "encoder_hid_dim_type": "text_proj"}
    shutil.rmtree(os.path.join(folder, "unet"))
    SD.build_sd_unet(cfg).save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    den = SD.load_sd_denoiser(folder, {0: "cherry"})
    with torch.no_grad():
        out = den(torch.zeros(1, 4, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([0])).sample
    assert out.shape == (1, 4, 8, 8) and bool(out.isfinite().all())


@pytest.mark.parametrize("file", ["scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json"])
def test_a_config_file_that_is_not_a_json_object_is_one_line_naming_it(sd_world, tmp_path, file):
    folder = sd_variant(sd_world, tmp_path)
    open(os.path.join(folder, file), "w").write("[1, 2]")
    with pytest.raises(ModelError) as e:
        SD.check_sd_folder(folder)
    msg = str(e.value)
    assert msg.startswith(f"--model {folder}: ") and os.path.join(folder, file) in msg
    assert msg.endswith("is damaged (not a JSON object)") and "\n" not in msg


def test_text_encoder_weights_missing_a_tensor_are_refused(sd_world, tmp_path):
    """transformers would fill the missing tensor with random values (a warning at most): refused instead."""
    from safetensors.torch import load_file, save_file

    folder = sd_variant(sd_world, tmp_path)
    path = os.path.join(folder, "text_encoder", "model.safetensors")
    weights = load_file(path)
    key = next(k for k in weights if "final_layer_norm.weight" in k)
    del weights[key]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"do not fit CLIPTextModel \(1 tensors missing, e\.g\. .*final_layer_norm"):
        SD.load_sd(folder)


def test_a_half_precision_text_encoder_runs_in_float32(sd_world, tmp_path, sd_denoiser):
    """An fp16 text encoder file (SD 1.5's fp16 variant holds fp16 tensors) loads in fp16 under transformers 5;
    the prompts are encoded in float32, from those weights, as the docstring promises."""
    from transformers import CLIPTextModel

    folder = sd_variant(sd_world, tmp_path)
    te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
    shutil.rmtree(os.path.join(folder, "text_encoder"))
    te.half().save_pretrained(os.path.join(folder, "text_encoder"))
    parts = SD.load_sd(folder)
    assert parts["text_encoder"].dtype == torch.float32 and not parts["text_encoder"].training
    want = SD.encode_prompts(te.float(), parts["tokenizer"], ["a photo of a cherry"])
    got = SD.encode_prompts(parts["text_encoder"], parts["tokenizer"], ["a photo of a cherry"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cin, cout", [(9, 4), (4, 8), (4, 4)])
@pytest.mark.parametrize("shift", [None, 0.0])
def test_check_vae_fits_compares_both_unet_channel_counts(cin, cout, shift):
    vae = SimpleNamespace(config=SimpleNamespace(latent_channels=4, shift_factor=shift))
    info = {"in_channels": cin, "out_channels": cout}
    if (cin, cout) == (4, 4):
        SD.check_vae_fits(vae, info, "m", "--model m (vae/)")
        return
    with pytest.raises(ModelError, match=re.escape(f"--model m: the UNet takes {cin} and predicts {cout} latent "
                                                   "channels, but the VAE (--model m (vae/)) has latent_channels 4")):
        SD.check_vae_fits(vae, info, "m", "--model m (vae/)")


def test_sd_info_from_the_config_alone_is_the_loaded_adapters(sd_world, sd_denoiser):
    """``cache`` / ``modes`` read sd_info without loading weights: the same facts, null class included."""
    assert SD.sd_info(sd_world["model"], sd_denoiser.num_classes) == dit_info(sd_denoiser)


@pytest.mark.parametrize("a, b", [("golden retriever", "golden  retriever"), ("golden retriever", "golden\tretriever"),
                                  ("Golden Retriever", " golden retriever")])
def test_prompts_equal_up_to_case_and_whitespace_are_refused(a, b):
    """CLIP's tokenizer splits on any whitespace: such prompts get one embedding (class_prompts, before any model)."""
    with pytest.raises(ConfigError, match="^class folders 'x' and 'y' get the same prompt"):
        SD.class_prompts(["x", "y"], class_names={"x": a, "y": b})
    with pytest.raises(ConfigError, match="^class folder 'x' gets the prompt .*, the --negative-prompt"):
        SD.class_prompts(["x"], class_names={"x": a}, negative_prompt=b)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_encode_prompts_in_batches_keeps_every_prompt_in_order(sd_world, batch_size):
    parts = SD.load_sd(sd_world["model"])
    prompts = ["cherry", "dog", "a photo of a tench", "", "golden retriever"]
    got = SD.encode_prompts(parts["text_encoder"], parts["tokenizer"], prompts, batch_size=batch_size)
    want = torch.cat([SD.encode_prompts(parts["text_encoder"], parts["tokenizer"], [p]) for p in prompts])
    assert got.shape[0] == len(prompts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop", [("tokenizer.json",), ("vocab.json", "merges.txt")], ids=["slow-files", "fast-file"])
def test_a_tokenizer_with_either_vocabulary_layout_passes_the_check(sd_world, tmp_path, drop):
    """SD 1.5's tokenizer/ has vocab.json + merges.txt and no tokenizer.json; either layout is a vocabulary."""
    folder = sd_variant(sd_world, tmp_path)
    for name in drop:
        os.remove(os.path.join(folder, "tokenizer", name))
    tok = SD.check_sd_folder(folder)["tokenizer"]
    assert tok("a photo of a cherry").input_ids == SD.check_sd_folder(sd_world["model"])["tokenizer"](
        "a photo of a cherry").input_ids


def test_the_tiny_folders_model_index_names_its_schedulers_class(sd_world):
    """diffusers' StableDiffusionPipeline builds the scheduler class that model_index.json names."""
    index = json.loads(open(os.path.join(sd_world["model"], "model_index.json")).read())
    sched = json.loads(open(os.path.join(sd_world["model"], "scheduler", "scheduler_config.json")).read())
    assert index["scheduler"] == ["diffusers", sched["_class_name"]] == ["diffusers", "PNDMScheduler"]
    assert type(sd_pipe(sd_world["model"]).scheduler).__name__ == "PNDMScheduler"
