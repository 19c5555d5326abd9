"""Training protocol: SPEC 7 defaults, device-side augmentation, a tiny run that learns, outputs, bad input, CLI."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import make_image_folder, requires_cuda, tv_resnet18_state_dict
from PIL import Image

from manifoldgd_fast.errors import ConfigError, DataError
from manifoldgd_fast.eval import augment as A
from manifoldgd_fast.eval import cli_eval
from manifoldgd_fast.eval import protocol as P
from manifoldgd_fast.eval import precision as EP

CLASSES = ["ant", "bee", "cat"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture
def folders(tmp_path):
    """Distilled (3 classes x 4, plus latents/ and a manifest) and validation (3 x 6) folders, colour-coded."""
    dist = make_image_folder(tmp_path / "out", CLASSES, 4, size=16, seed=1)
    os.makedirs(os.path.join(dist, "latents"))
    open(os.path.join(dist, "latents", "ant.safetensors"), "wb").close()
    with open(os.path.join(dist, "manifest.json"), "w") as f:
        json.dump({"tool": "manifoldgd-fast", "method": "manifoldgd"}, f)
    val = make_image_folder(tmp_path / "val", CLASSES, 6, size=16, seed=2)
    return dist, val


# --------------------------------------------------------------------------- SPEC 7 settings
@pytest.mark.parametrize("ipc,classes,epochs", [
    (1, 10, 2000), (10, 10, 2000), (20, 10, 1500), (50, 10, 1500), (51, 10, 1000), (200, 10, 1000),
    (10, 100, 1300), (50, 100, 1000), (100, 100, 600), (10, 1000, 2000)])
def test_default_epochs(ipc, classes, epochs):
    assert P.default_epochs(ipc, classes) == epochs


def test_default_hparams():
    assert P.default_hparams(10) == {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                                     "batch_size": 64, "schedule": "multistep x0.2 at 2/3, 5/6"}
    big = P.default_hparams(1000)
    assert (big["lr"], big["weight_decay"], big["batch_size"]) == (0.1, 1e-4, 128)
    soft = P.default_hparams(10, soft=True)
    assert (soft["optimizer"], soft["lr"], soft["weight_decay"], soft["decay"]) == ("adamw", 1e-3, 0.01, "weights")
    # RDED's batch (its argument.py): IPC 1 / 10 / 50 -> 10 / 50 / 100, twice that from 100 classes, <= the set
    assert [P.default_hparams(c, True, ipc)["batch_size"] for ipc, c in
            [(1, 10), (10, 10), (50, 10), (1, 1000), (10, 1000), (50, 1000), (1, 100), (10, 3), (20, 10)]] == \
        [10, 50, 100, 20, 100, 200, 20, 30, 100]
    assert P.default_size(256) == 224 and P.default_size(32) == 32


def test_lr_schedule_milestones():
    lrs = [P.lr_at(e, 600, 0.01, "multistep") for e in (0, 399, 400, 499, 500, 599)]
    assert np.allclose(lrs, [0.01, 0.01, 0.002, 0.002, 0.0004, 0.0004])
    # RDED's LambdaLR: 0.5 (1 + cos(pi e / 2E)), stepped once an epoch; epoch E would give half the base lr
    want = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 300 / 2)) for e in (0, 150, 299)]
    assert [P.lr_at(e, 300, 1e-3, "half-cosine") for e in (0, 150, 299)] == want
    assert want[0] == 1e-3 and abs(want[1] - 1e-3 * (2 + 2 ** 0.5) / 4) < 1e-15 and want[2] > 5e-4
    with pytest.raises(ValueError, match="lr schedule 'cosine'"):
        P.lr_at(0, 300, 1e-3, "cosine")


# --------------------------------------------------------------------------- augmentation
def test_resized_crop_identity_flip_and_exact_crop():
    x = torch.rand(4, 3, 12, 12)
    full = torch.tensor([[0, 0, 12, 12.0]] * 4)
    assert torch.allclose(A.resized_crop(x, full, 12), x, atol=1e-5)
    assert torch.allclose(A.resized_crop(x, full, 12, torch.tensor([True, False, True, False]))[0], x[0].flip(-1),
                          atol=1e-5)
    box = torch.tensor([[2, 3, 6, 6.0]] * 4)
    assert torch.allclose(A.resized_crop(x, box, 6), x[..., 2:8, 3:9], atol=1e-5)


@pytest.mark.parametrize("box, size", [((2, 3, 6, 6), 12), ((1, 0, 9, 7), 5), ((0, 4, 8, 8), 8), ((3, 2, 5, 9), 13)])
def test_resized_crop_is_torchvisions_crop_then_resize(box, size):
    """IDC crops the tensor to its box, then resizes it bilinearly (align_corners False, no antialias): at
    the box's edges the crop's own edge pixels are replicated, never those outside the box."""
    import torch.nn.functional as F

    x = torch.rand(2, 3, 12, 12)
    top, left, h, w = box
    want = F.interpolate(x[..., top:top + h, left:left + w], size=(size, size), mode="bilinear",
                         align_corners=False)
    boxes = torch.tensor([box] * 2, dtype=torch.float32)
    torch.testing.assert_close(A.resized_crop(x, boxes, size), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.resized_crop(x, boxes, size, torch.tensor([True, False]))[0], want[0].flip(-1),
                               atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    b = A.crop_boxes(2000, 20, 30, g, "cpu")
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 20).all() and (left + w <= 30).all()
    area = h * w / 600
    assert area.min() >= 0.45 and area.max() <= 1.0 and (w / h).min() >= 0.7 and (w / h).max() <= 1.4
    again = A.crop_boxes(2000, 20, 30, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(b, again)


def test_crop_boxes_fall_back_to_the_centre_with_the_ratio_clamped():
    """No draw fits a 100 x 2 (or 2 x 100) image: torchvision's fallback, the whole image with its aspect clamped
    into 3/4 .. 4/3 (the long side round(2 * 4/3) = 3), centred ((100 - 3) // 2 = 48)."""
    g = torch.Generator().manual_seed(0)
    assert torch.equal(A.crop_boxes(4, 100, 2, g, "cpu"), torch.tensor([[48.0, 0.0, 3.0, 2.0]]).expand(4, 4))
    assert torch.equal(A.crop_boxes(4, 2, 100, g, "cpu"), torch.tensor([[0.0, 48.0, 2.0, 3.0]]).expand(4, 4))


def test_crop_boxes_never_take_an_empty_draw():
    """torchvision's 0 < w <= width, 0 < h <= height: a draw whose side rounds to 0 (a small scale on a 3 x 3
    image: sides 0 or 1) is passed over for the next, never taken; 1 x 1 images always crop themselves."""
    g = torch.Generator().manual_seed(0)
    b = A.crop_boxes(500, 3, 3, g, "cpu", scale=(0.02, 0.05))
    assert (b[:, 2:] >= 1).all() and (b[:, :2] + b[:, 2:] <= 3).all()
    assert torch.equal(A.crop_boxes(50, 1, 1, g, "cpu"), torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(50, 4))


def test_jitter_lighting_cutmix():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    assert torch.allclose(A.color_jitter(x, g, (0.0, 0.0, 0.0)), x)
    assert torch.allclose(A.lighting(x, g, 0.0), x)
    y = A.color_jitter(x, g)
    assert y.shape == x.shape and not torch.allclose(y, x)
    # grey images stay grey under jitter (every op lerps towards a grey target)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    jg = A.color_jitter(grey, g)
    assert torch.allclose(jg[:, 0], jg[:, 1], atol=1e-6) and torch.allclose(jg[:, 1], jg[:, 2], atol=1e-6)
    # CutMix: image i is constant i; the pasted region is one box of area (1 - ratio) H W from the partner
    flat = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 10, 10)
    for seed in range(20):
        mixed, partner, ratio = A.cutmix(flat, torch.Generator().manual_seed(seed))
        assert sorted(partner.tolist()) == list(range(6))
        for i in range(6):
            inside = mixed[i, 0] == partner[i]
            assert ((mixed[i] == i) | inside).all()
            if partner[i] != i:
                assert abs(inside.sum().item() - (1 - ratio) * 100) < 1e-6
                rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
                if len(rows):
                    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                    assert box == inside.sum()
    aug = A.TrainAugment(8)
    u = (torch.rand(5, 3, 16, 16) * 255).to(torch.uint8)
    out1 = aug(u, torch.Generator().manual_seed(7))
    out2 = aug(u, torch.Generator().manual_seed(7))
    assert out1.shape == (5, 3, 8, 8) and torch.equal(out1, out2)


def test_load_images_is_exact_and_centre_crops(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "v" / "a")
    Image.fromarray(arr).save(tmp_path / "v" / "a" / "0.png")
    entries = P.scan_image_folder(str(tmp_path / "v"), label_map="sorted")
    x, y = P.load_images(entries, 16)
    assert torch.equal(x[0], torch.from_numpy(arr).permute(2, 0, 1)) and y.tolist() == [0]
    # resize 256/224 then centre crop: at 14 px the loaded side is 16, so the crop is the image's centre
    x, _ = P.load_images(entries, 14, resize=16 / 14)
    assert torch.equal(x[0], torch.from_numpy(arr[1:15, 1:15]).permute(2, 0, 1))
    # a resize below 1 never loads the short side below the size: the whole image, as resize=1
    assert torch.equal(P.load_images(entries, 16, resize=0.5)[0], P.load_images(entries, 16)[0])


# --------------------------------------------------------------------------- training runs
def test_tiny_run_learns_and_writes_outputs(folders):
    dist, val = folders
    res = P.evaluate(dist, val, nets=("convnet6",), seeds=1, epochs=30, size=8, batch_size=4, device="cpu",
                     progress=False)
    r = res["nets"]["convnet6"]
    assert res["classes"] == CLASSES and res["ipc"] == 4 and res["n_train"] == 12 and res["n_val"] == 18
    assert res["protocol"] == "hard-label" and res["hparams"]["lr"] == 0.01
    assert r["best_mean"] > 60.0  # chance is 33.3
    assert r["best_mean"] >= r["final_mean"] and r["best_std"] == 0.0 and len(r["seeds"]) == 1
    assert r["seeds"][0]["history"][-1][0] == 30
    with open(os.path.join(dist, "eval.json")) as f:
        assert json.load(f)["nets"]["convnet6"]["best_mean"] == r["best_mean"]
    md = open(os.path.join(dist, "eval.md")).read()
    assert "| convnet6 |" in md and f"{r['best_mean']:.2f} ± 0.00" in md
    with open(os.path.join(dist, "manifest.json")) as f:
        man = json.load(f)
    assert man["method"] == "manifoldgd" and len(man["eval"]) == 1
    assert man["eval"][0]["nets"]["convnet6"]["best_mean"] == r["best_mean"]


