"""``distill(config)``: image folder -> latents -> modes -> guided sampling -> image folder.

One class at a time, each an independent unit: its modes and every sample's
noise come from seeds derived from (run seed, class name, sample index), and
it is written atomically, so a killed run resumes where it stopped and gives
the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .config import (LABEL_MAPS, DistillConfig, fields_digest, fingerprint_fields, nearest_existing,
                     unused_prompt_options)
from .devices import resolve_device
from .distributed import Shard
from .profile import phase
from .errors import BackendError, ConfigError, DataError
from . import classrun
from .classrun import (_check_class, _prefetched_group, _receive, check_decoded, class_modes, distill_group,
                       load_modes, modes_file, read_modes)
from .output import (CONTACT_SHEET, DATA_STAMPS, LOCK_NAME, MANIFEST, MANIFEST_LOCK, MANIFEST_RECORDS, MODES_DIR,
                     RESERVED_DIRS,
                     OutputWriter, RunLock, atomic_write_bytes, class_done, done_record, lock_is_held, resize_images,
                     sweep_stale_temps)
from .finetune import read_finetune_record

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DistillResult:
    out: str
    # this rank's classes of the run (every class without --shard), with their stats: "status" "done" (whether
    # this call or an earlier one distilled it; ``distilled`` says which) or "pending" (another process's, unfinished)
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: str = ""
    run_classes: int = 0  # classes of the whole run, every rank's
    finished_before: int = 0  # classes of the run already finished when this call began (a resume)
    unfinished: int = 0  # classes of the run not finished when this call ended (other --shard processes')
    distilled: list[str] = field(default_factory=list)  # the classes this call distilled (a resume skips the rest)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 (16 hex) of this package's sources (.py, and the CUDA C++ the kernels compile): a resume
    made by other code is told apart from one made by the same code (the version string stays 0.1.0
    between releases)."""
    from .shipped import tree_digest

    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    # the package, and the repo's csrc/ beside it (a wheel carries it inside: kernels/cuda_ext.py)
    csrc = os.path.join(os.path.dirname(root), "csrc")   # named csrc/... either way
    walks = [(root, root)] + ([(csrc, os.path.dirname(root))] if os.path.isdir(csrc) else [])
    for top, rel in walks:
        tree_digest(h, top, rel, (".py", ".cu", ".cuh", ".cpp"))
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import diffusers
    import numpy
    import PIL
    import safetensors

    out = {"manifoldgd_fast": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "numpy": numpy.__version__, "safetensors": safetensors.__version__, "pillow": PIL.__version__,
           "python": platform.python_version()}  # Pillow: the PNG bytes and the resize are its
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    for name in ("triton", "transformers"):  # the kernels; the text encoder of the SD backbone
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


# ----------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------
def with_demo_defaults(cfg: DistillConfig) -> DistillConfig:
    """No --data and no --model: the embedded world (digits + the shipped tiny DiT and VAE).

    The digits are exported once to ``<cache>/digits/{train,test}``; the
    shipped weights are checked against their hashes before use.
    """
    if cfg.data is not None or cfg.model is not None or cfg.vae is not None:
        return cfg
    from .demo.digits import export_digits
    from .shipped import verify_shipped

    model = verify_shipped()
    root = export_digits(cfg.cache_dir)
    return dataclasses.replace(cfg, data=os.path.join(root, "train"), model=model,
                               extra={**cfg.extra, "demo": "digits", "real_val": os.path.join(root, "test")})


