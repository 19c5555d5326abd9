"""Class lists, folder scanning, label maps and DiT-style image loading."""
from __future__ import annotations

import io
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from manifoldgd_fast import classes as C
from manifoldgd_fast import data as D
from manifoldgd_fast.errors import ConfigError, DataError


def _save(path, color=(255, 0, 0), size=(20, 12), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture
def wnid_root(tmp_path):
    """Two ImageNet classes with mixed-case extensions, a text file and a corrupt jpg."""
    root = tmp_path / "imgs"
    a = root / "n01440764"
    _save(str(a / "b.PNG"), (0, 255, 0), fmt="PNG")
    _save(str(a / "a.JPG"), (255, 0, 0), fmt="JPEG")
    _save(str(a / "c.jpeg"), (0, 0, 255), fmt="JPEG")
    (a / "notes.txt").write_text("not an image")
    (a / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (a / ".hidden.jpg").write_bytes(b"junk")
    b = root / "n02102040"
    _save(str(b / "x.WebP"), (10, 20, 30), fmt="WEBP")
    _save(str(b / "y.jpg"), (40, 50, 60), fmt="JPEG")
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root


# --------------------------------------------------------------------------- class lists
def test_imagenet_wnids_sorted_unique_and_names():
    w = C.imagenet_wnids()
    assert len(w) == 1000 and len(set(w)) == 1000
    assert w == sorted(w)
    assert w[0] == "n01440764" and w[-1] == "n15075141"
    names = C.imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[207] == "golden retriever"
    assert all(n.strip() == n and n for n in names)


@pytest.mark.parametrize("name,n,first", [
    ("nette", 10, "n01440764"), ("woof", 10, "n02086240"),
    ("imagenet100", 100, "n02869837"), ("idc", 10, "n01749939"), ("imagenet1k", 1000, "n01440764"),
])
def test_subsets_in_1k(name, n, first):
    lst = C.class_list(name)
    assert len(lst) == n and len(set(lst)) == n and lst[0] == first
    assert set(lst) <= set(C.imagenet_wnids())


def test_subset_class_indices():
    idx = {w: i for i, w in enumerate(C.imagenet_wnids())}
    # The class indices IDC / MinimaxDiffusion hard-code for ImageNette and ImageWoof.
    assert [idx[w] for w in C.class_list("nette")] == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert sorted(idx[w] for w in C.class_list("woof")) == sorted(
        [193, 182, 258, 162, 155, 167, 159, 273, 207, 229])
    # ImageIDC = the first 10 classes of the CMC ImageNet-100 list.
    assert C.class_list("idc") == sorted(C.class_list("imagenet100")[:10])
    assert C.class_list("imagenet100")[:10] == [
        "n02869837", "n01749939", "n02488291", "n02107142", "n13037406",
        "n02091831", "n04517823", "n04589890", "n03062245", "n01773797"]


def test_class_list_file_csv_and_errors(tmp_path):
    f = tmp_path / "cls.txt"
    f.write_text("# my classes\nzebra\n\n  cat  # trailing comment\ndog\n")
    assert C.class_list(str(f)) == ["zebra", "cat", "dog"]
    assert C.class_list(" cat, dog ,zebra,") == ["cat", "dog", "zebra"]
    assert C.class_list("n01440764") == ["n01440764"]
    assert C.class_list("apple") == ["apple"]          # one class (a typo fails at the scan, see below)
    with pytest.raises(ConfigError, match="listed twice"):
        C.class_list("cat,dog,cat")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="--classes"):
        C.class_list(str(empty))
    missing = str(tmp_path / "nette.txt")   # a class file that is not there was one class named by its path
    with pytest.raises(ConfigError, match=re.escape(f"--classes {missing}: no such file (a class file")):
        C.class_list(missing)


# --------------------------------------------------------------------------- scanning
def test_scan_files_sorted_filtered(wnid_root):
    entries = D.scan_image_folder(str(wnid_root))
    assert [e.name for e in entries] == ["n01440764", "n02102040"]
    a = entries[0]
    assert [os.path.basename(f) for f in a.files] == ["a.JPG", "b.PNG", "c.jpeg", "d_corrupt.jpg"]
    assert all(os.path.isabs(f) for f in a.files)
    assert a.folder == str(wnid_root / "n01440764")
    assert a.relative_files() == ["a.JPG", "b.PNG", "c.jpeg", "d_corrupt.jpg"]
    assert [os.path.basename(f) for f in entries[1].files] == ["x.WebP", "y.jpg"]
    # Every folder is a wnid, so auto = the DiT class ids.
    assert [e.label for e in entries] == [0, 217]


def test_scan_reads_imagefolder_formats_and_names_ignored_files(tmp_path, caplog):
    """The extensions torchvision's ImageFolder reads (the release loads through it) are images here too,
    loaded as the same pixels; any other file is named in one warning per class, never dropped unseen."""
    root = tmp_path / "imgs"
    (root / "cls").mkdir(parents=True)
    img = Image.new("RGB", (20, 12), (200, 100, 50))
    for name, fmt in {"a.bmp": "BMP", "b.ppm": "PPM", "c.tif": "TIFF", "d.TIFF": "TIFF"}.items():
        img.save(root / "cls" / name, format=fmt)
    img.convert("L").save(root / "cls" / "e.pgm", format="PPM")
    for name in ("f.gif", "g.heic", "h.txt", "i.svg"):
        (root / "cls" / name).write_bytes(b"x")
    with caplog.at_level("WARNING", logger="manifoldgd_fast.data"):
        (entry,) = D.scan_image_folder(str(root))
    assert entry.relative_files() == ["a.bmp", "b.ppm", "c.tif", "d.TIFF", "e.pgm"]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"{root}: ignoring 4 file(s) that are not .jpg/")
    assert msg.endswith(f"broken links): {os.path.join('cls', 'f.gif')}, {os.path.join('cls', 'g.heic')}, "
                        f"{os.path.join('cls', 'h.txt')} ...")
    x = torch.stack([D.load_image(f, 8) for f in entry.files])
    grey = x[4]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2]) and torch.equal(x[0], x[3])  # lossless formats
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])  # greyscale -> three equal channels


