"""Wall time of the embedded default: `manifoldgd-fast distill` with no arguments (digits, IPC 10, ManifoldGD).

    python bench/bench_demo.py [--repeats 1]

Runs the command in a fresh output folder each time (the digits export and
latent cache are warmed first and timed separately) and prints the times and
the machine's load, for bench/RESULTS.md. The goal is <= 2 minutes on 2 cores.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time


def run(out):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "manifoldgd_fast", "distill", "--out", out], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first = run(os.path.join(tmp, "warm"))     # exports digits + fills the latent cache if needed
        times = [run(os.path.join(tmp, f"r{i}")) for i in range(a.repeats)]
    print(f"first run (incl. digits export + latent cache if cold): {first:.1f} s")
    print(f"warm runs: {', '.join(f'{t:.1f}' for t in times)} s   (cores: {os.cpu_count()}, "
          f"load average: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
