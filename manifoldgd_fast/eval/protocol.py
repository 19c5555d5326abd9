"""Hard-label (and soft-label) evaluation protocol: train nets on the distilled folder,
test top-1 on the real validation folder (SPEC 7).

The whole distilled set is one uint8 tensor on the device (sets above
:data:`MAX_DEVICE_IMAGES` images stay in host memory and travel per batch);
augmentation runs on the device (``augment.py``); on CUDA the nets run
channels_last under bf16 autocast with cudnn.benchmark (``precision="bf16"``),
or in fp32 with deterministic algorithms where torch has them
(``precision="fp32"``, the release's arithmetic). Validation images are loaded
once (short side resized to ``val_resize``, centre crop ``size``: 256 / 224 at
224 px by default, SPEC 7; ``val_resize=224`` is the release's
Resize(224) + CenterCrop(224)) and scored in batches.

Several distilled folders (the release's std is over 3 distilled sets, each
trained once) are evaluated one after the other; results are given per folder
and pooled over all (folder, seed) runs (written by :mod:`.report`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
import os
import time

import numpy as np
import torch

import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..config import check_out_file, derive_seed, fields_digest
from ..data import (IMAGE_EXTS, READ_FORMATS, RESAMPLERS, ClassEntry, _class_folders, _image_files, check_aspect,
                    image_errors, iter_class_images, read_image_uint8, scan_image_folder)
from ..devices import resolve_device
from ..errors import ConfigError, DataError
from ..image_labels import scan_labelled_folder
from ..output import RESERVED_DIRS
from ..training import save_checkpoint
from . import resume
from .augment import TrainAugment, cutmix, normalize, to_unit
from .nets import NET_NAMES, build_net, count_parameters, load_net, named_file, parse_nets
from .precision import amp, check_precision, describe_precision, net_layout, numerics, prepare_net
from .report import (check_not_being_written, eval_json_path, eval_markdown_path, is_eval_table, report_lock,
                     summarize, write_eval_outputs)

log = logging.getLogger(__name__)

MAX_DEVICE_IMAGES = 50_000
MAX_SIZE = 1024                  # --size: px a side (ImageNet evaluations train at 224)
MAX_VAL_RESIZE = 2 * MAX_SIZE    # --val-resize: px (the default at --size 1024 is 1170; each image is held once at it)
MAX_SEEDS = 1000                 # --seeds: training runs per net and folder (the literature reports 3 to 5)
VAL_RESIZE = 256 / 224           # resize 256 / centre crop 224, at any size


# --------------------------------------------------------------------------- settings
def default_epochs(ipc: int, num_classes: int) -> int:
    """SPEC 7: 2000 for IPC <= 10, 1500 <= 50, 1000 <= 200 (IDC's ipc_epoch beyond: 500 <= 500,
    else 300); x 2/3 for 100-class sets, rounded down to a multiple of 100 as IDC does."""
    e = 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000 if ipc <= 200 else 500 if ipc <= 500 else 300
    if num_classes == 100:
        e = int(2 / 3 * e)
        e -= e % 100
    return e


SOFT_TEMPERATURE = 20.0  # RDED's with CutMix (its argument.py: 4 with mixup)


def soft_batch_size(ipc: int, num_classes: int) -> int:
    """RDED's student batch: 10 / 50 / 100 images at IPC 1 / 10 / 50 (here: IPC <= 1, <= 10, more),
    twice that from 100 classes, never more than the set holds."""
    batch = (10 if ipc <= 1 else 50 if ipc <= 10 else 100) * (2 if num_classes >= 100 else 1)
    return max(1, min(batch, ipc * num_classes))


def default_hparams(num_classes: int, soft: bool = False, ipc: int = 10) -> dict:
    """SGD lr 0.01, wd 5e-4, batch 64; > 100 classes lr 0.1, wd 1e-4, batch 128.

    Soft labels, as RDED's validation (which MGD3 follows): AdamW lr 1e-3, betas (0.9, 0.999), weight
    decay 0.01 on the weight matrices and kernels only (not on biases and norms), the lr multiplied by
    0.5 (1 + cos(pi e / 2E)) at epoch e of E (down to half the base lr), batch :func:`soft_batch_size`,
    and ResNet-18 students with batch norm (torchvision's, as RDED's and the teacher)."""
    if soft:
        return {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "decay": "weights",
                "batch_size": soft_batch_size(ipc, num_classes), "schedule": "half-cosine", "resnet18_norm": "batch"}
    batch = 128 if num_classes > 100 else 64
    lr, wd = (0.1, 1e-4) if num_classes > 100 else (0.01, 5e-4)
    return {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": wd, "batch_size": batch,
            "schedule": "multistep x0.2 at 2/3, 5/6"}


def default_size(native: int) -> int:
    """224 px for images of at least 224 px (the literature's protocol), else their own size."""
    return 224 if native >= 224 else native


# --------------------------------------------------------------------------- folders
def _has_images(folder: str) -> bool:
    return any(e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTS)
               for e in os.scandir(folder))


def distilled_class_names(root: str) -> list[str]:
    """Class folders of a distilled OUT/ (``latents/``, ``modes/`` without images are not classes, nor
    :data:`data.SYSTEM_FOLDERS`)."""
    if not os.path.isdir(root):
        raise DataError(f"distilled folder {root} does not exist" if not os.path.exists(root)
                        else f"distilled folder {root} is not a folder")
    # (data._class_folders, as the validation folder's: no hidden, system or archive folder such as __MACOSX)
    names = [n for n in _class_folders(root, check_links=True)
             if n not in RESERVED_DIRS or _has_images(os.path.join(root, n))]
    if not names:
        raise DataError(f"distilled folder {root} has no class folders (expected OUT/<class>/<i>.png)")
    return names


