"""Class lists, class names and class maps: ``--classes``, ``--class-names`` and ``--label-map``.

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
import json
import os
import re
from importlib import resources

from .errors import ConfigError

SUBSETS = ("imagenet1k", "nette", "woof", "imagenet100", "idc")
_WNID = re.compile(r"^n\d{8}$")
# Earlier names of ImageNet-1k classes (the plain WordNet lemmas) -> class ids, so class maps written
# with them keep working: "Cardigan" is still the corgi; "crane" and "maillot" name two classes each.
IMAGENET_OLD_NAMES: dict[str, tuple[int, ...]] = {"crane": (134, 517), "Cardigan": (264,), "maillot": (638, 639)}


# --------------------------------------------------------------------------- #
# class lists
# --------------------------------------------------------------------------- #
# a comment: "#" opening the line or after a blank ("C#", "no#2" are names, not a name and a comment)
_COMMENT = re.compile(r"(?:^|\s)#")


def content_lines(lines, start: int = 1):
    """(line number, text) of each line that holds something once its ``#`` comment (whole, or trailing
    after a blank) and surrounding blanks are dropped; numbered from ``start``."""
    for n, line in enumerate(lines, start):
        line = _COMMENT.split(line, 1)[0].strip()
        if line:
            yield n, line


def split_pair(line: str) -> list[str]:
    """``<a> <b>`` split at the first tab, else the first comma, else the first run of spaces; the parts
    stripped (a well-formed line gives two non-empty ones)."""
    sep = "\t" if "\t" in line else "," if "," in line else None
    return [p.strip() for p in line.split(sep, 1)]


def _read_list_text(text: str) -> list[str]:
    """One entry a line; blank lines and ``#`` comments (whole or trailing) ignored."""
    return [line for _, line in content_lines(text.splitlines())]


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

    ``spec``: a mapping; a ``.json`` file holding one (or any file whose text starts with ``{``); a text
    file with one class a line, ``<folder> <name ...>`` (the first word is the folder; ImageNet's
    ``LOC_synset_mapping.txt`` reads as is; ``#`` comments and blank lines ignored);
    or an inline ``"folder=name,folder2=name2"``. In a text file, a name listing synonyms, as
    ``LOC_synset_mapping.txt`` does ("tench, Tinca tinca"), gives its first one ("tench"); a JSON
    file's or a mapping's names are taken as they are ("sweet, red cherry").
    """
    flag = "--class-names"
    if isinstance(spec, dict):
        out = spec
    elif not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{flag} {spec!r}: give a file, a mapping, or 'folder=name,folder2=name2'")
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8-sig") as f:
                text = f.read()
            if spec.lower().endswith(".json") or text.lstrip().startswith("{"):  # (as read_label_map reads JSON)
                out = json.loads(text)
                if not isinstance(out, dict):
                    raise ValueError("not a JSON object of folder: name")
            else:
                out = {}
                for line in _read_list_text(text):
                    parts = line.split(None, 1)
                    if len(parts) != 2:
                        raise ValueError(f"line {line!r} is not '<folder> <name>'")
                    out[parts[0]] = parts[1].split(",", 1)[0].strip()   # (LOC_synset_mapping's synonyms)
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
    bad = [k for k, v in out.items() if not isinstance(k, str) or not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"{flag}: class {bad[0]!r} needs a non-empty name")
    return {k: v.strip() for k, v in out.items()}


def class_list(spec: str) -> list[str]:
    """Resolve ``--classes``: a subset name, a text file, or ``"a,b,c"``.

    Subset names: ``imagenet1k``, ``nette``, ``woof``, ``imagenet100``, ``idc``.
    A file holds one class a line (blank lines and ``#`` comments ignored). A
    single token that is neither is one class name (one holding a path separator
    is a missing class file: ConfigError).

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
            with open(spec, encoding="utf-8-sig") as f:
                names = _read_list_text(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--classes {spec}: cannot read the class file ({e})") from None
        source = f"file {spec}"
    elif "," in spec:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        source = repr(spec)
    elif os.sep in spec or (os.altsep and os.altsep in spec):  # no folder name holds one: a missing class file
        raise ConfigError(f"--classes {spec}: no such file (a class file: one class folder name a line)")
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
# class maps (--label-map)
# --------------------------------------------------------------------------- #
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
    flag = f"--label-map {path}"
    try:
        with open(path, encoding="utf-8-sig") as f:
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
        for n, line in content_lines(text.splitlines()):
            parts = split_pair(line)
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
