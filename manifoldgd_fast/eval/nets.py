"""The evaluation networks of the dataset-distillation literature, written here.

They follow IDC's code (snu-mllab/Efficient-Dataset-Condensation, ``models/``),
which MinimaxDiffusion, MGD3 and ManifoldGD evaluate with; all use instance
norm, written as ``GroupNorm(C, C, affine=True)`` as that code does:

- ``convnet6``   ConvNet, depth 6, width 128: [conv3x3 (bias) -> instance norm
                 -> ReLU -> avgpool 2] x 6 -> linear on the flattened map.
- ``resnetap10`` ResNet-10 (one BasicBlock per stage) whose strided convs are
                 replaced by stride-1 convs + 2x2 average pooling; stem conv7x7
                 stride 1 + avgpool 4 above 128 px.
- ``resnet18``   ResNet-18 (torchvision layout, instance norm); stem conv7x7
                 stride 2 + maxpool above 128 px.

Resolution. The ResNets pick their stem as IDC does: ``size <= 64`` a
conv3x3 without pooling ("small", CIFAR-like), ``64 < size <= 128`` conv3x3 +
pool 2 ("mid"), larger the ImageNet stem ("large"); they end in global average
pooling. Instance norm of a 1x1 map is a constant (it erases the input), so no
norm here ever sees a map below 2x2: a ResNet stage strides only if its output
stays >= 2 px (the parameter count does not change). ConvNet-6 pools after
every layer as IDC's does where that is defined (>= 64 px: six halvings leave
>= 1 px, and every normalised map is >= 2x2; 64 to 127 px end at 1x1, before
the classifier); below 64 px, where IDC's would end at 0 px, a layer pools only
if the result stays >= 2 px: at 32 px in its first four layers (32 -> 2 px), at
8 px in two, and so on. At the literature's sizes nothing differs from IDC
(224 px: ConvNet-6 ends at 3x3, ResNets at 7x7; 32 px: ResNets end at 4x4).
Inputs must be at least 2 px.

Every net has ``forward_features(x)`` (the vector before the classifier) and
``feature_dim``; inputs are ImageNet-normalised images (B, 3, size, size).

torchvision's ImageNet ResNet-18 (batch norm; the papers' metrics encoder and
the ImageNet-1k soft-label teacher) loads into the same :class:`ResNet` with
``norm="batch"``, without torchvision: :func:`load_net` takes its state dict
or the name ``imagenet-resnet18`` (the file in torch.hub's cache).
"""
from __future__ import annotations

import copy
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .inception import FID_FILE, FID_NAME, fid_inception_from_state_dict, fid_inception_path, \
    is_fid_inception_state_dict

NET_NAMES = ("convnet6", "resnetap10", "resnet18")


def instance_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(c, c, affine=True)


NORMS = {"instance": instance_norm, "batch": nn.BatchNorm2d}  # batch: torchvision's ImageNet ResNet-18


def stem_kind(size: int) -> str:
    """IDC's ResNet stem choice: 'small' (<= 64 px), 'mid' (<= 128 px) or 'large'."""
    return "small" if size <= 64 else ("mid" if size <= 128 else "large")


# --------------------------------------------------------------------------- ConvNet
class ConvNet(nn.Module):
    def __init__(self, num_classes: int, size: int = 224, depth: int = 6, width: int = 128, channels: int = 3):
        super().__init__()
        layers, side, c_in = [], size, channels
        pool_all = size >> depth >= 1  # IDC's net: a pool after every layer (see the module docstring)
        for _ in range(depth):
            layers += [nn.Conv2d(c_in, width, 3, padding=1), instance_norm(width), nn.ReLU(inplace=True)]
            if pool_all or side // 2 >= 2:  # else keep every normalised map >= 2x2
                layers.append(nn.AvgPool2d(2, 2))
                side //= 2
            c_in = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)  # (B, width * side * side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


