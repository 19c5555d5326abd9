"""Distribution metrics against closed forms; compute_metrics and the metrics CLI end to end."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import MeanColour, make_image_folder, tv_resnet18_state_dict
from PIL import Image

from manifoldgd_fast.errors import ConfigError, DataError
from manifoldgd_fast.eval import cli_eval
from manifoldgd_fast.eval import metrics as M
from manifoldgd_fast.eval.nets import build_net, net_checkpoint

CLASSES = ["ant", "bee", "cat"]


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")  # see conftest


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --------------------------------------------------------------------------- FID
def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in [(500, 8), (20, 64), (3, 5)]:  # the last two: singular covariances
        x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + 2.0
        mu, cov = M.gaussian_stats(x)
        assert abs(M.fid(x, x)) < 1e-8 * max(1.0, np.trace(cov))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    # commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert np.isclose(M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expect, rtol=1e-10)
    # full covariances: the textbook formula with scipy's matrix square root
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert np.isclose(M.frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert np.isclose(M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0)
    with pytest.raises(ConfigError, match="mu"):
        M.frechet_distance(mu1, s1, mu2[:3], s2)


def test_fid_of_small_sets_against_the_exact_low_rank_formula():
    """n << D (10 images against 2,048 features, as at IPC 10): tr (S1 S2)^1/2 is the nuclear norm of
    A B^T / sqrt((n - 1)(m - 1)) for the centred sets A, B (exact, no square root of a singular matrix); the
    covariances divide by n - 1, as pytorch-fid and torchmetrics."""
    rng = np.random.default_rng(4)
    for n, m, d in [(10, 40, 256), (3, 25, 64), (30, 30, 128)]:
        x = np.abs(rng.normal(size=(n, d))) * rng.uniform(0.2, 2, size=d)  # non-negative, as pooled ReLUs
        y = np.abs(rng.normal(size=(m, d))) + 0.3
        a, b = x - x.mean(0), y - y.mean(0)
        tr = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
        expect = (((x.mean(0) - y.mean(0)) ** 2).sum() + (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1)
                  - 2 * tr)
        assert np.isclose(M.fid(x, y), expect, rtol=1e-7, atol=0), (n, m, d)  # scipy sqrtm: ~1e-6
    mu, cov = M.gaussian_stats(x)
    assert np.allclose(cov, a.T @ a / (n - 1), rtol=1e-12, atol=1e-14)


def test_fid_of_two_gaussian_samples_approaches_the_formula():
    rng = np.random.default_rng(2)
    d = 3
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 2.0])
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=40_000)
    y = rng.multivariate_normal(mu2, s2, size=40_000)
    assert np.isclose(M.fid(x, y), M.frechet_distance(mu1, s1, mu2, s2), rtol=0.03)


# --------------------------------------------------------------------------- MMD, L2, rep / div
def test_mmd_is_zero_for_identical_sets_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g)
    same = M.mmd_rbf(x, x.clone())
    assert same["mmd2"] == 0.0 and same["mmd"] == 0.0
    vals = [M.mmd_rbf(x, x + s, bandwidth=1.0)["mmd2"] for s in (0.1, 0.5, 2.0)]
    assert 0 < vals[0] < vals[1] < vals[2]


def test_mmd_closed_forms():
    # one point each: 1 + 1 - 2 exp(-d^2 / 2 s^2)
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert np.isclose(M.mmd_rbf(a, b, bandwidth=2.0)["mmd2"], 2 - 2 * np.exp(-25 / 8))
    # median heuristic: pooled {0, 1, 3} -> pairwise distances 1, 3, 2 -> sigma = 2
    r = M.mmd_rbf(torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0]]))
    assert np.isclose(r["bandwidth"], 2.0)
    k = lambda d: np.exp(-d ** 2 / 8)  # noqa: E731
    expect = (2 + 2 * k(1)) / 4 + 1 - 2 * (k(3) + k(2)) / 2
    assert np.isclose(r["mmd2"], expect)


def test_mmd_in_blocks_equals_the_full_kernel_matrices():
    """mmd_rbf sums its kernels in blocks (never an n x n matrix: 50,000 distilled images at ImageNet-1k IPC 50
    were 47 GiB); the value is the biased V-statistic of the full matrices, with exact distances."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(70, 9, generator=g), torch.randn(33, 9, generator=g) + 0.4
    full = lambda a, b, s: torch.exp(-torch.cdist(a.double(), b.double()) ** 2 / (2 * s * s)).mean()  # noqa: E731
    got = M.mmd_rbf(x, y, bandwidth=1.3)
    expect = full(x, x, 1.3) + full(y, y, 1.3) - 2 * full(x, y, 1.3)
    assert got["mmd2"] == pytest.approx(float(expect), rel=1e-12)
    for block in (7, 32, 4096):  # blocks that cut the sets unevenly, and one block
        s = M._kernel_sum(x.double(), y.double(), 0.3, drop_diagonal=False, block=block, sqdist=M._sqdist)
        assert s == pytest.approx(float(torch.exp(-0.3 * torch.cdist(x.double(), y.double()) ** 2).sum()), rel=1e-12)


