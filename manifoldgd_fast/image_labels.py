"""Flat image folders whose classes come from a label file: ImageNet's validation set as distributed.

``eval --val-labels FILE`` reads ``VAL/<image>`` with FILE in one of three forms
(:func:`read_image_labels`): Kaggle's ``LOC_val_solution.csv``, image-net.org's
ILSVRC-2012 devkit (:func:`read_devkit_labels`), or ``<image> <class>`` lines.
:func:`scan_labelled_folder` turns the folder into the class entries that
:func:`manifoldgd_fast.data.scan_image_folder` gives for class folders.
"""
from __future__ import annotations

import logging
import os

from .classes import content_lines, split_pair
from .data import IMAGE_EXTS, ClassEntry, _class_folders, _folder_files, warn_ignored
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)


def read_image_labels(path: str, flag: str = "--val-labels") -> dict[str, str]:
    """Image -> class of a flat image folder, from a label file.

    ``path``: ImageNet's ``LOC_val_solution.csv`` (Kaggle's layout of the ILSVRC-2012
    validation set: header ``ImageId,PredictionString``; the class is the first word of
    PredictionString, a WordNet id), or lines ``<image> <class>`` (split at the first
    tab, else the first comma, else the first run of spaces; ``#`` comments and blank
    lines ignored). An image is named by its file name, with or without the extension.
    ``path`` may also be the ILSVRC-2012 devkit as image-net.org distributes it (its folder, its
    ``data/`` folder, the ``.tar.gz``, or its ``ILSVRC2012_validation_ground_truth.txt`` beside
    ``meta.mat``): see :func:`read_devkit_labels`.
    Returns image stem -> class. ConfigError naming the file and line of what it cannot read.
    """
    if os.path.isdir(path) or path.lower().endswith(DEVKIT_ARCHIVES) or os.path.basename(path) == DEVKIT_TRUTH:
        return read_devkit_labels(path, flag)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read the labels ({e})") from None
    lines = text.splitlines()
    kaggle = bool(lines) and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring")
    out: dict[str, str] = {}
    where: dict[str, int] = {}
    for n, line in content_lines(lines[1:], 2) if kaggle else content_lines(lines):
        if kaggle:
            image, _, pred = line.partition(",")
            words = pred.split()
            parts = [image.strip(), words[0] if words else ""]
        else:
            parts = split_pair(line)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            hint = (" (ILSVRC-2012 devkit ground truth? give the devkit's folder or .tar.gz, which holds the "
                    "meta.mat that names its class numbers)") if line.strip().isdigit() else ""
            raise ConfigError(f"{flag} {path}: line {n}: {line!r} is not '<image> <class>'{hint}")
        image, cls = parts
        stem = os.path.splitext(image)[0] if image.lower().endswith(IMAGE_EXTS) else image
        if out.get(stem, cls) != cls:
            raise ConfigError(f"{flag} {path}: line {n}: image {image!r} is labelled {out[stem]!r} on line "
                              f"{where[stem]} and {cls!r} here")
        out[stem], where[stem] = cls, n
    if not out:
        raise ConfigError(f"{flag} {path}: no labels in it")
    return out


DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_ARCHIVES = (".tar.gz", ".tgz", ".tar")
DEVKIT_MAX_BYTES = 64 << 20


def _devkit_files(path: str, flag: str) -> tuple[bytes, bytes]:
    """(meta.mat, ground truth) bytes of an ILSVRC-2012 devkit: its folder, its data/ folder, its
    ground-truth file (meta.mat beside it) or its archive."""
    import tarfile

    names = ("meta.mat", DEVKIT_TRUTH)
    if not os.path.exists(path):  # (a mistyped ground-truth path was "not an ILSVRC-2012 devkit (no data/meta.mat ...")
        raise ConfigError(f"{flag} {path}: no such file or folder")
    if path.lower().endswith(DEVKIT_ARCHIVES):
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size > DEVKIT_MAX_BYTES:  # reading every header of a 6 GB image archive would take minutes
            raise ConfigError(f"{flag} {path}: {size / 2 ** 20:.0f} MiB is no devkit (ILSVRC2012_devkit_t12.tar.gz "
                              "is about 2.5 MB); is it an archive of images? Give the unpacked image folder as "
                              "--real-val and the devkit as --val-labels")
        try:
            with tarfile.open(path) as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers()
                           if m.isfile() and os.path.basename(m.name) in names}
                missing = [n for n in names if n not in members]
                if missing:
                    raise ConfigError(f"{flag} {path}: the archive holds no {' and no '.join(missing)} "
                                      "(is it ILSVRC2012_devkit_t12.tar.gz?)")
                return tuple(tar.extractfile(members[n]).read() for n in names)
        except (OSError, tarfile.TarError, EOFError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]  # tarfile's "no method worked" spans lines
            raise ConfigError(f"{flag} {path}: cannot read the archive ({why.rstrip(':')})") from None
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    for d in (folder, os.path.join(folder, "data")):
        if all(os.path.isfile(os.path.join(d, n)) for n in names):
            try:
                return tuple(open(os.path.join(d, n), "rb").read() for n in names)
            except OSError as e:
                raise ConfigError(f"{flag} {path}: cannot read the devkit ({e})") from None
    raise ConfigError(f"{flag} {path}: not an ILSVRC-2012 devkit (no data/meta.mat and data/{DEVKIT_TRUTH} "
                      "in it" + (", nor meta.mat beside it)" if os.path.isfile(path) else ")"))


