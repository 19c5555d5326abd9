"""The output folder's safety: what `distill --out` refuses to overwrite, the run fingerprint and what a
resume may reuse, atomic writes, one run per folder (its lock) and a killed run's temporaries."""
import json
import os
import shutil
import time

import pytest
import torch

from test_pipeline import FAST, _args, _bad, _digest

from manifoldgd_fast.cli import main


def _tree(folder):
    return {os.path.relpath(os.path.join(dp, f), folder): open(os.path.join(dp, f), "rb").read()
            for dp, _, files in os.walk(folder) for f in files}


def test_out_that_would_clobber_data_or_foreign_folders_is_refused(tiny_world, tmp_path, capsys, monkeypatch):
    """--out inside --data, a class folder named like the run's own folders, a folder in --out that no
    run finished, too few images, an unwritable --out: one line, exit 2, nothing of anyone's lost, and
    (the class checks) nothing encoded first."""
    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    (data / "apple" / "notes.txt").write_text("mine")
    w = dict(tiny_world, data=str(data))
    before = _tree(data)
    for out in (data, data / "apple", data / "inner" / "out"):
        line = _bad(w, tmp_path, _args(w, out), capsys)
        assert "--out" in line and "--data" in line, line
    assert _tree(data) == before and not (data / "inner").exists()

    reserved = tmp_path / "reserved"
    shutil.copytree(tiny_world["data"], reserved)
    shutil.copytree(reserved / "banana", reserved / "latents")
    cache = tmp_path / "cache"
    args = ["distill", "--data", str(reserved), "--model", tiny_world["model"], "--out", str(tmp_path / "o1"),
            "--cache-dir", str(cache), *FAST]
    line = _bad(w, tmp_path, args, capsys)
    assert "'latents'" in line and "rename the class folder" in line, line
    for name in ("contact_sheet.png", "manifest.json"):  # OUT's own files: found only once the run wrote them
        shutil.move(str(reserved / "latents"), str(reserved / name))
        line = _bad(w, tmp_path, args, capsys)
        assert f"'{name}' is the name of the run's own OUT/{name} file" in line and "rename the class folder" in line
        shutil.move(str(reserved / name), str(reserved / "latents"))
    line = _bad(w, tmp_path, args[:-len(FAST)] + ["--ipc", "50", *FAST[2:]], capsys)
    assert "fewer than --ipc 50" in line, line
    assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(cache) for f in fs)  # nothing encoded
    args = ["distill", "--data", str(data), "--model", tiny_world["model"], "--out", str(tmp_path / "o1"),
            "--cache-dir", str(cache), *FAST]
    line = _bad(w, tmp_path, args[:-len(FAST)] + ["--ipc", "2", "--steps", "20"], capsys)  # no --t-stop of its own
    assert "--steps 20: fewer than the DiT default --t-stop 25" in line, line
    assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(cache) for f in fs)
    line = _bad(w, tmp_path, args[:-len(FAST)] + ["--ipc", "2", "--steps", "249", "--t-stop", "5", "--sampler", "ddim"],
                capsys)  # DDIM's stride is the DiT schedule's: known before the model's latents are encoded
    assert "--steps 249: DDIM needs an integer stride" in line, line
    assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(cache) for f in fs)

    # an --out holding other work (no manifest): refused before anything is encoded, nothing of it touched
    other = tmp_path / "other"
    (other / "holiday").mkdir(parents=True)
    (other / "notes.md").write_text("mine")
    line = _bad(w, tmp_path, [*args[:6], str(other), *args[7:]], capsys)
    assert line.endswith(f"--out {other} already holds holiday, notes.md and no manifest.json of a run; use a new "
                         "or empty --out"), line
    assert sorted(os.listdir(other)) == ["holiday", "notes.md"] and (other / "notes.md").read_text() == "mine"
    assert not any(f.endswith(".safetensors") for _, _, fs in os.walk(cache) for f in fs)

    out = tmp_path / "o2"
    (out / "apple").mkdir(parents=True)
    (out / "apple" / "keep.txt").write_text("not a distilled class")
    line = _bad(w, tmp_path, _args(tiny_world, out), capsys)
    assert str(out / "apple") in line and "is not a finished class" in line, line
    assert (out / "apple" / "keep.txt").read_text() == "not a distilled class"

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = _bad(w, tmp_path, _args(tiny_world, a_file / "sub"), capsys)
    assert "--out" in line and "not writable" in line, line

    from manifoldgd_fast import pipeline

    def full_disk(cfg):
        raise OSError(28, "No space left on device", "/scratch/out/apple/0.png")

    monkeypatch.setattr(pipeline, "distill", full_disk)
    line = _bad(w, tmp_path, _args(tiny_world, tmp_path / "o3"), capsys)
    assert line == "manifoldgd-fast: error: /scratch/out/apple/0.png: No space left on device", line


