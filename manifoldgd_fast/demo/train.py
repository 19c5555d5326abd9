"""Train the shipped digits model: a small AutoencoderKL, then a small class-conditional DiT.

Usage::

    python -m manifoldgd_fast.demo.train                 # train (resumes), write weights, check
    python -m manifoldgd_fast.demo.train --check         # only measure the shipped model

Training runs on the CPU (2 threads by default): about 6 min for the VAE and
14 min for the DiT on a shared 2-core machine (measured; see SHA256SUMS.json).

1. **VAE**: a diffusers ``AutoencoderKL`` with three blocks (32x32x3 ->
   4x8x8 latents), MSE reconstruction + a small KL term on posterior samples;
   no augmentation (flipped digits are other digits). Its ``scaling_factor``
   is set to 1 / std of the posterior means of the train split.
2. **DiT**: a diffusers ``DiTTransformer2DModel`` (adaLN-zero, patch 2 on the
   4x8x8 latent, 10 classes + the null class 10, learned sigma) trained as DiT
   is: linear betas 1e-4..0.02 over 1000 steps, t uniform, the "hybrid" loss of
   ADM/DiT -- epsilon MSE plus the variational bound term L_vb (KL of the
   true posterior to the model's, with the mean stopped from the gradient,
   and the discretized Gaussian decoder NLL at t = 0) -- 10% of labels dropped
   to the null class, AdamW, DiT's initialisation (adaLN modulations and the
   output layer zero), and an EMA of the weights, which is what is shipped.
   The latents are the posterior means (scaled), as the package's latent
   cache computes them.

Everything is determined by ``--seed``: the initial weights, the order of the
data (one seeded permutation per epoch) and each step's noise, time steps and
label drops (a generator seeded by seed, phase and step). ``--work DIR`` holds
checkpoints written every ``--save-every`` steps; a rerun with the same
settings continues from the last one.

The weights go to ``--out`` (default ``manifoldgd_fast/weights/digits``) with
``SHA256SUMS.json`` (hashes + training metadata). ``--check`` draws
``--per-class`` plain-DiT samples per class (CFG 4, 50-step respaced DDPM,
learned sigma, the package's own sampler), decodes them and reports how many an
RBF-SVM trained on the real train split labels correctly.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields

if __name__ == "__main__":
    # On a shared 2-core machine OpenMP's spinning threads wait on each other at
    # every barrier (measured: 0.6 s -> 2-7 s a VAE step); sleeping waiters do not.
    # Only effective before torch loads OpenMP, hence here, for the command line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import at_least_one
from ..errors import ConfigError, ManifoldGDError, ModelError
from ..output import atomic_write_text, to_uint8_images, write_folder_atomically
from ..shipped import shipped_model_dir, write_sums
from ..training import (Diffusion, disable_internal_label_dropout, ema_decay_at, ema_update, hybrid_loss,
                        save_checkpoint)
from .digits import NUM_CLASSES, default_cache_dir, digits_arrays

NULL_CLASS = NUM_CLASSES

VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64], layers_per_block=1, act_fn="silu",
    latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=1.0,
)

DIT_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
    num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
    activation_fn="gelu-approximate", norm_type="ada_norm_zero",
    norm_elementwise_affine=False, attention_bias=True, dropout=0.0,
)


@dataclass
class Settings:
    """Everything that determines the result (stored in the work folder and the sums file)."""

    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    dit_steps: int = 6000
    dit_batch: int = 128
    dit_lr: float = 1e-3
    dit_warmup: int = 200
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    num_train_timesteps: int = 1000
    dit_width: int = 128
    dit_layers: int = 4

    def check(self) -> None:
        """ConfigError naming the flag of a setting out of range, before any training (they crashed
        with a traceback, some only after the VAE had trained)."""
        def bad(name, rule):
            return ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be {rule}")

        for name in ("vae_batch", "dit_batch", "dit_layers", "dit_width"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        for name in ("vae_steps", "dit_steps", "dit_warmup"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        for name in ("vae_lr", "dit_lr", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "> 0 and finite")
        if not (math.isfinite(self.vae_kl_weight) and self.vae_kl_weight >= 0):
            raise bad("vae_kl_weight", ">= 0 and finite")
        for name in ("label_dropout", "ema_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "in [0, 1]")
        if self.num_train_timesteps <= 20:  # linear betas end at 0.02 * 1000 / T, which must stay below 1
            raise bad("num_train_timesteps", "> 20")
        self.dit_config()

    def vae_config(self) -> dict:
        return copy.deepcopy(VAE_CONFIG)

    def dit_config(self) -> dict:
        cfg = dict(DIT_CONFIG)
        head_dim = int(cfg["attention_head_dim"])
        if self.dit_width % head_dim:
            raise ConfigError(f"--dit-width must be a multiple of {head_dim}, got {self.dit_width}")
        cfg.update(num_attention_heads=self.dit_width // head_dim, num_layers=self.dit_layers)
        return cfg


# --------------------------------------------------------------------------- #
# determinism helpers
# --------------------------------------------------------------------------- #
_PHASE_ID = {"vae": 1, "dit": 2}


def _gen(seed: int, phase: str, *keys: int) -> torch.Generator:
    """A CPU generator seeded by (seed, phase, keys): independent of any other RNG use."""
    s = (seed * 1_000_003 + _PHASE_ID[phase]) * 1_000_033
    for k in keys:
        s = (s + int(k)) * 1_000_037
    return torch.Generator().manual_seed(s % (2 ** 63))


class BatchOrder:
    """Step -> batch indices: epochs of one seeded permutation each, read end to end."""

    def __init__(self, n: int, batch: int, seed: int, phase: str):
        self.n, self.batch, self.seed, self.phase = n, batch, seed, phase
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=_gen(self.seed, self.phase, 10 ** 6 + epoch))
        return self._perms[epoch]

    def __call__(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)
        return torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in pos])


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Interrupted(Exception):
    """``stop_after`` steps were taken in this run; the checkpoint is saved, a rerun continues."""


class _StepBudget:
    """Counts optimizer steps of this run across both phases (``--stop-after``)."""

    def __init__(self, stop_after: int | None):
        self.left = stop_after

    def take(self) -> bool:
        """Count one step; True when the budget is now spent."""
        if self.left is None:
            return False
        self.left -= 1
        return self.left <= 0


def _images_tensor(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) float in [-1, 1] (as ``data.load_image`` reads the PNGs), labels (N,)."""
    images, labels, _ = digits_arrays(split)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64))