def prepare(cfg: DistillConfig, *, need_models: bool = True, shard: Shard | None = None, done=None,
            per_class: int | None = None, before_cache=None, verify_cache: bool = False):
    """Scan the data, load the models and fill the latent cache of this rank's classes.

    ``done(name)``: classes already finished (a resumed distill run); the rest are dealt to the
    ranks round-robin after every rank has looked, so a rerun after a dead rank spreads the
    remaining classes over all ranks instead of leaving them to the dead rank's successor.

    ``per_class``: images every class needs (the IPC of a distill or modes run), checked on the file
    count before anything is encoded.

    ``verify_cache``: read every cached class's latents and check their sha256 (``cache``: a damaged file
    is encoded again; a distill or modes run checks each class as it loads it).

    ``before_cache(pre)``: called before anything is encoded, with ``pre`` holding entries, device,
    backbone, schedule_kw, weights and dit_info (a distill refuses a resume into another run's OUT there; a
    finetune a model it cannot train).

    Returns a context dict: all class entries (run order), this rank's entries (to do),
    latent counts of this rank's classes, models, device, cache folder.
    """
    shard = shard or Shard()
    cfg = with_demo_defaults(cfg)
    from .classes import class_list
    from .data import scan_image_folder
    from .latents import cache_latents, encode_precision, latent_cache_dir, weights_digest
    from .models import check_model_source, dit_info, load_dit, load_vae, model_family, vae_info

    cfg.validate()
    if cfg.data is None:
        raise ConfigError("--data is required: the folder ROOT/<class>/<image> to distil")
    check_cache_outside_data(cfg.cache_dir, cfg.data)
    if need_models and cfg.model is None:
        raise ConfigError("--model is required: a DiT or Stable Diffusion folder, or a Hugging Face id "
                          "in the local cache")
    if cfg.model is None and cfg.vae is None:
        raise ConfigError("--vae (or --model, whose folder holds vae/) is required")
    if cfg.vae is None and cfg.model is not None and os.path.isfile(str(cfg.model)):
        raise ConfigError(f"--vae is required with a DiT checkpoint file ({cfg.model}), e.g. --vae stabilityai/sd-vae-ft-ema")
    if cfg.model is not None:  # before the VAE, which may be read from the same folder
        check_model_source(cfg.model)
    device = resolve_device(shard.device(cfg.device))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # streams, events and graphs made without a device land on this one
    dtype = _DTYPES[cfg.dtype]
    classes = class_list(cfg.classes) if cfg.classes else None
    backbone = cfg.backbone if cfg.backbone != "auto" else (model_family(cfg.model) if cfg.model else "dit")
    # a DiT's labels are its class ids; SD's only key prompts and seeds
    entries = scan_image_folder(cfg.data, classes=classes, label_map=cfg.label_map, warn_stray=backbone == "dit")

    for e in entries:  # every rank checks every class: a bad class stops all ranks alike, before any encoding
        if e.name in RESERVED_DIRS:
            raise DataError(f"class folder {e.folder}: {e.name!r} is the name of the run's own OUT/{e.name}/ folder; "
                            "rename the class folder")
        if e.name in (MANIFEST, CONTACT_SHEET):  # (found only when the run wrote it: 'Is a directory', every rerun)
            raise DataError(f"class folder {e.folder}: {e.name!r} is the name of the run's own OUT/{e.name} file; "
                            "rename the class folder")
        if per_class is not None and len(e.files) < per_class:
            raise DataError(f"class {e.name} has {len(e.files)} image files, fewer than --ipc {per_class}")
    if per_class is not None:  # the run's own rules (e.g. --steps under the default --t-stop), before any encoding
        cfg.resolve(len(entries), device, backbone=backbone)

    sd_checked = None
    if cfg.model is not None and backbone == "sd" and need_models:
        from .sd import check_sd_folder

        sd_checked = check_sd_folder(cfg.model)  # the folder's scheduler and text side, before any weights load
    vae = load_vae(cfg.vae or cfg.model, device=device, flag="--vae" if cfg.vae else "--model")
    vinfo = vae_info(vae)
    weights = {"vae": weights_digest(vae)}  # the manifest names the weights; a resume with others is refused
    model = info = None
    work = [e for e in entries if not done(e.name)] if done is not None else entries
    if shard.independent:  # a fixed share of the whole run, whatever the other shards have finished
        todo = {e.name for e in work}
        mine = [e for e in shard.mine(entries) if e.name in todo]
    else:
        mine = shard.mine(work)
    # each rank scanned --data (and --out) itself: all must have read the same, or they would deal other classes
    listing = [(e.name, e.label, e.relative_files()) for e in entries]
    shard.agree(fields_digest({"classes": listing, "finished": sorted({e.name for e in entries} - {e.name for e in work})}),
                "the classes, labels and files of --data and the finished classes of --out")
    if done is not None:
        shard.barrier()  # every rank has read which classes are finished before any rank writes one
    prompts, schedule_kw, sd_scheduler = {}, {}, {}
    if cfg.model is not None and backbone == "sd":
        from .data import _class_folders
        from .sd import check_distinct_text_inputs, check_vae_fits, class_prompts, load_sd_denoiser, sd_info

        if cfg.dit_impl != "diffusers":
            raise ConfigError("--dit-impl fused applies to the DiT backbone, not to Stable Diffusion")
        dataclasses.replace(cfg, backbone="sd").validate()  # SD-only rules (e.g. --cfg-channels) before any loading

        prompts = class_prompts([e.name for e in entries], cfg.prompt_template, cfg.class_names,
                                folders=_class_folders(os.path.abspath(cfg.data)), negative_prompt=cfg.negative_prompt)
        if sd_checked is not None:  # every class of the run, whichever shard or resume samples it
            check_distinct_text_inputs(sd_checked["tokenizer"], {e.label: prompts[e.name] for e in entries},
                                       {e.label: e.name for e in entries}, cfg.negative_prompt)
        n_labels = max(e.label for e in entries) + 1
        # the UNet config alone (no weights): its latents must be the VAE's
        info = sd_info(cfg.model, n_labels)
        check_vae_fits(vae, info, str(cfg.model), f"--vae {cfg.vae}" if cfg.vae else f"--model {cfg.model} (vae/)")
        if need_models:  # one text-encoder pass over this rank's class prompts, none per step
            model = load_sd_denoiser(cfg.model, {e.label: prompts[e.name] for e in mine}, num_classes=n_labels,
                                     negative_prompt=cfg.negative_prompt, device=device,
                                     names={e.label: e.name for e in mine}, checked=sd_checked)
            info = dit_info(model)
            schedule_kw = model.schedule_kwargs
            sd_scheduler = {"prediction_type": model.prediction_type, "timestep_spacing": schedule_kw["spacing"]}
            if float(schedule_kw["betas"][-1]) == 1.0:   # abar = 0 at t = T - 1 (rescale_betas_zero_snr)
                sd_scheduler["zero_terminal_snr"] = True
            # the folder's scheduler settings as sampled (an edited scheduler_config.json is another run)
            weights["scheduler"] = fields_digest({**sd_scheduler, **{k: (v.tolist() if hasattr(v, "tolist") else v)
                                                                    for k, v in schedule_kw.items()}})
            weights["model"] = weights_digest(model)  # the UNet (the prompt embeddings are not persistent)
            weights["text"] = model.text_digest       # what made the prompt embeddings
        latent = info["latent_size"] * vinfo["downsample"]
        if cfg.image_size is not None and cfg.image_size != latent:
            raise ConfigError(f"--image-size {cfg.image_size} does not match the model's {latent} px")
    elif cfg.model is not None:  # also for `cache`: the model fixes the image size
        model = load_dit(cfg.model, device=device, time_embedding=cfg.time_embedding)
        info = dit_info(model)
        if need_models:
            weights["model"] = weights_digest(model)  # before FusedDiT rearranges them
        if need_models and cfg.dit_impl == "fused":
            from .fastdit import FusedDiT

            model = FusedDiT(model, backend=cfg.backend,  # its LayerNorm-modulate / gate-residual ops, as the guidance's
                             attention="triton" if cfg.attention == "triton" else "sdpa")
        for e in entries:
            if not 0 <= e.label < info["num_classes"]:
                keyword = cfg.label_map in LABEL_MAPS
                hint = "try --label-map sorted or a class-map file" if keyword else \
                    f"fix the class map --label-map {cfg.label_map}"
                raise DataError(f"class {e.name} has label {e.label}, outside the model's {info['num_classes']} classes "
                                f"({hint}, or use a model trained on these classes)")
        latent = info["latent_size"] * vinfo["downsample"]
        if cfg.image_size is not None and cfg.image_size != latent:
            raise ConfigError(f"--image-size {cfg.image_size} does not match the model's {latent} px")
    uses_kernels = cfg.method == "manifoldgd" or cfg.dit_impl == "fused"   # (mgd3 and CGS pick no backend)
    if need_models and cfg.backend == "triton" and uses_kernels:  # (refused at the first guided step: after the
        #                                                            latents were encoded, hours at ImageNet-1k)
        from .dispatch import device_reason

        why = device_reason(device)
        if why is not None:
            raise BackendError(f"--backend triton: {why}")
    image_size = cfg.image_size or (info["latent_size"] * vinfo["downsample"] if info else 256)
    if before_cache is not None:
        before_cache(dict(entries=entries, device=device, backbone=backbone, schedule_kw=schedule_kw, weights=weights,
                          dit_info=info))
    cache = latent_cache_dir(cfg.cache_dir, cfg.data, cfg.vae or cfg.model, image_size, encode_precision(device, dtype))
    with shard.sharing_errors():  # e.g. a class of this rank none of whose images can be read
        stats = cache_latents(mine, vae, cache_dir=cache, image_size=image_size, batch_size=cfg.encode_batch_size,
                              device=device, dtype=dtype, num_workers=cfg.encode_workers, vae_digest=weights["vae"],
                              verify=verify_cache)
    folders = {e.name: e.folder for e in mine}
    skipped = {k: sorted(os.path.relpath(p, folders[k]) for p in v.get("skipped", [])) for k, v in stats.items()}
    for k, v in stats.items():
        if v.get("cached") and skipped[k]:  # the encoder's warning came when the cache was made
            log.warning("class %s: %d unreadable image(s) skipped (recorded in the latent cache): %s", k,
                        len(skipped[k]), ", ".join(skipped[k][:3]) + (" ..." if len(skipped[k]) > 3 else ""))
    return dict(entries=entries, mine=mine, finished_before=len(entries) - len(work), skipped=skipped,
                counts={k: int(v["n"]) for k, v in stats.items()}, vae=vae,
                encoded_with={k: v.get("encoded_with") for k, v in stats.items()},
                stamps={k: v.get("stamps") for k, v in stats.items()},
                vae_info=vinfo, model=model, dit_info=info, device=device, dtype=dtype, cache=cache,
                image_size=image_size, shard=shard, backbone=backbone, prompts=prompts, schedule_kw=schedule_kw,
                sd_scheduler=sd_scheduler,
                weights=weights)