def _another(v):
    """A value of another kind or size than ``v`` (the fingerprints hash values; they do not validate them)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v * 2 + 3
    if isinstance(v, str):
        return v + "-other"
    return 3 if v is None else None


def test_every_field_counts_in_the_fingerprints_but_the_unhashed_ones(tmp_path):
    """Changing any DistillConfig field changes the run fingerprint (a resume with it is refused), except
    UNHASHED_FIELDS (where things go, rounding only), which change nothing; each MODE_FIELDS entry (and
    gmm_iters under GMM) changes the modes fingerprint (precomputed modes of other settings are not taken).
    On a base where the conditionally hashed fields count: ManifoldGD's paper formulation + CGS, GMM modes, the
    SD backbone."""
    import dataclasses

    from manifoldgd_fast.config import MODE_FIELDS, UNHASHED_FIELDS, DistillConfig, fingerprint, modes_fingerprint

    # a field is left out on purpose only: where the output goes, and what changes only the rounding
    assert set(UNHASHED_FIELDS) == {"out", "cache_dir", "device", "batch_size", "encode_batch_size", "encode_workers",
                                    "contact_sheet", "extra", "backend", "modes_dir", "loop", "class_batch", "shard"}
    base = DistillConfig(method="manifoldgd", formulation="paper", cgs=True, mode_method="gmm", backbone="sd")
    fp = fingerprint(base)
    for f in dataclasses.fields(DistillConfig):
        other = dataclasses.replace(base, **{f.name: _another(getattr(base, f.name))})
        if f.name in UNHASHED_FIELDS:
            assert fingerprint(other) == fp, f.name
        else:
            assert fingerprint(other) != fp, f"{f.name} does not count in the run fingerprint"
    mfp = modes_fingerprint(base, str(tmp_path), "apple")
    # what mode discovery is given (its keyword parameters; method is --mode-method), not MODE_FIELDS itself
    import inspect

    from manifoldgd_fast.modes import discover_modes

    given = [{"method": "mode_method"}.get(p, p) for p in inspect.signature(discover_modes).parameters if p != "z"]
    assert set(given) <= {f.name for f in dataclasses.fields(DistillConfig)} and set(MODE_FIELDS) <= set(given)
    for name in given:
        other = dataclasses.replace(base, **{name: _another(getattr(base, name))})
        assert modes_fingerprint(other, str(tmp_path), "apple") != mfp, f"{name} does not count in the modes'"
    assert modes_fingerprint(base, str(tmp_path), "banana") != mfp


def test_a_whole_number_in_a_number_field_is_the_flags_float(tmp_path):
    """YAML's or the API's `lambda_m: 1` is the run of `--lambda-m 1` (1.0): the same run and modes
    fingerprints (json hashed 1 and 1.0 apart: a resume spelt the other way was refused)."""
    import dataclasses

    from manifoldgd_fast.config import FLOAT_FIELDS, DistillConfig, fingerprint, modes_fingerprint

    assert {"lambda_m", "cfg_scale", "kmeans_tol", "dpp_eps", "manifold_radius"} <= set(FLOAT_FIELDS)
    assert not {"seed", "ipc", "steps", "k", "cgs"} & set(FLOAT_FIELDS)
    base = DistillConfig(method="manifoldgd", cgs=True, mode_method="gmm", backbone="sd")
    for name in FLOAT_FIELDS:
        a, b = (dataclasses.replace(base, **{name: v}) for v in (2, 2.0))
        assert fingerprint(a) == fingerprint(b), name
        assert modes_fingerprint(a, str(tmp_path), "apple") == modes_fingerprint(b, str(tmp_path), "apple"), name


def test_fingerprint_counts_the_data_not_its_spelling(tiny_world, tmp_path, capsys, monkeypatch):
    """The same folder given relatively resumes; another folder with the same path string (another cwd)
    or a new class folder is another run; a resume with another batch size warns and records it."""
    out = tmp_path / "out"
    data = tmp_path / "d" / "data"
    shutil.copytree(tiny_world["data"], data)
    w = dict(tiny_world, data=str(data))
    assert main(_args(w, out)) == 0
    ref = _digest(out)
    shutil.rmtree(out / "banana")
    monkeypatch.chdir(tmp_path / "d")
    capsys.readouterr()
    assert main(_args(dict(w, data="data" + os.sep), out)) == 0
    io = capsys.readouterr()
    assert _digest(out) == ref
    assert "distilled 1 class into" in io.out and "2 were already done" in io.out, io.out
    assert "resuming" not in io.err, io.err
    shutil.rmtree(out / "banana")    # again with another batch size: warned and recorded (and the bytes
    assert main(_args(dict(w, data="data" + os.sep), out, "--batch-size", "1")) == 0   # may round otherwise)
    io = capsys.readouterr()
    assert "resuming" in io.err and "batch_size" in io.err, io.err
    man = json.loads((out / "manifest.json").read_text())
    assert man["classes"]["banana"]["numerics"]["batch_size"] == 1
    assert man["classes"]["apple"]["numerics"]["batch_size"] == 2

    other = tmp_path / "e" / "data"                 # same spelling "data", other folder: other files
    shutil.copytree(tiny_world["data"], other)
    os.unlink(other / "cherry" / sorted(os.listdir(other / "cherry"))[0])
    monkeypatch.chdir(tmp_path / "e")
    before = _digest(out)
    line = _bad(w, tmp_path, _args(dict(w, data="data"), out), capsys)
    assert "holds a run with other data" in line, line
    assert _digest(out) == before

    out2 = tmp_path / "out2"
    assert main(_args(w, out2, "--classes", "apple,banana", "--method", "dit")) == 0
    shutil.copytree(data / "banana", data / "aardvark")   # a stray class folder shifts the sorted labels
    line = _bad(w, tmp_path, _args(w, out2, "--classes", "apple,banana", "--method", "dit"), capsys)
    assert "holds a run with other data (its classes, labels or files)" in line, line


def test_atomic_writes_get_the_umask_mode(tmp_path):
    """Files written through temp + rename are readable as open() would make them (mkstemp alone: 0600)."""
    from manifoldgd_fast.output import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(str(tmp_path / "m.json"), b"{}")
        atomic_write_bytes(str(tmp_path / "sub" / "l.bin"), b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "sub" / "l.bin").stat().st_mode & 0o777 == 0o644
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


def test_a_file_written_over_keeps_its_mode(tmp_path):
    """An existing file rewritten through temp + rename keeps its own mode, as open(path, "w") would keep it (it
    took the umask's: a chmod'd eval.json or manifest changed mode on every rewrite); a new file and a link's
    replacement take the umask's."""
    from manifoldgd_fast.output import atomic_write_bytes

    path = tmp_path / "eval.json"
    path.write_bytes(b"{}")
    os.chmod(path, 0o751)  # execute bits: never what 0666 less a umask gives
    atomic_write_bytes(str(path), b'{"a": 1}')
    assert path.read_bytes() == b'{"a": 1}' and path.stat().st_mode & 0o7777 == 0o751
    target = tmp_path / "target.json"
    target.write_bytes(b"t")
    os.chmod(target, 0o751)
    os.symlink(target, tmp_path / "link.json")
    atomic_write_bytes(str(tmp_path / "link.json"), b"new")
    from manifoldgd_fast import output as O

    assert not (tmp_path / "link.json").is_symlink()
    assert (tmp_path / "link.json").stat().st_mode & 0o777 == 0o666 & ~O._UMASK
    assert target.read_bytes() == b"t" and target.stat().st_mode & 0o777 == 0o751


