"""Class-structured image folders: class lists, scanning, robust image loading.

The data path starts here (SPEC 1): ``ROOT/<class>/<image>`` becomes a list of
:class:`ClassEntry` (class name, DiT label, sorted image paths), and images are
loaded exactly as the DiT/ADM training code prepared them (``center_crop_arr``
then ``[-1, 1]``), so the cached latents match what the model saw.

Shipped class lists (``manifoldgd_fast/classlists/``):

- ``imagenet1k``  the 1000 ILSVRC-2012 WordNet ids in class-index order (sorted),
  the order of the DiT class embedding; ``imagenet1k_names.txt`` holds the
  first WordNet lemma of each, except where two lemmas are equal once lowercased
  (CLIP's tokenizer lowercases, so their prompts would be one): there it holds
  OpenAI CLIP's curated ImageNet names, 134 "crane bird" / 517 "construction
  crane", 264 "Cardigan Welsh Corgi" / 474 "cardigan", 638 "maillot" / 639
  "one-piece bathing suit". The old lemmas still resolve in class maps
  (:data:`IMAGENET_OLD_NAMES`).
- ``nette``       ImageNette (fast.ai), sorted.
- ``woof``        ImageWoof (fast.ai), sorted.
- ``imagenet100`` the CMC ImageNet-100 subset (Tian et al. 2020), in CMC order.
- ``idc``         ImageIDC: the first 10 classes of that list (IDC / MinimaxDiffusion /
  MGD3 "nclass=10, phase 0"), sorted.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Iterator, Sequence

import numpy as np
import torch

from .config import LABEL_MAPS, check_label_map
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
SUBSETS = ("imagenet1k", "nette", "woof", "imagenet100", "idc")
_WNID = re.compile(r"^n\d{8}$")
# Earlier names of ImageNet-1k classes (the plain WordNet lemmas) -> class ids, so class maps written
# with them keep working: "Cardigan" is still the corgi; "crane" and "maillot" name two classes each.
IMAGENET_OLD_NAMES: dict[str, tuple[int, ...]] = {"crane": (134, 517), "Cardigan": (264,), "maillot": (638, 639)}


# --------------------------------------------------------------------------- #
# class lists
# --------------------------------------------------------------------------- #
def _read_list_text(text: str) -> list[str]:
    """One entry a line; blank lines and ``#`` comments (whole or trailing) ignored."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