def test_nearest_distance_representativeness_diversity():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    syn = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(M.nearest_distance(syn, real), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # cosine: syn0 ~ real0 (1), real2 (1/sqrt2), real1 (0)
    rep = M.representativeness(syn, real, k=2)
    assert torch.allclose(rep, torch.tensor([(1 + 2 ** -0.5) / 2, (1 + 2 ** -0.5) / 2], dtype=torch.float64))
    assert torch.allclose(M.representativeness(syn, real, k=50), torch.full((2,), (1 + 2 ** -0.5) / 3,
                                                                             dtype=torch.float64))
    # diversity: duplicates (even rescaled) -> 0, orthogonal -> 1, one image -> NaN
    dup = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    dup[2] *= 5
    assert torch.allclose(M.diversity(dup), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(M.diversity(torch.eye(3)), torch.ones(3, dtype=torch.float64))
    assert torch.isnan(M.diversity(torch.ones(1, 3))).all()


def test_trajectory_variance():
    rng = np.random.default_rng(3)
    traces = rng.normal(10, 2, size=(10, 50))
    per_step, final = M.trajectory_variance(torch.from_numpy(traces))
    assert per_step.shape == (50,) and np.allclose(per_step.numpy(), traces.var(0))
    assert final == pytest.approx(traces[:, -1].var())
    per_step1, final1 = M.trajectory_variance(traces.tolist(), correction=1)
    assert np.allclose(per_step1.numpy(), traces.var(0, ddof=1)) and final1 == pytest.approx(traces[:, -1].var(ddof=1))
    same, f0 = M.trajectory_variance(np.tile(np.arange(5.0), (4, 1)))
    assert f0 == 0.0 and (same == 0).all()
    x0 = torch.randn(4, 2, 3, 3)
    assert torch.allclose(M.latent_norms(x0), x0.flatten(1).norm(dim=1))
    for bad in (np.zeros(5), np.zeros((0, 3))):
        with pytest.raises(ConfigError, match="norm_traces"):
            M.trajectory_variance(bad)


# --------------------------------------------------------------------------- end to end
@pytest.fixture
def folders(tmp_path):
    real = make_image_folder(tmp_path / "real", CLASSES + ["dog"], 6, size=16, seed=2)
    dist = str(tmp_path / "out")
    for c in CLASSES:  # the distilled set: copies of 3 real images a class (+ one duplicate in 'ant')
        os.makedirs(os.path.join(dist, c))
        files = sorted(os.listdir(os.path.join(real, c)))[:3]
        for i, f in enumerate(files):
            shutil.copy(os.path.join(real, c, f), os.path.join(dist, c, f"{i}{os.path.splitext(f)[1]}"))
    shutil.copy(os.path.join(dist, "ant", "0.png"), os.path.join(dist, "ant", "3.png"))
    os.makedirs(os.path.join(dist, "modes"))
    with open(os.path.join(dist, "manifest.json"), "w") as f:
        json.dump({"tool": "manifoldgd-fast"}, f)
    return dist, real


def test_compute_metrics_with_a_user_encoder(folders):
    dist, real = folders
    enc = MeanColour().train().requires_grad_(True)
    enc.scale = torch.nn.Parameter(torch.ones(()))
    res = M.compute_metrics(dist, real, encoder=enc, size=8, device="cpu", k=2, progress=False)
    assert enc.training and enc.scale.requires_grad  # the caller's module is left as it was (a copy is used)
    assert res["classes"] == CLASSES and res["n_syn"] == 10 and res["n_real"] == 18 and res["feature_dim"] == 6
    assert res["l2"] == pytest.approx(0.0, abs=1e-6)  # every distilled image is a real one
    assert res["l2_real_to_syn"] > 0 and res["fid"] > 0 and res["mmd"] > 0
    assert 0 < res["representativeness"] <= 1 + 1e-9
    with open(os.path.join(dist, "metrics.json")) as f:
        assert json.load(f)["fid"] == res["fid"]
    with open(os.path.join(dist, "manifest.json")) as f:
        assert json.load(f)["metrics"][0]["fid"] == res["fid"]
    # the duplicate in 'ant' lowers its diversity
    os.remove(os.path.join(dist, "ant", "3.png"))
    no_dup = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False)
    assert res["per_class"]["ant"]["diversity"] < no_dup["per_class"]["ant"]["diversity"]
    assert res["per_class"]["bee"]["diversity"] == no_dup["per_class"]["bee"]["diversity"]
    # the real set against itself: FID and MMD vanish
    same = M.compute_metrics(real, real, encoder=MeanColour(), size=8, device="cpu", progress=False,
                             out_json=os.path.join(os.path.dirname(dist), "self.json"))
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["mmd2"] == 0.0 and same["l2"] == 0.0


def test_per_class_metrics_compare_a_class_with_its_own_images(tmp_path, caplog):
    """l2, representativeness and diversity of a class are taken against that class's real images and among its
    own distilled ones: ant's blue image lies on top of a bee (real and distilled) but far from every ant."""
    real = {"ant": [(200, 10, 10), (180, 30, 10), (190, 20, 40)], "bee": [(10, 10, 200), (20, 30, 180), (30, 10, 190)]}
    dist = {"ant": [(200, 10, 10), (12, 12, 198)], "bee": [(12, 12, 198), (20, 30, 180)]}
    for root, sets in (("real", real), ("out", dist)):
        for name, cols in sets.items():
            os.makedirs(tmp_path / root / name)
            for i, c in enumerate(cols):
                Image.new("RGB", (8, 8), c).save(tmp_path / root / name / f"{i}.png")
    d, r, enc, cpu = str(tmp_path / "out"), str(tmp_path / "real"), MeanColour(), torch.device("cpu")
    res = M.compute_metrics(d, r, encoder=enc, size=8, device="cpu", k=2, progress=False)
    _, dl, rl = M.match_classes(d, r, exact=False, what="real")
    fs, ys = M.extract_features(enc, dl, 8, cpu)
    fr, yr = M.extract_features(enc, rl, 8, cpu)
    for c, name in enumerate(["ant", "bee"]):
        mine, theirs, got = fs[ys == c], fr[yr == c], res["per_class"][name]
        assert got["l2"] == pytest.approx(float(M.nearest_distance(mine, theirs).mean()), rel=1e-9)
        assert got["representativeness"] == pytest.approx(float(M.representativeness(mine, theirs, 2).mean()),
                                                          rel=1e-9)
        assert got["diversity"] == pytest.approx(float(M.diversity(mine).mean()), rel=1e-9)
    ant = res["per_class"]["ant"]
    assert ant["l2"] > 10 * float(M.nearest_distance(fs[ys == 0], fr).mean())  # all classes' reals: near 0
    assert ant["diversity"] > 0.5 and ant["representativeness"] < 0.9          # vs a bee twin: 0 and ~1
    assert ant["representativeness_k"] == 2 and res["representativeness_k_min"] == 2
    # --k above a class's real images: its value averages all of them, recorded and warned about
    with caplog.at_level("WARNING", logger="manifoldgd_fast.eval.metrics"):
        five = M.compute_metrics(d, r, encoder=enc, size=8, device="cpu", k=5, progress=False,
                                 out_json=str(tmp_path / "k5.json"))
    assert five["representativeness_k"] == 5 and five["representativeness_k_min"] == 3
    assert five["per_class"]["ant"]["representativeness_k"] == 3
    assert "class ant has 3 real images, fewer than --k 5" in caplog.text and "1 more class" in caplog.text


def test_default_encoder_is_trained_once_and_cached(folders, tmp_path):
    dist, real = folders
    kw = dict(size=8, device="cpu", encoder_epochs=1, cache_dir=str(tmp_path / "cache"), progress=False)
    first = M.compute_metrics(dist, real, **kw)
    assert first["encoder"]["cached"] is False and os.path.isfile(first["encoder"]["cache"])
    assert first["feature_dim"] == 512
    again = M.compute_metrics(dist, real, **kw)
    assert again["encoder"]["cached"] is True and again["fid"] == first["fid"] and again["l2"] == first["l2"]
    # the real images rewritten under the same names: another encoder (it kept the old one, silently)
    for name in sorted(os.listdir(os.path.join(real, "ant"))):
        path = os.path.join(real, "ant", name)
        st = os.stat(path)
        shutil.copy(os.path.join(real, "bee", name), path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    changed = M.compute_metrics(dist, real, **kw)
    assert changed["encoder"]["cached"] is False and changed["encoder"]["cache"] != first["encoder"]["cache"]


@pytest.mark.parametrize("fid_encoder", ["fid-inception", "missing.pth"])
def test_a_missing_fid_encoder_is_named_before_the_default_encoder_trains(folders, tmp_path, monkeypatch, fid_encoder):
    """`metrics --fid-encoder fid-inception` without the Inception's file: the one-line error came only after the
    default encoder's training (30 epochs: half an hour on the digits) and the feature passes; now at once."""
    dist, real = folders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def must_not_train(*a, **k):
        raise AssertionError("the default encoder was trained before --fid-encoder was checked")

    monkeypatch.setattr(M, "default_encoder", must_not_train)
    with pytest.raises(ConfigError, match="--fid-encoder") as e:
        M.compute_metrics(dist, real, fid_encoder=str(tmp_path / fid_encoder) if fid_encoder.endswith(".pth")
                          else fid_encoder, size=8, device="cpu", progress=False)
    assert "\n" not in str(e.value) and not os.path.exists(os.path.join(dist, "metrics.json"))


def test_metrics_class_mismatch(folders, tmp_path):
    dist, real = folders
    os.makedirs(os.path.join(dist, "eel"))
    shutil.copy(os.path.join(dist, "ant", "0.png"), os.path.join(dist, "eel", "0.png"))
    with pytest.raises(DataError) as e:
        M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", progress=False)
    assert "not in the real set: eel" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("side", ["distilled", "real"])
def test_a_class_without_one_readable_image_is_named(folders, side):
    """Every image of a class unreadable on one side: a one-line DataError naming the class and the folder,
    not a crash in a nearest-neighbour reduction over nothing."""
    dist, real = folders
    folder = dist if side == "distilled" else real
    for f in os.listdir(os.path.join(folder, "bee")):
        with open(os.path.join(folder, "bee", f), "wb") as fh:
            fh.write(b"not a png")
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(DataError) as e:
        M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False,
                          feature_cache=False)
    assert str(e.value) == f"class bee in {folder}: none of its {side} images could be read"


def test_capped_real_sets_are_a_seeded_random_subset_in_file_order(folders):
    """--max-real-per-class takes the same random subset every run, not the first files by name."""
    from manifoldgd_fast.data import scan_image_folder
    from manifoldgd_fast.eval.protocol import capped

    _, real = folders
    entries = scan_image_folder(real)
    picks = [capped(e, 3).files for e in entries]
    assert picks == [capped(e, 3).files for e in scan_image_folder(real)]        # the same subset every time
    for e, files in zip(entries, picks):
        assert len(files) == 3 and set(files) <= set(e.files) and files == sorted(files, key=e.files.index)
    assert any(files != e.files[:3] for e, files in zip(entries, picks))          # not the prefix
    assert capped(entries[0], 6) is entries[0] and capped(entries[0], None) is entries[0]
    res = M.compute_metrics(folders[0], real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False,
                            max_real_per_class=3, feature_cache=False)
    assert res["n_real"] == 9 and all(v["n_real"] == 3 for v in res["per_class"].values())


def test_cli_metrics_end_to_end(folders, tmp_path, capsys, monkeypatch):
    dist, real = folders
    torch.save(net_checkpoint(build_net("convnet6", 3, 8)), tmp_path / "enc.pt")
    p = argparse.ArgumentParser(prog="manifoldgd-fast")
    sub = p.add_subparsers(dest="command")
    cli_eval.add_metrics_args(sub.add_parser("metrics"))
    ns = p.parse_args(["metrics", "--distilled", dist, "--real", real, "--encoder", str(tmp_path / "enc.pt"),
                       "--size", "8", "--device", "cpu", "--no-progress", "--out-json", str(tmp_path / "m.json")])
    res = cli_eval.run_metrics_from_args(ns)
    out = capsys.readouterr().out
    assert out.startswith("FID ") and "m.json" in out and os.path.isfile(tmp_path / "m.json")
    assert "release's definitions: L2 of means " in out and "features of --encoder " in out
    assert res["feature_dim"] == 128 * 2 * 2 and res["encoder"]["kind"] == str(tmp_path / "enc.pt")
    assert ns.fid_resize is None and res["fid_resize"] == "crop"   # crop unless --fid-encoder fid-inception
    squash = cli_eval.run_metrics_from_args(p.parse_args(
        ["metrics", "--distilled", dist, "--real", real, "--encoder", str(tmp_path / "enc.pt"), "--size", "8",
         "--device", "cpu", "--no-progress", "--out-json", str(tmp_path / "s.json"), "--fid-resize", "squash"]))
    assert squash["fid_resize"] == "squash" and squash["fid"] != res["fid"] and squash["l2"] == res["l2"]
    with pytest.raises(ConfigError, match="--encoder"):
        cli_eval.run_metrics_from_args(p.parse_args(["metrics", "--distilled", dist, "--real", real, "--encoder",
                                                     str(tmp_path / "none.pt"), "--no-progress"]))
    # no --real: the embedded demo's training folder when OUT is its output (as eval's --real-val), else refused
    with pytest.raises(ConfigError, match=rf"^--real is required: {dist} is not the embedded demo's output$"):
        cli_eval.run_metrics_from_args(p.parse_args(["metrics", "--distilled", dist]))
    assert p.parse_args(["metrics"]).distilled == "distilled"
    monkeypatch.chdir(tmp_path)   # no distilled/ here
    with pytest.raises(ConfigError, match=r"^--distilled: no folder 'distilled' here \(the default"):
        cli_eval.run_metrics_from_args(p.parse_args(["metrics"]))
    with open(os.path.join(dist, "manifest.json"), "w") as f:
        json.dump({"data": str(tmp_path / "gone"), "extra": {"demo": "digits", "real_val": "/nowhere/test"}}, f)
    with pytest.raises(ConfigError, match=r"^--real: the digits' training split .*gone.* is gone"):
        cli_eval.run_metrics_from_args(p.parse_args(["metrics", "--distilled", dist]))
    with open(os.path.join(dist, "manifest.json"), "w") as f:
        json.dump({"data": real, "extra": {"demo": "digits", "real_val": "/nowhere/test"}}, f)
    demo = cli_eval.run_metrics_from_args(p.parse_args(
        ["metrics", "--distilled", dist, "--encoder", str(tmp_path / "enc.pt"), "--size", "8", "--device", "cpu",
         "--no-progress", "--out-json", str(tmp_path / "d.json")]))
    assert demo["real"] == os.path.abspath(real) and demo["fid"] == res["fid"]


def test_metrics_with_the_imagenet_resnet18_from_the_hub_cache(folders, tmp_path, monkeypatch):
    """``--encoder imagenet-resnet18``: torchvision's weights from $TORCH_HOME, features at 224 px by default."""
    dist, real = folders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    p = argparse.ArgumentParser(prog="manifoldgd-fast")
    cli_eval.add_metrics_args(p.add_subparsers(dest="command").add_parser("metrics"))
    argv = ["metrics", "--distilled", dist, "--real", real, "--encoder", "imagenet-resnet18", "--device", "cpu",
            "--k", "2", "--no-progress", "--out-json", str(tmp_path / "m.json")]
    with pytest.raises(ConfigError, match="--encoder imagenet-resnet18: no weights at .*hub.checkpoints"):
        cli_eval.run_metrics_from_args(p.parse_args(argv))
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(tv_resnet18_state_dict(1000, seed=0), path)
    res = cli_eval.run_metrics_from_args(p.parse_args(argv))
    assert res["size"] == 224 and res["feature_dim"] == 512 and res["encoder"]["file"] == str(path)
    assert res["encoder"]["kind"] == "imagenet-resnet18" and res["l2"] is not None and res["fid"] >= 0


class Shared(types.SimpleNamespace):
    """What a probe encoder records: compute_metrics runs a copy of the module it is given (the caller's is left
    as it was), and that copy records into the original's."""

    def __deepcopy__(self, memo):
        return self


class CountingColour(MeanColour):
    """MeanColour that counts the images it encodes, with a tensor so that its fingerprint can change."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))
        self.tally = Shared(n=0)

    @property
    def seen(self) -> int:
        return self.tally.n

    @seen.setter
    def seen(self, n: int):
        self.tally.n = n

    def forward(self, x):
        self.tally.n += len(x)
        return super().forward(x) * self.scale


def test_real_features_are_cached_per_class_and_encoder(folders, private_cache):
    """A second run encodes only the distilled images and gives the same bytes; an edited class
    is re-encoded alone; another encoder or size gets its own cache; --no-feature-cache writes none."""
    dist, real = folders
    kw = dict(size=8, device="cpu", k=2, progress=False)
    enc = CountingColour()
    first = M.compute_metrics(dist, real, encoder=enc, **kw)
    n_dist, n_real = first["n_syn"], first["n_real"]
    n_dist += M.PROBE_IMAGES  # (and check_encoder's batch, run before the distilled images)
    assert enc.seen == n_dist + n_real and first["real_features"]["encoder"] == {"cached": 0, "computed": 3}
    assert first["real_features"]["cache"] == str(private_cache)
    enc.seen = 0
    again = M.compute_metrics(dist, real, encoder=enc, **kw)
    assert enc.seen == n_dist and again["real_features"]["encoder"] == {"cached": 3, "computed": 0}
    for key in ("fid", "mmd", "l2", "l2_real_to_syn", "representativeness", "diversity", "per_class"):
        assert again[key] == first[key], key

    victim = sorted(os.listdir(os.path.join(real, "bee")))[0]  # edit one real image of 'bee'
    Image.open(os.path.join(real, "bee", victim)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        os.path.join(real, "bee", victim))
    os.utime(os.path.join(real, "bee", victim), ns=(1, 1))
    enc.seen = 0
    edited = M.compute_metrics(dist, real, encoder=enc, **kw)
    assert edited["real_features"]["encoder"] == {"cached": 2, "computed": 1}
    assert enc.seen == n_dist + len(os.listdir(os.path.join(real, "bee")))

    other = CountingColour(scale=2.0)
    res = M.compute_metrics(dist, real, encoder=other, **kw)
    assert other.seen == n_dist + n_real and res["real_features"]["encoder"]["computed"] == 3
    res = M.compute_metrics(dist, real, encoder=enc, **dict(kw, size=12))
    assert res["real_features"]["encoder"]["computed"] == 3

    before = sorted(str(p) for p in private_cache.rglob("*.safetensors"))
    assert len(before) == 3 + 1 + 3 + 3
    res = M.compute_metrics(dist, real, encoder=CountingColour(scale=3.0), feature_cache=False, **kw)
    assert res["real_features"] == {"cache": None, "encoder": {"cached": 0, "computed": 3}}
    assert sorted(str(p) for p in private_cache.rglob("*.safetensors")) == before


def test_a_damaged_feature_file_is_recomputed(folders, private_cache):
    dist, real = folders
    kw = dict(encoder=MeanColour(), size=8, device="cpu", k=2, progress=False)
    first = M.compute_metrics(dist, real, **kw)
    for p in private_cache.rglob("*.safetensors"):
        p.write_bytes(b"truncated")
    again = M.compute_metrics(dist, real, **kw)
    assert again["real_features"]["encoder"] == {"cached": 0, "computed": 3} and again["fid"] == first["fid"]


# --------------------------------------------------------------------------- the release's definitions
# Direct numpy transcriptions of the released kl.py and representativeness_diversity.py.
def _np_sqdist(a, b):
    return (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2.0 * a @ b.T


def _np_gamma(z):
    d2 = _np_sqdist(z, z)
    vals = np.clip(d2[np.triu_indices(len(z), 1)], 1e-12, None)
    return 1.0 / (np.sort(vals)[(len(vals) - 1) // 2] + 1e-12)  # torch.median: the lower median


def _np_mmd_unbiased(x, y, gamma):
    k = lambda a, b: np.exp(-gamma * np.clip(_np_sqdist(a, b), 0, None))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    mmd2 = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())
    return max(mmd2, 0.0)


def _np_cos(a, b):
    a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-8)  # load_image_features
    b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-8)
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)  # sklearn
    return a @ b.T


@pytest.mark.parametrize("n,m,d,seed", [(7, 10, 5, 0), (2, 2, 3, 1), (13, 4, 9, 2)])
def test_release_metrics_match_a_numpy_transcription(n, m, d, seed):
    rng = np.random.default_rng(seed)
    s, r = rng.normal(size=(n, d)) + 0.5, rng.normal(size=(m, d)) * 1.5
    ts, tr = torch.from_numpy(s).float(), torch.from_numpy(r).float()
    s, r = ts.double().numpy(), tr.double().numpy()
    assert M.l2_between_means(ts, tr) == pytest.approx(np.linalg.norm(s.mean(0) - r.mean(0)), rel=1e-12)
    res = M.mmd_release(ts, tr)
    gamma = _np_gamma(np.concatenate([s, r]))
    mmd2 = _np_mmd_unbiased(s, r, gamma)
    assert res["gamma"] == pytest.approx(gamma, rel=1e-10) and res["n_x"] == n and res["n_y"] == m
    assert res["mmd2"] == pytest.approx(mmd2, rel=1e-9, abs=1e-15) and res["mmd"] == pytest.approx(mmd2 ** 0.5)
    cos = _np_cos(s, r)
    assert M.representativeness_minimax(ts, tr) == pytest.approx(cos.max(1).min(), rel=1e-9)
    css = _np_cos(s, s)
    np.fill_diagonal(css, -np.inf)
    assert M.diversity_minimax(ts) == pytest.approx(1 - css.max(), rel=1e-9, abs=1e-12)
    # blocks: the same maxima as the whole matrix
    assert torch.allclose(M._max_cosine(ts, tr, block=3), torch.from_numpy(cos.max(1)), atol=1e-12)
    assert torch.allclose(M._max_cosine(ts, ts, same=True, block=3), torch.from_numpy(css.max(1)), atol=1e-12)


def test_mmd_release_caps_both_sets_and_the_median_points_as_the_release():
    rng = np.random.default_rng(5)
    x, y = torch.from_numpy(rng.normal(size=(9, 4))), torch.from_numpy(rng.normal(size=(11, 4)) + 1)
    res = M.mmd_release(x, y, max_samples=6, median_samples=8, seed=3)
    g = torch.Generator().manual_seed(3)  # maybe_subsample(x), maybe_subsample(y), then _median_heuristic_gamma
    xs, ys = x[torch.randperm(9, generator=g)[:6]].numpy(), y[torch.randperm(11, generator=g)[:6]].numpy()
    z = np.concatenate([xs, ys])[torch.randperm(12, generator=g)[:8].numpy()]
    gamma = _np_gamma(z)
    assert res["n_x"] == res["n_y"] == 6 and res["gamma"] == pytest.approx(gamma, rel=1e-10)
    assert res["mmd2"] == pytest.approx(_np_mmd_unbiased(xs, ys, gamma), rel=1e-9)
    # the lower median, not numpy's mean of the two middle values, sets gamma
    d2 = _np_sqdist(z, z)[np.triu_indices(8, 1)]
    assert len(d2) % 2 == 0 and not np.isclose(res["gamma"], 1 / (np.median(d2) + 1e-12))
    with pytest.raises(ConfigError, match="mmd_release: needs at least 2 points"):
        M.mmd_release(x[:1], y)
    assert M.diversity_minimax(x[:1]) is None


def test_compute_metrics_reports_the_release_variants_and_their_sources(folders):
    dist, real = folders
    res = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False)
    from manifoldgd_fast.eval.protocol import match_classes

    _, d, r = match_classes(dist, real, exact=False, what="real")
    cpu = torch.device("cpu")
    fs, fr = M.extract_features(MeanColour(), d, 8, cpu)[0], M.extract_features(MeanColour(), r, 8, cpu)[0]
    s, rr = fs.double().numpy(), fr.double().numpy()
    assert res["l2_means"] == pytest.approx(np.linalg.norm(s.mean(0) - rr.mean(0)), rel=1e-9)
    gamma = _np_gamma(np.concatenate([s, rr]))
    assert res["mmd2_release"] == pytest.approx(_np_mmd_unbiased(s, rr, gamma), rel=1e-8, abs=1e-14)
    assert res["mmd_release_n"] == [10, 18]
    # every distilled image is a real one: each has a real twin (cos 1); the 'ant' duplicate has a twin too
    assert res["representativeness_minimax"] == pytest.approx(1.0) and res["diversity_minimax"] == pytest.approx(0.0)
    for key in ("fid", "l2", "mmd", "representativeness", "diversity", "l2_means", "mmd_release",
                "representativeness_minimax", "diversity_minimax"):
        assert res["metric_sources"][key].startswith("features of --encoder module MeanColour; short side to 8"), key
        assert key in res["definitions"]
    assert res["definitions"]["mmd_release"].startswith("release kl.py")
    with open(os.path.join(dist, "manifest.json")) as f:
        assert json.load(f)["metrics"][-1]["mmd_release"] == res["mmd_release"]


def test_the_default_encoder_is_labelled_as_such(folders, tmp_path):
    dist, real = folders
    res = M.compute_metrics(dist, real, size=8, device="cpu", encoder_epochs=1, cache_dir=str(tmp_path / "c"),
                            progress=False)
    assert "not the papers' ImageNet-pretrained ResNet-18" in res["encoder"]["note"]
    assert res["metric_sources"]["l2"].startswith("features of resnet18 trained on the real folder (the default encoder, not")


def test_a_tilde_in_metrics_cache_dir_is_the_home_folder(folders, tmp_path, monkeypatch):
    """metrics --cache-dir=~/c (no shell expands a ~ after '='; a config file's neither) trained the default
    encoder into ./~/c/encoders of the working folder, a cache per folder it ran in, as the latent cache did."""
    dist, real = folders
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    res = M.compute_metrics(dist, real, size=8, device="cpu", encoder_epochs=1, cache_dir="~/c", progress=False)
    assert res["encoder"]["cache"].startswith(str(tmp_path / "home" / "c" / "encoders" / ""))
    assert os.path.isdir(tmp_path / "home" / "c" / "features") and not os.path.exists(tmp_path / "~")


# --------------------------------------------------------------------------- FID preprocessing
class Uint8Probe(torch.nn.Module):
    """An encoder with FID Inception's uint8 entry: features (u - 128) / 128 averaged per channel."""

    input_size = 8

    def __init__(self):
        super().__init__()
        self.seen = Shared(dtypes=set(), sizes=set())

    def forward_features_uint8(self, u):
        self.seen.dtypes.add(u.dtype)
        self.seen.sizes.add(tuple(u.shape[-2:]))
        return ((u.double() - 128) / 128).mean(dim=(2, 3))

    def forward(self, x):
        raise AssertionError("squash must use forward_features_uint8")


def test_fid_squash_resizes_whole_images_bilinearly(tmp_path):
    """--fid-resize squash: the whole (non-square) image to S x S with PIL's bilinear filter."""
    rng = np.random.default_rng(6)
    real, dist = tmp_path / "real", tmp_path / "out"
    ims = {}
    for root, n in ((real, 4), (dist, 2)):
        for c in ("ant", "bee"):
            os.makedirs(root / c)
            for i in range(n):
                im = Image.fromarray(rng.integers(0, 256, (13, 21, 3), dtype=np.uint8))
                im.save(root / c / f"{i}.png")
                ims[str(root / c / f"{i}.png")] = im
    path = str(dist / "ant" / "0.png")
    by_hand = torch.from_numpy(np.array(ims[path].resize((8, 8), resample=Image.BILINEAR))).permute(2, 0, 1)
    assert torch.equal(M.load_squashed(path, 8), by_hand)

    from manifoldgd_fast.eval.augment import normalize, to_unit

    def hand_features(root):
        files = sorted(str(p) for p in root.rglob("*.png"))
        u = torch.stack([torch.from_numpy(np.array(ims[f].resize((8, 8), resample=Image.BILINEAR))).permute(2, 0, 1)
                         for f in files])
        return MeanColour()(normalize(to_unit(u)))

    def hand_features_u8(root):
        files = sorted(str(p) for p in root.rglob("*.png"))
        return torch.stack([torch.from_numpy(np.array(ims[f].resize((8, 8), resample=Image.BILINEAR))).permute(
            2, 0, 1).double().mean(dim=(1, 2)) for f in files])

    kw = dict(encoder=MeanColour(), size=8, device="cpu", k=2, progress=False, out_json=str(tmp_path / "m.json"))
    crop = M.compute_metrics(str(dist), str(real), **kw)
    squash = M.compute_metrics(str(dist), str(real), fid_resize="squash", **kw)
    assert squash["fid"] == pytest.approx(M.fid(hand_features(real), hand_features(dist)), rel=1e-5)
    assert squash["fid"] != pytest.approx(crop["fid"], rel=1e-3) and squash["l2"] == crop["l2"]
    assert crop["fid_resize"] == "crop" and crop["fid_encoder"] is None
    assert squash["fid_encoder"]["resize"] == "squash" and "whole image to 8x8" in squash["metric_sources"]["fid"]
    # squashed real features are cached apart from the cropped ones
    assert squash["real_features"]["fid_encoder"] == {"cached": 0, "computed": 2}
    again = M.compute_metrics(str(dist), str(real), fid_resize="squash", **kw)
    assert again["real_features"]["fid_encoder"] == {"cached": 2, "computed": 0} and again["fid"] == squash["fid"]
    # an encoder that takes uint8 pixels (FID's Inception) gets the squashed uint8 images themselves
    probe = Uint8Probe()
    res = M.compute_metrics(str(dist), str(real), fid_encoder=probe, fid_resize="squash", **kw)
    assert probe.seen.dtypes == {torch.uint8} and probe.seen.sizes == {(8, 8)}
    scaled = lambda f: (f - 128) / 128  # noqa: E731 - (u - 128) / 128 of the features' uint8 means
    assert res["fid"] == pytest.approx(M.fid(scaled(hand_features_u8(real)), scaled(hand_features_u8(dist))),
                                       rel=1e-5)
    assert res["metric_sources"]["fid"] == ("features of --fid-encoder module Uint8Probe; whole image to 8x8 (PIL "
                                            "bilinear, torchvision's Resize((8, 8))); pixels u -> (u - 128) / 128 "
                                            "(torchmetrics' FID)")
    with pytest.raises(ConfigError, match="--fid-resize stretch: must be one of crop, squash"):
        M.compute_metrics(str(dist), str(real), fid_resize="stretch", **kw)


# --------------------------------------------------------------------------- edge cases
def test_fid_needs_two_images_a_side():
    """One image has no covariance (ddof 1 divides by 0): refused, not a NaN FID."""
    one, many = np.ones((1, 4)), np.random.default_rng(0).normal(size=(5, 4))
    with pytest.raises(ConfigError, match=r"N >= 2 for FID, got \(1, 4\)"):
        M.gaussian_stats(one)
    with pytest.raises(ConfigError, match="N >= 2"):
        M.fid(many, one)


def test_mmd_of_sets_of_one_repeated_point_has_a_unit_bandwidth():
    """Every pooled distance 0 (the median heuristic's sigma would be 0, the kernel NaN): sigma falls back to 1."""
    x = torch.full((4, 3), 2.5)
    r = M.mmd_rbf(x, x.clone())
    assert r["bandwidth"] == 1.0 and r["mmd2"] == 0.0
    # 5 copies of one point and 2 of another: 11 of the 21 pairs at distance 0, so the median is 0 too
    y = torch.zeros(2, 3)
    r = M.mmd_rbf(torch.cat([x, x[:1]]), y)
    assert r["bandwidth"] == 1.0
    k = np.exp(-3 * 2.5 ** 2 / 2)
    assert r["mmd2"] == pytest.approx(1 + 1 - 2 * k, rel=1e-12)


def test_kernel_sum_drops_only_the_diagonal_in_blocks():
    """drop_diagonal removes k(x_i, x_i) once per point: in the diagonal blocks only, whatever the block size."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    k = torch.exp(-0.2 * torch.cdist(x, x) ** 2)
    expect = float(k.sum() - k.diagonal().sum())
    for block in (3, 4, 10, 2048):
        got = M._kernel_sum(x, x, 0.2, drop_diagonal=True, block=block, sqdist=M._sqdist)
        assert got == pytest.approx(expect, rel=1e-12), block


def test_kernel_sum_clamps_squared_distances_below_zero():
    """kl.py's expansion ||a||^2 + ||b||^2 - 2 a.b rounds below 0 for near points of large norm; the kernel takes
    max(d^2, 0), so no value exceeds 1."""
    a, b = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    below = lambda p, q: torch.full((len(p), len(q)), -0.5, dtype=torch.float64)  # noqa: E731
    assert M._kernel_sum(a, b, 4.0, drop_diagonal=False, sqdist=below) == 15.0


def test_mmd_release_gamma_clamps_zero_distances_as_the_release():
    """Most pooled pairs duplicates: the (lower) median squared distance is 0, clamped to 1e-12, so
    gamma = 1 / (1e-12 + 1e-12) as kl.py's _median_heuristic_gamma."""
    x = torch.ones(6, 3, dtype=torch.float64)
    y = torch.tensor([[0.0, 0, 0], [0.0, 2, 0]], dtype=torch.float64)
    res = M.mmd_release(x, y)
    assert res["gamma"] == pytest.approx(1.0 / 2e-12, rel=1e-12)


def test_trajectory_variance_refuses_too_few_samples_for_the_correction():
    """The unbiased variance of one sample divides by 0 (NaN): refused; the population variance of one is 0."""
    one = np.array([[3.0, 4.0, 5.0]])
    with pytest.raises(ConfigError, match=r"n_samples > 1, got \(1, 3\)"):
        M.trajectory_variance(one, correction=1)
    per_step, final = M.trajectory_variance(one, correction=0)
    assert final == 0.0 and (per_step == 0).all()


def test_metrics_of_a_one_image_class_an_unreadable_file_and_an_extra_real_class(tmp_path, caplog):
    """A class of one distilled image has no diversity (None), and the pooled diversity averages the images that
    have one (not NaN); an unreadable distilled image is left out of its class's count and labels; a real class
    that sorts first but was not distilled shifts no label; --k equal to a class's real images warns of nothing."""
    real = make_image_folder(tmp_path / "real", ["aardvark", "ant", "bee"], 4, size=8, seed=3)
    dist = tmp_path / "out"
    for name, n in (("ant", 1), ("bee", 2)):
        os.makedirs(dist / name)
        for i, f in enumerate(sorted(os.listdir(os.path.join(real, name)))[:n]):
            shutil.copy(os.path.join(real, name, f), dist / name / f"{i}{os.path.splitext(f)[1]}")
    (dist / "bee" / "2.png").write_bytes(b"not a png")
    with caplog.at_level("WARNING", logger="manifoldgd_fast.eval.metrics"), \
            pytest.warns(UserWarning, match="unreadable"):
        res = M.compute_metrics(str(dist), real, encoder=MeanColour(), size=8, device="cpu", k=4, progress=False,
                                feature_cache=False)
    assert res["n_syn"] == 3 and res["per_class"]["bee"]["n_syn"] == 2 and res["per_class"]["ant"]["n_syn"] == 1
    assert res["l2"] == pytest.approx(0.0, abs=1e-6) and res["per_class"]["ant"]["l2"] == pytest.approx(0.0, abs=1e-6)
    assert res["per_class"]["ant"]["diversity"] is None
    bee = res["per_class"]["bee"]["diversity"]
    assert bee is not None and bee > 0 and res["diversity"] == pytest.approx(bee, rel=1e-12)
    assert res["representativeness_k_min"] == 4 and "fewer than --k" not in caplog.text


def test_feature_cache_key_follows_each_files_modification_time(tmp_path):
    """An image rewritten in place with the same byte size (a same-size edit) is found by its mtime: its class's
    cache file is another one; touching nothing keeps the key."""
    from manifoldgd_fast.data import scan_image_folder

    real = make_image_folder(tmp_path / "real", ["ant"], 3, size=8)
    cache = M.FeatureCache(str(tmp_path / "c"), MeanColour(), 8, "fp32", torch.device("cpu"))
    entry = scan_image_folder(real)[0]
    before = cache.path(entry)
    assert cache.path(scan_image_folder(real)[0]) == before
    st = os.stat(entry.files[1])
    os.utime(entry.files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert os.stat(entry.files[1]).st_size == st.st_size and cache.path(scan_image_folder(real)[0]) != before


def test_the_mmd_takes_a_seeded_subset_of_at_most_mmd_max_real_real_points(folders):
    """--mmd-max-real below the real set's size: the MMD is that of a seeded random subset of that many real
    features against every distilled one (--mmd-max-real was never exercised)."""
    dist, real = folders
    res = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False,
                            mmd_max_real=17)
    _, d, r = M.match_classes(dist, real, exact=False, what="real")
    cpu = torch.device("cpu")
    fs, fr = M.extract_features(MeanColour(), d, 8, cpu)[0], M.extract_features(MeanColour(), r, 8, cpu)[0]
    assert len(fr) == 18 and res["mmd_n_real"] == 17
    sub = fr[torch.randperm(18, generator=torch.Generator().manual_seed(0))[:17]]
    assert res["mmd2"] == pytest.approx(M.mmd_rbf(sub, fs)["mmd2"], rel=1e-9)
    assert res["mmd2"] != pytest.approx(M.mmd_rbf(fr, fs)["mmd2"], rel=1e-6)


def test_a_distilled_set_of_one_image_is_named(folders, tmp_path):
    """One distilled image in all: a one-line DataError naming the folder and the side (the FID's covariance
    needs two), not gaussian_stats' error about an (N, D) array."""
    _, real = folders
    one = tmp_path / "one"
    os.makedirs(one / "ant")
    shutil.copy(os.path.join(real, "ant", sorted(os.listdir(os.path.join(real, "ant")))[0]), one / "ant" / "0.png")
    with pytest.raises(DataError) as e:
        M.compute_metrics(str(one), real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False)
    assert str(e.value) == f"{one}: the FID needs at least 2 readable distilled images, found 1"


class _NaNWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        torch.nn.init.constant_(self.fc.weight, float("nan"))

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


class _Scalar(torch.nn.Module):
    def forward(self, x):
        return x.mean()


class _NotPerImage(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=0).flatten(1)  # (3, S * S): a batch mean, not one row an image


@pytest.mark.parametrize("bad, says", [
    (torch.nn.Linear(3, 2), r"fails on a \(2, 3, 8, 8\) batch at 8 px: RuntimeError: mat1 and mat2 shapes cannot"),
    (_Scalar(), r"gives outputs of shape \(\) on a \(2, 3, 8, 8\) batch at 8 px, expected a \(B, F\) feature matrix"),
    (_NotPerImage(), r"gives outputs of shape \(3, 64\) on a \(2, 3, 8, 8\) batch at 8 px, expected a \(B, F\)"),
    (_NaNWeights(), r"gives non-finite features \(NaN or inf\) on a \(2, 3, 8, 8\) batch at 8 px$")])
@pytest.mark.parametrize("how", ["file", "module", "fid-file"])
def test_an_encoder_that_does_not_fit_is_one_line_before_any_work(folders, tmp_path, monkeypatch, bad, says, how):
    """`metrics --encoder` / `--fid-encoder` with a module that does not fit (a pickled nn.Linear(3, 2), a 1-D
    output, NaN weights) was a traceback from _encode ('mat1 and mat2 shapes cannot be multiplied', 'Dimension
    out of range') or from the FID's SVD (LinAlgError), after the default encoder's training and the feature
    passes; it is one line naming the flag, before either."""
    dist, real = folders
    path = str(tmp_path / "enc.pt")
    torch.save(bad, path)

    def must_not_run(*a, **k):
        raise AssertionError("work started before the encoder was checked")

    monkeypatch.setattr(M, "default_encoder", must_not_run)
    monkeypatch.setattr(M, "extract_features", must_not_run)
    kw = {"file": {"encoder": path}, "module": {"encoder": bad}, "fid-file": {"fid_encoder": path}}[how]
    flag = {"file": f"--encoder {path}", "module": f"--encoder {type(bad).__name__}",
            "fid-file": f"--fid-encoder {path}"}[how]
    with pytest.raises(ConfigError, match=says) as e:
        M.compute_metrics(dist, real, size=8, device="cpu", progress=False, **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{flag}: ")
    assert not os.path.exists(os.path.join(dist, "metrics.json"))


def test_the_cli_names_an_encoder_that_does_not_fit_in_one_line(folders, tmp_path, capsys):
    from manifoldgd_fast.cli import main

    dist, real = folders
    torch.save(torch.nn.Linear(3, 2), tmp_path / "enc.pt")
    assert main(["metrics", "--distilled", dist, "--real", real, "--encoder", str(tmp_path / "enc.pt"), "--size", "8",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"manifoldgd-fast: error: --encoder {tmp_path / 'enc.pt'}: fails on a "
                                               "(2, 3, 8, 8) batch at 8 px: RuntimeError: mat1 and mat2"), err


class _DarkNaN(torch.nn.Module):
    """NaN features for images darker than ``below`` on average (the check's random batch is not)."""

    def __init__(self, below):
        super().__init__()
        self.below = below

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return torch.where(m < self.below, torch.full_like(m, float("nan")), m).flatten(1).expand(-1, 3)


def test_non_finite_features_name_the_encoder_and_are_never_cached(folders, private_cache):
    """An encoder giving NaN for some images only: one line naming it and the class (it was a LinAlgError from
    the FID's SVD), and no cache file of NaN features left behind."""
    dist, real = folders
    bee = Image.new("RGB", (16, 16), (0, 0, 0))
    for name in os.listdir(os.path.join(real, "bee")):   # bee's real images dark: their features NaN
        bee.save(os.path.join(real, "bee", name))
    with pytest.raises(ConfigError) as e:
        M.compute_metrics(dist, real, encoder=_DarkNaN(-1.5), size=8, device="cpu", progress=False)
    n = len(os.listdir(os.path.join(real, "bee")))
    assert str(e.value) == (f"--encoder _DarkNaN: gives non-finite features (NaN or inf) for {n} of the {n} images "
                            f"of class bee ({os.path.join(real, 'bee')})")
    from safetensors.torch import load_file

    stored = list(private_cache.rglob("*.safetensors"))   # (ant's, before bee's: never bee's)
    assert len(stored) < 3 and all(torch.isfinite(load_file(str(p))["features"]).all() for p in stored)
    with pytest.raises(ConfigError, match="^the default encoder x.pt: gives non-finite features"):
        M.extract_features(_DarkNaN(-1.5), M.match_classes(dist, real, exact=False, what="real")[2], 8,
                           torch.device("cpu"), what="the default encoder x.pt")


@pytest.mark.parametrize("how", ["flag", "env", "under a file"])
def test_a_cache_dir_that_is_a_file_is_refused_before_the_encoder_trains(folders, tmp_path, monkeypatch, how):
    """`metrics --cache-dir afile` (or $MANIFOLDGD_CACHE a file) trained the whole default encoder, then failed
    with 'afile/encoders: Not a directory'; it is one line naming the flag (or the variable), at once."""
    dist, real = folders
    afile = tmp_path / "afile"
    afile.write_text("x")

    def must_not_train(*a, **k):
        raise AssertionError("the default encoder was trained before the cache folder was checked")

    monkeypatch.setattr(M, "default_encoder", must_not_train)
    cache_dir = {"flag": str(afile), "env": None, "under a file": str(afile / "sub")}[how]
    if how == "env":
        monkeypatch.setenv("MANIFOLDGD_CACHE", str(afile))
    with pytest.raises(ConfigError) as e:
        M.compute_metrics(dist, real, size=8, device="cpu", progress=False, cache_dir=cache_dir)
    assert str(e.value) == {"flag": f"--cache-dir {afile}: exists and is not a folder",
                            "env": f"$MANIFOLDGD_CACHE {afile}: exists and is not a folder",
                            "under a file": f"--cache-dir {afile / 'sub'}: {afile} is a file, not a folder"}[how]
    os.remove(afile)
    os.makedirs(afile / "features")
    (afile / "encoders").write_text("x")   # the encoders' folder a file: named too
    with pytest.raises(ConfigError, match=f"^--cache-dir {afile / 'encoders'}: exists and is not a folder$"):
        M.compute_metrics(dist, real, size=8, device="cpu", progress=False, cache_dir=str(afile))
    # a given encoder with --no-feature-cache writes no cache: nothing to check
    res = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False,
                            cache_dir=str(afile / "encoders"), feature_cache=False)
    assert res["real_features"]["cache"] is None


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")  # (the user's file is made so)
def test_torchscript_encoders_get_their_own_feature_cache(folders, tmp_path, private_cache):
    """Every TorchScript module is a RecursiveScriptModule: two scripted encoders with the same tensors but
    other code shared one feature cache (the second read the first's features); their code keys it now."""
    dist, real = folders
    lin = torch.nn.Linear(3, 4)
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), lin)
    relu = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), lin, torch.nn.ReLU())
    for name, m in (("a.pt", pool), ("b.pt", relu)):
        torch.jit.save(torch.jit.script(m), tmp_path / name)
    kw = dict(size=8, device="cpu", k=2, progress=False, out_json=str(tmp_path / "m.json"))
    a = M.compute_metrics(dist, real, encoder=str(tmp_path / "a.pt"), **kw)
    b = M.compute_metrics(dist, real, encoder=str(tmp_path / "b.pt"), **kw)
    assert a["real_features"]["encoder"]["computed"] == 3
    assert b["real_features"]["encoder"] == {"cached": 0, "computed": 3}
    again = M.compute_metrics(dist, real, encoder=str(tmp_path / "b.pt"), **kw)
    assert again["real_features"]["encoder"] == {"cached": 3, "computed": 0} and again["fid"] == b["fid"]


