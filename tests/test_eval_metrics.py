"""Distribution metrics against closed forms; compute_metrics and the metrics CLI end to end."""
from __future__ import annotations

import argparse
import json
import os
import shutil

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
    res = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False)
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


def test_default_encoder_is_trained_once_and_cached(folders, tmp_path):
    dist, real = folders
    kw = dict(size=8, device="cpu", encoder_epochs=1, cache_dir=str(tmp_path / "cache"), progress=False)
    first = M.compute_metrics(dist, real, **kw)
    assert first["encoder"]["cached"] is False and os.path.isfile(first["encoder"]["cache"])
    assert first["feature_dim"] == 512
    again = M.compute_metrics(dist, real, **kw)
    assert again["encoder"]["cached"] is True and again["fid"] == first["fid"] and again["l2"] == first["l2"]


def test_metrics_class_mismatch(folders, tmp_path):
    dist, real = folders
    os.makedirs(os.path.join(dist, "eel"))
    shutil.copy(os.path.join(dist, "ant", "0.png"), os.path.join(dist, "eel", "0.png"))
    with pytest.raises(DataError) as e:
        M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", progress=False)
    assert "not in the real set: eel" in str(e.value) and "\n" not in str(e.value)


def test_cli_metrics_end_to_end(folders, tmp_path, capsys):
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
    assert res["feature_dim"] == 128 * 2 * 2 and res["encoder"]["kind"] == str(tmp_path / "enc.pt")
    with pytest.raises(ConfigError, match="--encoder"):
        cli_eval.run_metrics_from_args(p.parse_args(["metrics", "--distilled", dist, "--real", real, "--encoder",
                                                     str(tmp_path / "none.pt"), "--no-progress"]))


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


class CountingColour(MeanColour):
    """MeanColour that counts the images it encodes, with a tensor so that its fingerprint can change."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x) * self.scale


def test_real_features_are_cached_per_class_and_encoder(folders, private_cache):
    """A second run encodes only the distilled images and gives the same bytes; an edited class
    is re-encoded alone; another encoder or size gets its own cache; --no-feature-cache writes none."""
    dist, real = folders
    kw = dict(size=8, device="cpu", k=2, progress=False)
    enc = CountingColour()
    first = M.compute_metrics(dist, real, encoder=enc, **kw)
    n_dist, n_real = first["n_syn"], first["n_real"]
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
