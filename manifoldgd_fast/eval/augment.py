"""Training augmentation of the hard-label protocol, batched on the device.

IDC's ImageNet pipeline (``data.transform_imagenet`` + ``utils.ColorJitter`` /
``utils.Lighting`` + CutMix in ``train.py``), re-written for whole batches of
uint8 tensors so that nothing leaves the device (SPEC 7):

1. RandomResizedCrop(size, scale 0.5-1, ratio 3/4-4/3) and horizontal flip
   (p = 0.5), per image, as one bilinear ``grid_sample``;
2. colour jitter: brightness, contrast, saturation, each ``x.lerp(target, a)``
   with a ~ U(-0.4, 0.4), in a random order per image (IDC's ColorJitter);
3. lighting: AlexNet PCA noise, std 0.1, ImageNet eigen-values/-vectors;
4. ImageNet mean/std normalisation;
5. CutMix (probability 1, lambda ~ Beta(1, 1) = U(0, 1)): one box per batch
   pasted from a permutation of the batch, as IDC's ``rand_bbox``.

Per-image randomness comes from a ``torch.Generator`` on the device, per-batch
scalars (CutMix) from one on the CPU, so a seed gives the same augmentation.
The same training run as well: exactly on the CPU, and on CUDA with
``--precision fp32`` (deterministic algorithms); under bf16 autocast with
cudnn.benchmark the kernels cuDNN picks may differ from run to run, and with
them the last bits of the weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
_GREY = (0.299, 0.587, 0.114)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1] (ToTensor's scaling), a new tensor: ``x.float()`` of a float
    tensor (or of a float Split's slice, a view) is ``x`` itself, which an in-place division would rescale."""
    return x.to(torch.float32, copy=True).div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> ImageNet-normalised, (B, 3, H, W)."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def crop_boxes(n: int, h: int, w: int, gen: torch.Generator, device, scale=(0.5, 1.0),
               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for ``n`` images at once.

    Returns (n, 4) float: top, left, height, width in pixels. Each image takes the
    first of ``attempts`` draws (area ~ U(scale) * h * w, log-uniform aspect) that
    fits; one that never fits falls back to the central crop with the ratio clamped.
    """
    area = h * w
    s = torch.empty(n, attempts, device=device).uniform_(scale[0], scale[1], generator=gen) * area
    logr = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(logr)
    cw = torch.round(torch.sqrt(s * r))
    ch = torch.round(torch.sqrt(s / r))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.float().argmax(1)  # the first draw that fits (0 when none does)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
    cw, ch, found = pick(cw), pick(ch), ok.any(1)
    # fallback (torchvision): the whole image, its aspect clamped into ratio, centred
    fw, fh = float(w), float(h)
    if w / h < ratio[0]:
        fh = float(round(w / ratio[0]))
    elif w / h > ratio[1]:
        fw = float(round(h * ratio[1]))
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    u = torch.rand(n, 2, device=device, generator=gen)
    top = torch.where(found, torch.floor(u[:, 0] * (h - ch + 1)), torch.floor((h - ch) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (w - cw + 1)), torch.floor((w - cw) / 2))
    return torch.stack([top, left, ch, cw], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box and resize to (size, size), bilinear; flip where ``flip``.

    x: (B, C, H, W) float; boxes: (B, 4) top, left, height, width; flip: (B,) bool.
    Sample positions are the pixel centres of the output mapped into the box,
    as a bilinear resize of the crop computes them (align_corners=False).
    """
    b, _, h, w = x.shape
    top, left, ch, cw = boxes.unbind(1)
    sx = cw / w
    sy = ch / h
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    # clamp to the box's outer pixel centres: a resize of the cropped image replicates the crop's own edge
    # where an output sample falls past it (torchvision's crop + resize), never the pixel outside the box
    lo = torch.stack([(2 * left + 1) / w - 1, (2 * top + 1) / h - 1], 1).to(x.dtype).view(b, 1, 1, 2)
    hi = torch.stack([(2 * (left + cw) - 1) / w - 1, (2 * (top + ch) - 1) / h - 1], 1).to(x.dtype).view(b, 1, 1, 2)
    grid = torch.minimum(torch.maximum(grid, lo), hi)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W), ITU-R 601 luma as IDC's Grayscale."""
    return (x * x.new_tensor(_GREY).view(1, 3, 1, 1)).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, gen: torch.Generator, strength=(0.4, 0.4, 0.4)) -> torch.Tensor:
    """IDC's ColorJitter on [0, 1] images: brightness (lerp to 0), contrast (lerp to the
    mean grey value), saturation (lerp to the grey image), a ~ U(-s, s) each, in a random
    order per image. x: (B, 3, H, W) float."""
    b = x.shape[0]
    alpha = (torch.rand(b, 3, device=x.device, generator=gen) * 2 - 1) * x.new_tensor(strength)  # (B, 3)
    order = torch.rand(b, 3, device=x.device, generator=gen).argsort(1)  # (B, 3) op per round
    for r in range(3):
        op = order[:, r].view(b, 1, 1, 1)
        a = alpha.gather(1, order[:, r:r + 1]).view(b, 1, 1, 1)
        g = grey(x)
        target = torch.where(op == 0, torch.zeros_like(g),
                             torch.where(op == 1, g.mean(dim=(2, 3), keepdim=True).expand_as(g), g))
        x = x + a * (target - x)
    return x


