"""``manifoldgd-fast finetune``: representation-sparsity fine-tuning (RSM) of a DiT.

The DiT's own loss (epsilon MSE + the learned-variance bound, ``training.hybrid_loss``)
plus ``rsm_lambda * mean |x0_hat|``, the L1 norm of the model's prediction of
the clean latent (SPEC 5 / the RSM+CGS summary), on an image folder through
its latent cache. bf16 autocast on CUDA; AdamW; EMA of the weights; label
dropout to the null class as DiT trains. Checkpoints every ``save_every``
steps hold the model, EMA, optimiser and step: a rerun resumes and ends at
the same weights as an uninterrupted run (every step's randomness derives
from (seed, step)). The output is a diffusers pipeline folder (``transformer/``
with the EMA weights, ``vae/``) that ``--model`` loads like any other.

The summary gives no value for the L1 weight; ``rsm_lambda`` defaults to 1e-3.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time

import torch

from .config import DistillConfig, check_out_dir, derive_seed, fields_digest
from .errors import ConfigError
from .output import RunLock, atomic_write_text
from .training import EMA_WARMUP

FINETUNE_RECORD = "finetune.json"
CHECKPOINT = "checkpoint.pt"   # model, EMA, optimiser and step: what a rerun resumes from

FINETUNE_HELP = "fine-tune a DiT with the RSM L1 penalty on x0_hat (resumable), into a loadable model folder"


def finetune(*, data: str, model: str, out: str, vae: str | None = None, steps: int = 1000, lr: float = 1e-4,
             batch_size: int = 32, rsm_lambda: float = 1e-3, label_dropout: float = 0.1, ema_decay: float = 0.9999,
             grad_clip: float = 1.0, save_every: int = 100, seed: int = 0, device: str = "auto",
             dtype: str = "bfloat16", cache_dir: str | None = None, classes: str | None = None,
             label_map: str = "auto", stop_after: int | None = None, log=print) -> str:
    """Fine-tune ``model`` on ``data``; write ``out/{transformer,vae}``; return ``out``.

    stop_after: stop (after checkpointing) once this many steps ran in this
    call (tests use it to simulate a kill); a rerun resumes.
    """
    from .latents import file_stamps, load_class_latents
    from .models import save_pretrained_folder
    from .pipeline import prepare
    from .training import (Diffusion, disable_internal_label_dropout, ema_decay_at, ema_update, rsm_loss,
                           save_checkpoint)

    f32_max = float(torch.finfo(torch.float32).max)  # AdamW takes lr as a float32 (1e39 overflowed mid-run)
    for name, v, ok in (("--steps", steps, steps >= 1), ("--lr", lr, math.isfinite(lr) and 0 < lr <= f32_max),
                        ("--batch-size", batch_size, batch_size >= 1),
                        ("--rsm-lambda", rsm_lambda, math.isfinite(rsm_lambda) and rsm_lambda >= 0),
                        ("--save-every", save_every, save_every >= 1), ("--seed", seed, seed >= 0),
                        ("--label-dropout", label_dropout, 0 <= label_dropout < 1),
                        ("--ema-decay", ema_decay, 0 <= ema_decay < 1), ("--grad-clip", grad_clip, grad_clip >= 0)):
        if not ok:
            rule = {"--steps": ">= 1", "--batch-size": ">= 1", "--save-every": ">= 1",
                    "--lr": "> 0 and finite in float32",
                    "--rsm-lambda": ">= 0 and finite", "--grad-clip": ">= 0 (0: no clipping)",
                    "--seed": ">= 0"}.get(name, "in [0, 1)")
            raise ConfigError(f"{name} {v}: must be {rule}")
    if dtype == "float16":  # (no loss scaling here: fp16 gradients of a DiT underflow)
        raise ConfigError("--dtype float16: finetune trains under bfloat16 autocast or in float32, without the "
                          "loss scaling float16 would need; use --dtype bfloat16 or float32")
    check_finetune_out(out, data, model)
    # one fine-tune at a time in OUT: two would resume the same checkpoint and write its one temp together
    with RunLock(out, what="another finetune"):
        cfg = DistillConfig(data=data, model=model, vae=vae, device=device, dtype=dtype, cache_dir=cache_dir,
                            classes=classes, label_map=label_map, ipc=1)

        def trainable(pre: dict) -> None:  # refused before the latent cache is filled (hours on ImageNet)
            if pre["backbone"] == "sd" or not pre["dit_info"]["learned_sigma"]:
                raise ConfigError(f"--model {model}: finetune trains DiTs with learned sigma (out_channels = 2 x in)")

        ctx = prepare(cfg, before_cache=trainable)
        dev, info = ctx["device"], ctx["dit_info"]
        # the training set: every class's latents, held as fp16 on the host
        zs, ys = [], []
        for e in ctx["entries"]:
            z, _ = load_class_latents(ctx["cache"], e.name)
            zs.append(z.half())
            ys.append(torch.full((z.shape[0],), e.label, dtype=torch.long))
        Z, Y = torch.cat(zs), torch.cat(ys)

        net = ctx["model"].float().train()
        disable_internal_label_dropout(net)
        ema = copy.deepcopy(net).requires_grad_(False).eval()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        os.makedirs(out, exist_ok=True)
        work = os.path.join(out, CHECKPOINT)
        step = 0
        # what a resume must find again; the training set (each class folder, its label, its image files) too: an
        # edited --classes or --label-map file, or images added to --data, would resume on another set
        settings = {**_settings(locals()), "training_set": fields_digest(
            [(e.name, e.label, e.relative_files()) for e in ctx["entries"]]),
            # and each image's size and mtime: one rewritten in place (same name) is re-encoded into the cache,
            # and the rest of the fine-tune trained on other latents than its first steps (as distill refuses)
            "images": fields_digest([(e.name, file_stamps(e)) for e in ctx["entries"]])}
        record = None
        if not os.path.isfile(work) and os.path.isfile(os.path.join(out, FINETUNE_RECORD)):
            with contextlib.suppress(OSError, ValueError):   # (read here, not by read_finetune_record: this
                with open(os.path.join(out, FINETUNE_RECORD), encoding="utf-8") as f:   # process holds OUT's lock)
                    record = json.load(f)
        if isinstance(record, dict):  # a finished fine-tune whose checkpoint was deleted (it is ~4x the model)
            _refuse_other_settings(out, {k: record.get(k) for k in settings if k in record}, settings, "finished ")
            if os.path.isdir(os.path.join(out, "transformer")):  # (it was trained again and written over)
                log(f"finetune: {out} holds this fine-tune, finished ({FINETUNE_RECORD}); nothing to do")
                return out
        if os.path.isfile(work):
            try:
                state = torch.load(work, map_location=dev, weights_only=True)   # tensors, numbers and strings only
                if not isinstance(state, dict) or not {"model", "ema", "opt", "step", "settings"} <= set(state):
                    raise ValueError("not a finetune checkpoint")
            except Exception as e:  # truncated (a full disk), foreign
                why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                raise ConfigError(f"{work} is damaged ({why}); delete it to start the fine-tune over") from None
            _refuse_other_settings(out, state["settings"], settings)
            net.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            step = state["step"]
            log(f"finetune: resuming at step {step}/{steps}")
        d = Diffusion()
        for k, v in list(vars(d).items()):
            if isinstance(v, torch.Tensor):
                setattr(d, k, v.to(dev))
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        amp_dtype = amp_dtype if dev.type == "cuda" else None  # --dtype is CUDA's autocast; the CPU trains in float32
        ran, t0 = 0, time.perf_counter()
        finite = torch.ones((), dtype=torch.bool, device=dev)
        while step < steps:
            g = torch.Generator().manual_seed(derive_seed(seed, "finetune", step))
            idx = torch.randint(len(Z), (batch_size,), generator=g)
            x0, y = Z[idx].float().to(dev), Y[idx].to(dev)
            t = torch.randint(0, d.T, (batch_size,), generator=g).to(dev)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            drop = (torch.rand(batch_size, generator=g) < label_dropout).to(dev)
            y = torch.where(drop, torch.full_like(y, info["null_class"]), y)
            amp = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with amp:
                loss, mse, vb, l1 = rsm_loss(net, d, x0, y, t, noise, rsm_lambda)
            finite = finite & torch.isfinite(loss)   # on the device: checked where weights are written
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:  # 0 means no clipping (a max norm of 0 would zero every gradient)
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            opt.step()
            step += 1
            ran += 1
            ema_update(ema, net, ema_decay_at(ema_decay, step))  # warmed up: see training.ema_decay_at
            if step % 50 == 0 or step == steps:
                log(f"finetune step {step}/{steps}  mse {mse.mean().item():.4f}  vb {vb.mean().item():.4f}  "
                    f"l1 {l1.mean().item():.4f}  {time.perf_counter() - t0:.0f}s")
            stop = stop_after is not None and ran >= stop_after
            if step % save_every == 0 or step == steps or stop:
                _check_finite(finite, ema, step, work)  # never a diverged model over the last good checkpoint
                save_checkpoint({"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                              "step": step, "settings": settings}, work)
            if stop and step < steps:
                return out
        # the record goes first and comes back last: a kill in between leaves weights without a record (which
        # --model refuses as an unfinished fine-tune), never another fine-tune's record over these weights
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out, FINETUNE_RECORD))
        save_pretrained_folder(ema, os.path.join(out, "transformer"))
        save_pretrained_folder(ctx["vae"], os.path.join(out, "vae"))
        # what the folder was trained with: `distill --model OUT` records it in its manifest
        atomic_write_text(os.path.join(out, FINETUNE_RECORD),
                          json.dumps({"tool": "manifoldgd-fast finetune", "step": step, **settings,
                                      # what the last call's steps really ran in (dtype is the flag, CUDA's autocast)
                                      "precision": f"{dtype} autocast" if amp_dtype else "float32",
                                      "time_embedding": info.get("time_embedding", "diffusers")},
                                     sort_keys=True, indent=1))
        return out


def _refuse_other_settings(out: str, was: dict, settings: dict, what: str = "") -> None:
    """ConfigError naming up to 3 settings in which ``was`` (a checkpoint's, or a finished fine-tune's record)
    differs from this call's: a resume (or a rerun) with other settings is another fine-tune, a new --out."""
    was = {k: _as_path(v) if k in PATH_SETTINGS else v for k, v in was.items()}
    now = json.loads(json.dumps(settings, default=str))   # (as a record holds them: tuples as lists)
    was = json.loads(json.dumps(was, default=str))
    # with the training set recorded, how --classes / --label-map were spelt (a file or a list) is not
    # compared; a checkpoint written before it was recorded is compared as it was then
    skip = {"classes", "label_map"} if "training_set" in was else {"training_set"}
    skip |= set() if "images" in was else {"images"}   # (a checkpoint from before they were recorded)
    keys = [k for k in sorted((set(was) | set(now)) - skip) if was.get(k) != now.get(k)]
    if "images" in keys and {"training_set", "classes", "label_map", "data"} & set(keys):
        keys.remove("images")   # (another set of classes or files: that says it)
    if keys:
        named = {"training_set": "the training set (class folders, labels or image files)",
                 "images": "the images (one changed since the checkpoint: its size or modification time)"}
        said = "; ".join(named.get(k) or f"{k} {was.get(k)!r} then, {now.get(k)!r} now" for k in keys[:3])
        more = "; ..." if len(keys) > 3 else ""
        raise ConfigError(f"{out} holds a {what}fine-tune with other settings ({said}{more}); use a new --out")