def test_seeded_training_is_deterministic_and_seeds_differ():
    x = (torch.rand(6, 3, 8, 8) * 255).to(torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    split = P.Split(x, y)
    hp = dict(P.default_hparams(3), batch_size=4)
    run = lambda seed: P.train_net("convnet6", split, split, 3, size=8, epochs=2, hp=hp, seed=seed,  # noqa: E731
                                   device=torch.device("cpu"), progress=False, return_model=True)
    a, b, c = run(0), run(0), run(1)
    pa, pb, pc = (torch.cat([p.flatten() for p in r["model"].parameters()]) for r in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


class ColourOracle(torch.nn.Module):
    """A teacher that knows the task: class c is the image whose channel c % 3 is brightest."""

    def forward(self, x):
        return 5.0 * x.mean(dim=(2, 3))  # (B, 3) logits


def test_soft_label_variant_learns(folders):
    dist, val = folders
    res = P.evaluate(dist, val, nets="convnet6", seeds=[3], epochs=30, size=8, batch_size=4, device="cpu",
                     teacher=ColourOracle(), progress=False, out_json=os.path.join(dist, "soft.json"))
    assert res["protocol"] == "soft-label" and res["hparams"]["optimizer"] == "adamw" and res["seeds"] == [3]
    assert res["nets"]["convnet6"]["best_mean"] > 60.0
    assert os.path.isfile(os.path.join(dist, "soft.md"))


def test_soft_label_run_is_rdeds_validation(folders, monkeypatch):
    """The soft-label defaults: temperature 20, crop + flip only (no jitter / lighting), AdamW whose weight
    decay reaches the weight matrices and kernels but not biases and norms (RDED's get_parameters)."""
    dist, val = folders
    groups = []

    class Recorder(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            groups.extend(self.param_groups)

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    res = P.evaluate(dist, val, nets="convnet6", seeds=[0], epochs=1, size=8, device="cpu",
                     teacher=ColourOracle(), progress=False, out_json=os.path.join(dist, "soft.json"))
    assert res["temperature"] == 20.0 and res["hparams"]["schedule"] == "half-cosine"
    assert (res["augment"]["color_jitter"], res["augment"]["lighting_std"]) == (0.0, 0.0)
    assert res["augment"]["random_resized_crop"]["scale"] == [0.5, 1.0]
    decayed, kept = groups
    assert decayed["weight_decay"] == 0.01 and kept["weight_decay"] == 0.0
    assert decayed["lr"] == kept["lr"] == 1e-3 and decayed["betas"] == kept["betas"] == (0.9, 0.999)  # MGD3 App.
    assert all(p.dim() == 4 or p.dim() == 2 for p in decayed["params"]) and len(decayed["params"]) == 7  # 6 convs, fc
    assert all(p.dim() == 1 for p in kept["params"]) and len(kept["params"]) == 6 * 3 + 1  # conv biases, norms, fc bias


def test_test_epochs_follow_idc_and_rded():
    """Hard labels: every E // 100 epochs and the last (IDC); soft labels: RDED's main.py, epoch % 10 == 9
    (0-based) past 0.8 E, and the last: 6 tests of 300; --eval-every overrides either."""
    assert P.test_epochs(2000, None, soft=False) == set(range(20, 2001, 20))
    assert P.test_epochs(50, None, soft=False) == set(range(1, 51))
    assert P.test_epochs(300, None, soft=True) == {250, 260, 270, 280, 290, 300}
    rded = {e + 1 for e in range(300) if (e % 10 == 9 and e > 0.8 * 300) or e == 299}
    assert P.test_epochs(300, None, soft=True) == rded
    assert P.test_epochs(7, None, soft=True) == {7}
    assert P.test_epochs(300, 50, soft=True) == {50, 100, 150, 200, 250, 300}
    assert P.test_epochs(10, 4, soft=False) == {4, 8, 10}


def test_soft_label_best_is_over_rdeds_tests(folders):
    dist, val = folders
    res = P.evaluate(dist, val, nets="convnet6", seeds=[0], epochs=20, size=8, batch_size=4, device="cpu",
                     teacher=ColourOracle(), progress=False, out_json=os.path.join(dist, "soft.json"))
    hist = res["nets"]["convnet6"]["seeds"][0]["history"]
    assert [e for e, _ in hist] == [20] and res["tested"].endswith("(RDED)")   # 20 epochs: only the last


def test_soft_label_resnet18_student_has_batch_norm(tmp_path):
    """RDED's (and MGD3's) soft-label student is torchvision's ResNet-18 (batch norm); hard labels keep IDC's
    instance-norm ResNet-18. A saved batch-norm net loads back as one."""
    from manifoldgd_fast.eval import nets as N

    x = (torch.rand(6, 3, 8, 8) * 255).to(torch.uint8)
    split = P.Split(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    norms = {}
    for soft in (False, True):
        hp = dict(P.default_hparams(3, soft, ipc=2), batch_size=3)
        r = P.train_net("resnet18", split, split, 3, size=8, epochs=1, hp=hp, seed=0, device=torch.device("cpu"),
                        teacher=ColourOracle() if soft else None, progress=False, return_model=True)
        norms[soft] = {type(m).__name__ for m in r["model"].modules()} & {"BatchNorm2d", "GroupNorm"}
        if soft:
            torch.save(N.net_checkpoint(r["model"]), tmp_path / "student.pt")
            back = N.load_net(str(tmp_path / "student.pt"))
            assert back.norm == "batch" and torch.equal(back(split.x.float()), r["model"].eval()(split.x.float()))
    assert norms == {False: {"GroupNorm"}, True: {"BatchNorm2d"}}
    with pytest.raises(ConfigError, match="convnet6 with 'batch' norm: expected instance"):
        N.build_net("convnet6", 3, 8, norm="batch")


def test_teacher_with_wrong_outputs_is_refused(folders):
    dist, val = folders
    wrong = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))
    with pytest.raises(ConfigError, match=r"--teacher.*\(1, 3\)"):
        P.evaluate(dist, val, epochs=1, size=8, device="cpu", teacher=wrong, progress=False)


def test_the_teacher_file_is_named_by_its_path(folders, tmp_path, monkeypatch):
    """eval.json names a teacher file by its absolute path, given as a str or a pathlib.Path (it said 'PosixPath'),
    and an in-memory net by its type."""
    import pathlib

    from manifoldgd_fast.eval import nets as N

    dist, val = folders
    torch.save(N.net_checkpoint(N.build_net("convnet6", 3, 8)), tmp_path / "t.pt")
    monkeypatch.chdir(tmp_path)
    for teacher in ("t.pt", pathlib.Path("t.pt")):
        res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", teacher=teacher,
                         progress=False)
        assert res["teacher"] == str(tmp_path / "t.pt"), teacher
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", teacher=ColourOracle(),
                     progress=False)
    assert res["teacher"] == "ColourOracle"


def test_a_teacher_checkpoint_of_other_classes_is_refused(folders, tmp_path, capsys):
    """A net checkpoint that names the classes it was trained on (the metrics' default encoder, a ResNet-18 on the
    real images, does) taught a folder of other classes, or of the same in another order, as many of them:
    ImageWoof's teacher on ImageNette, silently. Refused in one line; its own classes teach as before."""
    from manifoldgd_fast.cli import main
    from manifoldgd_fast.eval import nets as N

    dist, val = folders
    net = N.build_net("convnet6", 3, 8)
    for name, classes in (("other.pt", ["ant", "bee", "dog"]), ("order.pt", ["bee", "ant", "cat"])):
        torch.save(N.net_checkpoint(net, classes=classes), tmp_path / name)
        assert main(["eval", "--distilled", dist, "--real-val", val, "--teacher", str(tmp_path / name), "--seeds",
                     "1", "--epochs", "1", "--size", "8", "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == (f"manifoldgd-fast: error: --teacher {tmp_path / name}: trained on the classes "
                       f"{', '.join(classes)}, not the evaluation's ant, bee, cat (in that order); its outputs would "
                       "be read as other classes\n"), err
    assert not os.path.exists(os.path.join(dist, "eval.json"))
    torch.save(N.net_checkpoint(net, classes=CLASSES), tmp_path / "own.pt")
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu",
                     teacher=str(tmp_path / "own.pt"), progress=False)
    assert res["protocol"] == "soft-label"


def test_a_teacher_checkpoint_of_all_imagenet_classes_answers_for_a_subsets_wnids():
    """A net checkpoint naming the 1000 ImageNet-1k WordNet ids in order (the metrics' default encoder of a
    1000-class run) teaches a subset's wnid folders through its outputs for them, as a 1000-class ImageNet
    net without names does; it was refused as trained on other classes. Other names are still refused."""
    from manifoldgd_fast.classes import imagenet_wnids
    from manifoldgd_fast.eval import nets as N

    ck = N.net_checkpoint(N.build_net("resnet18", 1000, 32), classes=imagenet_wnids())
    names = [imagenet_wnids()[i] for i in (0, 217, 482)]
    got = N.load_net(ck, num_classes=3, size=32, class_names=names)
    assert isinstance(got, N.ClassSubset) and got(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ConfigError, match="trained on the classes n01440764"):
        N.load_net(ck, num_classes=3, size=32, class_names=["ant", *names[1:]])


class _TupleNet(torch.nn.Module):
    def forward(self, x):
        return (x.mean((2, 3)),)


class _OutOfMemoryNet(torch.nn.Module):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