# --------------------------------------------------------------------------- #
# VAE
# --------------------------------------------------------------------------- #
class _Run:
    """One training loop's checkpoint, log and budget: resume, then ``after_step`` once per step."""

    def __init__(self, name: str, total: int, ckpt: str, parts: dict, save_every: int, log_every: int, fmt: str,
                 log, budget: _StepBudget | None):
        self.name, self.total, self.ckpt, self.parts = name, total, ckpt, parts
        self.save_every, self.log_every, self.fmt, self.log, self.budget = save_every, log_every, fmt, log, budget
        self.running: list[tuple[float, ...]] = []

    def resume(self) -> tuple[int, float]:
        """Load each part's state from the checkpoint when there is one; the (step, seconds) to go on from."""
        if not os.path.exists(self.ckpt):
            return 0, 0.0
        state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        for key, part in self.parts.items():
            part.load_state_dict(state[key])
        self.log(f"{self.name}: resuming at step {state['step']}/{self.total}")
        return state["step"], state["seconds"]

    def after_step(self, step: int, seconds: float, metrics: tuple[float, ...]) -> None:
        """Log the running means, save, and raise :class:`Interrupted` when the step budget is spent."""
        self.running.append(metrics)
        if step % self.log_every == 0 or step == self.total:
            m = np.mean(self.running, 0)
            self.running = []
            self.log(f"{self.name} step {step}/{self.total}  {self.fmt.format(*m)}  {seconds:.0f}s")
        stop = self.budget is not None and self.budget.take()
        if step % self.save_every == 0 or step == self.total or stop:
            save_checkpoint({**{key: part.state_dict() for key, part in self.parts.items()},
                             "step": step, "seconds": seconds}, self.ckpt)
        if stop and step < self.total:
            raise Interrupted(f"{self.name} step {step}")


