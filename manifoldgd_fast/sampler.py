"""The reference sampling loop: DiT forward with CFG, guidance, DDPM / DDIM update.

Reads top to bottom. Everything numeric follows the released DiT sampler
(respaced DDPM with learned-range variance, or DDIM), with the guidance of
``guidance.Guidance`` inserted where SPEC 4 / 4b put it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from .cgs import CGS
from .guidance import Guidance
from .profile import phase, step_done
from .schedule import Schedule


def cfg_forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, null_class: int,
                cfg_scale: float, cfg_channels: str = "3", chunk: int | None = None) -> torch.Tensor:
    """One batched DiT forward on 2B latents (conditional + null class), CFG mixed.

    Returns (B, C_out, h, w): the guided mix ``e_u + w (e_c - e_u)`` on the first
    3 channels (the official DiT's CFG; ``cfg_channels="all"``: on all C latent
    channels); the remaining channels (4th eps channel, variance) are the
    conditional half's own output. At ``cfg_scale`` <= 1 guidance is off, as in
    DiT's ``sample.py`` and diffusers (``scale > 1``): one forward on the B
    conditional latents, its output as it is (at 1 the mix's value, to rounding,
    in half the work; below 1 the class's own prediction, never pushed away from it).
    """
    B, C = x.shape[:2]
    if chunk is not None and B > chunk:  # a set larger than fits at once: the forward in chunks
        return torch.cat([cfg_forward(model, x[s:s + chunk], t, y[s:s + chunk], null_class=null_class,
                                      cfg_scale=cfg_scale, cfg_channels=cfg_channels)
                          for s in range(0, B, chunk)])
    off = cfg_scale <= 1.0
    tin = (t if t.dim() == 1 else t.reshape(1)).expand(B if off else 2 * B)
    if off:
        return model(x, timestep=tin, class_labels=y).sample.float()     # (B, C_out, h, w)
    xin = torch.cat([x, x], 0)
    yin = torch.cat([y, torch.full_like(y, null_class)], 0)
    out = model(xin, timestep=tin, class_labels=yin).sample.float()   # (2B, C_out, h, w)
    cond, uncond = out[:B], out[B:]
    ch = C if cfg_channels == "all" else min(3, C)
    mixed = cond.clone()
    mixed[:, :ch] = uncond[:, :ch] + cfg_scale * (cond[:, :ch] - uncond[:, :ch])
    return mixed


def learned_range_log_variance(schedule: Schedule, i: int, v: torch.Tensor) -> torch.Tensor:
    """log variance interpolated between the posterior (min) and beta (max) by v in [-1, 1]."""
    frac = (v + 1) / 2
    return frac * schedule.log_betas[i] + (1 - frac) * schedule.posterior_log_variance_clipped[i]


def fixed_log_variance(schedule: Schedule, i: int) -> torch.Tensor:
    """log variance for models without learned sigma, by ``schedule.variance_type``:
    "fixed_large" (ADM's, beta_t; the DiT family) or "fixed_small" (the posterior
    variance, diffusers' DDPMScheduler default; the Stable Diffusion family)."""
    if schedule.variance_type == "fixed_small":
        return schedule.posterior_log_variance_clipped[i]
    if i == 0 and not schedule.last_step_noise:  # (no noise is drawn there: ADM's value, unused)
        return schedule.posterior_log_variance_clipped[1] if schedule.steps > 1 else schedule.log_betas[0]
    return schedule.log_betas[i]


def _randn_like_per_sample(x: torch.Tensor, generators) -> torch.Tensor:
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generators])


def draws_noise(schedule: Schedule, i: int, ddim_eta: float = 0.0) -> bool:
    """Whether step i of the update draws fresh noise. DDPM: every step but the last (the last too with
    ``schedule.last_step_noise``: diffusers' DDPMScheduler with fixed_large). DDIM: if eta > 0,
    every step but the last, and the last too where the schedule ends at abar(t=0) < 1
    (``schedule.last_step_noise``: diffusers' DDIMScheduler with set_alpha_to_one=False, SD)."""
    if schedule.sampler == "ddpm":
        return i > 0 or schedule.last_step_noise
    return ddim_eta > 0 and (i > 0 or schedule.last_step_noise)


@dataclass
class Sampling:
    """What stays fixed over a sampling run: the model, the schedule, CFG and the guidance rule.

    ``autocast_dtype``: the DiT forward under autocast at this dtype (None / float32: none);
    guidance and scheduler arithmetic stay in float32. ``forward_batch``: run the DiT on at
    most this many samples at a time. The guidance's and CGS's own objects say which steps they act on.
    """

    model: Any
    schedule: Schedule
    null_class: int
    cfg_scale: float = 4.0
    cfg_channels: str = "3"
    formulation: str = "official"
    ddim_eta: float = 0.0
    forward_batch: int | None = None
    autocast_dtype: torch.dtype | None = None
    attention: str = "auto"           # SDPA backend of the DiT's attention: auto | cudnn | flash | efficient | math,
    #                                   or triton (FusedDiT's own kernel, chosen when it is built: no SDPA here)

    def sdpa(self):
        if self.attention in ("auto", "triton"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[self.attention])

    def amp(self, device: torch.device):
        if self.autocast_dtype in (None, torch.float32):
            return contextlib.nullcontext()
        # no weight cache: a cached cast captured into a CUDA graph would go stale
        return torch.autocast(device.type, dtype=self.autocast_dtype, cache_enabled=False)