def _as_written(path: str) -> str:
    """``path`` absolute with its links kept, but a ``..`` taken where the path has led, as the file system
    takes it (abspath drops ``DATA/link/..`` to DATA, where the file system goes to the link's target's parent:
    ``--out DATA/link/../out`` elsewhere was refused as inside DATA)."""
    parts = os.path.join(os.getcwd(), path).split(os.sep)
    last = max((i for i, part in enumerate(parts) if part == ".."), default=None)
    if last is None:
        return os.path.abspath(path)
    return os.path.normpath(os.path.join(os.path.realpath(os.sep.join(parts[:last + 1]) or os.sep),
                                         *parts[last + 1:]))


def _under(path: str, root: str) -> str | None:
    """The first folder of ``path`` below ``root`` ("" where they are one folder), or None where ``path`` lies
    outside ``root``: links resolved, and as written (``DATA/link`` to a folder elsewhere lies in DATA, where
    a scan of it reads the link as a folder)."""
    r = os.path.realpath(root)
    for p, base in ((os.path.realpath(path), r), (_as_written(path), _as_written(root)), (_as_written(path), r)):
        if p == base:
            return ""
        if p.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.relpath(p, base).split(os.sep)[0]
    return None


def check_outside_data(out: str, data: str | None) -> None:
    """``--out`` must not be ``--data`` or lie inside it: its folders would be read as classes (ConfigError)."""
    top = _under(out, data) if data is not None else None
    if top is not None:
        raise ConfigError(f"--out {out} is {'the same folder as' if top == '' else 'inside'} --data {data}: "
                          "its folders would be read as classes; use an --out outside the data folder")
    if data is not None and os.path.isdir(data):   # OUT as the target of a link in DATA, by another path
        from .data import _class_folders

        o = os.path.realpath(out)
        for name in _class_folders(data):
            link = os.path.join(data, name)
            if os.path.islink(link) and os.path.realpath(link) == o:
                raise ConfigError(f"--out {out} is the folder the link {link} leads to, read as class {name} "
                                  "(a contact sheet written there would be one of its images); use an --out outside "
                                  "the data folder")


def check_cache_outside_data(cache_dir: str | None, data: str) -> None:
    """The latent cache (``cache_dir/latents/``) must not lie inside ``--data``: its folder was read as a class
    by every later run (a class without images, or under --classes, every later class's sorted label moved)."""
    from .data import may_be_class
    from .latents import CACHE_ENV, cache_root

    root = cache_root(cache_dir)
    top = _under(os.path.join(root, "latents"), data)
    if top == "" or (top is not None and may_be_class(top)):   # (DATA/.cache/latents: never read as a class)
        flag = "--cache-dir" if cache_dir is not None else f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the cache"
        raise ConfigError(f"{flag} {root}: its latents/ folder would lie inside --data {data} and be read as a "
                          "class; use a cache folder outside the data folder")


def check_out(out: str, data: str | None) -> None:
    """``--out`` must lie outside ``--data`` (the run would distil its own output, or replace real class
    folders), be writable, and be new, empty or a run's (a manifest, or only what a run writes: class
    folders of ``data``, modes/, latents/); checked before anything is encoded."""
    check_outside_data(out, data)
    o, d = os.path.realpath(out), os.path.realpath(data) if data is not None else None
    nearest = nearest_existing(o)
    try:
        if not os.path.isdir(nearest):
            raise NotADirectoryError(20, "not a folder", nearest)
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:
        raise DataError(f"--out {out} is not writable ({nearest}: {e.strerror or e})") from None
    if os.path.isdir(o) and not os.path.isfile(os.path.join(o, MANIFEST)):
        from .data import _class_folders

        ours = {MANIFEST, CONTACT_SHEET, *RESERVED_DIRS} | set(_class_folders(d) if d and os.path.isdir(d) else ())
        foreign = sorted(n for n in os.listdir(o) if not n.startswith(".") and n not in ours)
        if foreign:  # e.g. --out . or a folder of other work: it would mix with the classes, and eval reads them all
            more = ", ..." if len(foreign) > 3 else ""
            raise ConfigError(f"--out {out} already holds {', '.join(foreign[:3])}{more} and no {MANIFEST} of a run; "
                              "use a new or empty --out")


def distill(config: DistillConfig | dict) -> DistillResult:
    """Distil ``config.data`` into ``config.out``; returns the folder and per-class stats.

    Finished classes already in ``out`` are skipped (resume). ``out`` must not
    hold a run made with other parameters. Under torchrun every rank takes
    its share of the classes; rank 0 writes the manifest.
    """
    config = DistillConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(config, DistillConfig):  # (5, "ipc=1", a list: an AttributeError on .shard)
        raise ConfigError(f"distill takes a DistillConfig or a dict of its fields, got {type(config).__name__}")
    shard = Shard.from_config(config.shard)
    with contextlib.ExitStack() as held:  # what the run holds until it returns: rank 0's lock on OUT
        try:
            return _distill(config, shard, held)
        finally:
            shard.close()


