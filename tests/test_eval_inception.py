"""FID's Inception-V3: size against torchvision's published count, map sizes, and a functional
forward written from pytorch-fid's description (pooling that skips the padding, the last block's
max pool, bilinear resize to 299 and [-1, 1] input); loading from torch.hub's cache; the metrics."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from manifoldgd_fast.errors import ConfigError
from manifoldgd_fast.eval import nets as N
from manifoldgd_fast.eval.augment import normalize
from manifoldgd_fast.eval.inception import FID_FILE, FIDInceptionV3, fid_inception_path

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")  # see conftest

# torchvision's Inception3 has 27,161,264 parameters; its AuxLogits head 3,326,696 of them
# (1x1 conv 768->128 + BN, 5x5 conv 128->768 + BN, fc 768->1000); FID's graph has no aux head
# and 1,008 logits instead of 1,000 (+ 2,048 x 8 + 8).
FID_INCEPTION_PARAMS = 27_161_264 - 3_326_696 + 2048 * 8 + 8


def _random_state_dict(seed: int) -> dict:
    """The net's tensors, He-initialised, with batch-norm statistics that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in FIDInceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("running_var"):
            sd[k] = 1.0 + torch.rand(v.shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            sd[k] = v
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g) + (1.0 if k.endswith("bn.weight") else 0.0)
    return sd


def _reference_features(sd: dict, u: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's pool3 features of [0, 1] images ``u``, written functionally."""
    def conv(name, x, stride=1, valid=False):
        w = sd[name + ".conv.weight"]
        pad = (0, 0) if valid else (w.shape[2] // 2, w.shape[3] // 2)
        x = F.conv2d(x, w, stride=stride, padding=pad)
        x = F.batch_norm(x, sd[name + ".bn.running_mean"], sd[name + ".bn.running_var"], sd[name + ".bn.weight"],
                         sd[name + ".bn.bias"], eps=1e-3)
        return F.relu(x)

    def chain(x, *names):
        for n in names:
            x = conv(n, x)
        return x

    def tf_avg(x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    x = F.interpolate(u, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    x = conv("Conv2d_1a_3x3", x, stride=2, valid=True)
    x = conv("Conv2d_2b_3x3", conv("Conv2d_2a_3x3", x, valid=True))
    x = F.max_pool2d(x, 3, 2)
    x = F.max_pool2d(conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x), valid=True), 3, 2)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        p = m + "."
        x = torch.cat([conv(p + "branch1x1", x), chain(x, p + "branch5x5_1", p + "branch5x5_2"),
                       chain(x, *(p + f"branch3x3dbl_{i}" for i in (1, 2, 3))), conv(p + "branch_pool", tf_avg(x))], 1)
    p = "Mixed_6a."
    x = torch.cat([conv(p + "branch3x3", x, stride=2, valid=True),
                   conv(p + "branch3x3dbl_3", chain(x, p + "branch3x3dbl_1", p + "branch3x3dbl_2"), 2, True),
                   F.max_pool2d(x, 3, 2)], 1)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        p = m + "."
        x = torch.cat([conv(p + "branch1x1", x), chain(x, *(p + f"branch7x7_{i}" for i in (1, 2, 3))),
                       chain(x, *(p + f"branch7x7dbl_{i}" for i in range(1, 6))),
                       conv(p + "branch_pool", tf_avg(x))], 1)
    p = "Mixed_7a."
    x = torch.cat([conv(p + "branch3x3_2", conv(p + "branch3x3_1", x), 2, True),
                   conv(p + "branch7x7x3_4", chain(x, *(p + f"branch7x7x3_{i}" for i in (1, 2, 3))), 2, True),
                   F.max_pool2d(x, 3, 2)], 1)
    for m, pool in (("Mixed_7b", tf_avg), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, 1, 1))):
        p = m + "."
        b3 = conv(p + "branch3x3_1", x)
        d = chain(x, p + "branch3x3dbl_1", p + "branch3x3dbl_2")
        x = torch.cat([conv(p + "branch1x1", x), conv(p + "branch3x3_2a", b3), conv(p + "branch3x3_2b", b3),
                       conv(p + "branch3x3dbl_3a", d), conv(p + "branch3x3dbl_3b", d),
                       conv(p + "branch_pool", pool(x))], 1)
    return x.mean(dim=(2, 3))


def test_size_and_maps_match_torchvisions_inception():
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMS
    x = torch.randn(1, 288, 35, 35)
    with torch.no_grad():
        assert net.Mixed_6a(x).shape == (1, 768, 17, 17)
        assert net.Mixed_7a(torch.randn(1, 768, 17, 17)).shape == (1, 1280, 8, 8)
        assert net.Mixed_7c(torch.randn(1, 2048, 8, 8)).shape == (1, 2048, 8, 8)


