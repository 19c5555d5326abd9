"""Independent shards (``--shard K/N``, e.g. a Slurm job array): N processes that never meet write the bytes
one process writes, each sweeps only its own classes' leftovers, the manifest and the contact sheet are
complete once the last shard finishes, and the locks keep a whole run and a shard's twin out."""
import json
import os
import subprocess
import sys
import time

import pytest
from test_distributed import CLASSES, _complete, signal_when, world  # noqa: F401  (the fixture)
from test_pipeline import _args, _bad, _digest

from manifoldgd_fast.cli import main
from manifoldgd_fast.config import parse_shard
from manifoldgd_fast.errors import ConfigError, DataError
from manifoldgd_fast.output import RunLock


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _command(w, out, steps, *extra):
    """`python -m manifoldgd_fast distill` on the 5-class world ``w``, guided for the first half of ``steps``."""
    return [sys.executable, "-m", "manifoldgd_fast", "distill", "--data", w["data"], "--model", w["model"],
            "--out", str(out), "--cache-dir", os.path.join(w["root"], "cache"), "--ipc", "2",
            "--steps", str(steps), "--t-stop", str(steps // 2), "--batch-size", "2", *extra]


def _statuses(out):
    return {c: v["status"] for c, v in json.loads((out / "manifest.json").read_text())["classes"].items()}


def test_shards_one_after_another_give_one_process_bytes(tiny_world, tmp_path, capsys):
    """Three shards run one after the other: each distils classes j = K mod 3, the manifest says which are
    done after each, the contact sheet comes with the last, and the bytes are the single run's."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_args(tiny_world, ref)) == 0
    classes = ["apple", "banana", "cherry"]
    for k in range(3):
        capsys.readouterr()
        assert main(_args(tiny_world, out, "--shard", f"{k}/3")) == 0
        said = capsys.readouterr().out
        assert f"distilled 1 of the run's 3 classes (--shard {k}/3)" in said, said
        assert ("every class of the run is done" in said) == (k == 2), said
        assert said.count(f"; {2 - k} {'is' if k == 1 else 'are'} left to the other shards") == (k < 2), said
        assert _statuses(out) == {c: "done" if j <= k else "pending" for j, c in enumerate(classes)}
        assert (out / "contact_sheet.png").exists() == (k == 2)
    assert _digest(out) == _digest(ref)
    man = json.loads((out / "manifest.json").read_text())
    assert man["fingerprint"] == json.loads((ref / "manifest.json").read_text())["fingerprint"]
    assert man["world_size"] == 3 and "shard" not in man["config"]
    # a rerun of a finished shard does nothing, and a whole rerun finds everything done
    assert main(_args(tiny_world, out, "--shard", "1/3")) == 0
    said = capsys.readouterr().out
    assert said.startswith("distilled 0 of the run's 3 classes (--shard 1/3) into ") and \
        "; 3 were already done; every class of the run is done" in said, said
    assert main(_args(tiny_world, out)) == 0 and _digest(out) == _digest(ref)


def test_classes_made_by_other_settings_are_found_without_the_manifest(tiny_world, tmp_path, capsys, monkeypatch):
    """Each finished class keeps the fingerprint and weights that made it: a rerun with other settings is
    refused even after the manifest was deleted, and a shard started with other settings beside another
    shard (both checked OUT before either wrote its manifest) is refused under the manifest's lock,
    before it samples anything."""
    from manifoldgd_fast import pipeline

    out = tmp_path / "out"
    assert main(_args(tiny_world, out, "--shard", "0/3")) == 0
    done = json.loads((out / "apple" / ".complete").read_text())
    man = json.loads((out / "manifest.json").read_text())
    assert done["fingerprint"] == man["fingerprint"] and done["weights"] == man["weights"]
    (out / "manifest.json").unlink()
    last = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--seed", "7"), capsys)
    assert f"--out {out}: class apple was made by a run with other settings (fingerprint {man['fingerprint']}" in last

    # shard 1/3 with seed 7 checked OUT before shard 0/3 wrote anything (its pre-check passes), then starts
    real, calls = pipeline._refuse_other_run, []
    monkeypatch.setattr(pipeline, "_refuse_other_run",
                        lambda *a, **k: calls.append(1) or (None if len(calls) <= 1 else real(*a, **k)))
    (out / "apple").rename(tmp_path / "apple")                    # as if shard 0/3 had not finished yet ...
    args = _args(tiny_world, out, "--shard", "1/3", "--seed", "7")
    real_prepare = pipeline.prepare

    def prepare(*a, **k):  # ... and wrote its class and manifest while this shard loaded and encoded
        ctx = real_prepare(*a, **k)
        (tmp_path / "apple").rename(out / "apple")
        pipeline.OutputWriter(str(out)).write_manifest(man)
        return ctx

    monkeypatch.setattr(pipeline, "prepare", prepare)
    last = _bad(tiny_world, tmp_path, args, capsys)
    assert f"--out {out} holds a run with other parameters (seed) (fingerprint {man['fingerprint']}" in last, last
    assert len(calls) == 2 and not (out / "banana").exists()


def test_a_shard_sweeps_only_its_own_classes_leftovers(tiny_world, tmp_path):
    """What a killed shard left (its class's temp folder and temp latents) is swept by its rerun; another
    shard's leftovers and in-flight files are not touched."""
    out = tmp_path / "out"
    (out / "latents").mkdir(parents=True)
    mine = [out / ".apple.tmp-99999", out / "latents" / ".tmp-apple.safetensors-x1"]       # shard 0/2: apple, cherry
    theirs = [out / ".banana.tmp-99999", out / "latents" / ".tmp-banana.safetensors-x2", out / ".tmp-other-x3"]
    for p in mine + theirs:
        p.mkdir() if p.name.startswith(".apple.tmp") or p.name.startswith(".banana.tmp") else p.write_bytes(b"x")
    assert main(_args(tiny_world, out, "--shard", "0/2")) == 0
    assert not any(p.exists() for p in mine) and all(p.exists() for p in theirs)
    assert main(_args(tiny_world, out, "--shard", "1/2")) == 0
    assert not (out / ".banana.tmp-99999").exists() and not (out / "latents" / ".tmp-banana.safetensors-x2").exists()
    assert (out / ".tmp-other-x3").exists()      # nobody's class: left for a whole run's sweep, once stale (an
    assert main(_args(tiny_world, out)) == 0 and (out / ".tmp-other-x3").exists()  # eval's write may be in flight)
    os.utime(out / ".tmp-other-x3", (time.time() - 7200, time.time() - 7200))
    assert main(_args(tiny_world, out)) == 0 and not (out / ".tmp-other-x3").exists()
    assert set(_statuses(out).values()) == {"done"}


def test_locks_keep_a_whole_run_and_a_shards_twin_out(tiny_world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(str(out), shared=True):                     # shards at work: a whole run waits for them
        last = _bad(tiny_world, tmp_path, _args(tiny_world, out), capsys)
        assert "is being written by another run (processes of a --shard K/N run)" in last, last
        with RunLock(str(out), name=".lock-shard-0-of-2"):    # shard 0/2 at work: its twin is refused
            last = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--shard", "0/2"), capsys)
            assert "is being written by another process of --shard 0/2 (pid" in last, last
            assert main(_args(tiny_world, out, "--shard", "1/2")) == 0   # the other shard runs beside it
    with RunLock(str(out)):                                  # a whole run at work: no shard starts
        last = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--shard", "0/2"), capsys)
        assert "is being written by a whole run (no --shard) (pid" in last, last
    with RunLock(str(out), shared=True), RunLock(str(out), name=".lock-shards-of-3", shared=True):
        # shards of another N at work: they split the classes otherwise (both would take class 0)
        last = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--shard", "0/2"), capsys)
        assert f"--out {out} is being written by --shard K/3 processes; --shard 0/2 would split the classes " \
            "otherwise" in last, last
    # once they stopped (their lock file stays); while it runs, it holds its own N's lock for the other N's to see
    from manifoldgd_fast import pipeline
    from manifoldgd_fast.output import lock_is_held

    real, held = pipeline.prepare, []
    monkeypatch.setattr(pipeline, "prepare",
                        lambda *a, **k: held.append(lock_is_held(str(out / ".lock-shards-of-2"))) or real(*a, **k))
    assert main(_args(tiny_world, out, "--shard", "0/2")) == 0
    assert held == [True] and not lock_is_held(str(out / ".lock-shards-of-2"))


def test_bad_shard_specs_are_one_line(tiny_world, tmp_path, capsys, monkeypatch):
    for spec in ("2/2", "1", "a/b", "0/0", "3/ 2"):
        last = _bad(tiny_world, tmp_path, _args(tiny_world, tmp_path / "o", "--shard", spec), capsys)
        assert f"--shard {spec!r}: expected K/N with 0 <= K < N" in last, last
    for spec in ("-1/2", "1/2/3", "0/2x", "1/-2", "", "/2", None):   # (a negative K took no class; 1/2/3 was 1/2)
        with pytest.raises(ConfigError, match=r"^--shard .*: expected K/N with 0 <= K < N"):
            parse_shard(spec)
    assert parse_shard(" 1 / 2 ") == (1, 2) and parse_shard("0/1") == (0, 1)
    big = "1" + "0" * 300                                             # (its lock file's name was past 255 bytes)
    for spec in (f"0/{big}", "0/1000001"):
        with pytest.raises(ConfigError, match=r"^--shard .*: N is at most 1000000$"):
            parse_shard(spec)
    assert parse_shard("999999/1000000") == (999999, 1000000)
    last = _bad(tiny_world, tmp_path, ["profile", "--data", tiny_world["data"], "--model", tiny_world["model"],
                                       "--shard", "0/2"], capsys)
    assert "--shard 0/2: profile runs its first classes in one process" in last, last
    monkeypatch.setenv("WORLD_SIZE", "2")
    last = _bad(tiny_world, tmp_path, _args(tiny_world, tmp_path / "o", "--shard", "0/2"), capsys)
    assert "--shard 0/2 under torchrun (WORLD_SIZE 2): use one or the other" in last, last
    assert not (tmp_path / "o").exists()


def test_cache_and_modes_take_their_share_too(tiny_world, tmp_path):
    """`cache` and `modes` with --shard K/N: the shards together write the files one process writes."""
    def files(folder):
        return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}

    base = ["--data", tiny_world["data"], "--model", tiny_world["model"], "--ipc", "2"]
    for name, shards in (("one", [None]), ("two", ["0/2", "1/2"])):
        for spec in shards:
            extra = ["--shard", spec] if spec else []
            assert main(["cache", *base, "--cache-dir", str(tmp_path / name / "cache"), *extra]) == 0
            assert main(["modes", *base, "--cache-dir", str(tmp_path / name / "cache"), "--out",
                         str(tmp_path / name / "run"), *extra]) == 0
    one = files(tmp_path / "one" / "run" / "modes")
    assert len(one) == 3 and one.keys() == files(tmp_path / "two" / "run" / "modes").keys()


def test_concurrent_shard_processes_give_one_process_bytes(world, tmp_path):  # noqa: F811
    """Two `--shard K/2` processes started together on one --out (a job array's tasks) finish, and the output
    is the single process's, bytes and manifest; whichever finished last says the run is complete."""
    def cmd(out, *extra):
        return _command(world, out, 10, *extra)

    r = subprocess.run(cmd(tmp_path / "one"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    procs = [subprocess.Popen(cmd(tmp_path / "two", "--shard", f"{k}/2"), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert sum("every class of the run is done" in o for o, _ in outs) >= 1, outs
    assert _digest(tmp_path / "two") == _digest(tmp_path / "one")
    assert set(_statuses(tmp_path / "two").values()) == {"done"} and len(_statuses(tmp_path / "two")) == len(CLASSES)
    assert (tmp_path / "two" / "contact_sheet.png").exists()




def test_a_shard_killed_mid_run_then_rerun_gives_the_same_bytes(world, tmp_path):  # noqa: F811
    """SIGKILL shard 0/2 once one of its classes is done; its rerun (and shard 1/2) give one process's bytes."""
    import signal

    def cmd(out, *extra):
        return _command(world, out, 50, *extra)

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert subprocess.run(cmd(ref), env=ENV, capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(cmd(out, "--shard", "0/2"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    mine = CLASSES[0::2]
    signal_when(proc, lambda: _complete(out, mine), lambda: proc.send_signal(signal.SIGKILL), wait=60)
    done = _complete(out, mine)
    assert 0 < len(done) < len(mine), done                  # killed mid-run
    for spec in ("0/2", "1/2"):
        r = subprocess.run(cmd(out, "--shard", spec), env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(out) == _digest(ref)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # the killed shard's leftovers were swept


def test_sigterm_stops_a_run_as_ctrl_c_does(world, tmp_path):  # noqa: F811
    """SIGTERM (Slurm's time limit, torchrun stopping its workers) mid-run: exit 143 with one line, no temp
    files left, the manifest says which classes were done, and a rerun finishes the rest (it used to die at
    once: status -15, temps and a stale manifest left behind)."""
    import signal

    out = tmp_path / "out"
    proc = subprocess.Popen(_command(world, out, 50), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, err = signal_when(proc, lambda: _complete(out), lambda: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == \
        "manifoldgd-fast: terminated (SIGTERM); finished classes are kept, rerun to resume", err[-2000:]
    done = set(_complete(out))
    assert 0 < len(done) < len(CLASSES), done                       # stopped mid-run
    assert {c for c, v in _statuses(out).items() if v == "done"} == done
    assert not [f for _, dirs, files in os.walk(out) for f in dirs + files if ".tmp-" in f]
    r = subprocess.run(_command(world, out, 50), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"{len(done)} {'was' if len(done) == 1 else 'were'} already done" in r.stdout, \
        r.stderr[-2000:]
    assert set(_statuses(out).values()) == {"done"}


def test_sigterm_to_the_whole_process_group_while_caching_stops_cleanly(world, tmp_path):  # noqa: F811
    """Slurm signals every process of a job step, the image-decoding workers too: the run still stops with
    one line and 143 (killed by the signal, a worker made torch raise "DataLoader worker ... killed by
    signal" over it: a traceback, exit 1), and a rerun finishes the cache."""
    import signal

    import numpy as np
    from PIL import Image

    data, cache = tmp_path / "big", tmp_path / "cache"
    rng = np.random.default_rng(0)
    for c in CLASSES:  # large JPEGs: decoding, in 2 workers, takes a few seconds
        (data / c).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(data / c / f"{i}.jpg")
    cmd = [sys.executable, "-m", "manifoldgd_fast", "cache", "--data", str(data), "--model", world["model"],
           "--cache-dir", str(cache), "--encode-workers", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _, err = signal_when(proc, lambda: list(cache.rglob("*.safetensors")),
                         lambda: os.killpg(proc.pid, signal.SIGTERM), group=True)   # the main process and its workers
    done = len(list(cache.rglob("*.safetensors")))
    assert 0 < done < len(CLASSES), done                     # stopped mid-run
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == \
        "manifoldgd-fast: terminated (SIGTERM); finished classes are kept, rerun to resume", err[-2000:]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and len(list(cache.rglob("*.safetensors"))) == len(CLASSES), r.stderr[-2000:]


def test_without_the_manifest_another_runs_classes_in_out_are_found(tiny_world, tmp_path, capsys):
    """With manifest.json deleted, a run with other classes (and settings) into the same OUT was accepted: OUT
    then held apple from one run beside banana from another, and the new manifest listed banana alone. The
    finished classes OUT holds beside this run's are checked by their own records too."""
    out = tmp_path / "out"
    assert main(_args(tiny_world, out, "--classes", "apple")) == 0
    fp = json.loads((out / "apple" / ".complete").read_text())["fingerprint"]
    (out / "manifest.json").unlink()
    last = _bad(tiny_world, tmp_path, _args(tiny_world, out, "--classes", "banana", "--seed", "5"), capsys)
    assert last.startswith(f"manifoldgd-fast: error: --out {out}: class apple was made by a run with other "
                           f"settings or classes (fingerprint {fp}, this run "), last
    assert last.endswith(") and OUT has no manifest.json; use a new --out"), last
    assert not (out / "banana").exists()
    assert main(_args(tiny_world, out, "--classes", "apple")) == 0          # the same run: resumes as before


def test_eval_and_metrics_refuse_a_run_whose_other_shards_are_still_to_run(tiny_world, tmp_path, capsys):
    """A job array's shards start hours apart and hold no lock in between: `metrics` (and `eval --restrict-val`)
    on OUT after shard 0/2 alone scored its classes and recorded the numbers in the manifest as the run's,
    exit 0 (audit). Refused in one line naming what is left; once every shard has run, the check passes."""
    from manifoldgd_fast.eval.metrics import compute_metrics
    from manifoldgd_fast.eval.protocol import evaluate
    from manifoldgd_fast.eval.report import check_not_being_written

    out = tmp_path / "out"
    assert main(_args(tiny_world, out, "--shard", "0/2")) == 0
    said = f"^--distilled {out} is an unfinished distill run: 1 of its 3 classes are not done \\(banana\\); finish it"
    for call in (lambda: compute_metrics(str(out), tiny_world["data"], device="cpu"),
                 lambda: evaluate(str(out), tiny_world["data"], restrict_val=True, epochs=1, device="cpu")):
        with pytest.raises(DataError, match=said):
            call()
    assert "metrics" not in json.loads((out / "manifest.json").read_text())
    last = _bad(tiny_world, tmp_path, ["metrics", "--distilled", str(out), "--real", tiny_world["data"]], capsys)
    assert "is an unfinished distill run" in last, last
    assert main(_args(tiny_world, out, "--shard", "1/2")) == 0
    check_not_being_written(str(out))
    for c in ("apple", "banana", "cherry"):   # a copy made without hidden files: the manifest says done
        os.remove(out / c / ".complete")
    check_not_being_written(str(out))


def test_an_interrupted_shard_records_its_finished_classes_in_the_manifest(tiny_world, tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM (a job array's time limit) wrote the manifest only for a whole run's rank 0: an interrupted
    --shard K/N left the classes it had finished as "pending" there until another shard ended (audit)."""
    from manifoldgd_fast.output import OutputWriter

    out, real = tmp_path / "out", OutputWriter.write_class

    def then_interrupted(self, name, *a, **k):
        real(self, name, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputWriter, "write_class", then_interrupted)
    assert main(_args(tiny_world, out, "--shard", "0/2")) == 130
    assert _statuses(out) == {"apple": "done", "banana": "pending", "cherry": "pending"}
