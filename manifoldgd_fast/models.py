"""Load the class-conditional DiT and its VAE, or build random-init ones.

Loading never touches the network: a model is a local folder (diffusers
``save_pretrained`` layout), a pipeline folder with ``transformer/`` and
``vae/`` subfolders (as ``facebook/DiT-XL-2-256`` is laid out), or a Hugging
Face repo id already in the local cache (``local_files_only=True``).

The random-init builders (:func:`tiny_dit_config`, :func:`dit_xl2_config`,
:func:`tiny_vae_config`) give tests and benchmarks the real architectures
without weights.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import math
import os
import re
from typing import Any

import torch

from .config import TIME_EMBEDDINGS
from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #
def _weight_files(folder: str) -> list[str]:
    files: list[str] = []
    for pat in WEIGHT_PATTERNS:
        files += glob.glob(os.path.join(folder, pat))
    return sorted(files)


def weights_variant(folder: str, stems: tuple[str, ...] = ("diffusion_pytorch_model",)) -> str | None:
    """The variant (``fp16``, ...) of a folder that holds only variant weights (``<stem>.fp16.safetensors``,
    as ``from_pretrained(..., variant="fp16")`` caches them), else None: such a folder loads only when
    the variant is named. Of several (``ema`` and ``fp16``), fp16, else the first by name; which one loads
    is logged. ``stems``: the weight file names of the library (transformers: model, pytorch_model)."""
    names = os.listdir(folder)
    alt = "|".join(re.escape(s) for s in stems)
    if any(re.match(rf"^({alt})(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$", n) for n in names):
        return None
    tagged = re.compile(rf"^({alt})\.(\w+?)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
    found = sorted({m.group(2) for n in names if (m := tagged.match(n))})
    if not found:
        return None
    pick = "fp16" if "fp16" in found else found[0]
    others = f" (it also holds {', '.join(v for v in found if v != pick)})" if len(found) > 1 else ""
    log.info("%s holds only variant weights: loading the %s variant%s", folder, pick, others)
    return pick


def _damaged_file(files: list[str]) -> tuple[str, str] | None:
    """The first weight file that cannot be opened, with the reason (or None)."""
    from safetensors import safe_open

    for f in files:
        try:
            if f.endswith(".safetensors"):
                # Opening parses the header and checks it against the file length,
                # which catches truncation and garbage without reading the tensors.
                with safe_open(f, framework="pt") as st:
                    keys = list(st.keys())
                if not keys:
                    return f, "holds no tensors"
            elif f.endswith(".bin"):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any failure to parse means the file is damaged
            return f, _first_line(e)
    return None


def _first_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one short line (messages stay one line for the CLI)."""
    s = " ".join(str(e).split())
    if not s:
        return type(e).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


# config.json "_class_name" values each loader accepts: the hub's DiT-XL-2-256
# predates DiTTransformer2DModel and still says Transformer2DModel.
ACCEPTED_CLASSES = {
    "DiTTransformer2DModel": ("DiTTransformer2DModel", "Transformer2DModel"),
    "AutoencoderKL": ("AutoencoderKL",),
}


