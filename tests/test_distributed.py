"""torchrun sharding on the CPU (gloo): N processes give the same bytes as one; a killed rank, then a rerun, too."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_image_folder
from test_pipeline import _digest

CLASSES = ["c0", "c1", "c2", "c3", "c4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from manifoldgd_fast.models import build_dit, build_vae, save_pretrained_folder, tiny_dit_config, tiny_vae_config

    root = tmp_path_factory.mktemp("dist")
    data = make_image_folder(root / "data", CLASSES, 6, size=16, seed=1)
    save_pretrained_folder(build_dit(tiny_dit_config(num_classes=5, sample_size=8), seed=2), str(root / "model" / "transformer"))
    save_pretrained_folder(build_vae(tiny_vae_config(sample_size=16), seed=2), str(root / "model" / "vae"))
    return {"root": str(root), "data": data, "model": str(root / "model")}


def _torchrun(world, out, nproc, steps=10, command="distill", cache=None, extra=(), data=None, script=None,
              check=True, **popen):
    """torchrun ``command`` (through ``script``, a wrapper from :func:`_wrapper`, if given) on the tiny world."""
    launch = [str(script)] if script else ["-m", "manifoldgd_fast"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *launch, command, "--data", str(data or world["data"]), "--model", world["model"],
           "--out", str(out), "--cache-dir", str(cache or os.path.join(world["root"], "cache")), "--ipc", "2",
           "--steps", str(steps), "--t-stop", str(steps // 2), "--batch-size", "2", *extra]
    # (PYTHONFAULTHANDLER: a rank that aborts prints where each of its Python threads was)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        # (the ranks' own lines come before torchrun's summary of 1,500 characters: a rank's abort shows)
        assert r.returncode == 0, r.stderr[-8000:]
    return r


def _wrapper(tmp_path, target: str, body: str):
    """A script that replaces ``target`` (e.g. "pipeline.distill_group") on rank 1 by a function of ``*a, **k``
    running ``body`` (``real``: the original), then runs the CLI."""
    path = tmp_path / "wrapper.py"
    path.write_text("import os, sys, time\nfrom manifoldgd_fast import data, pipeline\n"
                    f"real = {target}\ndef patched(*a, **k):\n    {body}\n"
                    f"if os.environ['RANK'] == '1':\n    {target} = patched\n"
                    "from manifoldgd_fast.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return path


# --class-batch 2: one rank and two group the 5 classes differently; a sample's bytes do not depend on that
@pytest.mark.parametrize("extra", [(), ("--method", "cgs"), ("--class-batch", "2")], ids=["manifoldgd", "cgs", "class-batch"])
def test_two_ranks_same_bytes_as_one(world, tmp_path, extra):
    import json

    r1 = _torchrun(world, tmp_path / "one", 1, extra=extra)
    r2 = _torchrun(world, tmp_path / "two", 2, extra=extra)
    n = len(CLASSES)
    assert f"distilled {n} classes into" in r1.stdout, r1.stdout
    per_rank = [int(m) for m in re.findall(rf"distilled (\d+) of the run's {n} classes on this rank", r2.stdout)]
    assert len(per_rank) == 2 and sum(per_rank) == n, r2.stdout
    one, two = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert len(one) == len(CLASSES) * 3 and one == two
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["world_size"] == 2 and all(v["status"] == "done" for v in man["classes"].values())


def _children(pid):
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def signal_when(proc, ready, send, *, group=False, timeout=300, wait=120):
    """Wait (up to ``timeout`` s, or until ``proc`` ends) for ``ready()``, then ``send()`` (a signal, mid-run);
    return ``proc.communicate()``. A process still running after ``wait`` s, or after a failure here, is
    SIGKILLed (with its process group where ``group``: it was started with ``start_new_session``)."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready() and proc.poll() is None:
            time.sleep(0.02)
        send()
        return proc.communicate(timeout=wait)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()


