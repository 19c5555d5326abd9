"""Several classes in one batch (--class-batch) against one class a batch, end to end, in one run.

    python bench/bench_class_batch.py                          # the shipped digits world, CPU
    python bench/bench_class_batch.py --ipc 1 10 --batch-size 64 --device cuda --json class_batch.json

Distils the embedded default (10 digit classes, the shipped DiT + VAE) once per (IPC, class batch)
in fresh output folders, after a warm-up that fills the latent cache of every class and runs one small
distill,
and reports the distill wall time, images/s and the ratio to --class-batch 1 measured in the same
run. Mode discovery, sampling, decode and PNG writing are all in the time. Any model folder and
data can be given instead (--data/--model, e.g. DiT-XL/2 with random weights on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _distill(out: str, args: list[str]) -> float:
    from manifoldgd_fast.cli import main

    t0 = time.perf_counter()
    if main(["distill", "--out", out, "--no-contact-sheet", *args]) != 0:
        raise SystemExit(f"distill failed: {args}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", default="", help="more distill flags, e.g. '--data D --model M --dtype bfloat16'")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    common = ["--device", a.device, "--batch-size", str(a.batch_size), *a.extra.split()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: the latent cache of every class the timed runs distil (same --extra, device and dtype: the
        # cache key holds the encode precision), then one small distill for the first calls' costs
        from manifoldgd_fast.cli import main as cli_main

        if cli_main(["cache", *common]) != 0:
            raise SystemExit(f"cache failed: {common}")
        _distill(os.path.join(tmp, "warm"), [*common, "--ipc", "1", "--classes", "0,1"])
        for ipc in a.ipc:
            for cb in ("1", "auto"):  # auto: the default, batch-size // ipc (at most the run's classes)
                flag = ["--class-batch", cb] if cb != "auto" else []
                times = [_distill(os.path.join(tmp, f"ipc{ipc}-{cb}-{r}"), [*common, "--ipc", str(ipc), *flag])
                         for r in range(a.repeats)]
                with open(os.path.join(tmp, f"ipc{ipc}-{cb}-0", "manifest.json")) as f:
                    man = json.load(f)
                rows.append(dict(ipc=ipc, class_batch=man["config"]["class_batch"], seconds=round(statistics.median(times), 2),
                                 images=len(man["classes"]) * ipc))
            base = next(r for r in rows if r["ipc"] == ipc and r["class_batch"] == 1)["seconds"]
            for r in rows:
                if r["ipc"] == ipc:
                    r["images_per_s"] = round(r["images"] / r["seconds"], 2)
                    r["speedup_vs_1"] = round(base / r["seconds"], 2)
    print(f"device {a.device}, batch size {a.batch_size}, cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print("| IPC | --class-batch | distill s | images/s | vs 1 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ipc']} | {r['class_batch']} | {r['seconds']} | {r['images_per_s']} | {r['speedup_vs_1']}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
