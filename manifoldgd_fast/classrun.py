"""One class: its modes, guided sampling of its IPC images, their decoding.

``distill_group`` is the unit ``pipeline.distill`` repeats: one class, or
``--class-batch`` classes sampled in one batch (small IPCs fill the GPU). It
takes each class's inputs (latents on the device, modes, the paper
formulation's neighbourhoods; :func:`class_inputs`, or precomputed modes from
``--modes-dir``), runs the sampler (the run's
:class:`~manifoldgd_fast.fastloop.FastSampler`, or the reference loop) and the
VAE decode. :func:`_prefetched_inputs` prepares the next classes on a
background thread (a side CUDA stream) while these sample.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import DistillConfig, derive_seed
from .errors import ConfigError, DataError
from .output import to_uint8_images, to_uint8_tensor
from .profile import phase


def modes_file(folder: str, name: str) -> str:
    return os.path.join(os.path.abspath(folder), f"{name}.safetensors")


def read_modes(path: str) -> tuple[torch.Tensor | None, str | None]:
    """(modes, their fingerprint) stored at ``path`` by ``manifoldgd-fast modes``; (None, None) if no file.
    DataError for a file that is no modes file, or whose modes fail the sha256 recorded when it was written
    (files written before it was recorded: not compared)."""
    from safetensors import SafetensorError, safe_open

    from .latents import latents_sha256

    if not os.path.isfile(path):
        return None, None
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            modes = f.get_tensor("modes").clone()   # (a copy: the file may be replaced while it is held)
    except (SafetensorError, OSError, KeyError) as e:
        raise DataError(f"{path}: not a modes file ({str(e).splitlines()[0][:120]})") from None
    want = meta.get("modes_sha256")
    if want is not None and latents_sha256(modes) != want:   # (a byte changed on disk: finite, and wrong)
        raise DataError(f"{path} is damaged (its modes' sha256 is not the one recorded when it was written)")
    return modes, meta.get("modes_fingerprint")


def load_modes(rcfg: DistillConfig, cache: str, name: str, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """Class ``name``'s modes from ``--modes-dir`` as (ipc, *sample_shape), checked: made with this run's
    mode parameters from this class's cached latents (:func:`config.modes_fingerprint`), IPC of them, finite.
    DataError / ConfigError in one line naming the file otherwise."""
    from .config import modes_fingerprint

    path = modes_file(rcfg.modes_dir, name)
    try:
        modes, fp = read_modes(path)
    except DataError as e:
        raise DataError(f"{e}; recompute it with `manifoldgd-fast modes`") from None
    if modes is None:
        raise DataError(f"--modes-dir {rcfg.modes_dir}: no modes for class {name} ({path})")
    if fp != modes_fingerprint(rcfg, cache, name):
        raise ConfigError(f"{path} holds modes made with other mode parameters or latents than this run's "
                          f"(--method, --formulation, --ipc, --seed, --mode-*, ...; or the class's images or the VAE "
                          f"changed since, or an older version made them); recompute them with `manifoldgd-fast modes` and the same flags, or "
                          f"drop --modes-dir")
    want = (rcfg.ipc, *sample_shape)
    if modes.numel() != math.prod(want):
        raise DataError(f"{path} holds {tuple(modes.shape)} modes, not {want} (--ipc {rcfg.ipc}); recompute them")
    if not bool(torch.isfinite(modes).all()):
        raise DataError(f"{path} holds NaN or inf modes; recompute them with `manifoldgd-fast modes`")
    return modes.view(want)


def class_modes(rcfg: DistillConfig, name: str, z: torch.Tensor) -> torch.Tensor:
    """IPC modes (ipc, C, h, w) of one class from its latents z (n, C, h, w)."""
    from .modes import discover_modes

    m = discover_modes(z.flatten(1), rcfg.ipc, method=rcfg.mode_method, formulation=rcfg.formulation,
                       seed=derive_seed(rcfg.seed, "modes", name), level=rcfg.level, mode_point=rcfg.mode_point,
                       max_depth=rcfg.max_depth, min_leaf=rcfg.min_leaf, linkage=rcfg.linkage,
                       kmeans_iters=rcfg.kmeans_iters, bisect_inits=rcfg.bisect_inits, kmeans_tol=rcfg.kmeans_tol,
                       gmm_iters=rcfg.gmm_iters)
    return m.view(rcfg.ipc, *z.shape[1:])


def _check_class(rcfg: DistillConfig, name: str, n: int) -> None:
    if n < rcfg.ipc:
        raise DataError(f"class {name} has {n} readable images, fewer than --ipc {rcfg.ipc}")
    if rcfg.method == "manifoldgd" and rcfg.formulation == "paper" and rcfg.k > n:
        raise ConfigError(f"--k {rcfg.k} is larger than the patch: class {name} has only {n} latents")


@dataclass
class ClassInputs:
    """What sampling a class needs besides the models: its latents on the device, its modes and,
    for the paper formulation, each mode's neighbourhood (``Guidance`` keyword arguments)."""

    z: torch.Tensor
    modes: torch.Tensor | None
    paper_kw: dict
    seconds: float

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.z, self.modes, *self.paper_kw.values()) if isinstance(t, torch.Tensor)]