def _complete(out, classes=CLASSES):
    return [c for c in classes if os.path.isfile(out / c / ".complete")]


def test_killed_rank_then_rerun_gives_the_same_bytes(world, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    _torchrun(world, ref, 2, steps=50)
    proc = _torchrun(world, out, 2, steps=50, start_new_session=True)

    def kill_a_worker():  # once some class is finished: SIGKILL one worker mid-run
        workers = _children(proc.pid)
        assert workers, "no torchrun worker found"
        os.kill(workers[-1], signal.SIGKILL)

    signal_when(proc, lambda: _complete(out), kill_a_worker, group=True)
    assert proc.returncode != 0
    done = _complete(out)
    assert 0 < len(done) < len(CLASSES), done          # killed mid-run
    _torchrun(world, out, 2, steps=50)
    assert _digest(out) == _digest(ref)


def _files(folder):
    out = {}
    for dp, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dp, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def test_cache_and_modes_commands_under_torchrun(world, tmp_path):
    """`cache` and `modes` split the classes over ranks too: 2 ranks write the bytes 1 rank writes."""
    for n in (1, 2):
        cache = str(tmp_path / f"cache{n}")
        _torchrun(world, tmp_path / f"m{n}", n, command="cache", cache=cache)
        _torchrun(world, tmp_path / f"m{n}", n, command="modes", cache=cache)
    caches = [_files(tmp_path / f"cache{n}") for n in (1, 2)]
    modes = [_files(tmp_path / f"m{n}" / "modes") for n in (1, 2)]
    assert sum(f.endswith(".safetensors") for f in caches[0]) == len(CLASSES) and caches[0] == caches[1]
    assert len(modes[0]) == len(CLASSES) and modes[0].keys() == modes[1].keys()
    # a modes file records the absolute latent cache it came from: compare the tensors
    from safetensors.torch import load
    for k in modes[0]:
        assert load(modes[0][k])["modes"].equal(load(modes[1][k])["modes"])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads a process's threads from Linux's /proc")
@pytest.mark.parametrize("command", ["cache", "modes", "distill"])
def test_no_gloo_thread_outlives_the_command(world, tmp_path, command):
    """After a command under torchrun, each rank has left its gloo group: no gloo thread runs into the
    interpreter's exit. (torch.distributed.nn, imported with diffusers after the group was made, held it
    past destroy_process_group; a rank then died at exit by SIGABRT now and then, its work done.)"""
    script = tmp_path / "threads_at_exit.py"
    script.write_text(
        "import os, sys\nfrom manifoldgd_fast.cli import main\ncode = main(sys.argv[1:])\n"
        "names = []\nfor t in os.listdir('/proc/self/task'):\n    try:\n"
        "        names.append(open(f'/proc/self/task/{t}/comm').read().strip())\n"
        "    except OSError:\n        pass\n"
        "gloo = [n for n in names if 'gloo' in n]\n"
        "if gloo:\n    print(f'rank {os.environ[\"RANK\"]}: gloo threads at exit: {gloo}', file=sys.stderr)\n"
        "sys.exit(code or (3 if gloo else 0))\n")
    _torchrun(world, tmp_path / "out", 2, command=command, cache=tmp_path / "cache", script=script)


def test_rerun_deals_the_unfinished_classes_over_every_rank(world, tmp_path):
    """Only one rank's classes are missing (that rank died): the rerun splits them over both ranks
    rather than leaving them all to one while the other waits at the barrier, and gives the same bytes."""
    out = tmp_path / "out"
    _torchrun(world, out, 2)
    ref = _digest(out)
    lost = CLASSES[1::2]                             # rank 1's share of the first run
    for c in lost:
        shutil.rmtree(out / c)
    r = _torchrun(world, out, 2)
    per_rank = [int(m) for m in re.findall(rf"distilled (\d+) of the run's {len(CLASSES)} classes", r.stdout)]
    assert sorted(per_rank) == [1, 1], r.stdout
    assert _digest(out) == ref


def test_a_rank_that_sees_other_data_stops_the_run_before_writing(world, tmp_path):
    """Each rank scans --data itself; a node whose mount lacks a class would deal the classes otherwise and
    write some under another rank's labels. Rank 1 sees one class less here: the run stops with a one-line
    error naming that rank, and nothing is written."""
    wrapper = _wrapper(tmp_path, "data.scan_image_folder", "return real(*a, **k)[1:]")
    out = tmp_path / "out"
    r = _torchrun(world, out, 2, steps=4, script=wrapper, check=False)
    assert r.returncode != 0
    assert "manifoldgd-fast: error: rank 1 on " in r.stderr and "does not see what rank 0 sees (the classes, " \
        "labels and files of --data and the finished classes of --out)" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("does not see what rank 0 sees") == 2, r.stderr[-3000:]   # both ranks stop, with one line
    assert not [c for c in CLASSES if (out / c).exists()]


def test_rank_0_waits_for_the_slowest_rank_before_the_manifest_and_the_contact_sheet(world, tmp_path):
    """Rank 1 samples slowly here (rank 0 is done first): rank 0 writes the manifest and the contact sheet only
    once every rank's classes are on disk (the barrier), so the manifest says every class is done."""
    import json

    wrapper = _wrapper(tmp_path, "pipeline.distill_group", "time.sleep(3)\n    return real(*a, **k)")
    out = tmp_path / "out"
    r = _torchrun(world, out, 2, steps=4, script=wrapper, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert {c: v["status"] for c, v in man["classes"].items()} == {c: "done" for c in CLASSES}
    assert (out / "contact_sheet.png").exists()


def test_a_locked_out_stops_every_rank_in_one_line(world, tmp_path):
    """Rank 0 finds --out held by another run: every rank stops with that one line (rank 1 died at the next
    barrier with a traceback from our code: gloo's "Connection closed by peer"), exit non-zero, nothing written."""
    from manifoldgd_fast.output import RunLock

    out = tmp_path / "out"
    with RunLock(str(out)):
        r = _torchrun(world, out, 2, steps=4, check=False)
    assert r.returncode != 0
    assert r.stderr.count(f"manifoldgd-fast: error: --out {out} is being written by another run") == 2, r.stderr[-3000:]
    # (torchrun's launcher prints its own ChildFailedError traceback; none comes from our code)
    assert "manifoldgd_fast/" not in r.stderr and "Connection closed" not in r.stderr, r.stderr[-3000:]
    assert os.listdir(out) == [".lock"]


@pytest.mark.parametrize("command, readable, why", [
    ("distill", 1, "class c1 has 1 readable images, fewer than --ipc 2"),        # the checks before sampling
    ("modes", 1, "class c1 has 1 readable images, fewer than --ipc 2"),
    ("cache", 0, "class c1 in {data}: none of its 6 images could be read"),       # while encoding
])
def test_a_rank_whose_own_class_fails_stops_every_rank_in_one_line(world, tmp_path, command, readable, why):
    """Only rank 1 can find that its class c1 has too few readable images (it encodes c1): every rank stops with
    its one line, exit non-zero, nothing written (rank 0 went on to its next barrier and died there with a
    traceback from our code: gloo's "Connection closed by peer")."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    for f in sorted((data / "c1").iterdir())[readable:]:
        f.write_bytes(b"not an image")
    out = tmp_path / "out"
    r = _torchrun(world, out, 2, steps=4, command=command, data=data, cache=tmp_path / "cache", check=False)
    assert r.returncode != 0
    line = f"manifoldgd-fast: error: {why.format(data=data)}"
    assert r.stderr.count(line) == 2, r.stderr[-3000:]
    # (torchrun's launcher prints its own ChildFailedError traceback; none comes from our code)
    assert "manifoldgd_fast/" not in r.stderr and "Connection closed" not in r.stderr, r.stderr[-3000:]
    assert not [c for c in CLASSES if (out / c).exists() or (out / "modes" / f"{c}.safetensors").exists()]


def test_a_user_error_while_one_rank_samples_stops_every_rank_after_the_others_finish(world, tmp_path):
    """Rank 1 meets a user error while sampling (as one class's NaN samples): rank 0 finishes its classes, then every
    rank stops with rank 1's line (rank 0 died at the last barrier with gloo's traceback, or torchrun stopped it
    mid-class); rank 0's classes are on disk and the manifest says they are done, rank 1's are not."""
    import json

    wrapper = _wrapper(tmp_path, "pipeline.distill_group",
                       "raise __import__('manifoldgd_fast.errors').errors.ConfigError('class c1: boom')")
    out = tmp_path / "out"
    r = _torchrun(world, out, 2, steps=4, script=wrapper, check=False)
    assert r.returncode != 0
    assert r.stderr.count("manifoldgd-fast: error: class c1: boom") == 2, r.stderr[-3000:]
    assert "manifoldgd_fast/" not in r.stderr and "Connection closed" not in r.stderr, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert [c for c, v in man["classes"].items() if v["status"] == "done"] == CLASSES[0::2]
    assert not [c for c in CLASSES[1::2] if (out / c).exists()]


def test_a_stale_modes_file_of_one_rank_stops_every_rank_in_one_line(world, tmp_path):
    """`modes` again where only rank 1's class c1 has a file of other parameters (here c0's): rank 1 stops with
    its line, rank 0 finishes its classes and stops with the same line at the last barrier (it died there with
    gloo's "Connection closed by peer"); nothing else is rewritten."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    _torchrun(world, out, 2, command="cache", cache=cache)
    _torchrun(world, out, 2, command="modes", cache=cache)
    modes = out / "modes"
    shutil.copyfile(modes / "c0.safetensors", modes / "c1.safetensors")
    (modes / "c2.safetensors").unlink()                       # rank 0's: recomputed before its barrier
    before = _files(modes)
    r = _torchrun(world, out, 2, command="modes", cache=cache, check=False)
    assert r.returncode != 0
    line = f"manifoldgd-fast: error: {modes / 'c1.safetensors'} holds modes made with other mode parameters"
    assert r.stderr.count(line) == 2, r.stderr[-3000:]
    assert "manifoldgd_fast/" not in r.stderr and "Connection closed" not in r.stderr, r.stderr[-3000:]
    after = _files(modes)
    assert after.pop("c2.safetensors") and after == before


def test_barrier_or_raise_gives_every_rank_the_first_error(monkeypatch):
    import torch.distributed as dist

    from manifoldgd_fast.distributed import Shard
    from manifoldgd_fast.errors import ConfigError, DataError

    def gathered(values):
        def fake(out, obj):
            out[:] = values
        return fake

    monkeypatch.setattr(dist, "all_gather_object", gathered([None, None, None]))
    Shard(rank=1, world=3).barrier_or_raise(None)                    # no error: a barrier
    monkeypatch.setattr(dist, "all_gather_object", gathered([None, ("ConfigError", "bad flag"), ("DataError", "x")]))
    with pytest.raises(ConfigError, match="^bad flag$"):
        Shard(rank=0, world=3).barrier_or_raise(None)
    with pytest.raises(DataError, match="^own$"):                   # a rank with its own error raises it
        Shard(rank=2, world=3).barrier_or_raise(DataError("own"))
    with pytest.raises(DataError, match="^alone$"):                  # one process, or an independent shard
        Shard().barrier_or_raise(DataError("alone"))
    # the block form: what the block raised is what it shares; a block that raised nothing meets the others'
    sent = []
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: (sent.append(obj), out.__setitem__(
        slice(None), [obj, ("DataError", "rank 1's class"), None])))
    with pytest.raises(DataError, match="^mine$"):
        with Shard(rank=0, world=3).sharing_errors():
            raise DataError("mine")
    assert sent == [("DataError", "mine")]
    with pytest.raises(DataError, match="^rank 1's class$"):
        with Shard(rank=0, world=3).sharing_errors():
            pass
    assert sent[-1] is None
    with pytest.raises(ValueError):                                   # not a user error: not caught, no barrier
        with Shard(rank=0, world=3).sharing_errors():
            raise ValueError("bug")
    assert len(sent) == 2


def test_agree_names_the_odd_ranks_out_even_rank_0(monkeypatch):
    """The ranks that differ from the majority are named (from rank 0 on a tie), rank 0 included when it is the
    one whose mount is stale; every rank raises the same line."""
    import torch.distributed as dist

    from manifoldgd_fast.distributed import Shard
    from manifoldgd_fast.errors import DataError

    def gathered(values):
        def fake(out, obj):
            out[:] = [(v, f"h{r}") for r, v in enumerate(values)]
        return fake

    for values, want in ((["a", "a", "a"], None), (["a", "b", "a"], "rank 1 on h1 does not see what rank 0 sees"),
                         (["b", "a", "a"], "rank 0 on h0 does not see what the other ranks see"),
                         (["a", "b"], "rank 1 on h1 does not see what rank 0 sees"),
                         # at most 3 named, then how many more (none said when there are no more)
                         (["a", "b", "c", "d"], "rank 1 on h1, rank 2 on h2, rank 3 on h3 does not see what rank 0 sees"),
                         (["a", "b", "c", "d", "e"],
                          "rank 1 on h1, rank 2 on h2, rank 3 on h3 and 1 more does not see what rank 0 sees")):
        monkeypatch.setattr(dist, "all_gather_object", gathered(values))
        for r in range(len(values)):
            shard = Shard(rank=r, world=len(values))
            if want is None:
                shard.agree(values[r], "the data")
            else:
                with pytest.raises(DataError, match=f"^{want} \\(the data\\): every rank must see"):
                    shard.agree(values[r], "the data")


def test_barrier_timeout_from_the_environment(monkeypatch):
    from manifoldgd_fast.distributed import TIMEOUT_ENV, barrier_timeout
    from manifoldgd_fast.errors import ConfigError

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert barrier_timeout() == 86400  # longer than gloo's 30 minutes: early ranks wait out the slowest
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert barrier_timeout() == 90
    for bad in ("soon", "0", "-5", "nan", "inf", "1e300"):   # (inf overflowed timedelta: a traceback)
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            barrier_timeout()


@pytest.mark.parametrize("env, why", [
    ({"WORLD_SIZE": "2"}, r"^\$RANK is not set, but WORLD_SIZE 2 says"),                      # was KeyError
    ({"WORLD_SIZE": "abc"}, r"^\$WORLD_SIZE='abc': expected an integer"),                      # was ValueError
    ({"WORLD_SIZE": "2", "RANK": "x"}, r"^\$RANK='x': expected an integer"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, r"^\$RANK=5 is outside \[0, WORLD_SIZE 2\)"),          # was a hang
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"^\$RANK=2 is outside \[0, WORLD_SIZE 2\)"),          # ranks count from 0
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"^\$RANK=-1 is outside \[0, WORLD_SIZE 2\)"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, r"^\$MASTER_ADDR is not set, but WORLD_SIZE 2"),        # was ValueError
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MANIFOLDGD_DIST_TIMEOUT": "inf"},
     r"^\$MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
      "MANIFOLDGD_DIST_TIMEOUT": "inf"}, r"^\$MANIFOLDGD_DIST_TIMEOUT='inf': expected a positive number"),
], ids=["no-rank", "world-not-int", "rank-not-int", "rank-outside", "rank-is-world", "rank-negative", "no-master-addr",
        "no-master-port", "inf-timeout"])