MANIFEST_PACE = 20  # rank 0 rewrites the manifest after a class once that many times its last write's cost passed
SHARDS_OF = ".lock-shards-of-"  # held shared by every --shard K/N process of one N


def _hold_out(out: str, shard: Shard, held: contextlib.ExitStack) -> None:
    """Take this process's locks on OUT for the rest of the run (``held``). A whole run's rank 0 holds OUT
    exclusively; independent shards hold it shared (shards of one run together, never beside a whole run)
    and their own shard's lock (one process per shard). A whole run that made OUT and fails before writing
    anything into it removes it again (as it found it: nothing)."""
    if shard.independent:
        held.enter_context(RunLock(out, shared=True, what="a whole run (no --shard)"))
        held.enter_context(RunLock(out, name=f".lock-shard-{shard.rank}-of-{shard.world}",
                                   what=f"another process of --shard {shard.rank}/{shard.world}"))
        # shards that split the classes otherwise (another N) would take some of the same classes
        mine = f"{SHARDS_OF}{shard.world}"
        held.enter_context(RunLock(out, name=mine, shared=True))
        for name in sorted(os.listdir(out)):
            if name.startswith(SHARDS_OF) and name != mine and lock_is_held(os.path.join(out, name)):
                raise DataError(f"--out {out} is being written by --shard K/{name[len(SHARDS_OF):]} processes; "
                                f"--shard {shard.rank}/{shard.world} would split the classes otherwise: give every "
                                "shard of a run the same N, or wait for them to finish")
    elif shard.is_main:
        made = not os.path.lexists(out)
        held.enter_context(RunLock(out))

        def unmake(exc_type, *_):  # runs before the lock is released: no other run is inside OUT
            if made and exc_type is not None:
                with contextlib.suppress(OSError):
                    left = os.listdir(out)
                    if set(left) <= {LOCK_NAME, MANIFEST_LOCK}:
                        for name in left:
                            os.unlink(os.path.join(out, name))
                        os.rmdir(out)
            return False

        held.push(unmake)


