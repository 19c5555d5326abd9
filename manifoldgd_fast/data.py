"""Class-structured image folders: scanning and robust image loading.

The data path starts here (SPEC 1): ``ROOT/<class>/<image>`` becomes a list of
:class:`ClassEntry` (class name, DiT label, sorted image paths), and images are
loaded exactly as the DiT/ADM training code prepared them (``center_crop_arr``
then ``[-1, 1]``), so the cached latents match what the model saw. Class lists,
class names and class maps (``--classes``, ``--class-names``, ``--label-map``)
are in :mod:`manifoldgd_fast.classes`.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .classes import class_list, imagenet_wnid_index, read_label_map
from .config import LABEL_MAPS, check_label_map
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

CLASS_NAME_BYTES = 200   # a class folder's name, in bytes: its outputs' names add up to 26 (255 at most)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision ImageFolder's


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


def _kind(entry: os.DirEntry) -> str:
    """"file", "dir" or "other" (a dangling or looping link, a pipe, a socket), following links."""
    try:
        return "file" if entry.is_file() else "dir" if entry.is_dir() else "other"
    except OSError:  # e.g. a symlink loop (ELOOP)
        return "other"


def _folder_files(folder: str) -> tuple[list[str], list[str]]:
    """(the image file names directly in ``folder``, its other visible entries: files that are not images,
    sub-folders as ``name/`` (not read), dangling or looping links), each sorted."""
    files, others = [], []
    for e in os.scandir(folder):
        if e.name.startswith("."):
            continue
        kind = _kind(e)
        if kind == "file" and _is_image(e.name):
            files.append(e.name)
        else:
            others.append(e.name + ("/" if kind == "dir" else ""))
    return sorted(files), sorted(others)


def warn_ignored(root: str, ignored: list[str]) -> None:
    """One warning naming the entries of ``root``'s folders that are read as no image (e.g. .gif, .heic, notes,
    sub-folders): nothing reads them, so say so (once), never drop them unseen."""
    if ignored:
        log.warning("%s: ignoring %d file(s) that are not %s images (or sub-folders, not read; or broken links): "
                    "%s", root, len(ignored), "/".join(IMAGE_EXTS),
                    ", ".join(ignored[:3]) + (" ..." if len(ignored) > 3 else ""))


def _image_files(folder: str) -> list[str]:
    """The image file names directly in ``folder``, sorted."""
    return _folder_files(folder)[0]


# folders that operating systems and archivers leave beside the data, never classes (macOS's zip archives, ext4's
# lost+found, Synology's thumbnails, Windows' recycle bin and volume information)
SYSTEM_FOLDERS = frozenset({"__MACOSX", "lost+found", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})


def may_be_class(name: str) -> bool:
    """Whether a folder of this name in a data folder is read as a class (hidden and system folders are not)."""
    return not name.startswith(".") and name not in SYSTEM_FOLDERS


def _class_folders(root: str, check_links: bool = False) -> list[str]:
    """The class folder names of ``root``, sorted (no hidden or :data:`SYSTEM_FOLDERS` one). check_links: a
    DataError for a broken link (dangling or looping) among them: a class folder that cannot be read would
    move every later class's sorted label, silently."""
    names = []
    with os.scandir(root) as entries:   # (closed also when a broken link stops the scan)
        for e in entries:
            if not may_be_class(e.name):
                continue
            kind = _kind(e)
            if kind == "dir":
                names.append(e.name)
            elif check_links and kind == "other" and e.is_symlink():
                raise DataError(f"{os.path.join(root, e.name)}: a broken link (its target is missing, or a loop) "
                                "among the class folders; its class would be left out and every class after it take "
                                "another label: restore its target or remove the link")
    return sorted(names)


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
    all_folders = _class_folders(root, check_links=True)
    if not all_folders:
        hint = (": it holds images itself; give the folder whose sub-folders are the classes"
                if _image_files(root) else "")
        raise DataError(f"data folder {root} has no class folders (expected ROOT/<class>/<image>){hint}")

    if isinstance(classes, str):
        classes = class_list(classes)
    if classes is None:
        selected = all_folders
    else:
        try:
            selected = list(classes)
        except TypeError:
            selected = None
        if selected is None or not all(isinstance(n, str) for n in selected):  # e.g. numbered folders as ints
            raise ConfigError(f"classes: {classes!r} is not a list of class folder names (str)")
        if not selected:  # (the --classes string is checked by class_list; here the Python API's list)
            raise ConfigError("classes: empty; give class folder names, or None for every class folder")
        if len(set(selected)) != len(selected):
            dup = sorted({n for n in selected if selected.count(n) > 1})
            raise ConfigError(f"classes: class {dup[0]!r} is listed twice")
        present = set(all_folders)
        for name in selected:
            if name not in present:
                if os.path.basename(name) != name or name in (".", ".."):  # e.g. a path given to --classes
                    raise DataError(f"class {name!r} was asked for: a class is a folder name in {root}, not a path")
                path = os.path.join(root, name)
                why = ("is a file, not a folder" if os.path.isfile(path) else
                       "is hidden or a system folder, never a class" if os.path.isdir(path) else "does not exist")
                raise DataError(f"class folder {path} {why} (class {name!r} was asked for)")
    for name in selected:  # the outputs' names add to a class's: ".<class>.tmp-<pid>", "<class>.safetensors"
        if len(name.encode("utf-8", "surrogateescape")) > CLASS_NAME_BYTES:
            raise DataError(f"class folder {os.path.join(root, name)[:120]}...: its name is "
                            f"{len(name.encode('utf-8', 'surrogateescape'))} bytes, more than the "
                            f"{CLASS_NAME_BYTES} the outputs' file names leave it (the file system takes 255); "
                            "rename it")

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
        numbered = all(f.isascii() and f.isdigit() for f in all_folders)
        moved = [(f, i) for i, f in enumerate(all_folders) if numbered and int(f) != i]
        if warn_stray and moved:
            # Folders named by class number (an export of a labelled data set): sorted as text, "10" comes before
            # "2", so a folder's label is not its number, silently, unless this says so.
            log.warning("--label-map auto: the class folders of %s are numbers, and each class gets its place in "
                        "their sorted (text) order, as torchvision's ImageFolder numbers them, not its number "
                        "(folder %s is class %d); if the numbers are the model's class ids, give a class-map file "
                        "(lines '<folder> <class id>')", root, moved[0][0], moved[0][1])
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

    entries, ignored = [], []
    for name in selected:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in the name: the caches and the manifest could not record it
            raise DataError(f"class folder {name!r} in {root}: its name is not valid UTF-8; rename it") from None
        folder = os.path.join(root, name)
        files, others = _folder_files(folder)
        ignored += [os.path.join(name, n) for n in others]
        if not files:
            sub = _class_folders(folder)
            hint = (f"; it holds folders ({', '.join(sub[:3])}{', ...' if len(sub) > 3 else ''}): is {root} one "
                    f"level above the class folders, e.g. {os.path.join(root, name)}?") if sub else ""
            raise DataError(f"class {name} in {root} has no images ({'/'.join(IMAGE_EXTS)}){hint}")
        entries.append(ClassEntry(name=name, label=labels[name],
                                  files=[os.path.join(folder, f) for f in files], folder=folder))
    warn_ignored(root, ignored)
    system = sorted(n for n in SYSTEM_FOLDERS if os.path.isdir(os.path.join(root, n)))
    if system:
        log.warning("%s: ignoring %s (a system or archive folder, not a class)", root, ", ".join(system))
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
    """A PIL image as 8-bit RGB. 16-bit greyscale (modes I;16*) keeps its top 8 bits. 32-bit integer greyscale
    (mode I, which carries no bit depth) is read by its largest value: 8-bit values (<= 255) as they are,
    16-bit ones (< 2**16) by their top 8 bits, others by the top 8 of the 31 value bits (it is signed: 0 ..
    2**31 - 1 maps to 0 .. 255). Float greyscale (F) the same way: 0..1 (largest <= 1) scaled to 0..255,
    0..255 as it is, 0..65535 scaled by 255 / 65535; larger values are a ValueError (no scale to read them by).
    ``convert("RGB")`` would clip all of these at 255, turning most of a 16-bit image white."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)
        top = arr.max(initial=0)
        bits = 16 if img.mode.startswith("I;16") else 8 if top <= 255 else 16 if top < (1 << 16) else 31
        img = Image.fromarray((np.clip(arr, 0, (1 << bits) - 1) >> (bits - 8)).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = arr.max(initial=0.0)
        if top > 65535:
            raise ValueError(f"float image with values up to {top:g}, past the 0..1, 0..255 and 0..65535 ranges "
                             "it could be read as")
        scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / 65535.0   # (0..65535: x 255 / 65535)
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


# PIL reports damaged files through several exception types (truncated data: OSError; bad headers:
# SyntaxError/ValueError; huge dims: DecompressionBombError).
def image_errors():
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# What Image.open may decode: the formats of IMAGE_EXTS (whatever the extension says: ImageNet holds a PNG and
# CMYK JPEGs named .JPEG) and GIF. Not EPS (Pillow would run Ghostscript on it), nor PSD, ICO, FITS, ...
READ_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")  # (JPEG also opens MPO files)
MAX_ASPECT = 64  # longer / shorter side beyond which an image is skipped as unreadable (see read_image_uint8)


def check_aspect(w: int, h: int) -> None:
    """ValueError for an image of ``w`` x ``h`` px that is empty or past :data:`MAX_ASPECT` (the short side is
    resized to the size asked for: a 1 x 10^7 strip would become a 256 x 2.6e9 image)."""
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(f"{w} x {h} px, an aspect ratio over {MAX_ASPECT}:1")


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
    arr = decode_image(path, lambda rgb: RESAMPLERS[resample](rgb, size, short_side))  # (size, size, 3) uint8
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, size, size)


def decode_image(path: str, fn):
    """``fn(image)`` of the file at ``path`` as 8-bit RGB (:func:`to_rgb`), opened as every reader of the package
    opens one: only :data:`READ_FORMATS`, :func:`check_aspect` on its header, a warning naming a file past
    PIL's decompression-bomb warning size (read all the same; past twice that, PIL refuses it). DataError
    naming ``path`` when the file cannot be decoded (or runs out of memory)."""
    from PIL import Image

    shown = _one_line(path)  # (a newline in a name split the warning's line)
    try:
        with Image.open(path, formats=READ_FORMATS) as img:
            w, h = img.size
            check_aspect(w, h)                       # (read from the header: nothing decoded yet)
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:              # (PIL's own warning names no file: the CLI silences it)
                log.warning("%s: %d x %d px (%.0f M pixels), past PIL's decompression-bomb warning size: "
                            "read all the same", shown, w, h, w * h / 1e6)
            return fn(to_rgb(img))
    except image_errors() as e:
        raise DataError(f"cannot read image {shown}: {_one_line(e)}") from None
    except MemoryError:
        raise DataError(f"cannot read image {shown}: out of memory decoding or resizing it") from None


def _one_line(text) -> str:
    """``str(text)`` with its newlines and other unprintable characters escaped, as ascii() writes them."""
    text = str(text)
    return text if text.isprintable() else ascii(text)[1:-1]


def reads_now(folder: str, names, read, size: int) -> str | None:
    """The first of ``names`` (files in ``folder`` a cache recorded as unreadable) that ``read(path, size)``
    decodes now, or None: a chmod, a remounted disk or more memory change no size or mtime, the stamps the
    caches compare, so their recorded skips are tried again."""
    for name in names:
        try:
            read(os.path.join(folder, name), size)
        except DataError:
            continue
        return name
    return None


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
                if p not in _REPORTED:  # once a process: metrics reads the real images twice (encoder, features)
                    _REPORTED.add(p)
                    log.warning("%s", res)
                continue
            imgs.append(res)
            paths.append(p)
            if len(imgs) == self.batch_size:
                yield torch.stack(imgs), paths
                imgs, paths = [], []
        if imgs:
            yield torch.stack(imgs), paths


_REPORTED: set[str] = set()  # unreadable images already named in the log


def iter_class_images(entry: ClassEntry, size: int, batch_size: int,
                      num_workers: int | None = None, read=None) -> ClassImages:
    """Batches of ``entry``'s images at ``size`` px; see :class:`ClassImages`.

    ``for batch, paths in it: ...`` gives batch (b, 3, size, size) in [-1, 1]
    (or as ``read`` returns them) and the b paths it holds; ``it.skipped`` then
    lists unreadable files.
    """
    return ClassImages(entry, size, batch_size, num_workers, read=read)
