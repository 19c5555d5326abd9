"""Evaluation at ImageNet scale: a flat validation folder with a label file (--val-labels), and resuming a
killed evaluation (finished runs kept, the run cut short continued from its checkpoint)."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_protocol import folders  # noqa: F401  (the fixture)

from manifoldgd_fast.errors import ConfigError, DataError
from manifoldgd_fast.eval import protocol as P
from manifoldgd_fast.eval import nets as N
from manifoldgd_fast.eval import resume

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# --------------------------------------------------------------------------- flat validation folder + label file
def _flatten(val, tmp_path, fmt):
    """The validation images moved into one flat folder (ImageNet's layout as distributed), renamed
    ILSVRC-style, with a label file in ``fmt``: "kaggle" (LOC_val_solution.csv) or "lines"."""
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for n, (cls, f) in enumerate(sorted((c, f) for c in os.listdir(val) for f in os.listdir(os.path.join(val, c)))):
        stem, ext = f"val_{n:05d}", os.path.splitext(f)[1]
        shutil.copy(os.path.join(val, cls, f), flat / (stem + ext))
        rows.append((stem, ext, cls))
    labels = tmp_path / ("LOC_val_solution.csv" if fmt == "kaggle" else "labels.txt")
    if fmt == "kaggle":
        labels.write_text("ImageId,PredictionString\n"
                          + "".join(f"{s},{c} 1 2 30 40 {c} 5 6 7 8\n" for s, _, c in reversed(rows)))
    else:
        labels.write_text("# image class\n" + "".join(f"{s}{e}\t{c}\n" for s, e, c in rows))
    return str(flat), str(labels)


def _devkit(tmp_path, rows, ids, layout):
    """An ILSVRC-2012 devkit labelling ``rows`` (stem, ext, class) in order: meta.mat's synsets give each
    class the ILSVRC2012_ID in ``ids`` (not the sorted order) beside a non-leaf synset; the ground truth
    has one ID a line. ``layout``: "folder" (ILSVRC2012_devkit_t12/), "data" (its data/ folder),
    "truth" (the ground-truth file) or "archive" (the .tar.gz as downloaded)."""
    import tarfile

    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.empty((len(ids) + 1, 1), dtype=[(f, "O") for f in fields])
    for i, (cls, n) in enumerate([*ids.items(), ("n00001740", len(ids) + 1)]):
        leaf = cls != "n00001740"
        synsets[i, 0] = (n, cls, cls, "a gloss", 0 if leaf else len(ids), np.zeros((1, 0)) if leaf
                         else np.arange(1, len(ids) + 1), 0 if leaf else 5, 1300 if leaf else 0)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(str(data / "meta.mat"), {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[c]}\n" for _, _, c in rows))
    if layout == "archive":
        with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            tar.add(data.parent, arcname="ILSVRC2012_devkit_t12")
        return str(tmp_path / "ILSVRC2012_devkit_t12.tar.gz")
    return str({"folder": data.parent, "data": data,
                "truth": data / "ILSVRC2012_validation_ground_truth.txt"}[layout])


def test_ilsvrc_devkit_labels_the_flat_validation_folder(folders, tmp_path):
    """--val-labels with the ILSVRC-2012 devkit (folder, data/ folder, ground-truth file, .tar.gz): the images
    ILSVRC2012_val_<n> get the WordNet id meta.mat gives line n's class number, whatever the number order;
    the scan equals the class-folder scan."""
    import shutil

    from manifoldgd_fast.data import scan_image_folder
    from manifoldgd_fast.image_labels import read_image_labels, scan_labelled_folder

    _, val = folders
    want = scan_image_folder(val, label_map="sorted")
    flat = tmp_path / "ILSVRC2012_img_val"
    flat.mkdir()
    rows = []
    for n, (cls, f) in enumerate(sorted((e.name, f) for e in want for f in e.files), 1):
        shutil.copy(f, flat / f"ILSVRC2012_val_{n:08d}.JPEG")
        rows.append((f"ILSVRC2012_val_{n:08d}", ".JPEG", cls))
    classes = [e.name for e in want]
    ids = {c: len(classes) - i for i, c in enumerate(classes)}  # reversed: the IDs are not the sorted order
    for layout in ["folder", "data", "truth", "archive"]:
        sub = tmp_path / layout
        sub.mkdir()
        path = _devkit(sub, rows, ids, layout)
        assert read_image_labels(path) == {s: c for s, _, c in rows}, layout
        got = scan_labelled_folder(str(flat), path)
        assert [(e.name, e.label, len(e.files)) for e in got] == [(e.name, e.label, len(e.files)) for e in want]


def test_ilsvrc_devkit_errors_are_one_line(folders, tmp_path, capsys, monkeypatch):
    """A devkit without meta.mat, a ground-truth line that is no class number, a corrupt meta.mat, a bare
    ground-truth file without meta.mat beside it, a broken archive: one line naming the path, exit 2."""
    from manifoldgd_fast.cli import main
    from manifoldgd_fast.image_labels import read_image_labels

    dist, val = folders
    kit = _devkit(tmp_path, [("ILSVRC2012_val_00000001", ".JPEG", "ant")], {"ant": 1, "bee": 2}, "folder")
    data = os.path.join(kit, "data")
    truth = os.path.join(data, "ILSVRC2012_validation_ground_truth.txt")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tar")
    cases = [(str(lone / "ILSVRC2012_validation_ground_truth.txt"), "nor meta.mat beside it"),
             (str(tmp_path / "broken.tar.gz"), "cannot read the archive"),
             (str(tmp_path), "not an ILSVRC-2012 devkit")]
    for path, why in cases:
        with pytest.raises(ConfigError, match=re.escape(why)):
            read_image_labels(path)
    open(truth, "w").write("1\n\n7\n")
    with pytest.raises(ConfigError, match=re.escape("ground_truth.txt line 3: '7' is not a class number of "
                                                    "meta.mat (1 to 2)")):
        read_image_labels(kit)
    open(os.path.join(data, "meta.mat"), "wb").write(b"MATLAB 5.0 garbage")
    cases.append((kit, "meta.mat is not the devkit's class table"))
    for path, why in cases:
        rc = main(["eval", "--distilled", dist, "--real-val", val, "--val-labels", path, "--epochs", "1",
                   "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and why in err[0] and path in err[0], err
    # an image archive given as the devkit is refused by its size, before tarfile reads its headers
    monkeypatch.setattr("manifoldgd_fast.image_labels.DEVKIT_MAX_BYTES", 8)
    with pytest.raises(ConfigError, match="is no devkit .* is it an archive of images"):
        read_image_labels(str(tmp_path / "broken.tar.gz"))
    # the devkit's bare ground truth given as a '<image> <class>' file says what it is
    plain = tmp_path / "gt.txt"
    plain.write_text("1\n2\n")
    with pytest.raises(ConfigError, match="ILSVRC-2012 devkit ground truth"):
        read_image_labels(str(plain))


def test_a_mistyped_devkit_path_says_it_does_not_exist(tmp_path):
    """A ground-truth file or devkit archive that is not there: "no such file or folder", the path named (a
    missing ILSVRC2012_validation_ground_truth.txt was "not an ILSVRC-2012 devkit (no data/meta.mat ...)", as if
    the file had the wrong content)."""
    from manifoldgd_fast.image_labels import read_image_labels

    for path in [tmp_path / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt",
                 tmp_path / "ILSVRC2012_devkit_t12.tar.gz"]:
        with pytest.raises(ConfigError) as e:
            read_image_labels(str(path))
        assert str(e.value) == f"--val-labels {path}: no such file or folder"


def test_labelled_images_missing_from_the_folder_are_counted_in_a_warning(tmp_path, caplog):
    """A partial copy of the validation set: the images it holds are scanned, and a warning counts the labelled
    images the folder holds, by name (two files of one name, v1.png and v1.jpg, made up for a missing one, and
    the warning was left out; they are now refused: one labelled image in two files)."""
    import logging

    from PIL import Image

    from manifoldgd_fast.image_labels import scan_labelled_folder

    flat = tmp_path / "val"
    flat.mkdir()
    (tmp_path / "labels.txt").write_text("v1 ant\nv2 bee\nv3 bee\n")
    for name in ("v1.png", "v1.jpg", "v2.png"):
        Image.new("RGB", (8, 8)).save(flat / name)
    with pytest.raises(DataError, match=r"v1\.jpg and v1\.png are one labelled image"):
        scan_labelled_folder(str(flat), str(tmp_path / "labels.txt"))
    (flat / "v1.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="manifoldgd_fast"):
        got = scan_labelled_folder(str(flat), str(tmp_path / "labels.txt"))
    assert [(e.name, e.label, [os.path.basename(f) for f in e.files]) for e in got] == \
        [("ant", 0, ["v1.png"]), ("bee", 1, ["v2.png"])]
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'labels.txt'} labels 3 images; {flat} holds 2 "
                                                        "of them"]
    caplog.clear()
    Image.new("RGB", (8, 8)).save(flat / "v3.png")
    with caplog.at_level(logging.WARNING, logger="manifoldgd_fast"):
        scan_labelled_folder(str(flat), str(tmp_path / "labels.txt"))
    assert caplog.records == []  # every labelled image is there


def test_damaged_or_foreign_devkits_are_one_line(tmp_path, monkeypatch):
    """What a damaged download or another file in the devkit's place gives (found by a mutation audit: each
    line of these checks could go and no test failed): a truncated .tar.gz, an archive whose meta.mat is a
    folder, a meta.mat without leaf classes, a ground truth that is blank, not ASCII or holds a decimal, a file
    that cannot be read, no scipy; each a ConfigError naming the path. An upper-case .TAR.GZ is the archive."""
    import shutil
    import sys
    import tarfile

    from scipy.io import savemat

    from manifoldgd_fast.image_labels import read_image_labels

    rows = [("ILSVRC2012_val_00000001", ".JPEG", "ant"), ("ILSVRC2012_val_00000002", ".JPEG", "bee")]
    kit = _devkit(tmp_path, rows, {"ant": 2, "bee": 1}, "archive")
    want = {"ILSVRC2012_val_00000001": "ant", "ILSVRC2012_val_00000002": "bee"}
    shutil.copy(kit, tmp_path / "KIT.TAR.GZ")
    assert read_image_labels(str(tmp_path / "KIT.TAR.GZ")) == want

    def refused(path, why):
        with pytest.raises(ConfigError) as e:
            read_image_labels(str(path))
        assert str(e.value).startswith(f"--val-labels {path}: ") and why in str(e.value), str(e.value)
        assert "\n" not in str(e.value)

    raw = open(kit, "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(raw[:len(raw) // 2])
    refused(tmp_path / "cut.tar.gz", "cannot read the archive (Compressed file ended before the end-of-stream")
    folder = tmp_path / "ILSVRC2012_devkit_t12"
    with tarfile.open(tmp_path / "dir.tar.gz", "w:gz") as tar:   # its only meta.mat a folder
        tar.add(folder / "data" / "ILSVRC2012_validation_ground_truth.txt", arcname="kit/data/"
                "ILSVRC2012_validation_ground_truth.txt")
        tar.add(folder / "data", arcname="kit/meta.mat", recursive=False)
    refused(tmp_path / "dir.tar.gz", "the archive holds no meta.mat")
    truth = folder / "data" / "ILSVRC2012_validation_ground_truth.txt"
    for content, why in [(b"\n \n", "ILSVRC2012_validation_ground_truth.txt is empty"),
                         ("1\n\u0662\n".encode(), "ILSVRC2012_validation_ground_truth.txt is not a list of class "
                                                  "numbers"),
                         (b"1\n1.5\n", "ground_truth.txt line 2: '1.5' is not a class number of meta.mat (1 to 2)")]:
        truth.write_bytes(content)
        refused(folder, why)
    truth.write_bytes(b"2\n1\n")
    assert read_image_labels(str(folder)) == want
    truth.write_bytes(b"\xef\xbb\xbf2\r\n1\r\n")   # re-saved by Notepad: a BOM and CRLF (the BOM was "not a list")
    assert read_image_labels(str(folder)) == want
    monkeypatch.setitem(sys.modules, "scipy.io", None)   # (an import of it raises ImportError)
    refused(folder, "reading the devkit's meta.mat needs scipy (pip install scipy)")
    monkeypatch.undo()

    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("manifoldgd_fast.image_labels.open", unreadable, raising=False)
    refused(folder, "cannot read the devkit ([Errno 13] Permission denied)")
    monkeypatch.undo()
    synsets = np.empty((1, 1), dtype=[(f, "O") for f in ("ILSVRC2012_ID", "WNID", "num_children")])
    synsets[0, 0] = (1, "n00001740", 3)   # a non-leaf synset alone
    savemat(str(folder / "data" / "meta.mat"), {"synsets": np.concatenate([synsets, synsets])})
    refused(folder, "meta.mat lists no leaf classes")


@pytest.mark.parametrize("fmt", ["kaggle", "lines"])
def test_flat_validation_folder_with_labels_is_the_class_folder_run(folders, tmp_path, fmt):
    """--val-labels: a flat folder of the same validation images (renamed) and a label file in either format
    gives the class-folder run's classes, image counts and accuracies, and the file is recorded."""
    from manifoldgd_fast.data import scan_image_folder
    from manifoldgd_fast.image_labels import scan_labelled_folder

    dist, val = folders
    flat, labels = _flatten(val, tmp_path, fmt)
    got, want = scan_labelled_folder(flat, labels), scan_image_folder(val, label_map="sorted")
    assert [(e.name, e.label, len(e.files)) for e in got] == [(e.name, e.label, len(e.files)) for e in want]
    kw = dict(nets="convnet6", seeds=1, epochs=3, size=8, batch_size=4, device="cpu", progress=False)
    a = P.evaluate(dist, val, out_json=str(tmp_path / "a.json"), **kw)
    b = P.evaluate(dist, flat, val_labels=labels, out_json=str(tmp_path / "b.json"), **kw)
    assert b["classes"] == a["classes"] and b["n_val"] == a["n_val"] == 18
    assert b["nets"]["convnet6"]["seeds"][0]["history"] == a["nets"]["convnet6"]["seeds"][0]["history"]
    assert b["val_labels"] == os.path.abspath(labels) and a["val_labels"] is None
    assert f"labelled by {os.path.abspath(labels)}" in open(tmp_path / "b.md").read()