def test_teacher_that_fails_on_the_size_is_one_line(folders, tmp_path, capsys):
    """A teacher built for another size (or input, or returning no tensor): a ConfigError, exit 2, no traceback."""
    from manifoldgd_fast.cli import main
    from manifoldgd_fast.eval import nets as N

    dist, val = folders
    torch.save(N.net_checkpoint(N.build_net("convnet6", 3, 32)), tmp_path / "t32.pt")
    with pytest.raises(ConfigError) as e:
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu",
                   teacher=str(tmp_path / "t32.pt"), progress=False)
    assert _one_line(e).startswith("--teacher: fails on a (1, 3, 8, 8) batch at 8 px (it was built for 32 px)")
    one_channel = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ConfigError, match=r"--teacher: fails on a \(1, 3, 8, 8\) batch at 8 px: RuntimeError"):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", teacher=one_channel,
                   progress=False)
    with pytest.raises(ConfigError, match=r"--teacher: gives a tuple at 8 px, expected \(1, 3\)"):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", teacher=_TupleNet(),
                   progress=False)
    nan_teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3))
    torch.nn.init.constant_(nan_teacher[2].weight, float("nan"))  # (its soft labels: NaN, every student's loss NaN)
    with pytest.raises(ConfigError, match=r"^--teacher: gives non-finite outputs \(NaN or inf\) on a \(1, 3, 8, 8\) "
                                          r"batch$"):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", teacher=nan_teacher,
                   progress=False)
    assert main(["eval", "--distilled", dist, "--real-val", val, "--nets", "convnet6", "--seeds", "1", "--epochs",
                 "1", "--size", "8", "--device", "cpu", "--teacher", str(tmp_path / "t32.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("manifoldgd-fast: error: --teacher: fails on"), err
    assert not os.path.exists(os.path.join(dist, "eval.json"))
    # out of memory is not the teacher's fault: it goes on to the CLI's out-of-memory message
    for error in (torch.OutOfMemoryError("CUDA out of memory."),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 64 bytes")):
        with pytest.raises(type(error), match="out of memory|can't allocate"):
            P._check_teacher(_OutOfMemoryNet(error), 3, 8, torch.device("cpu"))


def test_imagenet_teacher_on_a_subsets_wnid_folders(tmp_path):
    """A 1000-class ImageNet ResNet-18 teacher answers for the folder's WordNet ids (ImageNette-like)."""
    from manifoldgd_fast.classes import imagenet_wnids

    names = [imagenet_wnids()[i] for i in (217, 0, 482)]
    dist = make_image_folder(tmp_path / "out", names, 2, size=16, seed=1)
    val = make_image_folder(tmp_path / "val", names, 2, size=16, seed=2)
    torch.save(tv_resnet18_state_dict(1000, seed=1), tmp_path / "teacher.pth")
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=32, device="cpu",
                     teacher=str(tmp_path / "teacher.pth"), progress=False)
    assert res["protocol"] == "soft-label" and res["num_classes"] == 3
    ant = make_image_folder(tmp_path / "ant", ["ant", names[0]], 2, size=16, seed=1)
    with pytest.raises(ConfigError, match="--teacher: .*'ant' is not an ImageNet-1k WordNet id"):
        P.evaluate(ant, ant, seeds=1, epochs=1, size=32, device="cpu", teacher=str(tmp_path / "teacher.pth"),
                   progress=False, out_json=str(tmp_path / "ant.json"))   # (not inside --real-val, the same folder)


# --------------------------------------------------------------------------- bad input
def _one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_empty_distilled_folder(tmp_path, folders):
    _, val = folders
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError) as e:
        P.evaluate(str(tmp_path / "empty"), val, epochs=1, device="cpu", progress=False)
    assert "empty" in _one_line(e) and "no class folders" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        P.evaluate(str(tmp_path / "missing"), val, epochs=1, device="cpu", progress=False)


def test_empty_class_folder(folders):
    dist, val = folders
    for f in os.listdir(os.path.join(dist, "bee")):
        os.remove(os.path.join(dist, "bee", f))
    with pytest.raises(DataError) as e:
        P.evaluate(dist, val, epochs=1, device="cpu", progress=False)
    assert "bee" in _one_line(e) and "no images" in str(e.value)


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_an_unreadable_first_image_is_skipped_for_the_size_too(folders, tmp_path):
    """The size comes from the first readable distilled image: an unreadable first file is skipped there as
    load_images skips it (it stopped the evaluation unless --size was given); none readable names the first."""
    dist, val = folders
    with open(os.path.join(dist, "ant", "000.png"), "wb") as f:
        f.write(b"not an image")
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, device="cpu", progress=False)
    assert res["size"] == 16 and res["n_train"] == 12
    entries = P.scan_image_folder(dist, classes=["ant"], label_map="sorted")
    Image.new("RGB", (9, 7)).save(os.path.join(dist, "ant", "001.png"))
    assert P.native_size(entries) == 16  # (the entries' files: 000.png, then the others)
    assert P.native_size(P.scan_image_folder(dist, classes=["ant"], label_map="sorted")) == 7
    Image.new("RGB", (1, 100)).save(os.path.join(dist, "ant", "001.png"))  # a strip load_images skips: so here
    assert P.native_size(P.scan_image_folder(dist, classes=["ant"], label_map="sorted")) == 16
    for f in os.listdir(os.path.join(dist, "ant")):
        with open(os.path.join(dist, "ant", f), "wb") as fh:
            fh.write(b"x")
    with pytest.raises(DataError) as e:
        P.native_size(P.scan_image_folder(dist, classes=["ant"], label_map="sorted"))
    assert _one_line(e).startswith(f"cannot read image {os.path.join(dist, 'ant', '000.png')}: ")


def test_system_folders_in_the_distilled_folder_are_not_classes(folders):
    """A distilled folder unzipped from macOS (__MACOSX/) or kept on a Synology (@eaDir/): not classes, as in the
    validation folder (they were 'not in the validation set', and the evaluation refused)."""
    dist, val = folders
    os.makedirs(os.path.join(dist, "__MACOSX", "ant"))
    Image.new("RGB", (16, 16)).save(os.path.join(dist, "__MACOSX", "ant", "img000.png"))
    os.makedirs(os.path.join(dist, "@eaDir"))
    assert P.distilled_class_names(dist) == CLASSES
    classes, dist_entries, _ = P.match_classes(dist, val)
    assert classes == CLASSES and [e.name for e in dist_entries] == CLASSES


def test_class_mismatch_names_missing_and_extra(tmp_path, folders):
    dist, _ = folders
    val = make_image_folder(tmp_path / "val2", ["ant", "bee", "dog"], 2, size=16)
    with pytest.raises(DataError) as e:
        P.evaluate(dist, val, epochs=1, device="cpu", progress=False)
    msg = _one_line(e)
    assert "missing from the distilled set: dog" in msg and "not in the validation set: cat" in msg


def test_bad_parameters(folders):
    dist, val = folders
    for kw, flag in [({"seeds": 0}, "--seeds"), ({"epochs": 0}, "--epochs"), ({"lr": -1.0}, "--lr"),
                     ({"nets": "vgg"}, "vgg"), ({"device": "tpu9"}, "--device")]:
        with pytest.raises(ConfigError, match=flag):
            P.evaluate(dist, val, progress=False, **kw)


def test_one_pixel_images_name_the_folder_not_an_unset_size(tmp_path, folders, monkeypatch):
    """1-px distilled images without --size: a DataError naming the folder (it blamed '--size 1', a flag not
    given); --size 1 is refused before any image is loaded; --size 4 trains on them."""
    _, val = folders
    dist = make_image_folder(tmp_path / "px1", CLASSES, 2, size=1)
    with pytest.raises(DataError) as e:
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, device="cpu", progress=False)
    assert _one_line(e) == (f"distilled folder {dist}: its images are 1 px, too small to train on; "
                            "pass --size (>= 2) to resize them")
    assert P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=4, device="cpu", progress=False)["size"] == 4
    monkeypatch.setattr(P, "load_images", lambda *a, **k: pytest.fail("loaded images before refusing --size 1"))
    with pytest.raises(ConfigError, match="^--size 1: must be >= 2$"):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=1, device="cpu", progress=False)


# --------------------------------------------------------------------------- CLI
def test_eval_help_states_the_defaults_the_protocol_uses():
    """--epochs and --batch-size say what default_epochs / default_hparams give: IDC's 500 / 300 epochs past
    IPC 200 and the soft-label protocol's batch (the help said 64 / 128 with --teacher too)."""
    import argparse

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["eval"]._actions}
    assert (P.default_epochs(500, 10), P.default_epochs(501, 10)) == (500, 300)
    assert "500 <= 500, else 300" in helps["epochs"]
    assert [P.default_hparams(10, soft=True, ipc=i)["batch_size"] for i in (1, 10, 50)] == [10, 50, 100]
    assert P.default_hparams(100, soft=True, ipc=50)["batch_size"] == 200
    assert "with --teacher RDED's 10 / 50 / 100 for IPC 1 / <= 10 / more, twice that from 100 classes" in \
        helps["batch_size"]


def _parser():
    from manifoldgd_fast.cli import build_parser  # the real CLI's parser

    return build_parser()


def test_cli_main_eval_bad_input_exit_2(folders, tmp_path, capsys):
    from manifoldgd_fast.cli import main

    dist, val = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--distilled", str(empty), "--real-val", val, "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("manifoldgd-fast: error:") and "Traceback" not in err[0]
    missing = str(tmp_path / "missing")
    for args, flag in [(["eval", "--distilled", missing], "--distilled"),
                       (["eval", "--distilled", dist, "--real-val", missing], "--real-val"),
                       (["metrics", "--distilled", missing, "--real", val], "--distilled"),
                       (["metrics", "--distilled", dist, "--real", missing], "--real")]:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"manifoldgd-fast: error: {flag} {missing}: no such folder"], (args, err)


def test_cli_eval_end_to_end(folders, capsys):
    dist, val = folders
    ns = _parser().parse_args(["eval", "--distilled", dist, "--real-val", val, "--nets", "convnet6,resnetap10",
                               "--seeds", "0,1", "--epochs", "2", "--size", "8", "--batch-size", "6",
                               "--device", "cpu", "--no-progress"])
    assert ns.seeds == [0, 1] and ns.nets == "convnet6,resnetap10"
    res = cli_eval.run_eval_from_args(ns)
    out = capsys.readouterr().out
    assert "| convnet6 |" in out and "| resnetap10 |" in out and "eval.json" in out
    assert set(res["nets"]) == {"convnet6", "resnetap10"} and len(res["nets"]["resnetap10"]["seeds"]) == 2
    defaults = _parser().parse_args(["eval", "--distilled", dist, "--real-val", val])
    # nets resolve at run time: all three, or convnet6 when OUT is the digits demo's output
    assert defaults.nets is None and defaults.seeds == 3 and defaults.progress


# --------------------------------------------------------------------------- IDC's colour jitter and lighting
# IDC's utils.Lighting / ColorJitter (the release's misc/utils.py), with the eigen-values/-vectors its
# data.transform_imagenet passes, transcribed per image as IDC applies them (one image at a time).
IDC_EIGVAL = [0.2175, 0.0188, 0.0045]
IDC_EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]


def _idc_lighting(img, alpha):
    """utils.Lighting.__call__ on one (3, H, W) image, with its normal draw ``alpha`` (3,) given."""
    eigvec, eigval = torch.tensor(IDC_EIGVEC), torch.tensor(IDC_EIGVAL)
    rgb = eigvec.clone().mul(alpha.view(1, 3).expand(3, 3)).mul(eigval.view(1, 3).expand(3, 3)).sum(1).squeeze()
    return img + rgb.view(3, 1, 1).expand_as(img)


def _idc_grayscale(img):
    gs = img.clone()
    gs[0].mul_(0.299).add_(gs[1], alpha=0.587).add_(gs[2], alpha=0.114)
    gs[1].copy_(gs[0])
    gs[2].copy_(gs[0])
    return gs


def _idc_jitter(img, order, alphas):
    """utils.ColorJitter on one image: the shuffled ops ``order`` (0 brightness, 1 contrast,
    2 saturation), each with its uniform draw ``alphas[op]``."""
    for op in order:
        if op == 0:
            target = img.new().resize_as_(img).zero_()
        elif op == 1:
            target = _idc_grayscale(img)
            target.fill_(target.mean())
        else:
            target = _idc_grayscale(img)
        img = img.lerp(target, float(alphas[op]))
    return img


@pytest.mark.parametrize("std", [0.1, 2.5])
def test_lighting_matches_idc(std):
    x = torch.rand(5, 3, 7, 6)
    out = A.lighting(x, torch.Generator().manual_seed(3), std)
    alpha = torch.randn(5, 3, generator=torch.Generator().manual_seed(3)) * std  # the draws lighting makes
    for i in range(5):
        assert torch.allclose(out[i], _idc_lighting(x[i], alpha[i]), atol=1e-6), i
    assert not torch.allclose(out, x, atol=1e-3)


