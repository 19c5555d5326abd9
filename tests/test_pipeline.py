"""End to end: image folder -> distilled folder through the CLI and the Python API, resume, bad input."""
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from manifoldgd_fast import DistillConfig, distill
from manifoldgd_fast.cli import main
from manifoldgd_fast.errors import ConfigError
from manifoldgd_fast.output import OutputWriter

FAST = ["--ipc", "2", "--steps", "10", "--t-stop", "5", "--batch-size", "2"]


def _args(world, out, *extra):
    return ["distill", "--data", world["data"], "--model", world["model"], "--out", str(out),
            "--cache-dir", os.path.join(world["root"], "cache"), *FAST, *extra]


def _digest(folder):
    """sha256 of every image and latent file below folder (not the manifest: it holds timings)."""
    h = {}
    for dp, _, files in os.walk(folder):
        for f in sorted(files):
            if f.endswith((".png", ".safetensors")) and f != "contact_sheet.png":
                p = os.path.join(dp, f)
                h[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


@pytest.mark.parametrize("extra", [
    [],                                                    # manifoldgd, official, ddpm
    ["--formulation", "paper"],
    ["--formulation", "paper", "--sampler", "ddim", "--kernel", "laplace"],
    ["--method", "mgd3", "--sampler", "ddim"],
    ["--method", "dit"],
    ["--method", "cgs"],
    ["--cgs", "--formulation", "paper"],                   # CGS composed with ManifoldGD
    ["--method", "cgs", "--sampler", "ddim", "--ipc", "1"],   # CGS with DDIM; a one-sample set (no DPP term)
    ["--guidance-noise", "philox"],                        # the fused ops' counter-based noise (reference on CPU)
    ["--guidance-noise", "philox", "--formulation", "paper", "--backend", "reference"],
    ["--formulation", "paper", "--neighbourhood-dtype", "bfloat16"],   # bf16 patch rows on the device
])
def test_distill_writes_images_latents_manifest(tiny_world, tmp_path, extra):
    out = tmp_path / "out"
    assert main(_args(tiny_world, out, *extra)) == 0
    for c in ("apple", "banana", "cherry"):
        files = sorted(f for f in os.listdir(out / c) if f.endswith(".png"))
        assert files == (["0.png"] if "1" in extra else ["0.png", "1.png"])
        with Image.open(out / c / "0.png") as im:
            assert im.size == (16, 16) and im.mode == "RGB"
        assert (out / "latents" / f"{c}.safetensors").is_file()
    man = json.loads((out / "manifest.json").read_text())
    formulation = "paper" if "paper" in extra else "official"
    assert man["formulation"] == formulation and man["config"]["formulation"] == formulation
    assert man["method"] == (extra[1] if extra and extra[0] == "--method" else "manifoldgd")
    assert {c: v["status"] for c, v in man["classes"].items()} == {"apple": "done", "banana": "done", "cherry": "done"}
    assert man["classes"]["banana"]["label"] == 1
    tv = man["classes"]["banana"]["trajectory_variance"]
    assert len(tv) == 10 and man["classes"]["banana"]["trajectory_final_variance"] == tv[-1]
    assert (tv[-1] == 0) if "1" in extra else (tv[-1] > 0)    # variance over the class's samples
    assert man["config"]["k"] == (10 if formulation == "paper" else 12)
    assert "torch" in man["versions"] and man["fingerprint"]
    assert man["config"]["cgs"] == ("cgs" in " ".join(extra))
    assert man["config"]["guidance_noise"] == ("philox" if "philox" in extra else "generator")  # auto: CPU
    # the guidance noise's keying, as drawn; only ManifoldGD draws any (mode guidance, DiT and CGS do not)
    assert ("guidance" in man["seeds"]) == (man["method"] == "manifoldgd")
    if man["method"] == "manifoldgd":
        assert man["seeds"]["guidance"].startswith("Philox" if "philox" in extra else "the sample's generator")
    assert (out / "contact_sheet.png").is_file()
    if not extra:
        _check_pixels_are_the_decoded_latents(tiny_world, out)


def test_seeds_record_names_guidance_noise_only_where_it_is_drawn():
    from manifoldgd_fast.pipeline import _seeds_record

    def rec(**kw):
        return _seeds_record(DistillConfig(guidance_noise="generator", **kw))

    assert rec()["guidance"].startswith("the sample's generator")
    assert _seeds_record(DistillConfig(guidance_noise="philox"))["guidance"].startswith("Philox")
    for kw in (dict(manifold_scale=0.0), dict(formulation="paper", lambda_n=0.0),
               dict(formulation="paper", lambda_m=0.0), dict(method="mgd3"), dict(method="dit"), dict(method="cgs")):
        assert "guidance" not in rec(**kw), kw
    assert "guidance" in rec(formulation="paper") and "guidance" in rec(lambda_m=0.0)   # official: the pull still runs


def _save_image_bytes(x):
    """torchvision's save_image(x, normalize=True, value_range=(-1, 1)) of (3, H, W), transcribed: make_grid
    clamps to the range, subtracts its low end and divides by its width; save_image scales by 255, adds 0.5,
    clamps and truncates to uint8 (the released samplers write their PNGs so)."""
    x = x.clone().clamp_(min=-1, max=1).sub_(-1).div_(max(1 - (-1), 1e-5))
    return x.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def _check_pixels_are_the_decoded_latents(world, out):
    """Each written PNG is its saved latent decoded by the run's VAE, in save_image's bytes."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = AutoencoderKL.from_pretrained(os.path.join(world["model"], "vae")).eval()
    for c in ("apple", "banana", "cherry"):
        z = load_file(str(out / "latents" / f"{c}.safetensors"))["latents"]
        with torch.no_grad():
            imgs = vae.decode(z / vae.config.scaling_factor).sample
        for i, img in enumerate(imgs):
            with Image.open(out / c / f"{i}.png") as im:
                png = np.asarray(im.convert("RGB")).astype(np.int16)
            diff = np.abs(png - _save_image_bytes(img).astype(np.int16))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (c, i, diff.max())   # a batch's rounding at most


def test_pixels_round_as_torchvisions_save_image():
    """output.to_uint8_tensor against save_image's transcription around every rounding point and past the range."""
    from manifoldgd_fast.output import to_uint8_images, to_uint8_tensor

    j = torch.arange(256, dtype=torch.float32)
    edges = (j + 0.5) / 255 * 2 - 1          # where the byte changes
    x = torch.cat([edges, torch.nextafter(edges, torch.tensor(-2.0)), torch.nextafter(edges, torch.tensor(2.0)),
                   j / 255 * 2 - 1, torch.tensor([-7.0, -1.0, 1.0, 3.0, -0.0])])
    x = torch.cat([x, torch.zeros((-len(x)) % 24)]).reshape(1, 3, -1, 8)
    x = torch.cat([x, x.flip(1)])             # (2, 3, h, 8): every value in every channel
    expect = np.stack([_save_image_bytes(img) for img in x])
    assert np.array_equal(to_uint8_tensor(x).numpy(), expect) and np.array_equal(to_uint8_images(x), expect)
    assert expect.min() == 0 and expect.max() == 255 and len(np.unique(expect)) == 256


def test_same_seed_same_bytes_and_methods_differ(tiny_world, tmp_path):
    a, b, c, d = (tmp_path / n for n in "abcd")
    assert main(_args(tiny_world, a)) == 0
    assert main(_args(tiny_world, b, "--batch-size", "1")) == 0
    assert main(_args(tiny_world, c, "--seed", "1")) == 0
    assert main(_args(tiny_world, d, "--method", "mgd3")) == 0
    assert main(_args(tiny_world, tmp_path / "e", "--method", "dit")) == 0
    da, db, dc, dd, de = map(_digest, (a, b, c, d, tmp_path / "e"))
    # a sample's noise does not depend on the batch: the same latents up to float rounding (the DiT
    # forward runs on another batch shape: up to ~2e-4 on AVX-512 CPUs; noise drawn per batch would
    # move them by O(1)), so pixels equal to within one level
    from safetensors.torch import load_file
    for c_ in ("apple", "banana", "cherry"):
        la, lb = (load_file(str(p / "latents" / f"{c_}.safetensors"))["latents"] for p in (a, b))
        assert (la - lb).abs().max() < 2e-3
        for j in range(2):
            pa, pb = (np.asarray(Image.open(p / c_ / f"{j}.png"), dtype=np.int16) for p in (a, b))
            assert np.abs(pa - pb).max() <= 1
    assert main(_args(tiny_world, tmp_path / "a2")) == 0
    assert _digest(tmp_path / "a2") == da                               # same command, same bytes
    assert da.keys() == dc.keys() and all(da[k] != dc[k] for k in da)
    assert any(da[k] != dd[k] for k in da)
    assert all(dd[k] != de[k] for k in dd)   # mgd3 is guided towards its modes: not plain DiT sampling


def test_cgs_sets_do_not_depend_on_the_forward_batch(tiny_world, tmp_path):
    """CGS denoises a class's IPC samples as one set, whatever --batch-size (the DiT forward's chunk) is,
    pulled towards the mean of that class's cached latents."""
    outs = [tmp_path / f"b{b}" for b in (1, 3)]
    for o, b in zip(outs, (1, 3)):
        assert main(_args(tiny_world, o, "--method", "cgs", "--ipc", "3", "--batch-size", str(b))) == 0
    d1, d3 = map(_digest, outs)
    assert {k: v for k, v in d1.items() if k.endswith(".png")} == {k: v for k, v in d3.items() if k.endswith(".png")}
    # the class mean is the mean of the class's cached latents: a run with a strong mean-matching step
    # ends with each class's set mean nearer its own class mean than any other's
    from safetensors.torch import load_file
    from manifoldgd_fast.latents import load_class_latents
    strong = tmp_path / "strong"
    assert main(_args(tiny_world, strong, "--method", "cgs", "--ipc", "3", "--eta-dpp", "0", "--eta-dm", "1.5",
                      "--steps", "10")) == 0
    cache = json.loads((strong / "manifest.json").read_text())["latent_cache"]
    mus = {c: load_class_latents(cache, c)[0].float().mean(0).flatten() for c in ("apple", "banana", "cherry")}
    for c in mus:
        m = load_file(str(strong / "latents" / f"{c}.safetensors"))["latents"].float().mean(0).flatten()
        assert min(mus, key=lambda k: float((mus[k] - m).norm())) == c


def test_paper_patches_follow_their_modes_across_forward_batches(tiny_world, tmp_path):
    """--class-batch 1 with --batch-size below --ipc: each batch's rows take their own modes' neighbourhood order
    and sorted distances (the patch lengths), so batches of 2 + 1 give the latents of one batch of 3 up to
    rounding (the DiT forward on another batch shape)."""
    from safetensors.torch import load_file

    outs = [tmp_path / f"b{b}" for b in (2, 3)]
    for o, b in zip(outs, (2, 3)):
        assert main(_args(tiny_world, o, "--formulation", "paper", "--ipc", "3", "--class-batch", "1",
                          "--batch-size", str(b))) == 0
    for c in ("apple", "banana", "cherry"):
        l2, l3 = (load_file(str(o / "latents" / f"{c}.safetensors"))["latents"] for o in outs)
        assert (l2 - l3).abs().max() < 2e-3, c


@pytest.mark.parametrize("extra", [[], ["--method", "cgs"]])
def test_resume_after_interruption_gives_the_same_bytes(tiny_world, tmp_path, monkeypatch, extra):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_args(tiny_world, ref, *extra)) == 0
    real = OutputWriter.write_class
    calls = []

    def dying(self, name, *a, **k):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the second class
        return real(self, name, *a, **k)

    monkeypatch.setattr(OutputWriter, "write_class", dying)
    assert main(_args(tiny_world, out, *extra)) == 130
    assert os.path.isdir(out / "apple") and not os.path.exists(out / "banana")
    man = json.loads((out / "manifest.json").read_text())
    assert man["classes"]["apple"]["status"] == "done" and man["classes"]["banana"]["status"] == "pending"
    monkeypatch.setattr(OutputWriter, "write_class", real)
    calls.clear()
    monkeypatch.setattr(OutputWriter, "write_class", lambda self, name, *a, **k: (calls.append(name), real(self, name, *a, **k))[1])
    assert main(_args(tiny_world, out, *extra)) == 0
    assert calls == ["banana", "cherry"]                 # finished class skipped
    assert _digest(out) == _digest(ref)


