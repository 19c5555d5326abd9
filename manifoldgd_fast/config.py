"""Every parameter of a distillation run, with SPEC defaults and validation.

``DistillConfig`` is the single source of truth: the CLI builds one from flags
(or a YAML/JSON file), the Python API takes one, and the manifest stores the
*resolved* copy (``resolve()`` fills the dataset-dependent defaults such as the
official radius, bandwidth and start level) so a run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .classes import SUBSETS
from .errors import ConfigError

METHODS = ("manifoldgd", "mgd3", "dit", "cgs")
CGS_STEPS = ("all", "guided")
DPP_EPS_MIN = 1e-5  # the DPP ridge: about 100 float32 ulps of K's unit diagonal
FORMULATIONS = ("official", "paper")
SAMPLERS = ("auto", "ddpm", "ddim")
MODE_METHODS = ("auto", "kmeans", "divisive", "gmm", "random", "agglomerative")
MODE_POINTS = ("auto", "medoid", "mean")
LINKAGES = ("ward", "average", "complete", "single")
KERNELS = ("rbf", "laplace", "imq")
RADIUS_SCHEDULES = ("exponential", "cosine", "linear", "constant")
RADIUS_UNITS = ("quantile", "absolute")
WARM_SCHEDULES = ("exp", "linear", "cosine")
CFG_CHANNELS = ("auto", "3", "all")
BACKBONES = ("auto", "dit", "sd")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("auto", "reference", "triton")
LOOPS = ("auto", "reference", "fast")
COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "triton")

# Dataset-dependent defaults of the released scripts: <= 10 classes behaves as
# ImageNette/ImageWoof, more classes as ImageNet-100/1k (SPEC 2, 4b).
SMALL_SUBSET_MAX_CLASSES = 10


def _unique_keys(pairs) -> dict:
    """A JSON object's pairs -> dict; a key given twice is refused (json keeps the last, silently)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _unique_key_loader():
    """yaml.SafeLoader refusing a key given twice in one mapping (it keeps the last, silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    dup = False
                if dup:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _folder_name(c) -> bool:
    """A class folder's name as YAML or the API may give it: a string, or an int (a numbered folder, `0`)."""
    return isinstance(c, str) or (isinstance(c, numbers.Integral) and not isinstance(c, bool))


