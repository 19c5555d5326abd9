"""The package's own small world: the digits export and the shipped digits DiT + VAE."""
from __future__ import annotations

import hashlib
import os
import shutil
import time

import numpy as np
import pytest
import torch

from manifoldgd_fast import models as M
from manifoldgd_fast.demo import digits as D
from manifoldgd_fast.errors import ConfigError, ModelError
from manifoldgd_fast.shipped import SUMS_NAME, read_sums, shipped_model_dir, verify_shipped

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHIPPED_FILES = {"transformer/config.json", f"transformer/{WEIGHTS}", "vae/config.json", f"vae/{WEIGHTS}"}


def _tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return D.export_digits(str(tmp_path_factory.mktemp("cache")))


def test_digits_export_layout_counts_and_stratification(exported):
    assert os.path.basename(exported) == "digits"
    total = 0
    for split in D.SPLITS:
        assert sorted(os.listdir(os.path.join(exported, split))) == list(D.DIGIT_CLASSES)
        for c in D.DIGIT_CLASSES:
            files = os.listdir(os.path.join(exported, split, c))
            assert files and all(f.endswith(".png") for f in files)  # every class in both splits
            total += len(files)
    assert total == 1797
    counts = {s: sum(len(os.listdir(os.path.join(exported, s, c))) for c in D.DIGIT_CLASSES) for s in D.SPLITS}
    assert counts == {"train": 1438, "test": 359}
    # Stratified: each class keeps ~20% in test.
    for c in D.DIGIT_CLASSES:
        n_test = len(os.listdir(os.path.join(exported, "test", c)))
        n_all = n_test + len(os.listdir(os.path.join(exported, "train", c)))
        assert n_test == round(0.2 * n_all)
    # Train and test are disjoint, and the file names are load_digits indices.
    names = {s: {int(f[:-4]) for c in D.DIGIT_CLASSES for f in os.listdir(os.path.join(exported, s, c))}
             for s in D.SPLITS}
    assert not names["train"] & names["test"] and names["train"] | names["test"] == set(range(1797))


def test_digits_export_is_deterministic_and_idempotent(exported, tmp_path):
    again = D.export_digits(str(tmp_path / "other"))
    assert _tree_digest(again) == _tree_digest(exported)  # two exports: identical files
    before = os.stat(os.path.join(exported, "train", "0")).st_mtime_ns
    assert D.export_digits(os.path.dirname(exported)) == exported  # complete: left alone
    assert os.stat(os.path.join(exported, "train", "0")).st_mtime_ns == before
    assert [e for e in os.listdir(os.path.dirname(exported)) if e != "digits"] == []  # no temp leftovers