def _check_finite(finite: torch.Tensor, ema, step: int, work: str) -> None:
    """ConfigError where a loss since the last check was NaN / inf or the EMA weights are not finite."""
    if bool(finite) and all(bool(torch.isfinite(p).all()) for p in ema.parameters()):
        return
    kept = f"the last checkpoint ({work}) is kept" if os.path.exists(work) else "nothing was written"
    raise ConfigError(f"finetune diverged by step {step}: the loss or the weights hold NaN or inf; {kept}. Lower "
                      f"--lr or --rsm-lambda (or clip the gradients: --grad-clip) and use a new --out")


FINETUNE_WRITES = (CHECKPOINT, CHECKPOINT + ".tmp", "transformer", "vae", FINETUNE_RECORD)


def check_finetune_out(out: str, data: str, model: str) -> None:
    """``--out`` of finetune: a folder path outside ``--data``, not the ``--model`` it reads, and new, empty
    or a fine-tune's (only what finetune writes), as distill's --out (ConfigError otherwise)."""
    from .pipeline import check_outside_data

    check_out_dir(out, "--out")
    check_outside_data(out, data)
    if isinstance(model, str) and os.path.isdir(model) and os.path.realpath(model) == os.path.realpath(out):
        raise ConfigError(f"--out {out} is --model {model}: the fine-tune would replace the model it reads; "
                          "use a new --out")
    if os.path.isdir(out):
        foreign = sorted(n for n in os.listdir(out) if not n.startswith(".") and n not in FINETUNE_WRITES)
        if foreign:
            more = ", ..." if len(foreign) > 3 else ""
            raise ConfigError(f"--out {out} already holds {', '.join(foreign[:3])}{more}, not a fine-tune's files; "
                              "use a new or empty --out")