def train_vae(s: Settings, work: str, save_every: int, log=print, budget: _StepBudget | None = None):
    """Train (or resume) the VAE; return it (eval mode) and the seconds spent."""
    from diffusers import AutoencoderKL

    x_train, _ = _images_tensor("train")
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**s.vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    run = _Run("vae", s.vae_steps, os.path.join(work, "vae.pt"), {"model": vae, "opt": opt}, save_every,
               50, "mse {:.5f}  kl {:.3f}", log, budget)
    step, seconds = run.resume()
    order = BatchOrder(len(x_train), s.vae_batch, s.seed, "vae")
    vae.train()
    t0, seconds0 = time.perf_counter(), seconds
    while step < s.vae_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.vae_steps, s.vae_lr, warmup=50)
        g = _gen(s.seed, "vae", step)
        x = x_train[order(step)]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()          # per latent element
        loss = mse + s.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), s.grad_clip)
        opt.step()
        step += 1
        seconds = seconds0 + time.perf_counter() - t0
        run.after_step(step, seconds, (mse.item(), kl.item()))
    vae.eval()
    return vae, seconds


@torch.no_grad()
def encode_means(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means (unscaled) of images in [-1, 1]."""
    return torch.cat([vae.encode(x[i:i + batch]).latent_dist.mean for i in range(0, len(x), batch)])


# --------------------------------------------------------------------------- #
# DiT
# --------------------------------------------------------------------------- #
def dit_init(model) -> None:
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, adaLN-zero and a zero output layer."""
    from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    proj = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
    torch.nn.init.zeros_(proj.bias)
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            torch.nn.init.normal_(m.embedding_table.weight, std=0.02)
        elif isinstance(m, TimestepEmbedding):
            torch.nn.init.normal_(m.linear_1.weight, std=0.02)
            torch.nn.init.normal_(m.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)


def train_dit(s: Settings, latents: torch.Tensor, labels: torch.Tensor, work: str, save_every: int,
              log=print, budget: _StepBudget | None = None):
    """Train (or resume) the DiT on scaled latents; return its EMA (eval mode) and the seconds spent."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(s.seed + 1)
    model = DiTTransformer2DModel(**s.dit_config())
    dit_init(model)
    disable_internal_label_dropout(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.dit_lr, weight_decay=0.0)
    run = _Run("dit", s.dit_steps, os.path.join(work, "dit.pt"), {"model": model, "ema": ema, "opt": opt},
               save_every, 100, "mse {:.4f}  vb {:.4f}", log, budget)
    step, seconds = run.resume()
    d = Diffusion(s.num_train_timesteps)
    order = BatchOrder(len(latents), s.dit_batch, s.seed, "dit")
    model.train()
    ema.eval()
    t0, seconds0 = time.perf_counter(), seconds
    while step < s.dit_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.dit_steps, s.dit_lr, warmup=s.dit_warmup)
        g = _gen(s.seed, "dit", step)
        idx = order(step)
        x0, y = latents[idx], labels[idx]
        B = len(idx)
        t = torch.randint(0, d.T, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(B, generator=g) < s.label_dropout
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        mse, vb, _ = hybrid_loss(model, d, x0, y, t, noise)
        loss = (mse + vb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        step += 1
        ema_update(ema, model, ema_decay_at(s.ema_decay, step))
        seconds = seconds0 + time.perf_counter() - t0
        run.after_step(step, seconds, (mse.mean().item(), vb.mean().item()))
    return ema, seconds


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
def _versions() -> dict:
    import diffusers
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def write_model(out: str, vae, dit, metadata: dict) -> str:
    """Write ``out/{vae,transformer}`` + SHA256SUMS.json via a temporary folder renamed into place."""
    def fill(tmp: str) -> None:
        vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
        dit.save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True)
        write_sums(tmp, metadata)

    return write_folder_atomically(out, fill)


def _load_settings(work: str, s: Settings) -> None:
    path = os.path.join(work, "settings.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object of settings")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"--work {work}: cannot read {path} ({e}); use another --work folder or delete it") from None
        if old != asdict(s):
            diff = sorted(k for k in set(old) | set(asdict(s)) if old.get(k) != asdict(s).get(k))
            raise ConfigError(f"--work {work} holds a run with other settings ({', '.join(diff)}); "
                              "use another --work folder or delete it")
    else:
        atomic_write_text(path, json.dumps(asdict(s), indent=1, sort_keys=True))  # a killed write: no half file


def train(s: Settings, work: str, out: str, save_every: int = 250, check_per_class: int = 20,
          log=print, stop_after: int | None = None) -> dict | None:
    """Both phases (resuming from ``work``), then write ``out`` and measure it.

    ``stop_after``: take at most this many optimizer steps in this call, then
    return None with the checkpoint saved (a later call continues).
    """
    s.check()
    if save_every < 1:
        raise ConfigError(f"--save-every {save_every}: must be >= 1")
    os.makedirs(work, exist_ok=True)
    _load_settings(work, s)
    wall0 = time.perf_counter()
    budget = _StepBudget(stop_after)
    try:
        return _train(s, work, out, save_every, check_per_class, log, budget, wall0)
    except Interrupted as e:
        log(f"stopped after {stop_after} steps at {e}; rerun with the same --work to continue")
        return None


def _train(s, work, out, save_every, check_per_class, log, budget, wall0):
    vae, vae_seconds = train_vae(s, work, save_every, log=log, budget=budget)
    if budget.left is not None and budget.left <= 0:  # spent on the VAE's last step: no DiT step beyond it
        raise Interrupted(f"vae step {s.vae_steps}")

    x_train, y_train = _images_tensor("train")
    means = encode_means(vae, x_train)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae: scaling_factor {scaling:.5f} (1 / std of {means.numel()} train latent values)")
    latents = (means * scaling).contiguous()

    dit, dit_seconds = train_dit(s, latents, y_train, work, save_every, log=log, budget=budget)
    meta = {
        "script": "python -m manifoldgd_fast.demo.train",
        "data": "sklearn.datasets.load_digits, 32x32 RGB, train split (seed 0, 80/20 stratified)",
        "train_images": int(len(x_train)),
        "settings": asdict(s),
        "vae_seconds": round(vae_seconds, 1),
        "dit_seconds": round(dit_seconds, 1),
        "train_seconds": round(vae_seconds + dit_seconds, 1),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu": platform.processor() or platform.machine(),
        "versions": _versions(),
        "shipped": "the DiT's EMA weights",
    }
    folder = write_model(out, vae, dit, meta)
    log(f"wrote {folder} (train time {meta['train_seconds']:.0f}s; this run {time.perf_counter() - wall0:.0f}s)")
    if check_per_class > 0:
        result = check(folder, per_class=check_per_class, log=log)
        meta["check"] = result
        write_sums(folder, meta)  # same hashes, with the measured accuracy added
    return meta


# --------------------------------------------------------------------------- #
# check
# --------------------------------------------------------------------------- #
def _grey_features(images_uint8: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) uint8 -> (n, 1024) float in [0, 1] (the channel mean)."""
    return images_uint8.astype(np.float64).mean(-1).reshape(len(images_uint8), -1) / 255.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8, as the package saves images (its own rounding: half up)."""
    return to_uint8_images(x)


def digit_classifier():
    """An RBF SVM on the grey pixels of the real train split (deterministic)."""
    from sklearn.svm import SVC

    images, labels, _ = digits_arrays("train")
    return SVC(C=10.0, gamma="scale").fit(_grey_features(images), labels)


@torch.no_grad()
def check(model_dir: str | None = None, per_class: int = 20, cfg_scale: float = 4.0, steps: int = 50,
          seed: int = 1234, batch: int = 100, grid: str | None = None, log=print) -> dict:
    """Accuracy of a real-data classifier on plain-DiT samples of ``model_dir``."""
    from ..models import load_dit, load_vae
    from ..sampler import sample
    from ..schedule import make_schedule

    model_dir = shipped_model_dir() if model_dir is None else model_dir
    dit, vae = load_dit(model_dir), load_vae(model_dir)
    sf = float(vae.config.scaling_factor)
    clf = digit_classifier()
    test_images, test_labels, _ = digits_arrays("test")
    acc_test = float((clf.predict(_grey_features(test_images)) == test_labels).mean())
    x_test, _ = _images_tensor("test")
    recon = _to_uint8(vae.decode(encode_means(vae, x_test)).sample)
    acc_recon = float((clf.predict(_grey_features(recon)) == test_labels).mean())

    C, h = dit.config.in_channels, dit.config.sample_size
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    sched = make_schedule(steps, "ddpm")
    t0 = time.perf_counter()
    imgs = []
    for i in range(0, len(y), batch):
        yb = y[i:i + batch]
        idx = range(i, i + len(yb))
        x_T = torch.stack([torch.randn(C, h, h, generator=torch.Generator().manual_seed(seed + k)) for k in idx])
        gens = [torch.Generator().manual_seed(seed + 10 ** 6 + k) for k in idx]
        z = sample(dit, sched, x_T, yb, null_class=NULL_CLASS, cfg_scale=cfg_scale, generators=gens)
        imgs.append(_to_uint8(vae.decode(z / sf).sample))
    samples = np.concatenate(imgs)
    pred = clf.predict(_grey_features(samples))
    correct = pred == y.numpy()
    per = {str(c): float(correct[y.numpy() == c].mean()) for c in range(NUM_CLASSES)}
    result = {
        "classifier": "SVC(C=10, gamma='scale') on grey 32x32 pixels of the real train split",
        "classifier_test_accuracy": round(acc_test, 4),
        "classifier_accuracy_on_vae_reconstructions": round(acc_recon, 4),
        "samples": int(len(y)), "cfg_scale": cfg_scale, "sampler": f"ddpm{steps} learned sigma",
        "seed": seed,
        "sample_accuracy": round(float(correct.mean()), 4),
        "per_class": {k: round(v, 3) for k, v in per.items()},
        "sampling_seconds": round(time.perf_counter() - t0, 1),
    }
    log(f"classifier accuracy on the real test split: {acc_test:.2%}")
    log(f"classifier accuracy on VAE reconstructions of the test split: {acc_recon:.2%}")
    log("per class: " + "  ".join(f"{k}:{v:.0%}" for k, v in per.items()))
    log(f"plain-DiT samples (CFG {cfg_scale:g}, {steps}-step DDPM) labelled correctly: "
        f"{correct.mean():.2%} of {len(y)}")
    if grid:
        _save_grid(samples, per_class, grid)
        log(f"wrote {grid}")
    return result


def _save_grid(samples: np.ndarray, per_class: int, path: str) -> None:
    from PIL import Image

    n, H, W, _ = samples.shape
    cols = min(per_class, 20)
    rows = []
    for c in range(NUM_CLASSES):
        row = samples[c * per_class: c * per_class + cols]
        rows.append(np.concatenate(list(row), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #
def _default_out() -> str:
    return shipped_model_dir()


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m manifoldgd_fast.demo.train",
                                description="Train the shipped digits VAE + DiT, or --check it.")
    p.add_argument("--work", default=None, help="checkpoint folder (default <cache>/demo_train); reruns resume")
    p.add_argument("--out", default=None, help="model folder to write (default: the package's weights/digits)")
    p.add_argument("--save-every", type=at_least_one, default=250, help="checkpoint every N steps")
    p.add_argument("--threads", type=at_least_one, default=2, help="torch CPU threads")
    p.add_argument("--check", action="store_true", help="only measure the model in --out (default: shipped)")
    p.add_argument("--per-class", type=int, default=20, help="samples per class for the check (0: no check)")
    p.add_argument("--grid", default=None, help="with --check: save the samples as a PNG grid here")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt
    for f in fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), metavar="X",
                       help=f"training setting (default {getattr(defaults, f.name)})")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = a.out or _default_out()
    try:
        if a.check:
            if not os.path.isdir(out):
                raise ModelError(f"--out {out}: no such model folder (the one --check measures)")
            check(out, per_class=max(1, a.per_class), grid=a.grid)
            return 0
        s = Settings(**{f.name: getattr(a, f.name) for f in fields(Settings)})
        work = a.work or os.path.join(default_cache_dir(), "demo_train")
        print(f"training with {json.dumps(asdict(s))}\nwork folder {work}, output {out}", flush=True)
        train(s, work, out, save_every=a.save_every, check_per_class=a.per_class, stop_after=a.stop_after)
    except ManifoldGDError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --work or --out a file, or not writable: one line, as the other commands
        where = f"{e.filename}: " if e.filename else ""
        print(f"{p.prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
