"""The GPU benchmark scripts run through on the CPU, so that GPU time is never spent finding a typo.

Each script has a CPU mode at toy sizes: ``--smoke`` (bench_kernels, bench_dit_ops: the kernels
interpreted under TRITON_INTERPRET=1) or ``--tiny`` (bench_sampling); bench_modes, bench_cache and bench_class_batch
take small sizes. These runs measure nothing and assert no figure: they check that every row of
the report is produced, on the same code paths the GPU run takes apart from the device.
(bench_sd's CPU run is in tests/test_sd.py.)
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, interpret=False, timeout=600, **extra_env):
    env = dict(os.environ, **extra_env)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, os.path.join("bench", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-4000:]
    return proc.stdout


def _table_rows(out, op):
    return [line for line in out.splitlines() if line.startswith(f"| {op} |")]


@pytest.mark.parametrize("script,ops", [
    ("bench_kernels.py", {"manifold_correct_fused": 2, "manifold_pull_fused": 1, "sym_eig": 2, "patch_sweep": 1}),
    ("bench_dit_ops.py", {"layernorm_modulate": 1, "gate_residual": 1, "attention": 1}),
])
def test_kernel_benchmarks_smoke(script, ops, tmp_path):
    from test_kernels_interpreter import _why_skip

    why = _why_skip()
    if why is not None:
        pytest.skip(f"the --smoke run interprets the kernels: {why}")
    csv = tmp_path / "out.csv"
    out = _run(script, "--smoke", "--csv", str(csv), interpret=True)
    assert out.startswith("# smoke run on the CPU"), out[:200]
    for op, n in ops.items():
        assert len(_table_rows(out, op)) == n, (op, out)
    assert sum(1 for _ in open(csv)) == 1 + sum(ops.values())


def test_kernel_benchmarks_refuse_smoke_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join("bench", "bench_kernels.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr


def test_bench_sampling_tiny(tmp_path):
    import importlib.util

    js, png = tmp_path / "sampling.json", tmp_path / "sampling.png"
    chart = importlib.util.find_spec("matplotlib") is not None          # the chart needs the [bench] extra
    out = _run("bench_sampling.py", "--tiny", "--device", "cpu", "--steps", "2", "--reps", "1", "--json", str(js),
               *(["--png", str(png)] if chart else []))
    if chart:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(js.read_text())
    rows = {r["row"] for r in res["results"]}
    for method in ("dit", "mgd3", "manifoldgd"):
        assert {f"ours-reference-{method}", f"ours-fast-{method}", f"ours-fast-fused-{method}"} <= rows, rows
    assert "diffusers-fp32" in rows and all(r["images_per_s"] > 0 for r in res["results"])
    assert res["numerics"]["rule_ok"] is True and "numerics" in out


def test_bench_modes_and_cache_small():
    out = _run("bench_modes.py", "--device", "cpu", "--classes", "1", "--n", "60", "--dim", "64", "--ipc", "2")
    assert "divisive (official)" in out and "kmeans (official)" in out and "divisive (paper)" in out
    out = _run("bench_cache.py", "--device", "cpu", "--vae", "shipped", "--n", "16", "--classes", "2", "--batch", "8", "--workers", "0",
               "1", "--repeat", "1")
    assert "byte-identical across num_workers [0, 1]: yes" in out


def test_bench_class_batch_small(tmp_path):
    """The digits world at IPC 5, 4 steps: one row for --class-batch 1, one for the default (16 // 5 = 3)."""
    js = tmp_path / "cb.json"
    out = _run("bench_class_batch.py", "--ipc", "5", "--extra", "--steps 4 --t-stop 2", "--json", str(js),
               MANIFOLDGD_CACHE=str(tmp_path / "cache"))
    rows = json.loads(js.read_text())
    assert [(r["ipc"], r["class_batch"], r["images"]) for r in rows] == [(5, 1, 50), (5, 3, 50)], rows
    assert all(r["images_per_s"] > 0 for r in rows) and "| 5 | 3 |" in out


def test_gpu_session_script_names_what_exists():
    """bench/gpu_session.sh parses, every test file it runs exists, and every --rows name it passes is a row
    bench_sampling.py builds on a GPU (with its torch.compile rows unless that command says --no-compile):
    a typo there would cost a GPU session's minutes."""
    import re
    import shlex

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_sampling import plan_rows

    path = os.path.join(ROOT, "bench", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read().replace("\\\n", " ")
    tests = set(re.findall(r"\btests/[\w/]+\.py\b", text))
    assert "tests/test_kernels_triton.py" in tests and all(os.path.isfile(os.path.join(ROOT, t)) for t in tests), tests
    commands = [line for line in text.splitlines() if "bench_sampling.py" in line and "--rows" in line]
    assert commands
    for line in commands:
        words = shlex.split(line.split("2>&1")[0])
        names = words[words.index("--rows") + 1:]
        names = names[:next((i for i, w in enumerate(names) if w.startswith("--")), len(names))]
        built = {n for n, _, _ in plan_rows(cuda=True, compile_rows="--no-compile" not in words)}
        assert names and set(names) <= built, sorted(set(names) - built)
    for script in set(re.findall(r"\bbench/(\w+\.py)\b", text)):
        assert os.path.isfile(os.path.join(ROOT, "bench", script)), script



def test_device_stack_script_installs_what_setup_py_requires():
    """bench/device_stack.sh (the suite under the GPU image's packages) parses, and its one pip install names
    every package setup.py requires and every one of the dev extra: one added to setup.py and not there would
    fail that run at import, not on what it is meant to find."""
    import ast
    import re

    path = os.path.join(ROOT, "bench", "device_stack.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read().replace("\\\n", " ")
    (install,) = [line for line in text.splitlines() if "/bin/pip\" install" in line]
    installed = {re.split(r"[=<>\"]", w.strip('"'))[0].lower().replace("_", "-")
                 for w in install.split("install", 1)[1].split() if not w.startswith("-")}
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    wanted = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "requires":
            wanted |= {ast.literal_eval(e) for e in node.value.elts}
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            wanted |= set(ast.literal_eval(node.value)["dev"])
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "append":
            wanted |= {ast.literal_eval(a) for a in node.args if isinstance(a, ast.Constant)}
    names = {re.split(r"[=<>;\s]", w)[0].lower().replace("_", "-") for w in wanted}
    assert "torch" in names and "pytest" in names and "triton" in names
    assert names <= installed, sorted(names - installed)


def test_bench_sampling_refuses_an_unknown_row(capsys):
    """A --rows name the benchmark does not build is refused (rc 2, naming the rows there are), not run as
    an empty table."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_sampling import main as bench_main

    assert bench_main(["--tiny", "--device", "cpu", "--steps", "1", "--rows", "ours-fast-dit", "ours-fats-dit"]) == 2
    out = capsys.readouterr().out
    assert "no row named ours-fats-dit" in out and "ours-fast-dit" in out.split("(rows:")[1]