def test_every_file_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Temp + rename survives a power cut only if the temp's data reached the disk first: each atomic
    write (a file, a class folder, a model folder) fsyncs every file it renames into place, before the
    rename (without it a crash could leave a finished class of empty PNGs)."""
    import numpy as np
    import torch

    from manifoldgd_fast import output

    synced, unsynced = set(), []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        if not os.path.isdir(f"/proc/self/fd/{fd}"):   # (the folders' own fsyncs: the next test)
            synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def check(src):
        files = [os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs] if os.path.isdir(src) else [src]
        unsynced.extend(f for f in files if os.stat(f).st_ino not in synced)

    def replace(src, dst):
        check(src)
        real_replace(src, dst)

    def rename(src, dst):
        check(src)
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    output.atomic_write_bytes(str(tmp_path / "m.json"), b"{}")
    output.OutputWriter(str(tmp_path / "out")).write_class(
        "c", np.zeros((2, 4, 4, 3), np.uint8), torch.zeros(2, 4, 1, 1), {"n": 2})

    def fill(folder):
        for name in ("config.json", "sub/w.bin"):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"x")

    output.write_folder_atomically(str(tmp_path / "model"), fill)
    assert unsynced == []
    assert len(synced) == 1 + (2 + 1 + 1) + 2     # the file; 2 PNGs, the done mark, the latents; the model's 2


def test_every_rename_into_place_is_followed_by_its_folders_fsync(tmp_path, monkeypatch):
    """A rename is on disk only once its folder is fsynced: without it a power cut after a finished write can
    bring back the old file (an old manifest beside new classes) or lose a finished class's name. Each
    atomic write (a file, a class folder, a model folder, a training checkpoint) syncs the folder it renamed
    into, after the rename; a file system that refuses a folder's fsync (EINVAL: some FUSE mounts) is no error."""
    import errno

    import numpy as np
    import torch

    from manifoldgd_fast import output
    from manifoldgd_fast.training import save_checkpoint

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            events.append(("synced", os.fstat(fd).st_ino))
        real_fsync(fd)

    def moved(real):
        def move(src, dst):
            real(src, dst)
            events.append(("renamed", os.stat(os.path.dirname(os.path.abspath(dst))).st_ino))
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))
    output.atomic_write_bytes(str(tmp_path / "m.json"), b"{}")
    output.OutputWriter(str(tmp_path / "out")).write_class(
        "c", np.zeros((2, 4, 4, 3), np.uint8), torch.zeros(2, 4, 1, 1), {"n": 2})
    # (each write in a folder of its own: a later write's sync of the same folder would hide a missing one)
    output.write_folder_atomically(str(tmp_path / "models" / "model"),
                                   lambda d: open(os.path.join(d, "w.bin"), "wb").close())
    (tmp_path / "work").mkdir()
    save_checkpoint({"step": 1}, str(tmp_path / "work" / "ck.pt"))
    renames = [i for i, (what, _) in enumerate(events) if what == "renamed"]
    assert len(renames) == 5     # m.json, the latents file, the class folder, the model folder, the checkpoint
    for i in renames:
        assert ("synced", events[i][1]) in events[i + 1:], f"rename {i} of {events}: its folder never synced after"

    def refuses(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", refuses)
    output.atomic_write_bytes(str(tmp_path / "m.json"), b"[]")
    assert (tmp_path / "m.json").read_bytes() == b"[]"


def test_a_checkpoint_save_is_on_disk_before_its_rename_and_overwrites_a_killed_saves_temp(tmp_path, monkeypatch):
    """A training checkpoint (the fine-tune's and the eval nets', the demo's) is streamed to one temp name that
    the next save overwrites (a killed save of a multi-GB fine-tune leaves no file that nothing would remove),
    and fsynced before it replaces the last good checkpoint (a power cut could leave an empty one)."""
    import torch

    from manifoldgd_fast.training import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"a killed save's half")
    synced, real_fsync, real_replace = set(), os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.fstat(fd).st_ino), real_fsync(fd)))

    def replace(src, dst):
        assert os.stat(src).st_ino in synced, f"{src} renamed before its fsync"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint({"step": 3, "w": torch.arange(4.0)}, str(path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """The rename fails (a full disk, a read-only folder): the error names the file asked for (not the temp's
    random name), the old file is untouched and the temp is removed."""
    import errno

    from manifoldgd_fast.output import atomic_write_bytes

    target = tmp_path / "m.json"
    target.write_bytes(b"old")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", src)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(str(target), b"new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.json"]


def test_a_folder_written_atomically_is_all_old_or_all_new(tmp_path):
    """save_pretrained_folder (finetune's output, write_model's) fails half-way: the old folder stays whole and
    no temp is left; once it succeeds the folder holds only the new content, with the umask's modes."""
    from manifoldgd_fast.models import save_pretrained_folder
    from manifoldgd_fast.output import write_folder_atomically

    dest = tmp_path / "transformer"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    (dest / "stale.bin").write_text("old")

    class Dies:
        def save_pretrained(self, folder, safe_serialization):
            with open(os.path.join(folder, "config.json"), "w") as f:
                f.write("new")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_pretrained_folder(Dies(), str(dest))
    assert _tree(str(dest)) == {"config.json": b"old", "stale.bin": b"old"}
    assert sorted(os.listdir(tmp_path)) == ["transformer"]

    class Saves:
        def save_pretrained(self, folder, safe_serialization):
            assert safe_serialization
            os.makedirs(os.path.join(folder, "sub"))
            for name in ("config.json", "sub/w.safetensors"):
                with open(os.path.join(folder, name), "w") as f:
                    f.write("new")
            os.chmod(os.path.join(folder, "config.json"), 0o600)

    assert save_pretrained_folder(Saves(), str(dest)) == str(dest)
    assert _tree(str(dest)) == {"config.json": b"new", "sub/w.safetensors": b"new"}
    assert sorted(os.listdir(tmp_path)) == ["transformer"]
    from manifoldgd_fast.output import _UMASK
    assert (dest / "config.json").stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert (dest / "sub").stat().st_mode & 0o777 == 0o777 & ~_UMASK
    # a kill while the old folder is being deleted (slow for a DiT-XL's weights) leaves the new one in place
    import shutil as _shutil

    real_rmtree = _shutil.rmtree

    def killed(path, *a, **k):
        if ".transformer.old-" in str(path):
            raise SystemExit("killed")
        return real_rmtree(path, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_shutil, "rmtree", killed)
        with pytest.raises(SystemExit):
            write_folder_atomically(str(dest), lambda tmp: open(os.path.join(tmp, "newer"), "w").close())
    assert os.listdir(dest) == ["newer"]
    for n in os.listdir(tmp_path):
        if n.startswith(".transformer.old-"):
            real_rmtree(tmp_path / n)
    # a kill between the two renames leaves the old folder aside and none in place: the next call puts it back
    # first, so a failure of that call too still leaves the old one
    os.rename(dest, tmp_path / "saved")
    aside = tmp_path / ".transformer.old-k1"
    aside.mkdir()
    os.rename(tmp_path / "saved", aside / "transformer")
    with pytest.raises(OSError):
        save_pretrained_folder(Dies(), str(dest))
    assert os.listdir(dest) == ["newer"] and sorted(os.listdir(tmp_path)) == [".transformer.old-k1", "transformer"]
    os.rmdir(aside)
    # a killed call's temp (a kill skips `finally:`) is swept by the next call once an hour old
    stale = tmp_path / ".transformer.tmp-killed"
    stale.mkdir()
    os.utime(stale, (0, 0))
    write_folder_atomically(str(dest), lambda tmp: open(os.path.join(tmp, "x"), "w").close())
    assert sorted(os.listdir(tmp_path)) == ["transformer"] and os.listdir(dest) == ["x"]


def test_one_run_at_a_time_per_out_and_a_killed_runs_temps_are_swept(tiny_world, tmp_path, capsys):
    """A second run on an --out that another run holds stops with one line naming the holder and writes
    nothing; a rerun after a SIGKILL (the kernel dropped the lock; an unfinished class folder and
    atomic-write temp files are left) sweeps them and gives the bytes of an uninterrupted run."""
    from manifoldgd_fast.output import RunLock

    w = tiny_world
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = lambda o: _args(w, o, "--classes", "apple,banana", "--method", "dit")  # noqa: E731
    assert main(args(ref)) == 0
    from manifoldgd_fast import pipeline

    loaded = []
    with RunLock(str(out)), pytest.MonkeyPatch.context() as mp:      # another run is writing into out
        mp.setattr(pipeline, "prepare", lambda *a, **k: loaded.append(1) or pytest.fail("prepared"))
        line = _bad(w, tmp_path, args(out), capsys)
    assert f"is being written by another run (pid {os.getpid()} on " in line, line
    assert os.listdir(out) == [".lock"] and loaded == []            # refused at once: nothing loaded or encoded
    (out / ".apple.tmp-99999").mkdir()
    (out / ".apple.tmp-99999" / "0.png").write_bytes(b"half")
    (out / "latents").mkdir()
    (out / "latents" / ".tmp-k3j2").write_bytes(b"half")
    (out / ".tmp-manifest.json-k3j2").write_bytes(b"half")
    assert main(args(out)) == 0
    assert _digest(out) == _digest(ref)
    assert [e for d in (out, out / "latents") for e in os.listdir(d) if ".tmp-" in e] == []


def test_a_distill_leaves_eval_and_metrics_writes_into_its_out_alone(tiny_world, tmp_path, monkeypatch):
    """eval / metrics write into OUT without its run lock. A distill starting swept their temp files in flight
    (the evaluation then failed after training: "eval.json.partial: No such file or directory"), and each of its
    manifest writes put back the eval / metrics records read at its start, dropping one added meanwhile
    (found by a concurrency audit). Their temps go only once stale; the records are re-read under the
    manifest lock, which append_manifest holds too."""
    from manifoldgd_fast.eval.report import append_manifest
    from manifoldgd_fast.output import OutputWriter

    out = tmp_path / "out"
    args = _args(tiny_world, out, "--classes", "apple,banana", "--method", "dit")
    out.mkdir()
    fresh, old = out / ".tmp-eval.json.partial-ab12", out / ".tmp-eval.json-cd34"
    fresh.write_text("in flight")
    old.write_text("killed")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    real = OutputWriter.write_class

    def evaluated_meanwhile(self, name, *a, **k):
        if name == "banana":  # an evaluation of the first run's classes ends while this run samples
            assert append_manifest(str(out), "eval", {"nets": "meanwhile"}) is not None
        return real(self, name, *a, **k)

    monkeypatch.setattr(OutputWriter, "write_class", evaluated_meanwhile)
    assert main(args) == 0
    assert fresh.exists() and not old.exists()
    man = json.loads((out / "manifest.json").read_text())
    assert man["eval"] == [{"nets": "meanwhile"}], man.get("eval")


def test_eval_and_metrics_refuse_an_out_a_distill_is_writing(tmp_path):
    """eval --restrict-val and metrics read the classes a distill had finished by then and recorded their
    numbers in its manifest as the run's, exit 0 (audit): refused in one line naming the holder."""
    from manifoldgd_fast.errors import DataError
    from manifoldgd_fast.eval.metrics import compute_metrics
    from manifoldgd_fast.eval.protocol import evaluate
    from manifoldgd_fast.output import RunLock

    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    calls = (lambda: evaluate(str(out), str(tmp_path), restrict_val=True, epochs=1, device="cpu"),
             lambda: compute_metrics(str(out), str(tmp_path), device="cpu"))
    for name, shared in ((".lock", False), (".lock-shard-1-of-2", False)):   # a whole run; a --shard 1/2 process
        with RunLock(str(out), name=name, shared=shared):
            for call in calls:
                with pytest.raises(DataError, match=f"^--distilled {out} is being written by a distill run "
                                                    f"\\(pid {os.getpid()} on "):
                    call()
    # another reader's check at the same moment (a shared hold) is no writer: it was, with exclusive probes
    from manifoldgd_fast.eval.report import check_not_being_written
    from manifoldgd_fast.output import lock_is_held

    with RunLock(str(out), shared=True):
        check_not_being_written(str(out))
        assert not lock_is_held(str(out / ".lock"), exclusive_only=True) and lock_is_held(str(out / ".lock"))


def test_a_run_that_fails_before_writing_leaves_no_out_it_made(tiny_world, tmp_path, capsys):
    """OUT is locked first (so a second run stops at once); a run refused after that, having made OUT only
    to lock it, removes it again. An OUT that existed before stays, with its contents."""
    out = tmp_path / "new"
    _bad(tiny_world, tmp_path, _args(tiny_world, out, "--model", str(tmp_path / "nowhere")), capsys)
    assert not out.exists()
    out.mkdir()
    (out / ".keep").write_text("x")
    _bad(tiny_world, tmp_path, _args(tiny_world, out, "--model", str(tmp_path / "nowhere")), capsys)
    assert sorted(os.listdir(out)) == [".keep", ".lock"]


def test_a_class_finished_by_another_process_meanwhile_is_named_as_such(tmp_path):
    """Two runs' processes writing one OUT (e.g. --shard runs with different N): the second to finish a class
    is told so, not that a foreign folder is in the way."""
    import numpy as np

    from manifoldgd_fast.errors import DataError
    from manifoldgd_fast.output import OutputWriter

    w = OutputWriter(str(tmp_path / "out"))
    img = np.zeros((1, 4, 4, 3), np.uint8)
    w.write_class("c0", img, None, {})
    with pytest.raises(DataError, match=r"^class c0 was finished by another process while this one sampled it"):
        w.write_class("c0", img, None, {})
    (tmp_path / "out" / "c1").mkdir()
    with pytest.raises(DataError, match=r"c1 exists but is not a finished class of a run"):
        w.write_class("c1", img, None, {})


def test_run_lock_where_the_file_system_cannot_lock(tmp_path, monkeypatch, caplog):
    """flock unsupported (ENOLCK, as on Lustre without -o flock): a warning, and the run goes on."""
    import errno
    import fcntl

    from manifoldgd_fast.output import RunLock

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with caplog.at_level("WARNING"), RunLock(str(tmp_path / "o")) as lock:
        assert lock.fd is None
    assert "nothing stops two runs sharing this --out" in caplog.text


def test_manifest_names_the_weights_and_a_resume_with_other_weights_is_refused(tiny_world, tmp_path, capsys):
    """The manifest records the DiT's and the VAE's sha256 and the library versions (Pillow writes the PNGs);
    new weights written into the same model folder (same path: the fingerprint cannot see it) are refused."""
    from manifoldgd_fast.latents import weights_digest
    from manifoldgd_fast.models import build_dit, save_pretrained_folder, tiny_dit_config

    model = tmp_path / "model"
    shutil.copytree(tiny_world["model"], model)
    w = dict(tiny_world, model=str(model))
    out = tmp_path / "out"
    args = _args(w, out, "--classes", "apple", "--method", "dit")
    assert main(args) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["weights"]["model"] == weights_digest(build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=0))
    assert set(man["weights"]) == {"model", "vae"} and man["versions"]["pillow"]
    assert main(args) == 0                                               # same weights: resumes (nothing to do)
    save_pretrained_folder(build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1), str(model / "transformer"))
    line = _bad(w, tmp_path, args, capsys)
    assert "holds a run made with other model weights (sha256 " + man["weights"]["model"] in line, line


