"""VAE latents of the real images, cached per class (SPEC 1).

``cache_dir/<class>.safetensors`` holds tensor ``latents`` (n, C, h, w)
float32 -- the posterior mean times ``vae.config.scaling_factor`` -- and
metadata naming the image of each row. A class whose file already records
the same image list is not recomputed, so an interrupted run resumes; every
file is written atomically, so a killed run never leaves half a class.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import torch

from .data import ClassEntry, iter_class_images
from .errors import DataError
from .output import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "manifoldgd_fast.latents/1"
CACHE_ENV = "MANIFOLDGD_CACHE"


def default_cache_root() -> str:
    """``$MANIFOLDGD_CACHE`` or ``~/.cache/manifoldgd_fast``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "manifoldgd_fast")


def latent_cache_dir(cache_root: str | None, data_root: str, vae_id: str, image_size: int) -> str:
    """``cache_root/latents/<key>``: one folder per (data folder, VAE, resolution).

    key = first 16 hex digits of sha1 over the absolute data root, the VAE id
    and the image size, so a different VAE or size never reuses stale latents.
    """
    root = cache_root if cache_root is not None else default_cache_root()
    vae_id = str(vae_id)
    if os.path.isdir(vae_id):  # a folder given relative to different cwds is still one VAE
        vae_id = os.path.abspath(vae_id)
    ident = json.dumps([os.path.abspath(data_root), vae_id, int(image_size)])
    key = hashlib.sha1(ident.encode("utf-8")).hexdigest()[:16]
    return os.path.join(root, "latents", key)


def class_cache_path(cache_dir: str, name: str) -> str:
    return os.path.join(cache_dir, f"{name}.safetensors")


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Encode images to scaled latents.

    Args:
        vae: an ``AutoencoderKL``.
        images: (b, 3, H, W) in [-1, 1].

    Returns:
        (b, C, H/f, W/f) float32: posterior mean x ``vae.config.scaling_factor``,
        computed in the VAE's dtype on its device.
    """
    p = next(vae.parameters())
    x = images.to(device=p.device, dtype=p.dtype)
    mean = vae.encode(x).latent_dist.mean  # (b, C, h, w); the mean, not a sample: deterministic
    return (mean * vae.config.scaling_factor).float()


def _read_meta(path: str) -> dict[str, Any] | None:
    """The decoded metadata of a cache file, or None when it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            return None
        return {
            "class": meta["class"],
            "files": json.loads(meta["files"]),
            "skipped": json.loads(meta["skipped"]),
            "image_size": int(meta["image_size"]),
            "scaling_factor": float(meta["scaling_factor"]),
        }
    except Exception:  # damaged or foreign file: treat as not cached, it gets rewritten
        return None


def _is_cached(path: str, entry: ClassEntry, image_size: int, scaling_factor: float) -> dict | None:
    if not os.path.isfile(path):
        return None
    meta = _read_meta(path)
    if meta is None:
        return None
    recorded = sorted(meta["files"] + meta["skipped"])
    if (recorded == sorted(entry.relative_files()) and meta["image_size"] == image_size
            and abs(meta["scaling_factor"] - scaling_factor) < 1e-12):
        return meta
    return None