def _names(xs, limit: int = 10) -> str:
    xs = sorted(xs)
    return ", ".join(xs[:limit]) + (f" ... ({len(xs) - limit} more)" if len(xs) > limit else "")


def _flat_image_folder(folder: str) -> bool:
    """Images directly in ``folder`` and no class folder (the layout --val-labels reads)."""
    return os.path.isdir(folder) and bool(_image_files(folder)) and not _class_folders(folder)


def match_classes(distilled: str, reference: str, *, exact: bool = True, what: str = "validation",
                  labels: str | None = None):
    """Scan both folders and pair their classes; labels are the sorted class order of ``reference``.

    exact: the class sets must be equal (else only distilled ⊆ reference; the
    reference is then restricted to the distilled classes, and only their folders are read). labels: the reference is a
    flat folder of images and this file names each one's class (image_labels.scan_labelled_folder).
    Returns (class names, distilled entries, reference entries), entries' ``label``
    rewritten to the shared index. Raises DataError naming missing / extra classes.
    """
    if labels is None and what == "validation" and _flat_image_folder(reference):
        raise DataError(f"validation folder {reference} holds images but no class folders: for a flat folder (as "
                        "ImageNet's val is distributed) name each image's class with --val-labels FILE")
    present = _class_folders(reference) if labels is None and not exact and os.path.isdir(reference) else []
    if present:  # only the distilled classes are read: an empty or odd folder of another class stops nothing
        dist_names = distilled_class_names(distilled)
        ref_names = set(present)
        ref_all = scan_image_folder(reference, classes=[n for n in dist_names if n in ref_names],
                                    label_map="sorted") if ref_names & set(dist_names) else []
    else:
        ref_all = (scan_labelled_folder(reference, labels) if labels is not None
                   else scan_image_folder(reference, label_map="sorted"))
        ref_names = {e.name for e in ref_all}
        dist_names = distilled_class_names(distilled)
    missing = ref_names - set(dist_names)
    extra = set(dist_names) - ref_names
    if extra or (exact and missing):
        parts = []
        if exact and missing:
            parts.append(f"missing from the distilled set: {_names(missing)}")
        if extra:
            parts.append(f"not in the {what} set: {_names(extra)}")
        hint = ""
        if labels is not None and ref_names and all(n.isdigit() for n in ref_names) and not ref_names & set(dist_names):
            hint = (f" ({labels} names its classes by number, as caffe's val.txt does: give a file of class names "
                    "(e.g. Kaggle's LOC_val_solution.csv) or the ILSVRC-2012 devkit, whose meta.mat names its numbers)")
        raise DataError(f"class mismatch between distilled folder {distilled} and {what} folder {reference}: "
                        + "; ".join(parts) + hint)
    classes = sorted(dist_names)
    index = {c: i for i, c in enumerate(classes)}
    dist = scan_image_folder(distilled, classes=classes, label_map="sorted")
    ref = [e for e in ref_all if e.name in index]
    for e in dist + ref:
        e.label = index[e.name]
    return classes, dist, ref


def native_size(entries: list[ClassEntry]) -> int:
    """The short side (px) of the first readable image of ``entries``: an unreadable one (or a strip past
    data.MAX_ASPECT) is skipped, as :func:`load_images` skips it. Raises DataError naming the first file when
    none can be read."""
    from PIL import Image

    first = None
    for path in (f for e in entries for f in e.files):
        try:
            with Image.open(path, formats=READ_FORMATS) as im:
                w, h = im.size
            check_aspect(w, h)  # (read_image_uint8 skips such a file too)
            return min(w, h)
        except image_errors() as e:
            first = first or f"cannot read image {path}: {e}"
    raise DataError(first or "no image to take the size from")


def capped(e: ClassEntry, n: int | None) -> ClassEntry:
    """``e`` with at most ``n`` of its images (None: all): a random subset, seeded by the class's name (every
    run and process takes the same one), kept in file order. Not the first n: a folder sorted by source or
    date would give a biased prefix."""
    if not n or len(e.files) <= n:
        return e
    rng = np.random.default_rng(derive_seed(0, "real subset", e.name))
    return dataclasses.replace(e, files=[e.files[i] for i in sorted(rng.choice(len(e.files), n, replace=False))])