def test_sub_folders_broken_links_and_system_folders_are_named_not_dropped(tmp_path, caplog):
    """A class's sub-folders (not read) and dangling or looping links are named in the warning with the other
    ignored files; a __MACOSX folder (macOS zip archives) is no class: it does not shift the labels of
    ImageNet-id folders (auto still maps them to their ImageNet ids), and is named once."""
    root = tmp_path / "imgs"
    for c in ("n01440764", "n01443537"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (20, 12), (200, 100, 50)).save(root / c / "a.png")
    (root / "n01440764" / "extra").mkdir()
    Image.new("RGB", (20, 12)).save(root / "n01440764" / "extra" / "b.png")
    os.symlink(root / "nowhere.png", root / "n01440764" / "dangling.png")
    os.symlink(root / "n01440764" / "loop.png", root / "n01440764" / "loop.png")
    (root / "__MACOSX" / "n01440764").mkdir(parents=True)
    (root / "__MACOSX" / "n01440764" / "._a.png").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="manifoldgd_fast.data"):
        entries = D.scan_image_folder(str(root))
    assert [(e.name, e.label, e.relative_files()) for e in entries] == [("n01440764", 0, ["a.png"]),
                                                                         ("n01443537", 1, ["a.png"])]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2, msgs
    assert "ignoring 3 file(s)" in msgs[0] and all(os.path.join("n01440764", n) in msgs[0]
                                                   for n in ("dangling.png", "extra/", "loop.png")), msgs[0]
    assert msgs[1] == f"{root}: ignoring __MACOSX (a system or archive folder, not a class)"


@pytest.mark.parametrize("make, why", [
    (lambda p: Image.new("RGB", (1, 200)).save(p, format="PNG"), "1 x 200 px, an aspect ratio over 64:1"),
    (lambda p: Image.new("RGB", (8, 8)).save(p, format="EPS"), "cannot identify image file"),
    (lambda p: Image.new("RGB", (8, 8)).save(p, format="ICO"), "cannot identify image file"),
], ids=["thin-strip", "eps-named-jpg", "ico-named-jpg"])
def test_images_that_would_blow_up_or_run_other_programs_are_unreadable(tmp_path, make, why):
    """A 1 x N strip would be resized to size x N*size (1 x 2e7 px at 256: tens of GB); an EPS named .jpg
    would be handed to Ghostscript: both are unreadable files (skipped with a warning), not a crash."""
    path = str(tmp_path / "x.jpg")
    try:
        make(path)
    except (OSError, KeyError) as e:  # Pillow without that writer
        pytest.skip(f"Pillow cannot write this format here ({e})")
    with pytest.raises(DataError, match=why):
        D.read_image_uint8(path, 8)
    ok = str(tmp_path / "png_named.JPEG")   # a PNG named .JPEG, as ImageNet holds one, still reads
    Image.new("RGB", (9, 7), (1, 2, 3)).save(ok, format="PNG")
    assert D.read_image_uint8(ok, 4).shape == (3, 4, 4)


def test_a_class_list_given_as_a_list_is_checked_as_the_flag(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / c / "x.png")
    assert [e.name for e in D.scan_image_folder(str(root), classes=["b", "a"])] == ["b", "a"]
    with pytest.raises(ConfigError, match=r"^classes: empty"):
        D.scan_image_folder(str(root), classes=[])
    with pytest.raises(ConfigError, match=r"^classes: class 'a' is listed twice$"):
        D.scan_image_folder(str(root), classes=["a", "b", "a"])
    for bad in ([0, 1], 3):   # numbered class folders given as ints: a TypeError from os.path.join / list()
        with pytest.raises(ConfigError, match=re.escape(f"classes: {bad!r} is not a list of class folder names (str)")):
            D.scan_image_folder(str(root), classes=bad)


def test_a_class_asked_for_that_is_a_file_or_hidden_says_so(tmp_path):
    """--classes naming a file or a hidden folder (.ipynb_checkpoints) said the class folder "does not exist"."""
    root = tmp_path / "imgs"
    for c in ("a", ".ipynb_checkpoints"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / c / "x.png")
    (root / "notes").write_text("x")
    for name, why in [("notes", "is a file, not a folder"), (".ipynb_checkpoints", "is hidden or a system folder, "
                      "never a class"), ("b", "does not exist")]:
        with pytest.raises(DataError, match=re.escape(f"class folder {root / name} {why} (class {name!r} was asked")):
            D.scan_image_folder(str(root), classes=f"a,{name}")
    for name in (str(root / "a"), "..", "a/"):   # a path (e.g. a folder given as --classes) is not a class name
        with pytest.raises(DataError, match=re.escape(f"class {name!r} was asked for: a class is a folder name in "
                                                      f"{root}, not a path")):
            D.scan_image_folder(str(root), classes=[name])
    assert [e.name for e in D.scan_image_folder(str(root))] == ["a"]