def class_inputs(rcfg: DistillConfig, ctx: dict, name: str, z: torch.Tensor) -> ClassInputs:
    """Latents z (n, C, h, w) of a class -> its :class:`ClassInputs` (mode discovery happens here)."""
    from .guidance import paper_neighbourhoods

    t0 = time.perf_counter()
    z = z.to(ctx["device"]).float()
    guided = rcfg.method in ("manifoldgd", "mgd3")
    modes = None
    if guided and rcfg.modes_dir is not None:   # precomputed by `manifoldgd-fast modes`
        modes = load_modes(rcfg, ctx["cache"], name, tuple(z.shape[1:])).to(z.device)
    elif guided:
        with phase("modes"):
            modes = class_modes(rcfg, name, z)
    paper_kw = {}
    if rcfg.method == "manifoldgd" and rcfg.formulation == "paper":
        paper_kw = paper_neighbourhoods(rcfg, z, modes)
    return ClassInputs(z, modes, paper_kw, time.perf_counter() - t0)


def run_stream(ctx: dict, key: str):
    """The run's one CUDA stream for ``key`` (prefetch, decode), made on first use. torch hands out a
    fixed ring of 32 streams a device and reuses them in turn: a stream made per class would soon alias
    another one in use (the copy stream, or the stream a graph is being captured on)."""
    if key not in ctx:
        ctx[key] = torch.cuda.Stream(ctx["device"])
    return ctx[key]


def _prefetched_inputs(rcfg: DistillConfig, ctx: dict, name: str) -> tuple[ClassInputs, Any]:
    """class_inputs on a thread of its own: on CUDA on a side stream, returning the event that marks
    its end (the sampling stream waits on it), so mode discovery of class c+1 overlaps sampling of c."""
    from .latents import load_class_latents

    z, _files = load_class_latents(ctx["cache"], name)
    if ctx["device"].type != "cuda":
        return class_inputs(rcfg, ctx, name, z), None
    side = run_stream(ctx, "prefetch_stream")
    with torch.cuda.stream(side):
        inp = class_inputs(rcfg, ctx, name, z)
        done = torch.cuda.Event()
        done.record(side)
    return inp, done


def _prefetched_group(rcfg: DistillConfig, ctx: dict, names: list[str]) -> list[tuple[ClassInputs, Any]]:
    """:func:`_prefetched_inputs` of each class of a group, in order."""
    return [_prefetched_inputs(rcfg, ctx, name) for name in names]


def _receive(inp: ClassInputs, done) -> ClassInputs:
    """Make a prefetched class's tensors safe to use on the current stream."""
    if done is not None:
        cur = torch.cuda.current_stream()
        cur.wait_event(done)
        for t in inp.tensors():
            t.record_stream(cur)   # the allocator must not recycle them while this stream still reads them
    return inp