def _distill(config: DistillConfig | dict, shard: Shard, held: contextlib.ExitStack) -> DistillResult:
    from tqdm.auto import tqdm

    cfg = DistillConfig.from_dict(config) if isinstance(config, dict) else config
    cfg = with_demo_defaults(cfg.validate())
    check_out(cfg.out, cfg.data)
    # OUT is locked before anything else: a second run on it stops at once (not after loading models and
    # encoding its share), and the finished classes are read under the lock, so they cannot go stale
    with shard.sharing_errors():  # no rank reads which classes are finished before rank 0 holds OUT
        _hold_out(os.path.abspath(cfg.out), shard, held)

    checked = []  # OUT's manifest (or None), as same_run read it

    def same_run(pre: dict) -> None:
        """A run with other settings or weights in OUT is refused (before any encoding). The lock held since
        before prepare keeps other runs out; shards of this one are checked again under the manifest's lock."""
        run = cfg.resolve(len(pre["entries"]), pre["device"], backbone=pre["backbone"], schedule_kw=pre["schedule_kw"])
        checked.append(_refuse_other_run(cfg.out, fingerprint_fields(run, pre["entries"]), pre["weights"],
                                         pre["entries"]))
        OutputWriter(cfg.out).check_finished(e.name for e in pre["entries"])  # what a resume keeps is as written

    ctx = prepare(cfg, shard=shard, per_class=cfg.ipc, done=functools.partial(class_done, os.path.abspath(cfg.out)),
                  before_cache=same_run)
    entries, mine = ctx["entries"], ctx["mine"]
    rcfg = cfg.resolve(len(entries), ctx["device"], backbone=ctx["backbone"], schedule_kw=ctx["schedule_kw"])
    if ctx["schedule_kw"]:   # the paper formulation cannot guide a zero-terminal-SNR step: say so before sampling
        from .guidance import check_zero_snr
        from .schedule import make_schedule

        check_zero_snr(rcfg, make_schedule(rcfg.steps, rcfg.sampler, **ctx["schedule_kw"]))
    # Check this rank's classes before anything is written (latents stay on disk until their turn).
    if rcfg.modes_dir is not None and rcfg.method not in ("manifoldgd", "mgd3"):
        log.warning("--modes-dir %s is not read: --method %s uses no modes", rcfg.modes_dir, rcfg.method)
    if rcfg.compile != "none" and not classrun.use_fast_loop(rcfg, ctx["device"]):  # (it was ignored silently)
        log.warning("--compile %s is not used: --loop auto runs the reference loop here (%s), and only the fast "
                    "loop compiles", rcfg.compile, "ManifoldGD with --guidance-noise generator"
                    if ctx["device"].type == "cuda" else "no CUDA device")
    if ctx["backbone"] == "dit":
        unused = unused_prompt_options(rcfg)
        if unused:
            log.warning("%s not used: a DiT is conditioned on class labels, not text (they are for a Stable "
                        "Diffusion --model)", " and ".join(unused))
    latent_shape = (ctx["dit_info"]["in_channels"], ctx["dit_info"]["latent_size"], ctx["dit_info"]["latent_size"])
    identity = fingerprint_fields(rcfg, entries)
    fp = fields_digest(identity)
    man_path = os.path.join(os.path.abspath(cfg.out), MANIFEST)
    old = checked[0]
    writer = OutputWriter(cfg.out)
    # no rank writes into OUT before rank 0 holds it and has swept it; a rank whose classes failed their checks
    # stops every rank with its line (rank 0 died at this barrier with gloo's traceback)
    with shard.sharing_errors():
        for e in mine:
            _check_class(rcfg, e.name, ctx["counts"][e.name])
            if rcfg.modes_dir is not None and rcfg.method in ("manifoldgd", "mgd3"):  # every file, before any class
                load_modes(rcfg, ctx["cache"], e.name, latent_shape)
        if shard.independent:
            for path in writer.sweep_temps(classes=[e.name for e in shard.mine(entries)]):
                log.info("removed %s, left by a killed run", path)
        elif shard.is_main:
            with RunLock(writer.out, name=MANIFEST_LOCK, wait=True):   # (no eval / metrics record in flight)
                for path in writer.sweep_temps():
                    log.info("removed %s, left by a killed run", path)
    # kept up to date in memory: no re-read per class (an independent shard re-reads when it writes the manifest)
    status = _class_status(writer, entries) if shard.is_main or shard.independent else {}
    finished = {}  # the classes this call distils, with their stats
    # What changes the float rounding but not the maths (the fingerprint leaves it out so that a resume
    # can, e.g., lower the batch size after running out of memory): recorded per class, warned about.
    # The latent cache is reused whatever encoded it (the manifest's latents_encoded_with says how); the
    # code and the libraries are here since an upgrade between a kill and its resume changes the bytes too.
    versions = library_versions()
    numerics = dict(device=ctx["device"].type, batch_size=rcfg.batch_size, backend=rcfg.backend, loop=rcfg.loop,
                    class_batch=rcfg.class_batch, code=code_digest(), libraries=versions)
    if ctx["device"].type == "cpu":  # (a CPU conv / matmul splits its sums by thread: torchrun's default of one
        numerics["cpu_threads"] = torch.get_num_threads()   # thread a rank gives other pixels than all cores)
    # (classes finished before --class-batch existed were sampled one class at a time; a key a class
    # predates is not compared)
    changed = sorted({k for v in status.values() if "numerics" in v
                      for k, x in {"class_batch": 1, **v["numerics"]}.items() if k in numerics and numerics[k] != x})
    if changed:
        log.warning("resuming %s with other %s than its finished classes: the classes still to do can differ from "
                    "a run made in one go (by float rounding; other code by what it changed)", cfg.out,
                    ", ".join(changed))

    manifest = dict(
        tool="manifoldgd-fast", version=__version__, fingerprint=fp, identity=identity, formulation=rcfg.formulation,
        method=rcfg.method, data=os.path.abspath(cfg.data), model=cfg.model,
        # the run's settings; --shard is one process's part of it (world_size says how many shards there were)
        config={k: v for k, v in rcfg.to_dict().items() if k != "shard"},
        vae=cfg.vae or cfg.model, image_size=ctx["image_size"], latent_cache=ctx["cache"],
        device=str(ctx["device"]), world_size=shard.world, extra=cfg.extra, versions=versions,
        weights=ctx["weights"], seeds=_seeds_record(rcfg),
        classes={}, backbone=rcfg.backbone, output_size=rcfg.output_size or ctx["image_size"],
    )
    if ctx["dit_info"] and "time_embedding" in ctx["dit_info"]:
        manifest["dit_time_embedding"] = ctx["dit_info"]["time_embedding"]  # what "auto" chose
    tuned = read_finetune_record(cfg.model)
    if tuned is not None:  # a model folder from `finetune`: its RSM settings (rsm_lambda, steps, ...)
        manifest["model_finetune"] = tuned
    if rcfg.backbone == "sd":  # the text each class was sampled from (also in each class's stats)
        manifest.update(prompts=ctx["prompts"], negative_prompt=rcfg.negative_prompt,
                        sd_scheduler=ctx["sd_scheduler"])  # what the UNet predicts, the timestep spacing
    for key in MANIFEST_RECORDS:  # results appended by `eval` / `metrics` survive a resume
        if old and key in old:
            manifest[key] = old[key]

    started = []

    def write_manifest(final=False, force=False):
        if shard.independent:
            if final or not started:  # at its end (and the first shard at its start): the other shards' classes
                with RunLock(writer.out, name=MANIFEST_LOCK, wait=True):  # from disk
                    if not started:  # a shard with other settings may have started since this one checked
                        started.append(True)
                        _refuse_other_run(cfg.out, identity, ctx["weights"], entries)
                        if not final and os.path.isfile(man_path):
                            return
                    writer.sweep_temps(classes=(), files=(MANIFEST, CONTACT_SHEET))
                    status.update(_class_status(writer, [e for e in entries if status[e.name]["status"] != "done"]))
                    manifest["classes"] = status
                    manifest.update(_records_on_disk(man_path, manifest))
                    writer.write_manifest(manifest)
                    if final and cfg.contact_sheet and all(v["status"] == "done" for v in status.values()):
                        write_contact_sheet(writer.out, [e.name for e in entries])
        elif shard.is_main:
            # After each class, unless the last write was recent for its cost: at ImageNet-1k the manifest
            # grows to megabytes, and rewriting it per class would cost O(classes^2) (and hold the GIL the
            # sampling thread needs). A resume reads the classes from disk, not from here.
            t0 = time.monotonic()
            if not (final or force) and t0 - last_write[0] < MANIFEST_PACE * last_write[1]:
                return
            manifest["classes"] = status
            with RunLock(writer.out, name=MANIFEST_LOCK, wait=True):  # (an eval / metrics record being added)
                manifest.update(_records_on_disk(man_path, manifest))
                writer.write_manifest(manifest)
            last_write[:] = [time.monotonic(), time.monotonic() - t0]

    last_write = [0.0, 0.0]   # when the manifest was last written, and what that took (s)
    write_manifest()
    todo = mine  # prepare dealt only the unfinished classes
    bar = tqdm(total=len(todo) * rcfg.ipc, desc=f"distil {rcfg.method}", unit="img", disable=None)
    copy_stream = classrun.run_stream(ctx, "copy_stream") if ctx["device"].type == "cuda" else None

    # whether a class's images depend on its latents (its modes, neighbourhoods or CGS mean): then its done
    # mark keeps its image files' stamps, and a resume refuses a finished class whose images changed since
    uses_data = rcfg.method in ("manifoldgd", "mgd3") or rcfg.cgs

    def save(name, output, prompt):
        images, latents, stats = output.result(copy_stream)   # waits for this class's GPU work only
        bad = int((~torch.isfinite(latents.flatten(1))).any(1).sum())
        if bad:  # checked once per class, outside the (capturable) step: nothing of this class is written
            raise ConfigError(f"class {name}: {bad} of {latents.shape[0]} sampled latents hold NaN or inf; nothing "
                              f"written for it. Lower the guidance steps (--lambda-m, --manifold-scale, --eta-dpp, "
                              f"--eta-dm) or sample in float32 (--dtype float32)")
        check_decoded(output.finite, name, ctx["dtype"])
        if prompt is not None:
            stats["prompt"] = prompt
        stats["numerics"] = numerics
        stats.update(fingerprint=fp, weights=ctx["weights"])  # what made the class, checked by a resume
        stats["latents_encoded_with"] = ctx["encoded_with"].get(name)  # the cache's, which a resume may reuse
        stats["skipped_images"] = ctx["skipped"].get(name, [])
        with phase("io", host=True):
            images = resize_images(images, rcfg.output_size)
            writer.write_class(name, images, latents if rcfg.save_latents else None, stats,
                               data_stamps=ctx["stamps"].get(name) if uses_data else None)
            finished[name] = {**stats, "status": "done"}
            if shard.is_main or shard.independent:
                status[name] = finished[name]
            write_manifest()

    # The classes go in groups of --class-batch, each group sampled in one batch (by default
    # --batch-size // IPC classes a group, at least one). Two background
    # threads around the sampling of group g (_sample_groups):
    # one loads the latents of group g+1 and discovers their modes (on CUDA on a side stream: the GPU
    # interleaves it with the sampling), the other copies group g-1 back from the GPU (on a copy
    # stream, as soon as each class is decoded), resizes, encodes and writes its PNGs. On CUDA the
    # main thread never waits for the GPU, so the device queue never runs dry between groups. At most
    # one group waits on either side; an error on either stops the run at the next group. Results do
    # not depend on the overlap, nor on which classes share a group.
    overlap = ctx["device"].type == "cuda" or classrun.PREFETCH_ON_CPU
    groups = [todo[i:i + rcfg.class_batch] for i in range(0, len(todo), rcfg.class_batch)]
    try:
        # a user error of this rank's (e.g. one class's NaN samples): the other ranks finish their classes, then
        # every rank stops with its line (they died at the barrier with gloo's traceback, or were stopped mid-class)
        with shard.sharing_errors():  # (also the barrier: every rank's classes are on disk)
            _sample_groups(groups, rcfg, ctx, overlap, bar, save)
    except BaseException:  # interrupted or failed (not SIGKILL / an unhandled SIGTERM): the manifest says which
        #                    classes were finished by then
        bar.close()  # (first: the CLI's "interrupted" / error line was glued to the bar's "...img/s]")
        if shard.is_main and not shard.independent:
            with contextlib.suppress(Exception):
                status.update(_class_status(writer, entries))   # with what the other ranks finished
            with contextlib.suppress(Exception):
                write_manifest(force=True)
        elif shard.independent:  # its classes finished so far, read from disk (the other shards' too)
            with contextlib.suppress(Exception):
                write_manifest(final=True)
        raise
    bar.close()
    if shard.is_main and not shard.independent:
        status.update(_class_status(writer, entries))  # the other ranks' classes
    write_manifest(final=True)
    if cfg.contact_sheet and shard.is_main and not shard.independent:
        write_contact_sheet(writer.out, [e.name for e in entries])
    return DistillResult(out=writer.out, classes={e.name: finished.get(e.name) or _class_status(writer, [e])[e.name]
                                                  for e in shard.mine(entries)},
                         distilled=[e.name for e in mine], manifest=man_path, run_classes=len(entries),
                         finished_before=ctx["finished_before"],
                         unfinished=sum(v["status"] != "done" for v in status.values()) if status else 0)