def _check_config(cls, folder: str, flag: str, arg: str) -> None:
    """Refuse a config of another model class before diffusers half-loads it."""
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{flag} {arg}: config file {path} is damaged ({_first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{flag} {arg}: config file {path} is not a JSON object")
    name = cfg.get("_class_name")
    accepted = ACCEPTED_CLASSES.get(cls.__name__, (cls.__name__,))
    if name is not None and name not in accepted:
        # the VAE looked for in --model's own folder (no --vae): a DiT folder with no vae/ beside it
        hint = " (it has no vae/: give the VAE with --vae)" if flag == "--model" and cls.__name__ == "AutoencoderKL" \
            else ""
        raise ModelError(f"{flag} {arg}: {path} describes a {name}; expected {accepted[0]}{hint}")


def _load_from_folder(cls, folder: str, flag: str, arg: str, dtype: torch.dtype):
    """Load ``cls`` from a diffusers model folder, turning damage into ModelError."""
    _check_config(cls, folder, flag, arg)
    weights = _weight_files(folder)
    if not weights:
        raise ModelError(f"{flag} {arg}: {folder} has {CONFIG_NAME} but no weights "
                         "(diffusion_pytorch_model.safetensors)")
    # Without accelerate diffusers would warn on every load that it falls back.
    low_mem = importlib.util.find_spec("accelerate") is not None
    # .bin weights alone: said up front, or diffusers prints that it found no .safetensors and falls back
    pickled = not any(w.endswith((".safetensors", ".safetensors.index.json")) for w in weights)
    try:
        model, info = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                          low_cpu_mem_usage=low_mem, output_loading_info=True,
                                          variant=weights_variant(folder), use_safetensors=False if pickled else None)
    except Exception as e:  # diffusers raises OSError/ValueError/RuntimeError/SafetensorError
        bad = _damaged_file(weights)
        if bad is not None:
            raise ModelError(f"{flag} {arg}: weight file {bad[0]} is damaged ({bad[1]})") from None
        raise ModelError(f"{flag} {arg}: cannot load {cls.__name__} from {folder} "
                         f"({_first_line(e)})") from None
    # diffusers only warns when tensors are missing and leaves them random:
    # a silently half-initialised model would sample garbage, so refuse it.
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing:
        first = missing[0] if isinstance(missing[0], str) else missing[0][0]
        raise ModelError(f"{flag} {arg}: weights in {folder} do not fit {cls.__name__} "
                         f"({len(missing)} tensors missing or mis-shaped, e.g. {first})")
    return model


def _cached_snapshot(repo_id: str, cache_dir: str | None) -> str | None:
    """The local snapshot folder of a cached Hugging Face repo, or None.

    ``local_files_only`` guarantees no network access: an id that is not cached
    (or not a valid id) simply gives None.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir)
    except Exception:  # LocalEntryNotFoundError, HFValidationError (ValueError), ...
        return None


WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def resolve_root(path_or_id, *, flag: str, what: str, cache_dir: str | None = None) -> str:
    """The local folder of a model: the folder itself or the cached snapshot of a HF id (never downloads)."""
    if not isinstance(path_or_id, (str, os.PathLike)) or not str(path_or_id):
        raise ModelError(f"{flag} {path_or_id!r}: give a model folder or a Hugging Face id")
    arg = str(path_or_id)
    root = arg if os.path.isdir(arg) else _cached_snapshot(arg, cache_dir)
    if root is None and arg.lower().endswith(WEIGHT_FILE_SUFFIXES) and not os.path.exists(arg):  # a file name
        raise ModelError(f"{flag} {arg}: no such file")
    if root is None:
        raise ModelError(f"{flag} {arg}: no {what} found (not a local folder, not in the Hugging Face cache)"
                         + _fetch_hint(arg, cache_dir))
    return root


def _fetch_hint(arg: str, cache_dir: str | None) -> str:
    """Where the cache was looked for, and how to fill it, for an argument shaped like a hub id."""
    if os.path.isabs(arg) or arg.startswith(".") or arg.count("/") != 1 or os.path.exists(arg):
        return ""   # a path: the folder is simply not there
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        where = cache_dir or HF_HUB_CACHE
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        where = cache_dir or "the Hugging Face cache"
    return (f"; looked in {where}. Nothing is downloaded at run time: fetch it once where there is network "
            f"(`hf download {arg}`, huggingface_hub's CLI) into that cache, or give its folder")


def _load(cls, path_or_id: str, subfolder: str, flag: str, what: str, *, device, dtype,
          cache_dir: str | None):
    root = resolve_root(path_or_id, flag=flag, what=what, cache_dir=cache_dir)
    arg = str(path_or_id)
    # A model folder keeps config.json at its root, a pipeline in a subfolder.
    for folder in (root, os.path.join(root, subfolder)):
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            break
    else:
        raise ModelError(f"{flag} {arg}: no {what} in {root} (neither {CONFIG_NAME} "
                         f"nor {subfolder}/{CONFIG_NAME})")
    model = _load_from_folder(cls, folder, flag, arg, dtype)
    model = model.to(device)  # dtype was set by from_pretrained (keeps fp32-only modules)
    model.eval()  # the DiT label embedder drops labels at random in train mode
    return model


def set_time_embedding(model, kind: str) -> None:
    """Make a DiT's sinusoidal timestep features (and LayerNorm eps) those its weights were trained with.

    facebookresearch/DiT (and the ManifoldGD / MGD³ releases, which run its model code) divide the
    log-frequencies by ``half`` = 128 ("original"); diffusers' DiT divides by ``half - 1`` = 127
    (``downscale_freq_shift=1``, "diffusers"), which moves the embedding of t = 999 by about its own
    norm. The hub's ``facebook/DiT-XL-2-*`` weights are the original ones converted, so they want
    "original"; a DiT trained with diffusers' module (the shipped digits model) wants "diffusers".
    "original" also gives each block's second LayerNorm (``norm3``) DiT's eps, 1e-6, where diffusers
    uses the config's ``norm_eps`` (1e-5 by default; a change of about 1e-5 relative).
    """
    if kind not in TIME_EMBEDDINGS[1:]:
        raise ConfigError(f"--time-embedding {kind!r}: expected {' or '.join(TIME_EMBEDDINGS[1:])}")
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Timesteps" and hasattr(m, "downscale_freq_shift"):
            m.downscale_freq_shift = 0 if kind == "original" else 1
            n += 1
    if n == 0:
        raise ModelError(f"{type(model).__name__}: no timestep embedding (diffusers Timesteps) found to set")
    from .dit_checkpoint import DIT_LAYERNORM_EPS

    eps = DIT_LAYERNORM_EPS if kind == "original" else getattr(model.config, "norm_eps", 1e-5)
    for blk in getattr(model, "transformer_blocks", ()):
        if isinstance(getattr(blk, "norm3", None), torch.nn.LayerNorm):
            blk.norm3.eps = eps
    model.time_embedding = kind


def time_embedding_for(model, path_or_id, requested: str = "auto") -> str:
    """``requested``, or for "auto": what the weights were trained with. "original" for an original
    ``.pt`` checkpoint and for the architecture facebookresearch released weights of (DiT-XL/2 over
    1,000 classes: those weights or a fine-tune of them), unless the folder's ``finetune.json``
    records otherwise; else "diffusers"."""
    from .dit_checkpoint import is_dit_checkpoint
    from .finetune import read_finetune_record

    if requested != "auto":
        return requested
    if is_dit_checkpoint(path_or_id):
        return "original"
    kind = (read_finetune_record(str(path_or_id)) or {}).get("time_embedding")
    if kind in TIME_EMBEDDINGS[1:]:
        return kind
    c = model.config
    xl2 = (c.num_layers, c.num_attention_heads, c.attention_head_dim, c.patch_size) == (28, 16, 72, 2)
    return "original" if xl2 and c.num_embeds_ada_norm == 1000 else "diffusers"


def load_dit(path_or_id: str, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, cache_dir: str | None = None, time_embedding: str = "auto"):
    """Load a ``DiTTransformer2DModel`` (eval mode) from a folder or the HF cache.

    Args:
        path_or_id: a folder with ``config.json`` + weights, a pipeline folder
            with ``transformer/``, or a Hugging Face id already cached
            (e.g. ``facebook/DiT-XL-2-256``).
        cache_dir: Hugging Face cache to look in (None = the default one).

    An original DiT checkpoint (``DiT-XL-2-256x256.pt`` from facebookresearch/DiT, as the
    ManifoldGD and MGD³ releases use it) loads too: :mod:`dit_checkpoint`.

    time_embedding: auto | original | diffusers (:func:`set_time_embedding`, :func:`time_embedding_for`);
    the model's ``time_embedding`` attribute says which it runs.

    Raises ModelError naming ``--model`` and the folder / file at fault.
    """
    from diffusers import DiTTransformer2DModel

    from .dit_checkpoint import is_dit_checkpoint, load_dit_checkpoint

    if time_embedding not in TIME_EMBEDDINGS:
        raise ConfigError(f"--time-embedding {time_embedding!r}: expected one of {', '.join(TIME_EMBEDDINGS)}")
    if is_dit_checkpoint(path_or_id):
        model = load_dit_checkpoint(str(path_or_id), device=device, dtype=dtype)
    else:
        model = _load(DiTTransformer2DModel, path_or_id, "transformer", "--model", "DiT",
                      device=device, dtype=dtype, cache_dir=cache_dir)
    set_time_embedding(model, time_embedding_for(model, path_or_id, time_embedding))
    return model


def load_vae(path_or_id: str, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, cache_dir: str | None = None, flag: str = "--vae"):
    """Load an ``AutoencoderKL`` (eval mode) from a folder, a pipeline folder's
    ``vae/``, or a cached Hugging Face id (e.g. ``stabilityai/sd-vae-ft-ema``).

    Raises ModelError naming ``flag`` (``--vae``, or ``--model`` when the VAE is
    the model folder's ``vae/``) and the folder / file at fault.
    """
    from diffusers import AutoencoderKL

    vae = _load(AutoencoderKL, path_or_id, "vae", flag, "VAE", device=device, dtype=dtype, cache_dir=cache_dir)
    sf = getattr(vae.config, "scaling_factor", None)   # (a damaged config.json: null, "0.18215", 0)
    if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not math.isfinite(sf) or sf <= 0:
        raise ModelError(f"{flag} {path_or_id}: the VAE's config.json sets scaling_factor {sf!r}; it must be a "
                         "number > 0 (SD's VAEs: 0.18215)")
    return vae


# --------------------------------------------------------------------------- #
# what the rest of the package needs to know about a model
# --------------------------------------------------------------------------- #
def model_family(path_or_id, cache_dir: str | None = None) -> str:
    """The generator family of ``--model``: "sd" for a Stable Diffusion folder
    (model_index.json with a ``unet``, or a ``unet/`` subfolder), else "dit".

    An id that is neither a folder nor cached gives "dit": its loader then names the problem.
    """
    from .sd import is_sd_folder

    if not isinstance(path_or_id, (str, os.PathLike)) or not str(path_or_id):
        return "dit"
    arg = str(path_or_id)
    if os.path.isfile(arg):  # an original DiT .pt checkpoint
        return "dit"
    root = arg if os.path.isdir(arg) else _cached_snapshot(arg, cache_dir)
    return "sd" if root is not None and is_sd_folder(root) else "dit"


def check_model_source(path_or_id, cache_dir: str | None = None) -> None:
    """Raise ModelError naming ``--model`` unless it can hold a generator: an original DiT
    ``.pt`` / ``.pth`` file, or a local / cached folder with a DiT (``config.json`` or
    ``transformer/config.json``) or a Stable Diffusion layout (``unet/``). Only file names are
    read, so this runs before any weights load (before the VAE, which may sit in the same folder)."""
    from .sd import is_sd_folder

    arg = str(path_or_id)
    if os.path.isfile(arg):
        if not arg.lower().endswith((".pt", ".pth")):
            raise ModelError(f"--model {arg}: a file, but not a DiT checkpoint (.pt / .pth); give a checkpoint "
                             "or a model folder")
        return
    root = resolve_root(path_or_id, flag="--model", what="model", cache_dir=cache_dir)
    if is_sd_folder(root):
        return
    if not any(os.path.isfile(os.path.join(root, sub, CONFIG_NAME)) for sub in ("", "transformer")):
        from .finetune import CHECKPOINT

        if os.path.isfile(os.path.join(root, CHECKPOINT)):  # (it said "no model", naming no fine-tune)
            raise ModelError(f"--model {arg}: an unfinished fine-tune ({CHECKPOINT}, no weights written yet): rerun "
                             "its finetune command to finish it")
        raise ModelError(f"--model {arg}: no model in {root} (neither a DiT: {CONFIG_NAME} or "
                         f"transformer/{CONFIG_NAME}, nor a Stable Diffusion folder: unet/)")


def dit_info(model) -> dict[str, Any]:
    """Shape facts of a DiT: num_classes, null_class (= num_classes, the CFG
    "unconditional" label), latent_size, in_channels, out_channels,
    learned_sigma (out_channels == 2*in_channels), patch_size.

    A model that is not a DiT (``sd.TextConditionedDenoiser``) reports its own
    through ``denoiser_info()``."""
    if hasattr(model, "denoiser_info"):
        return model.denoiser_info()
    cfg = model.config
    in_ch = cfg.in_channels
    out_ch = cfg.out_channels if cfg.out_channels is not None else in_ch
    num_classes = cfg.num_embeds_ada_norm
    return {
        "num_classes": num_classes,
        "null_class": num_classes,
        "latent_size": cfg.sample_size,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "learned_sigma": out_ch == 2 * in_ch,
        "patch_size": cfg.patch_size,
        "time_embedding": getattr(model, "time_embedding", "diffusers"),
    }


def vae_info(vae) -> dict[str, Any]:
    """scaling_factor, latent_channels and the spatial downsample factor
    (2 ** (number of encoder blocks - 1)) of an AutoencoderKL."""
    cfg = vae.config
    return {
        "scaling_factor": float(cfg.scaling_factor),
        "latent_channels": cfg.latent_channels,
        "downsample": 2 ** (len(cfg.block_out_channels) - 1),
    }


# --------------------------------------------------------------------------- #
# random-init builders (tests, benchmarks)
# --------------------------------------------------------------------------- #
def dit_xl2_config() -> dict[str, Any]:
    """DiT-XL/2 at 256 px (facebook/DiT-XL-2-256): 28 layers, 16 heads x 72,
    patch 2 on a 4x32x32 latent, 1000 classes (+ null), learned sigma (8 out)."""
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                activation_fn="gelu-approximate", norm_type="ada_norm_zero",
                norm_elementwise_affine=False, attention_bias=True, dropout=0.0)


def tiny_dit_config(num_classes: int = 10, sample_size: int = 8, in_channels: int = 4,
                    num_layers: int = 2, num_attention_heads: int = 2,
                    attention_head_dim: int = 8, patch_size: int = 2) -> dict[str, Any]:
    """A DiT with the XL/2 structure at toy width (a few 10k parameters):
    learned sigma (out = 2*in) and the CFG null class row like the real one."""
    cfg = dit_xl2_config()
    cfg.update(num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
               in_channels=in_channels, out_channels=2 * in_channels, num_layers=num_layers,
               sample_size=sample_size, patch_size=patch_size, num_embeds_ada_norm=num_classes)
    return cfg


def seeded_init(make, seed: int | None = 0):
    """``make()`` (a module constructor) under ``seed``, without touching the global RNG; eval mode.

    ``seed`` makes the weights reproducible (None: torch's current RNG).
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = make()
    return model.eval()


def build_dit(config: dict[str, Any], seed: int | None = 0):
    """A random-init ``DiTTransformer2DModel`` (eval mode) from ``config``.

    Note: diffusers zero-initialises nothing here, so outputs are non-trivial.
    """
    from diffusers import DiTTransformer2DModel

    return seeded_init(lambda: DiTTransformer2DModel(**config), seed)


def tiny_vae_config(sample_size: int = 16, latent_channels: int = 4,
                    block_out_channels: tuple[int, ...] = (8, 16)) -> dict[str, Any]:
    """An AutoencoderKL with ``len(block_out_channels)`` blocks (downsample
    2**(n-1); 2 with the default) and SD's scaling factor."""
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=list(block_out_channels), layers_per_block=1,
                latent_channels=latent_channels, norm_num_groups=4, sample_size=sample_size,
                scaling_factor=0.18215)


def build_vae(config: dict[str, Any], seed: int | None = 0):
    """A random-init ``AutoencoderKL`` (eval mode) from ``config``."""
    from diffusers import AutoencoderKL

    return seeded_init(lambda: AutoencoderKL(**config), seed)


def save_pretrained_folder(model, folder: str) -> str:
    """``save_pretrained`` with safetensors (config.json + diffusion_pytorch_model.safetensors), written
    atomically: a kill leaves the folder's old content or the new, never a truncated weights file."""
    from .output import write_folder_atomically

    return write_folder_atomically(folder, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))