# --------------------------------------------------------------------------- ResNets
class _Stem(nn.Module):
    def __init__(self, kind: str, planes: int, avgpool: bool, channels: int = 3, norm=instance_norm):
        super().__init__()
        if kind == "large":
            # ResNetAP: conv7x7 stride 1 + avgpool 4; ResNet: conv7x7 stride 2 + maxpool 3/2.
            self.conv = nn.Conv2d(channels, planes, 7, stride=1 if avgpool else 2, padding=3, bias=False)
            self.pool = nn.AvgPool2d(4, 4) if avgpool else nn.MaxPool2d(3, 2, padding=1)
        else:
            self.conv = nn.Conv2d(channels, planes, 3, padding=1, bias=False)
            self.pool = None if kind == "small" else (nn.AvgPool2d(2, 2) if avgpool else nn.MaxPool2d(3, 2, padding=1))
        self.norm = norm(planes)

    def forward(self, x):
        x = F.relu(self.norm(self.conv(x)), inplace=True)
        return x if self.pool is None else self.pool(x)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, planes: int, stride: int, avgpool: bool, norm=instance_norm):
        super().__init__()
        self.avgpool = avgpool
        self.stride = stride
        # ResNetAP: stride-1 conv then 2x2 average pooling instead of a strided conv.
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=1 if avgpool else stride, padding=1, bias=False)
        self.norm1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = norm(planes)
        self.down = None
        if stride != 1 or c_in != planes:
            if avgpool:
                self.down = nn.Sequential(nn.Conv2d(c_in, planes, 1, bias=False), nn.AvgPool2d(stride, stride),
                                          norm(planes))
            else:
                self.down = nn.Sequential(nn.Conv2d(c_in, planes, 1, stride=stride, bias=False), norm(planes))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        if self.avgpool and self.stride != 1:
            out = F.avg_pool2d(out, self.stride, self.stride)
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)), inplace=True)


class ResNet(nn.Module):
    """ResNet with BasicBlocks, instance norm; ``avgpool=True`` gives IDC's ResNetAP.

    norm: "instance" (IDC) or "batch" (torchvision's ImageNet ResNet-18); stem:
    None (chosen from ``size``, see :func:`stem_kind`) or "small" / "mid" / "large".
    """

    def __init__(self, num_classes: int, size: int = 224, blocks=(2, 2, 2, 2), avgpool: bool = False,
                 width: int = 64, channels: int = 3, norm: str = "instance", stem: str | None = None):
        super().__init__()
        kind = stem or stem_kind(size)
        norm_fn = NORMS[norm]
        self.stem = _Stem(kind, width, avgpool, channels, norm_fn)
        # map side after the stem: avgpool floors, strided conv / maxpool (padded) round up
        half = lambda s: s // 2 if avgpool else (s + 1) // 2  # noqa: E731
        side = {"small": size, "mid": half(size), "large": size // 4 if avgpool else half(half(size))}[kind]
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            # keep every instance-normalised map >= 2x2; batch norm (torchvision's net) strides as torchvision
            stride = 2 if i > 0 and (norm == "batch" or side // 2 >= 2) else 1
            side = side // 2 if stride == 2 else side
            stage = [BasicBlock(c_in, planes, stride, avgpool, norm_fn)]
            stage += [BasicBlock(planes, planes, 1, avgpool, norm_fn) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = planes
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c_in
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # IDC's init
            if isinstance(m, nn.Conv2d):
                n_fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n_fan))
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return x.mean(dim=(2, 3))  # global average pooling, (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# --------------------------------------------------------------------------- registry
def build_net(name: str, num_classes: int, size: int = 224, norm: str = "instance") -> nn.Module:
    """A freshly initialised evaluation net (global torch RNG; seed it first).

    name: one of ``convnet6``, ``resnetap10``, ``resnet18``; num_classes: outputs;
    size: input resolution in pixels (chooses the ResNet stem / ConvNet pooling);
    norm: the ResNets' "instance" (IDC's) or "batch" (torchvision's ResNet-18, the
    soft-label protocol's student); ConvNet-6 has instance norm only.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes {num_classes}: must be >= 1")
    if size < 2:
        raise ConfigError(f"--size {size}: must be >= 2")
    if norm not in NORMS or (name == "convnet6" and norm != "instance"):
        raise ConfigError(f"{name} with {norm!r} norm: expected " + ("instance" if name == "convnet6" else
                                                                    " or ".join(NORMS)))
    if name == "convnet6":
        net = ConvNet(num_classes, size, depth=6, width=128)
    elif name == "resnetap10":
        net = ResNet(num_classes, size, blocks=(1, 1, 1, 1), avgpool=True, norm=norm)
    elif name == "resnet18":
        net = ResNet(num_classes, size, blocks=(2, 2, 2, 2), avgpool=False, norm=norm)
    elif name == TV_NET:  # not a --nets choice: what load_net builds from torchvision's ImageNet weights
        net = ResNet(num_classes, size, blocks=(2, 2, 2, 2), avgpool=False, norm="batch", stem="large")
        net.input_size = 224
        net.fp32_features = True  # metrics comparable with the papers': no bf16 autocast
    else:
        raise ConfigError(f"--nets: unknown net {name!r}; choose from {', '.join(NET_NAMES)}")
    net.net_name, net.num_classes, net.size = name, num_classes, size
    net.norm = "batch" if name == TV_NET else norm
    return net


def parse_nets(spec) -> list[str]:
    """``"convnet6,resnet18"`` or a sequence of names -> a checked list (order kept, no duplicates)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"--nets {spec!r}: no net named; choose from {', '.join(NET_NAMES)}")
    for n in names:
        if n not in NET_NAMES:
            raise ConfigError(f"--nets: unknown net {n!r}; choose from {', '.join(NET_NAMES)}")
    return list(dict.fromkeys(names))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