def test_val_labels_and_out_json_may_be_pathlib_paths(folders, tmp_path):
    """evaluate() takes a pathlib.Path for --val-labels and --out-json, as for --real-val and --teacher (they
    were an AttributeError in the label reader and a TypeError naming the partial file: a Python API audit);
    anything else is one line naming the parameter."""
    import pathlib

    dist, val = folders
    flat, labels = _flatten(val, tmp_path, "lines")
    kw = dict(nets="convnet6", seeds=1, epochs=1, size=8, device="cpu", progress=False)
    res = P.evaluate(pathlib.Path(dist), pathlib.Path(flat), val_labels=pathlib.Path(labels),
                     out_json=tmp_path / "r.json", **kw)
    assert res["val_labels"] == os.path.abspath(labels) and res["files"]["json"] == str(tmp_path / "r.json")
    assert os.path.isfile(tmp_path / "r.json") and os.path.isfile(tmp_path / "r.md")
    with pytest.raises(ConfigError, match=r"^--val-labels: expected a path, got int 3$"):
        P.evaluate(dist, flat, val_labels=3, **kw)


def test_numbered_val_labels_say_what_file_to_give(folders, tmp_path, capsys):
    """caffe's val.txt ('<image> 65': class numbers) with wnid-named distilled classes was a bare class mismatch
    listing numbers; it says the file names classes by number and what to give instead."""
    from manifoldgd_fast.cli import main

    dist, val = folders
    flat, labels = _flatten(val, tmp_path, "lines")
    numbered = tmp_path / "val.txt"
    names = sorted(os.listdir(val))
    numbered.write_text("".join(f"{ln.split(chr(9))[0]} {names.index(ln.split(chr(9))[1].strip())}\n"
                                for ln in open(labels) if not ln.startswith("#")))
    assert main(["eval", "--distilled", dist, "--real-val", flat, "--val-labels", str(numbered), "--epochs", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "class mismatch" in err and f"({numbered} names its classes by number, as caffe's val.txt does" in err, err
    assert "\n" not in err


def test_flat_validation_folder_with_restrict_val_keeps_the_distilled_classes(folders, tmp_path):
    """--val-labels with --restrict-val: the labelled classes the distilled set lacks (dog) are left out of the
    validation set, each kept image labelled by the distilled classes' order."""
    from conftest import make_image_folder
    from test_eval_protocol import CLASSES

    dist, _ = folders
    val = make_image_folder(tmp_path / "val4", [*CLASSES, "dog"], 2, size=16, seed=5)
    flat, labels = _flatten(val, tmp_path, "lines")
    with pytest.raises(DataError, match="missing from the distilled set: dog"):
        P.match_classes(dist, flat, labels=labels)
    classes, _, ref = P.match_classes(dist, flat, exact=False, labels=labels)
    assert classes == CLASSES and [(e.name, e.label, len(e.files)) for e in ref] == [
        ("ant", 0, 2), ("bee", 1, 2), ("cat", 2, 2)]
    res = P.evaluate(dist, flat, val_labels=labels, restrict_val=True, nets="convnet6", seeds=1, epochs=1, size=8,
                     device="cpu", progress=False)
    assert res["n_val"] == 6 and res["classes"] == CLASSES


def test_flat_validation_folder_bad_labels_are_one_line(folders, tmp_path, capsys):
    """Unlabelled images, a malformed or contradictory line, an unreadable file, class folders given as a
    flat folder: each a one-line error naming the file or the folder, exit 2, before any training."""
    from manifoldgd_fast.cli import main
    from manifoldgd_fast.image_labels import read_image_labels, scan_labelled_folder

    dist, val = folders
    flat, labels = _flatten(val, tmp_path, "lines")
    text = open(labels).read()
    bad = tmp_path / "bad.txt"
    for content, why in [
        ("".join(ln for ln in text.splitlines(True) if not ln.startswith("val_00003")),
         "1 of its 18 images have no label"),
        (text + "val_00099.png\n", "line 20: 'val_00099.png' is not '<image> <class>'"),
        (text + "val_00000 bee\n", "image 'val_00000' is labelled 'ant' on line 2 and 'bee' here"),
        ("# nothing\n", "no labels in it"),
    ]:
        bad.write_text(content)
        with pytest.raises((ConfigError, DataError), match=re.escape(why)):
            scan_labelled_folder(flat, str(bad))
        rc = main(["eval", "--distilled", dist, "--real-val", flat, "--val-labels", str(bad), "--epochs", "1",
                   "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and why in err[0] and "Traceback" not in err[0], err
    with pytest.raises(ConfigError, match="cannot read the labels"):
        read_image_labels(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="it holds class folders: leave out --val-labels"):
        scan_labelled_folder(val, labels)
    # and the other way round: a flat folder without --val-labels
    rc = main(["eval", "--distilled", dist, "--real-val", flat, "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"validation folder {flat} holds images but no class folders" in err[0] \
        and "--val-labels FILE" in err[0], err
    assert read_image_labels(labels)["val_00000"] == "ant"


# --------------------------------------------------------------------------- a killed evaluation resumes
KILL_KW = dict(nets="convnet6", seeds=3, epochs=2, size=8, batch_size=4, device="cpu", progress=False)


def _killed_at_the_third(calls: list, train):
    """A train_net that records each run's seed in ``calls`` and is interrupted at the third run of an
    evaluation (a killed one: the two before are finished and kept)."""
    def run(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train(*a, **k)

    return run


def test_killed_evaluation_resumes_its_finished_runs(folders, tmp_path, monkeypatch):
    """Each finished (net, seed) run is kept in eval.json.partial; a rerun after a kill trains only the
    runs left and gives the uninterrupted run's results. Other settings or other images start over;
    the partial file goes once the JSON is written."""
    dist, val = folders
    kw = KILL_KW
    whole = P.evaluate(dist, val, out_json=str(tmp_path / "whole.json"), **kw)
    out = str(tmp_path / "e.json")
    calls = []
    train = P.train_net
    killed_at_the_third = _killed_at_the_third(calls, train)
    monkeypatch.setattr(P, "train_net", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        P.evaluate(dist, val, out_json=out, **kw)
    assert os.path.isfile(out + ".partial") and not os.path.exists(out)
    calls.clear()
    monkeypatch.setattr(P, "train_net", lambda *a, **k: calls.append(k["seed"]) or train(*a, **k))
    res = P.evaluate(dist, val, out_json=out, **kw)
    assert calls == [2] and res["resumed_runs"] == 2 and not os.path.exists(out + ".partial")
    strip = lambda r: [{k: v for k, v in s.items() if k != "time_s"} for s in r["nets"]["convnet6"]["seeds"]]  # noqa
    assert strip(res) == strip(whole) and res["nets"]["convnet6"]["best_mean"] == whole["nets"]["convnet6"]["best_mean"]
    # a partial file from other settings (or other images) is not used
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(P, "train_net", killed_at_the_third)
        calls.clear()
        P.evaluate(dist, val, out_json=out, **kw)
    calls.clear()
    monkeypatch.setattr(P, "train_net", lambda *a, **k: calls.append(k["seed"]) or train(*a, **k))
    P.evaluate(dist, val, out_json=out, **dict(kw, epochs=3))
    assert calls == [0, 1, 2]
    os.remove(out + ".partial")   # (it keeps the killed run's two for its rerun: see the test below)
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(P, "train_net", killed_at_the_third)
        calls.clear()
        P.evaluate(dist, val, out_json=out, **kw)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(dist, "ant", "img000.png"))
    calls.clear()
    monkeypatch.setattr(P, "train_net", lambda *a, **k: calls.append(k["seed"]) or train(*a, **k))
    P.evaluate(dist, val, out_json=out, **kw)
    assert calls == [0, 1, 2]


def test_an_evaluation_of_other_settings_in_between_keeps_a_killed_ones_finished_runs(folders, tmp_path,
                                                                                      monkeypatch):
    """A killed evaluation, then one with other settings into the same --out-json: the second said "starting
    over" and, once done, deleted the partial file with the first one's finished runs (its rerun trained them
    all again). They are kept beside it, and the first one's rerun resumes them; the file goes once no
    evaluation's runs are left in it."""
    dist, val = folders
    kw, out = KILL_KW, str(tmp_path / "e.json")
    calls, train = [], P.train_net
    monkeypatch.setattr(P, "train_net", _killed_at_the_third(calls, train))
    with pytest.raises(KeyboardInterrupt):
        P.evaluate(dist, val, out_json=out, **kw)
    monkeypatch.setattr(P, "train_net", lambda *a, **k: calls.append(k["seed"]) or train(*a, **k))
    calls.clear()
    P.evaluate(dist, val, out_json=out, **dict(kw, epochs=3, seeds=1))       # other settings, run to the end
    assert calls == [0] and os.path.isfile(out + ".partial")
    calls.clear()
    res = P.evaluate(dist, val, out_json=out, **kw)                          # the killed one again
    assert calls == [2] and res["resumed_runs"] == 2 and not os.path.exists(out + ".partial")


@pytest.mark.parametrize("eval_every", [1, 5])
def test_killed_run_continues_from_its_last_checkpoint(folders, tmp_path, monkeypatch, eval_every):
    """A run killed mid-training continues from its last saved epoch (net, optimizer, generators,
    history) and ends with the uninterrupted run's results, bit for bit on the CPU; a checkpoint of
    other settings is not used; the file goes when the run ends. Killed between two tests (eval_every
    5), the training accuracy counted since the last test is kept too."""
    dist, val = folders
    entries = P.match_classes(dist, val)
    x, y = P.load_images(entries[1], 8)
    train = P.Split.place(x, y, torch.device("cpu"))
    x, y = P.load_images(entries[2], 8)
    valset = P.Split.place(x, y, torch.device("cpu"))
    hp = P.default_hparams(3, False)
    hp["batch_size"] = 4
    kw = dict(size=8, epochs=5, hp=hp, seed=1, device=torch.device("cpu"), eval_every=eval_every, progress=False)
    whole = P.train_net("convnet6", train, valset, 3, **kw)
    ck = str(tmp_path / "run.pt")
    monkeypatch.setattr(resume, "CHECKPOINT_EVERY_S", 0.0)
    lr_at = P.lr_at
    killed_at_epoch_3 = _killed_at(3)
    monkeypatch.setattr(P, "lr_at", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        P.train_net("convnet6", train, valset, 3, checkpoint=ck, checkpoint_key="k", **kw)
    assert torch.load(ck, weights_only=True)["epoch"] == 3
    started = []
    monkeypatch.setattr(P, "lr_at", lambda epoch, *a: started.append(epoch) or lr_at(epoch, *a))
    res = P.train_net("convnet6", train, valset, 3, checkpoint=ck, checkpoint_key="k", **kw)
    assert started == [3, 4] and not os.path.exists(ck)
    for key in ("best", "best_epoch", "final", "history", "train_acc"):
        assert res[key] == whole[key], key
    # another run's checkpoint is not taken: the run starts at epoch 0
    monkeypatch.setattr(P, "lr_at", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        P.train_net("convnet6", train, valset, 3, checkpoint=ck, checkpoint_key="k", **kw)
    started.clear()
    monkeypatch.setattr(P, "lr_at", lambda epoch, *a: started.append(epoch) or lr_at(epoch, *a))
    P.train_net("convnet6", train, valset, 3, checkpoint=ck, checkpoint_key="other", **kw)
    assert started == [0, 1, 2, 3, 4]


def _killed_at(epoch_to_kill: int):
    """P.lr_at, raising KeyboardInterrupt (a kill) when asked for 0-based epoch ``epoch_to_kill``."""
    lr_at = P.lr_at

    def lr(epoch, *a):
        if epoch == epoch_to_kill:
            raise KeyboardInterrupt
        return lr_at(epoch, *a)

    return lr


def _splits(folders):
    entries = P.match_classes(*folders)
    return P.Split(*P.load_images(entries[1], 8)), P.Split(*P.load_images(entries[2], 8))


def test_a_torn_checkpoint_starts_the_run_over(folders, tmp_path):
    """A checkpoint cut short (a kill while torch.save wrote a zip) is not a traceback: the run starts at
    epoch 0 and gives the uninterrupted run's history."""
    train, _ = _splits(folders)
    hp = dict(P.default_hparams(3), batch_size=4)
    kw = dict(size=8, epochs=2, hp=hp, seed=1, device=torch.device("cpu"), progress=False)
    whole = P.train_net("convnet6", train, train, 3, **kw)
    ck = tmp_path / "run.pt"
    ck.write_bytes(b"PK\x03\x04 torn")
    res = P.train_net("convnet6", train, train, 3, checkpoint=str(ck), checkpoint_key="k", **kw)
    assert res["history"] == whole["history"]


def test_finished_runs_of_another_lr_are_not_reused(folders, tmp_path, monkeypatch):
    """The partial file's key holds the hyper-parameters: a killed evaluation rerun with another --lr trains
    every run again, with that lr."""
    dist, val = folders
    kw = dict(nets="convnet6", seeds=2, epochs=2, size=8, batch_size=4, device="cpu", progress=False)
    out = str(tmp_path / "e.json")
    train, calls = P.train_net, []

    def killed_at_the_second(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train(*a, **k)

    monkeypatch.setattr(P, "train_net", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        P.evaluate(dist, val, out_json=out, **kw)
    calls.clear()
    monkeypatch.setattr(P, "train_net", lambda *a, **k: calls.append((k["seed"], k["hp"]["lr"])) or train(*a, **k))
    res = P.evaluate(dist, val, out_json=out, lr=0.05, **kw)
    assert calls == [(0, 0.05), (1, 0.05)] and res["hparams"]["lr"] == 0.05


def test_a_keyword_teacher_whose_weights_file_changed_is_not_resumed(folders, tmp_path, monkeypatch):
    """A keyword teacher (--teacher imagenet-resnet18) was keyed by its name in the partial file: a killed
    evaluation rerun after the weights in $TORCH_HOME were replaced mixed runs taught by the old weights with
    runs taught by the new. It is keyed by the file the name stands for, as a teacher's path is."""
    from manifoldgd_fast.eval import nets as N

    dist, val = folders
    path = tmp_path / "named-teacher.pt"
    torch.save(N.net_checkpoint(N.build_net("convnet6", 3, 8)), path)
    monkeypatch.setitem(N.NAMED, "named-teacher", (lambda: str(path), path.name, "the test's"))
    kw, out = dict(KILL_KW, teacher="named-teacher"), str(tmp_path / "e.json")
    calls, train = [], P.train_net
    monkeypatch.setattr(P, "train_net", _killed_at_the_third(calls, train))
    with pytest.raises(KeyboardInterrupt):
        P.evaluate(dist, val, out_json=out, **kw)
    torch.manual_seed(1)
    torch.save(N.net_checkpoint(N.build_net("convnet6", 3, 8)), path)   # other weights, same name
    monkeypatch.setattr(P, "train_net", lambda *a, **k: calls.append(k["seed"]) or train(*a, **k))
    calls.clear()
    res = P.evaluate(dist, val, out_json=out, **kw)
    assert calls == [0, 1, 2] and "resumed_runs" not in res and res["teacher"] == "named-teacher"


def test_a_resume_with_the_folders_in_another_order_continues_each_folders_own_run(folders, tmp_path, monkeypatch):
    """Several distilled folders, killed mid-run, rerun with the folders listed in another order: each run
    continues from its own folder's checkpoint (they were named by position: the other folder's run went on
    from this one's epoch 4) and the results are the uninterrupted run's."""
    import shutil

    dist, val = folders
    other = str(tmp_path / "other")
    shutil.copytree(dist, other)
    for i, name in enumerate(sorted(os.listdir(os.path.join(other, "bee")))):   # another set: trains otherwise
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(os.path.join(other, "bee", name))
    kw = dict(nets="convnet6", seeds=[0], epochs=6, size=8, batch_size=4, device="cpu", progress=False, eval_every=1)
    whole = P.evaluate([other, dist], val, out_json=str(tmp_path / "whole.json"), **kw)
    out = str(tmp_path / "e.json")
    monkeypatch.setattr(resume, "CHECKPOINT_EVERY_S", 0.0)
    monkeypatch.setattr(P, "lr_at", _killed_at(4))
    with pytest.raises(KeyboardInterrupt):
        P.evaluate([dist, other], val, out_json=out, **kw)          # killed in dist's run
    monkeypatch.undo()
    res = P.evaluate([other, dist], val, out_json=out, **kw)
    histories = lambda r: [s["history"] for s in r["nets"]["convnet6"]["seeds"]]  # noqa: E731
    assert histories(res) == histories(whole)


def test_an_evaluation_of_other_settings_in_between_keeps_a_killed_ones_checkpoint(folders, tmp_path, monkeypatch):
    """A run killed mid-training, then an evaluation of other settings into the same report: the second one's
    run of the same folder / net / seed overwrote the first one's checkpoint, and the first one's rerun started
    that run over ("saved by another run's settings"). Each evaluation's checkpoints are its own; at an
    evaluation's end the other ones' latest stay, its own leftovers and those of old killed ones go."""
    dist, val = folders
    kw = dict(nets="convnet6", seeds=[0], epochs=6, size=8, batch_size=4, device="cpu", progress=False, eval_every=1)
    whole = P.evaluate(dist, val, out_json=str(tmp_path / "whole.json"), **kw)
    out = str(tmp_path / "e.json")
    monkeypatch.setattr(resume, "CHECKPOINT_EVERY_S", 0.0)
    lr_at = P.lr_at
    monkeypatch.setattr(P, "lr_at", _killed_at(4))
    with pytest.raises(KeyboardInterrupt):
        P.evaluate(dist, val, out_json=out, **kw)                      # killed in epoch 5 of 6
    saved = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    assert len(saved) == 1, saved
    monkeypatch.setattr(P, "lr_at", lr_at)
    P.evaluate(dist, val, out_json=out, **dict(kw, epochs=3))           # other settings, run to the end
    assert os.listdir(tmp_path).count(saved[0]) == 1                    # the killed one's checkpoint stays
    epochs = []
    monkeypatch.setattr(P, "lr_at", lambda epoch, *a: epochs.append(epoch) or lr_at(epoch, *a))
    res = P.evaluate(dist, val, out_json=out, **kw)                     # the killed one again: continues
    assert epochs == [4, 5]
    histories = lambda r: [s["history"] for s in r["nets"]["convnet6"]["seeds"]]  # noqa: E731
    assert histories(res) == histories(whole)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    # at an evaluation's end: of other killed evaluations' checkpoints the latest KEEP_OTHER_RUNS stay
    partial = out + ".partial"
    names = [f"{partial}.{i:012x}.{resume.path_key(dist)}.convnet6.0.pt" for i in range(resume.KEEP_OTHER_RUNS + 2)]
    for i, name in enumerate(names):
        open(name, "wb").close()
        os.utime(name, (1000 + i, 1000 + i))
    old_naming = f"{partial}.{resume.path_key(dist)}.convnet6.0.pt"
    open(old_naming, "wb").close()
    P.evaluate(dist, val, out_json=out, **dict(kw, epochs=1))
    left = sorted(os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.endswith(".pt"))
    assert left == sorted(names[2:]), left


def test_two_evaluations_into_one_report_at_once_are_refused(folders, tmp_path, capsys):
    """Two evaluations into one report at the same time both printed "results: eval.json", which held the
    last one's, and their read-modify-writes of eval.json.partial lost each other's finished runs (a
    concurrency audit): the second is refused in one line naming the first; other reports run beside it."""
    from manifoldgd_fast.cli import main
    from manifoldgd_fast.output import RunLock

    dist, val = folders
    report = os.path.join(dist, "eval.json")
    with RunLock(dist, name=".lock-eval.json", what="another evaluation", flag="--out-json", target=report):
        with pytest.raises(DataError, match=re.escape(f"--out-json {report} is being written by another "
                                                      f"evaluation (pid {os.getpid()} on ")):
            P.evaluate(dist, val, **KILL_KW)
        rc = main(["eval", "--distilled", dist, "--real-val", val, "--nets", "convnet6", "--seeds", "1",
                   "--epochs", "1", "--size", "8", "--device", "cpu", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is being written by another evaluation" in err[0], err
        assert not os.path.exists(report)
        P.evaluate(dist, val, out_json=str(tmp_path / "other.json"), **dict(KILL_KW, seeds=1))  # another report


def test_file_identity_follows_the_files_size_and_modification_time(tmp_path):
    """A teacher rewritten in place with the same size is another teacher: finished runs are not reused."""
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"x" * 10)
    first = resume.file_identity(str(path))
    assert first == resume.file_identity(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert resume.file_identity(str(path)) != first
    assert resume.file_identity("imagenet-resnet18") == "imagenet-resnet18"   # a keyword names no file
    assert resume.file_identity(torch.nn.Linear(1, 1)) is None


def test_path_key_names_a_folder_by_its_absolute_path(tmp_path, monkeypatch):
    """Two distilled sets of the same name in different parents get their own checkpoints; a relative
    spelling of a folder gets its absolute one's."""
    a, b = tmp_path / "x" / "out", tmp_path / "y" / "out"
    assert re.fullmatch(r"[0-9a-f]{12}", resume.path_key(str(a))) and resume.path_key(str(a)) != resume.path_key(str(b))
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    assert resume.path_key("out") == resume.path_key(str(a))


@pytest.mark.parametrize("text", ['["a list"]', "null", '{"fingerprint": "f", "runs": ["not", "a", "dict"]}'])
def test_a_partial_file_that_holds_no_runs_starts_over(tmp_path, text, caplog):
    """eval.json.partial holding other JSON (a list, null, runs that are no mapping) was an AttributeError or
    ValueError traceback; it is warned about and the evaluation starts over."""
    path = tmp_path / "eval.json.partial"
    path.write_text(text)
    with caplog.at_level("WARNING", logger="manifoldgd_fast.eval.resume"):
        assert resume.load_finished_runs(str(path), "f") == {}
    assert str(path) in caplog.text


@pytest.mark.parametrize("command, real", [("eval", "--real-val"), ("metrics", "--real")])
def test_an_empty_out_json_is_refused_not_the_default(command, real, tmp_path, capsys):
    """`--out-json ''` (an unset $VAR) wrote to the default OUT/eval.json (metrics.json) silently, while
    `profile --json ''` and `--config ''` are refused: now one line, before any training."""
    from manifoldgd_fast.cli import main

    assert main([command, "--distilled", str(tmp_path), real, str(tmp_path), "--out-json", ""]) == 2
    err = capsys.readouterr().err
    assert err == "manifoldgd-fast: error: --out-json must be a file path, got ''\n", err


def test_two_metrics_runs_into_one_report_at_once_are_refused(folders):
    """As two evaluations: the second metrics run into one metrics.json is refused, naming the first."""
    from manifoldgd_fast.eval.metrics import compute_metrics
    from manifoldgd_fast.output import RunLock

    dist, val = folders
    report = os.path.join(dist, "metrics.json")
    with RunLock(dist, name=".lock-metrics.json", what="another metrics run", flag="--out-json", target=report):
        with pytest.raises(DataError, match=re.escape(f"--out-json {report} is being written by another metrics "
                                                      f"run (pid {os.getpid()} on ")):
            compute_metrics(dist, val, device="cpu", encoder_epochs=1)
    assert not os.path.exists(report)


def test_a_report_is_never_written_over_the_teacher_or_encoder_file(folders, tmp_path):
    """--out-json naming the --teacher (or --encoder) file would have replaced it with the report after the
    training: refused before (a finetune / profile audit found the same for profile --json)."""
    from manifoldgd_fast.eval.metrics import compute_metrics

    dist, val = folders
    net = tmp_path / "net.pt"
    torch.save(N.net_checkpoint(N.build_net("convnet6", 3, 8)), net)
    with pytest.raises(ConfigError, match=re.escape(f"--out-json {net}: inside --teacher {net}, which is read")):
        P.evaluate(dist, val, out_json=str(net), teacher=str(net), **KILL_KW)
    with pytest.raises(ConfigError, match=re.escape(f"--out-json {net}: inside --encoder {net}, which is read")):
        compute_metrics(dist, val, out_json=str(net), encoder=str(net), device="cpu")