@dataclass
class ClassOutput:
    """A sampled class. On CUDA its tensors may still be computing when it is returned: ``events``
    (start, sampled, decoded) mark the GPU's progress and :meth:`result` waits for them."""

    images: Any                    # uint8 (ipc, H, W, 3): numpy, or a device tensor while in flight
    latents: torch.Tensor          # (ipc, C, h, w)
    variance: torch.Tensor         # (steps,) float64: variance of |x| across the samples after each step
    stats: dict
    events: tuple | None = None
    finite: Any = True             # the decode's pixels were finite: a bool, or a device tensor while in flight

    def result(self, stream=None) -> tuple[Any, torch.Tensor, dict]:
        """(uint8 images (numpy), latents on the CPU, stats with the trajectory variance and timings).

        On CUDA the copies run on ``stream`` (default: a new side stream) once the class is decoded,
        so they do not wait for whatever was queued after it (the next class's sampling).
        """
        images, latents, var, stats = self.images, self.latents, self.variance, dict(self.stats)
        if self.events is not None:
            start, sampled, decoded = self.events
            stream = stream or torch.cuda.Stream(latents.device)
            with torch.cuda.stream(stream):
                stream.wait_event(decoded)
                for t in (images, latents, var, self.finite):
                    t.record_stream(stream)
                images, latents, var = images.cpu().numpy(), latents.cpu(), var.cpu()
                self.finite = bool(self.finite.cpu())
            # GPU time: the host ran ahead of the device
            stats["seconds_sampling"] = round(start.elapsed_time(sampled) / 1e3, 3)
            stats["seconds_total"] = round(stats["seconds_modes"] + start.elapsed_time(decoded) / 1e3, 3)
        stats.update(trajectory_final_variance=round(float(var[-1]), 6),
                     trajectory_variance=[round(float(v), 6) for v in var])
        return images, latents.cpu(), stats


def distill_class(rcfg: DistillConfig, ctx: dict, name: str, label: int, z: torch.Tensor | None = None,
                  progress=None, inputs: ClassInputs | None = None) -> ClassOutput:
    """Sample the IPC images of one class from its latents z (or its prepared ``inputs``).

    On CUDA nothing here waits for the GPU: the returned :class:`ClassOutput` holds device tensors and
    events, and its ``result()`` (the writer thread calls it) copies them back.
    """
    inputs = inputs if inputs is not None else class_inputs(rcfg, ctx, name, z)
    return distill_group(rcfg, ctx, [(name, label, inputs)], progress=progress)[0]


