"""Evaluation nets: parameter counts against the published / IDC figures, shapes at every stem, loading."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import tv_resnet18_forward, tv_resnet18_state_dict

from manifoldgd_fast.errors import ConfigError
from manifoldgd_fast.eval import nets as N


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _conv(cin, cout, k, bias):
    return cin * cout * k * k + (cout if bias else 0)


def _convnet_count(depth, width, side, classes):
    """IDC ConvNet: conv3x3 (bias) + GroupNorm affine per layer, linear on width * side^2."""
    n = _conv(3, width, 3, True) + (depth - 1) * _conv(width, width, 3, True) + depth * 2 * width
    return n + width * side * side * classes + classes


def _resnet_count(blocks, classes, stem_k):
    """BasicBlock ResNet without conv biases, a norm (2C) after every conv, 1x1 downsample on channel change."""
    n = _conv(3, 64, stem_k, False) + 2 * 64
    c_in = 64
    for i, nb in enumerate(blocks):
        c = 64 * 2 ** i
        for b in range(nb):
            cin = c_in if b == 0 else c
            n += _conv(cin, c, 3, False) + _conv(c, c, 3, False) + 4 * c
            if cin != c:
                n += _conv(cin, c, 1, False) + 2 * c
        c_in = c
    return n + 512 * classes + classes


@pytest.mark.parametrize("name,classes,expected,published_m", [
    ("convnet6", 10, 754_570, 0.75),      # IDC ConvNet-6 at 224 px (final map 3x3)
    ("resnetap10", 10, 4_910_922, 4.9),   # IDC resnet_ap.py __main__ prints "4.9M" for 10 classes
    ("resnet18", 10, 11_181_642, 11.2),   # the ~11.2M ResNet-18 of the 10-class DD tables
    ("resnet18", 1000, 11_689_512, 11.7),  # torchvision resnet18: 11,689,512 (He et al. 11.7M)
])
def test_parameter_counts_at_224(name, classes, expected, published_m):
    net = N.build_net(name, classes, 224)
    count = N.count_parameters(net)
    assert count == expected
    assert round(count / 1e6, 1) == published_m or round(count / 1e6, 2) == published_m


def test_parameter_counts_match_closed_forms():
    assert N.count_parameters(N.build_net("convnet6", 10, 224)) == _convnet_count(6, 128, 3, 10)
    assert N.count_parameters(N.build_net("convnet6", 7, 32)) == _convnet_count(6, 128, 2, 7)
    assert N.count_parameters(N.build_net("resnetap10", 10, 224)) == _resnet_count((1, 1, 1, 1), 10, 7)
    assert N.count_parameters(N.build_net("resnet18", 1000, 224)) == _resnet_count((2, 2, 2, 2), 1000, 7)
    assert N.count_parameters(N.build_net("resnet18", 10, 32)) == _resnet_count((2, 2, 2, 2), 10, 3)


def test_stem_kind_thresholds():
    assert [N.stem_kind(s) for s in (8, 64, 65, 128, 129, 224)] == ["small", "small", "mid", "mid", "large", "large"]


def _norm_sides(net, x):
    sides = []
    hooks = [m.register_forward_hook(lambda m_, i, o: sides.append(o.shape[-1]))
             for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.no_grad():
        out = net(x)
    for h in hooks:
        h.remove()
    return out, sides


@pytest.mark.parametrize("name", N.NET_NAMES)
@pytest.mark.parametrize("size", [5, 8, 16, 32, 96, 136])
def test_forward_shapes_and_no_collapsed_maps(name, size):
    torch.manual_seed(0)
    net = N.build_net(name, 7, size).eval()
    x = torch.randn(3, 3, size, size)
    out, sides = _norm_sides(net, x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    assert net.forward_features(x).shape == (3, net.feature_dim)
    # instance norm of a 1x1 map is constant: every normalised map keeps >= 2 px
    assert min(sides) >= 2
    # the output depends on the input (a collapsed map would give identical rows)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_convnet_at_224_is_idc_layout():
    net = N.build_net("convnet6", 10, 224)
    assert net.feature_dim == 128 * 3 * 3
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in net.modules()) == 6
    assert all(m.num_groups == m.num_channels for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


@pytest.mark.parametrize("size", [64, 96, 112, 127, 128, 224, 256])
def test_convnet_pools_after_every_layer_where_idcs_does(size):
    """From 64 px, IDC's ConvNet-6 (the release's) halves the map in all six layers (64 to 127 px: a 1x1
    map into the classifier); below, where it would end at 0 px, ours stops halving at 2 px."""
    net = N.build_net("convnet6", 10, size)
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in net.modules()) == 6
    assert net.feature_dim == 128 * (size >> 6) ** 2
    assert N.count_parameters(net) == _convnet_count(6, 128, size >> 6, 10)


def test_resnetap_uses_average_pooling_not_strided_convs():
    net = N.build_net("resnetap10", 10, 224)
    assert all(m.stride == (1, 1) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    r18 = N.build_net("resnet18", 10, 224)
    assert any(m.stride == (2, 2) for m in r18.modules() if isinstance(m, torch.nn.Conv2d))


def test_parse_and_build_errors():
    assert N.parse_nets("convnet6, resnet18,convnet6") == ["convnet6", "resnet18"]
    assert N.parse_nets(("resnetap10",)) == ["resnetap10"]
    with pytest.raises(ConfigError, match="resnet50"):
        N.parse_nets("convnet6,resnet50")
    with pytest.raises(ConfigError, match="no net"):
        N.parse_nets(" , ")
    with pytest.raises(ConfigError, match="--size 1"):
        N.build_net("convnet6", 10, 1)


def test_checkpoint_and_state_dict_roundtrip(tmp_path):
    torch.manual_seed(1)
    net = N.build_net("resnetap10", 4, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "ck.pt"
    torch.save(N.net_checkpoint(net, note="x"), path)
    a = N.load_net(str(path))
    assert a.net_name == "resnetap10" and torch.allclose(a(x), net(x))
    # a bare state dict: the matching architecture is found
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    b = N.load_net(str(tmp_path / "sd.pt"), num_classes=4, size=16)
    assert b.net_name == "resnetap10" and torch.allclose(b(x), net(x))
    # a whole pickled module
    torch.save(net, tmp_path / "mod.pt")
    assert torch.allclose(N.load_net(str(tmp_path / "mod.pt"))(x), net(x))


def test_load_net_errors(tmp_path):
    with pytest.raises(ConfigError, match="--teacher .*nope.pt: no such file"):
        N.load_net(str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match=f"--teacher {tmp_path}: a folder, not a net's file"):   # was "no such file"
        N.load_net(str(tmp_path))
    torch.save(N.build_net("convnet6", 4, 16).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ConfigError, match="matches none"):
        N.load_net(str(tmp_path / "sd.pt"), num_classes=5, size=16)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="--encoder .*junk.pt: cannot load"):
        N.load_net(str(tmp_path / "junk.pt"), what="--encoder")


def test_a_net_checkpoint_that_does_not_load_is_one_config_error(tmp_path):
    """A damaged net checkpoint (or one of a layout that changed since) was a RuntimeError / KeyError /
    ValueError traceback; it is a one-line ConfigError naming the flag and why."""
    ck = N.net_checkpoint(N.build_net("convnet6", 3, 16))
    for change, why in [({"size": 32}, "Missing key"), ({"num_classes": 5}, "size mismatch for classifier.weight"),
                        ({"net": "vgg"}, "unknown net 'vgg'"), ({"size": "abc"}, "invalid literal"),
                        ({"state_dict": None}, "state_dict"), ({"norm": "layer"}, "'layer' norm")]:
        torch.save({**ck, **change}, tmp_path / "bad.pt")
        with pytest.raises(ConfigError) as e:
            N.load_net(str(tmp_path / "bad.pt"), what="--encoder")
        msg = str(e.value)
        assert msg.startswith(f"--encoder: a {N.NET_FORMAT} checkpoint that does not load (") and why in msg, msg
        assert "\n" not in msg and "--nets" not in msg
    torch.save({k: v for k, v in ck.items() if k != "state_dict"}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"does not load \(no 'state_dict' entry\)$"):
        N.load_net(str(tmp_path / "bad.pt"))


# --------------------------------------------------------------------------- torchvision's ImageNet ResNet-18
@pytest.mark.parametrize("size", [224, 64, 32])
def test_torchvision_resnet18_loads_and_matches_its_forward(size, tmp_path):
    sd = tv_resnet18_state_dict(7, seed=size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    feats, logits = tv_resnet18_forward(sd, x)
    torch.save(tv_resnet18_state_dict(7, seed=size, prefix="module."), tmp_path / "dp.pth")  # DataParallel keys
    for net in (N.load_net(sd, what="--encoder"), N.load_net(str(tmp_path / "dp.pth"))):
        assert not net.training and net.net_name == N.TV_NET and net.input_size == 224 and net.feature_dim == 512
        with torch.no_grad():
            torch.testing.assert_close(net.forward_features(x), feats, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(net(x), logits, rtol=1e-4, atol=1e-4)
    # it round-trips through our own checkpoint format
    torch.save(N.net_checkpoint(net), tmp_path / "ours.pt")
    with torch.no_grad():
        torch.testing.assert_close(N.load_net(str(tmp_path / "ours.pt"))(x), logits, rtol=1e-4, atol=1e-4)


def test_imagenet_resnet18_comes_from_the_torch_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = N.imagenet_resnet18_path()
    assert path == str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with pytest.raises(ConfigError, match=r"--encoder imagenet-resnet18: no weights at .*resnet18-f37072fd\.pth"):
        N.load_net(N.PRETRAINED, what="--encoder")
    os.makedirs(os.path.dirname(path))
    sd = tv_resnet18_state_dict(1000, seed=3)
    torch.save(sd, path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(N.load_net(N.PRETRAINED)(x), tv_resnet18_forward(sd, x)[1], rtol=1e-4, atol=1e-4)


def test_imagenet_teacher_answers_for_a_subsets_wnids():
    from manifoldgd_fast.classes import imagenet_wnids

    wnids = imagenet_wnids()
    sd = tv_resnet18_state_dict(1000, seed=5)
    x = torch.randn(2, 3, 32, 32)
    full = tv_resnet18_forward(sd, x)
    names = [wnids[5], wnids[2], wnids[999]]  # any order: the folder's label order
    sub = N.load_net(sd, num_classes=3, class_names=names)
    assert isinstance(sub, N.ClassSubset) and sub.num_classes == 3 and sub.feature_dim == 512
    with torch.no_grad():
        torch.testing.assert_close(sub(x), full[1][:, [5, 2, 999]], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sub.forward_features(x), full[0], rtol=1e-4, atol=1e-4)
    assert not isinstance(N.load_net(sd, num_classes=1000, class_names=wnids), N.ClassSubset)
    with pytest.raises(ConfigError, match="--teacher: .*'golden_retriever' is not an ImageNet-1k WordNet id"):
        N.load_net(sd, num_classes=2, class_names=[wnids[0], "golden_retriever"])
    # 1000 classes of the user's own names: the net's outputs in order, not refused as unknown WordNet ids
    own = N.load_net(sd, num_classes=1000, class_names=[f"c{i:04d}" for i in range(1000)])
    assert not isinstance(own, N.ClassSubset) and own.num_classes == 1000


def test_batch_norm_resnet_strides_as_torchvision_at_any_size():
    """The batch-norm ResNet-18 (torchvision's, the soft-label student) strides in every stage past the first,
    as torchvision (8 px: 8, 4, 2, 1); the instance-norm one keeps its maps >= 2 x 2 (8, 4, 2, 2)."""
    x = torch.zeros(2, 3, 8, 8)
    for norm, sides in (("batch", [8, 4, 2, 1]), ("instance", [8, 4, 2, 2])):
        net = N.build_net("resnet18", 3, 8, norm=norm).eval()
        h = net.stem(x)
        got = []
        for stage in net.stages:
            h = stage(h)
            got.append(h.shape[-1])
        assert got == sides, norm


def test_other_torchvision_resnets_are_refused():
    sd = tv_resnet18_state_dict(10, seed=0)
    deeper = dict(sd, **{k.replace("layer1.1.", "layer1.2."): v for k, v in sd.items() if k.startswith("layer1.1.")})
    with pytest.raises(ConfigError, match="--encoder: a torchvision ResNet state dict that is not ResNet-18"):
        N.load_net(deeper, what="--encoder")
    with pytest.raises(ConfigError, match="key 'avgpool.weight'"):
        N.load_net(dict(sd, **{"avgpool.weight": torch.zeros(1)}), what="--encoder")


# --------------------------------------------------------------------------- gaps a mutation audit found
def test_convnet_is_conv_norm_relu_pool_per_layer():
    """ConvNet-6 at 32 px against a functional forward of its own weights: conv, instance norm, ReLU, 2x2
    average pool, six times, then the linear layer (dropping the ReLU passed every other test)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = N.build_net("convnet6", 5, size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    h, side = x, 32
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.features if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 6 and len(norms) == 6
    for conv, norm in zip(convs, norms):
        h = F.relu(F.group_norm(F.conv2d(h, conv.weight, conv.bias, padding=1), conv.out_channels,
                                norm.weight, norm.bias, norm.eps))
        if side // 2 >= 2:          # at 32 px (< 2**6) pooled while the map stays >= 2 x 2: 16, 8, 4, 2
            h, side = F.avg_pool2d(h, 2, 2), side // 2
    want = F.linear(h.flatten(1), net.classifier.weight, net.classifier.bias)
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, side", [("resnetap10", 56), ("resnet18", 56)])
def test_the_large_stem_leaves_a_quarter_of_224(name, side):
    """At 224 px both stems hand the first stage 56 x 56 maps: ResNetAP's conv7x7 stride 1 + 4x4 average
    pool, ResNet's conv7x7 stride 2 + 3x3/2 max pool (IDC's nets)."""
    net = N.build_net(name, 3, size=224).eval()
    seen = []
    net.stages[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        net(torch.zeros(1, 3, 224, 224))
    assert seen == [(1, 64, side, side)]


def test_resnet_convs_start_with_idcs_he_init():
    """IDC's init: each conv's weights ~ N(0, 2 / (k * k * out_channels)); norms' weight 1, bias 0."""
    torch.manual_seed(0)
    net = N.build_net("resnet18", 10, size=32)
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 4096:
            want = (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5
            assert abs(float(m.weight.detach().std()) / want - 1) < 0.1, name
        elif isinstance(m, torch.nn.GroupNorm):
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all()), name


def test_loading_a_net_leaves_the_callers_random_state_alone(tmp_path):
    """load_net built each shell with a random init drawn from the global generator (then replaced by the
    weights): compute_metrics with its cached encoder, or an --encoder / --teacher file, moved the caller's
    torch RNG (a Python API audit)."""
    net = N.build_net("convnet6", 3, 8)
    ck = N.net_checkpoint(net)
    path = tmp_path / "net.pt"
    torch.save(ck, path)
    bare = {k: v.clone() for k, v in net.state_dict().items()}
    for source in (ck, str(path), bare):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        got = N.load_net(source, num_classes=3, size=8)
        assert torch.equal(torch.get_rng_state(), before), source if isinstance(source, str) else type(source)
        assert all(torch.equal(got.state_dict()[k], v) for k, v in net.state_dict().items())