def read_finetune_record(model: str | None) -> dict | None:
    """The settings a model folder was fine-tuned with (``finetune.json``), or None. A fine-tune's folder
    with weights but no record was stopped while it wrote them: ModelError (rerun it to finish); one a
    finetune run still holds (its ``.lock``): ModelError (wait for it)."""
    from .errors import ModelError
    from .output import LOCK_NAME, lock_is_held

    if model and lock_is_held(os.path.join(str(model), LOCK_NAME), exclusive_only=True):  # (its weights, or none yet, were read as
        #                                                             a fine-tune that had stopped: audit)
        raise ModelError(f"--model {model} is being written by a finetune run: use it once that run has finished")
    path = os.path.join(str(model), FINETUNE_RECORD) if model else ""
    if not path or not os.path.isfile(path):
        if path and os.path.isfile(os.path.join(str(model), CHECKPOINT)) and \
                os.path.isdir(os.path.join(str(model), "transformer")):
            raise ModelError(f"--model {model} is a fine-tune stopped while it wrote its weights (checkpoint.pt, "
                             f"no {FINETUNE_RECORD}): rerun its finetune command to finish it")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


PATH_SETTINGS = ("data", "model", "vae")


def _as_path(v):
    """A folder or file argument as an absolute path (the same folder by another spelling is the same
    setting); a Hugging Face id, or None, as it is."""
    return os.path.abspath(v) if isinstance(v, str) and os.path.exists(v) else v