def test_scan_errors(tmp_path, wnid_root):
    with pytest.raises(DataError, match="does not exist"):
        D.scan_image_folder(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        D.scan_image_folder(str(tmp_path / "file"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        D.scan_image_folder(str(tmp_path / "bare"))
    (wnid_root / "n01443537").mkdir()
    (wnid_root / "n01443537" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match=r"class n01443537 in .* has no images \(\.jpg"):
        D.scan_image_folder(str(wnid_root))
    # Restricting to classes with images avoids the empty one.
    assert len(D.scan_image_folder(str(wnid_root), classes=["n02102040"])) == 1
    with pytest.raises(DataError, match="n09999999"):
        D.scan_image_folder(str(wnid_root), classes=["n02102040", "n09999999"])
    with pytest.raises(ConfigError, match="label-map"):
        D.scan_image_folder(str(wnid_root), label_map="alphabetical")


def test_data_folder_one_level_off_says_so(tmp_path, wnid_root):
    """--data one level above the class folders (ImageNet's root holding train/ and val/), or one class
    folder itself: the error says which way to go; an empty folder gets no hint."""
    imagenet = tmp_path / "imagenet"
    shutil.copytree(wnid_root, imagenet / "train")
    (imagenet / "val").mkdir()
    exts = "/".join(D.IMAGE_EXTS)
    with pytest.raises(DataError, match=re.escape(f"class train in {imagenet} has no images ({exts}); "
                                                  f"it holds folders (n01440764, n02102040): is {imagenet} one level "
                                                  f"above the class folders, e.g. {imagenet / 'train'}?")):
        D.scan_image_folder(str(imagenet))
    with pytest.raises(DataError, match="it holds images itself; give the folder whose sub-folders are the classes"):
        D.scan_image_folder(str(wnid_root / "n01440764"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=r"has no class folders \(expected ROOT/<class>/<image>\)$"):
        D.scan_image_folder(str(tmp_path / "bare"))


def test_label_maps_and_class_restriction(tmp_path):
    root = tmp_path / "named"
    for name in ["zebra", "cat", "dog"]:
        _save(str(root / name / "0.png"))
    entries = D.scan_image_folder(str(root))  # auto -> sorted (not wnids)
    assert [(e.name, e.label) for e in entries] == [("cat", 0), ("dog", 1), ("zebra", 2)]
    # The given order is kept, and the labels stay those of the full folder.
    sub = D.scan_image_folder(str(root), classes=["zebra", "cat"], label_map="sorted")
    assert [(e.name, e.label) for e in sub] == [("zebra", 2), ("cat", 0)]
    sub = D.scan_image_folder(str(root), classes="zebra,dog")
    assert [(e.name, e.label) for e in sub] == [("zebra", 2), ("dog", 1)]
    with pytest.raises(DataError, match="'cat' is not an ImageNet-1k WordNet id"):
        D.scan_image_folder(str(root), label_map="imagenet1k")


def test_label_maps_on_wnids(wnid_root):
    sub = D.scan_image_folder(str(wnid_root), classes=["n02102040"], label_map="imagenet1k")
    assert [e.label for e in sub] == [217]
    sub = D.scan_image_folder(str(wnid_root), classes=["n02102040"], label_map="sorted")
    assert [e.label for e in sub] == [1]  # second of the two folders, even when run alone
    # One non-wnid folder makes auto fall back to sorted for every class.
    _save(str(wnid_root / "extra" / "0.png"))
    entries = D.scan_image_folder(str(wnid_root))
    assert [(e.name, e.label) for e in entries] == [("extra", 0), ("n01440764", 1), ("n02102040", 2)]


def test_auto_fallback_warns_naming_the_stray_folders(wnid_root, tmp_path, caplog):
    (wnid_root / "n01440764" / "notes.txt").unlink()   # its warning is another test's
    with caplog.at_level("WARNING", logger="manifoldgd_fast"):
        D.scan_image_folder(str(wnid_root))
    assert not caplog.records                          # all wnids: no fallback, no warning
    for name in ["zz_extra", "aa_extra", "mm_extra", "n09999999"]:   # n09999999: wnid-shaped, not in 1k
        _save(str(wnid_root / name / "0.png"))
    with caplog.at_level("WARNING", logger="manifoldgd_fast"):
        entries = D.scan_image_folder(str(wnid_root), classes=["n02102040"])
    assert [e.label for e in entries] == [3]           # sorted index among the 6 folders: behaviour unchanged
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert rec.levelname == "WARNING" and "\n" not in msg
    assert "4 of the 6 class folders" in msg and "(aa_extra, mm_extra, n09999999 and 1 more)" in msg
    # No warning when no folder is a wnid (plain names are a normal sorted run) or the map is explicit.
    caplog.clear()
    named = tmp_path / "named"
    for name in ["cat", "dog"]:
        _save(str(named / name / "0.png"))
    with caplog.at_level("WARNING", logger="manifoldgd_fast"):
        D.scan_image_folder(str(named))
        D.scan_image_folder(str(wnid_root), label_map="sorted")
    assert not caplog.records


@pytest.fixture
def named_root(tmp_path):
    root = tmp_path / "named"
    for name in ["tench", "goldfish", "shark", "corgi"]:
        _save(str(root / name / "0.png"))
    return root


def test_label_map_json_file(named_root, tmp_path):
    m = tmp_path / "map.json"
    m.write_text('{"tench": 0, "goldfish": "n01443537", "shark": "Great_White shark", '
                 '"corgi": "Cardigan", "not_here": 999}')   # extra keys are fine
    entries = D.scan_image_folder(str(named_root), label_map=str(m))
    assert [(e.name, e.label) for e in entries] == [("corgi", 264), ("goldfish", 1), ("shark", 2), ("tench", 0)]
    sub = D.scan_image_folder(str(named_root), classes="shark,tench", label_map=str(m))
    assert [(e.name, e.label) for e in sub] == [("shark", 2), ("tench", 0)]
    assert C.read_label_map(str(m)) == {"tench": 0, "goldfish": 1, "shark": 2, "corgi": 264, "not_here": 999}
    # Exact names win over case-folding: "cardigan" the sweater, "Cardigan" (the old name) the corgi.
    names = C.imagenet_class_names()
    assert names[264] == "Cardigan Welsh Corgi" and names[474] == "cardigan"
    m.write_text('{"tench": "cardigan", "goldfish": 1, "shark": 2, "corgi": 3}')
    assert C.read_label_map(str(m))["tench"] == 474


def test_imagenet_names_are_distinct_once_lowercased():
    """CLIP's tokenizer lowercases: no two ImageNet-1k names may give one prompt. The three pairs that
    differed only in case carry OpenAI CLIP's curated names, checked against their WordNet ids."""
    names, wnids = C.imagenet_class_names(), C.imagenet_wnids()
    low = [" ".join(n.lower().split()) for n in names]
    assert len(names) == 1000 and len(set(low)) == 1000
    want = {"n02012849": "crane bird", "n03126707": "construction crane", "n02113186": "Cardigan Welsh Corgi",
            "n02963159": "cardigan", "n03710637": "maillot", "n03710721": "one-piece bathing suit"}
    assert {w: names[wnids.index(w)] for w in want} == want
    assert [wnids.index(w) for w in want] == [134, 517, 264, 474, 638, 639]


@pytest.mark.parametrize("value, label", [
    ("crane bird", 134), ("Construction_Crane", 517), ("Cardigan Welsh Corgi", 264), ("Cardigan", 264),
    ("cardigan", 474), ("maillot", 638), ("one-piece bathing suit", 639)])
def test_label_map_resolves_new_and_unique_old_imagenet_names(tmp_path, value, label):
    m = tmp_path / "map.txt"
    m.write_text(f"a\t{value}\n")
    assert C.read_label_map(str(m)) == {"a": label}


@pytest.mark.parametrize("value, candidates", [
    ("crane", "'crane bird' (134) or 'construction crane' (517)"),
    ("CARDIGAN", "'Cardigan Welsh Corgi' (264) or 'cardigan' (474)"),
    ("Maillot", "'maillot' (638) or 'one-piece bathing suit' (639)")])
def test_label_map_ambiguous_old_name_lists_candidates(tmp_path, value, candidates):
    m = tmp_path / "map.txt"
    m.write_text(f"a\t{value}\n")
    with pytest.raises(ConfigError) as ei:
        C.read_label_map(str(m))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"--label-map {m}: line 1: ") and candidates in msg


def test_label_map_text_file(named_root, tmp_path):
    m = tmp_path / "classes.txt"        # not .json: tab, comma and spaces, comments, names with spaces
    m.write_text("# folder -> ImageNet class\n"
                 "tench\t0\n"
                 "goldfish , n01443537   # a WordNet id\n"
                 "\n"
                 "shark   great white shark\n"
                 "corgi\t207\n")
    entries = D.scan_image_folder(str(named_root), label_map=str(m))
    assert [(e.name, e.label) for e in entries] == [("corgi", 207), ("goldfish", 1), ("shark", 2), ("tench", 0)]
    # A text file whose content is a JSON object reads as JSON.
    j = tmp_path / "map.cfg"
    j.write_text('{"tench": 3, "goldfish": 4, "shark": 5, "corgi": 6}')
    assert [e.label for e in D.scan_image_folder(str(named_root), label_map=str(j))] == [6, 4, 5, 3]


def test_label_map_missing_folder(named_root, tmp_path):
    m = tmp_path / "map.txt"
    m.write_text("tench 0\ngoldfish 1\nshark 2\n")
    with pytest.raises(DataError) as ei:
        D.scan_image_folder(str(named_root), label_map=str(m))
    assert str(ei.value) == f"--label-map {m}: class folder 'corgi' is not in the class map"
    # Only the folders of the run must be mapped.
    assert [e.label for e in D.scan_image_folder(str(named_root), classes="shark", label_map=str(m))] == [2]


@pytest.mark.parametrize("text,where,why", [
    ("a 0\nb n09999999\n", "line 2", "'n09999999' is not an ImageNet-1k WordNet id"),
    ("a 0\n# c\nb flying carpet\n", "line 3", "'flying carpet' is not a class id, an ImageNet-1k WordNet id"),
    ("a -3\n", "line 1", "class id -3 is negative"),
    ("a crane\n", "line 1", "'crane' is ambiguous (ids 134, 517)"),
    ("a 0\nb 1\na 2\n", "line 3", "folder 'a' is mapped twice (first at line 1)"),
    ("a 7\nb n01440764\nc 7\n", "line 3", "folders 'a' and 'c' both map to class 7"),
    ("a 0\nb goldfish\nc 1\n", "line 3", "folders 'b' and 'c' both map to class 1"),
    ("a 0\njust_a_folder\n", "line 2", "is not '<folder> <class id, WordNet id or name>'"),
    ("a 0\nb,\n", "line 2", "'b,' is not '<folder> <class id"),      # a comma with nothing after it
    ("a 0\n\t5\n", "line 2", "'5' is not '<folder> <class id"),      # a value with no folder
    ('{"a": 0, "b": 1, "a": 2}', "key 'a'", "folder 'a' is mapped twice"),
    ('{"a": 0, "b": true}', "key 'b'", "True is not a class id"),
    ('{"a": 0, "b": -1}', "key 'b'", "class id -1 is negative"),
    ('{"a": 0, "b": "n00000001"}', "key 'b'", "'n00000001' is not an ImageNet-1k WordNet id"),
])
def test_label_map_bad_entries_name_file_and_line(tmp_path, text, where, why):
    m = tmp_path / "map.txt"
    m.write_text(text)
    with pytest.raises(ConfigError) as ei:
        C.read_label_map(str(m))
    msg = str(ei.value)
    assert msg.startswith(f"--label-map {m}: {where}: ") and why in msg and "\n" not in msg


def test_label_map_bad_files(tmp_path, named_root):
    for name, text, why in [("m.txt", "# nothing\n\n", "the class map is empty"),
                            ("m.json", "# nothing\n", "not valid JSON"),
                            ("m.json", "[1, 2]", "expected a JSON object"),
                            ("m.txt", '{"a": 0,', "not valid JSON")]:
        m = tmp_path / name
        m.write_text(text)
        with pytest.raises(ConfigError, match=why):
            C.read_label_map(str(m))
    with pytest.raises(ConfigError, match="no such file"):
        D.scan_image_folder(str(named_root), label_map=str(tmp_path / "nope.json"))


# --------------------------------------------------------------------------- loading
def test_load_image_value_and_range(tmp_path):
    p = str(tmp_path / "c.png")
    _save(p, (255, 0, 128), size=(37, 23))
    x = D.load_image(p, 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    expected = torch.tensor([1.0, -1.0, (128 / 255 - 0.5) / 0.5]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    # Greyscale and palette images become 3 equal channels.
    g = str(tmp_path / "g.png")
    Image.new("L", (16, 16), 51).save(g)
    xg = D.load_image(g, 8)
    torch.testing.assert_close(xg, torch.full((3, 8, 8), (51 / 255 - 0.5) / 0.5), atol=1e-6, rtol=0)


def test_load_image_centre_crops_wide_image(tmp_path):
    # 120x40: red | green | blue thirds; the centre square is the green third.
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, :40, 0] = 255
    arr[:, 40:80, 1] = 255
    arr[:, 80:, 2] = 255
    p = str(tmp_path / "wide.png")
    Image.fromarray(arr).save(p)
    x = (D.load_image(p, 8) + 1) / 2  # (3, 8, 8) in [0, 1]
    # BOX-halving to 30x10, bicubic to 24x8, crop columns 8..16: only the border
    # columns may carry a little bicubic bleed from the neighbours.
    inner = x[:, :, 1:7]
    assert inner[1].min() > 0.97 and inner[0].max() < 0.03 and inner[2].max() < 0.03
    assert x[0].mean() < 0.1 and x[2].mean() < 0.1  # a squashed image would be 1/3 red, 1/3 blue
    # And it equals the ADM reference arithmetic on the same file.
    ref = D.center_crop_arr(Image.open(p).convert("RGB"), 8)
    torch.testing.assert_close(D.load_image(p, 8),
                               torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("w,h,short,size", [(25, 15, 9, 8), (15, 31, 9, 8), (20, 20, 8, 8), (8, 11, 8, 8)])
def test_resize_crop_torchvision_shapes_and_offsets(w, h, short, size):
    """The release's Resize(short) + CenterCrop(size): long side int(short * long / short), offsets
    round-half-even; an image already at its size is only cropped."""
    from PIL import Image

    rng = np.random.default_rng(w * h)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = D.resize_crop_torchvision(im, size, short)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    long = int(short * max(w, h) / min(w, h))
    new = (short, long) if w <= h else (long, short)
    big = np.array(im if new == (w, h) else im.resize(new, resample=Image.BILINEAR))
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    assert np.array_equal(out, big[top:top + size, left:left + size])
    if (w, h) == (8, 11):  # no resize: the crop of the original, rows round(1.5) = 2 on
        assert np.array_equal(out, np.array(im)[2:10])


def test_resize_crop_torchvision_against_torchvision():
    from PIL import Image

    try:
        from torchvision import transforms as T
    except Exception as e:  # noqa: BLE001 (a torchvision built for another torch fails in several ways)
        pytest.skip(f"torchvision cannot be imported here ({type(e).__name__}); "
                    "test_resize_crop_torchvision_shapes_and_offsets checks its rules by hand")
    rng = np.random.default_rng(0)
    for w, h, short, size in [(25, 15, 9, 8), (15, 31, 9, 8), (300, 257, 256, 224), (8, 11, 8, 8)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = np.array(T.CenterCrop(size)(T.Resize(short)(im)))
        assert np.array_equal(D.resize_crop_torchvision(im, size, short), ref), (w, h, short, size)


def test_load_image_corrupt_names_path(wnid_root):
    p = str(wnid_root / "n01440764" / "d_corrupt.jpg")
    with pytest.raises(DataError, match="d_corrupt.jpg"):
        D.load_image(p, 8)


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_class_images_skips_and_reports(wnid_root, workers):
    entry = D.scan_image_folder(str(wnid_root))[0]  # a, b, c good; d corrupt
    it = D.iter_class_images(entry, 8, batch_size=2, num_workers=workers)
    with pytest.warns(UserWarning, match="d_corrupt.jpg"):
        got = list(it)
    assert [len(p) for _, p in got] == [2, 1]
    assert [b.shape for b, _ in got] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert [os.path.basename(p) for _, ps in got for p in ps] == ["a.JPG", "b.PNG", "c.jpeg"]
    assert [os.path.basename(p) for p in it.skipped] == ["d_corrupt.jpg"]
    assert "d_corrupt.jpg" in it.reasons[it.skipped[0]]
    # Batches hold exactly what load_image gives for each path, in order.
    flat = torch.cat([b for b, _ in got])
    for row, p in zip(flat, [p for _, ps in got for p in ps]):
        torch.testing.assert_close(row, D.load_image(p, 8), atol=0, rtol=0)
    # a.JPG is red: R channel near +1, G near -1 (JPEG is lossy).
    assert flat[0, 0].mean() > 0.9 and flat[0, 1].mean() < -0.9


def _png_with_a_broken_second_idat(path):
    """A PNG whose pixel data is split over two IDAT chunks, the second chunk's type bytes damaged: the header
    opens, and decoding meets the damage (Pillow raises SyntaxError, not OSError, there)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    i = png.index(b"IDAT")
    n = struct.unpack(">I", png[i - 4:i])[0]
    data, half = png[i + 4:i + 4 + n], n // 2
    first = struct.pack(">I", half) + b"IDAT" + data[:half] + struct.pack(">I", zlib.crc32(b"IDAT" + data[:half]))
    path.write_bytes(png[:i - 4] + first + struct.pack(">I", n - half) + b"\x00\x01\x02\x03" + data[half:] +
                     b"\x00" * 4 + png[i + 8 + n:])


def test_an_image_damaged_past_its_header_is_skipped_not_a_crash(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "a.png")
    _png_with_a_broken_second_idat(tmp_path / "c" / "b.png")
    with pytest.raises(DataError, match=re.escape(f"cannot read image {tmp_path / 'c' / 'b.png'}: broken PNG file")):
        D.read_image_uint8(str(tmp_path / "c" / "b.png"), 8)
    it = D.iter_class_images(D.scan_image_folder(str(tmp_path))[0], 8, batch_size=4, num_workers=0)
    with pytest.warns(UserWarning, match="b.png"):
        assert [[os.path.basename(p) for p in ps] for _, ps in it] == [["a.png"]]
    assert [os.path.basename(p) for p in it.skipped] == ["b.png"]
    with pytest.raises(ConfigError, match=r"--encode-batch-size 0: must be >= 1"):
        D.iter_class_images(D.scan_image_folder(str(tmp_path))[0], 8, batch_size=0)


def test_an_unreadable_image_is_logged_once_per_process(wnid_root, caplog):
    """metrics reads the real images twice (the encoder's training set, then the features): the log names a
    bad file once; each pass still skips it and says so to Python's warnings."""
    entry = D.scan_image_folder(str(wnid_root))[0]
    with caplog.at_level("WARNING", logger="manifoldgd_fast.data"), pytest.warns(UserWarning, match="d_corrupt"):
        for _ in range(2):
            it = D.iter_class_images(entry, 8, batch_size=2, num_workers=0)
            list(it)
            assert [os.path.basename(p) for p in it.skipped] == ["d_corrupt.jpg"]
    assert sum("d_corrupt.jpg" in r.getMessage() for r in caplog.records) == 1


def test_iter_class_images_all_good_no_warning(wnid_root):
    entry = D.scan_image_folder(str(wnid_root))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = list(D.iter_class_images(entry, 8, batch_size=8, num_workers=2))
    assert len(got) == 1 and got[0][0].shape == (2, 3, 8, 8)


def test_16_bit_greyscale_keeps_its_top_8_bits(tmp_path):
    """A 16-bit PNG reads as the 8-bit image of its top byte; convert("RGB") alone would clip it white."""
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    p16, p8 = str(tmp_path / "g16.png"), str(tmp_path / "g8.png")
    Image.fromarray(ramp).save(p16)
    with Image.open(p16) as im:
        assert im.mode.startswith("I")  # PIL's 16-bit greyscale modes
    Image.fromarray((ramp >> 8).astype(np.uint8), mode="L").save(p8)
    x16, x8 = D.read_image_uint8(p16, 32), D.read_image_uint8(p8, 32)
    assert x16.float().mean() < 200  # not saturated
    assert torch.equal(x16, x8)
    assert torch.equal(D.load_image(p16, 32), D.load_image(p8, 32))
    f = Image.fromarray(ramp.astype(np.float32) / 65535.0, mode="F")
    rgb = np.asarray(D.to_rgb(f))  # float greyscale, taken as 0..1
    assert rgb.shape == (32, 32, 3)
    assert np.array_equal(rgb[..., 0], np.rint(ramp / 65535.0 * 255).astype(np.uint8))


def test_scan_refuses_a_class_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "data"
    (root / "ok").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(str(root / "ok" / "0.png"))
    bad = os.path.join(os.fsencode(str(root)), b"bad\xff")
    try:
        os.mkdir(bad)
    except OSError as e:  # a file system that only takes UTF-8 names cannot hold such a folder
        pytest.skip(f"this file system refuses non-UTF-8 names ({e})")
    Image.new("RGB", (8, 8)).save(os.path.join(bad, b"0.png").decode("utf-8", "surrogateescape"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        D.scan_image_folder(str(root))
    assert [e.name for e in D.scan_image_folder(str(root), classes=["ok"])] == ["ok"]


def _adm_center_crop_arr(pil_image, image_size):
    """ADM's / DiT's center_crop_arr, transcribed from guided_diffusion/image_datasets.py."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@pytest.mark.parametrize("w,h", [(347, 500), (640, 427), (256, 301), (512, 768), (1024, 513), (300, 300)])
def test_center_crop_arr_is_adms_pixel_for_pixel(w, h):
    """Rounding of the resized sides, the BOX-halving threshold (short side == 2x target halves) and the
    crop offset on an odd excess (floor) are ADM's."""
    rng = np.random.default_rng(w * 10007 + h)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = D.center_crop_arr(im, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(out, _adm_center_crop_arr(im, 256)), (w, h)


def test_32_bit_greyscale_keeps_its_top_8_bits(tmp_path):
    """A 32-bit greyscale image (mode I, signed: values up to 2**31 - 1) reads as the 8-bit image of its top 8
    value bits (23..30: the ramp 0 .. 2**31 - 1 reads 0 .. 255; the top byte of the word gave 0 .. 127);
    convert("RGB") would clip it white."""
    ramp = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * ((2**31 - 1) // (32 * 32 - 1))).astype(np.int32)
    ramp[-1, -1] = 2**31 - 1
    p32, p8 = str(tmp_path / "g32.tif"), str(tmp_path / "g8.png")
    Image.fromarray(ramp, mode="I").save(p32)
    with Image.open(p32) as im:
        assert im.mode == "I"
        assert int(np.asarray(im).max()) == 2**31 - 1
    Image.fromarray((ramp >> 23).astype(np.uint8), mode="L").save(p8)
    x32, x8 = D.read_image_uint8(p32, 32), D.read_image_uint8(p8, 32)
    assert 110 < x32.float().mean() < 145 and int(x32.max()) == 255  # the ramp 0 .. 2**31 - 1: 0 .. 255
    assert torch.equal(x32, x8)
    rgb = np.asarray(D.to_rgb(Image.fromarray(ramp, mode="I")))
    assert np.array_equal(rgb[..., 1], (ramp >> 23).astype(np.uint8))


# ---------------------------------------------------------------------------- found by a mutation audit (2026-12-06)
def test_a_utf8_bom_is_not_part_of_the_first_name(tmp_path):
    """Files saved by Excel or Notepad start with a byte-order mark: class lists, label maps (text and JSON
    by any name) and ImageNet's Kaggle label CSV read as without it (the Kaggle file, with its header
    unrecognised, gave one class per image)."""
    from manifoldgd_fast.image_labels import read_image_labels

    bom = "\ufeff"
    (tmp_path / "list.txt").write_text(bom + "n01440764\nn01443537\n", encoding="utf-8")
    assert C.class_list(str(tmp_path / "list.txt")) == ["n01440764", "n01443537"]
    (tmp_path / "map.txt").write_text(bom + "apple 0\nbanana 1\n", encoding="utf-8")
    assert C.read_label_map(str(tmp_path / "map.txt")) == {"apple": 0, "banana": 1}
    (tmp_path / "map.cfg").write_text(bom + '{"apple": 0}', encoding="utf-8")
    assert C.read_label_map(str(tmp_path / "map.cfg")) == {"apple": 0}
    csv = "ImageId,PredictionString\nv1,n01751748 1 2 3 4\nv2,n09193705 5 6 7 8\n"
    (tmp_path / "LOC_val_solution.csv").write_text(bom + csv, encoding="utf-8")
    (tmp_path / "plain.csv").write_text(csv, encoding="utf-8")
    assert read_image_labels(str(tmp_path / "LOC_val_solution.csv")) == read_image_labels(str(tmp_path / "plain.csv"))
    assert read_image_labels(str(tmp_path / "plain.csv")) == {"v1": "n01751748", "v2": "n09193705"}


def test_a_config_file_with_a_bom_reads(tmp_path):
    from manifoldgd_fast.config import DistillConfig

    (tmp_path / "run.json").write_text('\ufeff{"ipc": 3}', encoding="utf-8")
    (tmp_path / "run.yaml").write_text("\ufeffipc: 4\n", encoding="utf-8")
    assert DistillConfig.load(str(tmp_path / "run.json")).ipc == 3
    assert DistillConfig.load(str(tmp_path / "run.yaml")).ipc == 4


def test_class_names_past_200_bytes_are_refused_in_one_line(tmp_path):
    """The outputs add up to 26 bytes to a class's name (".<class>.tmp-<pid>", "<class>.safetensors" and its
    temp's suffixes); a 250-byte name failed mid-run with the file system's "File name too long"."""
    root = tmp_path / "data"
    for name in ("a" * 200, "b" * 201):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "0.png")
    with pytest.raises(DataError, match=r"its name is 201 bytes, more than the 200 the outputs' file names leave"):
        D.scan_image_folder(str(root))
    assert [e.name for e in D.scan_image_folder(str(root), classes=["a" * 200])] == ["a" * 200]


def test_a_cache_dir_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    """safetensors opens UTF-8 paths only: a --cache-dir of other bytes (latin-1's c\xff) failed for every class,
    after encoding it, as "latent cache file ... is damaged; delete it to recompute" (deleting did not help).
    It is refused up front, naming the path (class folders of such names are refused by the scan)."""
    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.latents import latent_cache_dir

    bad = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"c\xff"))
    with pytest.raises(ConfigError, match=r"--cache-dir '.*c\\udcff': not UTF-8 text"):
        latent_cache_dir(bad, str(tmp_path), "vae", 8)
    assert latent_cache_dir(str(tmp_path / "c"), str(tmp_path), "vae", 8).startswith(str(tmp_path / "c"))


def test_numbered_class_folders_whose_labels_are_not_their_numbers_are_named(tmp_path, caplog):
    """Folders named by class number (0 .. 999, unpadded) sort as text: folder 10 gets label 2. The labels stay
    ImageFolder's; a warning names the first folder whose label is not its number (none for 0 .. 9)."""
    for names, moved in [(["0", "1", "2", "3"], None), (["0", "1", "2", "10"], ("10", 2)), (["1", "2"], ("1", 0))]:
        root = tmp_path / "-".join(names)
        for n in names:
            _save(str(root / n / "0.png"))
        caplog.clear()
        with caplog.at_level("WARNING", logger="manifoldgd_fast.data"):
            entries = D.scan_image_folder(str(root))
        assert [(e.name, e.label) for e in entries] == [(n, i) for i, n in enumerate(sorted(names))]
        msgs = [r.getMessage() for r in caplog.records]
        if moved is None:
            assert not msgs, msgs
        else:
            (msg,) = msgs
            assert f"(folder {moved[0]} is class {moved[1]})" in msg and "class-map file" in msg, msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="manifoldgd_fast.data"):   # not for SD (labels select no class)
        D.scan_image_folder(str(tmp_path / "0-1-2-10"), warn_stray=False)
    assert not caplog.records


def test_a_symlinked_class_folder_is_a_class(tmp_path):
    (tmp_path / "real").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "real" / "a.png")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "root" / "apple")
    assert [e.name for e in D.scan_image_folder(str(tmp_path / "root"))] == ["apple"]


def test_symlinked_images_are_images(tmp_path, caplog):
    """A subset made of links to the full set's files (a common way to build ImageNet-100 or a class subset):
    each link is its class's image, in name order, not an ignored file."""
    (tmp_path / "full").mkdir()
    for n in ("x.png", "y.JPEG"):
        Image.new("RGB", (8, 8)).save(tmp_path / "full" / n, format="PNG")
    (tmp_path / "root" / "apple").mkdir(parents=True)
    os.symlink(tmp_path / "full" / "y.JPEG", tmp_path / "root" / "apple" / "a.JPEG")
    os.symlink(os.path.join("..", "..", "full", "x.png"), tmp_path / "root" / "apple" / "b.png")  # relative
    with caplog.at_level("WARNING", logger="manifoldgd_fast.data"):
        (entry,) = D.scan_image_folder(str(tmp_path / "root"))
    assert entry.relative_files() == ["a.JPEG", "b.png"] and not caplog.records
    assert D.read_image_uint8(entry.files[1], 8).shape == (3, 8, 8)


def test_an_aspect_of_exactly_64_to_1_is_read(tmp_path):
    Image.new("RGB", (256, 4)).save(tmp_path / "s.png")
    assert D.read_image_uint8(str(tmp_path / "s.png"), 8).shape == (3, 8, 8)


def test_mode_i_at_2_16_is_scaled_by_31_bits():
    img = Image.fromarray(np.array([[0, 65536]], np.int32), mode="I")
    assert np.asarray(D.to_rgb(img))[0, 1, 0] == 0          # 65536 / 2^31 of white, not 16-bit white


def test_a_class_names_json_file_in_capitals_or_without_its_extension_is_json(tmp_path):
    """--class-names names.JSON (or a JSON object in a .txt) was read as '<folder> <name>' lines: a folder
    '{"apple":' named '"red apple",'; read_label_map already took any file starting with '{' as JSON."""
    for name in ("names.JSON", "names.txt"):
        f = tmp_path / name
        f.write_text('\n{"apple": "red apple",\n "n01440764": "tench, Tinca tinca"}\n')
        assert C.class_names_map(str(f)) == {"apple": "red apple", "n01440764": "tench, Tinca tinca"}
    f.write_text("apple red apple\nn01440764 tench, Tinca tinca\n")          # lines still read as lines
    assert C.class_names_map(str(f)) == {"apple": "red apple", "n01440764": "tench"}
    f.write_text("apple\tred apple\ngolden_retriever \t golden retriever\n")  # split at tabs as at spaces
    assert C.class_names_map(str(f)) == {"apple": "red apple", "golden_retriever": "golden retriever"}
    for bad, item in [("a=x,=y", "=y"), ("a=x, b = ", "b ="), ("a=x,b", "b")]:   # inline: each item folder=name
        with pytest.raises(ConfigError, match=re.escape(f"--class-names {bad!r}: {item!r} is not folder=name")):
            C.class_names_map(bad)


def test_user_class_names_are_not_cut_short(tmp_path):
    """A JSON file's or a mapping's names are taken as they are: "sweet, red cherry" was cut to "sweet" (the
    LOC_synset_mapping synonym rule, which only its '<folder> <name>' lines need). A "#" inside a word is no
    comment: "C# cherry" was "C" (found by an SD-backbone audit)."""
    f = tmp_path / "names.json"
    f.write_text('{"cherry": "sweet, red cherry"}')
    assert C.class_names_map(str(f)) == {"cherry": "sweet, red cherry"}
    assert C.class_names_map({"cherry": " sweet, red cherry "}) == {"cherry": "sweet, red cherry"}
    f = tmp_path / "names.txt"
    f.write_text("# folder name\ncherry C# cherry  # a trailing comment\nplum no#2 plum\n#apple x\n")
    assert C.class_names_map(str(f)) == {"cherry": "C# cherry", "plum": "no#2 plum"}
    assert C.class_list("a#1,b") == ["a#1", "b"]
    (tmp_path / "list.txt").write_text("a#1\nb # two\n# c\n")
    assert C.class_list(str(tmp_path / "list.txt")) == ["a#1", "b"]


def test_label_map_lines_tab_before_comma_and_json_after_blank_lines(tmp_path):
    (tmp_path / "m.txt").write_text("a,b\t3\n")
    assert C.read_label_map(str(tmp_path / "m.txt")) == {"a,b": 3}
    (tmp_path / "j.txt").write_text('\n  {"apple": 3}')
    assert C.read_label_map(str(tmp_path / "j.txt")) == {"apple": 3}
    assert C.class_list(" nette ") == C.class_list("nette")


def test_flat_folder_labels_take_sorted_class_names_and_errors_name_the_line(tmp_path):
    from manifoldgd_fast.image_labels import read_image_labels, scan_labelled_folder

    (tmp_path / "v").mkdir()
    for s in ("v1", "v2"):
        Image.new("RGB", (8, 8)).save(tmp_path / "v" / f"{s}.png")
    (tmp_path / "l.txt").write_text("v1 zebra\nv2 ant\n")
    assert [(e.name, e.label) for e in scan_labelled_folder(str(tmp_path / "v"), str(tmp_path / "l.txt"))] == \
        [("ant", 0), ("zebra", 1)]
    (tmp_path / "s.csv").write_text("ImageId,PredictionString\na,n01440764 1 2 3 4\nb,\n")
    with pytest.raises(ConfigError, match=r": line 3: "):
        read_image_labels(str(tmp_path / "s.csv"))
    # Kaggle's header however it was re-saved (case, spaces): the class is PredictionString's first word
    (tmp_path / "k.csv").write_text("imageid, predictionString\nv1.JPEG,n01440764 1 2 3 4 n01440764 5 6 7 8\n")
    assert read_image_labels(str(tmp_path / "k.csv")) == {"v1": "n01440764"}
    (tmp_path / "k.csv").write_text("ImageId,PredictionString\nv1.JPEG ,n01440764 1 2 3 4\n")  # a space before ','
    assert read_image_labels(str(tmp_path / "k.csv")) == {"v1": "n01440764"}
    # only an image extension is dropped from a name: 'v.1' (no extension) is not 'v'
    (tmp_path / "d.txt").write_text("v.1 ant\nv.2.png zebra\nv.3.gif bee\n")
    assert read_image_labels(str(tmp_path / "d.txt")) == {"v.1": "ant", "v.2": "zebra", "v.3.gif": "bee"}


# ---------------------------------------------------------------------------- found by an input-image audit (2026-12-07)
def test_a_broken_link_among_the_class_folders_is_refused_not_a_label_shift(tmp_path):
    """A class folder that is a link to a missing target (an unmounted disk) was left out silently, and under
    the sorted label map every class after it took the label of the one before: c was sampled as b."""
    root = tmp_path / "imgs"
    for c in ("a", "c"):
        (root / c).mkdir(parents=True)
        _save(root / c / "0.png")
    (tmp_path / "store_b").mkdir()
    _save(tmp_path / "store_b" / "0.png")
    os.symlink(tmp_path / "store_b", root / "b")
    assert [(e.name, e.label) for e in D.scan_image_folder(str(root))] == [("a", 0), ("b", 1), ("c", 2)]
    shutil.move(str(tmp_path / "store_b"), str(tmp_path / "gone"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(root / 'b'))}: a broken link \(its target is missing, "
                                        r"or a loop\) among the class folders; .* restore its target or remove"):
        D.scan_image_folder(str(root))
    with pytest.raises(DataError, match="a broken link"):
        D.scan_image_folder(str(root), classes=["a"])     # (a's label is its place among all the folders)
    from manifoldgd_fast.eval.protocol import distilled_class_names
    with pytest.raises(DataError, match="a broken link"):
        distilled_class_names(str(root))
    os.remove(root / "b")
    os.symlink(root / "b", root / "b")                    # a loop
    with pytest.raises(DataError, match="a broken link"):
        D.scan_image_folder(str(root))


@pytest.mark.parametrize("mode, values, expect", [
    ("I", np.arange(256), np.arange(256)),                                    # 8-bit values in an int32 image
    ("I", np.arange(256) * 257, np.arange(256)),                              # 16-bit values
    ("F", np.arange(256) / 255.0, np.arange(256)),                            # 0..1
    ("F", np.arange(256, dtype=np.float64), np.arange(256)),                  # 0..255
    ("F", np.arange(256) * 257.0, np.arange(256)),                            # 0..65535
], ids=["I-8bit", "I-16bit", "F-unit", "F-255", "F-65535"])
def test_32_bit_integer_and_float_greyscale_are_read_by_their_range(tmp_path, mode, values, expect):
    """An int32 TIFF of 0..255 values read all black (taken as 16-bit: >> 8), a float one of 0..255 all white
    (taken as 0..1: x 255). Each now reads as the 8-bit ramp it holds."""
    ramp = np.tile(values, (4, 1)).astype(np.int32 if mode == "I" else np.float32)
    path = str(tmp_path / "g.tif")
    Image.fromarray(ramp, mode=mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
        got = np.asarray(D.to_rgb(im))
    assert np.array_equal(got[..., 0], np.tile(expect, (4, 1)).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2])


def test_a_float_image_past_65535_is_unreadable_not_white(tmp_path):
    path = str(tmp_path / "f.tif")
    Image.fromarray(np.full((8, 8), 1e6, np.float32), mode="F").save(path)
    with pytest.raises(DataError, match=r"cannot read image .*f\.tif: float image with values up to 1e\+06, past "):
        D.read_image_uint8(path, 8)


def test_every_reader_reads_and_skips_the_same_files(tmp_path):
    """metrics --fid-resize squash (load_squashed) opened any format Pillow knows and took 64:1 strips: an ICO
    named .png was read there and skipped by cache / distill / eval, so the FID's real set held other images
    than the count it reported."""
    from manifoldgd_fast.eval.metrics import load_squashed

    strip, ico, ok = (str(tmp_path / n) for n in ("strip.png", "ico.png", "ok.png"))
    Image.new("RGB", (1000, 2)).save(strip)
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    Image.new("RGB", (9, 7), (1, 2, 3)).save(ok)
    for path, why in ((strip, "an aspect ratio over 64:1"), (ico, "cannot identify image file")):
        for read in (D.read_image_uint8, load_squashed):
            with pytest.raises(DataError, match=why):
                read(path, 8)
    assert load_squashed(ok, 4).shape == D.read_image_uint8(ok, 4).shape == (3, 4, 4)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_large_image_is_named_in_one_line_and_read(tmp_path, caplog, monkeypatch):
    """Past PIL's decompression-bomb warning size, PIL printed a two-line UserWarning naming no file (the CLI
    now silences it): the package logs one line naming the file, and reads it."""
    path = str(tmp_path / "big.png")
    Image.new("RGB", (40, 30), (9, 9, 9)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with caplog.at_level("WARNING", logger="manifoldgd_fast.data"):
        x = D.read_image_uint8(path, 8)
    assert int(x.max()) == 9
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 40 x 30 px (0 M pixels), past PIL's decompression-bomb warning size: read all the same"]


def test_a_newline_in_a_file_name_stays_on_the_warnings_line(tmp_path):
    path = str(tmp_path / "nl\nbad.png")
    with open(path, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DataError) as e:
        D.read_image_uint8(path, 8)
    assert "\n" not in str(e.value) and "nl\\nbad.png" in str(e.value)


def test_a_flat_labelled_folder_refuses_one_image_in_two_files_and_names_ignored_ones(tmp_path, caplog):
    """v.jpg and v.png were both scored as one label's images (the image counted twice); a README or a
    sub-folder in the flat folder was ignored silently (a class folder's are named in a warning)."""
    from manifoldgd_fast.image_labels import scan_labelled_folder

    v = tmp_path / "v"
    v.mkdir()
    for s in ("a0", "b0"):
        Image.new("RGB", (8, 8)).save(v / f"{s}.png")
    (tmp_path / "l.txt").write_text("a0 ant\nb0 bee\n")
    (v / "README.txt").write_text("notes")
    (v / "sub").mkdir()
    with caplog.at_level("WARNING", logger="manifoldgd_fast.data"):
        entries = scan_labelled_folder(str(v), str(tmp_path / "l.txt"))
    assert [len(e.files) for e in entries] == [1, 1]
    assert any("ignoring 2 file(s)" in r.getMessage() and "README.txt" in r.getMessage() and "sub/" in r.getMessage()
               for r in caplog.records)
    Image.new("RGB", (8, 8)).save(v / "a0.jpg")
    with pytest.raises(DataError, match=r": a0\.jpg and a0\.png are one labelled image \('a0' in .*l\.txt\) in two "
                                        r"files; keep one$"):
        scan_labelled_folder(str(v), str(tmp_path / "l.txt"))