@pytest.mark.parametrize("strength", [(0.4, 0.4, 0.4), (0.9, 0.2, 0.6)])
def test_color_jitter_matches_idc(strength):
    x = torch.rand(7, 3, 5, 9)
    out = A.color_jitter(x, torch.Generator().manual_seed(11), strength)
    g = torch.Generator().manual_seed(11)  # the draws color_jitter makes: U(-s, s) per op, then a random order
    alphas = (torch.rand(7, 3, generator=g) * 2 - 1) * torch.tensor(strength)
    orders = torch.rand(7, 3, generator=g).argsort(1)
    assert len({tuple(o) for o in orders.tolist()}) > 1  # several orders are exercised
    for i in range(7):
        ref = _idc_jitter(x[i], orders[i].tolist(), alphas[i])
        assert torch.allclose(out[i], ref, atol=1e-6), i


# --------------------------------------------------------------------------- validation resize + crop
def _non_square_val(root, classes=("ant", "bee", "cat"), w=23, h=15):
    """One random non-square w x h image a class; returns (folder, {class: PIL image})."""
    rng = np.random.default_rng(4)
    images = {}
    for c in classes:
        os.makedirs(os.path.join(root, c))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        im.save(os.path.join(root, c, "0.png"))
        images[c] = im
    return str(root), images


def _pil_resize_crop(im, short, size):
    """By hand: PIL bicubic resize of the short side to ``short``, then the centre size x size crop."""
    w, h = im.size
    s = short / min(w, h)
    im = im.resize((round(w * s), round(h * s)), resample=Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return torch.from_numpy(np.array(im.crop((left, top, left + size, top + size)))).permute(2, 0, 1)


def _spy_loads(monkeypatch) -> dict:
    """What evaluate loads, by its progress label ("load validation", "load distilled"): (x, y)."""
    seen, real_load = {}, P.load_images
    monkeypatch.setattr(P, "load_images", lambda e, s, **kw: seen.setdefault(kw["desc"], real_load(e, s, **kw)))
    return seen


@pytest.mark.parametrize("val_resize,short", [(None, 9), (12, 12), (8, 8)])  # 9 = round(8 * 256 / 224); 8: release
def test_evaluate_resizes_and_centre_crops_validation_images(folders, tmp_path, monkeypatch, val_resize, short):
    dist, _ = folders
    val, images = _non_square_val(tmp_path / "val_ns")
    seen = _spy_loads(monkeypatch)
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                     val_resize=val_resize)
    x, y = seen["load validation"]
    assert res["val_resize"] == short and res["val_preprocess"].startswith(f"resize {short} ")
    for i, c in enumerate(CLASSES):
        assert y[i] == i and torch.equal(x[i], _pil_resize_crop(images[c], short, 8)), c


def _torchvision_resize_crop(im, short, size):
    """By hand, torchvision's Resize(short) + CenterCrop(size) on PIL: the long side int(short * long / short),
    PIL bilinear, offsets int(round((n - size) / 2))."""
    w, h = im.size
    long = int(short * max(w, h) / min(w, h))
    im = im.resize((short, long) if w <= h else (long, short), resample=Image.BILINEAR)
    left, top = int(round((im.size[0] - size) / 2.0)), int(round((im.size[1] - size) / 2.0))
    return torch.from_numpy(np.array(im.crop((left, top, left + size, top + size)))).permute(2, 0, 1)


@pytest.mark.parametrize("val_resize,short", [(None, 9), (8, 8)])
def test_bilinear_resample_reads_every_image_as_the_releases_torchvision(folders, tmp_path, monkeypatch,
                                                                           val_resize, short):
    """--resample bilinear: validation and distilled images go through torchvision's Resize + CenterCrop
    (25 x 15 at short side 9: long side 15, left offset round(3.5) = 4, where DiT's floor crop takes 3)."""
    dist, _ = folders
    val, images = _non_square_val(tmp_path / "val_ns", w=25, h=15)
    seen = _spy_loads(monkeypatch)
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                     val_resize=val_resize, resample="bilinear")
    assert res["resample"] == "bilinear" and res["val_preprocess"] == f"resize {short} (short side, PIL bilinear), " \
                                                                     "centre crop 8"
    x, y = seen["load validation"]
    for i, c in enumerate(CLASSES):
        assert torch.equal(x[i], _torchvision_resize_crop(images[c], short, 8)), c
        assert not torch.equal(x[i], _pil_resize_crop(images[c], short, 8)), c  # the two filters differ here
    xd, yd = seen["load distilled"]
    for i, f in enumerate(sorted(os.path.join(dist, c, n) for c in CLASSES for n in os.listdir(os.path.join(dist, c)))):
        assert torch.equal(xd[i], _torchvision_resize_crop(Image.open(f).convert("RGB"), 8, 8)), f
    with pytest.raises(ConfigError, match="--resample lanczos: must be one of bicubic, bilinear"):
        P.evaluate(dist, val, size=8, resample="lanczos", device="cpu", progress=False)


def test_val_resize_below_size_is_refused(folders):
    dist, val = folders
    for v, match in [(6, "--val-resize 6: must be >= the evaluation size 8"), (0, "--val-resize 0: must be an integer >= 1")]:
        with pytest.raises(ConfigError, match=match):
            P.evaluate(dist, val, size=8, val_resize=v, device="cpu", progress=False)


# --------------------------------------------------------------------------- several distilled folders
def test_several_distilled_folders_report_each_and_pool_all_runs(folders, tmp_path):
    dist, val = folders
    dist2 = make_image_folder(tmp_path / "out2", CLASSES, 4, size=16, seed=7)
    kw = dict(nets="convnet6", seeds=[0, 1], epochs=3, size=8, batch_size=4, device="cpu", progress=False)
    one = P.evaluate(dist, val, out_json=str(tmp_path / "one.json"), **kw)
    both = P.evaluate([dist, dist2], val, **kw)
    r = both["nets"]["convnet6"]
    assert both["distilled"] == both["distilled_folders"] == [os.path.abspath(dist), os.path.abspath(dist2)]
    assert both["n_train"] == [12, 12] and both["std_over"] == "2 distilled sets x 2 seeds"
    pf0, pf1 = both["per_folder"]
    # the first folder's runs are those of a run on it alone (a seed gives the same run on the CPU)
    assert pf0["nets"]["convnet6"]["best_per_seed"] == [s["best"] for s in one["nets"]["convnet6"]["seeds"]]
    runs = pf0["nets"]["convnet6"]["best_per_seed"] + pf1["nets"]["convnet6"]["best_per_seed"]
    assert [s["best"] for s in r["seeds"]] == runs and r["n_runs"] == 4
    assert r["best_mean"] == pytest.approx(np.mean(runs)) and r["best_std"] == pytest.approx(np.std(runs))
    finals = [s["final"] for s in r["seeds"]]
    assert r["final_std"] == pytest.approx(np.std(finals))
    assert pf1["nets"]["convnet6"]["best_std"] == pytest.approx(np.std(pf1["nets"]["convnet6"]["best_per_seed"]))
    assert [s["distilled"] for s in r["seeds"]] == [os.path.abspath(dist)] * 2 + [os.path.abspath(dist2)] * 2
    # outputs: the pooled JSON in the first folder; each folder's manifest gets its own numbers
    assert both["files"]["json"] == os.path.join(os.path.abspath(dist), "eval_pooled.json")
    md = open(both["files"]["markdown"]).read()
    assert "2 distilled sets" in md and "## Set 1: " in md and f"{r['best_mean']:.2f} ± {r['best_std']:.2f}" in md
    with open(os.path.join(dist, "manifest.json")) as f:
        entry = json.load(f)["eval"][-1]
    assert entry["nets"]["convnet6"]["best_mean"] == pf0["nets"]["convnet6"]["best_mean"]
    assert entry["pooled"]["convnet6"]["best_mean"] == r["best_mean"]
    # a single folder keeps its old keys and values
    assert one["distilled"] == os.path.abspath(dist) and one["n_train"] == 12 and len(one["per_folder"]) == 1


def test_several_distilled_folders_need_the_same_classes(folders, tmp_path):
    dist, val = folders
    other = make_image_folder(tmp_path / "other", ["ant", "bee"], 2, size=16)
    with pytest.raises(DataError) as e:
        P.evaluate([dist, other], val, size=8, device="cpu", progress=False, restrict_val=True)
    msg = _one_line(e)
    assert msg.startswith(f"--distilled {other}: its classes differ") and "missing: cat" in msg
    with pytest.raises(ConfigError, match="--distilled .*given more than once"):
        P.evaluate([dist, dist], val, device="cpu", progress=False)


def test_cli_eval_several_folders(folders, tmp_path, capsys):
    dist, val = folders
    dist2 = make_image_folder(tmp_path / "out2", CLASSES, 4, size=16, seed=7)
    ns = _parser().parse_args(["eval", "--distilled", dist, dist2, "--real-val", val, "--nets", "convnet6",
                               "--seeds", "1", "--epochs", "1", "--size", "8", "--device", "cpu", "--no-progress"])
    assert ns.distilled == [dist, dist2]
    res = cli_eval.run_eval_from_args(ns)
    assert len(res["per_folder"]) == 2 and "eval_pooled.json" in capsys.readouterr().out


# --------------------------------------------------------------------------- flags
def test_temperature_and_duplicate_seeds_are_refused(folders, capsys):
    from manifoldgd_fast.cli import main

    dist, val = folders
    for t in (0.0, -1.0, float("nan"), float("inf"), "20", True):   # (the string "20" failed mid-training)
        with pytest.raises(ConfigError) as e:
            P.evaluate(dist, val, temperature=t, device="cpu", progress=False)
        assert _one_line(e).startswith(f"--temperature {t!r}: must be a number > 0 and finite")
    for seeds in (2.5, "3", [0.5, 1.7], True, [0, True]):
        with pytest.raises(ConfigError) as e:
            P.evaluate(dist, val, seeds=seeds, device="cpu", progress=False)
        assert _one_line(e) == f"--seeds {seeds!r}: give a count or a list of whole seeds"
    with pytest.raises(ConfigError) as e:
        P.evaluate(dist, val, seeds=[0, 5, 0], device="cpu", progress=False)
    assert _one_line(e) == "--seeds 0,5,0: seed 0 given more than once"
    with pytest.raises(ConfigError) as e:   # torch's generators take less than 2**64: it failed mid-evaluation
        P.evaluate(dist, val, seeds=[0, 2 ** 70], device="cpu", progress=False)
    assert _one_line(e) == f"--seeds 0,{2 ** 70}: seed {2 ** 70} is outside 0 .. 2**63 - 1"
    from manifoldgd_fast.cli import build_parser

    # a count, a list, and one seed as the help and README give it (a trailing comma)
    for text, seeds in [("3", 3), ("0,5,7", [0, 5, 7]), ("5,", [5])]:
        assert build_parser().parse_args(["eval", "--seeds", text]).seeds == seeds
    for args, flag in [(["--seeds", "1,1"], "--seeds 1,1"), (["--temperature", "nan"], "--temperature nan"),
                       (["--seeds", "0,-3"], "--seeds 0,-3")]:
        assert main(["eval", "--distilled", dist, "--real-val", val, "--no-progress", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"manifoldgd-fast: error: {flag}:"), err


def test_restrict_val_uses_only_the_distilled_classes(folders, tmp_path, monkeypatch):
    dist, _ = folders
    val = make_image_folder(tmp_path / "val_all", ["aardvark", *CLASSES, "dog"], 2, size=16, seed=3)
    with pytest.raises(DataError, match="missing from the distilled set: aardvark, dog"):
        P.evaluate(dist, val, device="cpu", progress=False)
    real_load = P.load_images
    seen = _spy_loads(monkeypatch)
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                     restrict_val=True)
    assert res["classes"] == CLASSES and res["n_val"] == 6 and res["restrict_val"] is True
    assert seen["load validation"][1].tolist() == [0, 0, 1, 1, 2, 2]  # labels: the distilled classes' order
    # the validation images of 'bee' are those of VAL/bee
    bee = P.scan_image_folder(val, classes=["bee"], label_map="sorted")
    assert torch.equal(seen["load validation"][0][2:4], real_load(bee, 8, resize=9 / 8)[0])
    part = make_image_folder(tmp_path / "val_part", ["ant", "bee"], 2, size=16)
    with pytest.raises(DataError) as e:
        P.evaluate(dist, part, device="cpu", progress=False, restrict_val=True)
    assert "not in the validation set: cat" in _one_line(e)