def test_a_resume_by_other_code_is_warned_and_recorded(tiny_world, tmp_path, capsys, monkeypatch):
    """A class finished by other code (an upgrade between a kill and its resume): the resume says so and each
    class records the code (a digest of the package's sources) and the libraries it was made with."""
    from manifoldgd_fast import pipeline

    out = tmp_path / "out"
    assert main(_args(tiny_world, out)) == 0
    man = json.loads((out / "manifest.json").read_text())
    made = man["classes"]["apple"]["numerics"]
    assert made["code"] == pipeline.code_digest() and made["libraries"] == pipeline.library_versions()
    shutil.rmtree(out / "banana")
    monkeypatch.setattr(pipeline, "code_digest", lambda: "0" * 16)
    capsys.readouterr()
    assert main(_args(tiny_world, out)) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "other code than its finished classes" in err, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["classes"]["banana"]["numerics"]["code"] == "0" * 16
    assert man["classes"]["apple"]["numerics"]["code"] == made["code"]


def test_prompt_options_under_a_dit_are_named_as_unused_and_change_nothing(tiny_world, tmp_path, capsys):
    """--negative-prompt / --class-names / --prompt-template reach only a Stable Diffusion model: given with a DiT
    they were dropped without a word; now one warning names them, and the run is the run without them."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_args(tiny_world, ref, "--classes", "apple")) == 0
    assert "not used" not in capsys.readouterr().err
    assert main(_args(tiny_world, out, "--classes", "apple", "--negative-prompt", "blurry",
                      "--class-names", "apple=an apple")) == 0
    err = capsys.readouterr().err
    assert "--negative-prompt and --class-names not used: a DiT is conditioned on class labels" in err, err
    assert "--prompt-template" not in err
    assert _digest(out) == _digest(ref)


def test_a_resume_into_another_run_is_refused_before_any_encoding(tiny_world, tmp_path, capsys, monkeypatch):
    """--classes with one more class than OUT's run: refused before that class's latents are encoded
    (the cache was filled first, then the fingerprint compared)."""
    from manifoldgd_fast import latents

    out = tmp_path / "out"
    cache = tmp_path / "own-cache"             # not the shared one: the new class must not be cached yet
    args = ["--cache-dir", str(cache), "--method", "dit"]
    assert main(_args(tiny_world, out, "--classes", "apple", *args)) == 0
    monkeypatch.setattr(latents, "cache_latents", lambda *a, **k: pytest.fail("encoded before the refusal"))
    line = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--classes", "apple,banana", *args), capsys)
    assert "holds a run with other parameters" in line or "other data" in line, line


@pytest.mark.parametrize("change, method", [("rewrite", "manifoldgd"), ("touch", "mgd3"), ("rewrite", "dit")])
def test_a_resume_refuses_finished_classes_whose_images_changed(tiny_world, tmp_path, capsys, monkeypatch, change,
                                                                method):
    """A finished class's done mark keeps the digest of its image files' sizes and times as distilled (the
    latent cache's rule for a stale class): a resume after an image of a finished class was rewritten (or
    only touched) stops in one line naming the class and the way out, before encoding, with nothing
    written (it kept the class made from the old images, silently); deleting the class as it says
    distils it again from the new images. The digest stays out of the manifest. Plain DiT sampling
    never reads the class's latents: its resume goes on."""
    from manifoldgd_fast import latents

    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    world = dict(tiny_world, data=str(data))
    out = tmp_path / "out"
    args = ["--cache-dir", str(tmp_path / "cache"), "--method", method]
    assert main(_args(world, out, *args)) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert "data_stamps" not in man["classes"]["apple"]
    shutil.rmtree(out / "cherry")                       # a killed run: one class to do
    image = sorted((data / "apple").iterdir())[0]
    st = image.stat()
    if change == "rewrite":
        other = sorted((data / "banana").iterdir())[0].read_bytes()
        image.write_bytes(other)
    else:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    before = _digest(out)
    if method == "dit":
        assert main(_args(world, out, *args)) == 0
        assert {k: v for k, v in _digest(out).items() if not k.startswith("cherry")} == before
        return
    monkeypatch.setattr(latents, "cache_latents", lambda *a, **k: pytest.fail("encoded before the refusal"))
    line = _bad(world, tmp_path, _args(world, out, *args), capsys)
    assert line == (f"manifoldgd-fast: error: --out {out}: class apple was distilled from other images than "
                    f"{data / 'apple'} holds now (a file's size or modification time changed since); delete "
                    f"{out / 'apple'} to distill it again from them, or use a new --out")
    assert _digest(out) == before and not (out / "cherry").exists()
    monkeypatch.undo()
    shutil.rmtree(out / "apple")
    assert main(_args(world, out, *args)) == 0
    assert (out / "apple" / ".complete").exists() and (out / "cherry" / ".complete").exists()
    if change == "rewrite":  # distilled from the new latents now
        assert _digest(out)["latents/apple.safetensors"] != before["latents/apple.safetensors"]