NET_FORMAT = "manifoldgd_fast.net/1"


def net_checkpoint(model: nn.Module, **meta) -> dict:
    """What :func:`load_net` reads back: the net's name, classes, size and state dict (+ ``meta``)."""
    return {"format": NET_FORMAT, "net": model.net_name, "num_classes": model.num_classes, "size": model.size,
            "norm": getattr(model, "norm", "instance"),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **meta}


def load_net(source, *, num_classes: int | None = None, size: int | None = None, what: str = "--teacher",
             class_names=None) -> nn.Module:
    """A network from a module, a file holding a pickled ``nn.Module``, a :func:`net_checkpoint`
    dict, a bare state dict of one of :data:`NET_NAMES` (tried with ``num_classes`` and ``size``),
    torchvision's ImageNet ResNet-18 state dict, FID's Inception-V3 state dict (pytorch-fid's
    file, see ``inception``), or the name ``imagenet-resnet18`` / ``fid-inception`` (those
    files from torch.hub's cache, see :data:`NAMED`; never downloaded).

    class_names: the folder's classes in label order. A 1000-class ImageNet net given
    WordNet-id classes other than all 1000 in order answers for those classes only
    (:class:`ClassSubset`). Returns the module on the CPU in eval mode: a module passed in is
    copied first, so the caller's own stays where it was, in its mode, with its
    ``requires_grad`` flags. Raises ConfigError naming ``what`` and the file.
    """
    obj = source
    if isinstance(source, nn.Module):
        try:
            obj = copy.deepcopy(source)
        except (TypeError, RuntimeError, copy.Error) as e:  # e.g. a lock, or a non-leaf tensor with grad, held
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"{what} {type(source).__name__}: the module cannot be copied ({type(e).__name__}: "
                              f"{first}); save it (torch.save) and pass the file") from None
    if isinstance(source, str) and source in NAMED:
        _, file, whose = NAMED[source]
        source = named_file(source)
        if not os.path.isfile(source):
            raise ConfigError(f"{what} {obj}: no weights at {source}; put {whose} {file} there "
                              f"(nothing is downloaded) or pass the file's path")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"{what} {path}: " + ("a folder, not a net's file" if os.path.isdir(path)
                                                     else "no such file"))
        try:  # a user's own pickled module needs full unpickling; the file is theirs
            # (torch.load takes a TorchScript archive too, with a warning to call torch.jit.load)
            if _is_torchscript(path):
                with warnings.catch_warnings():  # (torch's deprecation of TorchScript: the user's file, not a call)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    obj = torch.jit.load(path, map_location="cpu")
            else:
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise ConfigError(f"{what} {path}: cannot load ({type(e).__name__}: {e})") from None
    _check_trained_classes(obj, class_names, f"{what} {os.fspath(source)}" if isinstance(source, (str, os.PathLike))
                           else what)
    with torch.random.fork_rng(devices=[]):  # (the shells' random init, replaced by the weights: not the caller's RNG)
        net = _net_from(obj, num_classes, size, what)
    return _select_classes(net, num_classes, class_names, what)