def test_restrict_val_reads_only_the_distilled_classes_folders(folders, tmp_path):
    """With restrict_val, an empty (or odd) validation class the distilled set lacks stops nothing (it was 'class
    zzz ... has no images'); the exact match still needs every class; no shared class is a class mismatch."""
    dist, _ = folders
    val = make_image_folder(tmp_path / "val_all", [*CLASSES, "dog"], 2, size=16, seed=3)
    os.makedirs(os.path.join(val, "zzz"))
    classes, _, ref = P.match_classes(dist, val, exact=False)
    assert classes == CLASSES and [(e.name, e.label, len(e.files)) for e in ref] == [
        ("ant", 0, 2), ("bee", 1, 2), ("cat", 2, 2)]
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                     restrict_val=True)
    assert res["n_val"] == 6
    with pytest.raises(DataError, match="class zzz in .* has no images"):
        P.match_classes(dist, val, exact=True)
    other = make_image_folder(tmp_path / "val_other", ["dog"], 2, size=16)
    os.makedirs(os.path.join(other, "zzz"))
    with pytest.raises(DataError) as e:
        P.match_classes(dist, other, exact=False)
    assert "not in the validation set: ant, bee, cat" in _one_line(e)


def test_evaluate_trains_all_three_nets_by_default(folders, monkeypatch):
    dist, val = folders
    trained = []
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, **kw: trained.append(net) or {
        "seed": seed, "best": 50.0, "final": 40.0, "params": 1})
    res = P.evaluate(dist, val, seeds=1, epochs=1, size=8, device="cpu", progress=False)
    assert trained == list(P.NET_NAMES) and list(res["nets"]) == list(P.NET_NAMES)


# --------------------------------------------------------------------------- precision
def test_precision_settings_and_restore(folders):
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    cuda = torch.device("cuda")  # only flags are set: no GPU needed
    with EP.numerics(cuda, "fp32"):
        assert not cudnn.benchmark and cudnn.deterministic and torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (before[3] or ":4096:8",)
    with EP.numerics(cuda, "bf16"):
        assert cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast" on a CPU machine
        assert isinstance(EP.amp(cuda, "bf16"), torch.autocast)
    assert not isinstance(EP.amp(cuda, "fp32"), torch.autocast)
    dist, val = folders
    with pytest.raises(ConfigError, match="--precision fp16: must be one of bf16, fp32"):
        P.evaluate(dist, val, precision="fp16", device="cpu", progress=False)
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                     precision="fp32")
    assert res["precision"] == "fp32" and res["precision_mode"] == "fp32" and res["deterministic"] is True



def test_on_the_cpu_every_precision_setting_is_a_no_op():
    """The CPU runs fp32 whatever --precision says: no autocast, NCHW nets and inputs, and no cuDNN or
    determinism flag (nor $CUBLAS_WORKSPACE_CONFIG) touched."""
    cpu, cudnn = torch.device("cpu"), torch.backends.cudnn
    for precision in EP.PRECISIONS:
        assert not isinstance(EP.amp(cpu, precision), torch.autocast)
        net = EP.prepare_net(torch.nn.Conv2d(3, 4, 3), cpu, precision)
        assert net.weight.is_contiguous()                       # not channels_last
        assert EP.net_layout(torch.rand(2, 3, 5, 5), precision).is_contiguous()
        before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
                  os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        with EP.numerics(cpu, precision):
            assert (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
                    os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before


def test_numerics_restores_each_cudnn_flag_to_its_own_value():
    cudnn, cuda = torch.backends.cudnn, torch.device("cuda")  # only flags are set: no GPU needed
    old = cudnn.benchmark, cudnn.deterministic
    try:
        for flags in ((True, False), (False, True)):
            for precision in EP.PRECISIONS:
                cudnn.benchmark, cudnn.deterministic = flags
                with EP.numerics(cuda, precision):
                    pass
                assert (cudnn.benchmark, cudnn.deterministic) == flags, precision
    finally:
        cudnn.benchmark, cudnn.deterministic = old

@requires_cuda()
def test_fp32_on_cuda_gives_the_same_run_twice():
    x = (torch.rand(16, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.arange(16) % 4
    dev = torch.device("cuda")
    split = P.Split(x.to(dev), y.to(dev))
    hp = dict(P.default_hparams(4), batch_size=8)

    def run():
        with EP.numerics(dev, "fp32"):
            r = P.train_net("resnetap10", split, split, 4, size=16, epochs=2, hp=hp, seed=0, device=dev,
                            progress=False, return_model=True, precision="fp32")
        return torch.cat([p.detach().flatten().cpu() for p in r["model"].parameters()])

    assert torch.equal(run(), run())


def test_crop_box_offsets_reach_both_ends_as_torchvision():
    """torchvision's RandomResizedCrop draws top ~ randint(0, h - ch + 1) and left ~ randint(0, w - cw + 1):
    both ends, 0 and h - ch, are reached. A fixed 10x12 box (scale and ratio pinned) in a 20x30 image:
    top takes every value 0..10, left every value 0..18."""
    g = torch.Generator().manual_seed(1)
    b = A.crop_boxes(4000, 20, 30, g, "cpu", scale=(0.2, 0.2), ratio=(1.2, 1.2))
    top, left, ch, cw = b.unbind(1)
    assert (ch == 10).all() and (cw == 12).all()  # sqrt(120 / 1.2) = 10, sqrt(120 * 1.2) = 12
    assert set(top.long().tolist()) == set(range(0, 20 - 10 + 1))
    assert set(left.long().tolist()) == set(range(0, 30 - 12 + 1))
    # and under the default scale / ratio, the largest top offset of each box height is its h - ch
    b = A.crop_boxes(20000, 12, 12, torch.Generator().manual_seed(2), "cpu")
    top, left, ch, cw = b.unbind(1)
    for c in (8, 9, 10):
        assert int(top[ch == c].max()) == 12 - c and int(top[ch == c].min()) == 0


def test_soft_label_test_epochs_for_every_run_length_are_rdeds():
    """RDED's validation/main.py tests after 0-based epoch e when (e % 10 == 9 and e > 0.8 * E) or e == E - 1;
    returned 1-based. E = 12: epoch index 9 is not past 9.6, so only the last epoch is tested."""
    assert P.test_epochs(12, None, soft=True) == {12}
    assert P.test_epochs(11, None, soft=True) == {10, 11}
    for epochs in range(1, 401):
        rded = {e + 1 for e in range(epochs) if (e % 10 == 9 and e > 0.8 * epochs) or e == epochs - 1}
        assert P.test_epochs(epochs, None, soft=True) == rded, epochs


class _BiasNet(torch.nn.Module):
    """Logits = one bias vector for every image: the gradient of a batch loss on it is the loss's gradient
    with respect to the logits, summed over the batch, which is computed by hand below."""

    def __init__(self, classes=3):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        return self.b.expand(len(x), -1)


def _one_sgd_step(monkeypatch, teacher=None, temperature=4.0):
    """One epoch of one batch (4 images, labels 0 0 1 2), plain SGD (lr 0.1, no momentum or decay), no
    augmentation, CutMix pinned to ratio 0.3 with every image's partner the label-2 image; the bias after."""
    y = torch.tensor([0, 0, 1, 2])
    x = (y * 50).to(torch.uint8).view(4, 1, 1, 1).expand(4, 3, 4, 4).contiguous()  # label in the pixels

    def pinned_cutmix(xb, _gen):
        j = int((xb[:, 0, 0, 0] == 100).nonzero()[0, 0])  # where the batch order put the label-2 image
        return xb, torch.full((len(xb),), j, dtype=torch.long), 0.3

    monkeypatch.setattr(P, "build_net", lambda *a, **k: _BiasNet(3))
    monkeypatch.setattr(P, "cutmix", pinned_cutmix)
    # half-cosine: lr 0.1 at epoch 0 (multistep would decay a 1-epoch run at once)
    hp = dict(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=4, schedule="half-cosine")
    split = P.Split(x, y)
    r = P.train_net("convnet6", split, split, 3, size=4, epochs=1, hp=hp, seed=0, device=torch.device("cpu"),
                    teacher=teacher, temperature=temperature, augment=lambda imgs, _g: imgs.float(),
                    progress=False, return_model=True, precision="fp32")
    return r["model"].b.detach().double()


def test_cutmix_loss_weighs_the_own_label_by_the_kept_area(monkeypatch):
    """IDC / CutMix: loss = ratio * CE(out, y) + (1 - ratio) * CE(out, y[partner]), ratio the area left of
    the image itself. At zero logits d loss / d logits = softmax - target, batch-averaged:
    target mass = (0.3 * counts(y) + 0.7 * counts(y[partner])) / 4 = (0.3 * [2, 1, 1] + 0.7 * [0, 0, 4]) / 4."""
    b = _one_sgd_step(monkeypatch)
    target = [(0.3 * 2) / 4, (0.3 * 1) / 4, (0.3 * 1 + 0.7 * 4) / 4]
    expect = torch.tensor([-0.1 * (1 / 3 - t) for t in target], dtype=torch.float64)
    torch.testing.assert_close(b, expect, atol=1e-6, rtol=0)


def test_soft_label_loss_softens_the_teachers_logits_too(monkeypatch):
    """RDED: KL(softmax(teacher / T) || softmax(student / T)), batch mean. At zero student logits
    d loss / d logits = (1/K - softmax(t / T)) / T per image; the batch mean of 4 equal rows is one row."""
    t = [2.0, 0.0, -3.0]
    T = 4.0

    class FixedTeacher(torch.nn.Module):
        def forward(self, x):
            return torch.tensor(t).expand(len(x), -1)

    b = _one_sgd_step(monkeypatch, teacher=FixedTeacher(), temperature=T)
    z = sum(math.exp(v / T) for v in t)
    soft = [math.exp(v / T) / z for v in t]
    expect = torch.tensor([-0.1 * (1 / 3 - s) / T for s in soft], dtype=torch.float64)
    torch.testing.assert_close(b, expect, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- gaps a mutation audit found
def test_accuracy_feeds_the_net_normalised_images():
    """The test split goes through the training's normalisation (unit range, ImageNet mean / std): feeding
    raw 0..1 images passed every other test."""
    from manifoldgd_fast.eval import augment as A

    x = (torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, z):
            seen.append(z.clone())
            return torch.zeros(len(z), 3)

    P.accuracy(Spy(), P.Split(x, torch.zeros(5, dtype=torch.long)), torch.device("cpu"), 2, "fp32")
    torch.testing.assert_close(torch.cat(seen), A.normalize(A.to_unit(x)))
    assert float(A.to_unit(torch.tensor([255], dtype=torch.uint8))) == 1.0


def test_testing_a_float_split_leaves_its_images_as_they_were():
    """to_unit makes a new tensor: a Split of float images (0..255) tested twice gives the same accuracy and
    keeps its images (the in-place division of x.float(), x itself, rescaled the split at every test)."""
    x = torch.tensor([0.0, 255.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    split = P.Split(x, torch.tensor([0, 1]))

    class Bright(torch.nn.Module):  # class 1 where the image is bright
        def forward(self, z):
            return torch.stack([torch.zeros(len(z)), z.mean((1, 2, 3))], 1)

    assert [P.accuracy(Bright(), split, torch.device("cpu"), 1, "fp32") for _ in range(2)] == [100.0, 100.0]
    assert torch.equal(split.x[:, 0, 0, 0], torch.tensor([0.0, 255.0]))
    u = torch.tensor([[51.0]])
    assert torch.equal(A.to_unit(u), torch.tensor([[0.2]])) and float(u) == 51.0


def test_the_training_flip_is_a_fair_coin(monkeypatch):
    """Horizontal flip with p = 1/2 per image (with the crop pinned to the whole image and no colour
    noise, an image comes out as itself or its mirror)."""
    from manifoldgd_fast.eval import augment as A

    monkeypatch.setattr(A, "crop_boxes", lambda n, h, w, *a, **k: torch.tensor([[0.0, 0.0, h, w]] * n))
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).expand(2000, 3, 4, 4).contiguous()
    out = A.TrainAugment(4, jitter=0.0, light=0.0)(x, torch.Generator().manual_seed(0))
    ref = A.normalize(A.to_unit(x[:1]))
    flipped = (out - ref.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    same = (out - ref).abs().amax((1, 2, 3)) < 1e-5
    assert bool((flipped | same).all()) and 0.45 < float(flipped.float().mean()) < 0.55


def test_each_evaluation_is_appended_to_the_manifest(folders, monkeypatch):
    """A distilled folder's manifest keeps every evaluation made of it (`eval`: a list), not the last."""
    dist, val = folders
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, **kw: {"seed": seed, "best": 1.0, "final": 1.0,
                                                                     "params": 1})
    for _ in range(2):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False)
    with open(os.path.join(dist, "manifest.json")) as f:
        man = json.load(f)
    assert len(man["eval"]) == 2 and man["method"] == "manifoldgd"


def test_a_temperature_without_a_teacher_is_warned_about(folders, monkeypatch, caplog):
    """--temperature without --teacher ran the hard-label protocol, which has none, and said nothing of it."""
    dist, val = folders
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, **kw: {"seed": seed, "best": 1.0, "final": 1.0,
                                                                     "params": 1})
    with caplog.at_level(logging.WARNING, logger="manifoldgd_fast"):
        res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                         temperature=4)
    assert res["protocol"] == "hard-label" and res["temperature"] is None
    assert "--temperature 4 is the soft-label protocol's and there is no --teacher" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="manifoldgd_fast"):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False)
    assert "--temperature" not in caplog.text