def lighting(x: torch.Tensor, gen: torch.Generator, std: float = 0.1) -> torch.Tensor:
    """AlexNet PCA lighting noise: x + V (alpha * lambda), alpha ~ N(0, std) per image."""
    alpha = torch.randn(x.shape[0], 3, device=x.device, generator=gen) * std  # (B, 3)
    vec = x.new_tensor(PCA_EIGVEC)  # (3, 3), columns are eigenvectors
    rgb = (alpha * x.new_tensor(PCA_EIGVAL)) @ vec.T  # (B, 3)
    return x + rgb.view(-1, 3, 1, 1)


def cutmix(x: torch.Tensor, gen_cpu: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """IDC's CutMix (probability 1, Beta(1, 1)): one box for the batch.

    Returns (mixed x, partner index (B,), ratio): the loss is
    ``ratio * CE(out, y) + (1 - ratio) * CE(out, y[partner])``.
    """
    b, _, h, w = x.shape
    lam = float(torch.rand((), generator=gen_cpu))
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (), generator=gen_cpu))
    cx = int(torch.randint(w, (), generator=gen_cpu))
    y1, y2 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    x1, x2 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    partner = torch.randperm(b, generator=gen_cpu).to(x.device)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[partner, :, y1:y2, x1:x2]
    ratio = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return x, partner, ratio


class TrainAugment:
    """uint8 batch -> augmented, normalised float batch at ``size`` (steps 1-4 above).

    jitter / light = 0 switch those steps off; CutMix is applied by the trainer.
    """

    def __init__(self, size: int, scale=(0.5, 1.0), flip: bool = True, jitter: float = 0.4, light: float = 0.1):
        self.size, self.scale, self.flip, self.jitter, self.light = size, scale, flip, jitter, light

    def describe(self) -> dict:
        return {"random_resized_crop": {"size": self.size, "scale": list(self.scale), "ratio": [0.75, 4 / 3]},
                "horizontal_flip": 0.5 if self.flip else 0.0, "color_jitter": self.jitter,
                "lighting_std": self.light, "cutmix": {"p": 1.0, "beta": 1.0}, "normalize": "imagenet"}

    def __call__(self, x_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = to_unit(x_u8)
        b, _, h, w = x.shape
        boxes = crop_boxes(b, h, w, gen, x.device, self.scale)
        flip = (torch.rand(b, device=x.device, generator=gen) < 0.5) if self.flip else None
        x = resized_crop(x, boxes, self.size, flip)
        if self.jitter > 0:
            x = color_jitter(x, gen, (self.jitter,) * 3)
        if self.light > 0:
            x = lighting(x, gen, self.light)
        return normalize(x)