@pytest.mark.parametrize("damage, why", [
    ("rm 0/1.png", "banana/1.png is missing"),
    ("cp 0/0.png 0/1.png", "banana/1.png is not the file the run wrote (its sha256 differs)"),
    ("flip 0/0.png", "banana/0.png is not the file the run wrote (its sha256 differs)"),
    ("truncate 0/1.png", "banana/1.png is not the file the run wrote (its sha256 differs)"),
    ("cp 0/0.png 0/2.png", "banana/2.png is not one of the run's images"),
    ("rm latents", "latents/banana.safetensors is missing"),
    ("flip latents", "latents/banana.safetensors is not the file the run wrote (its sha256 differs)"),
    ("mark {broken", "its .complete cannot be read (JSONDecodeError)"),
    ("mark []", "its .complete is not the record a run writes"),
])
def test_a_resume_refuses_finished_classes_changed_since_they_were_written(tiny_world, tmp_path, capsys, monkeypatch,
                                                                           damage, why):
    """A finished class's done mark lists the sha256 of its images and latents: a rerun finds an image or
    latents file deleted, replaced, bit-flipped, truncated or added (or the mark itself damaged) and stops
    in one line naming the file and the way out, before encoding and with nothing written; a class that is
    deleted as it says is sampled again, to the bytes of the uninterrupted run."""
    from manifoldgd_fast import latents
    from manifoldgd_fast.output import DONE_MARK

    out = tmp_path / "out"
    args = _args(tiny_world, out, "--classes", "apple,banana", "--method", "dit")
    assert main(args) == 0
    ref = _digest(out)
    manifest = (out / "manifest.json").read_bytes()
    what, _, where = damage.partition(" ")
    if what == "mark":
        (out / "banana" / DONE_MARK).write_text(where)
    elif where == "latents":
        lat = out / "latents" / "banana.safetensors"
        if what == "rm":
            lat.unlink()
        else:
            b = bytearray(lat.read_bytes())
            b[-1] ^= 1
            lat.write_bytes(bytes(b))
    else:
        src, dst = (where.split() + [None])[:2] if what == "cp" else (where, None)
        src = out / "banana" / src.split("/")[1]
        if what == "rm":
            src.unlink()
        elif what == "cp":
            shutil.copyfile(src, out / "banana" / dst.split("/")[1])
        elif what == "flip":
            b = bytearray(src.read_bytes())
            b[len(b) // 2] ^= 0x10
            src.write_bytes(bytes(b))
        else:
            src.write_bytes(src.read_bytes()[:100])
    unlocked = lambda: {k: v for k, v in _tree(out).items() if k != ".lock"}  # noqa: E731 (its text: pid, time)
    before = unlocked()
    with monkeypatch.context() as mp:
        mp.setattr(latents, "cache_latents", lambda *a, **k: pytest.fail("encoded before the refusal"))
        line = _bad(tiny_world, tmp_path, args, capsys)
    assert f"finished class banana is damaged: {why}" in line, line
    assert f"delete {out / 'banana'} to sample it again" in line
    assert unlocked() == before and (out / "manifest.json").read_bytes() == manifest
    shutil.rmtree(out / "banana")
    assert main(args) == 0
    assert _digest(out) == ref


def test_the_manifest_keeps_the_stats_not_the_file_digests(tiny_world, tmp_path):
    """The digests live in each class's done mark only (the manifest stays small at ImageNet scale)."""
    from manifoldgd_fast.output import DONE_MARK

    out = tmp_path / "out"
    assert main(_args(tiny_world, out, "--classes", "apple", "--method", "dit")) == 0
    mark = json.loads((out / "apple" / DONE_MARK).read_text())
    assert sorted(mark["files"]) == ["0.png", "1.png"] and len(mark["latents_sha256"]) == 64
    cls = json.loads((out / "manifest.json").read_text())["classes"]["apple"]
    assert "files" not in cls and "latents_sha256" not in cls and cls["status"] == "done"


def test_contact_sheet_names_an_unreadable_image(tmp_path):
    """Classes finished before done marks listed their files are not compared by a resume: the contact sheet
    then meets a damaged PNG, and says which (Pillow's error names no file); other PNG names are not the run's."""
    import numpy as np

    from manifoldgd_fast.errors import DataError
    from manifoldgd_fast.output import encode_png
    from manifoldgd_fast.pipeline import write_contact_sheet

    (tmp_path / "a").mkdir()
    for i in range(2):
        noise = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)   # PNG bytes past 100
        (tmp_path / "a" / f"{i}.png").write_bytes(encode_png(noise))
    (tmp_path / "a" / "notes.png").write_bytes(b"not one of the run's")
    assert write_contact_sheet(str(tmp_path), ["a"], tile=4) == str(tmp_path / "contact_sheet.png")
    (tmp_path / "a" / "1.png").write_bytes((tmp_path / "a" / "1.png").read_bytes()[:100])
    with pytest.raises(DataError, match=r"contact sheet: cannot read .*a/1\.png \(.*\); delete .*a to sample"):
        write_contact_sheet(str(tmp_path), ["a"], tile=4)


# ---------------------------------------------------------------------------- found by a mutation audit (2026-12-06)
def _finished(tmp_path, n=2):
    import numpy as np
    import torch

    from manifoldgd_fast.output import OutputWriter

    w = OutputWriter(str(tmp_path / "out"))
    w.write_class("c", np.random.default_rng(0).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
                  torch.zeros(n, 4, 2, 2), {})
    return w


def test_damaged_names_the_first_image_in_numeric_order_and_skips_hidden_files(tmp_path):
    w = _finished(tmp_path, 11)
    (tmp_path / "out" / "c" / "._0.png").write_bytes(b"AppleDouble")    # macOS's: not one of the images
    assert w.damaged("c") is None
    os.remove(w.class_dir("c") + "/2.png")
    os.remove(w.class_dir("c") + "/10.png")
    assert w.damaged("c") == "c/2.png is missing"


def test_damaged_names_an_added_upper_case_image_and_an_unreadable_one(tmp_path):
    w = _finished(tmp_path)
    shutil.copy(w.class_dir("c") + "/0.png", w.class_dir("c") + "/extra.PNG")
    assert w.damaged("c") == "c/extra.PNG is not one of the run's images"
    os.remove(w.class_dir("c") + "/extra.PNG")
    os.remove(w.class_dir("c") + "/0.png")
    os.mkdir(w.class_dir("c") + "/0.png")                                 # a folder in its place
    assert w.damaged("c") == "c/0.png cannot be read (Is a directory)"
    from manifoldgd_fast.errors import DataError
    with pytest.raises(DataError, match=r"finished class c is damaged: c/0\.png cannot be read \(Is a directory\)"):
        w.check_finished(["c"])


def test_a_folder_named_like_the_done_mark_is_no_done_mark(tmp_path):
    from manifoldgd_fast.output import class_done

    (tmp_path / "c" / ".complete").mkdir(parents=True)
    assert not class_done(str(tmp_path), "c")


def test_a_file_by_a_class_temp_folders_name(tmp_path):
    """A file named like a class temp folder is not swept as one (not a folder a run made), and the class's
    own write replaces it (it failed with NotADirectoryError)."""
    import numpy as np

    from manifoldgd_fast.output import OutputWriter

    w = OutputWriter(str(tmp_path))
    (tmp_path / ".notes.tmp-1").write_text("mine")
    w.sweep_temps()
    assert (tmp_path / ".notes.tmp-1").exists()
    (tmp_path / f".c.tmp-{os.getpid()}").write_text("in the way")
    w.write_class("c", np.zeros((1, 4, 4, 3), np.uint8), None, {})
    assert sorted(os.listdir(tmp_path)) == [".notes.tmp-1", "c"]


def test_a_shard_sweeps_only_its_own_temps_whatever_their_length(tmp_path, monkeypatch):
    """A latents temp carries its whole file name (a class name up to 200 bytes), so a shard knows it as its
    own; of OUT's own files a shard sweeps only those it names."""
    from manifoldgd_fast import output as O

    for name in ("apple", "x" * 200):
        made, real = [], O.tempfile.mkstemp
        monkeypatch.setattr(O.tempfile, "mkstemp", lambda **k: made.append(real(**k)) or made[-1])
        O.atomic_write_bytes(str(tmp_path / "latents" / f"{name}.safetensors"), b"x")
        monkeypatch.undo()
        assert O._temp_is_ours(os.path.basename(made[0][1]), False, False, {name}, ())
        assert not O._temp_is_ours(os.path.basename(made[0][1]), False, False, {name + "x"}, ())
    w = O.OutputWriter(str(tmp_path / "top"))
    (tmp_path / "top" / ".tmp-manifest.json.bak-x1").write_text("x")
    (tmp_path / "top" / ".tmp-manifest.json-x2").write_text("x")
    w.sweep_temps(classes=(), files=("manifest.json",))
    assert os.listdir(tmp_path / "top") == [".tmp-manifest.json.bak-x1"]