def denoise_step(run: Sampling, i: int, x: torch.Tensor, y: torch.Tensor, noise, *,
                 guidance: Guidance | None = None, cgs: CGS | None = None) -> torch.Tensor:
    """One step x_i -> x_{i-1} (B, C, h, w) float32: DiT + CFG, guidance, DDPM / DDIM update.

    ``noise(x)`` returns the step's (B, C, h, w) noise; it is called only when
    :func:`draws_noise` says the step draws one. Host-side only through Python
    scalars: no ``.item()`` and no data-dependent branch, so a CUDA graph can capture it.
    """
    s = run.schedule
    C = x.shape[1]
    t = s.timesteps[i]
    with phase("dit_forward"), run.amp(x.device), run.sdpa():
        out = cfg_forward(run.model, x, t, y, null_class=run.null_class, cfg_scale=run.cfg_scale,
                          cfg_channels=run.cfg_channels, chunk=run.forward_batch)
    learned = out.shape[1] == 2 * C
    guided = guidance is not None and guidance.active(i)
    formulation = run.formulation
    x_t = x
    # guidance calls sit between the "scheduler" phases so the profiler counts each once
    with phase("scheduler"):
        eps, x0 = s.eps_x0(i, x, out[:, :C])   # the model's eps, v or x0 -> (eps, x0)
    x0_model = x0  # CGS's DPP term reads the model's own prediction on every path (cgs.py)
    if guided and formulation == "paper":
        eps = guidance.paper_eps(i, x, x0, eps)
        with phase("scheduler"):
            x0 = s.x0_from_eps(i, x, eps)

    if s.sampler == "ddpm":
        with phase("scheduler"):
            log_var = learned_range_log_variance(s, i, out[:, C:]) if learned else fixed_log_variance(s, i).expand_as(x)
            mean = s.posterior_mean_coef1[i] * x0 + s.posterior_mean_coef2[i] * x
        if guided and formulation == "official":
            mean = mean + guidance.official_term(i, x, x0, log_var)
        with phase("scheduler"):
            x = mean
            if draws_noise(s, i):
                x = x + torch.exp(0.5 * log_var) * noise(x)
    else:  # DDIM
        if guided and formulation == "official":
            x0 = x0 + guidance.official_term(i, x, x0, None)
        with phase("scheduler"):
            if guided and formulation == "official":
                eps = s.eps_from_x0(i, x, x0)
            abar, abar_prev = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
            sigma = run.ddim_eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            x = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
            if draws_noise(s, i, run.ddim_eta):
                x = x + sigma * noise(x)
    if cgs is not None and cgs.active(i):
        with phase("cgs"):
            x = x - cgs.correction(x_t, x0_model, s.at("alphas_cumprod", i))
    return x


@torch.no_grad()
def sample(model, schedule: Schedule, x_T: torch.Tensor, y: torch.Tensor, *, null_class: int,
           cfg_scale: float = 4.0, cfg_channels: str = "3", formulation: str = "official",
           ddim_eta: float = 0.0, guidance: Guidance | None = None, generators=None,
           autocast_dtype: torch.dtype | None = None, callback=None, cgs: CGS | None = None,
           forward_batch: int | None = None, attention: str = "auto") -> torch.Tensor:
    """Denoise x_T (B, C, h, w) for classes y (B,) and return x_0 (B, C, h, w) float32.

    generators: one torch.Generator per sample for the step noise (and the
    guidance's cloud / patch noise). ``callback(i, x)`` is called after each step.
    cgs: the collaborative correction of the batch as ``cgs.sets`` sets (each set one class), on its steps.
    forward_batch: run the DiT on at most this many samples at a time.
    attention: the SDPA backend of the DiT's attention (auto: PyTorch's choice).
    """
    run = Sampling(model, schedule, null_class, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                   formulation=formulation, ddim_eta=ddim_eta, forward_batch=forward_batch,
                   autocast_dtype=autocast_dtype, attention=attention)
    x = x_T.float()
    if cgs is not None:
        cgs.check_labels(y)
    if generators is None:
        generators = [torch.Generator(device=x.device).manual_seed(b) for b in range(x.shape[0])]
    for i in reversed(range(schedule.steps)):
        x = denoise_step(run, i, x, y, lambda z: _randn_like_per_sample(z, generators), guidance=guidance, cgs=cgs)
        step_done()
        if callback is not None:
            callback(i, x)
    return x
