"""Atomic writing of the distilled set: per-class folders, latents, manifest.

A class is written into ``OUT/.<class>.tmp-<pid>/`` and renamed to
``OUT/<class>/`` only when complete, so a killed run leaves either a finished
class or nothing; a rerun skips finished classes (SPEC 6). Every file goes
through temp + ``os.replace``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable

import numpy as np
import torch

from .errors import DataError

MANIFEST = "manifest.json"
LATENTS_DIR = "latents"
MODES_DIR = "modes"
RESERVED_DIRS = (LATENTS_DIR, MODES_DIR)  # what a run puts beside the class folders: no class may take these names
DONE_MARK = ".complete"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which would race with other threads
# (the PNG writer, the mode prefetcher) creating files meanwhile.
_UMASK = _read_umask()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files: give the usual umask's mode, as open() would
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Decoded VAE output in [-1, 1], (N, 3, H, W) -> uint8 (N, H, W, 3).

    Rounds exactly as torchvision's ``save_image(normalize, value_range=(-1,1))``
    does (scale to [0, 255], + 0.5, clamp, truncate), the released samplers' way.
    """
    return to_uint8_tensor(x.detach().float().cpu()).numpy()


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`to_uint8_images` on x's device: uint8 (N, H, W, 3) tensor. Every op is an exactly
    rounded fp32 op (the scalings are by 1/2 and 255), so the bytes do not depend on the device."""
    x = (x.detach().float().clamp(-1, 1) + 1) / 2
    x = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3) with PIL's bicubic filter (antialiased when
    shrinking: its support widens with the scale), e.g. 512 px SD images written at an
    evaluation resolution. ``size`` None or equal to H = W: returned unchanged."""
    from PIL import Image

    if size is None or images.shape[1:3] == (size, size):
        return images
    out = [np.asarray(Image.fromarray(img, mode="RGB").resize((size, size), resample=Image.BICUBIC))
           for img in images]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    # Fixed PNG settings: the same pixels always give the same bytes.
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def class_done(out: str, name: str) -> bool:
    """Whether ``out/<name>/`` is a finished class (it holds the done mark)."""
    return os.path.isfile(os.path.join(out, name, DONE_MARK))


class OutputWriter:
    """Owns ``OUT/``: which classes are finished, and writing one atomically."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)

    def class_dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    def is_done(self, name: str) -> bool:
        return class_done(self.out, name)

    def done_classes(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.is_done(n)]

    def write_class(self, name: str, images: np.ndarray, latents: torch.Tensor | None,
                    info: dict[str, Any]) -> None:
        """Write ``OUT/<name>/<i>.png`` (+ ``OUT/latents/<name>.safetensors``) atomically.

        images: uint8 (N, H, W, 3); latents: (N, C, h, w) final latents or None.
        The latents file is renamed into place first and the class folder last, so a
        finished class always has its latents; a run killed in between leaves a latents
        file of an unfinished class, which the rerun rewrites when it redoes the class.
        """
        from safetensors.torch import save as st_save

        final = self.class_dir(name)
        tmp = os.path.join(self.out, f".{name}.tmp-{os.getpid()}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        if os.path.exists(final):  # is_done said no: not a class folder this tool finished, so not ours to delete
            raise DataError(f"{final} exists but is not a finished class of a run (no {DONE_MARK}); move it away "
                            "or use a new --out")
        for i, img in enumerate(images):
            with open(os.path.join(tmp, f"{i}.png"), "wb") as f:
                f.write(encode_png(img))
                f.flush()
                os.fsync(f.fileno())  # the folder is renamed into place only over files that are on disk
        if latents is not None:
            blob = st_save({"latents": latents.detach().float().cpu().contiguous()},
                           metadata={"class": name})
            atomic_write_bytes(os.path.join(self.out, LATENTS_DIR, f"{name}.safetensors"), blob)
        with open(os.path.join(tmp, DONE_MARK), "w", encoding="utf-8") as f:
            json.dump(info, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def read_class_info(self, name: str) -> dict[str, Any]:
        with open(os.path.join(self.class_dir(name), DONE_MARK), encoding="utf-8") as f:
            return json.load(f)

    def clean_stale(self, names: Iterable[str]) -> None:
        """Remove temp folders of ``names`` left by killed runs (never finished classes).

        Only the caller's own classes: another rank may be writing its own right now.
        """
        prefixes = tuple(f".{n}.tmp-" for n in names)
        for entry in os.listdir(self.out):
            if entry.startswith(prefixes):
                shutil.rmtree(os.path.join(self.out, entry), ignore_errors=True)

    def write_manifest(self, manifest: dict[str, Any]) -> str:
        path = os.path.join(self.out, MANIFEST)
        atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return path