def test_a_teacher_built_for_another_size_is_warned_about(folders, tmp_path, monkeypatch, caplog):
    """A ResNet teacher checkpoint built for 8 px runs at other sizes: at --size 16 it taught silently, its soft
    labels those of a net that never saw such images. Warned about, naming both sizes; one of the evaluation's
    own size (or a bare state dict, built here at --size) is not."""
    from manifoldgd_fast.eval import nets as N

    dist, val = folders
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, **kw: {"seed": seed, "best": 1.0, "final": 1.0,
                                                                     "params": 1})
    for built, warned in ((8, True), (16, False)):
        torch.save(N.net_checkpoint(N.build_net("resnetap10", 3, built)), tmp_path / f"t{built}.pt")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="manifoldgd_fast"):
            P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=16, device="cpu", progress=False,
                       teacher=str(tmp_path / f"t{built}.pt"))
        line = "--teacher is a net built for 8 px images and teaches at 16 px (--size): its soft labels may be poor"
        assert (line in caplog.text) == warned, caplog.text


def test_each_manifest_record_names_the_settings_its_numbers_depend_on(folders, monkeypatch):
    """Two evaluations of one folder at another --val-resize (or --lr, --restrict-val, --teacher ...) were two
    manifest records alike but for their numbers, both naming eval.json, which holds only the last."""
    dist, val = folders
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, **kw: {"seed": seed, "best": 1.0, "final": 1.0,
                                                                     "params": 1})
    for val_resize, lr in ((8, None), (12, 0.5)):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                   val_resize=val_resize, lr=lr)
    with open(os.path.join(dist, "manifest.json")) as f:
        first, second = json.load(f)["eval"]
    assert (first["val_resize"], second["val_resize"]) == (8, 12)
    assert (first["hparams"]["lr"], second["hparams"]["lr"]) == (0.01, 0.5)
    assert first["restrict_val"] is False and first["teacher"] is None and first["n_val"] == 18
    assert first["resample"] == "bicubic" and first["val_labels"] is None


def test_the_augmentation_is_specs():
    """SPEC 7's training augmentation, pinned: RandomResizedCrop scale 0.5-1, ImageNet mean / std, AlexNet's
    PCA lighting (a per-image RGB shift, nonzero), and CutMix's partner drawn anew per batch."""
    from manifoldgd_fast.eval import augment as A

    assert A.IMAGENET_MEAN == (0.485, 0.456, 0.406) and A.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert A.PCA_EIGVAL == (0.2175, 0.0188, 0.0045)
    scales, real = [], A.crop_boxes

    def spy(n, h, w, gen, device, scale=(0.5, 1.0), *a, **k):
        scales.append(tuple(scale))
        return torch.tensor([[0.0, 0.0, h, w]] * n)

    x = (torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    try:
        A.crop_boxes = spy
        out = A.TrainAugment(8, flip=False, jitter=0.0)(x, torch.Generator().manual_seed(0))
    finally:
        A.crop_boxes = real
    assert scales == [(0.5, 1.0)]
    std, mean = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
    shift = out * std + mean - A.to_unit(x)                  # crop = whole image, no flip, no jitter
    per_image = shift.mean((2, 3), keepdim=True)
    torch.testing.assert_close(shift, per_image.expand_as(shift), atol=1e-5, rtol=0)
    assert float(per_image.abs().amax((1, 2, 3)).min()) > 1e-3        # (without it: rounding, ~1e-7)
    perms = {tuple(A.cutmix(torch.zeros(6, 3, 4, 4), torch.Generator().manual_seed(s))[1].tolist()) for s in range(20)}
    assert len(perms) > 1


def test_best_is_the_first_highest_test_and_final_the_last(folders, monkeypatch):
    """best = the highest test accuracy, best_epoch = the first epoch reaching it, final = the last test."""
    dist, val = folders
    entries = P.match_classes(dist, val)
    train = P.Split(*P.load_images(entries[1], 8))
    accs = iter([10.0, 30.0, 30.0, 20.0])
    monkeypatch.setattr(P, "accuracy", lambda *a, **k: next(accs))
    hp = dict(P.default_hparams(3), batch_size=4)
    r = P.train_net("convnet6", train, train, 3, size=8, epochs=4, hp=hp, seed=0, device=torch.device("cpu"),
                    eval_every=1, progress=False)
    assert (r["best"], r["best_epoch"], r["final"]) == (30.0, 2, 20.0)
    assert r["history"] == [[1, 10.0], [2, 30.0], [3, 30.0], [4, 20.0]]


class _ScriptedNet(_BiasNet):
    """Predicts class 0 in its first two training epochs (one batch each), class 2 after."""

    def __init__(self):
        super().__init__(3)
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        offset = torch.tensor([1.0, 0.0, 0.0] if self.calls <= 2 else [0.0, 0.0, 1.0])
        return super().forward(x) + offset


def test_train_acc_is_over_the_epochs_since_the_last_test(monkeypatch):
    """train_acc: the training batches' top-1 since the previous test (epochs 3-4 here: class 2 predicted, labels
    0 0 1 2, so 25 %), neither over the whole run (37.5 %) nor with a counter left running (75 %, 12.5 %)."""
    y = torch.tensor([0, 0, 1, 2])
    x = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    monkeypatch.setattr(P, "build_net", lambda *a, **k: _ScriptedNet())
    monkeypatch.setattr(P, "accuracy", lambda *a, **k: 0.0)
    hp = dict(optimizer="sgd", lr=0.0, momentum=0.0, weight_decay=0.0, batch_size=4, schedule="half-cosine")
    r = P.train_net("convnet6", P.Split(x, y), P.Split(x, y), 3, size=4, epochs=4, hp=hp, seed=0,
                    device=torch.device("cpu"), eval_every=2, progress=False, precision="fp32")
    assert r["train_acc"] == 25.0


def test_each_epoch_draws_a_new_order(folders, monkeypatch):
    """The training set is shuffled every epoch (not in file order, not the same order twice)."""
    dist, val = folders
    entries = P.match_classes(dist, val)
    train = P.Split(*P.load_images(entries[1], 8))
    orders, images = [], P.Split.images

    def spy(self, idx, device):
        if self is train and not isinstance(idx, slice):   # (the tests read it by slices)
            orders.append([int(i) for i in idx])
        return images(self, idx, device)

    monkeypatch.setattr(P.Split, "images", spy)
    hp = dict(P.default_hparams(3), batch_size=len(train))
    P.train_net("convnet6", train, train, 3, size=8, epochs=2, hp=hp, seed=0, device=torch.device("cpu"),
                eval_every=2, progress=False)
    assert len(orders) == 2 and sorted(orders[0]) == list(range(len(train)))
    assert orders[0] != list(range(len(train))) and orders[0] != orders[1]


def test_accuracy_is_over_every_image():
    class Zero(torch.nn.Module):
        def forward(self, z):
            return torch.stack([torch.ones(len(z)), torch.zeros(len(z))], 1)

    x = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    acc = P.accuracy(Zero(), P.Split(x, torch.tensor([0, 0, 1])), torch.device("cpu"), 2, "fp32")
    assert acc == pytest.approx(200 / 3)


def test_hparams_switch_past_100_classes_and_the_ipc_is_the_largest_class(folders, monkeypatch):
    """SPEC 7: lr 0.1, wd 1e-4, batch 128 for more than 100 classes (100 keeps 0.01 / 5e-4 / 64); the IPC that
    sets the epochs is the largest class's (a class short of images does not lower it); the validation
    short side is round(size * 256 / 224)."""
    assert (P.default_hparams(100)["batch_size"], P.default_hparams(100)["lr"]) == (64, 0.01)
    assert (P.default_hparams(101)["batch_size"], P.default_hparams(101)["lr"]) == (128, 0.1)
    dist, val = folders
    import shutil

    for i in range(4, 12):       # bee: 12 images, ant: 3
        shutil.copy(os.path.join(dist, "bee", sorted(os.listdir(os.path.join(dist, "bee")))[0]),
                    os.path.join(dist, "bee", f"x{i}.png"))
    os.remove(os.path.join(dist, "ant", sorted(os.listdir(os.path.join(dist, "ant")))[0]))
    got = {}
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, epochs, **kw: got.update(epochs=epochs) or
                        {"seed": seed, "best": 1.0, "final": 1.0, "params": 1})
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, size=32, device="cpu", progress=False)
    assert res["ipc"] == 12 and got["epochs"] == P.default_epochs(12, 3) == 1500
    assert res["val_resize"] == 37                                  # 36.57 rounds up


