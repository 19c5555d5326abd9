"""scikit-learn's bundled digits as a class-structured image folder (no download).

``sklearn.datasets.load_digits`` holds 1,797 8x8 grey images of the digits 0-9
with values 0..16. Each becomes a 32x32 RGB image: the values are scaled to
0..255 (rounded to uint8), upsampled with PIL bicubic, and repeated on three
equal channels. A fixed stratified split (seed :data:`SPLIT_SEED`, 20% of each
class to test) divides them into ``train`` (1,438) and ``test`` (359).

:func:`export_digits` writes them as real image folders that the rest of the
package reads like any other dataset::

    <cache>/digits/train/<class>/<i>.png
    <cache>/digits/test/<class>/<i>.png

``<class>`` is ``"0"`` .. ``"9"`` and ``<i>`` the image's index in
``load_digits``. The cache is ``$MANIFOLDGD_CACHE`` or
``~/.cache/manifoldgd_fast`` unless given. The export is built in a temporary
folder and renamed into place, so a reader never sees half a dataset, and a
complete export is left alone.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np

from ..errors import DataError
from ..output import sweep_stale_temps, write_folder_atomically

IMAGE_SIZE = 32
NUM_CLASSES = 10
DIGIT_CLASSES = tuple(str(c) for c in range(NUM_CLASSES))
SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
MANIFEST = "digits.json"
FORMAT_VERSION = 1


def default_cache_dir() -> str:
    """``$MANIFOLDGD_CACHE`` if set, else ``~/.cache/manifoldgd_fast``."""
    env = os.environ.get("MANIFOLDGD_CACHE")
    return os.path.abspath(os.path.expanduser(env if env else os.path.join("~", ".cache", "manifoldgd_fast")))


def upsample_digit(img: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """One 8x8 digit (values 0..16) as a (size, size, 3) uint8 RGB image."""
    from PIL import Image

    grey = np.clip(np.round(np.asarray(img, np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = Image.fromarray(grey).resize((size, size), resample=Image.BICUBIC)
    return np.asarray(big.convert("RGB"), dtype=np.uint8)


def stratified_split(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> np.ndarray:
    """A boolean mask, True for test: ``round(test_fraction * n_c)`` images of
    each class, drawn by one seeded numpy permutation per class (in class order)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(test_fraction * len(members)))
        is_test[members[rng.permutation(len(members))[:k]]] = True
    return is_test


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64, is_test (N,) bool), read-only."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a requirement
        raise DataError("the digits demo needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    images = np.stack([upsample_digit(im) for im in d.images])
    labels = np.asarray(d.target, dtype=np.int64)
    is_test = stratified_split(labels)
    for a in (images, labels, is_test):
        a.setflags(write=False)
    return images, labels, is_test


def digits_arrays(split: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digits in memory: (images (n, 32, 32, 3) uint8, labels (n,), indices (n,)).

    ``split`` is ``"train"``, ``"test"`` or None (all 1,797). ``indices`` are the
    images' positions in ``load_digits`` (the ``<i>`` of the exported file
    names), ascending. The pixels equal those of the exported PNGs.
    """
    images, labels, is_test = _digits()
    if split is None:
        keep = np.arange(len(labels))
    elif split in SPLITS:
        keep = np.flatnonzero(is_test if split == "test" else ~is_test)
    else:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return images[keep], labels[keep], keep


def _expected_counts() -> dict[str, dict[str, int]]:
    _, labels, is_test = _digits()
    out = {}
    for split in SPLITS:
        mask = is_test if split == "test" else ~is_test
        out[split] = {name: int(((labels == c) & mask).sum()) for c, name in enumerate(DIGIT_CLASSES)}
    return out


def _manifest() -> dict:
    return {"format": FORMAT_VERSION, "source": "sklearn.datasets.load_digits",
            "image_size": IMAGE_SIZE, "split_seed": SPLIT_SEED, "test_fraction": TEST_FRACTION,
            "counts": _expected_counts()}


def is_complete(root: str) -> bool:
    """True when ``root`` holds a finished export of this version (manifest and file counts)."""
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            if json.load(f) != _manifest():
                return False
        for split, counts in _expected_counts().items():
            for name, n in counts.items():
                folder = os.path.join(root, split, name)
                if sum(1 for e in os.listdir(folder) if e.endswith(".png")) != n:
                    return False
    except (OSError, ValueError):
        return False
    return True


def _write(root: str) -> None:
    from PIL import Image

    for split in SPLITS:
        images, labels, indices = digits_arrays(split)
        for name in DIGIT_CLASSES:
            os.makedirs(os.path.join(root, split, name))
        for img, c, i in zip(images, labels, indices):
            Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(root, split, DIGIT_CLASSES[c], f"{i}.png"))
    with open(os.path.join(root, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(_manifest(), f, indent=1, sort_keys=True)
        f.write("\n")


def export_digits(cache_dir: str | None = None) -> str:
    """Write ``<cache>/digits/{train,test}/<class>/<i>.png`` once; return ``<cache>/digits``.

    Idempotent: a complete export is reused as is. The images are written to a
    temporary folder next to the target and renamed into place; an incomplete
    or outdated ``digits`` folder is replaced.
    """
    cache = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    root = os.path.join(cache, "digits")
    if is_complete(root):  # (a killed export's temp, 7 MB, was swept only by another export: never, once complete)
        sweep_stale_temps(cache, (".digits.tmp-", ".digits.old-"))
        return root
    try:  # a damaged or outdated folder is moved aside and removed once the new one is in place
        write_folder_atomically(root, _write)
    except OSError as e:
        if not is_complete(root):  # else: another process exported it first
            raise DataError(f"cannot write the digits export to {root} ({e})") from None
    return root