def _records_on_disk(path: str, manifest: dict) -> dict:
    """The ``eval`` / ``metrics`` records of the manifest file at ``path`` (added by those commands while this
    run went on: rewriting the manifest from memory dropped them), read holding :data:`MANIFEST_LOCK`;
    ``manifest``'s own where the file has none or cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            on_disk = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(on_disk, dict):
        return {}
    return {key: on_disk[key] for key in MANIFEST_RECORDS if key in on_disk}


def _sample_groups(groups, rcfg: DistillConfig, ctx: dict, overlap: bool, bar, save) -> None:
    """Sample the class groups in turn, with the two background threads described in :func:`_distill`."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifoldgd-write") as pool, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifoldgd-modes") as pre:
        def prefetch(group):
            if not overlap:
                return None
            return pre.submit(contextvars.copy_context().run, _prefetched_group, rcfg, ctx, [e.name for e in group])

        pending, ahead = [], prefetch(groups[0]) if groups else None
        for k, group in enumerate(groups):
            got = ahead.result() if ahead is not None else _prefetched_group(rcfg, ctx, [e.name for e in group])
            members = [(e.name, e.label, _receive(*g)) for e, g in zip(group, got)]
            ahead = prefetch(groups[k + 1]) if k + 1 < len(groups) else None
            outputs = distill_group(rcfg, ctx, members, progress=bar)
            for f in pending:
                f.result()
            pending = [pool.submit(contextvars.copy_context().run, save, e.name, output, ctx["prompts"].get(e.name))
                       for e, output in zip(group, outputs)]
        for f in pending:
            f.result()


def _seeds_record(rcfg: DistillConfig) -> dict[str, Any]:
    """The manifest's ``seeds``: how each random draw is keyed. ``guidance`` only where a manifold term draws
    cloud / patch noise (DistillConfig.draws_guidance_noise), as the run drew it (--guidance-noise)."""
    seeds = {"run": rcfg.seed, "class": "derive_seed(run, 'modes', class)",
             "sample": "derive_seed(run, 'sample', class, index)"}
    if rcfg.draws_guidance_noise():
        seeds["guidance"] = ("Philox key derive_seed(run, 'guidance'), sample id label * ipc + index"
                             if rcfg.guidance_noise == "philox" else
                             "the sample's generator (seeded as 'sample'), the cloud / patch noise drawn before "
                             "each guided step's noise")
    return seeds


def _class_status(writer: OutputWriter, entries) -> dict[str, dict[str, Any]]:
    """Per-class status read from disk: what any rank finished is 'done' with its stats."""
    out = {}
    for e in entries:
        if writer.is_done(e.name):
            out[e.name] = {**writer.read_class_info(e.name), "status": "done"}
        else:
            out[e.name] = {"label": e.label, "status": "pending"}
    return out