def test_a_real_image_skipped_once_is_read_again_when_it_reads(tmp_path, monkeypatch):
    """The features cache keyed a class by its files' sizes and mtimes only: an image skipped as unreadable
    once (no permission, a disk away) stayed out of every later metrics run after a chmod. Its skips are
    recorded; one that reads now recomputes the class."""
    from manifoldgd_fast.data import scan_image_folder

    real = make_image_folder(tmp_path / "real", ["ant"], 3, size=8)
    entries = scan_image_folder(real)
    cpu, cache = torch.device("cpu"), str(tmp_path / "c")
    ok = M.read_image_uint8

    def denied(path, *a, **k):
        if os.path.basename(path).startswith("img001"):
            raise DataError(f"cannot read image {path}: [Errno 13] Permission denied")
        return ok(path, *a, **k)

    monkeypatch.setattr(M, "read_image_uint8", denied)
    stats = {}
    with pytest.warns(UserWarning, match="img001"):
        f, _ = M.extract_features(MeanColour(), entries, 8, cpu, cache_dir=cache, stats=stats)
    assert len(f) == 2 and stats == {"cached": 0, "computed": 1}
    f, _ = M.extract_features(MeanColour(), entries, 8, cpu, cache_dir=cache, stats=stats)
    assert len(f) == 2 and stats == {"cached": 1, "computed": 0}        # still unreadable: the cache is used
    monkeypatch.setattr(M, "read_image_uint8", ok)
    f, _ = M.extract_features(MeanColour(), entries, 8, cpu, cache_dir=cache, stats=stats)
    assert len(f) == 3 and stats == {"cached": 0, "computed": 1}
    f, _ = M.extract_features(MeanColour(), entries, 8, cpu, cache_dir=cache, stats=stats)
    assert len(f) == 3 and stats == {"cached": 1, "computed": 0}
