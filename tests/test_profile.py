"""The profiler: phases of a short run, the guidance overhead headline, JSON output."""
import json
import os
import time

from manifoldgd_fast.cli import main
from manifoldgd_fast.profile import phase, profiling


def test_profiler_times_phases_and_is_a_noop_when_inactive():
    with phase("outside"):  # no profiler: nothing recorded, nothing raised
        pass
    with profiling("cpu") as prof:
        for _ in range(3):
            with phase("dit_forward"):
                time.sleep(0.01)
            with phase("manifold"):
                time.sleep(0.005)
            prof.step_done()
    rep = prof.report()
    assert rep["steps"] == 3 and set(rep["phases"]) == {"dit_forward", "manifold"}
    assert rep["phases"]["dit_forward"]["total_ms"] >= 30
    assert 0.3 < rep["guidance_overhead"] < 0.8              # ~5 ms of guidance per ~10 ms unguided step
    assert abs(sum(v["share_of_step"] for v in rep["phases"].values()) - 1) < 1e-3


def test_profile_command(tiny_world, tmp_path, capsys):
    js = tmp_path / "p.json"
    base = ["--data", tiny_world["data"], "--model", tiny_world["model"], "--ipc", "2", "--steps", "6",
            "--t-stop", "2", "--cache-dir", os.path.join(tiny_world["root"], "cache")]
    assert main(["profile", *base, "--json", str(js)]) == 0
    table = capsys.readouterr().out
    assert "guidance overhead" in table and "| dit_forward |" in table
    rep = json.loads(js.read_text())
    assert rep["steps"] == 6 and rep["classes"] == ["apple"] and rep["formulation"] == "official"
    assert {"dit_forward", "scheduler", "cloud", "manifold", "mode_term", "vae_decode", "io"} <= set(rep["phases"])
    assert rep["guidance_overhead"] > 0
    assert not os.path.exists("distilled")                     # a temporary output, removed
    assert main(["profile", *base, "--method", "dit", "--json", str(js), "--profile-classes", "2"]) == 0
    rep = json.loads(js.read_text())
    assert rep["classes"] == ["apple", "banana"] and "manifold" not in rep["phases"]
    assert rep["guidance_overhead"] is None or rep["guidance_overhead"] == 0