def test_options_at_their_defaults_leave_the_fingerprint_as_before_they_existed():
    """A run with every later option at its default (and prompts under DiT, no GMM, no CGS) hashes none of them,
    so that a run made before they existed resumes; set, each counts. Unresolved (the API's fingerprint of a
    DistillConfig) as resolved: cgs None with --method manifoldgd is no CGS, its step sizes count for nothing."""
    from manifoldgd_fast.config import DistillConfig, fingerprint, fingerprint_fields

    later = {"compile", "attention", "dit_impl", "time_embedding", "neighbourhood_dtype", "backbone",
             "prompt_template", "negative_prompt", "class_names", "output_size", "gmm_iters", "cgs_steps",
             "kmeans_medoid"}
    for cfg in (DistillConfig(), DistillConfig().resolve(3, "cpu")):
        assert not later & set(fingerprint_fields(cfg)), later & set(fingerprint_fields(cfg))
    assert fingerprint(DistillConfig(eta_dm=0.5, eta_dpp=2.0)) == fingerprint(DistillConfig())
    given = dict(compile="default", attention="math", dit_impl="fused", time_embedding="original",
                 neighbourhood_dtype="bfloat16", output_size=64)
    for name, value in given.items():
        paper = {"formulation": "paper"} if name == "neighbourhood_dtype" else {}
        assert fingerprint_fields(DistillConfig(**{name: value}, **paper))[name] == value, name
    # the patch rows' dtype is the paper formulation's alone: under the official one, MGD3 or CGS a resume with
    # another --neighbourhood-dtype is the same run (it was refused)
    for other in ({}, {"method": "mgd3", "formulation": "paper"}, {"method": "cgs", "formulation": "paper"}):
        assert fingerprint(DistillConfig(neighbourhood_dtype="bfloat16", **other)) == fingerprint(DistillConfig(**other))


def test_map_files_count_by_their_contents_and_local_models_by_their_real_path(tmp_path, monkeypatch):
    """An edited --label-map (or --class-names) file under the same path is another run, the same map elsewhere
    the same run; a local --model / --vae given relatively, through a link, or absolutely is one run."""
    from manifoldgd_fast.config import DistillConfig, fingerprint

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"apple": 1}')
    b.write_text('{"apple": 1}')
    for field, extra in (("label_map", {}), ("class_names", {"backbone": "sd"})):
        fp_a = fingerprint(DistillConfig(**{field: str(a)}, **extra))
        assert fingerprint(DistillConfig(**{field: str(b)}, **extra)) == fp_a, field
        b.write_text('{"apple": 2}')
        assert fingerprint(DistillConfig(**{field: str(b)}, **extra)) != fp_a, field
        b.write_text('{"apple": 1}')
    (tmp_path / "models" / "dit").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    for field in ("model", "vae"):
        fps = {fingerprint(DistillConfig(**{field: p})) for p in ("models/dit", str(tmp_path / "models" / "dit"),
                                                                   "link/dit", "./models/../models/dit")}
        assert len(fps) == 1, field
        assert fingerprint(DistillConfig(**{field: "models"})) not in fps


# ---------------------------------------------------------------------------- found by an audit (2026-12-07)
def test_an_atomic_write_to_a_name_that_is_not_utf8(tmp_path):
    """A path given on the command line (`profile --json`) may hold bytes that are not UTF-8
    (Python hands them over as surrogate escapes): it is written, with no temp left (the temp's name took
    the target's with a strict encode, and the write stopped with a UnicodeEncodeError traceback)."""
    from manifoldgd_fast.output import atomic_write_text

    target = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.json"))
    try:
        open(target, "w").close()
        os.unlink(target)
    except OSError as e:  # a file system that only takes UTF-8 names cannot hold such a file
        pytest.skip(f"this file system refuses non-UTF-8 names ({e})")
    atomic_write_text(target, "{}")
    assert os.listdir(os.fsencode(str(tmp_path))) == [b"caf\xe9.json"]
    assert open(target, "rb").read() == b"{}"


def test_a_class_write_that_fails_names_the_class_folder_and_leaves_no_temp(tmp_path, monkeypatch):
    """A full disk while a class's PNGs are written (fsync / write() name no file), or a failed rename (it names
    the temp): the error names the class folder asked for, and the half-written temp folder is removed (it was left, filling the disk further,
    and the error named no file: the CLI's line said only "No space left on device"). Nothing of the
    finished classes is touched."""
    import errno

    import numpy as np

    from manifoldgd_fast.output import OutputWriter

    w = OutputWriter(str(tmp_path / "out"))
    img = np.zeros((3, 4, 4, 3), np.uint8)
    w.write_class("done", img, None, {})
    before = _tree(str(tmp_path / "out"))
    calls, real = [], os.fsync

    def full(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        w.write_class("c", img, None, {})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out" / "c")
    assert sorted(os.listdir(tmp_path / "out")) == ["done"] and _tree(str(tmp_path / "out")) == before
    monkeypatch.undo()

    def fails(src, dst):  # the class folder's rename: an error that names the temp
        raise OSError(errno.EIO, "Input/output error", src, dst)

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError) as e:
        w.write_class("c", img, None, {})
    assert e.value.errno == errno.EIO and e.value.filename == str(tmp_path / "out" / "c")
    assert sorted(os.listdir(tmp_path / "out")) == ["done"] and _tree(str(tmp_path / "out")) == before


def test_a_dangling_link_in_a_class_folders_place_is_not_replaced(tmp_path):
    """A link by a class's name whose target is gone is no finished class: refused like any foreign entry
    (os.path.exists said nothing was there; the rename then failed with NotADirectoryError naming the temp,
    which stayed behind); the link is kept."""
    import numpy as np

    from manifoldgd_fast.errors import DataError
    from manifoldgd_fast.output import OutputWriter

    w = OutputWriter(str(tmp_path / "out"))
    os.symlink(str(tmp_path / "gone"), tmp_path / "out" / "c")
    with pytest.raises(DataError, match=r"out/c exists but is not a finished class of a run"):
        w.write_class("c", np.zeros((1, 4, 4, 3), np.uint8), None, {})
    assert os.listdir(tmp_path / "out") == ["c"] and os.readlink(tmp_path / "out" / "c") == str(tmp_path / "gone")


def test_a_lock_whose_holder_cannot_be_written_is_named_and_released(tmp_path, monkeypatch):
    """A full disk when the lock file is given the holder's words: the error names the lock file (write() names
    none: the CLI's line said only "No space left on device"), and the lock is released at once."""
    import errno

    from manifoldgd_fast.output import RunLock, lock_is_held

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as e:
        RunLock(str(tmp_path)).__enter__()
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / ".lock")
    assert not lock_is_held(str(tmp_path / ".lock"))


# ---------------------------------------------------------------------------- found by a mutation audit (2026-12-07)
def test_atomic_writes_take_the_umask_read_at_import(tmp_path, monkeypatch):
    """The modes come from the umask (read once, at import), not from a fixed 0644 / 0755: a 077 umask gives
    owner-only files and folders."""
    from manifoldgd_fast import output as O

    monkeypatch.setattr(O, "_UMASK", 0o077)
    O.atomic_write_bytes(str(tmp_path / "m.json"), b"{}")

    def fill(folder):
        os.mkdir(os.path.join(folder, "sub"))
        open(os.path.join(folder, "sub", "w.bin"), "wb").close()

    O.write_folder_atomically(str(tmp_path / "model"), fill)
    modes = {p: os.stat(tmp_path / p).st_mode & 0o777 for p in ("m.json", "model", "model/sub", "model/sub/w.bin")}
    assert modes == {"m.json": 0o600, "model": 0o700, "model/sub": 0o700, "model/sub/w.bin": 0o600}


def test_what_is_fsynced_is_the_whole_file(tmp_path, monkeypatch):
    """Each file is flushed before its fsync: the fsync sees every byte (a buffered tail would reach the disk
    only at close, after the fsync)."""
    import numpy as np
    import torch

    from manifoldgd_fast import output as O

    seen, real = {}, os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if not os.path.isdir(f"/proc/self/fd/{fd}"):   # (the folders' fsyncs after their renames)
            seen[st.st_ino] = st.st_size
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    O.atomic_write_bytes(str(tmp_path / "m.json"), b"{}")
    O.OutputWriter(str(tmp_path / "out")).write_class("c", np.zeros((2, 4, 4, 3), np.uint8), torch.zeros(2, 4, 1, 1), {})
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 5 and {os.stat(f).st_ino: os.stat(f).st_size for f in files} == seen