def _refuse_other_run(out: str, identity: dict, weights: dict, entries=None) -> dict | None:
    """OUT's manifest (None: a new OUT); ConfigError if it holds a run with other settings, data or weights.

    ``entries``: also each finished class's own record (its done mark keeps the fingerprint and weights
    that made it), so that a class made by other settings is found where the manifest cannot tell: a
    deleted manifest, or a shard with other settings that wrote its classes beside the manifest's run.
    """
    fp = fields_digest(identity)
    old = _read_manifest(os.path.join(os.path.abspath(out), MANIFEST))
    if old and old.get("fingerprint") != fp:
        was = old.get("identity") or {}
        keys = [k for k in sorted(set(identity) | set(was)) if identity.get(k) != was.get(k)]
        what = "other data (its classes, labels or files)" if keys == ["data"] else \
            f"other parameters ({', '.join(keys[:6])})" if keys else "other parameters"
        raise ConfigError(f"--out {out} holds a run with {what} (fingerprint {old.get('fingerprint')}, this run "
                          f"{fp}); use a new --out")
    _refuse_other_weights(f"--out {out} holds a run", (old or {}).get("weights"), weights)
    from .latents import file_stamps, stamps_digest

    if old is None and entries is not None and os.path.isdir(out):
        # no manifest (deleted): OUT's other finished classes must be this run's too, or two runs mix in OUT
        mine = {e.name for e in entries}
        for name in sorted(os.listdir(out)):
            if name in mine or name.startswith("."):
                continue
            got = (done_record(os.path.abspath(out), name)[0] or {}).get("fingerprint")
            if got not in (None, fp):
                raise ConfigError(f"--out {out}: class {name} was made by a run with other settings or classes "
                                  f"(fingerprint {got}, this run {fp}) and OUT has no {MANIFEST}; use a new --out")
    for e in entries or ():
        info = done_record(os.path.abspath(out), e.name)[0] or {}  # (none, or damaged: check_finished's to say)
        if info.get("fingerprint") not in (None, fp):  # (classes made before it was recorded: not compared)
            raise ConfigError(f"--out {out}: class {e.name} was made by a run with other settings (fingerprint "
                              f"{info['fingerprint']}, this run {fp}); use a new --out")
        _refuse_other_weights(f"--out {out}: class {e.name} was", info.get("weights"), weights)
        was = info.get(DATA_STAMPS)  # (classes made before it was recorded: not compared)
        if was is not None and was != stamps_digest(file_stamps(e)):
            raise ConfigError(f"--out {out}: class {e.name} was distilled from other images than {e.folder} holds "
                              f"now (a file's size or modification time changed since); delete "
                              f"{os.path.join(out, e.name)} to distill it again from them, or use a new --out")
    return old


def _refuse_other_weights(who: str, was: dict | None, weights: dict) -> None:
    was = was if isinstance(was, dict) else {}
    other = [k for k in ("model", "vae", "scheduler", "text") if k in was and k in weights and was[k] != weights[k]]
    if other:  # same paths, other files (e.g. a fine-tune rewritten into the same folder, an edited scheduler)
        what = {"model": "model weights", "vae": "vae weights", "scheduler": "scheduler settings",
                "text": "text encoder or tokenizer"}
        raise ConfigError(f"{who} made with other {' and '.join(what[k] for k in other)} "
                          f"(sha256 {', '.join(str(was[k]) for k in other)}; now "
                          f"{', '.join(weights[k] for k in other)}); use a new --out")


def _read_manifest(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):  # ValueError: JSON's, and bytes that are not UTF-8
        manifest = None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is not a readable manifest; move it away or use a new --out")
    return manifest


def write_contact_sheet(out: str, names: list[str], max_rows: int = 50, max_cols: int = 10, tile: int = 64) -> str:
    """One row per class (first ``max_rows`` classes), up to ``max_cols`` images each."""
    import io

    from PIL import Image

    from .models import _first_line

    rows = []
    for name in names[:max_rows]:
        folder = os.path.join(out, name)
        if not os.path.isdir(folder):
            continue
        files = sorted((f for f in os.listdir(folder) if f.endswith(".png") and f[:-4].isdigit()),
                       key=lambda f: int(f[:-4]))
        rows.append([os.path.join(folder, f) for f in files[:max_cols]])
    if not rows:
        return ""
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * tile, len(rows) * tile), (255, 255, 255))
    for r, files in enumerate(rows):
        for c, f in enumerate(files):
            try:
                with Image.open(f) as im:
                    sheet.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (c * tile, r * tile))
            except (OSError, ValueError) as e:  # Pillow's errors do not name the file
                raise DataError(f"contact sheet: cannot read {f} ({_first_line(e)}); delete {os.path.dirname(f)} "
                                "to sample the class again") from None
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    path = os.path.join(out, CONTACT_SHEET)
    atomic_write_bytes(path, buf.getvalue())
    return path


def cache(config: DistillConfig | dict) -> dict:
    """Latent cache only (``manifoldgd-fast cache``); under torchrun each rank encodes its classes. Classes
    already cached are read and checked against their recorded sha256: a damaged file is encoded again."""
    cfg = DistillConfig.from_dict(config) if isinstance(config, dict) else config
    shard = Shard.from_config(cfg.shard)
    try:
        ctx = prepare(cfg, need_models=False, shard=shard, verify_cache=True)
        shard.barrier()
    finally:
        shard.close()
    return ctx


