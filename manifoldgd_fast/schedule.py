"""DDPM (learned range) and DDIM coefficient tables, respaced as DiT does.

DiT is trained on 1000 steps with linear betas 1e-4 -> 2e-2. Sampling with
S steps keeps a subset of those steps (``space_timesteps``, the ADM/DiT rule:
"50" for DDPM, the fixed stride "ddim50" for DDIM) and re-derives betas from
the kept cumulative products, so ``alphas_cumprod[i]`` of the respaced chain
equals ``alphas_cumprod[timesteps[i]]`` of the original one. Tables are built
in float64 (as the released code does) and stored as float32 tensors on the
device; index ``i`` runs S-1 ... 0 during sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """The DiT/ADM 'linear' schedule (scaled to the number of training steps)."""
    scale = 1000 / num_train_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_train_timesteps, dtype=np.float64)


def space_timesteps(num_train_timesteps: int, steps: int, sampler: str) -> list[int]:
    """Original timesteps kept for ``steps`` sampling steps, ascending.

    DDPM: evenly spaced with rounding, first 0 and last T-1 (ADM's "S" rule).
    DDIM: the integer stride whose ``range(0, T, stride)`` has exactly S
    elements (ADM's "ddimS" rule; equals diffusers' DDIMScheduler 'leading').
    """
    if steps > num_train_timesteps:
        raise ConfigError(f"--steps must be <= {num_train_timesteps}, got {steps}")
    if sampler == "ddim":
        for stride in range(1, num_train_timesteps):
            if len(range(0, num_train_timesteps, stride)) == steps:
                return list(range(0, num_train_timesteps, stride))
        raise ConfigError(f"--steps {steps}: DDIM needs an integer stride dividing {num_train_timesteps} steps into exactly {steps}")
    if steps == 1:
        return [0]
    frac = (num_train_timesteps - 1) / (steps - 1)
    return sorted({int(round(j * frac)) for j in range(steps)})


@dataclass
class Schedule:
    """Per-respaced-step coefficients, each a float32 tensor of shape (S,)."""

    timesteps: torch.Tensor           # original timestep fed to the model, long
    alphas_cumprod: torch.Tensor      # abar_i
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # sigma_i
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    log_betas: torch.Tensor
    num_train_timesteps: int
    sampler: str

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device) -> "Schedule":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Schedule(**kw)


def make_schedule(steps: int = 50, sampler: str = "ddpm", num_train_timesteps: int = 1000,
                  betas: np.ndarray | None = None, device="cpu") -> Schedule:
    """The respaced schedule of ``steps`` sampling steps (ADM/DiT rule for ``sampler``)."""
    kept = space_timesteps(num_train_timesteps, steps, sampler)
    return schedule_from_timesteps(kept, sampler, num_train_timesteps=num_train_timesteps, betas=betas, device=device)


def schedule_from_timesteps(kept, sampler: str = "ddim", num_train_timesteps: int = 1000,
                            betas: np.ndarray | None = None, device="cpu") -> Schedule:
    """The respaced schedule over any increasing list of kept training timesteps
    (e.g. ``sorted(diffusers_scheduler.timesteps)``)."""
    base = linear_betas(num_train_timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
    base_ac = np.cumprod(1.0 - base)
    kept = sorted(int(t) for t in kept)
    if len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= len(base):
        raise ConfigError(f"timesteps must be distinct and in [0, {len(base) - 1}], got {kept[:3]}...{kept[-3:]}")
    # Respaced betas from the kept cumulative products (SpacedDiffusion).
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1.0 - base_ac[t] / last)
        last = base_ac[t]
    betas_r = np.array(new_betas, dtype=np.float64)
    ac = np.cumprod(1.0 - betas_r)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas_r * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at i = 0: ADM clips its log with the i = 1 value.
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(np.maximum(post_var, 1e-20))
    tables = dict(
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_mean_coef1=betas_r * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas_r) / (1.0 - ac),
        posterior_log_variance_clipped=post_log_var,
        log_betas=np.log(betas_r),
    )
    out = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tables.items()}
    return Schedule(timesteps=torch.tensor(kept, dtype=torch.long, device=device),
                    num_train_timesteps=num_train_timesteps, sampler=sampler, **out)
