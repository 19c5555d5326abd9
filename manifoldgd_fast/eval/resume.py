"""Resuming a killed evaluation: the finished runs of an evaluation (``eval.json.partial``), and the
checkpoint of the run that was cut short, each kept under a key of everything its result depends on
(settings, version, and the images by name, size and modification time).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os

import torch

from ..config import fields_digest
from ..data import ClassEntry
from ..latents import file_stamps
from ..output import atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 300.0   # a long run saves its state at an epoch's end at most this often


def read_checkpoint(path: str | None, key: str, device: torch.device) -> dict | None:
    """A run's saved state, or None (no file, another run's, unreadable: the run starts over, said so)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a torn or foreign file: the run starts from epoch 0
        log.warning("%s: unreadable (%s: %s); the run starts over", path, type(e).__name__, str(e)[:100])
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log.warning("%s was saved by another run's settings; the run starts over", path)
        return None
    for name in ("gen", "gen_cpu"):
        state[name] = state[name].cpu()      # generator states are CPU byte tensors
    return state


def files_digest(entries: list[ClassEntry]) -> str:
    """The entries' images by name, size and modification time (latents.file_stamps), without reading them."""
    return fields_digest({e.name: file_stamps(e) for e in entries})


def path_key(folder: str) -> str:
    """12 hex digits naming ``folder`` (by its absolute path) in a file name: a run's checkpoint is that of
    its folder, not of its place in the list (a resume may list the folders in another order)."""
    return hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:12]


def file_identity(path) -> str | None:
    """A file by path, size and modification time; a string that names no file (a keyword) as it is; None
    for anything else (an in-memory teacher: no key, so no resume)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    if not os.path.isfile(path):
        return str(path)          # a keyword such as imagenet-resnet18
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


KEEP_OTHER_RUNS = 4   # killed evaluations of other settings whose finished runs a partial file keeps besides


def checkpoint_path(partial: str, fingerprint: str, folder: str, net: str, seed: int) -> str:
    """The checkpoint of a run cut short, beside the partial file: named by its evaluation's settings too, so
    that an evaluation of other settings into the same report does not overwrite a killed one's (its rerun
    started that run over)."""
    return f"{partial}.{fingerprint[:12]}.{path_key(folder)}.{net}.{seed}.pt"


def sweep_checkpoints(partial: str, fingerprint: str) -> None:
    """An evaluation is done (every run of it finished): its own leftover checkpoints go, and of other
    evaluations' those of the :data:`KEEP_OTHER_RUNS` latest stay (older ones, and ones named as before
    the settings were in the name, which no evaluation reads, go)."""
    folder, base = os.path.dirname(partial) or ".", os.path.basename(partial) + "."
    by_run: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(base) and name.endswith(".pt"):
                parts = name[len(base):-len(".pt")].split(".")
                own = len(parts) != 4 or parts[0] == fingerprint[:12]
                by_run.setdefault("" if own else parts[0], []).append(os.path.join(folder, name))

    def newest(paths):
        return max((os.path.getmtime(p) for p in paths if os.path.exists(p)), default=0.0)

    others = sorted((k for k in by_run if k), key=lambda k: newest(by_run[k]), reverse=True)
    for key in ["", *others[KEEP_OTHER_RUNS:]]:
        for path in by_run.get(key, []):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _partial_sets(path: str, warn: bool = True) -> dict | None:
    """{fingerprint: finished runs} of a partial file (the evaluation that wrote it last, then those it kept),
    {} without one; None (warned) for a file that cannot be read or holds no runs."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        if warn:
            log.warning("%s: unreadable (%s); starting over", path, e)
        return None
    kept = saved.get("kept", {}) if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("runs", {}), dict) or not isinstance(kept, dict) \
            or not all(isinstance(r, dict) for r in kept.values()):
        if warn:
            log.warning("%s holds no finished runs; starting over", path)
        return None
    sets = {saved.get("fingerprint"): dict(saved.get("runs", {}))}
    sets.update({k: v for k, v in kept.items() if k not in sets})
    return sets


def load_finished_runs(path: str, fingerprint: str) -> dict:
    """The runs a killed evaluation with the same settings finished (``path``: written after each run). The
    file also keeps the finished runs of up to :data:`KEEP_OTHER_RUNS` killed evaluations of other settings
    (an evaluation run in between does not discard them)."""
    sets = _partial_sets(path)
    if not sets:
        return {}
    if fingerprint not in sets:
        log.warning("%s holds runs made with other settings or images (kept for their rerun); this evaluation "
                    "starts over", path)
        return {}
    return dict(sets[fingerprint])


def _other_runs(path: str, fingerprint: str) -> dict:
    """The partial file's finished runs of other evaluations than ``fingerprint``'s (none: {})."""
    return {k: v for k, v in (_partial_sets(path, warn=False) or {}).items() if k not in (fingerprint, None) and v}


def save_finished_runs(path: str, fingerprint: str, runs: dict) -> None:
    """Keep the finished runs (key "folder|net|seed" -> result) for a rerun after a kill, beside the other
    evaluations' the file holds (the latest :data:`KEEP_OTHER_RUNS`)."""
    kept = dict(list(_other_runs(path, fingerprint).items())[:KEEP_OTHER_RUNS])
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "runs": runs, "kept": kept}, sort_keys=True,
                                       default=str))


def drop_finished_runs(path: str, fingerprint: str) -> None:
    """An evaluation wrote its JSON: its runs leave the partial file, which goes once it keeps no other's."""
    others = _other_runs(path, fingerprint)
    if others:
        atomic_write_text(path, json.dumps({"fingerprint": None, "runs": {}, "kept": others}, sort_keys=True,
                                           default=str))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