@pytest.mark.parametrize("soft", [False, True])
def test_batch_size_lr_and_epochs_given_reach_every_run(folders, monkeypatch, soft):
    """--batch-size / --lr / --epochs replace the protocol's defaults in the runs and in eval.json (a --batch-size
    left out of the hparams passed every other test); left out, the defaults (hard: 64 / 0.01 / 2000 at IPC 4;
    soft: 12 = the whole set / 1e-3 / 300)."""
    dist, val = folders
    got = []
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, epochs, hp, **kw: got.append((epochs, dict(hp))) or
                        {"seed": seed, "best": 1.0, "final": 1.0, "params": 1})
    teacher = ColourOracle() if soft else None
    res = P.evaluate(dist, val, nets="convnet6", seeds=2, size=8, device="cpu", progress=False, teacher=teacher,
                     batch_size=5, lr=0.25, epochs=7)
    assert [(e, hp["batch_size"], hp["lr"]) for e, hp in got] == [(7, 5, 0.25)] * 2
    assert (res["hparams"]["batch_size"], res["hparams"]["lr"], res["epochs"]) == (5, 0.25, 7)
    got.clear()
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, size=8, device="cpu", progress=False, teacher=teacher)
    assert [(e, hp["batch_size"], hp["lr"]) for e, hp in got] == [(300, 12, 1e-3) if soft else (2000, 64, 0.01)]
    assert (res["hparams"]["batch_size"], res["epochs"]) == ((12, 300) if soft else (64, 2000))
    assert (res["temperature"], res["protocol"]) == ((20.0, "soft-label") if soft else (None, "hard-label"))


def test_the_soft_label_protocol_trains_a_resnet18_student_by_default(folders, monkeypatch, capsys):
    """MGD3's and RDED's soft-label protocol trains a ResNet-18 student: without --nets, --teacher trains that one
    (it trained ConvNet-6 and ResNetAP-10 too, three times the hours); hard labels train all three; --nets
    still chooses. The CLI leaves the choice to evaluate (the digits demo's convnet6 aside)."""
    from manifoldgd_fast.cli import main

    dist, val = folders
    got = []
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, **kw: got.append(net) or
                        {"seed": seed, "best": 1.0, "final": 1.0, "params": 1})
    kw = dict(seeds=1, epochs=1, size=8, device="cpu", progress=False)
    P.evaluate(dist, val, teacher=ColourOracle(), **kw)
    assert got == ["resnet18"]
    got.clear()
    P.evaluate(dist, val, **kw)
    assert got == list(P.NET_NAMES)
    got.clear()
    P.evaluate(dist, val, teacher=ColourOracle(), nets="convnet6,resnet18", **kw)
    assert got == ["convnet6", "resnet18"]
    got.clear()
    teacher = os.path.join(os.path.dirname(dist), "teacher.pt")
    torch.save(ColourOracle(), teacher)
    assert main(["eval", "--distilled", dist, "--real-val", val, "--teacher", teacher, "--seeds", "1", "--epochs",
                 "1", "--size", "8", "--device", "cpu", "--no-progress"]) == 0
    assert got == ["resnet18"]


def test_several_folders_of_other_ipcs_train_as_long_as_the_largest(folders, tmp_path, monkeypatch, caplog):
    """Folders of IPC 4 and 11: the epochs of IPC 11 (1500, not IPC 4's 2000) for both, said in a warning;
    eval.json's ipc is the largest, each folder's own in per_folder."""
    dist, val = folders
    dist2 = make_image_folder(tmp_path / "out2", CLASSES, 11, size=8, seed=7)
    got = []
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, epochs, **kw: got.append(epochs) or
                        {"seed": seed, "best": 1.0, "final": 1.0, "params": 1})
    with caplog.at_level("WARNING", logger=P.log.name):
        res = P.evaluate([dist, dist2], val, nets="convnet6", seeds=1, size=8, device="cpu", progress=False)
    assert got == [1500, 1500] and res["epochs"] == 1500 and res["ipc"] == 11
    assert [pf["ipc"] for pf in res["per_folder"]] == [4, 11]
    assert "different IPCs (4, 11); epochs follow the largest, 11" in caplog.text


def test_a_reserved_folder_holding_images_is_a_class(folders, tmp_path):
    """latents/ and modes/ are a run's own folders, not classes, unless they hold images (a class of that name)."""
    dist, _ = folders
    os.makedirs(os.path.join(dist, "modes"))
    assert P.distilled_class_names(dist) == CLASSES
    Image.new("RGB", (16, 16), (9, 9, 9)).save(os.path.join(dist, "modes", "0.png"))
    assert P.distilled_class_names(dist) == sorted([*CLASSES, "modes"])
    val = make_image_folder(tmp_path / "val_m", [*CLASSES, "modes"], 2, size=16)
    classes, dist_entries, _ = P.match_classes(dist, val)
    assert classes == sorted([*CLASSES, "modes"]) and dist_entries[-1].name == "modes"


def test_the_real_subset_is_drawn_per_class():
    """capped: each class's subset is its own draw (seeded by its name), not the same positions for all."""
    from manifoldgd_fast.data import ClassEntry

    files = [f"/r/{i}.png" for i in range(20)]
    a = P.capped(ClassEntry("a", 0, [f.replace("/r/", "/r/a/") for f in files]), 5)
    b = P.capped(ClassEntry("b", 1, [f.replace("/r/", "/r/b/") for f in files]), 5)
    pick = lambda e: [os.path.basename(f) for f in e.files]  # noqa: E731
    assert len(pick(a)) == 5 and pick(a) != pick(b)


def test_describe_tests_says_the_hard_label_period_in_words():
    """eval.json's "tested": "every 1 epoch" (it said "every 1 epochs"), "every 10 epochs", RDED's for soft labels."""
    assert P.describe_tests(100, None, soft=False) == "every 1 epoch, and the last"
    assert P.describe_tests(1000, None, soft=False) == "every 10 epochs, and the last"
    assert P.describe_tests(300, 7, soft=True) == "every 7 epochs, and the last"
    assert P.describe_tests(300, None, soft=True) == "every 10th epoch past 80 % of the run, and the last (RDED)"


