"""The Inception-V3 of FID (TensorFlow's 2015-12-05 graph), written here without torchvision.

FID as the papers report it (ManifoldGD's Table 3, MGD³) uses the pool3 features
(2,048) of the Inception-V3 that TensorFlow's FID code ships. pytorch-fid ports
its weights to ``pt_inception-2015-12-05-6726825d.pth``; this module is that
network, with the same parameter names, so the file loads as is:

- ``BasicConv2d``: conv (no bias) -> batch norm (eps 1e-3) -> ReLU;
- stem 299 -> 35 px, then Mixed_5b..d (A), 6a (B), 6b..e (C), 7a (D), 7b..c (E);
- the FID graph differs from torchvision's Inception in its pooling branches: the
  3x3 average pools do not count the zero padding (TensorFlow's pooling), and the
  last block (Mixed_7c) max-pools where the others average;
- input (``forward_features``): ImageNet-normalised images, scaled back to
  [-1, 1] as pytorch-fid scales them (u / 127.5 - 1); inputs that are not
  299 px are resized bilinearly (``align_corners=False``, no antialiasing), as
  pytorch-fid does -- ``metrics`` hands it images it already resized and
  centre-cropped to 299 px, so that resize does not run there;
- ``forward_features_uint8``: uint8 pixels u scaled (u - 128) / 128, as
  torchmetrics' FID (torch-fidelity's Inception) does in the released fid.py
  (``metrics --fid-resize squash``).

Our encoders take ImageNet-normalised images (see ``nets``); ``forward_features``
undoes that normalisation first. The weights come from torch.hub's cache
(``$TORCH_HOME/hub/checkpoints/``, where pytorch-fid keeps them) or a path;
nothing is downloaded.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import IMAGENET_MEAN, IMAGENET_STD

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of TensorFlow's FID Inception
FID_NAME = "fid-inception"
FID_CLASSES = 1008  # the TensorFlow graph's logits (1000 ImageNet classes + 8 unused)


def fid_inception_path() -> str:
    """Where pytorch-fid caches its weights: ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_FILE)


class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg3(x):  # TensorFlow's 3x3 average pool: the padding is not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max3(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)


class InceptionA(nn.Module):  # 35 x 35
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):  # 35 -> 17
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17 x 17, factorised 7x7
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):  # 17 -> 8
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8 x 8, expanded filter bank; ``pool`` is "avg" (Mixed_7b) or "max" (Mixed_7c)
    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = {"avg": _avg3, "max": _max3}[pool]
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))], 1)


class FIDInceptionV3(nn.Module):
    """FID's Inception-V3: ``forward_features`` gives the 2,048 pool3 features, ``forward`` the 1,008 logits."""

    feature_dim = 2048
    input_size = 299
    net_name = FID_NAME
    fp32_features = True  # extract_features runs it without bf16 autocast, as pytorch-fid runs it

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, FID_CLASSES)
        # ImageNet-normalised x -> [0, 1] -> [-1, 1]: 2 (x std + mean) - 1
        self.register_buffer("in_scale", 2 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", 2 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) - 1, persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (B, 3, H, W) -> pool3 features (B, 2048)."""
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.features_from_scaled(x * self.in_scale + self.in_shift)

    def forward_features_uint8(self, u: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, 299, 299) -> pool3 features (B, 2048), pixels scaled (u - 128) / 128
        as torchmetrics' FID scales them (the released fid.py)."""
        if u.dtype != torch.uint8 or u.shape[-2:] != (299, 299):
            raise ValueError(f"forward_features_uint8: u must be uint8 (B, 3, 299, 299), got {u.dtype} "
                             f"{tuple(u.shape)}")
        return self.features_from_scaled((u.float() - 128) / 128)

    def features_from_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the network's input scale (about [-1, 1]), (B, 3, 299, 299) -> pool3 features (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def is_fid_inception_state_dict(state_dict: dict) -> bool:
    return "Mixed_7c.branch_pool.conv.weight" in state_dict and "Conv2d_1a_3x3.conv.weight" in state_dict


def fid_inception_from_state_dict(state_dict: dict) -> FIDInceptionV3:
    """pytorch-fid's state dict (``AuxLogits.*`` of torchvision-layout files ignored) -> the net, in eval mode.
    Raises RuntimeError (from ``load_state_dict``) when a tensor is missing or has another shape."""
    net = FIDInceptionV3()
    net.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")})
    return net.eval()