def test_an_interrupted_run_closes_its_progress_bar_before_its_last_line(tiny_world, tmp_path, monkeypatch, capsys):
    """On a terminal (the bar is drawn only there) "interrupted; finished classes are kept" was glued to the
    bar's "...img/s]": the bar is closed on the way out."""
    import tqdm.auto

    real_tqdm = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: real_tqdm(*a, **{**k, "disable": False}))  # ("a tty")
    real = OutputWriter.write_class
    monkeypatch.setattr(OutputWriter, "write_class", lambda self, name, *a, **k: (
        _ for _ in ()).throw(KeyboardInterrupt) if name == "banana" else real(self, name, *a, **k))
    assert main(_args(tiny_world, tmp_path / "out")) == 130
    err = capsys.readouterr().err
    assert "img/s]" in err, err  # (the bar was drawn)
    line = next(ln for ln in err.split("\n") if "interrupted" in ln)
    *before, shown = line.split("\r")  # (as a terminal shows it: a "\r" returns to the line's start)
    assert shown.startswith("manifoldgd-fast: interrupted") and not "".join(before[-1:]).strip(), repr(line)


def test_the_manifest_is_rewritten_at_a_pace_and_on_the_way_out(tiny_world, tmp_path, monkeypatch):
    """Rank 0 rewrites the manifest after a class only once MANIFEST_PACE times its last write's cost has
    passed (at ImageNet-1k it is megabytes: per class it would cost O(classes^2)); the end of the run, and a
    run stopped part-way, write it whatever the pace, so it names every class finished by then."""
    from manifoldgd_fast import pipeline

    writes = []
    real = OutputWriter.write_manifest
    monkeypatch.setattr(OutputWriter, "write_manifest", lambda self, m: (writes.append(
        sorted(k for k, v in m["classes"].items() if v["status"] == "done")), real(self, m))[1])
    monkeypatch.setattr(pipeline, "MANIFEST_PACE", 1e9)
    assert main(_args(tiny_world, tmp_path / "a")) == 0
    assert writes == [[], ["apple", "banana", "cherry"]]          # the start and the end only
    writes.clear()
    monkeypatch.setattr(pipeline, "MANIFEST_PACE", 0)
    assert main(_args(tiny_world, tmp_path / "b")) == 0
    assert writes == [[], ["apple"], ["apple", "banana"], ["apple", "banana", "cherry"], ["apple", "banana", "cherry"]]
    writes.clear()
    monkeypatch.setattr(pipeline, "MANIFEST_PACE", 1e9)
    real_write = OutputWriter.write_class
    monkeypatch.setattr(OutputWriter, "write_class", lambda self, name, *a, **k: (
        _ for _ in ()).throw(KeyboardInterrupt) if name == "cherry" else real_write(self, name, *a, **k))
    assert main(_args(tiny_world, tmp_path / "c")) == 130
    assert writes[-1] == ["apple", "banana"]
    # a run stopped part-way also names the classes other ranks finished (here: a class folder that appears
    # on disk while this process samples, as another rank's would; torchrun's SIGTERM reaches every rank)
    writes.clear()

    def other_rank_then_stop(self, name, *a, **k):
        real_write(self, "banana", np.zeros((2, 16, 16, 3), np.uint8), None, {"label": 1, "ipc": 2})
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputWriter, "write_class", other_rank_then_stop)
    assert main(_args(tiny_world, tmp_path / "d")) == 130
    assert writes[-1] == ["banana"]