def compute_modes(config: DistillConfig | dict) -> dict[str, str]:
    """Mode discovery only (``manifoldgd-fast modes``): writes ``OUT/modes/<class>.safetensors``.

    Resumable: a class whose file already holds modes of these parameters is skipped. Under
    torchrun each rank computes its classes. ``distill --modes-dir OUT/modes`` then reads them.
    """
    from .config import modes_fingerprint
    from .latents import latents_sha256, load_class_latents, safetensors_bytes

    cfg = DistillConfig.from_dict(config) if isinstance(config, dict) else config
    shard = Shard.from_config(cfg.shard)
    try:
        check_out(cfg.out, with_demo_defaults(cfg).data)
        out_modes = os.path.join(cfg.out, MODES_DIR)
        if isinstance(cfg.modes_dir, (str, os.PathLike)) and str(cfg.modes_dir) \
                and os.path.realpath(cfg.modes_dir) != os.path.realpath(out_modes):   # (else validate's line)
            log.warning("--modes-dir %s is not read by `modes`: it writes the modes to %s", cfg.modes_dir, out_modes)
        ctx = prepare(cfg, need_models=False, shard=shard, per_class=cfg.ipc)
        rcfg = cfg.resolve(len(ctx["entries"]), backbone=ctx["backbone"])
        with shard.sharing_errors():  # this rank's classes alone: every rank stops with its line
            for e in ctx["mine"]:
                _check_class(dataclasses.replace(rcfg, method="mgd3"), e.name, ctx["counts"][e.name])
        if shard.is_main or shard.independent:  # no lock here: only temps no process has touched for an hour
            for path in sweep_stale_temps(os.path.join(cfg.out, MODES_DIR)):
                log.info("removed %s, left by a killed run", path)
        paths = {}
        # a stale file of this rank's: the other ranks finish their classes, then stop with its line at the barrier
        with shard.sharing_errors():
            for e in ctx["mine"]:
                fp = modes_fingerprint(rcfg, ctx["cache"], e.name)
                p = modes_file(os.path.join(cfg.out, MODES_DIR), e.name)
                try:
                    old, old_fp = read_modes(p)
                except DataError as bad:   # damaged or foreign: its class is computed again, as a cache file's is
                    log.warning("%s: computing the class's modes again", bad)
                    old = old_fp = None
                if old is not None and old_fp != fp:
                    raise ConfigError(f"{p} holds modes made with other mode parameters or latents (the class's "
                                      "images or the VAE changed since?); delete it to recompute, or use a new --out")
                if old is None:
                    z, _ = load_class_latents(ctx["cache"], e.name)
                    m = class_modes(rcfg, e.name, z.to(ctx["device"]).float())
                    # another `modes` run into OUT (it takes no lock) may have written the class meanwhile: two
                    # runs of other settings both ended "modes of N classes", their files mixed (audit)
                    now_fp = None
                    with contextlib.suppress(DataError):   # (still the damaged file it found)
                        _, now_fp = read_modes(p)
                    if now_fp is not None and now_fp != fp:
                        raise ConfigError(f"{p} was written meanwhile by another `modes` run with other mode "
                                          "parameters or latents; run one `modes` per --out at a time (or delete "
                                          "the file to recompute)")
                    atomic_write_bytes(p, safetensors_bytes(m, {"class": e.name, "method": rcfg.mode_method,
                                                                "formulation": rcfg.formulation,
                                                                "modes_fingerprint": fp,
                                                                "modes_sha256": latents_sha256(m)}, name="modes"))
                paths[e.name] = p
    finally:
        shard.close()
    return paths


def _classes_spec(names: list[str], scratch: list) -> str:
    """``--classes`` naming exactly these class folders: "a,b", or a class file in a temporary folder (appended
    to ``scratch``) where the comma form reads otherwise (a comma in a folder's name split it in two; a folder
    named as a subset, "woof", was the subset)."""
    import tempfile

    from .classes import class_list

    plain = ",".join(names)
    try:
        if class_list(plain) == list(names):
            return plain
    except ConfigError:
        pass
    scratch.append(tempfile.mkdtemp(prefix="manifoldgd-profile-classes-"))
    path = os.path.join(scratch[-1], "classes.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{n}\n" for n in names))
    return path


def profile_run(config: DistillConfig | dict, *, classes: int = 1, out: str | None = None) -> dict[str, Any]:
    """Distil the first ``classes`` classes with a profiler active; returns its report.

    Writes into ``out`` (a temporary folder when None, removed afterwards);
    the report has per-phase ms totals, per-step ms and shares, and the
    guidance overhead: guidance ms per guided step over the plain step's ms
    (see :meth:`profile.Profiler.report`). A ``out`` whose classes are
    already finished is refused: nothing would be timed.
    """
    import shutil
    import tempfile

    from .classes import class_list
    from .data import scan_image_folder
    from .profile import profiling

    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ConfigError(f"--profile-classes {classes!r}: must be an integer >= 1")
    cfg = DistillConfig.from_dict(config) if isinstance(config, dict) else config
    cfg = with_demo_defaults(cfg.validate())
    if cfg.shard is not None:
        raise ConfigError(f"--shard {cfg.shard}: profile runs its first classes in one process; --shard is for "
                          "cache, modes and distill")
    from .distributed import _env_int

    world = _env_int("WORLD_SIZE", "1")
    if world > 1:  # each rank profiled its deal of the few classes (rank 1 none: "already distilled there")
        raise ConfigError(f"profile under torchrun (WORLD_SIZE {world}): it runs its first classes in one process; "
                          "start it without torchrun (torchrun is for cache, modes and distill)")
    names = [e.name for e in scan_image_folder(cfg.data, classes=class_list(cfg.classes) if cfg.classes else None,
                                                label_map=cfg.label_map, warn_stray=False)]
    if classes > len(names):  # (it profiled them all without a word)
        log.warning("--profile-classes %d: the data set has %d class%s; profiling %s", classes, len(names),
                    "" if len(names) == 1 else "es", "it" if len(names) == 1 else "all of them")
    tmp = None if out else tempfile.mkdtemp(prefix="manifoldgd-profile-")
    # the data set's defaults (radius, bandwidth, start level) are those of all its classes, not of the few profiled;
    # so is the class batch: the whole run samples batch-size // ipc classes at a time (padded where it has fewer),
    # and the profile times that batch shape, not one class's ipc rows
    class_batch = cfg.class_batch or cfg.default_class_batch(len(names))
    scratch = []
    run = dataclasses.replace(cfg, classes=_classes_spec(names[:classes], scratch), out=out or tmp,
                              contact_sheet=False, class_batch=class_batch, **cfg.dataset_defaults(len(names)))
    try:
        with profiling(resolve_device(run.device)) as prof:
            t0 = time.perf_counter()
            try:
                res = distill(run)
            except ConfigError as e:
                if out and " holds a run with " in str(e):  # e.g. a distill's OUT: profile's run is its first classes
                    raise ConfigError(f"{e}; profile distils only its first --profile-classes classes, so give it "
                                      "a new --out, or none (a temporary folder)") from None
                raise
            wall = time.perf_counter() - t0
        rep = prof.report()
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if prof.steps == 0:  # a resumed --out: its classes were done before, nothing was sampled to time
        done = ", ".join(names[:classes])
        raise ConfigError(f"--out {out}: the profiled classes ({done}) are already distilled there, so nothing "
                          "was sampled to time; give a new --out, or none (a temporary folder)")
    # the rate at the full run's batch shape: a group of class_batch classes (padded where fewer are profiled)
    # costs what class_batch classes cost, and yields that many classes' images in the full run
    per_group = min(class_batch, len(names))  # (an explicit --class-batch beyond the data set: padding only)
    groups = -(-len(res.distilled) // class_batch)
    rep.update(wall_seconds=round(wall, 3), classes=list(res.distilled), method=run.method,
               formulation=run.formulation, ipc=run.ipc, batch_size=run.batch_size, class_batch=class_batch,
               loop="eager (the profiler times each phase: no CUDA graphs)",
               images_per_second=round(groups * per_group * run.ipc / wall, 4) if wall > 0 else None)
    return rep
