"""Resuming a killed evaluation: the finished runs of an evaluation (``eval.json.partial``), and the
checkpoint of the run that was cut short, each kept under a key of everything its result depends on
(settings, version, and the images by name, size and modification time).
"""
from __future__ import annotations

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


def load_finished_runs(path: str, fingerprint: str) -> dict:
    """The runs a killed evaluation with the same settings finished (``path``: written after each run)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); starting over", path, e)
        return {}
    if not isinstance(saved, dict) or not isinstance(saved.get("runs", {}), dict):
        log.warning("%s holds no finished runs; starting over", path)
        return {}
    if saved.get("fingerprint") != fingerprint:
        log.warning("%s holds runs made with other settings or images; starting over", path)
        return {}
    return dict(saved.get("runs", {}))


def save_finished_runs(path: str, fingerprint: str, runs: dict) -> None:
    """Keep the finished runs (key "folder|net|seed" -> result) for a rerun after a kill."""
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "runs": runs}, sort_keys=True, default=str))