def distill_group(rcfg: DistillConfig, ctx: dict, members: list[tuple[str, int, ClassInputs]],
                  progress=None) -> list[ClassOutput]:
    """Sample the IPC images of each class of ``members`` ((name, label, inputs), at most
    ``rcfg.class_batch`` of them); one :class:`ClassOutput` per class, in order.

    ``--class-batch 1``: the class's samples in batches of ``--batch-size`` (CGS: the class as one
    set). More: the members' samples in one batch, padded to ``class_batch x ipc`` rows
    (copies of the last sample, dropped after) so that every batch of the run has one shape: a
    sample's latents then do not depend on which classes share its batch (a resume that groups
    the classes left otherwise gives the same bytes). CGS then corrects each class's ipc rows
    as a set of its own (the pad rows make whole sets). Each sample keeps its own generator
    (``derive_seed(seed, "sample", class, index)``) and guidance-noise id (``label x ipc + index``).
    """
    from .cgs import CGS
    from .guidance import Guidance, merge_paper_neighbourhoods
    from .sampler import sample
    from .schedule import make_schedule

    dev = ctx["device"]
    info = ctx["dit_info"]
    t0 = time.perf_counter()
    cuda = dev.type == "cuda"
    events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) if cuda else None
    if cuda:
        events[0].record()
    ipc = rcfg.ipc
    for name, label, _ in members:
        if (label + 1) * ipc > 2 ** 32:
            raise ConfigError(f"class {name}: label {label} x --ipc {ipc} exceeds the 2^32 guidance-noise ids")
    if len(members) > rcfg.class_batch:
        raise ConfigError(f"{len(members)} classes in one batch, more than --class-batch {rcfg.class_batch}")
    single = rcfg.class_batch == 1
    inputs0 = members[0][2]
    guided = inputs0.modes is not None
    cgs = None
    if rcfg.cgs:  # each class one set; the pad sets take the last class's mean (their rows are dropped)
        means = [m[2].z.mean(0) for m in members]
        cgs = CGS.for_run(rcfg, means[0]) if single else \
            CGS.for_run(rcfg, torch.stack(means + means[-1:] * (rcfg.class_batch - len(members))),
                        sets=rcfg.class_batch)
    fast = fast_sampler(rcfg, ctx)
    schedule = (fast.run.schedule if fast is not None  # schedule_kw: the SD family's betas / timesteps / variance
                else make_schedule(rcfg.steps, rcfg.sampler, device=dev, **ctx.get("schedule_kw", {})))
    shape = (info["in_channels"], info["latent_size"], info["latent_size"])
    # (member, sample index) per row. One class a batch: CGS denoises it as one set (the DiT forward still
    # in chunks of batch_size), else batches of batch_size. Else one batch of class_batch x ipc rows.
    if single:
        step = ipc if cgs is not None else rcfg.batch_size
        batches = [[(0, j) for j in range(s, min(ipc, s + step))] for s in range(0, ipc, step)]
    else:
        batches = [[(c, j) for c in range(len(members)) for j in range(ipc)]]
    lats, traces = [], []

    def generator(c: int, j: int) -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(derive_seed(rcfg.seed, "sample", members[c][0], j))

    for batch in batches:
        rows = batch if single else batch + [batch[-1]] * (rcfg.class_batch * ipc - len(batch))  # padding
        gens = [generator(c, j) for c, j in rows]  # a pad row has a generator of its own (the same seed)
        x_T = torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
        y = torch.tensor([members[c][1] for c, _ in rows], dtype=torch.long, device=dev)
        guidance = None
        if guided:
            if single:
                idx = [j for _, j in rows]
                modes = inputs0.modes[idx]
                kw = {k: (v[idx] if k in ("order", "sorted_dists") else v) for k, v in inputs0.paper_kw.items()}
            else:  # the paper formulation: each row's patch from its own class's block of one buffer
                modes = torch.stack([members[c][2].modes[j] for c, j in rows])
                kw = merge_paper_neighbourhoods([m[2].paper_kw for m in members], rows) if inputs0.paper_kw else {}
            # one Philox key for the run, ids unique over (class, sample): a captured step serves every class
            guidance = Guidance(rcfg, schedule, modes, gens, noise_seed=derive_seed(rcfg.seed, "guidance"),
                                sample_ids=[members[c][1] * ipc + j for c, j in rows], **kw)
        # |x| of each sample after each step (b, steps): ManifoldGD's trajectory variance
        if fast is not None:
            lat, trace = fast.sample(x_T, y, gens, guidance=guidance, cgs=cgs)
        else:
            norms = []
            lat = sample(ctx["model"], schedule, x_T, y, null_class=info["null_class"], cfg_scale=rcfg.cfg_scale,
                         cfg_channels=rcfg.cfg_channels, formulation=rcfg.formulation, ddim_eta=rcfg.ddim_eta,
                         guidance=guidance, generators=gens, autocast_dtype=ctx["dtype"], cgs=cgs,
                         forward_batch=rcfg.batch_size, attention=rcfg.attention,
                         callback=lambda i, x: norms.append(x.flatten(1).norm(dim=1)))
            trace = torch.stack(norms, 1)
        lats.append(lat)
        traces.append(trace)
        if progress is not None:
            progress.update(len(batch))
    # every row in order: member c's samples are rows c x ipc ... (c + 1) x ipc - 1, the pad rows last
    latents, trace = torch.cat(lats), torch.cat(traces)
    t_sample = time.perf_counter() - t0
    side = contextlib.nullcontext()
    if cuda:  # decode on a stream of its own: it computes beside the next batch's sampling
        events[1].record()
        stream = run_stream(ctx, "decode_stream")
        stream.wait_event(events[1])
        for t in (latents, trace):
            t.record_stream(stream)   # made on the sampling stream, read on the decode stream
        side = torch.cuda.stream(stream)
    with side:
        with phase("vae_decode"):  # the pad rows too: every decode of the run has one shape
            images, finite = decode_latents(ctx["vae"], latents, rcfg.batch_size, ctx["dtype"], host=not cuda)
        parts = []
        for c in range(len(members)):
            rows = slice(c * ipc, (c + 1) * ipc)
            # variance across the class's samples of |x| at each step (population variance, as the paper plots it)
            parts.append((images[rows], latents[rows], trace[rows].double().var(dim=0, correction=0),
                          finite[rows].all()))
        if cuda:
            events = (*events, torch.cuda.Event(enable_timing=True))
            events[2].record()
    outputs = []
    for (name, label, inputs), (imgs, lat, var, ok) in zip(members, parts):
        stats = dict(label=label, n_latents=int(inputs.z.shape[0]), ipc=ipc, seconds_modes=round(inputs.seconds, 3),
                     seconds_sampling=round(t_sample, 3),
                     seconds_total=round(time.perf_counter() - t0 + inputs.seconds, 3))
        if not single:  # the sampling time is the batch's
            stats["sampled_with"] = [m[0] for m in members]
        outputs.append(ClassOutput(imgs, lat, var, stats, events, ok))
    return outputs