@functools.lru_cache(maxsize=None)
def _shipped_list(name: str) -> tuple[str, ...]:
    text = resources.files("manifoldgd_fast").joinpath("classlists", f"{name}.txt").read_text("utf-8")
    return tuple(_read_list_text(text))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (``n01440764`` is 0)."""
    return list(_shipped_list("imagenet1k"))


def imagenet_class_names() -> list[str]:
    """Human-readable ImageNet-1k names, aligned with :func:`imagenet_wnids`."""
    return list(_shipped_list("imagenet1k_names"))


@functools.lru_cache(maxsize=None)
def imagenet_wnid_index() -> dict[str, int]:
    """ImageNet-1k WordNet id -> its class index (the position in :func:`imagenet_wnids`)."""
    return {w: i for i, w in enumerate(_shipped_list("imagenet1k"))}


def class_display_name(name: str) -> str:
    """A readable class name for folder ``name`` (the text-to-image prompt's {name}):
    the ImageNet-1k name of a WordNet id (``n01440764`` -> "tench"), otherwise the
    folder name with underscores as spaces (``golden_retriever`` -> "golden retriever")."""
    i = imagenet_wnid_index().get(name)
    if i is not None:
        return _shipped_list("imagenet1k_names")[i]
    return " ".join(name.replace("_", " ").split())


def class_names_map(spec) -> dict[str, str]:
    """Resolve ``--class-names``: folder name -> class name given by the user.

    ``spec``: a mapping; a ``.json`` file holding one; a text file with one class a
    line, ``<folder> <name ...>`` (the first word is the folder; ImageNet's
    ``LOC_synset_mapping.txt`` reads as is; ``#`` comments and blank lines ignored);
    or an inline ``"folder=name,folder2=name2"``. A name listing synonyms, as
    ``LOC_synset_mapping.txt`` does ("tench, Tinca tinca"), gives its first one ("tench").
    """
    import json

    flag = "--class-names"
    if isinstance(spec, dict):
        out = spec
    elif not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{flag} {spec!r}: give a file, a mapping, or 'folder=name,folder2=name2'")
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
            if spec.endswith(".json"):
                out = json.loads(text)
                if not isinstance(out, dict):
                    raise ValueError("not a JSON object of folder: name")
            else:
                out = {}
                for line in _read_list_text(text):
                    parts = line.split(None, 1)
                    if len(parts) != 2:
                        raise ValueError(f"line {line!r} is not '<folder> <name>'")
                    out[parts[0]] = parts[1].strip()
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{flag} {spec}: cannot read the class names ({e})") from None
    elif "=" in spec:
        out = {}
        for item in spec.split(","):
            if item.strip():
                k, sep, v = item.partition("=")
                if not sep or not k.strip() or not v.strip():
                    raise ConfigError(f"{flag} {spec!r}: {item.strip()!r} is not folder=name")
                out[k.strip()] = v.strip()
    else:
        raise ConfigError(f"{flag} {spec}: no such file, and not 'folder=name,folder2=name2'")
    bad = [k for k, v in out.items()
           if not isinstance(k, str) or not isinstance(v, str) or not v.split(",", 1)[0].strip()]
    if bad:
        raise ConfigError(f"{flag}: class {bad[0]!r} needs a non-empty name")
    return {k: v.split(",", 1)[0].strip() for k, v in out.items()}


def class_list(spec: str) -> list[str]:
    """Resolve ``--classes``: a subset name, a text file, or ``"a,b,c"``.

    Subset names: ``imagenet1k``, ``nette``, ``woof``, ``imagenet100``, ``idc``.
    A file holds one class a line (blank lines and ``#`` comments ignored). A
    single token that is neither is one class name.

    Returns the class names in the given order (no duplicates).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--classes {spec!r}: empty; give a subset name ({', '.join(SUBSETS)}), "
                          "a file, or a comma-separated list")
    spec = spec.strip()
    if spec in SUBSETS:
        return list(_shipped_list(spec))
    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                names = _read_list_text(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--classes {spec}: cannot read the class file ({e})") from None
        source = f"file {spec}"
    elif "," in spec:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        source = repr(spec)
    else:  # one class name; a misspelt subset name fails at the scan, naming the missing class folder
        names = [spec]
        source = repr(spec)
    if not names:
        raise ConfigError(f"--classes {source}: no class names in it")
    seen = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"--classes {source}: class {n!r} is listed twice")
        seen.add(n)
    return names


# --------------------------------------------------------------------------- #
# folder scan
# --------------------------------------------------------------------------- #
@dataclass
class ClassEntry:
    """One class of an image folder.

    name:   folder name (e.g. ``n01440764``)
    label:  the DiT class id used to condition sampling
    files:  absolute image paths, sorted by file name
    folder: absolute path of the class folder
    """

    name: str
    label: int
    files: list[str]
    folder: str = ""

    def __post_init__(self):
        if not self.folder and self.files:
            self.folder = os.path.dirname(self.files[0])

    def relative_files(self) -> list[str]:
        """File names relative to the class folder (what the latent cache records)."""
        return [os.path.relpath(f, self.folder) for f in self.files]


def _is_image(name: str) -> bool:
    # Hidden files (macOS "._x.jpg" resource forks, editor temp files) are not images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTS)


def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


@functools.lru_cache(maxsize=None)
def _imagenet_name_index() -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, list[int]]]:
    """(exact name -> ids, exact old name -> ids, normalised name -> ids) of the ImageNet-1k names.

    The shipped names first, then the old ones (:data:`IMAGENET_OLD_NAMES`: "Cardigan" is the corgi,
    "cardigan" the sweater), then both case- and ``_``-insensitively ("CARDIGAN": either)."""
    exact: dict[str, list[int]] = {}
    loose: dict[str, list[int]] = {}
    for i, n in enumerate(_shipped_list("imagenet1k_names")):
        exact.setdefault(n, []).append(i)
        loose.setdefault(_loose_name(n), []).append(i)
    old = {n: list(ids) for n, ids in IMAGENET_OLD_NAMES.items()}
    for n, ids in old.items():
        key = _loose_name(n)
        loose[key] = sorted(set(loose.get(key, [])) | set(ids))
    return exact, old, loose