def _settings(scope: dict) -> dict:
    keys = ("data", "model", "vae", "steps", "lr", "batch_size", "rsm_lambda", "label_dropout", "ema_decay",
            "grad_clip", "seed", "dtype", "classes")
    # the EMA's warm-up rule: a run checkpointed before it (a flat decay) is refused on resume; a label map
    # other than auto counts (auto's fine-tunes, checkpointed before the flag existed, stay resumable)
    lm = scope["label_map"]
    extra = {} if lm == "auto" else {"label_map": os.path.abspath(lm) if os.path.isfile(lm) else lm}
    return {**{k: _as_path(scope[k]) if k in PATH_SETTINGS else scope[k] for k in keys}, "ema_warmup": EMA_WARMUP,
            **extra}


def add_finetune_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("RSM fine-tuning")
    g.add_argument("--data", required=True, help="image folder ROOT/<class>/<image> (required)")
    g.add_argument("--model", required=True, help="the DiT to fine-tune (folder or cached HF id) (required)")
    g.add_argument("--vae", default=None, help="AutoencoderKL (default: the model folder's vae/)")
    g.add_argument("--out", required=True, help="output model folder (transformer/, vae/); checkpoints inside (required)")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (a rerun with the same settings resumes up to them; "
                                                              "other --steps are another fine-tune: a new --out)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--batch-size", type=int, default=32, help="latents per optimizer step")
    g.add_argument("--rsm-lambda", type=float, default=1e-3, help="weight of mean |x0_hat| (L1)")
    g.add_argument("--label-dropout", type=float, default=0.1,
                   help="share of labels replaced by the null class (keeps CFG working), in [0, 1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    g.add_argument("--ema-decay", type=float, default=0.9999,
                   help=f"decay of the EMA weights, which are the ones written, in [0, 1); warmed up as {EMA_WARMUP}")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (a killed run resumes there)")
    g.add_argument("--seed", type=int, default=0, help="seeds the batches, noise and label dropout")
    g.add_argument("--classes", default=None, help="restrict to a subset: nette, woof, imagenet100, idc, imagenet1k, "
                   "a text file, or 'a,b,c' (default: every class folder)")
    g.add_argument("--label-map", default="auto", help="folder name -> DiT class id, as distill's --label-map: "
                   "auto (ImageNet wnids if all folders are wnids, else sorted), imagenet1k, sorted, or a class-map "
                   "file (give distill the same one)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="bfloat16", help="autocast dtype on CUDA (CPU trains in float32)")
    g.add_argument("--cache-dir", default=None, help="latent cache root (default: $MANIFOLDGD_CACHE or "
                   "~/.cache/manifoldgd_fast)")
    return p


def run_finetune_from_args(ns: argparse.Namespace) -> str:
    kw = {k: v for k, v in vars(ns).items() if k != "command"}
    out = finetune(**kw)
    print(f"fine-tuned model in {out} (use --model {out})")
    return out