# Overlap mode discovery of the next class with sampling on the CPU too (off: both compete for the same
# cores there; tests switch it on to check that the overlap changes no byte).
PREFETCH_ON_CPU = False


def use_fast_loop(rcfg: DistillConfig, device: torch.device) -> bool:
    """--loop fast, or auto on CUDA (where the fast loop gives the reference loop's latents)."""
    if rcfg.loop != "auto":
        return rcfg.loop == "fast"
    return device.type == "cuda" and not (rcfg.method == "manifoldgd" and rcfg.guidance_noise == "generator")


def fast_sampler(rcfg: DistillConfig, ctx: dict):
    """The run's FastSampler (built once: its captured steps serve every class), or None for the reference loop."""
    if not use_fast_loop(rcfg, ctx["device"]):
        return None
    if "fast_sampler" not in ctx:
        from .fastloop import FastSampler
        from .sampler import Sampling
        from .schedule import make_schedule

        run = Sampling(ctx["model"], make_schedule(rcfg.steps, rcfg.sampler, device=ctx["device"],
                                              **ctx.get("schedule_kw", {})),
                       ctx["dit_info"]["null_class"], cfg_scale=rcfg.cfg_scale, cfg_channels=rcfg.cfg_channels,
                       formulation=rcfg.formulation, ddim_eta=rcfg.ddim_eta,
                       forward_batch=rcfg.batch_size, autocast_dtype=ctx["dtype"], attention=rcfg.attention)
        ctx["fast_sampler"] = FastSampler(run, compile=rcfg.compile)
    return ctx["fast_sampler"]


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int, dtype: torch.dtype, host: bool = True):
    """VAE-decode latents (N, C, h, w) in batches -> (uint8 (N, H, W, 3), finite (N,)).

    The images are numpy, or (host=False) a tensor on the VAE's device, so the caller need not
    wait for the decode; ``finite`` is a bool tensor beside them, per image: False where some pixel
    came out NaN or inf (an fp16 decoder that overflowed), which uint8 would turn into black.
    """
    import numpy as np

    sf = vae.config.scaling_factor
    dev = next(vae.parameters()).device
    amp = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    out, finite = [], []
    for s in range(0, latents.shape[0], batch_size):
        with amp:
            img = vae.decode(latents[s:s + batch_size].to(dev) / sf).sample
        finite.append(torch.isfinite(img).flatten(1).all(1))  # on the device: no host sync
        out.append(to_uint8_images(img) if host else to_uint8_tensor(img))
    return (np.concatenate(out) if host else torch.cat(out)), torch.cat(finite)


def check_decoded(finite, name: str, dtype: torch.dtype) -> None:
    """Raise ConfigError naming the class when its decode gave NaN / inf pixels (``finite``: a bool, or
    :func:`decode_latents`'s per-image flags)."""
    if not bool(torch.as_tensor(finite).all()):
        hint = "decode in bfloat16 or float32 (--dtype)" if dtype == torch.float16 else "check the VAE's weights (--vae)"
        raise ConfigError(f"class {name}: the VAE decoded NaN or inf pixels (its latents were finite); nothing "
                          f"written for it; {hint}")
