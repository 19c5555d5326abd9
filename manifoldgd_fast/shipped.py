"""The model the package ships: a small DiT + VAE trained on scikit-learn's digits.

``manifoldgd_fast/weights/digits`` is a pipeline-layout folder (``transformer/``
and ``vae/``, each ``config.json`` + ``diffusion_pytorch_model.safetensors``)
that :func:`manifoldgd_fast.models.load_dit` / ``load_vae`` read unchanged.
``SHA256SUMS.json`` beside them records the SHA-256 of every file and how the
weights were trained (``python -m manifoldgd_fast.demo.train``);
:func:`verify_shipped` checks a folder against it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .errors import ModelError

SUMS_NAME = "SHA256SUMS.json"
SUMS_FORMAT = 1
SHIPPED_NAME = "digits"


def shipped_model_dir() -> str:
    """The folder of the shipped digits model (``manifoldgd_fast/weights/digits``)."""
    try:
        from importlib import resources

        path = str(resources.files("manifoldgd_fast").joinpath("weights", SHIPPED_NAME))
    except (ImportError, TypeError, AttributeError):  # pragma: no cover - unusual loaders
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", SHIPPED_NAME)
    return path


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def tree_digest(h, top: str, rel_to: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Feed ``h`` (a hashlib object) every file under ``top`` (those ending in ``suffixes``; None: all), in a
    fixed order (folders and files sorted, ``__pycache__`` left out): its path relative to ``rel_to`` and the
    SHA-256 of its bytes. What a folder of sources or a tokenizer is, whatever disk it lies on."""
    for dp, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if suffixes is None or f.endswith(suffixes):
                path = os.path.join(dp, f)
                h.update(os.path.relpath(path, rel_to).encode() + b"\0" + sha256_file(path).encode())


def model_files(folder: str) -> list[str]:
    """Every file under ``folder`` except the sums file, as sorted '/'-separated relative paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if rel != SUMS_NAME and not name.startswith("."):
                out.append(rel)
    return sorted(out)


def write_sums(folder: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``folder`` and write ``SHA256SUMS.json`` (with ``metadata``
    under ``"training"``); returns what was written."""
    sums = {
        "format": SUMS_FORMAT,
        "algorithm": "sha256",
        "files": {rel: sha256_file(os.path.join(folder, rel)) for rel in model_files(folder)},
        "training": metadata or {},
    }
    from .output import atomic_write_text  # (output imports this module)

    atomic_write_text(os.path.join(folder, SUMS_NAME), json.dumps(sums, indent=1, sort_keys=True) + "\n")
    return sums


def read_sums(folder: str | None = None) -> dict[str, Any]:
    """The parsed ``SHA256SUMS.json`` of ``folder`` (default: the shipped model)."""
    folder = shipped_model_dir() if folder is None else str(folder)
    path = os.path.join(folder, SUMS_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            sums = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"shipped model {folder}: {SUMS_NAME} is missing") from None
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ModelError(f"shipped model {folder}: {path} is damaged ({msg})") from None
    files = sums.get("files") if isinstance(sums, dict) else None
    if not isinstance(files, dict) or not files:
        raise ModelError(f"shipped model {folder}: {path} lists no files")
    return sums


def verify_shipped(folder: str | None = None) -> str:
    """Check every file listed in ``SHA256SUMS.json`` against its hash; return the folder.

    Raises ModelError (one line) naming the first missing or damaged file.
    """
    folder = shipped_model_dir() if folder is None else str(folder)
    if not os.path.isdir(folder):
        raise ModelError(f"shipped model {folder} is missing (reinstall manifoldgd-fast)")
    sums = read_sums(folder)
    for rel, want in sorted(sums["files"].items()):
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            raise ModelError(f"shipped model {folder}: file {rel} is missing")
        try:
            got = sha256_file(path)
        except OSError as e:
            raise ModelError(f"shipped model {folder}: file {rel} cannot be read ({e.strerror or e})") from None
        if got != want:
            raise ModelError(f"shipped model {folder}: file {rel} is damaged "
                             f"(sha256 {got[:12]}..., expected {str(want)[:12]}...)")
    return folder