def cache_latents(entries: Sequence[ClassEntry], vae, *, cache_dir: str, image_size: int,
                  batch_size: int = 32, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, progress: bool = True,
                  num_workers: int | None = None) -> dict[str, dict[str, Any]]:
    """Encode every image of ``entries`` and store one safetensors file per class.

    Args:
        entries: classes from :func:`~manifoldgd_fast.data.scan_image_folder`.
        vae: an ``AutoencoderKL``; moved to ``device`` (None = where it is).
        cache_dir: folder for ``<class>.safetensors`` (see :func:`latent_cache_dir`).
        image_size: images are centre-cropped to this many pixels.
        batch_size: images encoded together.
        dtype: float16/bfloat16 run the encoder under CUDA autocast (weights
            stay as they are); on the CPU, and for float32, it runs in the
            VAE's own dtype.
        progress: show a tqdm bar over images.
        num_workers: image-decoding threads (None = min(8, cpus)).

    Returns:
        ``{class: {"n": rows, "skipped": [paths], "cached": reused?, "seconds": s,
        "path": file}}``.

    Raises:
        DataError: a class where no image could be read.
    """
    from safetensors.torch import save as st_save
    from tqdm.auto import tqdm

    if device is not None:
        vae.to(device)
    dev = next(vae.parameters()).device
    scaling = float(vae.config.scaling_factor)
    os.makedirs(cache_dir, exist_ok=True)

    stats: dict[str, dict[str, Any]] = {}
    todo = []
    for e in entries:
        path = class_cache_path(cache_dir, e.name)
        meta = _is_cached(path, e, image_size, scaling)
        if meta is not None:
            stats[e.name] = {"n": len(meta["files"]), "cached": True, "seconds": 0.0, "path": path,
                             "skipped": [os.path.join(e.folder, s) for s in meta["skipped"]]}
        else:
            todo.append(e)

    use_autocast = dev.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    bar = tqdm(total=sum(len(e.files) for e in todo), unit="img", desc="encode latents",
               disable=not progress)
    try:
        for e in todo:
            t0 = time.perf_counter()
            batches = iter_class_images(e, image_size, batch_size, num_workers)
            chunks, done, n_skipped = [], [], 0
            for images, paths in batches:  # images: (b, 3, S, S)
                with (torch.autocast("cuda", dtype=dtype) if use_autocast
                      else contextlib.nullcontext()):
                    chunks.append(encode_images(vae, images).cpu())  # (b, C, h, w)
                done += paths
                # Skipped files count as processed so the bar reaches its total.
                bar.update(len(paths) + len(batches.skipped) - n_skipped)
                n_skipped = len(batches.skipped)
            bar.update(len(batches.skipped) - n_skipped)  # unreadable files after the last batch
            if not chunks:
                raise DataError(f"class {e.name} in {os.path.dirname(e.folder)}: none of its "
                                f"{len(e.files)} images could be read (first: {batches.skipped[0]})")
            latents = torch.cat(chunks).contiguous()  # (n, C, h, w) float32
            folder = e.folder
            meta = {
                "format": FORMAT,
                "class": e.name,
                "files": json.dumps([os.path.relpath(p, folder) for p in done]),
                "skipped": json.dumps([os.path.relpath(p, folder) for p in batches.skipped]),
                "image_size": str(int(image_size)),
                "scaling_factor": repr(scaling),
            }
            path = class_cache_path(cache_dir, e.name)
            atomic_write_bytes(path, st_save({"latents": latents}, metadata=meta))
            stats[e.name] = {"n": latents.shape[0], "cached": False, "path": path,
                             "skipped": list(batches.skipped),
                             "seconds": time.perf_counter() - t0}
            if batches.skipped:
                log.warning("class %s: skipped %d unreadable image(s)", e.name, len(batches.skipped))
    finally:
        bar.close()
    return {e.name: stats[e.name] for e in entries}


def load_class_latents(cache_dir: str, name: str) -> tuple[torch.Tensor, list[str]]:
    """Latents of one cached class.

    Returns:
        (latents (n, C, h, w) float32, the n image file names relative to the
        class folder, row-aligned).

    Raises:
        DataError: the class is not cached in ``cache_dir`` (or its file is damaged).
    """
    from safetensors import safe_open

    path = class_cache_path(cache_dir, name)
    if not os.path.isfile(path):
        raise DataError(f"class {name} has no cached latents in {cache_dir} (run the latent cache first)")
    try:
        with safe_open(path, framework="pt") as f:
            latents = f.get_tensor("latents")
            meta = f.metadata() or {}
        files = json.loads(meta["files"])
    except Exception as e:  # damaged, foreign or truncated file
        raise DataError(f"class {name}: latent cache file {path} is damaged ({e}); delete it "
                        "to recompute") from None
    return latents, files