def test_a_temp_that_cannot_be_made_is_named_by_the_file_asked_for(tmp_path, monkeypatch):
    """mkstemp fails (a read-only folder): the error names the file asked for, not the temp's random name."""
    import errno

    from manifoldgd_fast import output as O

    def refuse(prefix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "k3j2"))

    monkeypatch.setattr(O.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as e:
        O.atomic_write_bytes(str(tmp_path / "m.json"), b"{}")
    assert e.value.filename == str(tmp_path / "m.json") and e.value.errno == errno.EACCES


def test_sweep_stale_temps_removes_only_old_temps_of_its_prefixes(tmp_path):
    """An hour untouched: a temp file, a temp folder and a link by a temp's name (unlinked, its target kept) are
    removed and returned; a fresh temp (a write in flight, half an hour in) and other names of any age stay."""
    from manifoldgd_fast.output import sweep_stale_temps

    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.bin").write_bytes(b"x")
    d = tmp_path / "d"
    d.mkdir()
    (d / ".tmp-file").write_bytes(b"half")
    (d / ".tmp-dir").mkdir()
    (d / ".tmp-dir" / "0.png").write_bytes(b"half")
    os.symlink(target, d / ".tmp-link")
    (d / ".tmp-fresh").write_bytes(b"half")
    (d / "notes.txt").write_bytes(b"mine")
    now = __import__("time").time()
    for name in (".tmp-file", ".tmp-dir", "notes.txt"):
        os.utime(d / name, (0, 0))
    os.utime(d / ".tmp-link", (0, 0), follow_symlinks=False)
    os.utime(d / ".tmp-fresh", (now - 1800, now - 1800))
    removed = sweep_stale_temps(str(d))
    assert sorted(removed) == [str(d / n) for n in (".tmp-dir", ".tmp-file", ".tmp-link")]
    assert sorted(os.listdir(d)) == [".tmp-fresh", "notes.txt"] and os.listdir(target) == ["keep.bin"]


def test_a_folder_whose_rename_fails_keeps_the_old_one_in_place(tmp_path, monkeypatch):
    """The new folder cannot be renamed into place: the old one, moved aside, is put back (and its aside removed);
    a stale aside a kill left beside a folder in place is swept."""
    import errno

    from manifoldgd_fast.output import write_folder_atomically

    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "w.bin").write_bytes(b"old")
    stale = tmp_path / ".model.old-k1"
    (stale / "model").mkdir(parents=True)
    os.utime(stale, (0, 0))
    real = os.rename

    def refuse(src, dst):
        if os.path.basename(str(src)).startswith(".model.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link", src)
        real(src, dst)

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OSError):
        write_folder_atomically(str(dest), lambda tmp: open(os.path.join(tmp, "w.bin"), "wb").close())
    assert os.listdir(tmp_path) == ["model"] and (dest / "w.bin").read_bytes() == b"old"


def test_a_class_temp_left_by_a_process_of_the_same_pid_is_replaced(tmp_path):
    """A killed process's temp folder under this pid (pids are reused) holds a half-written class: it is removed
    before the class is written (makedirs failed on it), none of its files reaches the class."""
    import numpy as np

    from manifoldgd_fast.output import OutputWriter

    w = OutputWriter(str(tmp_path))
    left = tmp_path / f".c.tmp-{os.getpid()}"
    left.mkdir()
    (left / "7.png").write_bytes(b"half")
    w.write_class("c", np.zeros((1, 4, 4, 3), np.uint8), None, {})
    assert os.listdir(tmp_path) == ["c"] and sorted(os.listdir(tmp_path / "c")) == [".complete", "0.png"]


def test_the_latents_file_names_its_class(tmp_path):
    from safetensors import safe_open

    w = _finished(tmp_path)
    with safe_open(os.path.join(w.out, "latents", "c.safetensors"), "pt") as f:
        assert f.metadata() == {"class": "c"} and list(f.keys()) == ["latents"]


def test_done_marks_other_than_a_runs(tmp_path):
    """A done mark without files (a class finished before marks listed them) is not compared; one whose files
    are no mapping is not a run's record; read_class_info refuses a mark that is not a JSON object."""
    from manifoldgd_fast.errors import DataError
    from manifoldgd_fast.output import DONE_MARK

    w = _finished(tmp_path)
    mark = tmp_path / "out" / "c" / DONE_MARK
    mark.write_text(json.dumps({"label": 0}))
    (tmp_path / "out" / "c" / "0.png").unlink()
    assert w.damaged("c") is None and w.read_class_info("c") == {"label": 0}
    mark.write_text(json.dumps({"files": ["0.png"]}))
    assert w.damaged("c") == f"its {DONE_MARK} is not the record a run writes"
    mark.write_text("[]")
    with pytest.raises(DataError, match=r"c/\.complete is not the record a run writes; delete .*/c and rerun"):
        w.read_class_info("c")
    mark.write_bytes(b"\xff{")                     # was a UnicodeDecodeError traceback
    with pytest.raises(DataError, match=r"c/\.complete cannot be read \(UnicodeDecodeError\); delete"):
        w.read_class_info("c")


def test_a_whole_run_and_a_shard_sweep_their_modes_and_odd_named_classes_temps(tmp_path):
    """The sweep covers OUT/modes too (its temps untouched for STALE_TEMP_S: the `modes` command writes there
    without the lock, and a fresh temp may be its write in flight), returns what it removed, and knows a class's
    leftovers by the class's whole name, even one holding ".tmp-" or ".safetensors-"."""
    from manifoldgd_fast.output import STALE_TEMP_S, OutputWriter

    w = OutputWriter(str(tmp_path))
    odd = ("a.tmp-b", "v.safetensors-2")
    for c in odd:
        (tmp_path / f".{c}.tmp-99").mkdir()
    old = time.time() - STALE_TEMP_S - 60
    for sub in ("latents", "modes"):
        (tmp_path / sub).mkdir()
        for c in (*odd, "other"):
            (tmp_path / sub / f".tmp-{c}.safetensors-x1").write_bytes(b"half")
            if sub == "modes":
                os.utime(tmp_path / sub / f".tmp-{c}.safetensors-x1", (old, old))
    (tmp_path / "modes" / ".tmp-a.tmp-b.safetensors-fresh").write_bytes(b"in flight")
    (tmp_path / ".other.tmp-99").mkdir()
    removed = w.sweep_temps(classes=odd)
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == sorted(
        [f".{c}.tmp-99" for c in odd] + [f"{s}/.tmp-{c}.safetensors-x1" for s in ("latents", "modes") for c in odd])
    assert sorted(removed) == sorted(set(removed))
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-99", "latents", "modes"]
    assert len(w.sweep_temps()) == 3
    assert sorted(os.listdir(tmp_path / "modes")) == [".tmp-a.tmp-b.safetensors-fresh"]


def test_the_sweep_unlinks_a_temp_that_is_a_link_to_a_folder(tmp_path):
    """A leftover named as a temp that is a link to a folder is unlinked, its target kept (rmtree refuses a link,
    and with ignore_errors the link stayed while the sweep said it was removed)."""
    from manifoldgd_fast.output import OutputWriter

    out, target = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    target.mkdir()
    (target / "keep.png").write_bytes(b"x")
    os.symlink(target, out / ".tmp-manifest.json-x1")
    os.symlink(target, out / ".apple.tmp-7")
    removed = OutputWriter(str(out)).sweep_temps()
    assert sorted(os.path.basename(p) for p in removed) == [".apple.tmp-7", ".tmp-manifest.json-x1"]
    assert os.listdir(out) == [] and os.listdir(target) == ["keep.png"]


def test_run_lock_says_who_holds_it_and_leaks_nothing(tmp_path):
    """Taking the lock replaces what the file said before (a longer text left its tail behind); a refusal closes
    its descriptor; leaving releases the lock."""
    from manifoldgd_fast.errors import DataError
    from manifoldgd_fast.output import RunLock, lock_is_held

    out = tmp_path / "o"
    out.mkdir()
    (out / ".lock").write_text("x" * 300)
    with RunLock(str(out)):
        text = (out / ".lock").read_text()
        assert text.startswith(f"pid {os.getpid()} on ") and text.endswith("\n") and text.count("\n") == 1, text
        fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        with pytest.raises(DataError, match=r"is being written by another run \(pid "):
            RunLock(str(out)).__enter__()
        if fds is not None:
            assert len(os.listdir("/proc/self/fd")) == fds
    assert not lock_is_held(str(out / ".lock"))
    with RunLock(str(out), shared=True):
        assert (out / ".lock").read_text() == "processes of a --shard K/N run\n"