@dataclass
class DistillConfig:
    # --- data, models, run -------------------------------------------------
    data: str | None = None            # ROOT/<class>/<image>; None = embedded digits demo
    out: str = "distilled"
    classes: str | None = None         # subset name (nette, woof, imagenet100, imagenet1k), a file, or "a,b,c"
    label_map: str = "auto"            # auto | imagenet1k | sorted | a class-map file: folder names -> DiT class ids
    model: str | None = None           # DiT folder / HF id in the local cache; None = shipped tiny model
    vae: str | None = None             # AutoencoderKL folder / HF id; None = the model folder's vae/ or shipped
    cache_dir: str | None = None       # latent cache root; None = $MANIFOLDGD_CACHE or ~/.cache/manifoldgd_fast
    image_size: int | None = None      # None = 8 x the model's latent size
    backbone: str = "auto"             # auto (from the model folder) | dit | sd (Stable Diffusion 1.x, class prompts)
    prompt_template: str = "{name}"    # sd: each class's prompt; {name} = its class name (the MGD3 paper's)
    negative_prompt: str = ""          # sd: the prompt of the CFG null class
    class_names: str | dict | None = None   # sd: folder -> class name (file, mapping or "a=apple,b=banana");
                                       # None = ImageNet names of wnids, else the folder name
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    ipc: int = 10
    batch_size: int = 16               # samples denoised together (x2 in the DiT forward for CFG)
    class_batch: int | None = None     # classes sampled in one batch; None = batch_size // ipc (at least 1, at most
                                       # the run's classes), for every method and formulation
    encode_batch_size: int = 32
    encode_workers: int | None = None  # image-reading DataLoader workers of the cache; None = min(8, CPUs / ranks)
    shard: str | None = None           # "K/N": this process takes classes j with j mod N == K, independently of
                                       # the other N - 1 (a Slurm job array); same bytes as one process
    backend: str = "auto"              # fused ops (guidance; dit_impl fused's adaLN ops): auto | reference | triton
    guidance_noise: str = "auto"       # cloud/patch noise: generator (torch.Generator per sample), philox
                                       # (counter-based; the fused kernels' path), auto = philox on CUDA
    loop: str = "auto"                 # sampling loop: reference, fast (static step, CUDA graphs on CUDA),
                                       # auto = fast on CUDA where the run allows it (same latents either way)
    compile: str = "none"              # torch.compile the DiT in the fast loop: none | default | max-autotune...
    attention: str = "auto"            # the DiT attention: SDPA auto | cudnn | flash | efficient | math, or triton
                                       # (our kernel, manifoldgd_fast/kernels/attention.py; needs dit_impl fused)
    dit_impl: str = "diffusers"        # the DiT forward: diffusers | fused (fastdit.FusedDiT: fused QKV, adaLN
                                       # once per step, LayerNorm-modulate / gate-residual kernels)
    time_embedding: str = "auto"       # the DiT's timestep features: auto | original (facebookresearch/DiT's,
                                       # the releases') | diffusers (models.set_time_embedding)

    # --- method ------------------------------------------------------------
    method: str = "manifoldgd"
    formulation: str = "official"
    sampler: str = "auto"              # auto: ddpm (DiT: the ManifoldGD release; SD: MGD3's text-to-image script)
    steps: int = 50
    ddim_eta: float = 0.0
    cfg_scale: float | None = None     # None: 4.0 for DiT (SPEC), 8.0 for SD (MGD3's text-to-image script)
    cfg_channels: str = "auto"         # auto: "3" for DiT (official formulation), "all" for SD and the paper one
    t_stop: int | None = None          # guidance while the step is before t_stop (None: sd_t_stop for SD, else 25)

    # --- mode discovery (SPEC 2) ---------------------------------------------
    modes_dir: str | None = None       # read each class's modes from DIR/<class>.safetensors (`modes` command)
    mode_method: str = "auto"          # auto: divisive for manifoldgd, kmeans for mgd3
    mode_point: str = "auto"           # auto: medoid for official divisive, mean otherwise
    level: int | None = None           # official level i (6 / 1) or paper start level L (3 / 2)
    max_depth: int | None = None       # paper divisive: None = deep enough for the budget
    min_leaf: int = 2
    linkage: str = "ward"
    kmeans_iters: int = 300            # sklearn KMeans's max_iter, as the releases call it
    kmeans_tol: float = 1e-4           # sklearn's tol: stop at squared centre shift <= tol * mean variance
    gmm_iters: int = 100               # --mode-method gmm: EM steps at most (sklearn GaussianMixture's max_iter)
    bisect_inits: int = 10             # 2-means restarts per split (official: 10)

    # --- mode guidance (SPEC 4.3 / 4b.2) ------------------------------------
    kernel: str = "rbf"
    kernel_bandwidth: float | None = None   # rbf/laplace sigma (1); imq c (1, official) / h (sqrt(D), paper)
    lambda_m: float = 0.1

    # --- manifold term, shared ---------------------------------------------
    k: int | None = None               # nearest rows: paper 10, official 12
    d: int = 3                         # tangent dimension
    ridge: float | None = None         # paper 1e-4, official 1e-5

    # --- paper formulation (SPEC 3, 4.4) --------------------------------------
    lambda_n: float = 1.0
    k_min: int | None = None           # None = 2k
    radius_schedule: str = "exponential"
    radius_a: float = 5.0
    radius_units: str = "quantile"
    r_min: float = 0.2
    r_max: float = 0.9
    neighbourhood_dtype: str = "float32"  # the class latents the patch is built from, as held on the device:
                                          # bfloat16 / float16 halve the bytes of the kNN + Gram passes

    # --- official formulation (SPEC 4b) -------------------------------------
    manifold_scale: float = 0.1        # lambda_man
    manifold_radius: float | None = None    # r: 0.05 (<= 10 classes) / 0.1
    bandwidth: float | None = None          # b: 0.2 (<= 10 classes) / 0.1
    cloud_size: int = 300
    warm_steps: int = 5
    warm_mult: float = 2.0
    warm_schedule: str = "exp"

    # --- collaborative guided sampling (SPEC 5) -------------------------------
    cgs: bool | None = None            # add CGS to the method (None: only with --method cgs, CGS alone)
    cgs_steps: str = "all"             # all: every step, as the source; guided: only the guidance's steps (t_stop)
    eta_dpp: float = 1.0               # DPP diversity step (the source paper gives no value)
    eta_dm: float = 0.1                # distribution-matching step (likewise)
    dpp_eps: float = 1e-3              # ridge of the DPP kernel (at least DPP_EPS_MIN)

    # --- output --------------------------------------------------------------
    save_latents: bool = True
    contact_sheet: bool = True
    output_size: int | None = None     # PNGs resized (bicubic) to this many px; None = the model's resolution

    extra: dict = field(default_factory=dict)  # free-form notes stored in the manifest

    # ------------------------------------------------------------------------
    def __post_init__(self):
        # the API's pathlib.Path (any path field) / numpy integer / torch.device: the flag's string or int (its
        # manifest, fingerprint and loaders'; save() wrote no JSON of a Path, ipc=np.int64(2) was refused)
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, os.PathLike):
                setattr(self, f.name, os.fspath(v))
            elif isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
                setattr(self, f.name, int(v))
        # a whole number in a number field (YAML's or the API's `lambda_m: 1`) is the flag's float (1.0): one run,
        # one fingerprint, one manifest (json hashed 1 and 1.0 apart: a resume spelt the other way was refused)
        for name in FLOAT_FIELDS:
            if type(getattr(self, name)) is int:
                setattr(self, name, float(getattr(self, name)))
        # YAML's and the API's `classes: [a, b]` / `classes: [0, 1]` / `classes: 3`: the flag's "a,b"
        if isinstance(self.classes, (list, tuple)) and self.classes and all(_folder_name(c) for c in self.classes):
            self.classes = ",".join(map(str, self.classes))
        elif _folder_name(self.classes) and not isinstance(self.classes, str):
            self.classes = str(self.classes)
        if not isinstance(self.device, str):
            import torch

            if isinstance(self.device, torch.device):
                self.device = str(self.device)

    def validate(self) -> "DistillConfig":
        """Check every parameter; raise ConfigError naming the first bad one."""
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise ConfigError(f"--{_flag(name)}: unknown value {v!r}; choose one of {', '.join(allowed)}")

        for name, allowed in CHOICES.items():
            choice(name, allowed)
        check_label_map(self.label_map)
        for name in ("model", "vae"):  # (a number or a list reached the loaders: a TypeError traceback)
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(f"--{name} must be a model folder, a checkpoint file or a hub id, got {v!r}")
        if not isinstance(self.device, str) or not self.device.strip():
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

        def positive_int(name, allow_none=False, minimum=1):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"--{_flag(name)} must be an integer >= {minimum}, got {v!r}")

        for name in ("ipc", "batch_size", "encode_batch_size", "steps", "kmeans_iters", "gmm_iters", "bisect_inits",
                     "cloud_size", "d", "min_leaf"):
            positive_int(name)
        positive_int("encode_workers", allow_none=True, minimum=0)
        positive_int("class_batch", allow_none=True)
        positive_int("k", allow_none=True, minimum=2)
        positive_int("k_min", allow_none=True, minimum=2)
        positive_int("level", allow_none=True, minimum=0)
        positive_int("max_depth", allow_none=True, minimum=0)
        positive_int("image_size", allow_none=True, minimum=8)
        positive_int("output_size", allow_none=True, minimum=8)
        if self.output_size is not None and self.output_size > MAX_OUTPUT_SIZE:
            raise ConfigError(f"--output-size must be <= {MAX_OUTPUT_SIZE} px, got {self.output_size}")
        positive_int("warm_steps", minimum=0)
        positive_int("t_stop", allow_none=True, minimum=0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.shard is not None:
            parse_shard(self.shard)

        def non_negative(name, allow_none=False, strict=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or (strict and v == 0):
                rule = "> 0" if strict else ">= 0"
                raise ConfigError(f"--{_flag(name)} must be a number {rule}, got {v!r}")

        for name in ("lambda_m", "lambda_n", "manifold_scale", "ddim_eta", "radius_a",
                     "eta_dpp", "eta_dm", "kmeans_tol"):
            non_negative(name)
        non_negative("cfg_scale", allow_none=True)
        check_prompt_template(self.prompt_template)
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"--negative-prompt must be a string, got {self.negative_prompt!r}")
        if self.class_names is not None and not isinstance(self.class_names, (str, dict)):
            raise ConfigError(f"--class-names must be a file, a mapping or 'a=apple,b=banana', got {self.class_names!r}")
        non_negative("ridge", allow_none=True)
        for name in ("r_min", "r_max"):  # not optional: a YAML `r_min:` (None) is refused here, not compared below
            non_negative(name)
        for name in ("manifold_radius", "bandwidth", "kernel_bandwidth", "dpp_eps"):
            non_negative(name, allow_none=True, strict=True)
        if self.attention == "triton" and self.dit_impl != "fused":
            raise ConfigError("--attention triton is the fused DiT's kernel: add --dit-impl fused")
        if self.backbone == "sd" and self.cfg_channels == "3":
            raise ConfigError("--cfg-channels 3 is DiT's CFG on its first 3 eps channels; Stable Diffusion predicts "
                              "eps on all 4 latent channels: use --cfg-channels all (or auto)")
        if self.cgs is not None and not isinstance(self.cgs, bool):  # (YAML's `cgs: 0` is no --no-cgs)
            raise ConfigError(f"--cgs must be true or false, got {self.cgs!r}")
        if self.method == "cgs" and self.cgs is False:
            raise ConfigError("--method cgs is CGS alone: it cannot run with --no-cgs")
        if self.cgs_steps not in CGS_STEPS:
            raise ConfigError(f"--cgs-steps must be one of {', '.join(CGS_STEPS)}, got {self.cgs_steps!r}")
        if self.cgs or self.method == "cgs":
            if self.dpp_eps is None or self.dpp_eps < DPP_EPS_MIN:
                raise ConfigError(f"--dpp-eps must be at least {DPP_EPS_MIN:g}, got {self.dpp_eps!r}: K + eps I is "
                                  f"singular with more samples than latent dimensions, and a smaller eps leaves its "
                                  f"factorisation ill-conditioned")
            if self.eta_dpp == 0 and self.eta_dm == 0:
                raise ConfigError("CGS with --eta-dpp 0 and --eta-dm 0 changes nothing: give one of them a step > 0")
            if self.ipc == 1 and self.eta_dm == 0:
                raise ConfigError("CGS at --ipc 1 with --eta-dm 0 changes nothing: the DPP term needs at least 2 "
                                  "samples per class; give --eta-dm a step > 0 or raise --ipc")
            if self.eta_dm > self.ipc:
                raise ConfigError(f"--eta-dm {self.eta_dm:g} is more than --ipc {self.ipc}: each step moves a set's "
                                  f"mean 2 eta_dm / IPC times its distance to the class mean, past it by more than "
                                  f"it was off, and the set diverges; use at most IPC / 2 (which lands on the mean)")
        non_negative("warm_mult")
        if self.warm_mult < 1.0:
            raise ConfigError(f"--warm-mult must be >= 1, got {self.warm_mult!r}")
        if self.radius_units == "quantile":
            for name in ("r_min", "r_max"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ConfigError(f"--{_flag(name)} is a quantile and must lie in [0, 1], got {getattr(self, name)!r}")
        if self.r_min > self.r_max:
            raise ConfigError(f"--r-min ({self.r_min}) must not exceed --r-max ({self.r_max})")
        k = self.k if self.k is not None else (12 if self.formulation == "official" else 10)
        if self.d >= k:
            raise ConfigError(f"--d must be smaller than --k (the tangent space is spanned by k points), got d={self.d}, k={k}")
        if self.method == "manifoldgd" and self.formulation == "official" and k > self.cloud_size:
            raise ConfigError(f"--k must be <= --cloud-size (the k nearest points are chosen from the cloud), "
                              f"got k={k}, cloud size {self.cloud_size}")
        if self.k_min is not None and self.k_min < k:
            raise ConfigError(f"--k-min must be >= --k ({k}), got {self.k_min}")
        if self.t_stop is not None and self.t_stop > self.steps:
            raise ConfigError(f"--t-stop must be <= --steps ({self.steps}), got {self.t_stop}")
        if self.t_stop is not None:
            self._check_window(self.t_stop)
        if self.sampler == "ddpm" and self.ddim_eta != 0.0:
            raise ConfigError("--ddim-eta applies to --sampler ddim only")
        if self.ddim_eta > 1.0:  # above 1 the DDIM step's sigma passes sqrt(1 - alpha_bar_prev): NaN latents
            raise ConfigError(f"--ddim-eta must lie in [0, 1] (0: DDIM, 1: DDPM's variance), got {self.ddim_eta!r}")
        check_out_dir(self.out, "--out")
        if self.cache_dir is not None:
            check_out_dir(os.path.expanduser(self.cache_dir) if isinstance(self.cache_dir, str) else self.cache_dir,
                          "--cache-dir")   # (its ~ is the home folder: latents.cache_root)
        if self.modes_dir is not None and (not isinstance(self.modes_dir, (str, os.PathLike)) or not str(self.modes_dir)):
            raise ConfigError(f"--modes-dir must be a folder path, got {self.modes_dir!r}")
        if self.modes_dir is not None and not os.path.isdir(self.modes_dir):
            raise ConfigError(f"--modes-dir {self.modes_dir}: " + ("not a folder" if os.path.exists(self.modes_dir)
                              else "no such folder") + " (write it with `manifoldgd-fast modes`: OUT/modes/)")
        if not isinstance(self.extra, dict):
            raise ConfigError("extra must be a mapping")
        if self.classes is not None and (not isinstance(self.classes, str) or not self.classes.strip()):
            # ("": every class would run, as if --classes were not given; None is that default)
            raise ConfigError(f"--classes must be a subset name ({', '.join(SUBSETS)}), a class file or 'a,b,c', "
                              f"got {self.classes!r}")
        if self.data is not None and (not isinstance(self.data, (str, os.PathLike)) or not str(self.data)):
            raise ConfigError(f"--data must be a folder path, got {self.data!r}")
        for name in ("save_latents", "contact_sheet"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        term = self.lambda_n if self.formulation == "paper" else self.manifold_scale  # None: a default, > 0
        if self.loop == "fast" and self.method == "manifoldgd" and self.guidance_noise == "generator" and term != 0:
            raise ConfigError("--loop fast needs --guidance-noise philox for ManifoldGD (generator-drawn cloud "
                              "noise shares the step-noise generators)")
        if self.compile != "none" and self.loop == "reference":
            raise ConfigError("--compile applies to the fast loop: use --loop fast or auto")
        return self

    def draws_guidance_noise(self) -> bool:
        """Whether a manifold term draws cloud / patch noise: ManifoldGD with --manifold-scale > 0 (official), or
        --lambda-m and --lambda-n > 0 (paper). Mode guidance, DiT and CGS draw none."""
        if self.method != "manifoldgd":
            return False
        return (self.lambda_m > 0 and self.lambda_n > 0) if self.formulation == "paper" else self.manifold_scale > 0

    def _check_window(self, t_stop: int, default: bool = False) -> None:
        """ManifoldGD / MGD3 (and CGS with --cgs-steps guided) whose guidance window holds no step: a run that
        would be plain sampling under the method's name is refused. ``default``: t_stop is the default."""
        windowed = self.method in ("manifoldgd", "mgd3") or (
            (self.cgs or self.method == "cgs") and self.cgs_steps == "guided")
        if not windowed or guided_steps(self.formulation, self.steps, t_stop) > 0:
            return
        what = f"--method {self.method}" if self.method in ("manifoldgd", "mgd3") else "--cgs-steps guided"
        rule = ("steps with index i > t_stop, i = steps - 1 ... 0" if self.formulation == "official"
                else "the first t_stop steps")
        given = f"the default --t-stop {t_stop}" if default else f"--t-stop {t_stop}"
        if self.formulation == "paper":
            hint = "; give a --t-stop above 0"
        elif self.steps < 2:
            hint = "; it guides no step of a 1-step run: give --steps 2 or more"
        else:
            hint = (f"; give a --t-stop below {self.steps - 1}, e.g. --t-stop "
                    f"{suggest_t_stop(self.formulation, self.steps)}")
        raise ConfigError(f"{what}: the guidance acts on no step with {given} and --steps {self.steps} "
                          f"({self.formulation} formulation: {rule}){hint}")

    def resolve(self, n_classes: int, device: str = "cpu", backbone: str | None = None,
                schedule_kw: dict | None = None) -> "DistillConfig":
        """A copy with every dataset-dependent (and device- and backbone-dependent) ``None``/``auto``
        default filled in. ``backbone``: the model family found in the model folder ("dit" | "sd"),
        used when ``self.backbone`` is "auto" (None: "dit"). ``schedule_kw``: an SD model's
        :func:`~manifoldgd_fast.schedule.make_schedule` keywords (its spacing places the default t_stop;
        None: SD 1.5's)."""
        c = dataclasses.replace(self.validate())  # a bad value named here, not a KeyError / division by it below
        if c.backbone == "auto":
            c.backbone = backbone or "dit"
        sd = c.backbone == "sd"
        if c.cfg_scale is None:
            from .sd import SD_CFG_SCALE

            c.cfg_scale = SD_CFG_SCALE if sd else 4.0
        if c.cfg_channels == "auto":  # the released DiT sampler's CFG, 3 channels, is the official formulation's
            c.cfg_channels = "all" if sd or c.formulation == "paper" else "3"
        if c.sampler == "auto":
            c.sampler = "ddpm"
        if c.t_stop is None:
            if not sd and c.steps < DIT_T_STOP:
                raise ConfigError(f"--steps {c.steps}: fewer than the DiT default --t-stop {DIT_T_STOP} (a step index, "
                                  f"as the release's); give a --t-stop of your own, e.g. --t-stop "
                                  f"{suggest_t_stop(c.formulation, c.steps)}")
            timesteps = None
            if sd and schedule_kw:
                from .schedule import space_timesteps

                timesteps = space_timesteps(schedule_kw.get("num_train_timesteps", 1000), c.steps, c.sampler,
                                            spacing=schedule_kw["spacing"], steps_offset=schedule_kw["steps_offset"])
            c.t_stop = sd_t_stop(c.steps, c.formulation, timesteps) if sd else DIT_T_STOP
            c._check_window(c.t_stop, default=True)
        if (backbone or self.backbone) == "dit":  # a DiT model's schedule (1,000 training steps): a DDIM count
            # with no integer stride, refused before encoding (not for StepGuidance's loops: backbone None)
            from .schedule import space_timesteps

            space_timesteps(1000, c.steps, c.sampler)
        if c.guidance_noise == "auto":
            # philox where the fused kernels run, and for the fast loop's ManifoldGD (its noise is pre-drawn)
            fast_mgd = c.loop == "fast" and c.method == "manifoldgd"
            c.guidance_noise = "philox" if str(device).startswith("cuda") or fast_mgd else "generator"
        c = dataclasses.replace(c, **c.dataset_defaults(n_classes))
        official = c.formulation == "official"
        if c.mode_method == "auto":
            c.mode_method = {"manifoldgd": "divisive", "mgd3": "kmeans", "dit": "kmeans", "cgs": "kmeans"}[c.method]
        if c.cgs is None:
            c.cgs = c.method == "cgs"
        if c.mode_point == "auto":
            c.mode_point = "medoid" if (c.mode_method == "divisive" and official) else "mean"
        if c.k is None:
            c.k = 12 if official else 10
        if c.ridge is None:
            c.ridge = 1e-5 if official else 1e-4
        if c.k_min is None:
            c.k_min = 2 * c.k
        # several classes in one batch (CGS: each class its own set; the paper formulation: each row's
        # patch from its own class)
        if c.class_batch is None:
            c.class_batch = c.default_class_batch(n_classes)
        return c.validate()

    def default_class_batch(self, n_classes: int) -> int:
        """Classes sampled in one batch when --class-batch is not given: as many as --batch-size holds at this
        IPC, at least one, no more than the run has."""
        return max(1, min(self.batch_size // self.ipc, n_classes))

    def dataset_defaults(self, n_classes: int) -> dict[str, Any]:
        """The defaults that depend on the data set's size, for the parameters still unset: ImageNette /
        ImageWoof-sized runs (<= 10 classes) and ImageNet-100/1k-sized ones differ (SPEC §2, §4b)."""
        small = n_classes <= SMALL_SUBSET_MAX_CLASSES
        official = self.formulation == "official"
        resolved = {"level": (6 if small else 1) if official else (3 if small else 2),
                    "manifold_radius": 0.05 if small else 0.1, "bandwidth": 0.2 if small else 0.1}
        return {name: v for name, v in resolved.items() if getattr(self, name) is None}

    # ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        odd = [k for k in d if not isinstance(k, str)]
        if odd:  # (a TypeError from sorted / join)
            raise ConfigError(f"{source}: parameter names are strings, got {odd[0]!r}")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown parameter(s) {', '.join(unknown)}")
        d = dict(d)
        for name in FLOAT_FIELDS:  # YAML 1.1 reads `dpp_eps: 1e-3` (no dot) as a string; the flag takes it
            v = d.get(name)
            if isinstance(v, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*", v):
                d[name] = float(v)
        if type(d.get("cfg_channels")) is int:          # YAML's `cfg_channels: 3`, the flag's "3"
            d["cfg_channels"] = str(d["cfg_channels"])
        try:
            return cls(**d)
        except TypeError as e:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str) -> "DistillConfig":
        """Read a YAML or JSON file of parameters (keys as in this dataclass)."""
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: " + ("a folder, not a YAML or JSON file" if os.path.isdir(path)
                              else "not a regular file (a YAML or JSON file)" if os.path.exists(path)
                              else "no such file"))
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start}); a YAML or JSON file") from None
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot be read ({e.strerror or e})") from None
        try:
            if path.endswith(".json"):
                d = json.loads(text, object_pairs_hook=_unique_keys)
            else:
                import yaml
                d = yaml.load(text, Loader=_unique_key_loader())
        except Exception as e:
            mark = getattr(e, "problem_mark", None)  # YAML's; JSON's message names the line itself
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {path}: cannot be parsed: {what}{where}") from None
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(f"--config {path}: must hold a mapping of parameter: value")
        # (str: YAML's `1: x` or `yes: x` key is no parameter, named as one, not an AttributeError)
        return cls.from_dict({str(k).replace("-", "_"): v for k, v in d.items()}, source=path)

    def save(self, path: str) -> None:
        from .output import atomic_write_text
        if path.endswith(".json"):
            atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        else:
            import yaml
            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=True))


