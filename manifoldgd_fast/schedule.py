"""DDPM (learned range) and DDIM coefficient tables, respaced as DiT does.

DiT is trained on 1000 steps with linear betas 1e-4 -> 2e-2. Sampling with
S steps keeps a subset of those steps (``space_timesteps``, the ADM/DiT rule:
"50" for DDPM, the fixed stride "ddim50" for DDIM) and re-derives betas from
the kept cumulative products, so ``alphas_cumprod[i]`` of the respaced chain
equals ``alphas_cumprod[timesteps[i]]`` of the original one. Tables are built
in float64 (as the released code does) and stored as float32 tensors on the
device; index ``i`` runs S-1 ... 0 during sampling.

Stable Diffusion (SD 1.x) is trained on 'scaled_linear' betas 0.00085 -> 0.012
and sampled as diffusers' schedulers do for it: "leading" spacing with
``steps_offset=1`` (timesteps 1, 21, ..., 981 for 50 steps), DDIM with
``set_alpha_to_one=False`` (the last step lands on abar(t=0), not 1) and the
"fixed small" (posterior) variance for DDPM. :func:`make_schedule` takes these
as keyword arguments; :func:`diffusers_schedule_kwargs` reads them from a
diffusers ``scheduler_config.json`` (keys it lacks: :data:`SD15_SCHEDULER_CONFIG`).
A config may also ask for diffusers' "trailing" or "linspace" spacing; with them
DDIM steps from t to t - T // S as ``DDIMScheduler.step`` does, which is not the
next kept timestep where the spacing is uneven, so those tables are built from
the (abar_t, abar_prev) pairs rather than from a chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ConfigError


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """The DiT/ADM 'linear' schedule (scaled to the number of training steps)."""
    scale = 1000 / num_train_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_train_timesteps, dtype=np.float64)


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion's 'scaled_linear' schedule: sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end)."""
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_betas_zero_snr`` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Alg. 1): shift and scale sqrt(abar) so that it keeps its first value and ends at 0,
    then return the betas of that schedule. abar of the last training step is then exactly 0 (its beta 1):
    the latents there are pure noise, and an eps model tells nothing of x0 (v or x0 models do)."""
    ac = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    r = np.sqrt(ac)
    r0, rT = r[0], r[-1]
    r = (r - rT) * (r0 / (r0 - rT))
    ab = r ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 (a PNDMScheduler; the betas and
# the timestep layout are what every diffusers scheduler of SD 1.5 uses).
SD15_SCHEDULER_CONFIG: dict = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}

SPACINGS = ("adm", "leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_large", "fixed_small")


def space_timesteps(num_train_timesteps: int, steps: int, sampler: str, spacing: str = "adm",
                    steps_offset: int = 0) -> list[int]:
    """Original timesteps kept for ``steps`` sampling steps, ascending.

    spacing "adm" (DiT):
      DDPM: evenly spaced with rounding, first 0 and last T-1 (ADM's "S" rule).
      DDIM: the integer stride whose ``range(0, T, stride)`` has exactly S
      elements (ADM's "ddimS" rule; equals diffusers' DDIMScheduler 'leading' where S divides T:
      S = 7 keeps 0, 143, ..., 858 where diffusers keeps 0, 142, ..., 852).
    spacing "leading" (diffusers, both samplers): ``j * (T // S) + steps_offset``
      for j = 0 ... S-1, as ``DDIMScheduler`` / ``DDPMScheduler.set_timesteps``.
    spacing "trailing" (diffusers): ``round(T - j * T / S) - 1`` for j = 0 ... S-1
      (starts at T-1); "linspace" (diffusers): ``round(linspace(0, T-1, S))``.
      steps_offset does not apply to either, as in diffusers.
    """
    if steps > num_train_timesteps:
        raise ConfigError(f"--steps must be <= {num_train_timesteps}, got {steps}")
    if spacing not in SPACINGS:
        raise ConfigError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if spacing == "leading":
        ratio = num_train_timesteps // steps
        kept = [j * ratio + int(steps_offset) for j in range(steps)]
        if kept[-1] >= num_train_timesteps:
            raise ConfigError(f"--steps {steps} with steps_offset {steps_offset} reaches timestep {kept[-1]}, "
                              f"past the model's {num_train_timesteps} training steps")
        return kept
    if spacing == "trailing":
        return sorted(int(t) - 1 for t in np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)))
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, steps).round().astype(np.int64).tolist()
    if sampler == "ddim":
        for stride in range(1, num_train_timesteps):
            if len(range(0, num_train_timesteps, stride)) == steps:
                return list(range(0, num_train_timesteps, stride))
        raise ConfigError(f"--steps {steps}: DDIM needs an integer stride dividing {num_train_timesteps} steps into exactly {steps}")
    if steps == 1:
        return [0]
    # ADM's respace.space_timesteps (one section), as DiT and the releases run it: a running float sum,
    # rounded at each step. round(j * frac) differs by one timestep for some S (e.g. 21, 23, 31, 35).
    frac = (num_train_timesteps - 1) / (steps - 1)
    kept, cur = [], 0.0
    for _ in range(steps):
        kept.append(round(cur))
        cur += frac
    return sorted(set(kept))


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
    host: dict = field(default_factory=dict, repr=False, compare=False)  # float64 numpy copies of the tables
    variance_type: str = "fixed_large"  # DDPM without learned sigma: beta_t (ADM / DiT) or the posterior's (SD)
    # DDIM's last step ends at abar(t=0) < 1 (set_alpha_to_one=False, diffusers' SD setting), so its sigma is
    # nonzero and eta > 0 adds noise there too, as DDIMScheduler.step does; ending at abar = 1 (DiT) it is 0.
    # DDPM: diffusers' fixed_large draws noise of variance beta at the last step too (ADM / DiT: none)
    last_step_noise: bool = False
    # what the model's output is: "epsilon" (DiT, SD 1.x), "v_prediction" (SD 2.x 768 px) or "sample" (x0);
    # denoise_step turns it into (eps, x0) by :meth:`eps_x0`
    prediction_type: str = "epsilon"

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def at(self, name: str, i: int) -> float:
        """Table ``name`` at step i as a Python float, read from the host copy: no device sync."""
        if name not in self.host:
            self.host[name] = getattr(self, name).detach().double().cpu().numpy()
        return float(self.host[name][i])

    def to(self, device) -> "Schedule":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Schedule(**kw)

    def zero_snr(self, i: int) -> bool:
        """Whether step i starts at abar = 0 (a zero-terminal-SNR schedule's t = T - 1): x_t is pure noise,
        eps = x_t whatever the model says, and x0 comes from a v or x0 prediction only."""
        return self.at("alphas_cumprod", i) == 0.0

    def eps_x0(self, i: int, x: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) that the model's prediction ``pred`` implies for the latents x at step i, by
        :attr:`prediction_type`, as diffusers' schedulers compute them (x0 = sqrt(abar) x - sqrt(1 - abar) v,
        eps = sqrt(abar) v + sqrt(1 - abar) x for v; for x0, eps = (x - sqrt(abar) x0) / sqrt(1 - abar)).
        Defined at abar = 0 for v and x0 (zero terminal SNR); an eps schedule never has abar = 0."""
        if self.prediction_type == "epsilon":
            return pred, self.x0_from_eps(i, x, pred)
        a, s = self.sqrt_alphas_cumprod[i], self.sqrt_one_minus_alphas_cumprod[i]
        if self.prediction_type == "v_prediction":
            return a * pred + s * x, a * x - s * pred
        return (x - a * pred) / s, pred

    def x0_from_eps(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), as the released samplers write it (abar > 0)."""
        return self.sqrt_recip_alphas_cumprod[i] * x - self.sqrt_recipm1_alphas_cumprod[i] * eps

    def eps_from_x0(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps that gives x0 at step i (the inverse of :meth:`x0_from_eps`); at abar = 0, x itself."""
        if self.zero_snr(i):
            return x
        return (self.sqrt_recip_alphas_cumprod[i] * x - x0) / self.sqrt_recipm1_alphas_cumprod[i]

    def prediction(self, i: int, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The model output of :attr:`prediction_type` that implies (eps, x0) at step i (v = sqrt(abar) eps -
        sqrt(1 - abar) x0)."""
        if self.prediction_type == "v_prediction":
            return self.sqrt_alphas_cumprod[i] * eps - self.sqrt_one_minus_alphas_cumprod[i] * x0
        return x0 if self.prediction_type == "sample" else eps


def make_schedule(steps: int = 50, sampler: str = "ddpm", num_train_timesteps: int = 1000,
                  betas: np.ndarray | None = None, device="cpu", *, spacing: str = "adm", steps_offset: int = 0,
                  set_alpha_to_one: bool = True, variance_type: str = "fixed_large",
                  prediction_type: str = "epsilon") -> Schedule:
    """The respaced schedule of ``steps`` sampling steps for ``sampler`` ("ddpm" | "ddim").

    The defaults are DiT's (linear betas, ADM spacing, DDIM ending at abar = 1,
    fixed-large variance); Stable Diffusion passes ``betas=scaled_linear_betas()``,
    ``spacing="leading"``, ``steps_offset=1``, ``set_alpha_to_one=False`` and
    ``variance_type="fixed_small"`` (see :func:`diffusers_schedule_kwargs`).
    """
    kept = space_timesteps(num_train_timesteps, steps, sampler, spacing=spacing, steps_offset=steps_offset)
    prev = None
    if sampler == "ddim" and spacing in ("trailing", "linspace"):
        # DDIMScheduler.step steps from t to t - T // S, which is not the next kept timestep where these
        # spacings are uneven (e.g. trailing over 30 steps keeps 999, 966, 932, ...: 966 steps to 933)
        prev = [t - num_train_timesteps // steps for t in kept]
    # DDPMScheduler.step adds noise at every timestep > 0, the chain's last too (1 with leading spacing and
    # steps_offset 1): negligible with fixed_small (its variance is clamped to 1e-20 there), but 1 - abar_t with
    # fixed_large. ADM / DiT (spacing "adm") never add noise at the last step.
    ddpm_last = sampler == "ddpm" and spacing != "adm" and variance_type == "fixed_large" and min(kept) > 0
    return schedule_from_timesteps(kept, sampler, num_train_timesteps=num_train_timesteps, betas=betas, device=device,
                                   set_alpha_to_one=set_alpha_to_one, variance_type=variance_type,
                                   prev_timesteps=prev, prediction_type=prediction_type, ddpm_last_step_noise=ddpm_last)


def schedule_from_timesteps(kept, sampler: str = "ddim", num_train_timesteps: int = 1000,
                            betas: np.ndarray | None = None, device="cpu", *, set_alpha_to_one: bool = True,
                            variance_type: str = "fixed_large", prev_timesteps=None,
                            prediction_type: str = "epsilon", ddpm_last_step_noise: bool = False) -> Schedule:
    """The respaced schedule over any increasing list of kept training timesteps
    (e.g. ``sorted(diffusers_scheduler.timesteps)``).

    set_alpha_to_one=False (DDIM only; diffusers' SD setting): the last DDIM step
    goes to abar of training step 0 instead of 1. DDPM always ends at 1, as
    diffusers' DDPMScheduler does.

    prev_timesteps: the training timestep each kept one steps to (same order as
    ``kept``, sorted ascending with it; < 0: the end of the chain). Default: the
    next kept one down (a chain, SpacedDiffusion). Otherwise the tables are built
    from the pairs (abar_t, abar_prev), as diffusers' DDIMScheduler steps.

    prediction_type: what the model outputs (:data:`PREDICTION_TYPES`). A kept timestep with abar = 0
    (zero terminal SNR) needs "v_prediction" or "sample": there x0 cannot come from eps.

    ddpm_last_step_noise: DDPM's last step also draws noise, of variance beta (1 - abar of the first kept
    timestep), as diffusers' DDPMScheduler does with fixed_large (fixed_large only).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"sampler must be ddpm or ddim, got {sampler!r}")
    if variance_type not in VARIANCE_TYPES:
        raise ConfigError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}, got {variance_type!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if ddpm_last_step_noise and (sampler != "ddpm" or variance_type != "fixed_large"):
        raise ConfigError("ddpm_last_step_noise applies to the ddpm sampler with variance_type fixed_large")
    base = linear_betas(num_train_timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
    if len(base) != num_train_timesteps:  # (tau = t / T and the spacing read T: the two must agree)
        raise ConfigError(f"num_train_timesteps={num_train_timesteps} but betas has {len(base)} steps")
    base_ac = np.cumprod(1.0 - base)
    order = sorted(range(len(kept)), key=lambda j: int(kept[j]))
    kept = [int(kept[j]) for j in order]
    if len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= len(base):
        raise ConfigError(f"timesteps must be distinct and in [0, {len(base) - 1}], got {kept[:3]}...{kept[-3:]}")
    if prev_timesteps is not None:
        prev = [int(prev_timesteps[j]) for j in order]
        if len(prev) != len(kept) or any(not p < t for p, t in zip(prev, kept)):
            raise ConfigError("prev_timesteps must give one earlier timestep per kept timestep")
        if prev[0] < 0 and prev[1:] == kept[:-1]:
            prev_timesteps = None    # the chain itself: built as one below
    if prev_timesteps is None:
        prev = [-1] + kept[:-1]
        # Respaced betas from the kept cumulative products (SpacedDiffusion).
        new_betas, last = [], 1.0
        for t in kept:
            new_betas.append(1.0 - base_ac[t] / last)
            last = base_ac[t]
        betas_r = np.array(new_betas, dtype=np.float64)
        ac = np.cumprod(1.0 - betas_r)
        ac_prev = np.append(1.0, ac[:-1])
    else:
        ac = base_ac[kept]
        ac_prev = np.array([base_ac[p] if p >= 0 else 1.0 for p in prev], dtype=np.float64)
        betas_r = 1.0 - ac / ac_prev
    if prediction_type == "epsilon" and bool((ac == 0).any()):
        raise ConfigError(f"timestep {kept[int(np.argmin(ac))]} has abar = 0 (zero terminal SNR), where an eps "
                          "model gives no x0: such a schedule needs prediction_type v_prediction or sample")
    post_var = betas_r * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at i = 0: ADM clips its log with the i = 1 value.
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(np.maximum(post_var, 1e-20))
    tables = dict(
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=_recip(ac, lambda a: np.sqrt(1.0 / a)),    # inf at abar = 0: never used there
        sqrt_recipm1_alphas_cumprod=_recip(ac, lambda a: np.sqrt(1.0 / a - 1.0)),
        posterior_mean_coef1=betas_r * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas_r) / (1.0 - ac),
        posterior_log_variance_clipped=post_log_var,
        log_betas=np.log(betas_r),
    )
    if sampler == "ddim" and not set_alpha_to_one:  # the end of the chain is abar(t=0), not 1
        tables["alphas_cumprod_prev"] = np.array([base_ac[0] if p < 0 else a for p, a in zip(prev, ac_prev)])
    out = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tables.items()}
    host = {k: v.astype(np.float32).astype(np.float64) for k, v in tables.items()}  # the device values, exactly
    host["timesteps"] = np.asarray(kept, dtype=np.float64)
    return Schedule(timesteps=torch.tensor(kept, dtype=torch.long, device=device),
                    num_train_timesteps=num_train_timesteps, sampler=sampler, host=host,
                    variance_type=variance_type, prediction_type=prediction_type,
                    last_step_noise=ddpm_last_step_noise or (sampler == "ddim"
                                                             and bool(tables["alphas_cumprod_prev"][0] < 1.0)), **out)


def _recip(ac: np.ndarray, f) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return f(ac)


BETA_SCHEDULES = ("scaled_linear", "linear")
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")


def diffusers_prediction_type(config: dict) -> str:
    """What the model predicts, from a diffusers scheduler config: "epsilon" (SD 1.x, SD 2.x 512 px
    base; the default), "v_prediction" (SD 2.x 768 px) or "sample" (x0). ConfigError for others."""
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler prediction_type {pred!r} is not supported ({', '.join(PREDICTION_TYPES)})")
    return pred


def diffusers_schedule_kwargs(config: dict) -> dict:
    """:func:`make_schedule` keyword arguments from a diffusers scheduler config
    (``scheduler/scheduler_config.json`` of a Stable Diffusion folder).

    Reads num_train_timesteps, beta_start / beta_end / beta_schedule ("scaled_linear"
    or "linear"; or trained_betas), steps_offset and set_alpha_to_one. A key the
    config lacks takes SD 1.5's value (:data:`SD15_SCHEDULER_CONFIG`: scaled_linear
    0.00085 -> 0.012, steps_offset 1, set_alpha_to_one False), not a diffusers
    scheduler class's default, whose linear 1e-4 -> 2e-2 betas no SD model was
    trained on; :func:`sd.read_scheduler_config` fills a folder's config the same way.
    steps_offset is taken as given (StableDiffusionPipeline's forcing it to 1 is done
    by :func:`sd.read_scheduler_config`); clip_sample is not read (the samplers never clip).
    rescale_betas_zero_snr rescales the betas as diffusers does
    (:func:`rescale_zero_terminal_snr`: abar = 0 at the last training step).
    Returns betas, num_train_timesteps, spacing (timestep_spacing: "leading",
    "trailing" or "linspace"), steps_offset, set_alpha_to_one,
    variance_type (DDPMScheduler's: fixed_small, its default, or fixed_large; ``*_log`` alike) and
    prediction_type (:func:`diffusers_prediction_type`).

    Raises ConfigError naming the key for what the samplers cannot reproduce:
    prediction_type other than epsilon / v_prediction / sample, another timestep_spacing,
    beta_schedule other than scaled_linear / linear, rescale_betas_zero_snr with an eps model,
    a learned variance_type, thresholding true.
    """
    config = {**SD15_SCHEDULER_CONFIG, **config}
    pred = diffusers_prediction_type(config)
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in DIFFUSERS_SPACINGS:
        raise ConfigError(f"scheduler timestep_spacing {spacing!r} is not supported ({', '.join(DIFFUSERS_SPACINGS)})")
    zero_snr = bool(config.get("rescale_betas_zero_snr"))
    if zero_snr and pred == "epsilon":  # abar = 0 at t = T - 1: x0 cannot come from eps there
        raise ConfigError("scheduler rescale_betas_zero_snr true needs prediction_type v_prediction or sample, "
                          "not epsilon: at abar = 0 an eps model gives no x0")
    trained = config.get("trained_betas")
    kind = config["beta_schedule"]
    if trained is not None:
        try:
            betas = np.asarray(trained, dtype=np.float64)
        except (TypeError, ValueError):
            betas = np.zeros(0)
        if betas.ndim != 1 or not len(betas) or not np.all((betas > 0) & (betas <= 1)):
            raise ConfigError("scheduler trained_betas must be a non-empty list of numbers in (0, 1]")
        T = len(betas)
    elif kind in BETA_SCHEDULES:
        T = _config_int(config, "num_train_timesteps", minimum=1)
        bs, be = _config_beta(config, "beta_start"), _config_beta(config, "beta_end")
        if kind == "scaled_linear":
            betas = scaled_linear_betas(T, bs, be)
        else:  # diffusers' linear: no ADM rescaling by 1000 / T
            betas = np.linspace(bs, be, T, dtype=np.float64)
    else:
        raise ConfigError(f"scheduler beta_schedule {kind!r} is not supported ({' or '.join(BETA_SCHEDULES)})")
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    # DDPMScheduler's variance (its default fixed_small; the *_log forms are the same variance, logged first)
    variance = str(config.get("variance_type") or "fixed_small").removesuffix("_log")
    if variance not in VARIANCE_TYPES:
        raise ConfigError(f"scheduler variance_type {config['variance_type']!r} is not supported (fixed_small or "
                          "fixed_large: the UNet predicts no variance)")
    if config.get("thresholding"):
        raise ConfigError("scheduler thresholding true (dynamic thresholding of x0, for pixel-space models) is "
                          "not supported; Stable Diffusion samples without it")
    return dict(betas=betas, num_train_timesteps=T, spacing=spacing,
                steps_offset=_config_int(config, "steps_offset", minimum=0),
                set_alpha_to_one=bool(config["set_alpha_to_one"]), variance_type=variance, prediction_type=pred)


def _config_int(config: dict, key: str, minimum: int) -> int:
    """An integer of a scheduler config (3.0 reads as 3): ConfigError naming the key for anything else."""
    v = config[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v == int(v) and v >= minimum
    if not ok:
        raise ConfigError(f"scheduler {key} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _config_beta(config: dict, key: str) -> float:
    """beta_start / beta_end of a scheduler config: a number in (0, 1), else ConfigError naming the key."""
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ConfigError(f"scheduler {key} must be a number in (0, 1), got {v!r}")
    return float(v)
