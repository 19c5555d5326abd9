"""The digits comparison table of the README, in one command.

    python -m manifoldgd_fast.demo.compare [--out compare] [--ipc 1 5 10] [--seeds 3] [--epochs 200]

For each IPC it builds a distilled set per method (five by default) of the digits train split and
trains ConvNet-6 on each (hard labels, SPEC 7's optimiser and augmentation,
``--epochs`` epochs, mean ± std over ``--seeds`` seeds), testing on the
digits test split:

- ``random``: IPC real train images per class, drawn at random (seeded);
- ``kmeans``: the k-means centroids of the class latents, decoded by the VAE;
- ``dit``, ``mgd3``, ``manifoldgd``: the sampler's three methods (official formulation);

plus the whole real train split as the ceiling. Writes ``OUT/results.json``,
``OUT/results.md`` and ``OUT/accuracy_vs_ipc.png`` (matplotlib, from the
``bench`` extra). Every stage resumes: finished sets and evaluations are reused.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys

import numpy as np
import torch

from ..cli import at_least_one
from ..config import DistillConfig, derive_seed
from ..output import OutputWriter, atomic_write_text, write_folder_atomically

METHODS = ("random", "kmeans", "dit", "mgd3", "manifoldgd")
# more rows on request (--methods): CGS alone, CGS on ManifoldGD, and CGS on an RSM fine-tuned DiT
EXTRA = ("cgs", "manifoldgd+cgs", "rsm+cgs")
RSM_STEPS = 300


def _random_real(train: str, out: str, ipc: int, seed: int) -> None:
    from ..data import scan_image_folder

    if os.path.isfile(os.path.join(out, "manifest.json")):
        return

    def fill(tmp):
        for e in scan_image_folder(train, label_map="sorted"):
            g = torch.Generator().manual_seed(derive_seed(seed, "random", e.name))
            pick = torch.randperm(len(e.files), generator=g)[:ipc].tolist()
            os.makedirs(os.path.join(tmp, e.name))
            for i, j in enumerate(sorted(pick)):
                shutil.copyfile(e.files[j], os.path.join(tmp, e.name, f"{i}.png"))
        atomic_write_text(os.path.join(tmp, "manifest.json"), json.dumps({"method": "random", "ipc": ipc}))

    write_folder_atomically(out, fill)


def _kmeans_decoded(base: DistillConfig, out: str) -> None:
    from ..latents import load_class_latents
    from ..classrun import check_decoded, class_modes, decode_latents
    from ..pipeline import prepare

    if os.path.isfile(os.path.join(out, "manifest.json")):
        return
    cfg = DistillConfig.from_dict({**base.to_dict(), "method": "mgd3", "mode_method": "kmeans", "out": out})
    ctx = prepare(cfg)
    rcfg = cfg.resolve(len(ctx["entries"]))
    writer = OutputWriter(out)
    for e in ctx["entries"]:
        z, _ = load_class_latents(ctx["cache"], e.name)
        modes = class_modes(rcfg, e.name, z.float())
        images, finite = decode_latents(ctx["vae"], modes, 64, torch.float32)
        check_decoded(finite, e.name, torch.float32)
        writer.write_class(e.name, images, modes, {"label": e.label})
    writer.write_manifest({"method": "kmeans-decoded", "ipc": cfg.ipc, "config": rcfg.to_dict()})


def _evaluate(folder: str, val: str, seeds: int, epochs: int) -> dict:
    from ..eval.protocol import evaluate

    path = os.path.join(folder, "eval.json")
    if os.path.isfile(path):  # a rerun's: taken where it is this evaluation (its val set, net, epochs, seeds)
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
            if (isinstance(res, dict) and res.get("epochs") == epochs and len(res.get("seeds", [])) == seeds
                    and res.get("real_val") == os.path.abspath(val) and "convnet6" in res.get("nets", {})):
                return res
    return evaluate(folder, val, nets=("convnet6",), seeds=seeds, epochs=epochs, progress=False)


def _rsm_model(out: str, train: str, seed: int) -> str:
    """The shipped digits DiT fine-tuned with RSM (resumable), once per comparison folder."""
    from ..finetune import finetune
    from ..shipped import verify_shipped

    folder = os.path.join(out, "rsm-model")
    if not os.path.isdir(os.path.join(folder, "transformer")):
        finetune(data=train, model=verify_shipped(), out=folder, steps=RSM_STEPS, batch_size=64, seed=seed,
                 device="cpu", ema_decay=0.99)
    return folder


def run(out: str, ipcs=(1, 5, 10), seeds: int = 3, epochs: int = 200, ceiling_epochs: int = 30,
        seed: int = 0, methods=METHODS) -> dict:
    from ..demo.digits import export_digits
    from ..pipeline import distill

    root = export_digits()
    train, val = os.path.join(root, "train"), os.path.join(root, "test")
    results: dict = {"epochs": epochs, "seeds": seeds, "ceiling_epochs": ceiling_epochs, "rows": {}}
    for ipc in ipcs:
        base = DistillConfig(ipc=ipc, seed=seed, contact_sheet=False)
        for m in methods:
            folder = os.path.join(out, f"{m.replace('+', '-')}-ipc{ipc}")
            if os.path.isfile(os.path.join(folder, "eval.json")):
                pass  # built and evaluated by an earlier run (maybe an older version): reuse as is
            elif m == "random":
                _random_real(train, folder, ipc, seed)
            elif m == "kmeans":
                _kmeans_decoded(base, folder)
            elif m in EXTRA:
                method = {"cgs": "cgs", "manifoldgd+cgs": "manifoldgd", "rsm+cgs": "cgs"}[m]
                extra = {"method": method, "cgs": True, "out": folder}
                if m == "rsm+cgs":
                    extra.update(model=_rsm_model(out, train, seed), data=train)
                distill(DistillConfig.from_dict({**base.to_dict(), **extra}))
            else:
                distill(DistillConfig.from_dict({**base.to_dict(), "method": m, "out": folder}))
            r = _evaluate(folder, val, seeds, epochs)["nets"]["convnet6"]
            results["rows"].setdefault(m, {})[ipc] = (r["best_mean"], r["best_std"], r["final_mean"], r["final_std"])
            print(f"IPC {ipc:>2} {m:<11} best {r['best_mean']:.2f} ± {r['best_std']:.2f}  "
                  f"final {r['final_mean']:.2f} ± {r['final_std']:.2f}", flush=True)
    full = os.path.join(out, "full-train")
    if not os.path.isdir(full):  # whole or absent: a copy cut short was evaluated as the train set by every rerun
        write_folder_atomically(full, lambda tmp: shutil.copytree(train, tmp, dirs_exist_ok=True))
    r = _evaluate(full, val, seeds, ceiling_epochs)["nets"]["convnet6"]
    results["ceiling"] = (r["best_mean"], r["best_std"], r["final_mean"], r["final_std"])
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    atomic_write_text(os.path.join(out, "results.md"), table(results, ipcs))
    plot(results, ipcs, os.path.join(out, "accuracy_vs_ipc.png"))
    return results


def table(results: dict, ipcs) -> str:
    head = "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |"
    lines = [head, "|---" * (len(ipcs) + 1) + "|"]
    for m, row in results["rows"].items():
        cells = [f"{row[i][0]:.1f} ± {row[i][1]:.1f}" if i in row else "—" for i in ipcs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    c = results["ceiling"]
    lines.append(f"| full train set (ceiling, {results['ceiling_epochs']} epochs) | "
                 + " | ".join([f"{c[0]:.1f} ± {c[1]:.1f}"] * len(ipcs)) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, ipcs, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, row in results["rows"].items():
        xs = [i for i in ipcs if i in row]
        ys = np.array([row[i][0] for i in xs])
        es = np.array([row[i][1] for i in xs])
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.axhline(results["ceiling"][0], color="k", ls="--", lw=1, label="full train set")
    ax.set_xscale("log")
    ax.set_xticks(list(ipcs))
    ax.set_xticklabels([str(i) for i in ipcs])
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("ConvNet-6 test top-1 (%)")
    ax.set_title("Distilled digits: accuracy vs IPC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PROG = "python -m manifoldgd_fast.demo.compare"


def main(argv=None) -> int:
    from ..errors import ManifoldGDError

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="compare", help="folder of the sets, evaluations and table (default: compare)")
    ap.add_argument("--ipc", type=at_least_one, nargs="+", default=[1, 5, 10],
                    help="images per class, one column each (default: 1 5 10)")
    ap.add_argument("--seeds", type=at_least_one, default=3, help="training seeds per set (default: 3)")
    ap.add_argument("--epochs", type=at_least_one, default=200, help="ConvNet-6 epochs per set (default: 200)")
    ap.add_argument("--ceiling-epochs", type=at_least_one, default=30,
                    help="epochs on the full train set, the ceiling row (default: 30)")
    ap.add_argument("--seed", type=int, default=0, help="distillation and random-pick seed (default: 0)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS + EXTRA),
                    help="rows of the table (default: random kmeans dit mgd3 manifoldgd; "
                         "the CGS / RSM rows: cgs, manifoldgd+cgs, rsm+cgs)")
    a = ap.parse_args(argv)
    try:
        res = run(a.out, a.ipc, a.seeds, a.epochs, a.ceiling_epochs, a.seed, methods=a.methods)
    except ManifoldGDError as e:  # bad input: one line, no traceback; finished sets stay for a rerun
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    print(table(res, a.ipc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