def test_resize_images_is_pils_bicubic_and_keeps_what_needs_none():
    """--output-size: each image through PIL's bicubic resize (no other filter); an image already at the size,
    or no size, comes back as it is (the same array); no images give an empty batch of the size."""
    import numpy as np
    from PIL import Image

    from manifoldgd_fast.output import resize_images

    imgs = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(i).resize((5, 5), resample=Image.BICUBIC)) for i in imgs])
    assert np.array_equal(resize_images(imgs, 5), want)
    assert resize_images(imgs, 8) is imgs and resize_images(imgs, None) is imgs
    assert resize_images(imgs[:0], 5).shape == (0, 5, 5, 3)


def test_png_settings_are_fixed():
    """encode_png keeps the released runs' settings (zlib level 6: the header 78 9c), so the same pixels give the
    same bytes whatever Pillow's default."""
    import numpy as np

    from manifoldgd_fast.output import encode_png

    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    png = encode_png(img)
    at = png.index(b"IDAT")
    assert png[at + 4:at + 6] == b"\x78\x9c"


def test_a_file_system_that_refuses_chmod_still_takes_atomic_writes(tmp_path, monkeypatch):
    """Some CIFS / FUSE mounts refuse chmod (EPERM, ENOTSUP): the write goes on with the mode the file system
    gave (the whole write failed, and atomic_write_bytes leaked its descriptor). Another error still stops it,
    named by the file asked for, with no temp and no descriptor left."""
    import errno

    from manifoldgd_fast.output import atomic_write_bytes, write_folder_atomically

    def refuse(code):
        def chmod(*a, **k):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(os, "fchmod", chmod)
        monkeypatch.setattr(os, "chmod", chmod)

    for code in (errno.EPERM, errno.ENOTSUP):
        refuse(code)
        atomic_write_bytes(str(tmp_path / "a.json"), b"{}")
        write_folder_atomically(str(tmp_path / "f"), lambda t: open(os.path.join(t, "w.bin"), "wb").write(b"w"))
        assert (tmp_path / "a.json").read_bytes() == b"{}" and (tmp_path / "f" / "w.bin").read_bytes() == b"w"
    refuse(errno.EIO)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match=r"Input/output error: '.*b\.json'"):
        atomic_write_bytes(str(tmp_path / "b.json"), b"{}")
    assert len(os.listdir("/proc/self/fd")) == fds
    assert sorted(os.listdir(tmp_path)) == ["a.json", "f"]


def test_write_folder_atomically_leaves_the_mode_of_a_links_target(tmp_path):
    """A link the fill makes is not chmodded: chmod follows it, and gave the target (outside the folder) the
    umask's mode."""
    from manifoldgd_fast.output import write_folder_atomically

    target = tmp_path / "secret.bin"
    target.write_bytes(b"s")
    os.chmod(target, 0o600)

    def fill(t):
        (open(os.path.join(t, "w.bin"), "wb")).close()
        os.symlink(target, os.path.join(t, "link.bin"))

    write_folder_atomically(str(tmp_path / "f"), fill)
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert os.readlink(tmp_path / "f" / "link.bin") == str(target)


# ---------------------------------------------------------------------------- found by a CLI audit (2026-12-07)
@pytest.mark.parametrize("command", ["eval", "metrics"])
def test_a_report_is_never_written_over_a_manifest_an_image_or_an_input(command, tmp_path, capsys):
    """eval / metrics --out-json (and profile --json) wrote their JSON over whatever the path held: a distilled
    run's manifest.json, a distilled image, a real training image inside --real / --real-val. Each is refused
    in one line before any work, and the file is left as it was."""
    from conftest import make_image_folder

    real, dist = tmp_path / "real", tmp_path / "dist"
    make_image_folder(str(real), ["ant", "bee"], 3, size=8)
    make_image_folder(str(dist), ["ant", "bee"], 2, size=8)
    (dist / "manifest.json").write_text('{"tool": "manifoldgd-fast"}')
    real_flag = "--real-val" if command == "eval" else "--real"
    base = [command, "--distilled", str(dist), real_flag, str(real), "--device", "cpu", "--no-progress", "--size", "8"]
    base += ["--epochs", "1", "--seeds", "1", "--nets", "convnet6"] if command == "eval" else ["--encoder-epochs", "1"]
    victims = {str(dist / "manifest.json"): "a distilled run's manifest.json",
               str(dist / "ant" / "img000.png"): "an existing image",
               str(real / "bee" / "img000.png"): f"inside {real_flag} {real}",
               str(real / "new.json"): f"inside {real_flag} {real}"}
    for path, why in victims.items():
        before = open(path, "rb").read() if os.path.exists(path) else None
        assert main(base + ["--out-json", path]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"manifoldgd-fast: error: --out-json {path}: {why}") and "\n" not in line, line
        assert (open(path, "rb").read() if os.path.exists(path) else None) == before


def test_profile_json_is_refused_over_an_input_or_the_out_folder(tmp_path, capsys):
    from conftest import make_image_folder

    from manifoldgd_fast.config import check_out_file
    from manifoldgd_fast.errors import ConfigError

    data = tmp_path / "data"
    make_image_folder(str(data), ["ant"], 2, size=8)
    with pytest.raises(ConfigError, match=r"^--json .*img000\.png: inside --data .*, which is read, never written"):
        check_out_file(str(data / "ant" / "img000.png"), "--json", inputs={"--data": str(data)})
    check_out_file(str(tmp_path / "p.json"), "--json", inputs={"--data": str(data), "--none": None})
    # what is no path is passed over: an in-memory module, a class count (2 was taken as file descriptor 2,
    # which exists: realpath(2) was a TypeError), a list of class names
    check_out_file(str(tmp_path / "p.json"), "--json", inputs={"--teacher": torch.nn.Linear(1, 1), "--classes": 2,
                                                               "--class-names": ["ant"]})
    link = tmp_path / "link.json"
    os.symlink(data / "ant" / "img000.png", link)   # through a link: what it points at counts
    with pytest.raises(ConfigError, match="inside --data"):
        check_out_file(str(link), "--json", inputs={"--data": str(data)})
    out = tmp_path / "P"
    assert main(["profile", "--data", str(data), "--out", str(out), "--json", str(out), "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"manifoldgd-fast: error: --json {out}: inside --out {out}, the folder the profiled classes are "
                    "written to; give a file elsewhere"), line
    assert not out.exists()


def test_a_resume_with_another_cpu_thread_count_is_warned_and_recorded(tiny_world, tmp_path, capsys, monkeypatch):
    """On the CPU the DiT and the VAE decode give other float rounding with other thread counts (a conv splits
    its sums by thread), so pixels can change: torchrun's one thread per rank, or a resume on another machine,
    gave other bytes than a run in one go, without a word. The thread count is recorded with each class's
    numerics, and a resume under another one says so."""
    out = tmp_path / "out"
    assert main(_args(tiny_world, out)) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["classes"]["apple"]["numerics"]["cpu_threads"] == torch.get_num_threads()
    shutil.rmtree(out / "banana")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    capsys.readouterr()
    assert main(_args(tiny_world, out)) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "other cpu_threads than its finished classes" in err, err
    assert json.loads((out / "manifest.json").read_text())["classes"]["banana"]["numerics"]["cpu_threads"] == 97


def test_a_checkpoint_write_that_fails_leaves_the_last_one_no_temp_and_an_oserror(tmp_path, monkeypatch):
    """A full disk during torch.save: torch's zip writer raises RuntimeError ("[enforce fail at
    inline_container.cc:672] . unexpected pos ..."), which reached the CLI as a traceback, and the temp file
    (8 MB of a digits fine-tune, gigabytes of a DiT-XL/2 one) stayed, the disk full. Now the temp is removed,
    the last checkpoint kept, and the error an OSError naming the checkpoint (the CLI's one line)."""
    from manifoldgd_fast.training import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, str(path))

    def full(obj, f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8316160 vs 8316048")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        save_checkpoint({"step": 2}, str(path))
    assert e.value.filename == str(path) and "cannot write this checkpoint (" in e.value.strerror
    assert "the previous one, if any, is kept" in e.value.strerror
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1

    def stopped(obj, f):
        f.write(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, str(path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