def test_python_api_and_config_file(tiny_world, tmp_path):
    cfg = DistillConfig(data=tiny_world["data"], model=tiny_world["model"], out=str(tmp_path / "api"),
                        cache_dir=os.path.join(tiny_world["root"], "cache"), ipc=2, steps=10, t_stop=5,
                        classes="apple,cherry")
    res = distill(cfg)
    assert sorted(res.classes) == ["apple", "cherry"] and res.classes["cherry"]["label"] == 2
    assert res.out == str(tmp_path / "api") and os.path.isfile(res.manifest) and res.distilled == ["apple", "cherry"]
    # run again (a script rerun): nothing distilled, the finished classes' stats as the first call gave them
    again = distill(cfg)
    assert again.distilled == [] and again.finished_before == 2
    assert json.loads(json.dumps(again.classes)) == json.loads(json.dumps(res.classes))
    # the same run from a YAML file, one flag overriding it
    yml = tmp_path / "run.yaml"
    yml.write_text(f"data: {tiny_world['data']}\nmodel: {tiny_world['model']}\nipc: 2\nsteps: 10\nt_stop: 5\n"
                   f"classes: apple,cherry\ncache_dir: {os.path.join(tiny_world['root'], 'cache')}\nseed: 5\n")
    assert main(["distill", "--config", str(yml), "--out", str(tmp_path / "yml"), "--seed", "0"]) == 0
    assert _digest(tmp_path / "yml") == _digest(tmp_path / "api")


