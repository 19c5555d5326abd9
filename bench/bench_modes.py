"""Mode discovery cost at ImageNet size: seconds per class and projected minutes for 1,000 classes.

    python bench/bench_modes.py [--device cuda] [--classes 3] [--n 1300] [--dim 4096] [--ipc 10 50]

Synthetic class latents (a Gaussian mixture of 20 blobs, D = 4 x 32 x 32) stand
in for a real class: the cost depends on n, D and IPC, not on the images.
"""
import argparse
import time

import torch

from manifoldgd_fast.modes import discover_modes


def class_latents(n, dim, seed, device):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g)
    idx = torch.randint(20, (n,), generator=g)
    return (centres[idx] + 0.5 * torch.randn(n, dim, generator=g)).to(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--n", type=int, default=1300)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    a = ap.parse_args()
    import datetime

    name = torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda") else "cpu"
    print(f"# {datetime.date.today()} | {name} | torch {torch.__version__}", flush=True)
    rows = []
    for ipc in a.ipc:
        for method, form in [("kmeans", "official"), ("divisive", "official"), ("divisive", "paper")]:
            # one untimed class first: CUDA's context, kernels' first loads and allocator growth are not a class's
            discover_modes(class_latents(a.n, a.dim, 10_000, a.device), ipc, method=method, formulation=form,
                           seed=0, level=1 if form == "official" else 2)
            times = []
            for c in range(a.classes):
                z = class_latents(a.n, a.dim, c, a.device)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                discover_modes(z, ipc, method=method, formulation=form, seed=c,
                               level=1 if form == "official" else 2)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            med = sorted(times)[len(times) // 2]
            rows.append((ipc, f"{method} ({form})", med, med * 1000 / 60))
            print(f"  IPC {ipc} {method} ({form}): {med:.2f} s / class", flush=True)   # kept if the run is cut
    print(f"device={a.device} torch={torch.__version__} n={a.n} D={a.dim} classes timed={a.classes}")
    print("| IPC | method | s / class (median) | min for 1,000 classes |")
    print("|---|---|---|---|")
    for ipc, m, s, mins in rows:
        print(f"| {ipc} | {m} | {s:.2f} | {mins:.1f} |")


if __name__ == "__main__":
    main()