def _loose_name(s: str) -> str:
    return " ".join(s.replace("_", " ").lower().split())


def _class_map_value(value) -> int:
    """One class-map value -> a DiT class id; ValueError saying why not."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a class id, a WordNet id or an ImageNet class name")
    if isinstance(value, str):
        value = value.strip()
        if re.fullmatch(r"[+-]?\d+", value):
            value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"class id {value} is negative")
        return value
    if _WNID.match(value):
        i = imagenet_wnid_index().get(value)
        if i is None:
            raise ValueError(f"{value!r} is not an ImageNet-1k WordNet id")
        return i
    exact, old, loose = _imagenet_name_index()
    ids = exact.get(value) or old.get(value) or loose.get(_loose_name(value))
    if not ids:
        raise ValueError(f"{value!r} is not a class id, an ImageNet-1k WordNet id or an ImageNet-1k class name")
    if len(ids) > 1:
        names = _shipped_list("imagenet1k_names")
        raise ValueError(f"ImageNet class name {value!r} is ambiguous (ids {', '.join(map(str, ids))}): "
                         f"{' or '.join(f'{names[i]!r} ({i})' for i in ids)}; give the id, the WordNet id or the name")
    return ids[0]


def read_label_map(path: str) -> dict[str, int]:
    """Read a ``--label-map`` class-map file: class folder -> DiT class id.

    ``path``: a JSON object ``{"folder": value, ...}`` (a ``.json`` file, or any
    file whose text starts with ``{``), or a text/CSV file of lines
    ``folder<TAB|,|spaces>value`` (split at the first tab, else the first comma,
    else the first run of spaces; ``#`` comments and blank lines ignored). A
    value is an integer class id, an ImageNet-1k WordNet id (``n01440764`` -> 0)
    or an ImageNet-1k class name (``tench``; case and ``_`` ignored when unique).

    Returns folder -> class id, in file order. Raises ConfigError naming the file
    and the line (or JSON key) of an unreadable entry, an unknown value, a folder
    given twice, or two folders with the same class id (each class needs its own
    label: sample seeds and the guidance noise are keyed by it).
    """
    import json

    flag = f"--label-map {path}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag}: cannot read the class map ({e})") from None
    items: list[tuple[str, str, object]] = []   # (where, folder, value)
    if path.endswith(".json") or text.lstrip().startswith("{"):
        class Pairs(list):  # a JSON object's (key, value) pairs: a dict would silently keep a repeated key's last
            pass

        try:
            obj = json.loads(text, object_pairs_hook=Pairs)
        except ValueError as e:
            raise ConfigError(f"{flag}: not valid JSON ({e})") from None
        if not isinstance(obj, Pairs):
            raise ConfigError(f"{flag}: expected a JSON object {{\"folder\": class id, WordNet id or name}}")
        items = [(f"key {k!r}", k, v) for k, v in obj]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            sep = "\t" if "\t" in line else "," if "," in line else None
            parts = [p.strip() for p in line.split(sep, 1)]
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ConfigError(f"{flag}: line {n}: {line!r} is not '<folder> <class id, WordNet id or name>'")
            items.append((f"line {n}", parts[0], parts[1]))
    if not items:
        raise ConfigError(f"{flag}: the class map is empty")
    out: dict[str, int] = {}
    where_of: dict[str, str] = {}
    owner: dict[int, str] = {}
    for where, folder, value in items:
        if folder in out:
            first = f" (first at {where_of[folder]})" if where_of[folder] != where else ""
            raise ConfigError(f"{flag}: {where}: folder {folder!r} is mapped twice{first}")
        try:
            label = _class_map_value(value)
        except ValueError as e:
            raise ConfigError(f"{flag}: {where}: {e}") from None
        if label in owner:
            raise ConfigError(f"{flag}: {where}: folders {owner[label]!r} and {folder!r} both map to class {label}; "
                              "each class folder needs its own class id")
        out[folder], where_of[folder], owner[label] = label, where, folder
    return out


def scan_image_folder(root: str, classes: Sequence[str] | str | None = None,
                      label_map: str = "auto", warn_stray: bool = True) -> list[ClassEntry]:
    """Scan ``ROOT/<class>/<image>`` into class entries.

    Args:
        root: the image folder.
        classes: None (every class folder, sorted), a list of class folder
            names (that order), or a ``--classes`` string for :func:`class_list`.
        label_map: how a folder becomes a DiT label:
            ``"imagenet1k"`` index of the folder name in the 1k wnid list;
            ``"sorted"`` index among *all* class folders of ``root`` sorted, so
            restricting a run with ``classes`` keeps each class's label;
            ``"auto"`` imagenet1k if every class folder of root is a 1k wnid,
            else sorted (with a warning naming the odd folders when only
            some are wnids: usually a stray folder; ``warn_stray=False``
            when the labels do not select ImageNet classes, e.g. for SD);
            any other value: a class-map file (:func:`read_label_map`) that
            must name every selected folder.

    Returns:
        list of :class:`ClassEntry` in class order.

    Raises:
        DataError: root missing or not a folder, no class folders, a selected
            class folder missing or without images, a non-wnid folder under
            ``label_map="imagenet1k"``, a selected folder missing from the
            class-map file.
        ConfigError: unknown ``label_map`` (neither a keyword nor a file), a
            bad class-map file or a bad ``classes`` string.
    """
    check_label_map(label_map)
    if not os.path.exists(root):
        raise DataError(f"data folder {root} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} is not a folder")
    root = os.path.abspath(root)
    all_folders = _class_folders(root)
    if not all_folders:
        raise DataError(f"data folder {root} has no class folders (expected ROOT/<class>/<image>)")

    if isinstance(classes, str):
        classes = class_list(classes)
    if classes is None:
        selected = all_folders
    else:
        selected = list(classes)
        present = set(all_folders)
        for name in selected:
            if name not in present:
                raise DataError(f"class folder {os.path.join(root, name)} does not exist "
                                f"(class {name!r} was asked for)")

    if label_map == "auto":
        wnids = imagenet_wnid_index()
        odd = [f for f in all_folders if f not in wnids]
        label_map = "sorted" if odd else "imagenet1k"
        if warn_stray and odd and len(odd) < len(all_folders):
            # Mostly wnids: the ImageNet ids were probably meant, and a stray folder changes every label.
            shown = ", ".join(odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
            log.warning("--label-map auto: %d of the %d class folders of %s are not ImageNet-1k WordNet ids (%s), "
                        "so every class gets its sorted index, not its ImageNet class id; remove the stray "
                        "folders, or use --label-map imagenet1k (with --classes) or a class-map file",
                        len(odd), len(all_folders), root, shown)
    if label_map not in LABEL_MAPS:
        mapping = read_label_map(label_map)
        for name in selected:
            if name not in mapping:
                raise DataError(f"--label-map {label_map}: class folder {name!r} is not in the class map")
        labels = {name: mapping[name] for name in selected}
    elif label_map == "imagenet1k":
        wnids = imagenet_wnid_index()
        for name in selected:
            if name not in wnids:
                raise DataError(f"class folder {os.path.join(root, name)}: {name!r} is not an "
                                "ImageNet-1k WordNet id (use --label-map sorted)")
        labels = {name: wnids[name] for name in selected}
    else:
        order = {name: i for i, name in enumerate(all_folders)}
        labels = {name: order[name] for name in selected}

    entries = []
    for name in selected:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in the name: the caches and the manifest could not record it
            raise DataError(f"class folder {name!r} in {root}: its name is not valid UTF-8; rename it") from None
        folder = os.path.join(root, name)
        files = sorted(e.name for e in os.scandir(folder) if e.is_file() and _is_image(e.name))
        if not files:
            raise DataError(f"class {name} in {root} has no images ({'/'.join(IMAGE_EXTS)})")
        entries.append(ClassEntry(name=name, label=labels[name],
                                  files=[os.path.join(folder, f) for f in files], folder=folder))
    return entries


# --------------------------------------------------------------------------- #
# image loading
# --------------------------------------------------------------------------- #
def center_crop_arr(pil_image, image_size: int, short_side: int | None = None) -> np.ndarray:
    """ADM / DiT preprocessing: halve with BOX while the short side is >= 2x the
    target (cheap anti-aliasing), BICUBIC-resize the short side to
    ``image_size``, then centre-crop. Returns uint8 (image_size, image_size, 3).
    ``short_side``: resize the short side to this instead (>= image_size; e.g. 256 for
    a 224 crop, as evaluation resizes validation images), then crop ``image_size``."""
    from PIL import Image

    short = image_size if short_side is None else short_side
    while min(*pil_image.size) >= 2 * short:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)  # a writable copy: torch.from_numpy warns on read-only arrays
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def resize_crop_torchvision(pil_image, image_size: int, short_side: int | None = None) -> np.ndarray:
    """torchvision's ``Resize(short_side)`` + ``CenterCrop(image_size)`` on a PIL image, as the
    ManifoldGD release's evaluation reads every image (``transform_imagenet``): PIL bilinear
    (antialiased) straight to the target, the long side ``int(short_side * long / short)``, the
    crop offset ``int(round((n - image_size) / 2))`` (Python rounding). ``short_side``: as in
    :func:`center_crop_arr`. Returns uint8 (image_size, image_size, 3)."""
    from PIL import Image

    short = image_size if short_side is None else short_side
    w, h = pil_image.size
    long = int(short * max(w, h) / min(w, h))
    new = (short, long) if w <= h else (long, short)
    if new != (w, h):
        pil_image = pil_image.resize(new, resample=Image.BILINEAR)
    arr = np.array(pil_image)
    top = int(round((arr.shape[0] - image_size) / 2.0))
    left = int(round((arr.shape[1] - image_size) / 2.0))
    return arr[top:top + image_size, left:left + image_size]


# how an image is brought to its size: DiT's preprocessing (default) or torchvision's, the release's evaluation
RESAMPLERS = {"bicubic": center_crop_arr, "bilinear": resize_crop_torchvision}


def to_rgb(img):
    """A PIL image as 8-bit RGB. 16- and 32-bit greyscale (modes I;16*, I) keep their top 8 bits and
    float greyscale (F, taken as 0..1) is scaled to 0..255; ``convert("RGB")`` would clip both at 255,
    turning most of a 16-bit image white."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)
        bits = 16 if img.mode.startswith("I;16") or arr.max(initial=0) < (1 << 16) else 32
        img = Image.fromarray((np.clip(arr, 0, (1 << bits) - 1) >> (bits - 8)).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


# PIL reports damaged files through several exception types (truncated data: OSError; bad headers:
# SyntaxError/ValueError; huge dims: DecompressionBombError).
def image_errors():
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def read_image_uint8(path: str, size: int, short_side: int | None = None, resample: str = "bicubic") -> torch.Tensor:
    """Decode and centre-crop one image as the DiT training code did (:func:`center_crop_arr`), or
    (``resample="bilinear"``) as torchvision's Resize + CenterCrop do (:func:`resize_crop_torchvision`).
    ``short_side``: see :func:`center_crop_arr`.

    Returns:
        uint8 (3, size, size), contiguous. ``latents.normalise_lut()[x.int()]`` gives
        :func:`load_image` bit for bit.

    Raises:
        DataError naming ``path`` when the file cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = RESAMPLERS[resample](to_rgb(img), size, short_side)  # (size, size, 3) uint8
    except image_errors() as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, size, size)


def load_image(path: str, size: int) -> torch.Tensor:
    """Load one image as the DiT training code did.

    Returns a float32 tensor (3, size, size) in [-1, 1].
    Raises DataError naming ``path`` when the file cannot be decoded.
    """
    x = read_image_uint8(path, size).float()
    # Same arithmetic as ToTensor() + Normalize(0.5, 0.5): the same floats bit for bit.
    return (x / 255.0 - 0.5) / 0.5


class ClassImages:
    """Batches of one class's images; unreadable files are skipped and recorded.

    Iterate for ``(batch (b, 3, size, size) float32, paths)``; afterwards
    ``skipped`` lists the unreadable paths (in file order) and ``reasons`` maps
    each to its error. Decoding runs in a small thread pool (PIL releases the
    GIL while decoding and resizing), at most two batches ahead, so memory
    stays bounded on large classes and the order never changes.

    ``read(path, size)`` decodes one file (default :func:`load_image`, float in [-1, 1]; e.g.
    :func:`read_image_uint8` for uint8) and raises DataError for an unreadable one.
    """

    def __init__(self, entry: ClassEntry, size: int, batch_size: int, num_workers: int | None = None,
                 read=None):
        if batch_size < 1:
            raise ConfigError(f"--encode-batch-size {batch_size}: must be >= 1")
        self.entry = entry
        self.size = size
        self.batch_size = batch_size
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else max(0, num_workers)
        self.read = load_image if read is None else read
        self.skipped: list[str] = []
        self.reasons: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.entry.files)

    def _load(self, path: str) -> torch.Tensor | DataError:
        try:
            return self.read(path, self.size)
        except DataError as e:
            return e

    def _results(self) -> Iterator[tuple[str, torch.Tensor | DataError]]:
        files = self.entry.files
        if self.num_workers <= 1:
            for p in files:
                yield p, self._load(p)
            return
        lookahead = 2 * self.batch_size
        with ThreadPoolExecutor(self.num_workers) as pool:
            pending: deque = deque()
            it = iter(files)
            for p in it:
                pending.append((p, pool.submit(self._load, p)))
                if len(pending) >= lookahead:
                    break
            while pending:
                p, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._load, nxt)))
                yield p, fut.result()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        self.skipped, self.reasons = [], {}
        imgs: list[torch.Tensor] = []
        paths: list[str] = []
        for p, res in self._results():
            if isinstance(res, DataError):
                self.skipped.append(p)
                self.reasons[p] = str(res)
                warnings.warn(f"skipping unreadable image {p}", stacklevel=2)
                log.warning("%s", res)
                continue
            imgs.append(res)
            paths.append(p)
            if len(imgs) == self.batch_size:
                yield torch.stack(imgs), paths
                imgs, paths = [], []
        if imgs:
            yield torch.stack(imgs), paths


def iter_class_images(entry: ClassEntry, size: int, batch_size: int,
                      num_workers: int | None = None, read=None) -> ClassImages:
    """Batches of ``entry``'s images at ``size`` px; see :class:`ClassImages`.

    ``for batch, paths in it: ...`` gives batch (b, 3, size, size) in [-1, 1]
    (or as ``read`` returns them) and the b paths it holds; ``it.skipped`` then
    lists unreadable files.
    """
    return ClassImages(entry, size, batch_size, num_workers, read=read)