def test_undecodable_image_is_reported_and_skipped(tiny_world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    (data / "apple" / "broken.jpg").write_bytes(b"not a jpeg at all")
    args = _args(dict(tiny_world, data=str(data)), tmp_path / "out")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["classes"]["apple"]["n_latents"] == 12
    assert man["classes"]["apple"]["skipped_images"] == ["broken.jpg"] and man["classes"]["banana"]["skipped_images"] == []
    # a second run over the same (now cached) data still says so, and records it
    assert main(args[:args.index("--out") + 1] + [str(tmp_path / "out2")] + args[args.index("--out") + 2:]) == 0
    assert "broken.jpg" in capsys.readouterr().err
    man = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert man["classes"]["apple"]["skipped_images"] == ["broken.jpg"]


def _bad(tiny_world, tmp_path, args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    last = err[-1]
    assert last.startswith("manifoldgd-fast: error: ")
    assert not any("Traceback" in line for line in err)
    return last


def test_bad_inputs_one_line_exit_2(tiny_world, tmp_path, capsys):
    w = tiny_world
    empty = tmp_path / "empty"
    empty.mkdir()
    noimg = tmp_path / "noimg"
    shutil.copytree(w["data"], noimg)
    for f in os.listdir(noimg / "banana"):
        os.unlink(noimg / "banana" / f)
    (noimg / "banana" / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    shutil.copytree(w["data"], broken)
    for f in os.listdir(broken / "cherry"):
        (broken / "cherry" / f).write_bytes(b"garbage")
    out = tmp_path / "o"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("warm_mult: abc\n")
    cases = [
        (["distill", "--data", str(tmp_path / "missing"), "--model", w["model"], "--out", str(out)], "missing"),
        (["distill", "--data", str(empty), "--model", w["model"], "--out", str(out)], "empty"),
        (_args(dict(w, data=str(noimg)), out), "banana"),
        (_args(dict(w, data=str(broken)), out), "cherry"),
        (_args(w, out, "--ipc", "50"), "--ipc"),
        (_args(w, out, "--method", "magic"), "--method"),
        (_args(w, out, "--mode-method", "spectral"), "--mode-method"),
        (_args(w, out, "--kernel", "cauchy"), "--kernel"),
        (_args(w, out, "--formulation", "paper", "--k", "20"), "--k"),
        (_args(w, out, "--d", "12"), "--d"),
        (_args(w, out, "--lambda-m", "-0.1"), "--lambda-m"),
        (_args(w, out, "--manifold-radius", "-1"), "--manifold-radius"),
        (_args(w, out, "--formulation", "paper", "--radius-units", "absolute", "--r-min", "-2"), "--r-min"),
        (["distill", "--data", w["data"], "--model", str(tmp_path / "nomodel"), "--out", str(out)], "nomodel"),
        (_args(w, out, "--classes", "apple,durian"), "durian"),
        (_args(w, out, "--label-map", str(tmp_path / "nomap.json")), "nomap.json"),
        (_args(w, a_file), "--out"),
        (["modes", "--data", w["data"], "--model", w["model"], "--out", str(a_file)], "--out"),
        (["finetune", "--data", w["data"], "--model", w["model"], "--out", str(a_file), "--steps", "1"], "--out"),
        (_args(w, out, "--warm-mult", "nan"), "--warm-mult"),
        (_args(w, out, "--warm-mult", "inf"), "--warm-mult"),
        (_args(w, out, "--config", str(bad_cfg)), "--warm-mult"),
        (_args(w, out, "--cloud-size", "5"), "--cloud-size"),
    ]
    for args, culprit in cases:
        line = _bad(w, tmp_path, args, capsys)
        assert culprit in line, (culprit, line)
    assert a_file.read_text() == "not a folder"


def test_non_finite_samples_stop_the_run_in_one_line(tiny_world, tmp_path, capsys):
    """Guidance steps so large that the latents overflow: the class is named, nothing of it is written."""
    out = tmp_path / "out"
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--method", "cgs", "--eta-dpp", "1e38"), capsys)
    assert "class apple: 2 of 2 sampled latents hold NaN or inf" in line and "--eta-dpp" in line, line
    assert not os.path.exists(out / "apple")
    man = json.loads((out / "manifest.json").read_text())
    assert man["classes"]["apple"]["status"] == "pending"


def test_non_finite_pixels_from_the_vae_stop_the_run_in_one_line(tiny_world, tmp_path, capsys, monkeypatch):
    """An fp16 VAE decoder that overflows gives NaN pixels from finite latents; uint8 made them black
    images. The class is named, nothing of it is written."""
    from diffusers import AutoencoderKL

    real = AutoencoderKL.decode

    def overflowing(self, z, *a, **k):
        out = real(self, z, *a, **k)
        out.sample[:, :, :2] = float("inf")
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    out = tmp_path / "out"
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--method", "dit"), capsys)
    assert line.endswith("class apple: the VAE decoded NaN or inf pixels (its latents were finite); nothing written "
                         "for it; check the VAE's weights (--vae)"), line
    assert not os.path.exists(out / "apple")
    assert json.loads((out / "manifest.json").read_text())["classes"]["apple"]["status"] == "pending"


def test_non_finite_pixels_blame_their_own_class_in_a_shared_batch(tiny_world, tmp_path, capsys, monkeypatch):
    """--class-batch 2: only banana's rows decode to inf. The error names banana (not apple, which shares the
    batch), apple is written and banana is not."""
    from diffusers import AutoencoderKL

    real, calls = AutoencoderKL.decode, []

    def overflowing(self, z, *a, **k):
        out = real(self, z, *a, **k)
        calls.append(z.shape[0])
        if len(calls) == 2:                       # decoded --batch-size 2 rows at a time: (apple), then (banana)
            out.sample[:] = float("inf")
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    out = tmp_path / "out"
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--method", "dit", "--class-batch", "2"), capsys)
    assert "class banana: the VAE decoded NaN or inf pixels" in line, line
    assert (out / "apple" / ".complete").exists() and not os.path.exists(out / "banana")


def test_an_error_saving_the_last_class_fails_the_run(tiny_world, tmp_path, capsys, monkeypatch):
    """The last group's save runs on the writer thread after the sampling loop: its error still stops the run
    in one line (exit 2), and the manifest keeps the class pending."""
    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.output import OutputWriter

    real = OutputWriter.write_class

    def failing(self, name, *a, **k):
        if name == "cherry":
            raise ConfigError("class cherry: cannot be written (a test)")
        return real(self, name, *a, **k)

    monkeypatch.setattr(OutputWriter, "write_class", failing)
    out = tmp_path / "out"
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--method", "dit", "--class-batch", "2"), capsys)
    assert line.endswith("class cherry: cannot be written (a test)"), line
    man = json.loads((out / "manifest.json").read_text())["classes"]
    assert man["cherry"]["status"] == "pending" and man["banana"]["status"] == "done"


def test_label_map_file_end_to_end(tiny_world, tmp_path, capsys):
    """A class-map file sets each class's DiT label (recorded in the manifest); ids outside the model,
    folders missing from the map and bad entries stop the run in one line, exit 2."""
    m = tmp_path / "map.txt"
    m.write_text("apple\t2\nbanana,0\ncherry 1\n")
    out = tmp_path / "out"
    assert main(_args(tiny_world, out, "--method", "dit", "--label-map", str(m))) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert {c: v["label"] for c, v in man["classes"].items()} == {"apple": 2, "banana": 0, "cherry": 1}
    assert man["config"]["label_map"] == str(m)
    capsys.readouterr()
    # the map counts by its contents: the same path with other labels is another run, refused in the same --out
    m.write_text("apple\t1\nbanana,0\ncherry 2\n")
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--method", "dit", "--label-map", str(m)), capsys)
    assert "holds a run with other parameters (data, label_map)" in line, line
    assert json.loads((out / "manifest.json").read_text()) == man       # nothing already written is lost
    bad = tmp_path / "bad.json"
    for text, culprit in [('{"apple": 2, "banana": 0, "cherry": 3}', "class cherry has label 3, outside the model's 3"),
                          ('{"apple": 2, "banana": 0}', "class folder 'cherry' is not in the class map"),
                          ('{"apple": 2, "banana": "n09999999", "cherry": 1}', "key 'banana': 'n09999999'"),
                          ('{"apple": 2, "banana": 2, "cherry": 1}', "folders 'apple' and 'banana' both map to class 2")]:
        bad.write_text(text)
        line = _bad(tiny_world, tmp_path, _args(tiny_world, tmp_path / "o", "--label-map", str(bad)), capsys)
        assert str(bad) in line and culprit in line, line


def test_bad_rerun_loses_nothing(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_world, out)) == 0
    before = _digest(out)
    manifest = (out / "manifest.json").read_bytes()
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--ipc", "50"), capsys)
    assert "--ipc" in line
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--lambda-m", "0.3"), capsys)
    assert "other parameters" in line            # a different run never mixes into this folder
    assert _digest(out) == before and (out / "manifest.json").read_bytes() == manifest


def test_console_script_exit_code_and_help(tiny_world, tmp_path):
    beside = os.path.join(os.path.dirname(sys.executable), "manifoldgd-fast")  # this interpreter's own script
    exe = beside if os.path.exists(beside) else shutil.which("manifoldgd-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "manifoldgd_fast"]
    r = subprocess.run(cmd + ["distill", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--formulation" in r.stdout and "--lambda-m" in r.stdout
    r = subprocess.run(cmd + ["distill", "--data", str(tmp_path / "nope"), "--model", tiny_world["model"]],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cache_and_modes_commands(tiny_world, tmp_path, capsys):
    from safetensors.torch import load_file

    cache = str(tmp_path / "cache")
    base = ["--data", tiny_world["data"], "--model", tiny_world["model"], "--cache-dir", cache]
    assert main(["cache", *base]) == 0
    assert main(["modes", *base, "--out", str(tmp_path / "m"), "--ipc", "3"]) == 0
    m = load_file(str(tmp_path / "m" / "modes" / "apple.safetensors"))["modes"]
    assert m.shape == (3, 4, 8, 8)
    # `cache` again mends a class whose latents were damaged on disk (modes / distill stop at it)
    (path,) = glob.glob(os.path.join(cache, "latents", "*", "apple.safetensors"))
    good = open(path, "rb").read()
    open(path, "wb").write(good[:-1] + bytes([good[-1] ^ 1]))
    capsys.readouterr()
    assert main(["modes", *base, "--out", str(tmp_path / "m2"), "--ipc", "3"]) == 2
    assert "apple.safetensors is damaged" in capsys.readouterr().err
    assert main(["cache", *base]) == 0 and open(path, "rb").read() == good
    assert main(["modes", *base, "--out", str(tmp_path / "m2"), "--ipc", "3"]) == 0
    # resumable: a rerun recomputes nothing
    before = {c: os.stat(tmp_path / "m" / "modes" / f"{c}.safetensors").st_mtime_ns for c in ("apple", "banana")}
    # a killed run's temp (untouched for over an hour) is swept; a fresh one may be another run's write in flight
    stale, fresh = tmp_path / "m" / "modes" / ".tmp-apple-1", tmp_path / "m" / "modes" / ".tmp-banana-2"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (0, 0))
    assert main(["modes", *base, "--out", str(tmp_path / "m"), "--ipc", "3"]) == 0
    assert before == {c: os.stat(tmp_path / "m" / "modes" / f"{c}.safetensors").st_mtime_ns for c in before}
    assert not stale.exists() and fresh.exists()


def test_modes_written_meanwhile_by_another_modes_run_of_other_settings_are_refused(tiny_world, tmp_path, capsys,
                                                                                  monkeypatch):
    """Two `modes` runs of other settings into one OUT at once (it takes no lock) both ended "modes of N
    classes", the files a mix of both (a concurrency audit): a class file that another run wrote while this
    one computed it is refused in one line, not overwritten."""
    from manifoldgd_fast import pipeline

    base = ["--data", tiny_world["data"], "--model", tiny_world["model"], "--cache-dir",
            os.path.join(tiny_world["root"], "cache"), "--out", str(tmp_path / "m")]
    assert main(["modes", *base, "--ipc", "3", "--classes", "apple"]) == 0
    theirs = (tmp_path / "m" / "modes" / "apple.safetensors").read_bytes()
    (tmp_path / "m" / "modes" / "apple.safetensors").unlink()
    real = pipeline.class_modes

    def other_run_meanwhile(rcfg, name, z):
        (tmp_path / "m" / "modes" / "apple.safetensors").write_bytes(theirs)    # the --ipc 3 run's
        return real(rcfg, name, z)

    monkeypatch.setattr(pipeline, "class_modes", other_run_meanwhile)
    capsys.readouterr()
    assert main(["modes", *base, "--ipc", "2", "--classes", "apple"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apple.safetensors was written meanwhile by another `modes` run" in err[0], err
    assert (tmp_path / "m" / "modes" / "apple.safetensors").read_bytes() == theirs


def test_backend_triton_off_cuda_is_refused_before_any_encoding(tiny_world, tmp_path, capsys, monkeypatch):
    """--backend triton on a CPU run (not under the interpreter) was refused at the first guided step, after the
    latent cache was encoded (hours at ImageNet-1k) and OUT's manifest written (a Python API audit)."""
    from manifoldgd_fast import dispatch, latents

    kern, _ = dispatch._kernels()
    if kern is not None and kern.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels run on the CPU here")
    monkeypatch.setattr(latents, "cache_latents", lambda *a, **k: pytest.fail("latents encoded"))
    out = tmp_path / "out"
    assert main(_args(tiny_world, out, "--backend", "triton")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("manifoldgd-fast: error: --backend triton: ") and "cpu" in err[0], err
    assert not out.exists()
    monkeypatch.undo()   # mgd3 picks no backend (nor does CGS): --backend triton from a shared config still runs
    assert main(_args(tiny_world, out, "--backend", "triton", "--method", "mgd3", "--classes", "apple")) == 0


def test_distill_from_precomputed_modes_gives_the_same_bytes(tiny_world, tmp_path, capsys):
    """`modes` then `distill --modes-dir` == `distill` alone; modes of other parameters are refused."""
    base = ["--data", tiny_world["data"], "--model", tiny_world["model"],
            "--cache-dir", os.path.join(tiny_world["root"], "cache")]
    assert main(["modes", *base, "--out", str(tmp_path / "m"), *FAST]) == 0
    assert main(_args(tiny_world, tmp_path / "a")) == 0
    assert main(_args(tiny_world, tmp_path / "b", "--modes-dir", str(tmp_path / "m" / "modes"))) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    capsys.readouterr()
    assert main(_args(tiny_world, tmp_path / "c", "--modes-dir", str(tmp_path / "m" / "modes"), "--seed", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds modes made with other mode parameters" in err[0]
    assert main(_args(tiny_world, tmp_path / "d", "--modes-dir", str(tmp_path / "nowhere"))) == 2
    assert "--modes-dir" in (err := capsys.readouterr().err) and "no such folder" in err
    (tmp_path / "empty").mkdir()
    assert main(_args(tiny_world, tmp_path / "d", "--modes-dir", str(tmp_path / "empty"))) == 2
    assert "no modes for class apple" in capsys.readouterr().err


def test_precomputed_modes_are_tied_to_their_class_and_its_latents(tiny_world, tmp_path, capsys, caplog):
    """Modes count by the class and its cached latents, not by the cache's folder: the same latents copied
    under another --cache-dir are accepted (same bytes); a class encoded again (changed images, another VAE
    under the same name) or another class's file are refused; every modes file is checked before any class
    is written (a damaged or short one is one line, not a traceback after the first classes); `modes` computes
    a damaged file's class again."""
    import shutil

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from manifoldgd_fast.latents import latents_sha256

    cache = os.path.join(tiny_world["root"], "cache")
    base = ["--data", tiny_world["data"], "--model", tiny_world["model"], "--cache-dir", cache]
    assert main(["modes", *base, "--out", str(tmp_path / "m"), *FAST]) == 0
    assert main(_args(tiny_world, tmp_path / "a")) == 0
    modes = tmp_path / "m" / "modes"
    shutil.copytree(cache, tmp_path / "cache2")
    copy = _args(tiny_world, tmp_path / "b", "--modes-dir", str(modes))
    copy[copy.index("--cache-dir") + 1] = str(tmp_path / "cache2")
    assert main(copy) == 0 and _digest(tmp_path / "a") == _digest(tmp_path / "b")

    # apple encoded again (here: its record rewritten, as a re-encode with changed stamps rewrites it)
    for f in (tmp_path / "cache2").rglob("apple.safetensors"):    # (the shared cache holds other runs' folders)
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        save_file(load_file(str(f)), str(f), metadata={**meta, "stamps": meta["stamps"].replace("[", "[ ", 1)})
    capsys.readouterr()
    copy[copy.index("--out") + 1] = str(tmp_path / "c")
    assert main(copy) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apple.safetensors holds modes made with other mode parameters or latents" in err[0], err
    assert not (tmp_path / "c" / "apple").exists()

    m2 = tmp_path / "m2"
    shutil.copytree(modes, m2)
    shutil.copy(m2 / "apple.safetensors", m2 / "banana.safetensors")   # another class's modes
    run = _args(tiny_world, tmp_path / "d", "--modes-dir", str(m2))
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "banana.safetensors holds modes made with other" in err[0], err
    assert not (tmp_path / "d" / "apple").exists()                      # refused before apple was written
    (m2 / "banana.safetensors").write_bytes(b"garbage")
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "banana.safetensors: not a modes file" in err[0] and not (tmp_path / "d" / "apple").exists()
    with safe_open(str(modes / "banana.safetensors"), framework="pt") as h:   # one mode short, its own fingerprint
        meta, short = h.metadata(), h.get_tensor("modes")[:1]
    save_file({"modes": short}, str(m2 / "banana.safetensors"), metadata=dict(meta, modes_sha256=latents_sha256(short)))
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "banana.safetensors holds (1, " in err[0] and "modes, not (2, 4, 8, 8) (--ipc 2)" in err[0], err
    assert not (tmp_path / "d" / "apple").exists()
    bad = load_file(str(modes / "banana.safetensors"))["modes"]      # NaN, with its own fingerprint
    bad[0, 0, 0, 0] = float("nan")
    save_file({"modes": bad}, str(m2 / "banana.safetensors"), metadata=dict(meta, modes_sha256=latents_sha256(bad)))
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("banana.safetensors holds NaN or inf modes; recompute them with "
                                             "`manifoldgd-fast modes`"), err
    assert not (tmp_path / "d" / "apple").exists()
    # a byte of the modes changed on disk (finite, and wrong; the header's fingerprint intact): each file records
    # its modes' sha256, so distill stops at it, and `modes` warns and computes the class again, to its bytes
    good = (modes / "banana.safetensors").read_bytes()
    (m2 / "banana.safetensors").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("banana.safetensors is damaged (its modes' sha256 is not the one "
                                             "recorded when it was written); recompute it with `manifoldgd-fast "
                                             "modes`"), err
    assert not (tmp_path / "d" / "apple").exists()
    (modes / "banana.safetensors").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with caplog.at_level("WARNING", logger="manifoldgd_fast"):
        assert main(["modes", *base, "--out", str(tmp_path / "m"), *FAST]) == 0
    assert (modes / "banana.safetensors").read_bytes() == good
    assert "banana.safetensors is damaged" in caplog.text and "computing the class's modes again" in caplog.text


def test_the_modes_command_refuses_its_modes_of_changed_images(tiny_world, tmp_path, capsys):
    """`modes` again after a class's images changed: its file holds modes of the old latents, and is not
    taken as done (nor replaced: it may be another run's); one line naming it, the file unchanged."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    base = ["modes", "--data", str(data), "--model", tiny_world["model"], "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "m"), *FAST]
    assert main(base) == 0
    f = tmp_path / "m" / "modes" / "apple.safetensors"
    before = f.read_bytes()
    image = sorted((data / "apple").iterdir())[0]
    image.write_bytes(sorted((data / "banana").iterdir())[0].read_bytes())
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"manifoldgd-fast: error: {f} holds modes made with other mode parameters or latents (the "
                       "class's images or the VAE changed since?); delete it to recompute, or use a new --out"), err
    assert f.read_bytes() == before


def test_embedded_demo_runs_without_arguments(tmp_path, monkeypatch):
    """No --data / --model: the shipped digits world; a short run on 2 classes, then its eval."""
    import json as _json

    monkeypatch.setenv("MANIFOLDGD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["distill", "--ipc", "1", "--classes", "3,7", "--steps", "10", "--t-stop", "5",
                 "--out", str(out)]) == 0
    man = _json.loads((out / "manifest.json").read_text())
    assert man["extra"]["demo"] == "digits" and sorted(man["classes"]) == ["3", "7"]
    assert man["classes"]["7"]["label"] == 7
    with Image.open(out / "7" / "0.png") as im:
        assert im.size == (32, 32)
    assert main(["eval", "--distilled", str(out), "--epochs", "2", "--seeds", "1", "--no-progress"]) == 2  # classes 3,7 vs 10
    assert main(["eval", "--distilled", str(tmp_path / "nowhere"), "--no-progress"]) == 2           # no --real-val
    full = tmp_path / "full"
    assert main(["distill", "--ipc", "1", "--steps", "4", "--t-stop", "2", "--out", str(full)]) == 0
    assert main(["eval", "--distilled", str(full), "--epochs", "2", "--seeds", "1", "--no-progress"]) == 0
    res = _json.loads((full / "eval.json").read_text())
    assert list(res["nets"]) == ["convnet6"] and res["epochs"] == 2


# --------------------------------------------------------------------------- several classes in one batch
def test_each_sample_is_seeded_by_its_class_and_index(tiny_world, tmp_path, monkeypatch):
    """A sample's x_T comes from derive_seed(seed, 'sample', class, index): plain DiT sampling of that x_T by hand
    gives the written latents (several classes share a batch here; only rounding differs). The guidance noise ids
    are label * ipc + index, distinct over the run (a class batch of 3 classes x 2). Modes are seeded per class."""
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import load_file

    from manifoldgd_fast import classrun
    from manifoldgd_fast.config import derive_seed
    from manifoldgd_fast.modes import random_modes
    from manifoldgd_fast.sampler import sample
    from manifoldgd_fast.schedule import make_schedule

    out = tmp_path / "dit"
    assert main(_args(tiny_world, out, "--method", "dit", "--class-batch", "3")) == 0
    model = DiTTransformer2DModel.from_pretrained(os.path.join(tiny_world["model"], "transformer")).eval()
    sched = make_schedule(10, "ddpm")
    for name, label in (("apple", 0), ("cherry", 2)):
        gens = [torch.Generator().manual_seed(derive_seed(0, "sample", name, j)) for j in range(2)]
        x_T = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
        want = sample(model, sched, x_T, torch.tensor([label, label]), null_class=3, cfg_scale=4.0, generators=gens)
        got = load_file(str(out / "latents" / f"{name}.safetensors"))["latents"]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    from manifoldgd_fast import guidance as guidance_mod

    seen = []
    real_guidance = guidance_mod.Guidance

    def spy(*a, sample_ids=None, **kw):
        seen.append(list(sample_ids))
        keys.add(kw["noise_seed"])
        return real_guidance(*a, sample_ids=sample_ids, **kw)

    keys = set()

    monkeypatch.setattr(guidance_mod, "Guidance", spy)   # classrun imports it at each call
    assert main(_args(tiny_world, tmp_path / "mgd", "--guidance-noise", "philox", "--class-batch", "3")) == 0
    assert seen and seen[0] == [0, 1, 2, 3, 4, 5]      # labels 0, 1, 2 x ipc 2: label * ipc + index
    assert keys == {derive_seed(0, "guidance")}        # one Philox key for the run (README's recipe uses it)

    z = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    cfg = DistillConfig(ipc=2, mode_method="random").resolve(3)
    a = classrun.class_modes(cfg, "apple", z.view(12, 1, 4, 4)).flatten(1)
    assert torch.equal(a, random_modes(z, 2, seed=derive_seed(0, "modes", "apple")))
    assert not torch.equal(a, classrun.class_modes(cfg, "banana", z.view(12, 1, 4, 4)).flatten(1))


def test_class_batch_defaults_and_where_it_is_refused():
    def res(**kw):
        return DistillConfig(**{"ipc": 2, "batch_size": 16, **kw}).resolve(10)

    assert res().class_batch == 8 and res(ipc=10).class_batch == 1 and res(ipc=10, batch_size=64).class_batch == 6
    assert res(class_batch=3).class_batch == 3
    assert DistillConfig(ipc=1).resolve(10).class_batch == 10  # batch 16 // IPC 1, but the run has 10 classes
    assert res(method="cgs").class_batch == 8 and res(formulation="paper").class_batch == 8
    assert DistillConfig(ipc=2).resolve(10, backbone="sd").class_batch == 8
    assert res(method="mgd3").class_batch == 8 and res(formulation="paper", method="mgd3").class_batch == 8
    with pytest.raises(ConfigError, match="--class-batch must be an integer >= 1"):
        DistillConfig(class_batch=0).validate()


def test_class_checks_refuse_just_past_their_limits():
    """Each check of a class or a group lets its limit itself through: a class of exactly --ipc images, --k equal
    to the class size (paper), guidance-noise ids up to 2^32 - 1 ((label + 1) x ipc == 2^32), --class-batch
    classes in a group; one past each limit is refused in one line naming it."""
    from manifoldgd_fast.classrun import _check_class, distill_group
    from manifoldgd_fast.errors import DataError

    cfg = DistillConfig(ipc=4, formulation="paper", k=6, class_batch=2).resolve(3, "cpu")
    _check_class(cfg, "apple", 6)                                   # n == k, n > ipc
    _check_class(dataclasses.replace(cfg, k=4), "apple", 4)          # n == ipc == k
    with pytest.raises(DataError, match="class apple has 3 readable images, fewer than --ipc 4"):
        _check_class(dataclasses.replace(cfg, k=3), "apple", 3)
    with pytest.raises(ConfigError, match="--k 6 is larger than the patch: class apple has only 5 latents"):
        _check_class(cfg, "apple", 5)
    ctx = {"device": torch.device("cpu"), "dit_info": {}}
    top = 2 ** 32 // 4 - 1                                          # the last label whose ids fit
    too_many = [("a", top, None), ("b", 0, None), ("c", 1, None)]  # passes the id check, then the group's size
    with pytest.raises(ConfigError, match="3 classes in one batch, more than --class-batch 2"):
        distill_group(cfg, ctx, too_many)
    with pytest.raises(ConfigError, match=f"class a: label {top + 1} x --ipc 4 exceeds the 2\\^32 guidance-noise ids"):
        distill_group(cfg, ctx, [("a", top + 1, None)])


def test_the_progress_bar_counts_images_not_pad_rows(tiny_world, tmp_path, monkeypatch):
    """--class-batch 2 over 3 classes pads the last group to 2 x ipc rows: the bar counts the 6 images, not 8."""
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "disable": False})   # (disable=None turns it off off a terminal)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    assert main(_args(tiny_world, tmp_path / "o", "--method", "dit", "--class-batch", "2")) == 0
    assert [(b.n, b.total) for b in bars if str(b.desc).startswith("distil")] == [(6, 6)]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_latents_runs_the_vae_under_the_run_dtype(dtype):
    """The VAE decodes latents / scaling_factor in batches, under autocast to --dtype unless it is float32;
    uint8 images and per-image finite flags come back in order."""
    from types import SimpleNamespace

    from manifoldgd_fast.classrun import decode_latents

    seen = []

    class VAE(torch.nn.Module):
        config = SimpleNamespace(scaling_factor=0.5)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def decode(self, z):
            seen.append((z.shape[0], torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
            img = (z[:, :3] * 0 + z[:, :1]).clone()                  # (b, 3, h, w): the first channel, grey
            img[1:2] = float("nan") if z.shape[0] == 2 else img[1:2]
            return SimpleNamespace(sample=img)

    lat = torch.linspace(-0.5, 0.5, 5).view(5, 1, 1, 1).expand(5, 4, 2, 2).contiguous()
    images, finite = decode_latents(VAE(), lat, 2, dtype)
    assert seen == [(2, dtype != torch.float32 and dtype)] * 2 + [(1, dtype != torch.float32 and dtype)]
    assert images.shape == (5, 2, 2, 3) and finite.tolist() == [True, False, True, False, True]
    want = np.clip(np.round((lat[:, 0, 0, 0].numpy() / 0.5 + 1) / 2 * 255), 0, 255)
    assert images[[0, 2, 4], 0, 0, 0].tolist() == want[[0, 2, 4]].tolist()


@pytest.mark.parametrize("method,noise,loop,device,fast", [
    ("manifoldgd", "philox", "auto", "cuda", True),
    ("manifoldgd", "generator", "auto", "cuda", False),   # host-drawn guidance noise: the reference loop
    ("mgd3", "generator", "auto", "cuda", True),          # (mgd3 draws no guidance noise)
    ("manifoldgd", "philox", "auto", "cpu", False),
    ("dit", "generator", "fast", "cpu", True),
    ("dit", "philox", "reference", "cuda", False),
])
def test_which_loop_a_run_takes(method, noise, loop, device, fast):
    """--loop auto takes the fast loop on CUDA except for ManifoldGD with generator noise; fast and reference
    are taken as said (the rule alone: no CUDA device is needed to ask it)."""
    from manifoldgd_fast.classrun import use_fast_loop

    cfg = dataclasses.replace(DistillConfig(method=method), guidance_noise=noise, loop=loop)
    assert use_fast_loop(cfg, torch.device(device)) is fast


def test_check_decoded_refuses_any_non_finite_image():
    """check_decoded takes a bool or decode_latents' per-image flags: one bad image of a class is enough."""
    from manifoldgd_fast.classrun import check_decoded

    check_decoded(True, "apple", torch.float32)
    check_decoded(torch.tensor([True, True]), "apple", torch.float32)
    for flags, dtype, hint in ((torch.tensor([True, False]), torch.float16, "decode in bfloat16 or float32"),
                               (torch.tensor([False, True, True]), torch.bfloat16, "check the VAE's weights"),
                               (False, torch.float32, "check the VAE's weights")):
        with pytest.raises(ConfigError, match=f"^class apple: the VAE decoded NaN or inf pixels .*; {hint}"):
            check_decoded(flags, "apple", dtype)


@pytest.mark.parametrize("extra", [[], ["--method", "mgd3"], ["--method", "dit"], ["--method", "cgs"], ["--cgs"],
                                   ["--formulation", "paper"], ["--formulation", "paper", "--guidance-noise", "generator"]])
def test_classes_sampled_together_give_the_same_bytes_whoever_shares_their_batch(tiny_world, tmp_path, capsys, extra):
    """--class-batch 2 over 3 classes: (apple, banana) and (cherry + a pad row). A resume that redoes apple
    alone (padded) writes apple's bytes again; one class a batch differs from it by float rounding only.
    With CGS, each class is a set of its own in the shared batch (a class mixed into another's set, or
    one mean for the batch, would move it far more than rounding); in the paper formulation each row's
    patch comes from its own class."""
    import shutil

    from safetensors.torch import load_file

    common = ["--guidance-noise", "philox", *extra]
    assert main(_args(tiny_world, tmp_path / "two", "--class-batch", "2", *common)) == 0
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["classes"]["apple"]["sampled_with"] == ["apple", "banana"]
    assert man["classes"]["cherry"]["sampled_with"] == ["cherry"] and man["config"]["class_batch"] == 2
    assert man["classes"]["apple"]["numerics"]["class_batch"] == 2
    before = _digest(tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "apple")
    assert main(_args(tiny_world, tmp_path / "two", "--class-batch", "2", *common)) == 0
    assert _digest(tmp_path / "two") == before and len(before) == 9
    again = json.loads((tmp_path / "two" / "manifest.json").read_text())["classes"]["apple"]
    assert again["sampled_with"] == ["apple"]  # this time alone in its (padded) batch
    shutil.rmtree(tmp_path / "two" / "banana")   # the batch's second class: alone now, at its first rows
    assert main(_args(tiny_world, tmp_path / "two", "--class-batch", "2", *common)) == 0
    assert _digest(tmp_path / "two") == before
    if not extra:  # classes finished before --class-batch existed count as one class a batch: a resume warns
        from manifoldgd_fast.output import DONE_MARK

        for c in ("banana", "cherry"):
            info_path = tmp_path / "two" / c / DONE_MARK
            info = json.loads(info_path.read_text())
            del info["numerics"]["class_batch"]
            info_path.write_text(json.dumps(info))
        shutil.rmtree(tmp_path / "two" / "apple")
        capsys.readouterr()
        assert main(_args(tiny_world, tmp_path / "two", "--class-batch", "2", *common)) == 0
        err = capsys.readouterr().err
        assert "resuming" in err and "class_batch" in err, err
        assert _digest(tmp_path / "two") == before
    # one class a batch: the same run up to float rounding (the fingerprint leaves class_batch out)
    assert main(_args(tiny_world, tmp_path / "one", "--class-batch", "1", *common)) == 0
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert one["fingerprint"] == man["fingerprint"] and "sampled_with" not in one["classes"]["apple"]
    for c in ("apple", "banana", "cherry"):
        a, b = (load_file(str(tmp_path / d / "latents" / f"{c}.safetensors"))["latents"] for d in ("two", "one"))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_on_a_run_without_the_fast_loop_says_it_is_not_used(tiny_world, tmp_path, capsys):
    """--compile with --loop auto on the CPU ran the reference loop and compiled nothing, silently (the manifest
    recorded compile: default); --loop reference --compile is refused, so auto now says it in one warning."""
    assert main(_args(tiny_world, tmp_path / "out", "--method", "dit", "--ipc", "1", "--compile", "default")) == 0
    err = capsys.readouterr().err
    assert ("manifoldgd-fast: warning: --compile default is not used: --loop auto runs the reference loop here (no "
            "CUDA device), and only the fast loop compiles") in err, err
    assert main(_args(tiny_world, tmp_path / "out2", "--method", "dit", "--ipc", "1")) == 0
    assert "--compile" not in capsys.readouterr().err


def test_a_path_through_a_link_in_data_and_back_out_by_dotdot_is_not_inside(tmp_path, monkeypatch):
    """``DATA/link/../out`` with DATA/link -> a folder elsewhere is that folder's sibling, as the file system goes:
    the inside-data checks read '..' as abspath does (DATA/out), and refused a --out and a --cache-dir that lie
    outside DATA; so did ``--data ELSEWHERE/link/..`` an --out beside the link. A path through the link, or
    really inside DATA, is still refused."""
    from manifoldgd_fast.pipeline import check_cache_outside_data, check_outside_data

    data, far = tmp_path / "data", tmp_path / "far" / "deep"
    (data / "cls").mkdir(parents=True)
    far.mkdir(parents=True)
    os.symlink(far, data / "link")
    monkeypatch.chdir(tmp_path)
    for out in (str(data / "link" / ".." / "out"), os.path.join("data", "link", "..", "out")):
        check_outside_data(out, str(data))                   # tmp_path/far/out: outside DATA
        check_cache_outside_data(out, str(data))
    check_outside_data(str(data / "other"), str(data / "link" / ".."))   # --data is tmp_path/far
    for out, where in ((data / "link" / "out", "inside"), (data / "cls" / ".." / "x", "inside"),
                       (far / "..", "the same folder as")):
        with pytest.raises(ConfigError, match=f"is {where} --data"):
            check_outside_data(str(out), str(data / "link" / "..") if where == "the same folder as" else str(data))
    with pytest.raises(ConfigError, match="its latents/ folder would lie inside --data"):
        check_cache_outside_data(str(data / "link"), str(data))
    # the link's target by its own path: a scan of DATA reads OUT/contact_sheet.png as an image of class link
    with pytest.raises(ConfigError, match=r"^--out .*deep is the folder the link .*link leads to, read as class "
                                          r"link \(a contact sheet written there would be one of its images\)"):
        check_outside_data(str(far), str(data))
    check_outside_data(str(far / "out"), str(data))       # (below it: class folders' subfolders are not read)