def _check_trained_classes(obj, class_names, what: str) -> None:
    """ConfigError when ``obj``, a :func:`net_checkpoint` that names the classes it was trained on (the metrics'
    default encoder does), names others than ``class_names`` or another order: its outputs would be taken
    for the wrong classes (a teacher of ImageWoof's 10 classes taught ImageNette's 10, silently)."""
    trained = obj.get("classes") if isinstance(obj, dict) and obj.get("format") == NET_FORMAT else None
    if class_names is None or not isinstance(trained, (list, tuple)) or list(trained) == list(class_names):
        return
    from ..classes import imagenet_wnids

    if list(trained) == imagenet_wnids() and set(class_names) <= set(trained):
        return  # all of ImageNet-1k in order: _select_classes answers for a subset's WordNet ids

    def names(xs):
        return ", ".join(map(str, xs[:5])) + (f" ... ({len(xs) - 5} more)" if len(xs) > 5 else "")

    raise ConfigError(f"{what}: trained on the classes {names(list(trained))}, not the evaluation's "
                      f"{names(list(class_names))} (in that order); its outputs would be read as other classes")


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (torch.jit.save's): a zip with ``<name>/constants.pkl``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):  # (a legacy pickle, or unreadable: torch.load says which)
        return False


def _net_from(obj, num_classes, size, what) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj.cpu().eval()
    if isinstance(obj, dict) and obj.get("format") == NET_FORMAT:
        try:  # a damaged checkpoint, or one of a net whose layout has changed since: the file's fault
            net = build_net(obj["net"], int(obj["num_classes"]), int(obj["size"]), norm=obj.get("norm", "instance"))
            net.load_state_dict(obj["state_dict"])
        except (ConfigError, KeyError, TypeError, ValueError, RuntimeError) as e:
            why = f"no {e} entry" if isinstance(e, KeyError) else _first_error(e) if isinstance(e, RuntimeError) \
                else str(e).removeprefix("--nets: ")
            raise ConfigError(f"{what}: a {NET_FORMAT} checkpoint that does not load ({why})") from None
        return net.eval()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if is_fid_inception_state_dict(obj):
            try:
                return fid_inception_from_state_dict(obj)
            except RuntimeError as e:
                raise ConfigError(f"{what}: an Inception-V3 state dict that is not FID's ({_first_error(e)})") from None
        tv = from_torchvision_resnet18(obj, what)
        if tv is not None:
            return tv
        if num_classes is None or size is None:
            raise ConfigError(f"{what}: a bare state dict needs the number of classes and the size")
        for name in NET_NAMES:
            net = build_net(name, num_classes, size)
            try:
                net.load_state_dict(obj)
            except RuntimeError:
                continue
            return net.eval()
        raise ConfigError(f"{what}: the state dict matches none of {', '.join(NET_NAMES)} "
                          f"with {num_classes} classes at {size} px")
    raise ConfigError(f"{what}: expected an nn.Module, a net checkpoint or a state dict, got {type(obj).__name__}")


# --------------------------------------------------------------------------- torchvision's ImageNet ResNet-18
TV_NET = "resnet18_bn"
TV_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1
PRETRAINED = "imagenet-resnet18"
_TV_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(\w+)")
_TV_PART = {"bn1": "norm1", "bn2": "norm2", "downsample.0": "down.0", "downsample.1": "down.1"}
_TV_TOP = {"conv1": "stem.conv", "bn1": "stem.norm", "fc": "fc"}


def imagenet_resnet18_path() -> str:
    """Where torchvision caches its ImageNet ResNet-18: ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", TV_FILE)


def from_torchvision_resnet18(state_dict: dict, what: str = "--encoder") -> nn.Module | None:
    """torchvision's ``resnet18`` state dict (batch norm; ``module.`` prefixes allowed) as our
    :class:`ResNet` with ``norm="batch"`` and the ImageNet stem, in eval mode; None if the dict
    is not in torchvision's ResNet layout. Raises ConfigError for another torchvision ResNet."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if not {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= sd.keys():
        return None
    out = {}
    for k, v in sd.items():
        m = _TV_BLOCK.fullmatch(k)
        top, _, leaf = k.partition(".")
        if m:
            out[f"stages.{int(m[1]) - 1}.{m[2]}.{_TV_PART.get(m[3], m[3])}.{m[4]}"] = v
        elif top in _TV_TOP:
            out[f"{_TV_TOP[top]}.{leaf}"] = v
        else:
            raise ConfigError(f"{what}: a torchvision ResNet state dict with key {k!r}, which ResNet-18 has not "
                              f"(only ResNet-18 is supported)")
    net = build_net(TV_NET, int(sd["fc.weight"].shape[0]), 224)
    try:
        net.load_state_dict(out)
    except RuntimeError as e:
        raise ConfigError(f"{what}: a torchvision ResNet state dict that is not ResNet-18 ({_first_error(e)})") \
            from None
    return net.eval()


def _first_error(e: RuntimeError) -> str:
    """The first complaint of a ``load_state_dict`` error, on one short line."""
    lines = str(e).splitlines()
    return (lines[1] if len(lines) > 1 else lines[0]).strip()[:200]


# named weights in torch.hub's cache: name -> (path function, file name, whose file)
NAMED = {PRETRAINED: (imagenet_resnet18_path, TV_FILE, "torchvision's"),
         FID_NAME: (fid_inception_path, FID_FILE, "pytorch-fid's")}


def named_file(source):
    """The weights file a name of :data:`NAMED` stands for (it may not exist); ``source`` itself otherwise."""
    return NAMED[source][0]() if isinstance(source, str) and source in NAMED else source


class ClassSubset(nn.Module):
    """A classifier answering for some of its classes only: logits ``net(x)[:, index]``
    (an ImageNet-1k teacher on ImageNette's 10 folders). Features are the net's own."""

    def __init__(self, net: nn.Module, index):
        super().__init__()
        self.net = net
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long), persistent=False)
        self.num_classes = len(self.index)
        for attr in ("feature_dim", "input_size", "net_name", "fp32_features"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        fwd = getattr(self.net, "forward_features", None)
        return fwd(x) if callable(fwd) else self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).index_select(1, self.index)


def _select_classes(net: nn.Module, num_classes, class_names, what) -> nn.Module:
    from ..classes import imagenet_wnid_index, imagenet_wnids

    if class_names is None or getattr(net, "num_classes", None) != 1000:
        return net
    if list(class_names) == imagenet_wnids():
        return net
    pos = imagenet_wnid_index()
    unknown = [c for c in class_names if c not in pos]
    if unknown:
        if num_classes == 1000:
            return net  # 1000 classes of the user's own: the net's outputs are taken in order
        raise ConfigError(f"{what}: a 1000-class ImageNet net, but class {unknown[0]!r} is not an ImageNet-1k "
                          f"WordNet id, so none of its outputs belongs to it")
    return ClassSubset(net, [pos[c] for c in class_names])