def test_a_killed_exports_temp_is_swept_once_another_export_completed(exported):
    """A SIGKILLed export's temp folder (7 MB) beside a complete export was never removed: only an export
    swept, and a complete one returned before it. A stale one goes now; a fresh one (an export in flight) stays."""
    cache = os.path.dirname(exported)
    stale, fresh = os.path.join(cache, ".digits.tmp-killed"), os.path.join(cache, ".digits.tmp-inflight")
    for p in (stale, fresh):
        os.makedirs(os.path.join(p, "train"))
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    try:
        assert D.export_digits(cache) == exported
        assert not os.path.exists(stale) and os.path.isdir(fresh)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def test_digits_export_replaces_an_incomplete_folder(tmp_path):
    root = tmp_path / "digits"
    (root / "train" / "3").mkdir(parents=True)
    (root / "train" / "3" / "junk.png").write_bytes(b"not a png")
    assert not D.is_complete(str(root))
    killed = tmp_path / ".digits.tmp-killed"           # a SIGKILLed export's folder (its finally: never ran)
    (killed / "train").mkdir(parents=True)
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    assert D.export_digits(str(tmp_path)) == str(root)
    assert D.is_complete(str(root)) and not (root / "train" / "3" / "junk.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["digits"]


def test_digits_pixels_match_the_package_loader(exported, monkeypatch, tmp_path):
    from manifoldgd_fast.data import load_image, scan_image_folder

    images, labels, indices = D.digits_arrays("test")
    assert images.shape == (359, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # grey on three equal channels
    for k in (0, 123, 358):
        x = load_image(os.path.join(exported, "test", str(labels[k]), f"{indices[k]}.png"), 32)
        ref = torch.from_numpy(images[k]).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(x, ref, atol=0, rtol=0)
    entries = scan_image_folder(os.path.join(exported, "train"), label_map="sorted")
    assert [e.name for e in entries] == list(D.DIGIT_CLASSES) and [e.label for e in entries] == list(range(10))
    monkeypatch.setenv("MANIFOLDGD_CACHE", str(tmp_path / "env"))
    assert D.default_cache_dir() == str(tmp_path / "env")


def test_split_is_seeded():
    labels = np.repeat(np.arange(4), 10)
    a, b = D.stratified_split(labels, 0.2, 0), D.stratified_split(labels, 0.2, 0)
    assert np.array_equal(a, b) and all(a[labels == c].sum() == 2 for c in range(4))
    assert not np.array_equal(a, D.stratified_split(labels, 0.2, 1))


# --------------------------------------------------------------------------- shipped weights
@pytest.fixture(scope="module")
def shipped():
    folder = shipped_model_dir()
    return {"folder": folder, "dit": M.load_dit(folder), "vae": M.load_vae(folder)}


def test_shipped_folder_verifies_and_is_small():
    folder = shipped_model_dir()
    assert folder.replace(os.sep, "/").endswith("manifoldgd_fast/weights/digits")
    assert verify_shipped() == folder
    sums = read_sums()
    assert set(sums["files"]) == SHIPPED_FILES
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in SHIPPED_FILES)
    assert total <= 10 * 1024 * 1024
    meta = sums["training"]
    for key in ("settings", "train_seconds", "versions", "check"):
        assert key in meta
    assert meta["settings"]["seed"] == 0 and meta["check"]["sample_accuracy"] >= 0.8


def test_shipped_weights_load_through_the_package_loaders(shipped):
    dit, vae = shipped["dit"], shipped["vae"]
    assert M.dit_info(dit) == {"num_classes": 10, "null_class": 10, "latent_size": 8, "in_channels": 4,
                               "out_channels": 8, "learned_sigma": True, "patch_size": 2,
                               "time_embedding": "diffusers"}  # trained with diffusers' module: auto keeps it
    info = M.vae_info(vae)
    assert info["latent_channels"] == 4 and info["downsample"] == 4
    assert info["scaling_factor"] != 0.18215 and 0.05 < info["scaling_factor"] < 20
    assert not dit.training and not vae.training


def test_shipped_forward_shapes_learned_sigma_and_null_class(shipped):
    dit, vae = shipped["dit"], shipped["vae"]
    images, _, _ = D.digits_arrays("test")
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        assert z.shape == (4, 4, 8, 8)
        rec = vae.decode(z / vae.config.scaling_factor).sample
        assert rec.shape == (4, 3, 32, 32)
        assert float((rec - x).abs().mean()) < 0.1  # the VAE reconstructs digits
        t = torch.tensor([0, 250, 500, 999])
        out = dit(z, timestep=t, class_labels=torch.tensor([0, 5, 9, 10])).sample  # 10 = null class
        assert out.shape == (4, 8, 8, 8) and torch.isfinite(out).all()
        table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        assert table.num_embeddings == 11
        # The class conditions the prediction, and the null class differs from any digit.
        same = z[:1].expand(2, -1, -1, -1)
        a = dit(same, timestep=t[2:3].expand(2), class_labels=torch.tensor([3, 10])).sample
        assert (a[0] - a[1]).abs().max() > 1e-3


def test_verify_names_a_flipped_byte(tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(shipped_model_dir(), copy)
    assert verify_shipped(str(copy)) == str(copy)
    target = copy / "transformer" / WEIGHTS
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"file transformer/diffusion_pytorch_model\.safetensors is damaged") as e:
        verify_shipped(str(copy))
    assert "\n" not in str(e.value)


def test_verify_names_a_missing_file_and_sums(tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(shipped_model_dir(), copy)
    (copy / "vae" / "config.json").unlink()
    with pytest.raises(ModelError, match=r"file vae/config\.json is missing"):
        verify_shipped(str(copy))
    (copy / SUMS_NAME).unlink()
    with pytest.raises(ModelError, match=f"{SUMS_NAME} is missing"):
        verify_shipped(str(copy))
    with pytest.raises(ModelError, match="is missing"):
        verify_shipped(str(tmp_path / "nowhere"))
    (copy / SUMS_NAME).write_text('{"format": 1, "files": {}}')   # would check nothing
    with pytest.raises(ModelError, match=f"{SUMS_NAME} lists no files"):
        verify_shipped(str(copy))


def test_shipped_dit_draws_recognisable_digits(shipped):
    """A small version of ``python -m manifoldgd_fast.demo.train --check``."""
    from manifoldgd_fast.demo.train import check

    result = check(shipped["folder"], per_class=2, log=lambda *a: None)
    assert result["classifier_test_accuracy"] >= 0.95
    assert result["sample_accuracy"] >= 0.7


# --------------------------------------------------------------------------- training script
def test_training_is_deterministic_and_resumable(tmp_path, monkeypatch):
    from manifoldgd_fast.demo import train as T
    from manifoldgd_fast.demo.train import Settings, train

    full = T._images_tensor
    monkeypatch.setattr(T, "_images_tensor", lambda split: tuple(a[:40] for a in full(split)))  # keep it fast

    s = Settings(vae_steps=3, vae_batch=8, dit_steps=4, dit_batch=8, dit_warmup=2, dit_width=32,
                 dit_layers=1)
    quiet = lambda *a: None  # noqa: E731
    train(s, str(tmp_path / "w1"), str(tmp_path / "o1"), save_every=100, check_per_class=0, log=quiet)
    # Interrupted twice (mid-VAE, mid-DiT), then continued: the same weights.
    w2, o2 = str(tmp_path / "w2"), str(tmp_path / "o2")
    assert train(s, w2, o2, save_every=100, check_per_class=0, log=quiet, stop_after=2) is None
    assert train(s, w2, o2, save_every=100, check_per_class=0, log=quiet, stop_after=3) is None
    assert not os.path.exists(o2)
    train(s, w2, o2, save_every=100, check_per_class=0, log=quiet)
    a, b = read_sums(str(tmp_path / "o1")), read_sums(o2)
    assert a["files"] == b["files"] and set(a["files"]) == SHIPPED_FILES
    assert M.dit_info(M.load_dit(o2))["learned_sigma"]
    # Other settings in the same work folder are refused.
    from manifoldgd_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="dit_steps"):
        train(Settings(**{**s.__dict__, "dit_steps": 5}), w2, o2, log=quiet)


@pytest.mark.parametrize("argv,message", [
    (["--dit-width", "0"], "--dit-width 0: must be >= 1"),           # was a ZeroDivisionError after the VAE trained
    (["--vae-batch", "0"], "--vae-batch 0: must be >= 1"),           # was 'stack expects a non-empty TensorList'
    (["--dit-steps", "-1"], "--dit-steps -1: must be >= 0"),
    (["--dit-lr", "nan"], "--dit-lr nan: must be > 0 and finite"),
    (["--label-dropout", "1.5"], "--label-dropout 1.5: must be in [0, 1]"),
    (["--num-train-timesteps", "20"], "--num-train-timesteps 20: must be > 20"),
    (["--dit-width", "48"], "--dit-width must be a multiple of 32, got 48"),
])
def test_train_command_refuses_bad_settings_in_one_line_before_any_work(argv, message, tmp_path, monkeypatch,
                                                                         capsys):
    from manifoldgd_fast.demo import train as T

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(T, "train_vae", lambda *a, **k: pytest.fail("training started"))
    work = tmp_path / "w"
    assert T.main([*argv, "--work", str(work), "--out", str(tmp_path / "o"), "--per-class", "0"]) == 2
    assert capsys.readouterr().err == f"python -m manifoldgd_fast.demo.train: error: {message}\n"
    assert not work.exists()
    with pytest.raises(ConfigError, match="--save-every 0: must be >= 1"):
        T.train(T.Settings(), str(work), str(tmp_path / "o"), save_every=0)   # was a ZeroDivisionError at step 1


@pytest.mark.parametrize("flag", ["--save-every", "--threads"])
def test_train_command_counts_are_at_least_one(flag, tmp_path, monkeypatch, capsys):
    """--save-every 0 was a ZeroDivisionError after the first step, --threads 0 a RuntimeError traceback."""
    from manifoldgd_fast.demo import train as T

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as e:
        T.main([flag, "0", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_train_command_names_a_work_folder_that_is_a_file(tmp_path, monkeypatch, capsys):
    from manifoldgd_fast.demo import train as T

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    work = tmp_path / "w"
    work.write_text("not a folder")
    monkeypatch.setattr(T, "train_vae", lambda *a, **k: pytest.fail("training started"))
    assert T.main(["--work", str(work), "--out", str(tmp_path / "o"), "--per-class", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m manifoldgd_fast.demo.train: error: {work}: ") and err.count("\n") == 1


@pytest.mark.parametrize("held", ['{"seed": 0, "vae_st', "[1, 2]", b"\xff\xfe"])
def test_train_names_a_work_folders_damaged_settings_in_one_line(held, tmp_path, monkeypatch):
    """settings.json cut by a kill (it is written atomically now: older versions wrote it in place), not an object,
    or not text: was a JSONDecodeError / AttributeError / UnicodeDecodeError traceback before any work."""
    from manifoldgd_fast.demo import train as T

    monkeypatch.setattr(T, "train_vae", lambda *a, **k: pytest.fail("training started"))
    work = tmp_path / "w"
    work.mkdir()
    settings = work / "settings.json"
    settings.write_bytes(held.encode() if isinstance(held, str) else held)
    with pytest.raises(ConfigError, match=f"--work {work}: cannot read {settings} ") as e:
        T.train(T.Settings(), str(work), str(tmp_path / "o"))
    assert "\n" not in str(e.value)
    assert settings.read_bytes() == (held.encode() if isinstance(held, str) else held)   # left for the user


def test_demo_training_draws_follow_seed_phase_and_step():
    """Each step's noise comes from a generator of (seed, phase, step): --seed, the phase and the step each
    change it (a generator ignoring --seed gave every seed the same weights), and it repeats exactly."""
    from manifoldgd_fast.demo.train import _gen

    draw = lambda *a: torch.randn(8, generator=_gen(*a))  # noqa: E731
    base = draw(0, "vae", 5)
    assert torch.equal(base, draw(0, "vae", 5))
    for other in (draw(1, "vae", 5), draw(0, "dit", 5), draw(0, "vae", 6), draw(0, "vae", 5, 1)):
        assert not torch.equal(base, other)


def test_demo_batch_order_is_a_fresh_permutation_each_epoch():
    """Steps read epochs end to end: every epoch holds each index once, in its own seeded order."""
    from manifoldgd_fast.demo.train import BatchOrder

    order = BatchOrder(10, 4, seed=0, phase="dit")
    seq = torch.cat([order(s) for s in range(5)])              # 20 indices: two epochs
    first, second = seq[:10], seq[10:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    assert torch.equal(seq, torch.cat([BatchOrder(10, 4, 0, "dit")(s) for s in range(5)]))
    assert not torch.equal(seq, torch.cat([BatchOrder(10, 4, 1, "dit")(s) for s in range(5)]))


def test_demo_lr_warms_up_linearly_then_decays_by_a_cosine_to_the_floor():
    from manifoldgd_fast.demo.train import lr_at

    assert [lr_at(s, 100, 2.0, warmup=4) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr_at(4, 100, 2.0, warmup=4) == 2.0
    mid = 4 + 48                                                  # half-way through the decay: cos = 0
    assert lr_at(mid, 100, 2.0, warmup=4) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at(100, 100, 2.0, warmup=4) == pytest.approx(0.2) and lr_at(500, 100, 2.0, warmup=4) == pytest.approx(0.2)


def _tiny(**kw):
    from manifoldgd_fast.demo.train import Settings

    return Settings(**{**dict(vae_steps=3, vae_batch=8, dit_steps=2, dit_batch=8, dit_warmup=1, dit_width=32,
                              dit_layers=1), **kw})


@pytest.mark.parametrize("dropout,null_share", [(0.0, 0.0), (1.0, 1.0)])
def test_demo_dit_drops_labels_to_the_null_class_at_the_label_dropout_rate(dropout, null_share, tmp_path,
                                                                           monkeypatch):
    from manifoldgd_fast.demo import train as T

    seen = []
    real = T.hybrid_loss
    monkeypatch.setattr(T, "hybrid_loss", lambda model, d, x0, y, *a: seen.append(y.clone()) or real(model, d, x0,
                                                                                                    y, *a))
    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(16, 4, 8, 8, generator=g), torch.arange(16) % 10
    T.train_dit(_tiny(label_dropout=dropout), latents, labels, str(tmp_path), save_every=100, log=lambda *a: None)
    y = torch.cat(seen)
    assert len(seen) == 2 and float((y == T.NULL_CLASS).float().mean()) == null_share



def test_demo_dit_clips_the_gradient_norm_at_grad_clip(tmp_path):
    """--grad-clip bounds the gradient's norm before AdamW: clipped to 1e-12 (below Adam's eps) the first step
    barely moves the weights, unclipped it moves them by about the learning rate (a dropped clip passed)."""
    from manifoldgd_fast.demo import train as T

    g = torch.Generator().manual_seed(1)
    latents, labels = torch.randn(16, 4, 8, 8, generator=g), torch.arange(16) % 10
    moved = {}
    for clip in (1e-12, 1e6):
        work = tmp_path / str(clip)
        work.mkdir()
        T.train_dit(_tiny(dit_steps=1, grad_clip=clip), latents, labels, str(work), save_every=100,
                    log=lambda *a: None)
        moved[clip] = torch.load(work / "dit.pt", weights_only=False)["model"]["proj_out_2.weight"]
    step = float((moved[1e6] - moved[1e-12]).abs().max())   # from the same (zero) initial output layer
    assert step > 0.1 * _tiny().dit_lr and float(moved[1e-12].abs().max()) < 1e-3 * _tiny().dit_lr

def test_demo_training_ships_the_ema_with_the_latent_scaling_and_saves_where_it_stops(tmp_path, monkeypatch):
    """The transformer written is the EMA of the checkpoint (not the raw weights); the VAE's scaling_factor
    is 1 / std of the train split's posterior means under it; a run stopped by its step budget saves its
    step first (a rerun continues from there, not from the last --save-every)."""
    from safetensors.torch import load_file

    from manifoldgd_fast import models as MM
    from manifoldgd_fast.demo import train as T

    full = T._images_tensor
    monkeypatch.setattr(T, "_images_tensor", lambda split: tuple(a[:40] for a in full(split)))
    quiet = lambda *a: None  # noqa: E731
    work, out = tmp_path / "w", tmp_path / "o"
    assert T.train(_tiny(), str(work), str(out), save_every=100, check_per_class=0, log=quiet, stop_after=2) is None
    assert torch.load(work / "vae.pt", weights_only=False)["step"] == 2 and not (work / "dit.pt").exists()
    # a budget that ends with the VAE takes no DiT step (it took one more than --stop-after)
    assert T.train(_tiny(), str(work), str(out), save_every=100, check_per_class=0, log=quiet, stop_after=1) is None
    assert torch.load(work / "vae.pt", weights_only=False)["step"] == 3 and not (work / "dit.pt").exists()
    T.train(_tiny(), str(work), str(out), save_every=100, check_per_class=0, log=quiet)
    ck = torch.load(work / "dit.pt", weights_only=False)
    shipped = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert shipped.keys() == ck["ema"].keys()
    assert all(torch.equal(shipped[k], ck["ema"][k]) for k in shipped)
    assert any(not torch.equal(ck["model"][k], ck["ema"][k]) for k in shipped)
    vae = MM.load_vae(str(out))
    x, _ = T._images_tensor("train")
    with torch.no_grad():
        means = vae.encode(x).latent_dist.mean
    assert float(vae.config.scaling_factor) == pytest.approx(1.0 / float(means.std()), rel=1e-5)


def test_demo_check_rounds_samples_as_the_package_saves_images():
    """The check classifies uint8 samples as distill writes them: rounding half up, as to_uint8_images (a
    round-half-to-even put the values that land on k + 0.5 one level lower)."""
    from manifoldgd_fast.demo.train import _to_uint8
    from manifoldgd_fast.output import to_uint8_images

    x = torch.linspace(-1.2, 1.2, 2_000_001).view(-1, 1, 1, 1).expand(-1, 3, 1, 1)
    assert (_to_uint8(x) == to_uint8_images(x)).all()


# --------------------------------------------------------------------------- comparison table
def _fake_digits(root):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("0", "1"):
            os.makedirs(root / split / c)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return str(root)


def test_compare_ceiling_set_is_copied_whole_or_not_at_all(tmp_path, monkeypatch):
    """The ceiling's copy of the train split is made atomically: a copy cut short left a partial full-train/
    that every later run evaluated as the whole train set."""
    from manifoldgd_fast.demo import compare
    from manifoldgd_fast.demo import digits as digits_mod

    root = _fake_digits(tmp_path / "digits")
    monkeypatch.setattr(digits_mod, "export_digits", lambda *a, **k: root)
    seen = []

    def fake_eval(folder, val, seeds, epochs):
        seen.append(sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs))
        return {"nets": {"convnet6": {"best_mean": 90.0, "best_std": 1.0, "final_mean": 80.0, "final_std": 2.0}}}

    monkeypatch.setattr(compare, "_evaluate", fake_eval)
    monkeypatch.setattr(compare, "plot", lambda *a, **k: None)
    broken = tmp_path / "digits" / "train" / "1" / "9.png"
    os.symlink(tmp_path / "nowhere.png", broken)       # copying it fails after the other files are copied
    out = tmp_path / "cmp"
    with pytest.raises(OSError):
        compare.run(str(out), ipcs=(1,), methods=())
    assert not (out / "full-train").exists()
    os.remove(broken)
    res = compare.run(str(out), ipcs=(1,), methods=())
    assert seen == [[os.path.join(c, f"{i}.png") for c in ("0", "1") for i in range(3)]]
    assert res["ceiling"] == (90.0, 1.0, 80.0, 2.0)


def test_compare_table_shows_best_mean_and_std_per_ipc():
    from manifoldgd_fast.demo.compare import table

    res = {"rows": {"dit": {1: (50.25, 1.5, 40.0, 2.0), 10: (70.0, 0.25, 60.0, 3.0)},
                    "random": {10: (30.0, 2.0, 20.0, 1.0)}},
           "ceiling": (95.0, 0.5, 94.0, 0.7), "ceiling_epochs": 30}
    lines = table(res, (1, 10)).splitlines()
    assert lines[0] == "| method | IPC 1 | IPC 10 |" and lines[1] == "|---|---|---|"
    assert lines[2] == f"| dit | {50.25:.1f} ± {1.5:.1f} | {70.0:.1f} ± {0.25:.1f} |"
    assert lines[3] == "| random | — | 30.0 ± 2.0 |"
    assert lines[4] == "| full train set (ceiling, 30 epochs) | 95.0 ± 0.5 | 95.0 ± 0.5 |"


def test_compare_random_set_holds_ipc_seeded_train_images_a_class(tmp_path):
    from manifoldgd_fast.demo import compare

    root = tmp_path / "digits"
    from PIL import Image

    for c in ("0", "1"):
        os.makedirs(root / "train" / c)
        for i in range(6):
            Image.new("RGB", (8, 8), (40 * i, 10 * int(c), 0)).save(root / "train" / c / f"{i}.png")
    train = str(root / "train")
    compare._random_real(train, str(tmp_path / "a"), ipc=2, seed=0)
    compare._random_real(train, str(tmp_path / "b"), ipc=2, seed=0)
    originals = {c: {(root / "train" / c / f).read_bytes() for f in os.listdir(root / "train" / c)} for c in ("0", "1")}
    for c in ("0", "1"):
        files = sorted(os.listdir(tmp_path / "a" / c))
        assert files == ["0.png", "1.png"]
        got = [(tmp_path / "a" / c / f).read_bytes() for f in files]
        assert len(set(got)) == 2 and set(got) <= originals[c]
        assert got == [(tmp_path / "b" / c / f).read_bytes() for f in files]


def test_compare_reuses_an_eval_json_only_of_the_same_evaluation(tmp_path, monkeypatch):
    """A rerun takes a folder's eval.json where it holds this evaluation: its val set, convnet6, epochs and seeds.
    One of another val set was taken as is; one without convnet6, or damaged, was a KeyError / JSON traceback."""
    import json

    from manifoldgd_fast.demo import compare
    from manifoldgd_fast.eval import protocol

    calls = []
    monkeypatch.setattr(protocol, "evaluate", lambda folder, val, **k: calls.append(val) or {"fresh": val})
    val = str(tmp_path / "val")
    good = {"epochs": 5, "seeds": [0, 1], "real_val": os.path.abspath(val), "nets": {"convnet6": {}}}
    for saved, reused in ((good, True), ({**good, "real_val": "/elsewhere"}, False), ({**good, "nets": {}}, False),
                          ({**good, "epochs": 6}, False), ({**good, "seeds": [0]}, False), ([good], False),
                          ("{not json", False)):
        (tmp_path / "eval.json").write_text(saved if isinstance(saved, str) else json.dumps(saved))
        calls.clear()
        res = compare._evaluate(str(tmp_path), val, seeds=2, epochs=5)
        assert (res == good and not calls) if reused else (res == {"fresh": val} and calls == [val]), saved
