"""What the GPU kernel benchmarks share: timing, torch.compile of a reference, the report.

Imported by bench/bench_kernels.py and bench/bench_dit_ops.py (run as scripts, so bench/ is on
sys.path). ``--smoke`` runs a script on the CPU under ``TRITON_INTERPRET=1`` at tiny shapes, one
timed call per row and no torch.compile: it measures nothing, and shows that the script runs
through before GPU time is spent on it (tests/test_bench_smoke.py).
"""
from __future__ import annotations

import csv
import datetime
import os
import sys
import time

import torch

DEV = "cuda"      # the scripts' device; "cpu" under --smoke
SMOKE = False
COMPILE = True    # False with --no-compile or --smoke: no torch.compile column (its compiles take most of a run's time)


def bench_ms(fn, quick: bool) -> list[float]:
    """[median, p20, p80] ms of ``fn()``: ``triton.testing.do_bench`` (warm-up excluded, device synchronised)."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return [ms, ms, ms]
    import triton.testing

    rep = 20 if quick else 100
    q = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=rep, quantiles=[0.5, 0.2, 0.8])
    if q[0] > rep / 5:  # do_bench fits only a sample or two of a slow call (a reference) in rep ms: time 3 more
        ts = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end))
        ts.sort()
        q = [ts[1], ts[0], ts[2]]
    return q


PARTIAL = None    # main's --csv + ".rows.jsonl": every row as it finishes (a run cut at its deadline keeps them)


def row(**fields) -> dict:
    """One finished case: printed (flushed) at once and appended to :data:`PARTIAL`, so a run killed at its
    time limit keeps every row it finished; :func:`main` prints the tables and writes the CSV at the end."""
    print("  row " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()),
          flush=True)
    if PARTIAL is not None:
        import json

        with open(PARTIAL, "a") as f:
            f.write(json.dumps(fields, default=str) + "\n")
    return fields


def compiled(fn, *args):
    """``torch.compile(fn)`` warmed up on ``args``, or None (reported) when it does not compile."""
    if not COMPILE:
        return None
    try:
        c = torch.compile(fn, dynamic=False)
        c(*args)
        return c
    except Exception as e:  # e.g. a reference that syncs with the host: report, do not fail the benchmark
        print(f"  torch.compile of the reference failed: {type(e).__name__}: {str(e)[:120]}")
        return None


def main(script: str, cases, description: str, argv=None, quick_help: str = "fewer cases and repetitions") -> int:
    """Parse --quick / --csv, run ``cases(quick) -> rows`` on the GPU, print markdown tables (one per row
    layout), write one CSV (the union of the columns)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--csv", default=None, help=f"default: bench/{script.removeprefix('bench_')}.csv (none with --smoke)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script runs, measures nothing")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the references")
    args = ap.parse_args(argv)
    global DEV, SMOKE, COMPILE, PARTIAL
    COMPILE = not args.no_compile
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            ap.error("--smoke runs the kernels interpreted: set TRITON_INTERPRET=1")
        DEV, SMOKE, COMPILE, args.quick = "cpu", True, False, True
    elif not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU (none here); nothing measured.")
        return 0
    else:
        args.csv = args.csv or f"bench/{script.removeprefix('bench_')}.csv"
        PARTIAL = args.csv + ".rows.jsonl"
        if os.path.exists(PARTIAL):
            os.remove(PARTIAL)
    import triton

    device = "smoke run on the CPU (interpreted; no figures)" if SMOKE else torch.cuda.get_device_name()
    print(f"# {device} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.date.today()} | python bench/{script}.py {' '.join(argv or sys.argv[1:])}")
    rows = cases(args.quick)
    groups: dict[tuple, list] = {}            # one markdown table per row layout (e.g. elementwise ops, attention)
    for r in rows:
        groups.setdefault(tuple(r), []).append(r)
    for layout, group in groups.items():
        print("| " + " | ".join(layout) + " |")
        print("|" + "---|" * len(layout))
        for r in group:
            print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
        print()
    cols = list(dict.fromkeys(c for layout in groups for c in layout))
    if args.csv is None:
        return 0
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
    return 0