# the number fields (``float`` or ``float | None``): a value the flag reads as a float
FLOAT_FIELDS = tuple(f.name for f in fields(DistillConfig) if str(f.type).split(" |")[0] == "float")


LABEL_MAPS = ("auto", "imagenet1k", "sorted")
MAX_OUTPUT_SIZE = 4096  # px a side: far above any model's resolution, below a resize that cannot fit in memory


def check_label_map(value: Any) -> None:
    """``--label-map``: a keyword of LABEL_MAPS or an existing class-map file (read by classes.read_label_map)."""
    if value not in LABEL_MAPS and not (isinstance(value, str) and os.path.isfile(value)):
        raise ConfigError(f"--label-map {value!r}: no such file; choose one of {', '.join(LABEL_MAPS)} "
                          "or give a class-map file")


def check_out_dir(path: Any, flag: str) -> None:
    """An output folder must be a path that is a folder or does not exist yet (ConfigError otherwise)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{flag} must be a folder path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: exists and is not a folder")


def nearest_existing(path: str) -> str:
    """``path`` itself or, when it does not exist yet, its nearest existing ancestor (nothing is created)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_out_file(path: Any, flag: str, inputs: dict | None = None) -> None:
    """An output file (e.g. ``--out-json``): not a folder, and its nearest existing ancestor a
    writable folder, so that a run fails before its work, not after (ConfigError otherwise).

    It never takes the place of what a run reads or made: a file inside one of ``inputs`` ({flag: folder or
    file}, e.g. the real images; values that are no path or name nothing on disk, such as in-memory modules
    or keywords, are passed over), an existing image, or a distilled run's manifest is refused."""
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{flag} must be a file path, got {path!r}")
    if os.path.isdir(path) or str(path).endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise ConfigError(f"{flag} {path}: a folder; give a file name")   # (a trailing / names a folder too)
    real = os.path.realpath(path)
    for what, where in (inputs or {}).items():
        if not isinstance(where, (str, os.PathLike)) or not os.path.exists(where):
            continue
        inside = os.path.realpath(where)
        if real == inside or (os.path.isdir(inside) and os.path.commonpath([real, inside]) == inside):
            raise ConfigError(f"{flag} {path}: inside {what} {where}, which is read, never written; give a file "
                              "elsewhere")
    if os.path.isfile(path):
        from .data import IMAGE_EXTS
        from .output import MANIFEST

        name = os.path.basename(real)
        if name.lower().endswith(IMAGE_EXTS):
            raise ConfigError(f"{flag} {path}: an existing image; a report is not written over it, give a .json "
                              "file name")
        if name == MANIFEST:
            raise ConfigError(f"{flag} {path}: a distilled run's {name}; a report is not written over it, give "
                              "another file name")
    up = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(up):
        raise ConfigError(f"{flag} {path}: {up} is a file, not a folder")
    if not os.access(up, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: folder {up} is not writable")


PROMPT_FIELDS = ("prompt_template", "negative_prompt", "class_names")  # Stable Diffusion's text conditioning


def unused_prompt_options(cfg: "DistillConfig") -> list[str]:
    """The prompt options ``cfg`` sets away from their defaults, as flags (``--negative-prompt``): a DiT,
    conditioned on class labels, reads none of them."""
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    return [f"--{k.replace('_', '-')}" for k in PROMPT_FIELDS if getattr(cfg, k) != defaults[k]]


def check_prompt_template(template: str) -> None:
    """Raise ConfigError unless ``template`` is a str.format template whose only field is {name}."""
    if not isinstance(template, str) or "{name}" not in template:
        raise ConfigError(f"--prompt-template {template!r} must contain {{name}} (e.g. 'a photo of a {{name}}')")
    try:
        template.format(name="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--prompt-template {template!r}: only the field {{name}} is allowed ({e!r})") from None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def derive_seed(run_seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and keys (class name, sample index, purpose).

    Randomness flows run seed -> class -> sample, never through rank or batch,
    so sharding, batching and resuming give the same bytes.
    """
    import hashlib

    h = hashlib.sha256(repr((int(run_seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


MODE_FIELDS = ("ipc", "seed", "formulation", "mode_method", "mode_point", "level", "max_depth", "min_leaf",
               "linkage", "kmeans_iters", "bisect_inits", "kmeans_tol")


def _kmeans_medoid_rule(d: dict) -> dict:
    """k-means medoids are the class latent closest to each centre; they were the closest member of
    the centre's cluster (another row now and then). Hashed only where that rule runs, so older runs
    with it are refused on resume and every other fingerprint stays as it was."""
    return {"kmeans_medoid": "class"} if (d.get("mode_method"), d.get("mode_point")) == ("kmeans", "medoid") else {}


def modes_fingerprint(cfg: "DistillConfig", latent_cache: str, name: str) -> str:
    """Hash of what class ``name``'s modes depend on: the resolved mode parameters, the class, and its
    latents as the cache holds them (the record of its cache file: image files and their stamps, the VAE's
    weights, how they were encoded), so that modes of changed images or another VAE under the same paths
    are not taken, and the same latents under another cache folder are."""
    import hashlib

    from .latents import cache_record_digest

    d = {k: getattr(cfg, k) for k in MODE_FIELDS}
    if cfg.mode_method == "gmm":  # only GMM's modes depend on it
        d["gmm_iters"] = cfg.gmm_iters
    d.update(_kmeans_medoid_rule(d))
    d["class"] = name
    d["latents"] = cache_record_digest(latent_cache, name)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


TIME_EMBEDDINGS = ("auto", "original", "diffusers")  # the DiT's timestep features: models.set_time_embedding

# {field: the values it takes}: DistillConfig.validate refuses others (tests check the docs' values against it)
CHOICES = {
    "method": METHODS, "formulation": FORMULATIONS, "sampler": SAMPLERS, "mode_method": MODE_METHODS,
    "mode_point": MODE_POINTS, "linkage": LINKAGES, "kernel": KERNELS, "radius_schedule": RADIUS_SCHEDULES,
    "radius_units": RADIUS_UNITS, "warm_schedule": WARM_SCHEDULES, "cfg_channels": CFG_CHANNELS, "dtype": DTYPES,
    "neighbourhood_dtype": DTYPES, "backend": BACKENDS, "backbone": BACKBONES,
    "guidance_noise": ("auto", "generator", "philox"), "loop": LOOPS, "compile": COMPILE_MODES,
    "attention": ATTENTION_BACKENDS, "dit_impl": ("diffusers", "fused"), "time_embedding": TIME_EMBEDDINGS,
}


# Fields the run fingerprint leaves out: where things go, and what changes only the float rounding
# (the fast loop gives the reference loop's latents); a resume may change them.
UNHASHED_FIELDS = ("out", "cache_dir", "device", "batch_size", "encode_batch_size", "encode_workers", "contact_sheet",
                   "extra", "backend", "modes_dir", "loop", "class_batch", "shard")


def parse_shard(spec) -> tuple[int, int]:
    """``"K/N"`` (``--shard``) -> (K, N) with 0 <= K < N; ConfigError naming the flag otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec) if isinstance(spec, str) else None
    if m is None or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {spec!r}: expected K/N with 0 <= K < N, e.g. 0/8 "
                          "(in a Slurm job array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    if int(m.group(2)) > MAX_SHARDS:  # (the shard lock's file name holds N: 300 digits is past 255 bytes)
        raise ConfigError(f"--shard {spec!r}: N is at most {MAX_SHARDS}")
    return int(m.group(1)), int(m.group(2))


MAX_SHARDS = 1_000_000


def fingerprint(cfg: "DistillConfig", entries=None) -> str:
    """Hash of the parameters that change the output bytes (not out/device/batch sizes):
    of :func:`fingerprint_fields`."""
    return fields_digest(fingerprint_fields(cfg, entries))


def fields_digest(fields: dict) -> str:
    """The fingerprint of :func:`fingerprint_fields`' result."""
    import hashlib

    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


DIT_T_STOP = 25  # SPEC 4 / 4b and the release: a step index, whatever --steps


def suggest_t_stop(formulation: str, steps: int) -> int:
    """A t_stop guiding about half of ``steps`` (DiT's 25 of 50) and at least one where any can be: the official
    window is i > t_stop, so at most steps - 2; the paper's the first t_stop steps, so at least 1."""
    return max(0, min(steps // 2, steps - 2)) if formulation == "official" else max(1, steps // 2)


def guided_steps(formulation: str, steps: int, t_stop: int) -> int:
    """How many of ``steps`` the guidance acts on (``guidance.is_guided``'s window): official, the respaced
    indices i > t_stop (i = steps - 1 ... 0, as the release's loop); paper, the first t_stop steps."""
    return max(0, steps - 1 - t_stop) if formulation == "official" else min(t_stop, steps)


def sd_t_stop(steps: int, formulation: str, timesteps=None) -> int:
    """The t_stop of MGD3's text-to-image script's rule, guidance while the timestep > 500, on the model's
    respaced ``timesteps`` (ascending, step i has timestep timesteps[i]; None: SD 1.5's, leading spacing
    with steps_offset 1, step i at i * (1000 // steps) + 1). Official: guided while i > t_stop (24 at 50
    steps on SD 1.5); paper: the first t_stop steps (25 at 50 steps)."""
    if timesteps is None:
        timesteps = [i * (1000 // steps) + 1 for i in range(steps)]
    last_unguided = max((i for i, t in enumerate(timesteps) if t <= 500), default=-1)  # timestep <= 500
    return last_unguided if formulation == "official" else steps - 1 - last_unguided


def fingerprint_fields(cfg: "DistillConfig", entries=None) -> dict:
    """What :func:`fingerprint` hashes (the manifest keeps it, so a refused resume can name what differs).

    ``entries`` (the scanned classes): the data counts by its classes, labels and file names rather than
    by the spelling of ``--data`` (the same folder given otherwise, or mounted elsewhere on another node,
    is the same run; another folder under the same name, or a stray class folder that shifts the
    labels, is not). A local ``--model`` / ``--vae`` counts by its resolved path.
    """
    import hashlib

    d = cfg.to_dict()
    if entries is not None:
        listing = [(e.name, e.label, e.relative_files()) for e in entries]
        d["data"] = "sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    for k in ("model", "vae"):
        if isinstance(d.get(k), str) and os.path.exists(d[k]):
            d[k] = os.path.realpath(d[k])
    for k in UNHASHED_FIELDS:
        d.pop(k, None)
    for k, default in (("compile", "none"), ("attention", "auto"), ("dit_impl", "diffusers"), ("time_embedding", "auto"),
                       ("neighbourhood_dtype", "float32")):
        if d.get(k) == default:  # fingerprints of runs made before the option existed stay valid
            d.pop(k)
    if d.get("backbone") in ("dit", "auto"):  # prompts never reach a DiT; older DiT fingerprints stay valid
        for k in ("backbone", *PROMPT_FIELDS):
            d.pop(k, None)
    if d.get("output_size") is None:
        d.pop("output_size", None)
    if d.get("method") != "manifoldgd" or d.get("formulation") != "paper":  # only the paper's patch rows are held
        d.pop("neighbourhood_dtype", None)                                  # in it: elsewhere it changes nothing
    if d.get("mode_method") != "gmm":  # counts only where GMM finds the modes
        d.pop("gmm_iters", None)
    if d.get("method") != "manifoldgd":  # no cloud or patch noise is drawn, so a resume on another device (auto:
        d["guidance_noise"] = "generator"  # philox on CUDA) is the same run; the CPU's value keeps old fingerprints
    d.update(_kmeans_medoid_rule(d))
    if not d.get("cgs"):  # the CGS window and steps only count where CGS runs; older fingerprints without CGS
        d.pop("cgs_steps", None)  # stay valid (they hashed the eta defaults, which stand in for any value here)
        for f in dataclasses.fields(DistillConfig):
            if f.name in ("eta_dpp", "eta_dm") and f.name in d:
                d[f.name] = f.default
    for k in ("label_map", "class_names"):  # a map file counts by its contents: an edited map is another run
        v = d.get(k)
        if isinstance(v, str) and os.path.isfile(v):
            with open(v, "rb") as f:
                d[k] = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    return json.loads(json.dumps(d, sort_keys=True, default=str))