@pytest.mark.parametrize("side,seed", [(299, 0), (64, 1)])
def test_features_match_the_functional_forward(side, seed, tmp_path):
    sd = _random_state_dict(seed)
    u = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    ref = _reference_features(sd, u)
    torch.save(sd, tmp_path / FID_FILE)
    net = N.load_net(str(tmp_path / FID_FILE), what="--fid-encoder")
    assert isinstance(net, FIDInceptionV3) and not net.training
    with torch.no_grad():
        got = net.forward_features(normalize(u))  # our encoders' input: ImageNet-normalised
    assert ref.abs().mean() > 1e-2  # the features are not degenerate
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_uint8_input_is_scaled_as_torchmetrics():
    """--fid-resize squash: uint8 pixels u enter as (u - 128) / 128 (torchmetrics' FID), i.e. the
    functional forward of [0, 1] images u / 256 (its x * 2 - 1)."""
    sd = _random_state_dict(4)
    u = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    ref = _reference_features(sd, u.float() / 256)
    net = N.load_net(sd, what="--fid-encoder")
    with torch.no_grad():
        got = net.forward_features_uint8(u)
        pytorch_fid = net.forward_features(normalize(u.float() / 255))  # u / 127.5 - 1: another input
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (pytorch_fid - ref).abs().max() > 10 * (got - ref).abs().max()  # the scaling is told apart
    with pytest.raises(ValueError, match="uint8"):
        net.forward_features_uint8(u.float())


def test_fid_inception_comes_from_the_torch_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = fid_inception_path()
    assert path == str(tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(ConfigError, match=r"--fid-encoder fid-inception: no weights at .*pytorch-fid's"):
        N.load_net("fid-inception", what="--fid-encoder")
    os.makedirs(os.path.dirname(path))
    sd = _random_state_dict(2)
    torch.save(sd, path)
    assert isinstance(N.load_net("fid-inception"), FIDInceptionV3)
    bad = dict(sd, **{"Mixed_7c.branch1x1.conv.weight": torch.zeros(1, 2048, 1, 1)})
    with pytest.raises(ConfigError, match="--encoder: an Inception-V3 state dict that is not FID's"):
        N.load_net(bad, what="--encoder")


def test_metrics_take_their_fid_from_the_fid_encoder(tmp_path, monkeypatch):
    from conftest import MeanColour, make_image_folder

    from manifoldgd_fast.eval import metrics as M
    from manifoldgd_fast.eval.protocol import match_classes

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    os.makedirs(os.path.dirname(fid_inception_path()))
    torch.save(_random_state_dict(3), fid_inception_path())
    real = make_image_folder(tmp_path / "real", ["ant", "bee"], 3, size=16, seed=2)
    dist = make_image_folder(tmp_path / "out", ["ant", "bee"], 2, size=16, seed=5)

    # fid-inception alone is the papers' FID: the release's fid.py squashes (torchmetrics); crop when asked
    res = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False,
                            fid_encoder="fid-inception")
    assert res["fid_encoder"] == {"kind": "fid-inception", "size": 299, "file": fid_inception_path(),
                                  "resize": "squash"}
    assert res["encoder"] == {"kind": "module MeanColour"} and res["fid_resize"] == "squash"
    _, d, r = match_classes(dist, real, exact=False, what="real")
    enc, dev = N.load_net("fid-inception"), torch.device("cpu")
    for resize, got in (("squash", res), ("crop", M.compute_metrics(
            dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False, fid_encoder="fid-inception",
            fid_resize="crop"))):
        expected = M.fid(M.extract_features(enc, r, 299, dev, resize=resize)[0],
                         M.extract_features(enc, d, 299, dev, resize=resize)[0])
        assert got["fid"] == pytest.approx(expected, rel=1e-6) and got["fid_encoder"]["resize"] == resize
    plain = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False)
    assert plain["fid_encoder"] is None and plain["fid"] != res["fid"] and plain["l2"] == res["l2"]
    # the same weights named by their file are the same network: the same default images, the same FID
    by_file = M.compute_metrics(dist, real, encoder=MeanColour(), size=8, device="cpu", k=2, progress=False,
                                fid_encoder=fid_inception_path())
    assert by_file["fid_resize"] == "squash" and by_file["fid"] == res["fid"]
    # the Inception as --encoder (no --fid-encoder): the FID on that encoder's features, cropped as the others
    as_enc = M.compute_metrics(dist, real, encoder="fid-inception", device="cpu", k=2, progress=False,
                               out_json=str(tmp_path / "e.json"))
    assert as_enc["fid_encoder"] is None and as_enc["fid_resize"] == "crop" and as_enc["size"] == 299


def test_the_papers_encoders_compute_features_in_fp32(tmp_path, monkeypatch):
    """No bf16 autocast for FID's Inception or torchvision's ResNet-18 (ours keep it on CUDA)."""
    from conftest import make_image_folder, tv_resnet18_state_dict

    from manifoldgd_fast.data import scan_image_folder
    from manifoldgd_fast.eval import metrics as M

    entries = scan_image_folder(make_image_folder(tmp_path / "real", ["ant"], 1, size=8), label_map="sorted")
    used = []
    monkeypatch.setattr(M, "amp", lambda device: used.append(device) or torch.autocast("cpu", enabled=False))
    subset = N.load_net(tv_resnet18_state_dict(1000, 0), num_classes=1, class_names=["n01440764"])
    for enc, fp32 in ((FIDInceptionV3(), True), (N.load_net(tv_resnet18_state_dict(10, 0)), True),
                      (subset, True), (N.build_net("convnet6", 2, 8), False)):
        used.clear()
        M.extract_features(enc, entries, 8, torch.device("cpu"))
        assert (not used) == fp32, type(enc).__name__