def test_a_broken_torchrun_environment_is_one_line_before_any_rendezvous(monkeypatch, tmp_path, capsys, env, why):
    """WORLD_SIZE > 1 without the rest of torchrun's environment (or with a bad value) is a one-line error
    naming the variable, before any rendezvous is tried (no traceback, no hang)."""
    import torch.distributed as dist

    from manifoldgd_fast.cli import main
    from manifoldgd_fast.distributed import Shard
    from manifoldgd_fast.errors import ConfigError

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MANIFOLDGD_DIST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a rendezvous was tried"))
    with pytest.raises(ConfigError, match=why):
        Shard.from_env()
    rc = main(["distill", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--ipc", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and re.search(why.lstrip("^"), err[0]), err


def test_an_explicit_gpu_under_torchrun_is_refused(monkeypatch):
    """--device cuda:0 with several ranks on a node would put them all on GPU 0: one line saying to give
    --device cuda (each rank its cuda:LOCAL_RANK); one rank a node, an independent shard and cpu are fine."""
    from manifoldgd_fast.distributed import Shard
    from manifoldgd_fast.errors import ConfigError

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match=r"^--device cuda:0 under torchrun would put all 8 ranks of this node on "
                                          r"one GPU; give --device cuda \(each rank takes cuda:LOCAL_RANK\)$"):
        Shard(rank=3, world=16, local_rank=3).device("cuda:0")
    assert Shard(rank=3, world=16, local_rank=3).device("cpu") == "cpu"
    assert Shard(rank=1, world=2, independent=True).device("cuda:0") == "cuda:0"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="would put all 2 ranks of this node on one GPU"):
        Shard(rank=1, world=4, local_rank=1).device("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")                       # one rank a node: its own choice
    assert Shard(rank=1, world=4, local_rank=0).device("cuda:1") == "cuda:1"
    # one process, or an independent shard, never reads LOCAL_WORLD_SIZE: a stray or empty one is no error
    # (it was "$LOCAL_WORLD_SIZE='': expected an integer" for a plain single-process run)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    assert Shard().device("cuda:1") == "cuda:1" and Shard(rank=1, world=2, independent=True).device("cpu") == "cpu"


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    """--device cuda / auto under torchrun: cuda:LOCAL_RANK (not the global rank: with 2 ranks a node, rank 2 is the
    second node's GPU 0); one process and an independent shard keep the device as given (the scheduler's GPU)."""
    import torch

    from manifoldgd_fast.distributed import Shard

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert Shard(rank=2, world=4, local_rank=0).device("cuda") == "cuda:0"
    assert Shard(rank=3, world=4, local_rank=1).device("auto") == "cuda:1"
    assert Shard(rank=1, world=2, independent=True).device("cuda") == "cuda"
    assert Shard().device("auto") == "auto"


def test_from_env_joins_a_group_once_and_close_leaves_it(monkeypatch):
    """WORLD_SIZE 1 (torchrun --nproc-per-node 1, or a leftover variable) is one process, with no group;
    several: rank, world and local rank (LOCAL_RANK, RANK where unset) from the environment, one gloo group
    joined, and left by close() (once); a group someone else made is not left."""
    import torch.distributed as dist

    from manifoldgd_fast.distributed import Shard

    calls = []
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MANIFOLDGD_DIST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(("init", k["backend"])))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append(("destroy",)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    one = Shard.from_env()
    assert (one.rank, one.world, one.is_main) == (0, 1, True) and not calls
    one.close()
    assert not calls
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    shard = Shard.from_env()
    assert (shard.rank, shard.world, shard.local_rank, shard.is_main) == (3, 4, 3, False)
    assert calls == [("init", "gloo")]
    shard.close()
    shard.close()
    assert calls == [("init", "gloo"), ("destroy",)]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)       # a group the caller made: it keeps it
    calls.clear()
    Shard.from_env().close()
    assert not calls
