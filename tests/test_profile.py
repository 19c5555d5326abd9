"""The profiler: phases of a short run, the guidance overhead headline, JSON output."""
import json
import os

import torch

import pytest

from manifoldgd_fast.cli import main
from manifoldgd_fast.profile import phase, profiling


@pytest.fixture
def clock(monkeypatch):
    """The profiler's perf_counter on a fake clock that only ``clock.sleep`` advances: exact phase times,
    whatever the machine's load."""
    import types

    import manifoldgd_fast.profile as profile

    now = [1000.0]
    fake = types.SimpleNamespace(perf_counter=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(profile, "time", fake)
    return fake


def test_profiler_times_phases_and_is_a_noop_when_inactive(clock):
    with phase("outside"):  # no profiler: nothing recorded, nothing raised
        pass
    with profiling("cpu") as prof:
        with phase("modes"):
            clock.sleep(0.002)
        for j in range(4):
            with phase("dit_forward"):
                clock.sleep(0.01 + 0.5 * (j == 0))   # the first step pays one-time costs (compilation)
            with phase("manifold"):
                clock.sleep(0.005 + 0.1 * (j == 0))
            prof.step_done()
        with phase("vae_decode"):
            clock.sleep(0.003)
    rep = prof.report()
    assert rep["steps"] == 4 and list(rep["phases"]) == ["dit_forward", "manifold", "vae_decode", "modes"]  # largest 1st
    assert rep["first_step_ms"] == pytest.approx(615)          # left out of the figures, reported alone
    assert rep["phases"]["dit_forward"]["total_ms"] == pytest.approx(30)
    assert rep["phases"]["dit_forward"]["per_step_ms"] == pytest.approx(10)
    assert rep["phases"]["modes"]["per_step_ms"] is None and rep["phases"]["vae_decode"]["share_of_step"] is None
    assert rep["guidance_overhead"] == pytest.approx(0.5)     # 5 ms of guidance per 10 ms unguided step
    assert abs(sum(v["share_of_step"] for k, v in rep["phases"].items() if k in ("dit_forward", "manifold")) - 1) < 1e-3
    from manifoldgd_fast.profile import format_table

    assert "the first step (615.0 ms: one-time costs such as kernel compilation) is left out" in format_table(rep)
    with profiling("cpu") as one:   # a single step: nothing else to report, so it is kept
        with phase("dit_forward"):
            clock.sleep(0.01)
        one.step_done()
    assert one.report()["first_step_ms"] is None and one.report()["per_step_ms"] == pytest.approx(10)


def test_overhead_is_per_guided_step_and_manifold_parts_are_not_counted_twice(clock):
    """4 steps of which 2 guided: the headline is the guided step's guidance over the plain step (0.5), not
    the whole run's (0.2); kNN / Gram + eig / projection inside "manifold" are shares of it, not extra time."""
    with profiling("cpu") as prof:
        for i in range(-1, 4):          # (a first step, left out of the report)
            with phase("dit_forward"):
                clock.sleep(0.02)
            if i < 2:
                with phase("manifold"):
                    for part, s in (("knn", 0.002), ("gram_eig", 0.003), ("projection", 0.005)):
                        with phase(part):
                            clock.sleep(s)
            prof.step_done()
    rep = prof.report()
    assert (rep["steps"], rep["guided_steps"]) == (5, 3)
    assert rep["guidance_overhead"] == pytest.approx(0.5) and rep["guidance_share"] == pytest.approx(0.2)
    top = [v["share_of_step"] for k, v in rep["phases"].items() if "within" not in v]
    assert abs(sum(top) - 1) < 1e-3
    parts = {k: v for k, v in rep["phases"].items() if "within" in v}
    assert set(parts) == {"knn", "gram_eig", "projection"} and all(v["within"] == "manifold" for v in parts.values())
    assert sum(v["total_ms"] for v in parts.values()) <= rep["phases"]["manifold"]["total_ms"]
    from manifoldgd_fast.profile import format_table

    # the parts' shares are of the whole step (100 ms over the 4 steps kept: 80 DiT + 20 manifold), 4 ms of kNN
    assert parts["knn"]["share_of_step"] == pytest.approx(0.04) and parts["knn"]["per_step_ms"] == pytest.approx(1)
    assert "| manifold: knn | 4.0 | 1.000 | 4.0 % |" in format_table(rep) and "(3 guided)" in format_table(rep)


def _steps(prof, clock, n, guided=(0,)):
    """``n`` steps of a 10 ms DiT forward, those in ``guided`` with 4 ms of manifold guidance."""
    for i in range(n):
        with phase("dit_forward"):
            clock.sleep(0.01)
        if i in guided:
            with phase("manifold"):
                clock.sleep(0.004)
        prof.step_done()


def test_overhead_leaves_out_the_first_steps_guidance_alone_and_is_none_without_guidance(clock):
    """Two batches of 3 steps where only each batch's first step is guided (one guided step, as --steps 3
    --t-stop 1): the report leaves out the run's first step, so one guided step is left (the second batch's):
    4 ms of guidance over a 10 ms plain step is 0.4 (0.2 counting the first step's guided step as kept). A run
    with no guidance has no overhead (not -0.0); nor one whose steps are replayed from CUDA graphs."""
    from manifoldgd_fast.profile import format_table

    with profiling("cpu") as prof:
        for batch in range(2):
            _steps(prof, clock, 3)
    rep = prof.report()
    assert (rep["steps"], rep["guided_steps"]) == (6, 2) and rep["first_step_ms"] == pytest.approx(14)
    assert rep["guidance_overhead"] == pytest.approx(0.4) and rep["guidance_share"] == pytest.approx(4 / 54, abs=1e-4)
    assert rep["per_step_ms"] == pytest.approx(54 / 5)
    assert format_table(rep).splitlines()[1].startswith("guidance overhead: 40.0 % of a plain step (DiT forward + "
                                                        "scheduler) per guided step; 7.4 % of all step time")
    with profiling("cpu") as plain:           # e.g. --method dit
        _steps(plain, clock, 3, guided=())
    rep = plain.report()
    assert (rep["guided_steps"], rep["guidance_overhead"], rep["guidance_share"]) == (0, None, 0)
    assert format_table(rep).splitlines()[1].startswith("guidance overhead: n/a")
    with profiling("cpu") as graphs:          # a whole step replayed from a CUDA graph: guidance not separable
        for i in range(3):
            with phase("manifold"):
                clock.sleep(0.004)
            with phase("graph_step"):
                clock.sleep(0.01)
            graphs.step_done()
    assert graphs.report()["guidance_overhead"] is None
    with profiling("cpu") as first:           # --steps 2 --t-stop 0: the first step alone is guided, and left out
        _steps(first, clock, 2)
    rep = first.report()
    assert (rep["guided_steps"], rep["guidance_overhead"]) == (1, None)
    # (it said "no guided step" under a header counting 1 guided)
    assert format_table(rep).splitlines()[1] == "guidance overhead: n/a (the only guided step is the run's first, " \
        "which is left out: profile with more guided steps: --steps, --t-stop)"


def test_each_guidance_phase_makes_its_step_a_guided_one(clock):
    """The mode term, the cloud and patch terms, the manifold projection and CGS (its own method) each count
    their step as guided, and their time as guidance; a DiT forward or a scheduler step alone does not."""
    for name in ("mode_term", "cloud", "patch", "manifold", "cgs"):
        with profiling("cpu") as prof:
            for i in range(3):
                with phase("dit_forward"):
                    clock.sleep(0.01)
                with phase(name):
                    clock.sleep(0.002)
                with phase("scheduler"):
                    clock.sleep(0.001)
                prof.step_done()
        rep = prof.report()
        assert rep["guided_steps"] == 3 and rep["guidance_overhead"] == pytest.approx(2 / 11, abs=1e-4), name


def test_nothing_is_timed_while_suspended(clock):
    """Inside ``suspended()`` (a CUDA graph being captured: an event recorded there would be captured too) no
    phase is timed and ``active()`` is False; the profiler times again after it."""
    from manifoldgd_fast.profile import active, suspended

    with profiling("cpu") as prof:
        with suspended():
            assert not active()
            with phase("dit_forward"):
                clock.sleep(0.01)
        assert active()
        with phase("scheduler"):
            clock.sleep(0.001)
    assert set(prof.report()["phases"]) == {"scheduler"}


def test_the_json_report_is_written_atomically(tmp_path, monkeypatch):
    """--json replaces its file whole: a write that fails (a full disk) leaves the previous report as it was,
    and no temp file, and names the report's path."""
    import errno

    from manifoldgd_fast.profile import dump

    js = tmp_path / "p.json"
    dump({"steps": 1}, str(js))
    assert json.loads(js.read_text()) == {"steps": 1}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as e:
        dump({"steps": 2}, str(js))
    assert e.value.filename == str(js)
    assert json.loads(js.read_text()) == {"steps": 1} and os.listdir(tmp_path) == ["p.json"]


def test_profile_command(tiny_world, tmp_path, capsys, monkeypatch):
    import tempfile

    js = tmp_path / "p.json"
    made, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])
    base = ["--data", tiny_world["data"], "--model", tiny_world["model"], "--ipc", "2", "--steps", "6",
            "--t-stop", "2", "--cache-dir", os.path.join(tiny_world["root"], "cache")]
    assert main(["profile", *base, "--json", str(js)]) == 0
    table = capsys.readouterr().out
    assert "guidance overhead" in table and "| dit_forward |" in table
    assert "at the run's batch shape (3 classes a batch, padded where fewer)" in table
    rep = json.loads(js.read_text())
    assert rep["steps"] == 6 and rep["classes"] == ["apple"] and rep["formulation"] == "official"
    # the batch shape the whole run samples (16 // 2 = 8 classes a batch, the 3 the data set has), not 1 class's
    assert rep["class_batch"] == 3 and rep["loop"].startswith("eager")
    # its rate counts the padded batch as the 3 classes' images it stands for in the whole run
    assert rep["images_per_second"] == pytest.approx(3 * 2 / rep["wall_seconds"], rel=5e-2)  # (wall rounded to ms)
    # an explicit --class-batch beyond the data set's 3 classes is padding only: the rate counts 3
    assert main(["profile", *base, "--class-batch", "8", "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert rep["class_batch"] == 8 and rep["images_per_second"] == pytest.approx(3 * 2 / rep["wall_seconds"], rel=5e-2)
    assert {"dit_forward", "scheduler", "cloud", "manifold", "mode_term", "vae_decode", "io"} <= set(rep["phases"])
    # the reference ops time their kNN, Gram + eigensolve and projection too (as the kernels do)
    assert {"knn", "gram_eig", "projection"} <= set(rep["phases"])
    assert rep["guidance_overhead"] > 0 and rep["guided_steps"] == 3  # --t-stop 2: steps 5, 4, 3 guided
    assert not os.path.exists("distilled")                     # a temporary output, removed
    made = [d for d in made if os.path.basename(d).startswith("manifoldgd-profile-")]
    assert len(made) == 2 and not any(os.path.exists(d) for d in made)
    # profiling into a folder whose classes are finished times nothing: refused, not an empty table
    out = str(tmp_path / "out")
    assert main(["profile", *base, "--out", out]) == 0
    capsys.readouterr()
    assert main(["profile", *base, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the profiled classes (apple) are already distilled there" in err[0]
    # a distill run's OUT (all classes): profile's run is another one, and the refusal says what to give
    full = str(tmp_path / "full")
    assert main(["distill", *base, "--out", full]) == 0
    capsys.readouterr()
    assert main(["profile", *base, "--out", full]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and " holds a run with other parameters" in err[0], err
    assert err[0].endswith("; profile distils only its first --profile-classes classes, so give it a new --out, "
                           "or none (a temporary folder)"), err
    assert main(["profile", *base, "--method", "dit", "--json", str(js), "--profile-classes", "2",
                 "--class-batch", "1"]) == 0
    assert "images/s at the run's batch shape (1 class a batch, padded where fewer)" in capsys.readouterr().out
    rep = json.loads(js.read_text())
    assert rep["classes"] == ["apple", "banana"] and "manifold" not in rep["phases"]
    # two groups of one class: 2 classes' images in the wall time (not 3 groups: a floor + 1 for the ceiling)
    assert rep["images_per_second"] == pytest.approx(2 * 2 / rep["wall_seconds"], rel=5e-2)
    assert rep["guidance_overhead"] is None or rep["guidance_overhead"] == 0


def test_profile_under_torchrun_is_refused_in_one_line(tiny_world, capsys, monkeypatch):
    """profile distils its first classes in one process: under torchrun each rank profiled its deal of them
    into its own temporary OUT, and rank 1, dealt none, said "--out None: the profiled classes (apple) are
    already distilled there". It is refused before any rendezvous, as --shard is."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a rendezvous was tried"))
    assert main(["profile", "--data", tiny_world["data"], "--model", tiny_world["model"], "--ipc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["manifoldgd-fast: error: profile under torchrun (WORLD_SIZE 2): it runs its first classes in "
                   "one process; start it without torchrun (torchrun is for cache, modes and distill)"], err


def test_profile_resolves_the_data_sets_defaults_on_all_its_classes(tmp_path, monkeypatch):
    """Profiling 1 class of an 11-class folder runs with ImageNet-100/1k-sized defaults, not ImageNette's."""
    from manifoldgd_fast import pipeline
    from manifoldgd_fast.config import DistillConfig
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", [f"c{i:02d}" for i in range(11)], 1, size=8)
    seen = {}

    def fake_distill(run):
        seen["run"] = run
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "distill", fake_distill)
    for n_classes, want in ((11, dict(level=1, manifold_radius=0.1, bandwidth=0.1)),
                            (10, dict(level=6, manifold_radius=0.05, bandwidth=0.2))):
        cfg = DistillConfig(data=data, model="unused", classes=",".join(f"c{i:02d}" for i in range(n_classes)))
        with pytest.raises(RuntimeError, match="stop here"):
            pipeline.profile_run(cfg, classes=1, out=str(tmp_path / "out"))
        run = seen["run"]
        assert run.classes == "c00"
        assert {k: getattr(run, k) for k in want} == want, n_classes
    # a value the user set is kept
    cfg = DistillConfig(data=data, model="unused", manifold_radius=0.3)
    assert "manifold_radius" not in cfg.dataset_defaults(1000)
    assert cfg.resolve(1000).manifold_radius == 0.3 and cfg.resolve(1000).bandwidth == 0.1


def test_nvtx_ranges_fall_back_to_torch_without_the_nvtx_package(monkeypatch):
    """On CUDA each phase is an NVTX range: the nvtx package's when installed (the [cuda] extra), else
    torch.cuda.nvtx.range (the GPU image has no nvtx package), so Nsight shows the phases either way."""
    import sys
    import types

    from manifoldgd_fast import profile

    monkeypatch.setitem(sys.modules, "nvtx", None)                    # import nvtx -> ImportError
    assert profile._nvtx_range() is torch.cuda.nvtx.range
    fake = types.SimpleNamespace(annotate=lambda name: None)
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    assert profile._nvtx_range() is fake.annotate
    assert profile.Profiler("cpu")._nvtx_range is None                # the CPU times phases without NVTX


def test_a_profiler_on_the_auto_device():
    """profiling("auto") (DistillConfig's own default device) was torch's RuntimeError; a device no run takes is
    a ConfigError naming it."""
    from manifoldgd_fast.errors import ConfigError

    with profiling("auto") as prof:
        pass
    assert prof.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device mps: runs on cpu or cuda"):
        profiling("mps").__enter__()


def test_profile_json_is_never_written_over_what_the_run_reads_or_writes(tiny_world, tmp_path, capsys, monkeypatch):
    """--json M/transformer/config.json, --json of the --config file, or --json OUT/manifest.json wrote the report
    over the model's config / the parameters / the run's manifest, exit 0 (a finetune / profile audit): refused in
    one line before the run."""
    import shutil

    from manifoldgd_fast import pipeline

    monkeypatch.setattr(pipeline, "profile_run", lambda *a, **k: pytest.fail("profiled"))
    model = tmp_path / "model"
    shutil.copytree(tiny_world["model"], model)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"ipc": 2}))
    base = ["profile", "--data", tiny_world["data"], "--model", str(model), "--config", str(cfg)]
    inner = next(str(p) for p in model.rglob("config.json"))
    for extra, why in [(["--json", inner], f"inside --model {model}, which is read"),
                       (["--json", str(cfg)], f"inside --config {cfg}, which is read"),
                       (["--out", str(tmp_path / "o"), "--json", str(tmp_path / "o" / "manifest.json")],
                        f"inside --out {tmp_path / 'o'}, the folder the profiled classes are written to")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert json.loads(cfg.read_text()) == {"ipc": 2}


def test_profile_of_a_class_folder_named_with_a_comma(tiny_world, tmp_path, caplog):
    """profile passed its first classes on as "a,b": a folder "apple, red" was two classes, "apple" missing
    (a finetune / profile audit); distill took it. More --profile-classes than classes: said, all profiled."""
    import shutil

    from manifoldgd_fast.pipeline import profile_run

    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_world["data"], "apple"), data / "apple, red")
    shutil.copytree(os.path.join(tiny_world["data"], "banana"), data / "banana")
    rep = profile_run({"data": str(data), "model": tiny_world["model"], "ipc": 2, "steps": 6, "t_stop": 2,
                       "cache_dir": str(tmp_path / "cache"), "label_map": "sorted"}, classes=3)
    assert rep["steps"] > 0
    assert "--profile-classes 3: the data set has 2 classes; profiling all of them" in caplog.text
