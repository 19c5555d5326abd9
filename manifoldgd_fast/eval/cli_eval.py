"""Flags of ``manifoldgd-fast eval`` and ``manifoldgd-fast metrics``, and their runners.

``cli.py`` owns the parser and the exit codes; it calls::

    sp = sub.add_parser("eval", ...);    add_eval_args(sp)
    sp = sub.add_parser("metrics", ...); add_metrics_args(sp)
    ...
    run_eval_from_args(ns)      # or run_metrics_from_args(ns)

The runners raise ManifoldGDError subclasses on bad input, print a summary to
stdout, and return the result dict.
"""
from __future__ import annotations

import argparse
import os

from ..data import RESAMPLERS
from .nets import NET_NAMES

EVAL_HELP = "train ConvNet-6 / ResNetAP-10 / ResNet-18 on a distilled folder, test top-1 on real validation images"
METRICS_HELP = "FID, L2, MMD, representativeness and diversity of a distilled folder against real images"


def _seeds(text: str):
    """``3`` -> 3 seeds (0, 1, 2); ``0,5,7`` -> those seeds; ``5,`` -> seed 5 alone."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count (3) or a list of seeds (0,5,7)") from None


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("evaluation (SPEC 7)")
    g.add_argument("--distilled", nargs="+", default=["distilled"], metavar="OUT",
                   help="distilled folder OUT/<class>/<i>.png (default: distilled, where `distill` writes); "
                        "several folders with the same classes (e.g. distilled with --seed 0, 1, 2) are reported "
                        "one by one and pooled: mean ± std over all (folder, seed) runs, as the release's std over "
                        "3 distilled sets")
    g.add_argument("--real-val", default=None, metavar="VAL",
                   help="real validation folder VAL/<class>/<image>, the same class names (default: the digits "
                        "test split when OUT is the embedded demo's output)")
    g.add_argument("--val-labels", default=None, metavar="FILE",
                   help="VAL is a flat folder of images (ImageNet's validation set as distributed) and FILE names "
                        "each one's class: Kaggle's LOC_val_solution.csv, the ILSVRC-2012 devkit (its folder or "
                        "ILSVRC2012_devkit_t12.tar.gz), or '<image> <class>' lines (default: none, VAL is "
                        "VAL/<class>/<image>)")
    g.add_argument("--restrict-val", action="store_true",
                   help="use only the validation classes the distilled folder has (a subset's OUT against all of "
                        "ImageNet's val); every distilled class must still be there")
    g.add_argument("--val-resize", type=int, default=None, metavar="PX",
                   help="short side of the validation images before the centre crop to --size (default: "
                        "--size x 256/224, i.e. resize 256 / crop 224 as SPEC 7; 224 at 224 px is the release's "
                        "Resize(224) + CenterCrop(224))")
    g.add_argument("--resample", choices=tuple(RESAMPLERS), default="bicubic",
                   help="how every image is resized: bicubic = DiT's preprocessing (BOX halving, then bicubic); "
                        "bilinear = torchvision's Resize + CenterCrop, as the release's evaluation")
    g.add_argument("--nets", default=None, help=f"comma-separated, from {', '.join(NET_NAMES)} "
                                                f"(default: all three; resnet18 with --teacher, the student of MGD3's and RDED's "
                                                f"soft-label protocol; convnet6 for the digits demo)")
    g.add_argument("--seeds", type=_seeds, default=3,
                   help="number of seeds (3: seeds 0, 1, 2) or a list such as 0,5,7 (one seed: 5,)")
    g.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 2000 for IPC <= 10, 1500 <= 50, 1000 <= 200, 500 <= 500, else 300, "
                        f"x 2/3 for 100 classes rounded down to 100s as IDC; 300 soft-label; {DEMO_EPOCHS} for the "
                        "digits demo)")
    g.add_argument("--size", type=int, default=None, help="training / test resolution (default: 224, or the "
                                                          "distilled images' size if smaller)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="training batch size (default: 64; 128 for more than 100 classes; with --teacher RDED's "
                        "10 / 50 / 100 for IPC 1 / <= 10 / more, twice that from 100 classes, at most the set's size)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: SGD 0.01, 0.1 for more than 100 classes; AdamW 1e-3 with --teacher)")
    g.add_argument("--teacher", default=None, metavar="PATH",
                   help="soft-label protocol: a saved nn.Module, a state dict of one of the nets or of "
                        "torchvision's ResNet-18, or imagenet-resnet18 (torchvision's ImageNet weights from "
                        "$TORCH_HOME/hub/checkpoints); an ImageNet teacher answers for the folder's WordNet ids "
                        "(default: none, hard labels)")
    g.add_argument("--temperature", type=float, default=None,
                   help="soft-label temperature (> 0; default 20, RDED's with CutMix)")
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="on CUDA: bf16 autocast + channels_last + cudnn.benchmark (fast; runs may differ in the "
                        "last bits), or fp32 as the release, with deterministic algorithms where torch has them "
                        "(a seed then gives the same run); the CPU always runs fp32")
    g.add_argument("--eval-every", type=int, default=None,
                   help="test every N epochs (default: epochs // 100; with --teacher every 10th epoch past 80 %% "
                        "of the run, as RDED)")
    g.add_argument("--val-batch-size", type=int, default=500, help="validation batch size")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--out-json", default=None,
                   help="where the results go, a markdown table beside it (default: OUT/eval.json; with several "
                        "--distilled folders, the first one's eval_pooled.json)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return parser


def add_metrics_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("distribution metrics (SPEC 7)")
    g.add_argument("--distilled", default="distilled", metavar="OUT",
                   help="distilled folder OUT/<class>/<i>.png (default: distilled, where `distill` writes)")
    g.add_argument("--real", default=None, metavar="TRAIN",
                   help="real folder holding every distilled class (default: the digits training split when OUT "
                        "is the embedded demo's output)")
    g.add_argument("--encoder", default=None, metavar="PATH",
                   help="feature encoder: imagenet-resnet18 (torchvision's ImageNet ResNet-18 from "
                        "$TORCH_HOME/hub/checkpoints, as the papers use; never downloaded), a saved nn.Module, "
                        "a net checkpoint or a state dict (default: a ResNet-18 trained on --real by this "
                        "command, cached)")
    g.add_argument("--fid-encoder", default=None, metavar="PATH",
                   help="encoder of the FID alone: fid-inception (pytorch-fid's Inception-V3 weights from "
                        "$TORCH_HOME/hub/checkpoints, at 299 px: the papers' FID; never downloaded) or any "
                        "--encoder source (default: the --encoder, as SPEC 7 asks)")
    g.add_argument("--fid-resize", choices=("crop", "squash"), default=None,
                   help="the FID's images: crop = short side resized (PIL bicubic) + centre crop, as every other "
                        "metric; squash = the whole image resized to the FID encoder's size (PIL bilinear) and, "
                        "with fid-inception, pixels scaled (u - 128) / 128: the release's fid.py (torchmetrics) "
                        "(default: squash with --fid-encoder fid-inception or its weights' file, the papers' FID; "
                        "else crop)")
    g.add_argument("--size", type=int, default=None, help="encoder resolution (default: the encoder's own, "
                                                          "else 224, or the distilled images' size if smaller)")
    g.add_argument("--k", type=int, default=50, help="representativeness: the k most similar real images")
    g.add_argument("--max-real-per-class", type=int, default=None,
                   help="cap on real images per class: a random subset seeded by the class name, the same every "
                        "run (default: all)")
    g.add_argument("--mmd-max-real", type=int, default=5000, help="real points in the MMD (random subset)")
    g.add_argument("--encoder-epochs", type=int, default=30, help="training epochs of the default encoder")
    g.add_argument("--cache-dir", default=None, help="cache root of the default encoder and of the real images' "
                                                     "features (default $MANIFOLDGD_CACHE or ~/.cache/manifoldgd_fast)")
    g.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the real images' features per class and encoder, and reuse them in later runs "
                        "(an edited class folder is re-encoded)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--out-json", default=None, help="where the metrics go (default: OUT/metrics.json)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return parser


DEMO_EPOCHS = 200  # the digits demo: about 440 CPU-s a seed (bench/RESULTS.md)


def _demo_real(distilled: str, split: str) -> str | None:
    """The digits split ("val": its test split; "train": the folder it was distilled from) recorded by the
    embedded demo's manifest, if OUT is one."""
    import json

    path = os.path.join(distilled, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    extra = manifest.get("extra") if isinstance(manifest, dict) else None
    if not isinstance(extra, dict):
        return None
    if extra.get("demo") != "digits":
        return None
    return extra.get("real_val") if split == "val" else manifest.get("data")


def _check_folders(**flags: str | None) -> None:
    """Each given folder flag names an existing folder (DataError naming the flag otherwise)."""
    from ..errors import DataError

    for flag, path in flags.items():
        if path is not None and not os.path.isdir(path):
            raise DataError(f"--{flag.replace('_', '-')} {path}: " + ("not a folder" if os.path.exists(path)
                            else "no such folder"))


def run_eval_from_args(ns: argparse.Namespace) -> dict:
    from ..errors import ConfigError
    from .protocol import evaluate
    from .report import markdown_table

    folders = [ns.distilled] if isinstance(ns.distilled, str) else list(ns.distilled)
    for folder in folders:
        _check_folders(distilled=folder)
    demo_val = _demo_real(folders[0], "val")
    if ns.real_val is None:
        if demo_val is None:
            raise ConfigError(f"--real-val is required: {folders[0]} is not the embedded demo's output")
        ns.real_val = demo_val
    _check_folders(real_val=ns.real_val)
    demo = ns.real_val == demo_val
    if ns.nets is None and demo:  # (else evaluate's default: all three, or the soft-label protocol's resnet18)
        ns.nets = "convnet6"
    if ns.epochs is None and demo:
        ns.epochs = DEMO_EPOCHS
    res = evaluate(folders[0] if len(folders) == 1 else folders, ns.real_val, nets=ns.nets, seeds=ns.seeds,
                   epochs=ns.epochs, size=ns.size, batch_size=ns.batch_size, lr=ns.lr, device=ns.device,
                   teacher=ns.teacher, temperature=ns.temperature, eval_every=ns.eval_every,
                   val_batch_size=ns.val_batch_size, val_resize=ns.val_resize, resample=ns.resample,
                   restrict_val=ns.restrict_val, val_labels=ns.val_labels, precision=ns.precision,
                   out_json=ns.out_json, progress=ns.progress)
    print(markdown_table(res), end="")
    if res.get("resumed_runs"):
        n = res["resumed_runs"]
        print(f"{n} of the runs {'was' if n == 1 else 'were'} finished by a killed evaluation with the same settings "
              f"and images, and taken from it")
    recorded = [m for m in res.get("manifests", [res.get("manifest")]) if m]
    print(f"results: {res['files']['json']}, {res['files']['markdown']}"
          + (f"; recorded in {', '.join(recorded)}" if recorded else ""))
    return res


def run_metrics_from_args(ns: argparse.Namespace) -> dict:
    from ..errors import ConfigError
    from .metrics import compute_metrics

    if ns.distilled == "distilled" and not os.path.isdir(ns.distilled):
        raise ConfigError("--distilled: no folder 'distilled' here (the default, where `distill` writes): give "
                          "--distilled OUT")
    _check_folders(distilled=ns.distilled)
    if ns.real is None:
        ns.real = _demo_real(ns.distilled, "train")
        if ns.real is None:
            raise ConfigError(f"--real is required: {ns.distilled} is not the embedded demo's output")
        if not os.path.isdir(ns.real):
            raise ConfigError(f"--real: the digits' training split {ns.real}, which the demo's manifest names, is "
                              f"gone (run `manifoldgd-fast distill` again to export it) or give --real TRAIN")
    _check_folders(real=ns.real)
    res = compute_metrics(ns.distilled, ns.real, encoder=ns.encoder, size=ns.size, device=ns.device, k=ns.k,
                          max_real_per_class=ns.max_real_per_class, mmd_max_real=ns.mmd_max_real,
                          encoder_epochs=ns.encoder_epochs, cache_dir=ns.cache_dir, out_json=ns.out_json,
                          fid_encoder=ns.fid_encoder, fid_resize=ns.fid_resize, feature_cache=ns.feature_cache,
                          progress=ns.progress)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    fid_by = f" ({res['fid_encoder']['kind']}, {res['fid_resize']})" if res.get("fid_encoder") else ""
    print(f"FID{fid_by} {fmt(res['fid'])}  L2 {fmt(res['l2'])}  MMD {fmt(res['mmd'])}  "
          f"representativeness {fmt(res['representativeness'])}  diversity {fmt(res['diversity'])}  "
          f"({res['n_syn']} distilled vs {res['n_real']} real images, {res['size']} px)")
    print(f"release's definitions: L2 of means {fmt(res['l2_means'])}  MMD {fmt(res['mmd_release'])}  "
          f"representativeness (minimax) {fmt(res['representativeness_minimax'])}  "
          f"diversity (minimax) {fmt(res['diversity_minimax'])}")
    print(f"{res['metric_sources']['l2']}")
    print(f"results: {res['file']}" + (f"; recorded in {res['manifest']}" if res.get("manifest") else ""))
    return res
