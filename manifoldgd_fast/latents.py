"""VAE latents of the real images, cached per class (SPEC 1).

``cache_dir/<class>.safetensors`` holds tensor ``latents`` (n, C, h, w)
float32 -- the posterior mean times ``vae.config.scaling_factor`` -- and
metadata naming the image of each row. A class whose file already records
the same image list is not recomputed, so an interrupted run resumes; every
file is written atomically, so a killed run never leaves half a class.

Data path of :func:`cache_latents`: ``ClassChunks`` (batches of file paths,
class after class) -> ``DataLoader`` workers running ``ImageFiles`` (PIL
decode + the ADM centre crop, uint8) -> pinned host memory -> the device,
where ``normalise_lut`` maps bytes to [-1, 1] and the VAE encodes -> one
``ClassBuffer`` -> ``<class>.safetensors``. JPEG decoding and the resize stay
on the CPU, in the workers: the resize is PIL's BOX/BICUBIC on uint8, which
defines what the DiT was trained on and which torch's float interpolation does
not reproduce, and torch has no JPEG decoder without torchvision.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import os
import signal
import struct
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.utils.data

from .data import ClassEntry, iter_class_images, read_image_uint8, reads_now
from .errors import ConfigError, DataError
from .output import atomic_write_bytes, sweep_stale_temps

log = logging.getLogger(__name__)

FORMAT = "manifoldgd_fast.latents/1"
CACHE_ENV = "MANIFOLDGD_CACHE"


def default_cache_root() -> str:
    """``$MANIFOLDGD_CACHE`` or ``~/.cache/manifoldgd_fast`` (a ``~`` expanded, as the digits export expands it)."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "manifoldgd_fast"))


def cache_root(cache_dir: str | None) -> str:
    """``--cache-dir`` with its ``~`` expanded (a ``--cache-dir=~/c`` or a config file's, which no shell expands,
    made a folder named ``~`` in the working directory), or :func:`default_cache_root`."""
    return os.path.expanduser(cache_dir) if cache_dir is not None else default_cache_root()


def encode_precision(device, dtype: torch.dtype) -> str:
    """The precision the encoder really runs in: bf16/fp16 autocast on CUDA only, else float32."""
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return str(dtype).removeprefix("torch.")
    return "float32"


def latent_cache_dir(cache_dir: str | None, data_root: str, vae_id: str, image_size: int,
                     precision: str = "float32") -> str:
    """``cache_root/latents/<key>``: one folder per (data folder, VAE, resolution, encode precision).

    key = first 16 hex digits of sha1 over the absolute data root, the VAE id,
    the image size and, when not float32, the encoder's precision
    (:func:`encode_precision`), so a different VAE, size or precision never
    reuses latents computed otherwise.
    """
    root = cache_root(cache_dir)
    vae_id = str(vae_id)
    if os.path.isdir(vae_id):  # a folder given relative to different cwds is still one VAE
        vae_id = os.path.abspath(vae_id)
    if precision not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"latent cache precision must be float32, bfloat16 or float16, got {precision!r}")
    key_parts = [os.path.abspath(data_root), vae_id, int(image_size)]
    ident = json.dumps(key_parts if precision == "float32" else key_parts + [precision])
    key = hashlib.sha1(ident.encode("utf-8")).hexdigest()[:16]
    path = os.path.join(root, "latents", key)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # (every class then failed as "latent cache file ... is damaged; delete it")
        raise ConfigError(f"--cache-dir {root!r}: not UTF-8 text, and safetensors opens UTF-8 paths only; "
                          "give a --cache-dir whose path is") from None
    return path


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
    return mean.float() * vae.config.scaling_factor  # scaled in float32: no second half-precision rounding


def weights_digest(module) -> str:
    """First 16 hex digits of sha256 over a module's weights (dtypes, shapes and bytes, in the order of
    their sorted names; not the names, so a wrapped VAE is the same VAE): a latent cache made by other
    VAE weights under the same name or folder is not reused, and a run's manifest names its weights."""
    h = hashlib.sha256()
    for _, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # (a 0-dim tensor cannot view)
    return h.hexdigest()[:16]


def file_stamps(entry: ClassEntry) -> dict[str, list[int]]:
    """Relative file name -> [size, mtime_ns]: what says an image file changed since it was encoded."""
    out = {}
    for path, rel in zip(entry.files, entry.relative_files()):
        try:
            st = os.stat(path)
            out[rel] = [int(st.st_size), int(st.st_mtime_ns)]
        except OSError:  # vanished since the scan: unreadable, and recorded so
            out[rel] = [-1, -1]
    return out