def load_images(entries: list[ClassEntry], size: int, *, resize: float = 1.0, max_per_class: int | None = None,
                progress: bool = False, desc: str = "load",
                resample: str = "bicubic") -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``entries`` (at most ``max_per_class`` a class: :func:`capped`) as uint8
    (N, 3, size, size) in host memory, and labels (N,).

    Images are resized (short side ``round(size * resize)``, at least ``size``) and
    centre-cropped to ``size`` (data.read_image_uint8; ``resample``: "bicubic", DiT's
    preprocessing, or "bilinear", torchvision's as the release's evaluation); unreadable
    files are skipped with a warning (data.ClassImages).
    Raises DataError naming a class left without a readable image.
    """
    load = max(size, round(size * resize))
    # uint8, short side to ``load``, crop ``size``
    read = functools.partial(read_image_uint8, short_side=load, resample=resample)
    files = [capped(e, max_per_class).files for e in entries]
    total = sum(len(f) for f in files)
    x = torch.empty(total, 3, size, size, dtype=torch.uint8)
    y = torch.empty(total, dtype=torch.long)
    n = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for e, fs in zip(entries, files):
            sub = dataclasses.replace(e, files=fs)
            n0 = n
            for batch, _paths in iter_class_images(sub, size, 64, read=read):
                b = batch.shape[0]
                x[n:n + b] = batch
                y[n:n + b] = e.label
                n += b
                bar.update(b)
            if n == n0:
                raise DataError(f"class {e.name} in {os.path.dirname(e.folder)}: no readable image")
    return x[:n], y[:n]


@dataclasses.dataclass
class Split:
    """Images (uint8, on the device or in host memory) and labels (on the device)."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def place(cls, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> "Split":
        if len(x) <= MAX_DEVICE_IMAGES or device.type == "cpu":
            return cls(x.to(device), y.to(device))
        return cls(x.pin_memory() if device.type == "cuda" else x, y.to(device))

    def __len__(self) -> int:
        return len(self.y)

    def images(self, idx, device: torch.device) -> torch.Tensor:
        if self.x.device == device:
            return self.x[idx]
        idx = idx.cpu() if isinstance(idx, torch.Tensor) else idx
        return self.x[idx].to(device, non_blocking=True)


