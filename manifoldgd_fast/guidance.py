"""Mode guidance and the manifold terms, per denoising step.

``Guidance`` holds what a batch of samples is guided towards (one mode per
sample; for the paper formulation also the class latents and each mode's
neighbourhood order) and turns a step's model output into the guided update:

* official (SPEC 4b): ``official_term`` is added to the posterior mean (DDPM)
  or to x0_hat (DDIM): the kernel-weighted mode pull plus ``manifold_pull``;
* paper (SPEC 4): ``paper_eps`` returns ``eps - lambda_M sigma_t g`` with ``g``
  the mode-guidance vector after ``manifold_correct``.

Noise for the cloud / patch comes from one generator per sample, so a
sample's result does not depend on the batch it was drawn in.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import warnings

import torch

from . import modes as modes_mod
from . import ops
from .config import SMALL_SUBSET_MAX_CLASSES, DistillConfig, suggest_t_stop
from .errors import ConfigError, DataError
from .profile import phase
from .schedule import Schedule

_EPS = 1e-8


def kernel_phi_official(diff: torch.Tensor, kernel: str, bandwidth: float | None) -> torch.Tensor:
    """phi of the released sampler, (B, 1, ...) broadcastable to diff (B, ...).

    rbf: -1/sigma^2; laplace: -1/(sigma |diff|); imq: -1/(|diff|^2 + c^2). sigma = c = 1 by default.
    """
    s = 1.0 if bandwidth is None else float(bandwidth)
    r = diff.flatten(1).norm(dim=1)
    if kernel == "rbf":
        phi = torch.full_like(r, -1.0 / (s * s + _EPS))
    elif kernel == "laplace":
        phi = -1.0 / (s * (r + _EPS))
    elif kernel == "imq":
        phi = -1.0 / (r * r + s * s + _EPS)
    else:
        raise ConfigError(f"unknown kernel {kernel!r}")
    return phi.view(-1, *([1] * (diff.dim() - 1)))


def mode_grad_paper(x0: torch.Tensor, m: torch.Tensor, kernel: str, bandwidth: float | None) -> torch.Tensor:
    """g = grad log k(x0, m) (SPEC 4.3), x0 and m (B, D).

    rbf: (m - x0)/sigma^2 (sigma = 1); laplace: (m - x0)/(sigma |m - x0|);
    imq: (m - x0) h^3 / (h^2 + |m - x0|^2)^{3/2}, h = sqrt(D) unless given.
    """
    diff = m - x0
    r = diff.norm(dim=1, keepdim=True)
    if kernel == "rbf":
        s = 1.0 if bandwidth is None else float(bandwidth)
        return diff / (s * s)
    if kernel == "laplace":
        s = 1.0 if bandwidth is None else float(bandwidth)
        return diff / (s * (r + _EPS))
    if kernel == "imq":
        h = math.sqrt(x0.shape[1]) if bandwidth is None else float(bandwidth)
        return diff * h ** 3 / (h * h + r * r) ** 1.5
    raise ConfigError(f"unknown kernel {kernel!r}")


# The DistillConfig fields the guidance reads (besides method, formulation and t_stop, StepGuidance's own
# arguments): what StepGuidance's **params take
GUIDANCE_PARAMS = ("lambda_m", "kernel", "kernel_bandwidth", "k", "d", "ridge", "lambda_n", "k_min", "radius_schedule",
                   "radius_a", "radius_units", "r_min", "r_max", "neighbourhood_dtype", "manifold_scale",
                   "manifold_radius", "bandwidth", "cloud_size", "warm_steps", "warm_mult", "warm_schedule", "backend",
                   "guidance_noise")


def paper_neighbourhoods(cfg: DistillConfig, class_latents: torch.Tensor, modes: torch.Tensor) -> dict:
    """The paper formulation's inputs of :class:`Guidance` for one class: its latents (n, D) in
    ``cfg.neighbourhood_dtype`` (the patch rows the guidance ops stream each step; they compute in fp32),
    each mode's neighbourhood order and sorted distances (m, n), ranked in fp32, and the class's radii (SPEC 3)."""
    zf = class_latents.flatten(1).float().to(modes.device)
    order, dists = modes_mod.neighbourhood_order(zf, modes.flatten(1).float())
    held = zf.to(getattr(torch, cfg.neighbourhood_dtype))     # fp32: the same tensor
    return dict(class_latents=held, order=order, sorted_dists=dists,
                radii=modes_mod.class_radii(dists, cfg.r_min, cfg.r_max, cfg.radius_units))


def merge_paper_neighbourhoods(parts: list[dict], rows: list[tuple[int, int]]) -> dict:
    """The paper formulation's :class:`Guidance` inputs for a batch of several classes.

    parts: :func:`paper_neighbourhoods` of each class; rows: (class index into parts, mode index) per
    sample of the batch. The classes' latents are stacked into one buffer, each row's order is offset
    into its class's block and, with its sorted distances, padded to the widest class (order 0, distance
    +inf: never inside a patch), and the radii and class sizes become per-row tensors. A row's patch is
    then the one it has alone: the same rows, the same lengths, the same noise ids.
    """
    starts, total = [], 0
    for p in parts:
        starts.append(total)
        total += p["class_latents"].shape[0]
    dev = parts[0]["order"].device
    width = max(p["order"].shape[1] for p in parts)
    B = len(rows)
    order = torch.zeros(B, width, dtype=parts[0]["order"].dtype, device=dev)
    dists = torch.full((B, width), float("inf"), dtype=parts[0]["sorted_dists"].dtype, device=dev)
    for r, (c, j) in enumerate(rows):
        n = parts[c]["order"].shape[1]
        order[r, :n] = parts[c]["order"][j] + starts[c]
        dists[r, :n] = parts[c]["sorted_dists"][j]
    radii = tuple(torch.tensor([parts[c]["radii"][e] for c, _ in rows], dtype=torch.float64, device=dev)
                  for e in range(2))
    sizes = torch.tensor([parts[c]["order"].shape[1] for c, _ in rows], dtype=torch.long, device=dev)
    return dict(class_latents=torch.cat([p["class_latents"] for p in parts]), order=order, sorted_dists=dists,
                radii=radii, n_latents=sizes)


def is_guided(formulation: str, i: int, steps: int, t_stop: int) -> bool:
    """Official: while the respaced index i (S-1 ... 0) > t_stop; paper: the first t_stop steps."""
    if formulation == "official":
        return i > t_stop
    return (steps - 1 - i) < t_stop


def check_zero_snr(cfg: DistillConfig, schedule: Schedule) -> None:
    """The paper formulation guides eps and takes x0 from the guided eps, which a step at abar = 0 (zero
    terminal SNR: eps = x_t whatever the model says) cannot do: ConfigError naming the step. The official
    formulation guides x0 / the posterior mean and runs there."""
    if cfg.formulation != "paper" or cfg.method not in ("manifoldgd", "mgd3"):
        return
    for i in range(schedule.steps):
        if schedule.zero_snr(i) and is_guided("paper", i, schedule.steps, cfg.t_stop):
            raise ConfigError(f"--formulation paper guides timestep {int(schedule.at('timesteps', i))}, where the "
                              "scheduler's abar is 0 (rescale_betas_zero_snr) and a guided eps gives no x0; use "
                              "--formulation official, or a scheduler that does not sample that timestep")


class Guidance:
    """Guidance for one batch of B samples (of one class, or of several: each sample's inputs are its own).

    Args:
        cfg: resolved DistillConfig (method, formulation and all guidance parameters).
        schedule: the sampling schedule.
        modes: (B, C, h, w) the mode each sample is pulled towards.
        generators: B torch.Generators, one per sample.
        class_latents: (n, D) the class latents (paper formulation only).
        order, sorted_dists: (B, n) each mode's neighbourhood order and distances (paper only).
        radii: (r_min, r_max) absolute neighbourhood radii of the class (paper only); for several
            classes a pair of (B,) float64 tensors, and ``n_latents`` (B,) each row's class size
            (:func:`merge_paper_neighbourhoods`).
        noise_seed, sample_ids: with ``cfg.guidance_noise == "philox"`` the cloud / patch
            noise is the counter-based stream of ``noise_seed`` for each sample id (B,),
            and the fused ops run (they never materialise the cloud or the patch on the
            GPU); with "generator" it comes from ``generators`` through the reference builders.
    """

    def __init__(self, cfg: DistillConfig, schedule: Schedule, modes: torch.Tensor, generators,
                 *, class_latents=None, order=None, sorted_dists=None, radii=None, n_latents=None,
                 noise_seed: int = 0, sample_ids=None):
        self.cfg = cfg
        self.philox = cfg.guidance_noise == "philox"
        self.noise_seed = int(noise_seed)
        self.sample_ids = (torch.arange(modes.shape[0]) if sample_ids is None
                           else torch.as_tensor(sample_ids)).long().to(modes.device)
        self.schedule = schedule
        self.modes = modes.float()
        self.generators = generators
        self.manifold = cfg.method == "manifoldgd"
        self.latents = class_latents
        self.order = order
        self.sorted_dists = sorted_dists
        self.radii = radii
        # the class size where order / sorted_dists are padded beyond it: (B,) per row for several classes,
        # a device scalar where the fast loop pads one class's buffers; None: their width
        self.n_latents = n_latents
        if cfg.formulation == "paper" and self.manifold and class_latents is None:
            raise ConfigError("the paper formulation needs class_latents, order, sorted_dists and radii")
        check_zero_snr(cfg, schedule)

    # which steps are guided ----------------------------------------------------
    def active(self, i: int) -> bool:
        return is_guided(self.cfg.formulation, i, self.schedule.steps, self.cfg.t_stop)

    @property
    def manifold_term(self) -> bool:
        """Whether a manifold term runs (and draws cloud / patch noise): ManifoldGD with a nonzero
        --lambda-n (paper) or --manifold-scale (official)."""
        c = self.cfg
        return self.manifold and (c.lambda_n if c.formulation == "paper" else c.manifold_scale) > 0

    # official formulation ---------------------------------------------------
    def official_term(self, i: int, x: torch.Tensor, x0: torch.Tensor, log_var: torch.Tensor | None) -> torch.Tensor:
        """Mode term + manifold term to add to the posterior mean (DDPM, log_var given) or to x0_hat (DDIM)."""
        c = self.cfg
        with phase("mode_term"):
            diff = x0.float() - self.modes
            term = c.lambda_m * kernel_phi_official(diff, c.kernel, c.kernel_bandwidth) * diff
            if log_var is not None:
                term = term * torch.exp(0.5 * log_var.float())
        if self.manifold_term:
            r = ops.official_radius(i, steps=self.schedule.steps, t_stop=c.t_stop, radius=c.manifold_radius,
                                    warm_steps=c.warm_steps, warm_mult=c.warm_mult, schedule=c.warm_schedule)
            abar = self.schedule.at("alphas_cumprod", i)
            if self.philox:
                with phase("manifold"):
                    pull = ops.manifold_pull_fused(x.flatten(1).float(), self.modes.flatten(1), radius=r,
                                                   alpha_bar=abar, seed=self.noise_seed, step=i,
                                                   n_points=c.cloud_size, k=c.k, d=c.d, scale=c.manifold_scale,
                                                   bandwidth=c.bandwidth, ridge=c.ridge,
                                                   sample_ids=self.sample_ids, backend=c.backend)
            else:
                with phase("cloud"):
                    cloud = ops.official_cloud(self.modes.flatten(1), r, abar, self.generators, n_points=c.cloud_size)
                with phase("manifold"):
                    pull = ops.manifold_pull(x.flatten(1).float(), cloud, k=c.k, d=c.d, scale=c.manifold_scale,
                                             bandwidth=c.bandwidth, ridge=c.ridge, backend=c.backend)
            term = term + pull.view_as(term)
        return term

    # paper formulation ------------------------------------------------------
    def paper_radius(self, i: int) -> float:
        tau = self.schedule.at("timesteps", i) / self.schedule.num_train_timesteps   # SPEC 3: tau = t / T
        r_min, r_max = self.radii
        return modes_mod.anneal_radius(tau, r_min, r_max, self.cfg.radius_schedule, self.cfg.radius_a)

    def paper_eps(self, i: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """eps_hat = eps - lambda_M sigma_t g, g the (manifold-corrected) mode guidance."""
        c = self.cfg
        B = x.shape[0]
        if c.lambda_m == 0:  # plain DiT (SPEC 4), and no patch drawn: the generators' step noise stays DiT's
            return eps
        with phase("mode_term"):
            g = mode_grad_paper(x0.flatten(1).float(), self.modes.flatten(1), c.kernel, c.kernel_bandwidth)
        if self.manifold_term:
            abar = self.schedule.at("alphas_cumprod", i)
            lengths = modes_mod.patch_lengths(self.sorted_dists, self.paper_radius(i), c.k_min, self.n_latents)
            if self.philox:
                with phase("manifold"):
                    g = ops.manifold_correct_fused(x.flatten(1).float(), self.latents, self.order, lengths, g,
                                                   alpha_bar=abar, seed=self.noise_seed, step=i, k=c.k, d=c.d,
                                                   lambda_normal=c.lambda_n, ridge=c.ridge,
                                                   sample_ids=self.sample_ids, backend=c.backend)
            else:
                with phase("patch"):
                    patch = ops.time_aligned_patch(self.latents, self.order, lengths, abar, self.generators)
                with phase("manifold"):
                    g = ops.manifold_correct(x.flatten(1).float(), patch, g, k=c.k, d=c.d,
                                             lambda_normal=c.lambda_n, ridge=c.ridge, lengths=lengths,
                                             backend=c.backend)
        with phase("mode_term"):
            sigma = self.schedule.at("sqrt_one_minus_alphas_cumprod", i)
            return eps - (c.lambda_m * sigma * g).view(B, *eps.shape[1:]).to(eps.dtype)


def _step_neighbourhoods(cfg: DistillConfig, modes: torch.Tensor, class_latents, classes) -> dict:
    """StepGuidance's paper-formulation inputs: one class's latents for every mode, or one latent tensor per
    class with ``classes`` (B,) each mode's class (:func:`merge_paper_neighbourhoods`)."""
    if class_latents is None:
        raise ConfigError("the paper formulation needs class_latents (n, C, h, w)")
    if isinstance(class_latents, torch.Tensor):
        if classes is not None:
            raise ConfigError("classes= goes with class_latents as a sequence of per-class tensors")
        return paper_neighbourhoods(cfg, class_latents, modes)
    if not isinstance(class_latents, (list, tuple)):  # (a numpy array was taken as n per-class "tensors")
        raise ConfigError(f"class_latents must be a torch.Tensor (n, C, h, w) or a list of them (one per class), "
                          f"got {type(class_latents).__name__}")
    lats = list(class_latents)
    bad = next((i for i, t in enumerate(lats) if not isinstance(t, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(f"class_latents[{bad}] must be a torch.Tensor (n, C, h, w), got {type(lats[bad]).__name__}")
    B = modes.shape[0]
    cls = []
    if classes is not None:
        # each index as an integer: int(c) truncated a float index (0.9 -> 0) and took True as 1
        flat = classes.reshape(-1) if hasattr(classes, "reshape") and hasattr(classes, "dtype") else classes
        try:
            items = list(flat)
        except TypeError:      # one index for a 1-mode batch
            items = [flat]
        cls = [None if isinstance(classes, torch.Tensor) and classes.dtype == torch.bool else ops._as_int(c)
               for c in items]
        if any(v is None for v in cls):
            bad = next(c for c, v in zip(items, cls) if v is None)
            raise ConfigError(f"classes= must hold integer class indices (not floats or bools), got {bad!r} "
                              f"in {classes!r}")
    if len(cls) != B or any(not 0 <= c < len(lats) for c in cls):
        raise ConfigError(f"with {len(lats)} class latent tensors, classes= must give each of the {B} modes its "
                          f"class index in [0, {len(lats)}), got {classes!r}")
    parts, rows = [], [None] * B
    for c in sorted(set(cls)):
        idx = [b for b in range(B) if cls[b] == c]
        parts.append(paper_neighbourhoods(cfg, lats[c], modes[idx]))
        for j, b in enumerate(idx):
            rows[b] = (len(parts) - 1, j)
    return merge_paper_neighbourhoods(parts, rows)


class StepGuidance:
    """ManifoldGD / MGD3 guidance as a backend for any eps-prediction sampling loop.

    Built once from the modes (and, for the paper formulation, the class
    latents); called once per denoising step with the current latents, the
    (CFG-mixed) eps and the step index; returns the guided eps for the
    caller's own scheduler::

        guide = StepGuidance(modes, scheduler=scheduler, formulation="official")  # after set_timesteps
        for step, t in enumerate(scheduler.timesteps):
            eps = ...                                   # the DiT forward + CFG
            eps = guide(x, eps, step)                   # guided eps
            x = scheduler.step(eps, t, x).prev_sample

    Both formulations act in eps space: the paper one is ``eps - lambda_M
    sigma_t g`` already; the official one adds its mode and manifold terms to
    x0_hat (its DDIM rule, SPEC 4b) and returns the eps that gives that x0_hat,
    ``eps - sqrt(abar / (1 - abar)) * term``. With DDIM this equals the
    built-in official DDIM sampler exactly.

    The guidance needs the noise level abar_t of each step, so it must know the model's
    training schedule: pass the loop's diffusers ``scheduler`` (its ``alphas_cumprod`` and
    ``timesteps`` are read) or ``betas``. With neither, DiT's linear betas (1e-4 -> 2e-2 over
    1000 steps) are assumed: right for DiT, wrong for e.g. Stable Diffusion (scaled_linear).

    Args:
        modes: (B, C, h, w) one mode per sample of the batch (the latents x_t the calls give
            must have this shape and device).
        timesteps: the loop's training timesteps, in the loop's order (descending);
            default ``scheduler.timesteps`` (after its ``set_timesteps``).
        formulation / method: "official" | "paper"; "manifoldgd" | "mgd3".
        class_latents: (n, C, h, w) latents of the modes' class (paper formulation); for a batch
            of several classes, a sequence of such tensors, one per class, with ``classes``.
        classes: (B,) each mode's index into ``class_latents`` when it is a sequence: each sample's
            neighbourhood then comes from its own class (its radii, its latents), as if sampled alone.
        n_classes: sets the dataset-dependent defaults (<= 10: ImageNette values).
        t_stop: where guidance stops (default :func:`~.config.suggest_t_stop`: steps // 2, at most
            steps - 2 in the official formulation). Official formulation: steps with index
            i > t_stop in the respaced schedule (i = steps - 1 - step) are guided; paper: the first
            t_stop steps of the loop. DiT's runs take t_stop 25 of 50 steps: the official window guides
            24 of them (i = 26..49), the paper's 25.
        seed: per-sample cloud / patch noise derives from it. The noise is counter-based
            (``guidance_noise="philox"``, keyed by seed, step and sample): a call's result depends only
            on its inputs, not on the calls before it (a retried or repeated step gives the same eps).
            ``guidance_noise="generator"`` draws from one torch.Generator per sample instead, as the
            built-in CPU sampler does; then every call advances them.
        num_train_timesteps: the model's training steps (default 1000); with ``scheduler`` or
            ``betas``, their length (another value is refused).
        scheduler: the loop's diffusers scheduler (DDIMScheduler, DDPMScheduler, ...): the
            training schedule is its ``alphas_cumprod`` (and num_train_timesteps its length).
        betas: the model's training betas instead of ``scheduler`` (None and no scheduler:
            DiT's linear ones); Stable Diffusion: ``schedule.scaled_linear_betas()``.
        prediction_type: what the loop's model output is: "epsilon", "v_prediction" (e.g. SD 2.x
            768 px) or "sample" (x0); None: ``scheduler.config.prediction_type``, else "epsilon".
            The call then takes and returns that kind of output, guided through the eps and x0 it
            implies (at abar = 0, zero terminal SNR, through x0 alone).
        **params: the DistillConfig guidance parameters (:data:`GUIDANCE_PARAMS`: lambda_m, k, d,
            manifold_radius, ...); another DistillConfig field is refused (the guidance does not use it).
    """

    def __init__(self, modes: torch.Tensor, *, timesteps=None, formulation: str = "official",
                 method: str = "manifoldgd", class_latents=None, classes=None, n_classes: int = 1000,
                 t_stop: int | None = None, seed: int = 0, num_train_timesteps: int | None = None, betas=None,
                 scheduler=None, prediction_type: str | None = None, **params):
        import numpy as np

        from .config import derive_seed
        from .schedule import schedule_from_timesteps

        if method not in ("manifoldgd", "mgd3"):  # (dit and cgs would have run MGD3's guidance, silently)
            raise ConfigError(f"StepGuidance method must be manifoldgd or mgd3, got {method!r} (plain DiT "
                              "sampling needs no guidance; CGS is not a per-sample step guidance)")
        if not isinstance(modes, torch.Tensor) or modes.dim() < 2 or modes.shape[0] < 1 or not modes.is_floating_point():
            raise ConfigError(f"modes must be a floating tensor (B, C, h, w) with one mode per sample, got "
                              f"{type(modes).__name__} {tuple(getattr(modes, 'shape', ()))}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if not bool(torch.isfinite(modes).all()):  # (official: an eigh error at the first call; mgd3: NaN eps)
            raise DataError("modes: latents contain NaN or inf")
        n = ops._as_int(n_classes)
        if n is None or n < 1:  # (True, 0 and -5 took the small-data-set defaults; 2.5 was named --class-batch)
            raise ConfigError(f"n_classes must be an integer >= 1 (the data set's number of classes: <= "
                              f"{SMALL_SUBSET_MAX_CLASSES} takes the ImageNette defaults), got {n_classes!r}")
        n_classes = n
        given_T = num_train_timesteps is not None
        T = ops._as_int(1000 if num_train_timesteps is None else num_train_timesteps)
        if T is None or T < 1:  # (0: a ZeroDivisionError, -1: numpy's ValueError)
            raise ConfigError(f"num_train_timesteps must be an integer >= 1 (the model's training steps), got "
                              f"{num_train_timesteps!r}")
        num_train_timesteps = T
        for name, source in (("steps", "len(timesteps)"), ("ipc", "modes.shape[0], one mode per sample")):
            if name in params:  # (DistillConfig got it twice: a TypeError)
                raise ConfigError(f"{name}= is set by StepGuidance itself ({source}); do not pass it")
        unknown = sorted(set(params) - {f.name for f in dataclasses.fields(DistillConfig)})
        if unknown:
            raise ConfigError(f"StepGuidance got an unknown parameter {unknown[0]!r} (**params are DistillConfig "
                              "guidance parameters: lambda_m, k, d, manifold_radius, ...)")
        unused = sorted(set(params) - set(GUIDANCE_PARAMS))   # (cgs=True, dtype=, sampler= did nothing, silently)
        if unused:
            raise ConfigError(f"StepGuidance does not use {unused[0]!r}, a setting of distill's own loop, not of the "
                              f"guidance: leave it out (its parameters: {', '.join(GUIDANCE_PARAMS)})")
        if prediction_type is None:
            prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
        self.prediction_type = prediction_type

        if scheduler is not None and formulation == "official" and "DDIM" not in type(scheduler).__name__:
            # the official rule here is the release's DDIM one (terms on x0_hat); its DDPM sampler adds them to
            # the posterior mean instead, so in a DDPM loop they act coef1 / s times weaker (10-400x)
            warnings.warn(f"StepGuidance(formulation='official') applies the release's DDIM rule; with "
                          f"{type(scheduler).__name__} its terms act far more weakly than in the release's DDPM "
                          "sampler (use a DDIMScheduler, or manifoldgd_fast's own DDPM sampler)", stacklevel=2)
        if scheduler is not None:
            if betas is not None:
                raise ConfigError("give StepGuidance the scheduler or the betas, not both")
            # betas whose float64 cumulative product is the scheduler's alphas_cumprod: the noise
            # levels its step uses, to float64 rounding
            ac = scheduler.alphas_cumprod.detach().double().cpu().numpy()            # (T,)
            betas = 1.0 - ac / np.append(1.0, ac[:-1])
            if timesteps is None:
                timesteps = scheduler.timesteps
        elif betas is not None:  # (NaN, < 0 or > 1 failed at the first call naming alpha_bar; (T, 2) was flattened)
            try:
                b = np.asarray(betas.detach().cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
            except (TypeError, ValueError):
                raise ConfigError(f"betas must be a 1-D sequence of numbers, got {type(betas).__name__}") from None
            if b.ndim != 1 or b.size == 0:
                raise ConfigError(f"betas must be 1-D, one beta per training step, got shape {b.shape}")
            bad = ~(np.isfinite(b) & (b > 0) & (b <= 1))
            if bad.any():
                j = int(np.argmax(bad))
                raise ConfigError(f"betas must be finite and each in (0, 1] (1: a zero-terminal-SNR schedule's last "
                                  f"step), got {float(b[j])!r} at index {j}")
            betas = b    # what the schedule reads (np.asarray(betas, float64)), the same values
        if betas is not None:  # (the paper's tau = t / T read the default 1000: past 1 with 2,000 betas)
            if given_T and num_train_timesteps != len(betas):
                raise ConfigError(f"num_train_timesteps={num_train_timesteps} but the "
                                  f"{'scheduler gives' if scheduler is not None else 'betas give'} {len(betas)} "
                                  "training steps: leave num_train_timesteps out")
            num_train_timesteps = len(betas)
        if timesteps is None:
            raise ConfigError("StepGuidance needs timesteps= (the loop's, descending) or scheduler= after its "
                              "set_timesteps")
        # (a NaN was int()'s ValueError, a 2-D tensor 'only one element tensors...', True step 1)
        if getattr(timesteps, "ndim", 1) != 1 or str(getattr(timesteps, "dtype", "")) in ("bool", "torch.bool"):
            raise ConfigError(f"timesteps must be a 1-D sequence of integers, got "
                              f"{getattr(timesteps, 'dtype', '')} of shape {tuple(timesteps.shape)}")
        try:
            timesteps = list(timesteps)
        except TypeError:
            raise ConfigError(f"timesteps must be a sequence of integers, got {timesteps!r}") from None
        for t in timesteps:
            try:
                finite = not isinstance(t, bool) and math.isfinite(float(t))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise ConfigError(f"timesteps must be finite integers (the training steps the loop visits), got "
                                  f"{t!r}")
        if not timesteps:  # (named --steps 0)
            raise ConfigError("timesteps is empty: give the training timesteps the loop visits")
        ts = [int(t) for t in timesteps]
        if any(float(t) != int(t) for t in timesteps):   # (a float timestep was truncated silently)
            raise ConfigError("timesteps must be integers (the training steps the loop visits), got "
                              f"{next(t for t in timesteps if float(t) != int(t))!r}")
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise ConfigError("timesteps must be strictly decreasing, in the order the loop visits them")
        steps = len(ts)
        params.setdefault("guidance_noise", "philox")  # stateless calls (see seed)
        cfg = DistillConfig(method=method, formulation=formulation, steps=steps, ipc=modes.shape[0],
                            t_stop=suggest_t_stop(formulation, steps) if t_stop is None else t_stop,
                            **params).resolve(n_classes, modes.device)
        self.schedule = schedule_from_timesteps(ts, "ddim", num_train_timesteps=num_train_timesteps, betas=betas,
                                                device=modes.device, prediction_type=prediction_type)
        gens = [torch.Generator(device=modes.device).manual_seed(derive_seed(seed, "sample", b))
                for b in range(modes.shape[0])]
        paper_mgd = formulation == "paper" and method == "manifoldgd"
        if not paper_mgd and (classes is not None or class_latents is not None):
            # (ignored without a word). class_latents warns only: existing callers pass one tensor to both formulations
            what = f"formulation={formulation!r}, method={method!r} uses no class latents"
            if classes is not None or not isinstance(class_latents, torch.Tensor):
                raise ConfigError(f"class_latents / classes are for formulation='paper' with method='manifoldgd'; "
                                  f"{what}")
            warnings.warn(f"StepGuidance ignores class_latents: they are for formulation='paper' with "
                          f"method='manifoldgd'; {what}", stacklevel=2)
        kw = {}
        if paper_mgd:
            kw = _step_neighbourhoods(cfg, modes, class_latents, classes)
        self.cfg = cfg
        self.generators = gens
        self.guidance = Guidance(cfg, self.schedule, modes, gens, noise_seed=derive_seed(seed, "guidance"), **kw)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        """Guided eps for the loop's ``step``-th step (0 = the first, noisiest one); with
        ``prediction_type`` v_prediction or sample, ``eps`` is the model's v or x0 and so is the result."""
        s = self.schedule
        try:
            if isinstance(step, bool):
                raise TypeError
            k = operator.index(step)   # an int, a numpy int or a 0-d integer tensor; not a float, not a bool
        except TypeError:
            raise ConfigError(f"step {step!r}: expected the step's index in the loop (enumerate(scheduler.timesteps)), "
                              "an integer") from None
        if not 0 <= k < s.steps:
            raise ConfigError(f"step {k} is outside [0, {s.steps}): pass the step's index in the loop "
                              "(enumerate(scheduler.timesteps)), not its timestep")
        want, dev = tuple(self.guidance.modes.shape), self.guidance.modes.device
        for name, t in (("x_t", x_t), ("eps", eps)):   # (a list was an AttributeError on .shape)
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"{name} must be a torch.Tensor {want}, got {type(t).__name__}")
        ops._check_float(x_t=x_t, eps=eps)   # (an integer eps came back as an int64 eps, truncated)
        if tuple(x_t.shape) != want or tuple(eps.shape) != want:
            raise ConfigError(f"x_t and the model output must be {want}, the modes' shape (one mode per "
                              f"sample; the conditional half of a CFG batch), got {tuple(x_t.shape)} and "
                              f"{tuple(eps.shape)}")
        if x_t.device != dev or eps.device != dev:
            raise ConfigError(f"x_t and the model output must be on the modes' device {dev}, got "
                              f"{x_t.device} and {eps.device}")
        i = s.steps - 1 - k
        if not self.guidance.active(i):
            return eps
        x = x_t.float()
        e, x0 = s.eps_x0(i, x, eps.float())          # the loop's eps, v or x0 -> (eps, x0)
        if self.cfg.formulation == "paper":
            e = self.guidance.paper_eps(i, x, x0, e)
            x0 = s.x0_from_eps(i, x, e)
        else:                                        # x0 + term, and the eps that goes with it
            x0 = x0 + self.guidance.official_term(i, x, x0, None)
            e = s.eps_from_x0(i, x, x0)
        return s.prediction(i, e, x0).to(eps.dtype)