def stamps_digest(stamps: dict[str, list[int]] | None) -> str | None:
    """16 hex digits of sha256 over :func:`file_stamps` (None for None): a finished class's done mark keeps it,
    so that a resume can tell the class's images changed since it was distilled."""
    if stamps is None:
        return None
    return hashlib.sha256(json.dumps(stamps, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    """What a class's cached latents must have been made with to be reused (besides its image files)."""

    image_size: int
    scaling: float  # the VAE's scaling_factor
    vae: str        # :func:`weights_digest`
    latent_shape: tuple[int, ...] | None = None  # (C, h, w) of one image's latents (None: not compared)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _latents_mismatch(dtype: str, shape: list[int], files: list[str]) -> str | None:
    """Why a file's ``latents`` tensor (safetensors dtype name, shape) is not the (n, C, h, w) float32 of its n
    image ``files``; None when it is."""
    if dtype != "F32":
        return f"its latents are {dtype}, not F32"
    if len(shape) != 4 or shape[0] != len(files):
        return f"its latents have shape {tuple(shape)}, not ({len(files)}, C, h, w) for its {len(files)} image files"
    return None


def _read_meta(path: str) -> dict[str, Any] | None:
    """The decoded metadata of a cache file, or None when it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            t = f.get_slice("latents")  # the header's dtype and shape; no data read
            dtype, shape = t.get_dtype(), list(t.get_shape())
        if meta.get("format") != FORMAT:
            return None
        out = {
            "class": meta["class"],
            "files": json.loads(meta["files"]),
            "skipped": json.loads(meta["skipped"]),
            "image_size": int(meta["image_size"]),
            "scaling_factor": float(meta["scaling_factor"]),
            "stamps": json.loads(meta.get("stamps", "null")),
            "vae": meta.get("vae"),
            "encoded_with": json.loads(meta.get("encoded_with", "null")),
            "latent_shape": tuple(shape[1:]),
        }
    except Exception:  # damaged or foreign file: treat as not cached, it gets rewritten
        return None
    # valid JSON of the wrong types (a hand-edited or foreign file) is as unreadable as broken JSON
    if not (_str_list(out["files"]) and _str_list(out["skipped"])
            and isinstance(out["encoded_with"], (dict, type(None)))) \
            or _latents_mismatch(dtype, shape, out["files"]) is not None:
        return None
    return out


def cache_record_digest(cache_dir: str, name: str) -> str | None:
    """sha256 (16 hex digits) of class ``name``'s cache file record (its metadata: class, image files and
    their stamps, skipped files, VAE digest, image size, how it was encoded); None without a readable file.
    Changes whenever the class is encoded again; the same file copied elsewhere keeps it."""
    from safetensors import safe_open

    try:
        with safe_open(class_cache_path(cache_dir, name), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # missing, damaged or foreign
        return None
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


UNREADABLE = "unreadable or of another format"


def _is_cached(path: str, entry: ClassEntry, key: CacheKey) -> tuple[dict | None, str | None]:
    """(the file's metadata when it can be reused, else None; why not, for a file that exists)."""
    if not os.path.isfile(path):
        return None, None
    meta = _read_meta(path)
    if meta is None:
        return None, UNREADABLE
    if meta["class"] != entry.name:  # e.g. classes Cat and cat sharing one file on a case-insensitive file system
        return None, f"it holds class {meta['class']!r}"
    if sorted(meta["files"] + meta["skipped"]) != sorted(entry.relative_files()):
        return None, "other image files"
    if meta["image_size"] != key.image_size or not abs(meta["scaling_factor"] - key.scaling) < 1e-12 \
            or meta["vae"] != key.vae:
        return None, "other VAE weights or image size"
    if key.latent_shape is not None and meta["latent_shape"] != tuple(key.latent_shape):
        return None, UNREADABLE  # (a foreign or edited file: the VAE's digest alone fixes the shape)
    if meta["stamps"] != file_stamps(entry):
        return None, "image files changed since they were encoded"
    healed = reads_now(entry.folder, meta["skipped"], read_image_uint8, key.image_size)
    if healed is not None:
        return None, f"{healed}, skipped as unreadable, reads now"
    return meta, None


# --------------------------------------------------------------------------- #
# the image loader: DataLoader workers decode, the main process encodes
# --------------------------------------------------------------------------- #
PREFETCH = 2  # loader batches each worker decodes ahead (DataLoader prefetch_factor)


def default_num_workers() -> int:
    """Decoding processes per encoding process: min(8, usable CPUs / local ranks).

    Under torchrun every rank of a node runs its own loader, so the CPUs the
    process may use are shared by ``LOCAL_WORLD_SIZE`` ranks.
    """
    try:
        cpus = len(os.sched_getaffinity(0))  # honours taskset / cgroup cpusets, unlike cpu_count()
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return min(8, max(1, cpus // local))


def _worker_ignores_sigterm(_worker_id: int) -> None:
    """A decoding worker leaves SIGTERM to the main process, which stops the loader as on Ctrl-C (its workers
    end on the loader's shutdown, or within seconds of the main process's exit). Slurm signals every process
    of a job step: a worker killed by the signal made torch raise "DataLoader worker ... killed by signal"
    over the run's own clean stop (a traceback, exit 1)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def normalise_lut(device: str | torch.device | None = None) -> torch.Tensor:
    """(256,) float32: byte value v -> (v / 255 - 0.5) / 0.5, computed on the CPU.

    ``data.load_image`` evaluates that formula on the CPU; indexing this table on any
    device gives the same floats bit for bit. Evaluating the formula on a CUDA
    device would not: there ``x / 255.0`` multiplies by a rounded reciprocal.
    """
    return ((torch.arange(256, dtype=torch.float32) / 255.0 - 0.5) / 0.5).to(device)


class ImageFiles(torch.utils.data.Dataset):
    """Map-style dataset whose index is ``(class position, file position, path)``.

    It holds nothing but the image size: the paths travel with the indices, so
    a worker never copies the 1.28 M paths of ImageNet, and the dataset pickles
    for the ``spawn`` start method as well as for ``fork``.

    ``dataset[(c, i, path)]`` is ``(c, i, path, image uint8 (3, S, S) or None,
    error message or None, seconds spent reading)``: an unreadable file is a
    record, not an exception, so the main process skips it in file order.
    """

    def __init__(self, size: int):
        self.size = int(size)

    def __getitem__(self, index: tuple[int, int, str]):
        c, i, path = index
        t0 = time.perf_counter()
        try:
            img, err = read_image_uint8(path, self.size), None
        except DataError as e:
            img, err = None, str(e)
        return c, i, path, img, err, time.perf_counter() - t0


def collate_class_chunk(records: list[tuple]) -> dict[str, Any]:
    """One loader batch (consecutive files of one class) from its :class:`ImageFiles` records.

    Returns ``{"class": c, "n_files": files covered, "paths": readable paths,
    "images": uint8 (k, 3, S, S) of those k paths or None when k == 0,
    "errors": [(path, message)], "decode_s": seconds the worker spent reading}``.
    """
    good = [r for r in records if r[4] is None]
    return {"class": records[0][0], "n_files": len(records), "paths": [r[2] for r in good],
            "images": torch.stack([r[3] for r in good]) if good else None,  # (k, 3, S, S) uint8
            "errors": [(r[2], r[4]) for r in records if r[4] is not None],
            "decode_s": sum(r[5] for r in records)}


class ClassChunks:
    """The loader's batch sampler: each class's files in file order, cut into
    chunks of ``batch_size``. A chunk never spans two classes, so a class is
    complete with its last chunk and the main process holds one class at a
    time. Lazy: nothing is materialised for a million files."""

    def __init__(self, entries: Sequence[ClassEntry], batch_size: int):
        self.entries = list(entries)
        self.batch_size = batch_size
        self.stamps: dict[str, dict[str, list[int]]] = {}  # class -> file_stamps, taken as below

    def __iter__(self):
        bs = self.batch_size
        for c, e in enumerate(self.entries):
            # The loader draws the chunks in the main process before any worker opens their files: a class's
            # stamps taken here predate every read of it, so a file rewritten meanwhile is seen as changed by
            # the next run (and encoded again), never cached under its new stamp with its old pixels.
            self.stamps[e.name] = file_stamps(e)
            for s in range(0, len(e.files), bs):
                yield [(c, i, e.files[i]) for i in range(s, min(s + bs, len(e.files)))]

    def __len__(self) -> int:
        return sum(-(-len(e.files) // self.batch_size) for e in self.entries)


class ClassBuffer:
    """What the main process holds of the class being encoded: its latents so
    far (on the encoding device), the readable images not yet encoded (fewer
    than one batch), and the paths encoded and skipped, in file order."""

    def __init__(self, entry: ClassEntry, stamps: dict[str, list[int]]):
        self.entry = entry
        self.stamps = stamps  # taken before any of its files was read (ClassChunks)
        self.remaining = len(entry.files)  # files the loader has not delivered yet
        self.chunks: list[torch.Tensor] = []  # (b, C, h, w) float32 latents
        self.pending: list[torch.Tensor] = []  # uint8 (k, 3, S, S) images
        self.n_pending = 0
        self.done: list[str] = []
        self.skipped: list[str] = []
        self.t = {"decode_seconds": 0.0, "load_wait_seconds": 0.0, "encode_seconds": 0.0}

    def take(self, n: int) -> torch.Tensor:
        """The first n pending images, (n, 3, S, S) uint8."""
        x = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.pending = [x[n:]] if x.shape[0] > n else []
        self.n_pending -= n
        return x[:n]


# --------------------------------------------------------------------------- #
# the cache
# --------------------------------------------------------------------------- #
def _data_damaged(path: str) -> bool:
    """Whether a cache file's latents (read whole) fail the sha256 recorded when it was written (a bad sector,
    a copy gone wrong: the header's checks cannot see it). A file from before the record: never."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            want = (f.metadata() or {}).get("latents_sha256")
            return want is not None and latents_sha256(f.get_tensor("latents").clone()) != want
    except Exception:  # cut or changed since its header was read
        return True


DAMAGED = "damaged (its latents' sha256 is not the one recorded when it was written)"


def _split_cached(entries: Sequence[ClassEntry], cache_dir: str, key: CacheKey,
                  verify: bool = False) -> tuple[dict[str, dict[str, Any]], list[ClassEntry]]:
    """(stats of the classes already cached with matching metadata, the classes to encode); ``verify``: a
    cached class's latents are read and checked against their recorded sha256 too (damaged: encoded again)."""
    stats: dict[str, dict[str, Any]] = {}
    todo = []
    for e in entries:
        path = class_cache_path(cache_dir, e.name)
        meta, stale = _is_cached(path, e, key)
        if meta is not None and verify and _data_damaged(path):
            meta, stale = None, DAMAGED
        if stale in (UNREADABLE, DAMAGED):  # damage (a full disk, a cut copy) is worth a warning, a changed input not
            log.warning("latent cache file %s of class %s is %s: encoding the class again", path, e.name, stale)
        elif stale is not None:
            log.info("latent cache of class %s is stale (%s): encoding it again", e.name, stale)
        if meta is not None:
            stats[e.name] = {"n": len(meta["files"]), "cached": True, "seconds": 0.0, "path": path,
                             "skipped": [os.path.join(e.folder, s) for s in meta["skipped"]],
                             "encoded_with": meta["encoded_with"],  # None: a file from before it was recorded
                             "stamps": stamps_digest(meta["stamps"])}
        else:
            todo.append(e)
    return stats, todo


def _float32_le(latents: torch.Tensor):
    """``latents`` as the float32 little-endian array a cache file stores (numpy, C order)."""
    return latents.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)


def safetensors_bytes(latents: torch.Tensor, metadata: dict[str, str], name: str = "latents") -> bytes:
    """A safetensors file holding ``latents`` (float32, stored as ``name``) and ``metadata``,
    with a sorted-key header, so equal inputs give equal bytes.

    ``safetensors.torch.save`` orders the metadata as a Rust HashMap iterates,
    which changes from call to call; the cache files are meant to be comparable
    byte for byte (across runs, ranks and ``num_workers``). Layout (the
    safetensors format): u64 little-endian header length, the JSON header
    padded with spaces to a multiple of 8, then the tensor's bytes.
    """
    x = _float32_le(latents)
    data = x.tobytes()
    header = {"__metadata__": dict(metadata),
              name: {"dtype": "F32", "shape": list(x.shape), "data_offsets": [0, len(data)]}}
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def latents_sha256(latents: torch.Tensor) -> str:
    """sha256 of the float32 little-endian bytes a cache file stores for ``latents``: a byte of the data
    changed on disk (the header's checks cannot see it) is found when the class is loaded."""
    return hashlib.sha256(_float32_le(latents).tobytes()).hexdigest()


def encoded_with(batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What made a class's latents that changes only their float rounding (so a cache made otherwise is
    still reused): the encoder's batch size, device type and precision. Recorded in each cache file."""
    return {"batch_size": int(batch_size), "device": device.type, "precision": encode_precision(device, dtype)}


def _write_class(cache_dir: str, e: ClassEntry, latents: torch.Tensor, done: list[str],
                 skipped: list[str], key: CacheKey, stamps: dict[str, list[int]], made: dict[str, Any]) -> str:
    """Write one class's file atomically (``made``: :func:`encoded_with`); returns its path."""
    if not done:
        raise DataError(f"class {e.name} in {os.path.dirname(e.folder)}: none of its "
                        f"{len(e.files)} images could be read (first: {skipped[0]})")
    meta = {
        "format": FORMAT,
        "class": e.name,
        "files": json.dumps([os.path.relpath(p, e.folder) for p in done]),
        "skipped": json.dumps([os.path.relpath(p, e.folder) for p in skipped]),
        "image_size": str(int(key.image_size)),
        "scaling_factor": repr(key.scaling),
        "vae": key.vae,
        "stamps": json.dumps(stamps, sort_keys=True),
        "encoded_with": json.dumps(made, sort_keys=True),
        "latents_sha256": latents_sha256(latents),  # what load_class_latents checks the data against
    }
    path = class_cache_path(cache_dir, e.name)
    atomic_write_bytes(path, safetensors_bytes(latents, meta))
    if skipped:
        log.warning("class %s: skipped %d unreadable image(s)", e.name, len(skipped))
    return path


def _skip_image(path: str, message: str) -> None:
    warnings.warn(f"skipping unreadable image {path}", stacklevel=3)
    log.warning("%s", message)


def _latent_shape(config, image_size: int) -> tuple[int, int, int] | None:
    """(C, h, w) of an image's latents under an AutoencoderKL ``config`` (None where the config does not say,
    or the size is not a multiple of its downsampling, where the padding sets h)."""
    channels, blocks = getattr(config, "latent_channels", None), getattr(config, "block_out_channels", None)
    if not isinstance(channels, int) or not blocks:
        return None
    down = 2 ** (len(blocks) - 1)
    return (channels, image_size // down, image_size // down) if image_size % down == 0 else None


def _prepare_cache(entries, vae, device, cache_dir: str, image_size: int, vae_digest: str | None, verify: bool):
    """Move the VAE to ``device``; returns (device, cache key, stats of cached classes, classes to encode)."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        # (not every image "unreadable", as PIL's resize to 0 px made it, nor a convolution's error for 1 px)
        raise ConfigError(f"--image-size {image_size!r}: must be an integer >= 1")
    for e in entries:  # before anything is encoded (data.scan_image_folder never makes such a class)
        if not e.files:
            raise DataError(f"class {e.name} in {os.path.dirname(e.folder) or '.'} has no image files")
    if device is not None:
        vae.to(device)
    dev = next(vae.parameters()).device
    key = CacheKey(int(image_size), float(vae.config.scaling_factor), vae_digest or weights_digest(vae),
                   _latent_shape(vae.config, int(image_size)))
    os.makedirs(cache_dir, exist_ok=True)
    for path in sweep_stale_temps(cache_dir):
        log.info("removed %s, left by a killed cache write", path)
    stats, todo = _split_cached(entries, cache_dir, key, verify)
    if todo and not os.access(cache_dir, os.W_OK):  # (found at the first write, once a whole class was encoded)
        raise ConfigError(f"latent cache folder {cache_dir} is not writable, and class {todo[0].name} is not cached "
                          f"there, or its file is stale or damaged ({len(todo)} class(es) to encode): give a "
                          f"writable --cache-dir (or ${CACHE_ENV})")
    return dev, key, stats, todo


def cache_latents(entries: Sequence[ClassEntry], vae, *, cache_dir: str, image_size: int,
                  batch_size: int = 32, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, progress: bool = True,
                  num_workers: int | None = None, vae_digest: str | None = None,
                  verify: bool = False) -> dict[str, dict[str, Any]]:
    """Encode every image of ``entries`` and store one safetensors file per class.

    Images stream class after class through a ``torch.utils.data.DataLoader``:
    ``num_workers`` processes decode and centre-crop (PIL, on the CPU) into
    uint8, each at most :data:`PREFETCH` batches ahead; batches are pinned when
    the VAE is on CUDA and copied without blocking; the uint8 -> [-1, 1]
    conversion runs on the VAE's device. The main process holds one class at a
    time and writes it as soon as its last image is encoded. Encoder batches
    hold ``batch_size`` readable images of one class, in file order, exactly as
    :func:`cache_latents_ref` forms them, so the files are byte-identical to it
    for any ``num_workers``.

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
        num_workers: image-decoding processes; 0 decodes in this process.
            None = :func:`default_num_workers`, never more than the loader has batches.
        vae_digest: :func:`weights_digest` of ``vae`` where the caller has it (None: computed here).
        verify: read every cached class's latents and check them against the sha256 recorded when they
            were written; a damaged file is warned about and its class encoded again (``manifoldgd-fast
            cache`` does; a distill run checks each class when it loads it, and stops on a damaged one).

    Returns:
        ``{class: {"n": rows, "skipped": [paths], "cached": reused?, "seconds": s,
        "path": file, "encoded_with": encoded_with(...) of whatever made the file (None for
        a file older than that record)}}``; an encoded class also has ``decode_seconds`` (worker
        time reading its images), ``load_wait_seconds`` (time this process
        waited for the loader) and ``encode_seconds`` (time in the encoder,
        including the copy of its latents to the host).

    Raises:
        DataError: a class where no image could be read.
        ConfigError: ``batch_size`` < 1 or ``num_workers`` < 0, or a class to encode and
            ``cache_dir`` not writable.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"--encode-batch-size {batch_size}: must be >= 1")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"num_workers {num_workers}: must be >= 0")
    dev, key, stats, todo = _prepare_cache(entries, vae, device, cache_dir, image_size, vae_digest, verify)
    if not todo:
        return {e.name: stats[e.name] for e in entries}

    sampler = ClassChunks(todo, batch_size)
    workers = default_num_workers() if num_workers is None else num_workers
    workers = min(workers, len(sampler))  # a resumed run with one small class forks no idle processes
    # Batches come back in sampler order whichever worker decoded them (the default; torch >= 2.6
    # calls it in_order=True). No persistent_workers: the loader makes one pass, its workers end with it.
    loader = torch.utils.data.DataLoader(
        ImageFiles(image_size), batch_sampler=sampler, collate_fn=collate_class_chunk,
        num_workers=workers, pin_memory=dev.type == "cuda",
        prefetch_factor=PREFETCH if workers else None, worker_init_fn=_worker_ignores_sigterm if workers else None)
    lut = normalise_lut(dev)
    use_autocast = dev.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    made = encoded_with(batch_size, dev, dtype)

    def encode(buf: ClassBuffer, n: int) -> None:
        t0 = time.perf_counter()
        x = lut[buf.take(n).int()]  # (n, 3, S, S) float32 in [-1, 1], as data.load_image
        with torch.autocast("cuda", dtype=dtype) if use_autocast else contextlib.nullcontext():
            buf.chunks.append(encode_images(vae, x))  # (n, C, h, w) float32, stays on the device
        buf.t["encode_seconds"] += time.perf_counter() - t0

    bar = tqdm(total=sum(len(e.files) for e in todo), unit="img", desc="encode latents",
               disable=not progress)
    batches = iter(loader)
    buf: ClassBuffer | None = None
    t_class = time.perf_counter()  # a class's "seconds" run from the end of the previous one
    try:
        while True:
            t0 = time.perf_counter()
            b = next(batches, None)
            if b is None:
                break
            if buf is None:
                buf = ClassBuffer(todo[b["class"]], sampler.stamps[todo[b["class"]].name])
            buf.t["load_wait_seconds"] += time.perf_counter() - t0
            buf.t["decode_seconds"] += b["decode_s"]
            for p, msg in b["errors"]:  # warned here: a worker's warnings would never reach the user
                buf.skipped.append(p)
                _skip_image(p, msg)
            if b["images"] is not None:
                buf.pending.append(b["images"].to(dev, non_blocking=True))  # (k, 3, S, S) uint8
                buf.n_pending += len(b["paths"])
                buf.done += b["paths"]
            while buf.n_pending >= batch_size:
                encode(buf, batch_size)
            buf.remaining -= b["n_files"]
            bar.update(b["n_files"])
            if buf.remaining:
                continue
            if buf.n_pending:  # the class's last, partial batch
                encode(buf, buf.n_pending)
            t0 = time.perf_counter()
            latents = torch.cat(buf.chunks).cpu() if buf.chunks else None  # (n, C, h, w) float32
            buf.t["encode_seconds"] += time.perf_counter() - t0  # waits for the device's queue
            e = buf.entry
            path = _write_class(cache_dir, e, latents, buf.done, buf.skipped, key, buf.stamps, made)
            stats[e.name] = {"n": latents.shape[0], "cached": False, "path": path, "encoded_with": made,
                             "stamps": stamps_digest(buf.stamps),
                             "skipped": list(buf.skipped), "seconds": time.perf_counter() - t_class,
                             **buf.t}
            buf, t_class = None, time.perf_counter()
    finally:
        bar.close()
        # Stop the workers now, not when an exception's traceback lets go of the iterator.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    return {e.name: stats[e.name] for e in entries}


def cache_latents_ref(entries: Sequence[ClassEntry], vae, *, cache_dir: str, image_size: int,
                      batch_size: int = 32, device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float32, progress: bool = False,
                      num_workers: int | None = None, vae_digest: str | None = None,
                      verify: bool = False) -> dict[str, dict[str, Any]]:
    """Reference for :func:`cache_latents`, same signature and files: one class
    after another, images read in this process (``num_workers`` is ignored) by
    :func:`~manifoldgd_fast.data.iter_class_images`, normalised on the CPU,
    encoded in batches of ``batch_size`` readable images."""
    dev, key, stats, todo = _prepare_cache(entries, vae, device, cache_dir, image_size, vae_digest, verify)
    use_autocast = dev.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    for e in todo:
        t0 = time.perf_counter()
        stamps = file_stamps(e)  # before reading: a file changed meanwhile makes the cache stale, never wrong
        batches = iter_class_images(e, image_size, batch_size, num_workers=0)
        chunks, done = [], []
        for images, paths in batches:  # images: (b, 3, S, S) float32 in [-1, 1]
            with torch.autocast("cuda", dtype=dtype) if use_autocast else contextlib.nullcontext():
                chunks.append(encode_images(vae, images).cpu())  # (b, C, h, w)
            done += paths
        latents = torch.cat(chunks) if chunks else None
        made = encoded_with(batch_size, dev, dtype)
        path = _write_class(cache_dir, e, latents, done, batches.skipped, key, stamps, made)
        stats[e.name] = {"n": len(done), "cached": False, "path": path, "encoded_with": made,
                         "stamps": stamps_digest(stamps),
                         "skipped": list(batches.skipped), "seconds": time.perf_counter() - t0}
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
            # a copy: safetensors' tensor maps the file, and a read after the file is cut in place (a cp over
            # it; on NFS, another node's re-encode) would kill the process with SIGBUS
            latents = f.get_tensor("latents").clone()
            dtype = f.get_slice("latents").get_dtype()
            meta = f.metadata() or {}
        files = json.loads(meta["files"])
        held = meta.get("class", name)
        if not _str_list(files):
            raise ValueError("its list of image files is not a list of names")
        wrong = _latents_mismatch(dtype, list(latents.shape), files)
        if wrong is not None:
            raise ValueError(wrong)
    except Exception as e:  # damaged, foreign or truncated file
        raise DataError(f"class {name}: latent cache file {path} is damaged ({e}); delete it "
                        "to recompute") from None
    want = meta.get("latents_sha256")  # (files written before it was recorded: not compared)
    if want is not None and latents_sha256(latents) != want:
        raise DataError(f"class {name}: latent cache file {path} is {DAMAGED}; delete it to recompute, or run "
                        "`manifoldgd-fast cache`, which encodes it again")
    if held != name:  # another class's file under this name (a case-insensitive file system: Cat and cat)
        raise DataError(f"class {name}: latent cache file {path} holds class {held!r}; class names that differ only "
                        "in case cannot share a cache on this file system: rename one class folder")
    if not bool(torch.isfinite(latents).all()):  # named here, not as a NaN deep in mode discovery
        raise DataError(f"class {name}: latent cache file {path} holds NaN or inf; delete it to recompute "
                        "(with --dtype float32 if the encoder overflowed)")
    return latents, files