def read_devkit_labels(path: str, flag: str = "--val-labels") -> dict[str, str]:
    """Image stem -> WordNet id of ImageNet's validation set from the ILSVRC-2012 devkit
    (``ILSVRC2012_devkit_t12``: a folder, its ``data/`` folder, its ground-truth file or the
    ``.tar.gz``). ``data/meta.mat``'s ``synsets`` give each leaf class (``num_children`` 0) its
    ``ILSVRC2012_ID`` and ``WNID``; line n of ``data/ILSVRC2012_validation_ground_truth.txt`` is the
    ID of image ``ILSVRC2012_val_<n, 8 digits>``. (The IDs are not the sorted-wnid order of the
    class index.) ConfigError naming the file and line of what it cannot read."""
    import io

    meta_bytes, truth_bytes = _devkit_files(path, flag)
    try:
        from scipy.io import loadmat  # scikit-learn's dependency: installed with us

        synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        leaves = {int(i): str(w) for i, w, c in zip(synsets["ILSVRC2012_ID"], synsets["WNID"],
                                                    synsets["num_children"]) if int(c) == 0}
    except ImportError:
        raise ConfigError(f"{flag} {path}: reading the devkit's meta.mat needs scipy (pip install scipy)") from None
    except Exception as e:  # noqa: BLE001 (a corrupt or foreign .mat raises anything from ValueError to KeyError)
        raise ConfigError(f"{flag} {path}: meta.mat is not the devkit's class table ({type(e).__name__}: {e})") \
            from None
    if not leaves:
        raise ConfigError(f"{flag} {path}: meta.mat lists no leaf classes")
    out: dict[str, str] = {}
    try:
        text = truth_bytes.removeprefix(b"\xef\xbb\xbf").decode("ascii")  # (a UTF-8 BOM: re-saved by Notepad)
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: {DEVKIT_TRUTH} is not a list of class numbers") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.strip().isdigit() or int(line) not in leaves:
            raise ConfigError(f"{flag} {path}: {DEVKIT_TRUTH} line {n}: {line.strip()!r} is not a class number "
                              f"of meta.mat (1 to {max(leaves)})")
        out[f"ILSVRC2012_val_{n:08d}"] = leaves[int(line)]
    if not out:
        raise ConfigError(f"{flag} {path}: {DEVKIT_TRUTH} is empty")
    return out


def scan_labelled_folder(root: str, labels_path: str, *, flag: str = "--val-labels") -> list[ClassEntry]:
    """A flat folder ``ROOT/<image>`` (e.g. ImageNet's validation images as distributed) whose classes
    come from :func:`read_image_labels`: the class entries :func:`scan_image_folder` gives for the same
    images in class folders with ``label_map="sorted"`` (labels: the sorted class names; files sorted).

    DataError naming the folder where it holds no images, or images the file does not label (every image
    counts towards the accuracy, so none is dropped silently); labelled images missing from the folder
    are only counted in a warning (a partial copy of the set)."""
    labels = read_image_labels(labels_path, flag)
    files, others = _folder_files(root)
    if not files:
        raise DataError(f"{root}: no images at its top level" + (" (it holds class folders: leave out "
                                                                  f"{flag})" if _class_folders(root) else ""))
    unlabelled = [f for f in files if os.path.splitext(f)[0] not in labels]
    if unlabelled:
        raise DataError(f"{root}: {len(unlabelled)} of its {len(files)} images have no label in {labels_path} "
                        f"(e.g. {', '.join(unlabelled[:3])})")
    stems: dict[str, str] = {}
    for f in files:  # (both were scored: one labelled image counted twice)
        other = stems.setdefault(os.path.splitext(f)[0], f)
        if other != f:
            raise DataError(f"{root}: {other} and {f} are one labelled image ({os.path.splitext(f)[0]!r} in "
                            f"{labels_path}) in two files; keep one")
    warn_ignored(root, others)  # (as scan_image_folder says of a class folder's)
    held = set(stems)
    if len(labels) > len(held):
        log.warning("%s labels %d images; %s holds %d of them", labels_path, len(labels), root, len(held))
    by_class: dict[str, list[str]] = {}
    for f in files:
        by_class.setdefault(labels[os.path.splitext(f)[0]], []).append(os.path.join(root, f))
    return [ClassEntry(name=c, label=i, files=by_class[c], folder=root) for i, c in enumerate(sorted(by_class))]