# --------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 500,
             precision: str = "bf16") -> float:
    """Top-1 accuracy in percent of ``model`` on ``split`` (uint8 images, normalised here)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for k in range(0, len(split), batch_size):
        xb = net_layout(normalize(to_unit(split.images(slice(k, k + batch_size), device))), precision)
        with amp(device, precision):
            out = model(xb)
        correct += (out.argmax(1) == split.y[k:k + batch_size]).sum()
    return 100.0 * correct.item() / len(split)


def lr_at(epoch: int, epochs: int, base: float, schedule: str) -> float:
    """Learning rate of 0-based ``epoch``: x0.2 after 2/3 and 5/6 of training (IDC's
    MultiStepLR), or for the soft-label protocol RDED's LambdaLR, 0.5 (1 + cos(pi e / 2E))."""
    if schedule == "half-cosine":
        return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs / 2))
    if not schedule.startswith("multistep"):
        raise ValueError(f"lr schedule {schedule!r}: expected 'half-cosine' or 'multistep ...'")
    return base * 0.2 ** sum(epoch >= m for m in (2 * epochs // 3, 5 * epochs // 6))


def test_epochs(epochs: int, eval_every: int | None, *, soft: bool) -> set[int]:
    """The epochs (1-based) after which a run is tested; "best" is the maximum over them, "final" the last.

    ``eval_every`` N: every N-th epoch and the last. Default: the hard-label protocol every ``epochs // 100``
    (IDC's, the release's); the soft-label one as RDED's validation/main.py, every 10th epoch past 80 % of the
    run and the last (testing more often would make its "best" a maximum over more draws)."""
    if eval_every is None and soft:
        return {e for e in range(10, epochs + 1, 10) if e - 1 > 0.8 * epochs} | {epochs}
    every = eval_every or max(1, epochs // 100)
    return set(range(every, epochs + 1, every)) | {epochs}


def describe_tests(epochs: int, eval_every: int | None, *, soft: bool) -> str:
    if eval_every is None and soft:
        return "every 10th epoch past 80 % of the run, and the last (RDED)"
    n = eval_every or max(1, epochs // 100)
    return f"every {n} epoch{'' if n == 1 else 's'}, and the last"


def train_net(net: str, train: Split, val: Split, num_classes: int, *, size: int, epochs: int, hp: dict,
              seed: int, device: torch.device, teacher: torch.nn.Module | None = None,
              temperature: float = SOFT_TEMPERATURE,
              eval_every: int | None = None, augment: TrainAugment | None = None, val_batch_size: int = 500,
              progress: bool = True, desc: str = "", return_model: bool = False, precision: str = "bf16",
              checkpoint: str | None = None, checkpoint_key: str = "") -> dict:
    """Train one ``net`` from scratch on ``train`` and test it on ``val`` every ``eval_every`` epochs.

    hp: optimizer ('sgd' / 'adamw'), lr, weight_decay, batch_size, schedule, decay "weights" to
    leave biases and norms undecayed, resnet18_norm "batch" for torchvision's ResNet-18 (see default_hparams).
    precision: on CUDA, "bf16" (autocast, channels_last) or "fp32"; the CPU always runs fp32
    (see :func:`numerics` for the cuDNN settings that go with each).
    teacher: soft-label protocol -- the student matches the teacher's softmax on each
    augmented view (KL, batch mean, both sides at temperature ``temperature``, as RDED);
    None -> cross-entropy with CutMix labels.
    checkpoint: a file where the run's state (net, optimizer, generators, history) is saved at an epoch's
    end at most every ``resume.CHECKPOINT_EVERY_S`` seconds; a run started with the same file and
    ``checkpoint_key`` continues from it, with the same results as an uninterrupted run (bit for bit
    where the run is deterministic). The file is removed once the run ends.
    Returns {best, best_epoch, final, history [[epoch, top-1], ...], train_acc, params, time_s}
    (+ ``model``, the trained net, with ``return_model``).
    """
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norm = hp.get("resnet18_norm", "instance") if net == "resnet18" else "instance"
        model = prepare_net(build_net(net, num_classes, size, norm=norm), device, precision)
    augment = augment or TrainAugment(size)
    params = list(model.parameters())
    if hp.get("decay") == "weights":  # RDED: weight decay on the weight matrices and kernels only
        decayed = [p for name, p in model.named_parameters() if "weight" in name and p.dim() > 1]
        ids = {id(p) for p in decayed}
        params = [{"params": decayed}, {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]
    if hp["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(params, lr=hp["lr"], momentum=hp.get("momentum", 0.9), weight_decay=hp["weight_decay"])
    gen = torch.Generator(device=device).manual_seed(seed)
    gen_cpu = torch.Generator().manual_seed(seed)
    tested = test_epochs(epochs, eval_every, soft=teacher is not None)
    n, bs = len(train), hp["batch_size"]
    lone_fails = _lone_image_fails(model, size, device, precision)
    if lone_fails and bs == 1:
        raise ConfigError(f"--batch-size 1 with {net}'s batch norm at --size {size}: its last maps are 1x1, so a "
                          "batch of one image leaves one value per channel to normalise; give --batch-size >= 2 "
                          "or a larger --size")
    if lone_fails and n % bs == 1:
        log.info("%s at %d px: each epoch's last batch, of one image, is left out (batch norm cannot train on 1x1 "
                 "maps of one image)", net, size)
    best, best_epoch, final, train_acc, history = -1.0, 0, 0.0, 0.0, []
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = start = 0
    state = resume.read_checkpoint(checkpoint, checkpoint_key, device)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        gen_cpu.set_state(state["gen_cpu"])
        correct.fill_(int(state["correct"]))
        start, seen, best, best_epoch = int(state["epoch"]), int(state["seen"]), state["best"], state["best_epoch"]
        final, train_acc, history = state["final"], state["train_acc"], [list(h) for h in state["history"]]
        t0 -= float(state["time_s"])
        log.info("%s: continues from epoch %d of %d (%s)", desc or f"{net} seed {seed}", start, epochs, checkpoint)
    saved_at = time.perf_counter()
    # (closed however the loop ends: an unclosed bar left the line open, and "interrupted" was glued to it)
    with tqdm(total=epochs, initial=start, desc=desc or f"{net} seed {seed}", unit="ep", disable=not progress,
              leave=False) as bar:
        for epoch in range(start, epochs):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch, epochs, hp["lr"], hp["schedule"])
            model.train()
            perm = torch.randperm(n, generator=gen, device=device)
            for k in range(0, n, bs):
                idx = perm[k:k + bs]
                if lone_fails and len(idx) == 1:
                    continue
                yb = train.y[idx]
                with torch.no_grad():
                    xb, partner, ratio = cutmix(augment(train.images(idx, device), gen), gen_cpu)
                    xb = net_layout(xb, precision)
                with amp(device, precision):
                    out = model(xb)
                    if teacher is not None:
                        with torch.no_grad():
                            soft = F.softmax(teacher(xb).float() / temperature, 1)
                        logp = F.log_softmax(out.float() / temperature, 1)
                        loss = F.kl_div(logp, soft, reduction="batchmean")
                    else:
                        loss = ratio * F.cross_entropy(out.float(), yb) + (1 - ratio) * F.cross_entropy(
                            out.float(), yb[partner])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += (out.detach().argmax(1) == yb).sum()
                seen += len(idx)
            bar.update(1)
            if epoch + 1 in tested:
                final = accuracy(model, val, device, val_batch_size, precision)
                history.append([epoch + 1, round(final, 4)])
                if final > best:
                    best, best_epoch = final, epoch + 1
                train_acc = 100.0 * correct.item() / max(seen, 1)
                correct.zero_()
                seen = 0
                bar.set_postfix(train=f"{train_acc:.1f}", val=f"{final:.1f}", best=f"{best:.1f}")
            if checkpoint is not None and epoch + 1 < epochs \
                    and time.perf_counter() - saved_at >= resume.CHECKPOINT_EVERY_S:
                save_checkpoint({
                    "key": checkpoint_key, "epoch": epoch + 1, "model": model.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "gen_cpu": gen_cpu.get_state(), "correct": int(correct), "seen": seen,
                    "best": best, "best_epoch": best_epoch, "final": final, "train_acc": train_acc, "history": history,
                    "time_s": time.perf_counter() - t0}, checkpoint)
                saved_at = time.perf_counter()
    if checkpoint is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(checkpoint)
    extra = {"model": model.eval()} if return_model else {}
    return {**extra, "seed": seed, "best": best, "best_epoch": best_epoch, "final": final, "train_acc": train_acc,
            "history": history, "params": count_parameters(model), "time_s": round(time.perf_counter() - t0, 3)}


def _lone_image_fails(model: torch.nn.Module, size: int, device: torch.device, precision: str) -> bool:
    """Whether a training batch of one image would leave one of ``model``'s batch norms a single value per
    channel (its maps 1x1: a batch-norm ResNet-18 below 12 px), which torch refuses to train on. Probed with
    one zero image in eval mode (the running statistics are left as they are)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0][0, 0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not hooks:
        return False
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), amp(device, precision):
            model(net_layout(torch.zeros(1, 3, size, size, device=device), precision))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return min(seen) == 1


def probe_net(net: torch.nn.Module, call, x: torch.Tensor, flag: str):
    """``call(x)`` once under no_grad: a net built for another size or input fails here, in one line
    (ConfigError "FLAG: fails on a (B, 3, S, S) batch at S px: Error: ..."), not as a traceback after the
    data have loaded or a long training. Out of memory (the device's or the host's) is raised as it is."""
    size = x.shape[-1]
    try:
        with torch.no_grad():
            return call(x)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, torch.jit.Error) as e:
        if "can't allocate memory" in str(e):  # the host's allocator: out of memory, not the net's fault
            raise
        built = getattr(net, "size", None)
        hint = f" (it was built for {built} px)" if isinstance(built, int) and built != size else ""
        lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()] or [""]
        # a TorchScript module's error opens with the interpreter's traceback and ends with the error itself
        first = lines[-1] if lines[0].startswith("The following operation failed in the TorchScript") else lines[0]
        first = first.removeprefix(f"{type(e).__name__}: ")
        raise ConfigError(f"{flag}: fails on a {tuple(x.shape)} batch at {size} px{hint}: "
                          f"{type(e).__name__}: {first[:200]}") from None


def _check_teacher(teacher: torch.nn.Module, num_classes: int, size: int, device: torch.device,
                   precision: str = "bf16"):
    teacher = prepare_net(teacher, device, precision).eval()
    for p in teacher.parameters():  # (a TorchScript module refuses Module.requires_grad_, not its parameters')
        p.requires_grad_(False)

    def call(x):
        with amp(device, precision):
            return teacher(x)

    # a net built for another size or input fails here, not as a traceback after the validation set loaded
    out = probe_net(teacher, call, net_layout(torch.zeros(1, 3, size, size, device=device), precision), "--teacher")
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != num_classes:
        got = f"outputs of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(f"--teacher: gives {got} at {size} px, "
                          f"expected (1, {num_classes}) for the {num_classes} classes")
    if not bool(torch.isfinite(out).all()):  # (its soft labels would be NaN: every student trained on NaN loss)
        raise ConfigError(f"--teacher: gives non-finite outputs (NaN or inf) on a (1, 3, {size}, {size}) batch")
    net = getattr(teacher, "net", teacher)   # (ClassSubset: an ImageNet net answering for a subset)
    trained = getattr(net, "size", None) if isinstance(getattr(net, "net_name", None), str) else None  # build_net's
    if isinstance(trained, int) and trained != size:  # (a ResNet runs at any size: it taught silently)
        log.warning("--teacher is a net built for %d px images and teaches at %d px (--size): its soft labels may be "
                    "poor; give --size %d, or a teacher trained at %d px", trained, size, trained, size)
    return teacher


def _teacher_name(teacher) -> str:
    """How eval.json names the teacher: a file by its absolute path (a pathlib.Path too), a keyword as given, an
    in-memory net or state dict by its type."""
    if isinstance(teacher, (str, os.PathLike)):
        path = os.fspath(teacher)
        return os.path.abspath(path) if os.path.isfile(path) else path
    return type(teacher).__name__


def check_counts(pairs) -> None:
    """ConfigError naming the parameter unless each (flag, value) of ``pairs`` is None or an integer >= 1 (a
    float, a string or True failed mid-run as a TypeError, after the images had loaded: a Python API audit)."""
    for name, v in pairs:
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ConfigError(f"{name} {v!r}: must be an integer >= 1")


def check_path(value, flag: str) -> str:
    """A folder or file argument as a str: ConfigError naming ``flag`` for anything but a path."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{flag}: expected a path, got {type(value).__name__} {value!r}")
    return os.fspath(value)


def _folder_list(distilled) -> list[str]:
    """One folder or a sequence of them -> a list; ConfigError naming --distilled for none or repeats."""
    if isinstance(distilled, (str, os.PathLike)):
        return [os.fspath(distilled)]
    if not isinstance(distilled, (list, tuple)):
        raise ConfigError(f"--distilled: expected a folder or a list of folders, got {type(distilled).__name__}")
    folders = [check_path(d, "--distilled") for d in distilled]
    if not folders:
        raise ConfigError("--distilled: no folder given")
    seen = set()
    for f in folders:
        if os.path.realpath(f) in seen:
            raise ConfigError(f"--distilled {f}: given more than once")
        seen.add(os.path.realpath(f))
    return folders


def _check_seeds(seeds) -> list[int]:
    """A count (seeds 0 .. n-1) or a sequence of distinct whole seeds -> the seeds (ConfigError naming --seeds)."""
    def whole(s) -> bool:
        return isinstance(s, numbers.Integral) and not isinstance(s, bool)

    if whole(seeds):
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: must be >= 1")
        if seeds > MAX_SEEDS:  # (a huge count was an OverflowError traceback, or a list filling the memory)
            raise ConfigError(f"--seeds {seeds}: must be <= {MAX_SEEDS} (a count of seeds, one training run each)")
        return list(range(int(seeds)))
    # (the API's 2.5 or "3" was a TypeError / ValueError traceback, [0.5, 1.7] trained seeds 0 and 1, True one seed)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range)) \
            or not all(whole(s) for s in seeds):
        raise ConfigError(f"--seeds {seeds!r}: give a count or a list of whole seeds")
    seed_list = [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError(f"--seeds {seeds}: must be >= 1")
    if len(seed_list) > MAX_SEEDS:
        raise ConfigError(f"--seeds: {len(seed_list)} seeds given, at most {MAX_SEEDS} (one training run each)")
    far = [s for s in seed_list if not 0 <= s < 2 ** 63]
    if far:  # (torch's generators take less than 2**64; it failed after the earlier seeds had trained)
        raise ConfigError(f"--seeds {','.join(map(str, seed_list))}: seed {far[0]} is outside 0 .. 2**63 - 1")
    dup = sorted({s for s in seed_list if seed_list.count(s) > 1})
    if dup:
        raise ConfigError(f"--seeds {','.join(map(str, seed_list))}: seed {', '.join(map(str, dup))} "
                          f"given more than once")
    return seed_list


def _same_classes(folders: list[str], matched: list) -> None:
    classes = matched[0][0]
    for folder, (other, _, _) in zip(folders[1:], matched[1:]):
        if other != classes:
            missing, extra = set(classes) - set(other), set(other) - set(classes)
            parts = [f"{what}: {_names(names)}" for what, names in (("missing", missing), ("extra", extra)) if names]
            raise DataError(f"--distilled {folder}: its classes differ from those of {folders[0]} "
                            f"({'; '.join(parts)}); several distilled folders must hold the same classes")


# --------------------------------------------------------------------------- entry point
def evaluate(distilled, real_val: str, *, nets=None, seeds=3, epochs: int | None = None,
             size: int | None = None, batch_size: int | None = None, lr: float | None = None,
             device: str = "auto", teacher=None, temperature: float | None = None, eval_every: int | None = None,
             val_batch_size: int = 500, val_resize: int | None = None, restrict_val: bool = False,
             val_labels: str | None = None,
             precision: str = "bf16", resample: str = "bicubic", out_json: str | None = None,
             progress: bool = True) -> dict:
    """Train each net of ``nets`` on the distilled folder(s) for each seed; test on ``real_val``.

    distilled: OUT/<class>/<i>.png (``latents/``, ``modes/`` are ignored), or a list of
    such folders with the same classes (e.g. sets distilled with seeds 0, 1, 2: the
    release's std is over 3 distilled sets, each trained once); real_val:
    VAL/<class>/<image> with the same class names (labels: sorted class names), or with
    ``val_labels`` a flat VAL/<image> folder and the file naming each image's class
    (ImageNet's ``LOC_val_solution.csv``, the ILSVRC-2012 devkit, or '<image> <class>' lines;
    image_labels.read_image_labels).
    nets: names or a comma-separated string; None = all three (NET_NAMES), or with ``teacher`` a ResNet-18 (the
    soft-label protocol's student, as MGD3 and RDED train it).
    seeds: a count (seeds 0..n-1) or a list of distinct seeds. epochs / batch_size / lr:
    None = SPEC 7's defaults for the (largest) IPC and class count. size: None = 224 for
    images of >= 224 px, else their own size. teacher: None (hard labels) or a
    module / file / state dict / ``imagenet-resnet18`` (see nets.load_net; a module is copied, yours is left
    as it was) -> soft-label protocol; a 1000-class ImageNet teacher on a subset's WordNet-id
    folders answers for those classes. The soft-label run is RDED's validation (MGD3's
    soft-label protocol): see :func:`default_hparams`; temperature > 0, None = 20 (RDED's
    with CutMix); augmentation random-resized crop (scale 0.5-1) + flip, then CutMix.
    val_resize: short side (px) of the validation images before the centre crop to
    ``size``; None = ``size * 256 / 224`` (256 at 224 px, SPEC 7); 224 at 224 px is the
    release's Resize(224) + CenterCrop(224). resample: how every image (distilled and
    validation) is resized, "bicubic" (DiT's preprocessing: BOX halving, then bicubic) or
    "bilinear" (torchvision's Resize + CenterCrop, the release's). restrict_val: use only the validation
    classes the distilled folder has (a subset against all of ImageNet's val);
    otherwise the class sets must be equal. precision: on CUDA, "bf16" (autocast,
    channels_last, cudnn.benchmark: fast, not bit-reproducible) or "fp32" (the
    release's; deterministic algorithms where torch has them). On the CPU a seed
    gives the same run with either.
    Writes ``out_json`` (default OUT/eval.json; OUT1/eval_pooled.json for several
    folders), the markdown table beside it (.md) and appends a summary to each
    OUT/manifest.json's "eval" list if it exists.
    Returns the dict written to the JSON: per net, per run best / final top-1
    (percent) and their mean / std (numpy std, ddof 0) over all (folder, seed) runs;
    ``per_folder`` the same per distilled folder.
    """
    folders = _folder_list(distilled)
    real_val = check_path(real_val, "--real-val")
    # (a pathlib.Path, as --real-val and --teacher take, was an AttributeError / TypeError traceback)
    val_labels = None if val_labels is None else check_path(val_labels, "--val-labels")
    out_json = None if out_json is None else check_path(out_json, "--out-json")
    if nets is None:  # the soft-label protocol (MGD3's, RDED's) trains a ResNet-18 student; hard labels all three
        nets = ("resnet18",) if teacher is not None else NET_NAMES
    nets = parse_nets(nets)
    seed_list = _check_seeds(seeds)
    # before the training, not after it; the default lies in the distilled folder, which may be read-only
    if out_json is not None or os.path.isdir(folders[0]):  # (a missing --distilled is named below, not as --out-json)
        # ('' is refused: an unset $VAR wrote to the default silently)
        check_out_file(out_json if out_json is not None else eval_json_path(folders, None),
                       "--out-json" if out_json is not None else "--out-json (default)",
                       inputs={"--real-val": real_val, "--val-labels": val_labels, "--teacher": teacher}
                       if out_json is not None else None)  # (the default: OUT's own)
    report = eval_json_path(folders, out_json)
    if os.path.splitext(report)[1].lower() == ".md":  # (the table replaced the JSON, and both were named as written)
        raise ConfigError(f"--out-json {report}: the markdown table is written beside it as "
                          f"{eval_markdown_path(report)}, in its place; give a .json file name")
    table = eval_markdown_path(report)
    if out_json is not None:  # the table beside it: never over an input, nor over a file no evaluation wrote
        check_out_file(table, "--out-json's table", inputs={"--real-val": real_val, "--val-labels": val_labels,
                                                             "--teacher": teacher})
        if os.path.isfile(table) and not os.path.exists(report) and not is_eval_table(table):
            # (--out-json README.json replaced README.md; a table whose JSON was moved away is a report's)
            raise ConfigError(f"--out-json {report}: its table would be written over {table}, which is no "
                              f"report's (no {os.path.basename(report)} beside it); give another file name")
    for beside in (table, report + ".partial"):  # written after the first run, or the last
        if os.path.isdir(beside):  # (a class folder named eval.md: 'Is a directory', after training)
            raise ConfigError(f"--out-json{'' if out_json is not None else ' (default)'} {report}: {beside}, "
                              "written beside it, is a folder; give --out-json elsewhere")
    check_counts((("--epochs", epochs), ("--size", size), ("--batch-size", batch_size), ("--eval-every", eval_every),
                  ("--val-batch-size", val_batch_size), ("--val-resize", val_resize)))
    if lr is not None and not (isinstance(lr, numbers.Real) and not isinstance(lr, bool) and math.isfinite(lr)
                               and 0 < lr <= float(torch.finfo(torch.float32).max)):
        raise ConfigError(f"--lr {lr!r}: must be a number > 0 and finite in float32")   # (SGD takes it as a float32)
    if size is not None and size > MAX_SIZE:
        raise ConfigError(f"--size {size}: must be <= {MAX_SIZE} px")
    if val_resize is not None and val_resize > MAX_VAL_RESIZE:  # (it was OOM-killed without a word, loading)
        raise ConfigError(f"--val-resize {val_resize}: must be <= {MAX_VAL_RESIZE} px")
    if size is not None and size < 2:  # (build_net's check, before the validation set is loaded)
        raise ConfigError(f"--size {size}: must be >= 2")
    unused_temperature = temperature is not None and teacher is None
    temperature = SOFT_TEMPERATURE if temperature is None else temperature
    # a number (a string "20" passed here, then failed mid-training as a TypeError), as a float: 20 and 20.0 are
    # one run to the resume's fingerprint and eval.json
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature {temperature!r}: must be a number > 0 and finite")
    temperature = float(temperature)
    if unused_temperature:  # (it ran the hard-label protocol and said nothing of it)
        log.warning("--temperature %g is the soft-label protocol's and there is no --teacher: the hard-label "
                    "protocol runs, without it", temperature)
    check_precision(precision)
    if resample not in RESAMPLERS:
        raise ConfigError(f"--resample {resample}: must be one of {', '.join(RESAMPLERS)}")
    for f in folders:
        check_not_being_written(f)
    dev = resolve_device(device)
    matched = [match_classes(f, real_val, exact=not restrict_val, labels=val_labels) for f in folders]
    _same_classes(folders, matched)
    classes, val = matched[0][0], matched[0][2]
    num_classes = len(classes)
    ipcs = [max(len(e.files) for e in dist) for _, dist, _ in matched]
    ipc = max(ipcs)
    if len(set(ipcs)) > 1:
        log.warning("the distilled folders hold different IPCs (%s); epochs follow the largest, %d",
                    ", ".join(map(str, ipcs)), ipc)
    if size is None:
        size = default_size(native_size(matched[0][1]))
        if size < 2:  # (not --size's error: the flag was not given)
            raise DataError(f"distilled folder {folders[0]}: its images are {size} px, too small to train on; "
                            "pass --size (>= 2) to resize them")
    val_load = max(size, round(size * VAL_RESIZE)) if val_resize is None else val_resize
    if val_load < size:
        raise ConfigError(f"--val-resize {val_resize}: must be >= the evaluation size {size} (--size)")
    soft = teacher is not None
    hp = default_hparams(num_classes, soft, ipc)
    hp["lr"] = lr or hp["lr"]
    hp["batch_size"] = batch_size or hp["batch_size"]
    epochs = epochs or (300 if soft else default_epochs(ipc, num_classes))
    teacher_mod = _check_teacher(load_net(teacher, num_classes=num_classes, size=size, class_names=classes),
                                 num_classes, size, dev, precision) if soft else None

    with report_lock(report, "another evaluation"):
        # Each finished (folder, net, seed) run is kept in JSON.partial until the JSON is written, so a killed
        # evaluation resumes there; its key: everything a run's result depends on (an in-memory teacher has none)
        augment = TrainAugment(size, jitter=0.0, light=0.0) if soft else TrainAugment(size)  # RDED: crop + flip
        partial = eval_json_path(folders, out_json) + ".partial"
        # (a keyword by the file it stands for: its weights replaced in $TORCH_HOME reused runs of the old ones)
        teacher_id = resume.file_identity(named_file(teacher)) if soft else "none"
        fingerprint = None if teacher_id is None else fields_digest({
            "version": __version__, "classes": classes,
            "val": [os.path.abspath(real_val), resume.file_identity(val_labels), resume.files_digest(val)],
            "distilled": {os.path.abspath(f): resume.files_digest(d) for f, (_, d, _) in zip(folders, matched)},
            "size": size, "val_load": val_load, "resample": resample, "epochs": epochs, "hp": hp,
            "eval_every": eval_every, "tested": describe_tests(epochs, eval_every, soft=soft), "teacher": teacher_id,
            "temperature": temperature if soft else None, "precision": precision, "device": dev.type,
            "augment": augment.describe()})
        finished = resume.load_finished_runs(partial, fingerprint) if fingerprint is not None else {}
        resumed = 0

        t0 = time.perf_counter()
        x, y = load_images(val, size, resize=val_load / size, progress=progress, desc="load validation",
                           resample=resample)
        valset = Split.place(x, y, dev)
        del x, y
        several = len(folders) > 1
        runs_by_net: dict[str, list] = {net: [] for net in nets}
        params, per_folder = {}, []
        with numerics(dev, precision):
            for i, (folder, (_, dist, _)) in enumerate(zip(folders, matched)):
                tag = f" set {i}" if several else ""
                x, y = load_images(dist, size, progress=progress, desc="load distilled" + tag, resample=resample)
                train = Split.place(x, y, dev)
                del x, y
                folder_nets = {}
                for net in nets:
                    runs = []
                    for s in seed_list:
                        key = f"{os.path.abspath(folder)}|{net}|{s}"
                        if key in finished:
                            runs.append(finished[key])
                            resumed += 1
                            continue
                        r = train_net(net, train, valset, num_classes, size=size, epochs=epochs, hp=hp, seed=s,
                                      device=dev, teacher=teacher_mod, temperature=temperature, eval_every=eval_every,
                                      augment=augment, val_batch_size=val_batch_size, progress=progress,
                                      desc=f"{net} seed {s}{tag}", precision=precision,
                                      checkpoint=None if fingerprint is None else
                                      resume.checkpoint_path(partial, fingerprint, folder, net, s),
                                      checkpoint_key=fingerprint or "")
                        r["distilled"] = os.path.abspath(folder)
                        runs.append(r)
                        if fingerprint is not None:   # a killed evaluation keeps what it finished
                            finished[key] = r
                            resume.save_finished_runs(partial, fingerprint, finished)
                    runs_by_net[net] += runs
                    params[net] = runs[0]["params"]
                    bests, finals = [r["best"] for r in runs], [r["final"] for r in runs]
                    folder_nets[net] = {"params": params[net], "best_per_seed": bests, "final_per_seed": finals,
                                        **summarize("best", bests), **summarize("final", finals)}
                per_folder.append({"distilled": os.path.abspath(folder), "ipc": ipcs[i], "n_train": len(train),
                                   "nets": folder_nets})
                del train
        results = {net: {"params": params[net], "seeds": runs, "n_runs": len(runs),
                         **summarize("best", [r["best"] for r in runs]),
                         **summarize("final", [r["final"] for r in runs])} for net, runs in runs_by_net.items()}

        abs_folders = [os.path.abspath(f) for f in folders]
        result = {
            "format": "manifoldgd_fast.eval/1",
            "protocol": "soft-label" if soft else "hard-label",
            "distilled": abs_folders if several else abs_folders[0], "distilled_folders": abs_folders,
            "real_val": os.path.abspath(real_val), "restrict_val": bool(restrict_val),
            "val_labels": os.path.abspath(val_labels) if val_labels is not None else None,
            "classes": classes, "num_classes": num_classes, "ipc": ipc,
            "n_train": [pf["n_train"] for pf in per_folder] if several else per_folder[0]["n_train"],
            "n_val": len(valset), "size": size, "val_resize": val_load,
            "val_preprocess": f"resize {val_load} (short side, PIL {resample}), centre crop {size}",
            "resample": resample,
            "epochs": epochs, "eval_every": eval_every or (None if soft else max(1, epochs // 100)),
            "tested": describe_tests(epochs, eval_every, soft=soft), "hparams": hp,
            "temperature": temperature if soft else None,
            "teacher": _teacher_name(teacher) if soft else None,
            "augment": augment.describe(), "seeds": seed_list,
            "std_over": (f"{len(folders)} distilled sets x {len(seed_list)} seeds" if several
                         else f"{len(seed_list)} seeds"),
            "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
            "precision": describe_precision(dev, precision), "precision_mode": precision,
            "deterministic": dev.type != "cuda" or precision == "fp32",
            "versions": {"torch": torch.__version__, "numpy": np.__version__},
            "time_s": round(time.perf_counter() - t0, 3), "nets": results, "per_folder": per_folder,
        }
        if resumed:
            result["resumed_runs"] = resumed
            log.info("resumed %d of %d runs from %s", resumed, len(folders) * len(nets) * len(seed_list), partial)
        write_eval_outputs(result, folders, out_json)
        if fingerprint is not None:   # (the runs and checkpoints of killed evaluations of other settings stay)
            resume.drop_finished_runs(partial, fingerprint)
            resume.sweep_checkpoints(partial, fingerprint)
        return result