class _TrainableOracle(torch.nn.Module):
    """ColourOracle with a parameter and a batch norm: what a user's own net in training has."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(5.0))
        self.bn = torch.nn.BatchNorm1d(3, affine=False)

    def forward(self, x):
        return self.scale * self.bn(x.mean(dim=(2, 3)))


def test_an_in_memory_teacher_is_left_as_the_caller_had_it(folders):
    """evaluate(teacher=module) set the caller's module to eval mode and turned its requires_grad off in place:
    a user who goes on training it afterwards got no gradients and no batch statistics, without a word."""
    dist, val = folders
    teacher = _TrainableOracle().train()
    stats = teacher.bn.running_mean.clone()
    P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", teacher=teacher, progress=False)
    assert teacher.training and teacher.bn.training
    assert teacher.scale.requires_grad and teacher.scale.item() == 5.0
    assert torch.equal(teacher.bn.running_mean, stats)


def test_a_teacher_that_cannot_be_copied_is_one_line(folders):
    import threading

    dist, val = folders
    teacher = ColourOracle()
    teacher.lock = threading.Lock()
    with pytest.raises(ConfigError, match=r"^--teacher ColourOracle: the module cannot be copied \(TypeError: .*"
                                          r"pass the file$"):
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", teacher=teacher,
                   progress=False)


def test_a_batch_norm_resnet18_below_12_px_trains_past_a_last_batch_of_one():
    """The batch-norm ResNet-18 (the soft-label protocol's student) at 8 px has 1x1 last maps: a last batch of
    one image stopped the run with torch's 'Expected more than 1 value per channel' traceback. That batch is
    left out there, and only there (at 12 px and up, and for instance norm, every batch trains as before);
    --batch-size 1 is refused in one line."""
    from manifoldgd_fast.eval import nets as N

    cpu = torch.device("cpu")
    x = (torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    split = P.Split(x, torch.tensor([0, 1, 2, 0, 1]))
    hp = dict(P.default_hparams(3), batch_size=4, resnet18_norm="batch")
    res = P.train_net("resnet18", split, split, 3, size=8, epochs=2, hp=hp, seed=0, device=cpu, progress=False)
    assert 0.0 <= res["final"] <= 100.0 and len(res["history"]) >= 1
    with pytest.raises(ConfigError, match=r"^--batch-size 1 with resnet18's batch norm at --size 8: .*--size$"):
        P.train_net("resnet18", split, split, 3, size=8, epochs=1, hp=dict(hp, batch_size=1), seed=0, device=cpu,
                    progress=False)
    probe = lambda net, size, norm: P._lone_image_fails(N.build_net(net, 3, size, norm=norm), size, cpu,  # noqa: E731
                                                        "fp32")
    assert probe("resnet18", 8, "batch") and probe("resnet18", 4, "batch")
    assert not probe("resnet18", 12, "batch") and not probe("resnet18", 32, "batch")
    assert not probe("resnet18", 8, "instance") and not probe("convnet6", 8, "instance")
    net = N.build_net("resnet18", 3, 8, norm="batch").train()
    stats = net.stem.norm.running_mean.clone()
    P._lone_image_fails(net, 8, cpu, "fp32")
    assert net.training and torch.equal(net.stem.norm.running_mean, stats)  # the probe leaves the net as it was


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")  # (the user's file is made so)
def test_a_torchscript_teacher_file_teaches(folders, tmp_path):
    """A TorchScript teacher (torch.jit.save) stopped the evaluation with 'requires_grad_ is not supported on
    ScriptModules'; it teaches now. load_net reads it with torch.jit.load (torch.load took it with a warning),
    and one built for another size is one line naming its own error, not the TorchScript interpreter."""
    from manifoldgd_fast.eval import nets as N

    dist, val = folders
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    torch.jit.save(torch.jit.script(teacher), tmp_path / "t.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # (torch.load's 'looks like a TorchScript archive', torch.jit's deprecation)
        loaded = N.load_net(str(tmp_path / "t.pt"))
    assert isinstance(loaded, torch.jit.ScriptModule)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(loaded(x), teacher(x))
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=2, size=8, device="cpu", teacher=str(tmp_path / "t.pt"),
                     progress=False)
    assert res["protocol"] == "soft-label" and res["teacher"] == str(tmp_path / "t.pt")
    assert 0.0 <= res["nets"]["convnet6"]["final_mean"] <= 100.0
    with pytest.raises(ConfigError) as e:
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=16, device="cpu",
                   teacher=str(tmp_path / "t.pt"), progress=False)
    assert _one_line(e).startswith("--teacher: fails on a (1, 3, 16, 16) batch at 16 px: RuntimeError: mat1 and mat2")


def test_a_huge_seed_count_is_one_line(folders, capsys):
    """`eval --seeds 99999999999999999999` was an OverflowError traceback (list(range(n))); a count (or a list)
    past MAX_SEEDS is refused in one line."""
    from manifoldgd_fast.cli import main

    dist, val = folders
    for seeds in (10 ** 20, P.MAX_SEEDS + 1):
        with pytest.raises(ConfigError) as e:
            P.evaluate(dist, val, seeds=seeds, device="cpu", progress=False)
        assert _one_line(e) == f"--seeds {seeds}: must be <= {P.MAX_SEEDS} (a count of seeds, one training run each)"
    with pytest.raises(ConfigError, match=rf"^--seeds: {P.MAX_SEEDS + 1} seeds given, at most {P.MAX_SEEDS} "):
        P.evaluate(dist, val, seeds=list(range(P.MAX_SEEDS + 1)), device="cpu", progress=False)
    assert P._check_seeds(P.MAX_SEEDS) == list(range(P.MAX_SEEDS))
    assert main(["eval", "--distilled", dist, "--real-val", val, "--seeds", "99999999999999999999",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("manifoldgd-fast: error: --seeds 99999999999999999999: must be <="), err


def test_val_resize_past_the_limit_is_refused_before_loading(folders, monkeypatch):
    """`eval --val-resize 100000` was OOM-killed without a word while loading the validation set: it has an
    upper bound, as --size has, checked before any image is read."""
    dist, val = folders

    def must_not_load(*a, **k):
        raise AssertionError("images were loaded before --val-resize was checked")

    monkeypatch.setattr(P, "load_images", must_not_load)
    for v in (100000, P.MAX_VAL_RESIZE + 1):
        with pytest.raises(ConfigError) as e:
            P.evaluate(dist, val, size=8, val_resize=v, device="cpu", progress=False)
        assert _one_line(e) == f"--val-resize {v}: must be <= {P.MAX_VAL_RESIZE} px"
    assert P.MAX_VAL_RESIZE >= round(P.MAX_SIZE * P.VAL_RESIZE)   # the default at the largest --size passes


@pytest.mark.parametrize("name", ["eval.md", "eval.json.partial", "eval.json"])
def test_a_folder_where_eval_writes_its_report_is_refused_before_training(folders, tmp_path, monkeypatch, name):
    """A class folder named eval.md or eval.json.partial in the distilled folder (where eval writes them) failed
    with 'Is a directory' after the training (or its first run); it is named in one line before any training.
    With --out-json elsewhere, nothing is in the way."""
    dist, val = folders
    for root, seed in ((dist, 1), (val, 2)):   # a class of that name, in both sets
        make_image_folder(root, [name], 2, size=16, seed=seed)

    def must_not_train(*a, **k):
        raise AssertionError("a net trained before the report paths were checked")

    monkeypatch.setattr(P, "train_net", must_not_train)
    with pytest.raises(ConfigError) as e:
        P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False)
    assert _one_line(e).startswith(f"--out-json (default) {os.path.join(dist, 'eval.json')}: ")
    assert os.path.join(dist, name) in str(e.value)
    monkeypatch.undo()
    res = P.evaluate(dist, val, nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False,
                     out_json=str(tmp_path / "elsewhere" / "e.json"))
    assert os.path.isfile(res["files"]["markdown"]) and res["files"]["markdown"].endswith("e.md")


@pytest.mark.parametrize("name", ["r.md", "r.MD"])
def test_an_out_json_named_md_is_refused_before_training(folders, tmp_path, monkeypatch, capsys, name):
    """--out-json r.md: the markdown table, written beside the JSON as r.md, replaced it; the CLI said
    "results: r.md, r.md" and the manifest named r.md as the JSON. Refused in one line before any training."""
    from manifoldgd_fast.cli import main

    dist, val = folders
    monkeypatch.setattr(P, "train_net", lambda *a, **k: pytest.fail("a net trained"))
    out = str(tmp_path / name)
    assert main(["eval", "--distilled", dist, "--real-val", val, "--nets", "convnet6", "--seeds", "1", "--epochs",
                 "1", "--size", "8", "--device", "cpu", "--no-progress", "--out-json", out]) == 2
    err = capsys.readouterr().err
    assert err == (f"manifoldgd-fast: error: --out-json {out}: the markdown table is written beside it as "
                   f"{os.path.splitext(out)[0]}.md, in its place; give a .json file name\n"), err
    assert not os.path.exists(out)


def test_the_table_beside_out_json_never_replaces_a_file_no_evaluation_wrote(folders, tmp_path, monkeypatch):
    """--out-json README.json wrote its table over README.md (and --out-json t.json its table over --teacher t.md):
    refused before training; the table of an earlier report of that name is rewritten."""
    dist, val = folders
    monkeypatch.setattr(P, "train_net", lambda net, *a, seed, **kw: {"seed": seed, "best": 1.0, "final": 1.0,
                                                                     "params": 1})
    kw = dict(nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False)
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(ConfigError, match=r"^--out-json .*README\.json: its table would be written over .*README\.md, "
                                          r"which is no report's \(no README\.json beside it\); give another"):
        P.evaluate(dist, val, out_json=str(tmp_path / "README.json"), **kw)
    assert (tmp_path / "README.md").read_text() == "mine" and not (tmp_path / "README.json").exists()
    (tmp_path / "t.md").write_text("a teacher file")   # (its name is a user's to choose)
    with pytest.raises(ConfigError, match=r"^--out-json's table .*t\.md: inside --teacher .*t\.md, which is read"):
        P.evaluate(dist, val, out_json=str(tmp_path / "t.json"), teacher=str(tmp_path / "t.md"), **kw)
    assert (tmp_path / "t.md").read_text() == "a teacher file"
    for _ in range(2):   # its own table, written again
        res = P.evaluate(dist, val, out_json=str(tmp_path / "r.json"), **kw)
    assert res["files"]["markdown"] == str(tmp_path / "r.md")
    os.replace(tmp_path / "r.json", tmp_path / "kept.json")   # an earlier report's JSON moved away: its table is
    res = P.evaluate(dist, val, out_json=str(tmp_path / "r.json"), **kw)   # still an evaluation's, rewritten
    assert os.path.isfile(tmp_path / "r.json") and res["files"]["markdown"] == str(tmp_path / "r.md")


def test_an_interrupted_training_closes_its_progress_bar(monkeypatch, capsys):
    """Ctrl-C (or an error) mid-training: the epoch bar is closed on the way out, so the next line on stderr
    (the CLI's "interrupted; finished training runs are kept ...") starts a line of its own: it was glued to the
    bar's "...ep/s]" (found by a kill / resume audit)."""
    x = (torch.rand(6, 3, 8, 8) * 255).to(torch.uint8)
    split = P.Split(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    hp = dict(P.default_hparams(3), batch_size=4)
    real_accuracy = P.accuracy

    def accuracy_then_stop(*a, **k):
        real_accuracy(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "accuracy", accuracy_then_stop)
    monkeypatch.setattr(P.tqdm, "monitor_interval", 0)  # (no monitor thread)
    try:
        P.train_net("convnet6", split, split, 3, size=8, epochs=3, hp=hp, seed=0, eval_every=1,
                    device=torch.device("cpu"), progress=True)
    except KeyboardInterrupt:  # (as the CLI prints it: in the handler, the traceback and its frames alive)
        print("manifoldgd-fast: interrupted", file=sys.stderr)
    else:
        pytest.fail("not interrupted")
    err = capsys.readouterr().err
    assert "ep/s]" in err, err  # (the bar was shown)
    # as a terminal shows it: "\r" returns to the line's start, and the closed bar left its line blank
    *before, line = err.split("\n")[-2].split("\r")
    assert line == "manifoldgd-fast: interrupted" and not before[-1].strip(), repr(err)


@pytest.mark.parametrize("kw, why", [
    (dict(epochs=2.5), "--epochs 2.5: must be an integer >= 1"),
    (dict(epochs=True), "--epochs True: must be an integer >= 1"),
    (dict(batch_size="8"), "--batch-size '8': must be an integer >= 1"),
    (dict(size=7.5), "--size 7.5: must be an integer >= 1"),
    (dict(val_batch_size=float("nan")), "--val-batch-size nan: must be an integer >= 1"),
    (dict(lr="0.1"), "--lr '0.1': must be a number > 0"),
    (dict(distilled=None), "--distilled: expected a folder or a list of folders, got NoneType"),
    (dict(real_val=None), "--real-val: expected a path, got NoneType None"),
])
def test_evaluate_refuses_ill_typed_arguments_before_any_work(tmp_path, monkeypatch, kw, why):
    """evaluate() from Python: a float, a string or True where an integer goes failed mid-run as a TypeError
    (after the validation set had loaded), or trained 1 epoch for True (a Python API audit)."""
    monkeypatch.setattr(P, "load_images", lambda *a, **k: pytest.fail("images loaded"))
    args = {"distilled": str(tmp_path), "real_val": str(tmp_path), **kw}
    with pytest.raises(ConfigError, match="^" + re.escape(why)):
        P.evaluate(args.pop("distilled"), args.pop("real_val"), device="cpu", **args)


@pytest.mark.parametrize("kw, why", [
    (dict(k=2.5), "--k 2.5: must be an integer >= 1"),
    (dict(mmd_max_real=1.5), "--mmd-max-real 1.5: must be an integer >= 1"),
    (dict(encoder_epochs="3"), "--encoder-epochs '3': must be an integer >= 1"),
    (dict(cache_dir=3), "--cache-dir: expected a path, got int 3"),
    (dict(real=None), "--real: expected a path, got NoneType None"),
])
def test_compute_metrics_refuses_ill_typed_arguments_before_any_work(tmp_path, kw, why):
    """compute_metrics(k=2.5) failed in topk once the default encoder had trained (about 25 min on a CPU)."""
    from manifoldgd_fast.eval.metrics import compute_metrics

    args = {"distilled": str(tmp_path), "real": str(tmp_path), **kw}
    with pytest.raises(ConfigError, match="^" + re.escape(why)):
        compute_metrics(args.pop("distilled"), args.pop("real"), device="cpu", **args)
