"""The fast sampling loop: the reference step, driven with static buffers and CUDA graphs.

It runs :func:`sampler.denoise_step` (the very step the reference loop runs,
so there is one definition of the maths) with what makes it fast on a GPU:

* the step noise of every step drawn before the loop, from the same
  per-sample generators in the same order as the reference loop, into one
  (S, B, C, h, w) device buffer: the latents equal the reference loop's;
* the schedule on the device (tables indexed by the Python step index, which
  makes a view, not a copy) and every guidance scalar from the host copy of
  the tables: no ``.item()``, no ``nonzero()``, no host sync inside a step;
* optionally ``torch.compile`` of the DiT (``compile=True``; numerics change
  in the last bits, so the run fingerprint records it);
* on CUDA, each step captured once into a CUDA graph and replayed for every
  batch of every class with the same shape: static input buffers (latents,
  labels, noise, modes, noise ids), one memory pool shared by all graphs (only
  step-local tensors live in it), warm-up of each step on a side stream before
  its capture (Triton JIT, autotuning, cuBLAS handles, compilation).

A graph per step rather than one graph for all guided steps: the step's
constants (radius warm-up, alpha-bar, the Philox step counter) are kernel
arguments, so each step's launch sequence is its own; replaying 50 graphs costs
the same one launch per step. The Philox key of the guidance noise must be the
same for every class (the pipeline uses a run-level key and per-sample ids
``label * ipc + j``), else each class recaptures.

The paper formulation's class buffers (latents, neighbourhood order, sorted
distances) have the class's size n: the static copies are padded to a bucket of
``PAD_ROWS`` rows (order 0 and distance +inf beyond n, never inside a patch), and
each row's class radii and n live in device tensors, so one capture serves every
class of a bucket (ImageNet's 732 to 1,300 images per class: four buckets). With
several classes a batch, the stacked latents are bucketed by quarter octaves
(:func:`_padded_rows`), so a run captures a few graph sets, not one per sum of
class sizes.

Where capture cannot work (CPU, generator-drawn cloud noise) the same step runs
eagerly; the fallback chain is graph -> eager, logged once.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch

from . import dispatch
from .cgs import CGS
from .errors import BackendError, ConfigError
from .guidance import Guidance
from .profile import active as profiling_active
from .profile import phase, step_done, suspended
from .sampler import Sampling, _randn_like_per_sample, denoise_step, draws_noise


def predraw_noise(run: Sampling, shape: tuple[int, ...], generators, device) -> torch.Tensor | None:
    """(S, B, *shape) step noise, drawn per sample in the reference loop's order; None if no step draws."""
    s = run.schedule
    steps = [i for i in reversed(range(s.steps)) if draws_noise(s, i, run.ddim_eta)]
    if not steps:
        return None
    out = torch.zeros((s.steps, len(generators)) + tuple(shape), device=device)
    probe = torch.empty((len(generators),) + tuple(shape), device=device)
    for i in steps:  # step-major like the loop: each generator sees the same sequence of calls
        out[i] = _randn_like_per_sample(probe, generators)
    return out


def _graph_blocker(run: Sampling, device: torch.device, guidance: Guidance | None) -> str | None:
    """Why this run cannot be captured into CUDA graphs, or None (generator-drawn cloud noise is
    refused before: the fast loop cannot take it at all)."""
    if device.type != "cuda":
        return "not on CUDA"
    if guidance is None or not guidance.manifold_term:
        return None  # no manifold term: nothing of the kind runs
    # ManifoldGD's manifold term goes into a graph only through the fused kernels: the reference ops
    # sync with the host (the paper patch is sized from its lengths on the host; the official cloud's
    # torch.linalg.eigh checks its result; the noise counters are built on the host)
    c = guidance.cfg
    paper = c.formulation == "paper"
    if c.backend == "reference":
        return "the reference guidance ops sync with the host (--backend auto or triton)"
    kern, why = dispatch._kernels()
    if kern is None:
        return f"ManifoldGD needs the fused kernels inside a graph, and {why}"
    D = guidance.modes[0].numel()
    rows = _padded_width(guidance.order.shape[1]) if paper else c.cloud_size
    for what, val, lim in (("B", guidance.modes.shape[0], dispatch.MAX_B), ("the row count", rows, dispatch.MAX_ROWS),
                           ("D", D, dispatch.MAX_D), ("k", c.k, dispatch.MAX_K)):
        if val > lim:
            return f"{what} = {val} is above the fused kernels' limit {lim}, and the reference ops sync"
    return None


PAD_ROWS = 256   # the paper formulation's class buffers are padded to a multiple of this many rows ...


def _padded_rows(n: int) -> int:
    """The bucket of a class buffer of n rows: a multiple of PAD_ROWS up to 8 x PAD_ROWS (one ImageNet
    class: 732 to 1,300 rows, four buckets), then a quarter of n's octave (several classes stacked:
    12 ImageNet classes hold 8,800 to 15,600 rows, four buckets, not 27). Four buckets an octave at
    most, so the graph sets (each with its own static buffers) stay few; the kernels read only the
    rows a patch selects, so the padding costs memory (under a quarter), not bandwidth."""
    n = max(int(n), 1)
    step = max(PAD_ROWS, 1 << max((n - 1).bit_length() - 3, 0))
    return -(-n // step) * step


def _padded_width(width: int) -> int:
    """The bucket of the neighbourhood order's width (each row's class size), which the fused kernels
    take up to ``dispatch.MAX_ROWS``: :func:`_padded_rows`, but never past the limit where the width
    itself is within it."""
    top = dispatch.MAX_ROWS // PAD_ROWS * PAD_ROWS
    fine = -(-max(int(width), 1) // PAD_ROWS) * PAD_ROWS
    if fine > top:  # past the last whole bucket: the limit itself, for a width within it (the rows are masked)
        return dispatch.MAX_ROWS if width <= dispatch.MAX_ROWS else fine
    return min(_padded_rows(width), top)


def _has_class_buffers(guidance: Guidance | None) -> bool:
    return guidance is not None and guidance.manifold and guidance.latents is not None


def _load_class_buffers(static: Guidance, guidance: Guidance) -> None:
    """Copy the batch's paper-formulation buffers (one class's, or several classes' stacked) into the
    padded static ones (the rest reset); radii and class sizes are per-row device tensors."""
    n, width = guidance.latents.shape[0], guidance.order.shape[1]
    static.latents[:n].copy_(guidance.latents)
    static.latents[n:].zero_()
    static.order[:, :width].copy_(guidance.order)
    static.order[:, width:].zero_()
    static.sorted_dists[:, :width].copy_(guidance.sorted_dists)
    static.sorted_dists[:, width:].fill_(float("inf"))
    for dst, src in zip(static.radii, guidance.radii):
        if isinstance(src, torch.Tensor):
            dst.copy_(src)
        else:
            dst.fill_(float(src))
    if guidance.n_latents is not None:
        static.n_latents.copy_(guidance.n_latents)
    else:
        static.n_latents.fill_(width)


@dataclass
class _GraphSet:
    """Static buffers and one captured graph per step, for one batch shape."""

    x: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor | None
    norms: torch.Tensor
    guidance: Guidance | None
    cgs: CGS | None
    signature: tuple
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)


class FastSampler:
    """Sampler with the reference loop's results and a static, capturable step.

    Args:
        run: the fixed sampling setup (model, schedule, CFG, formulation, autocast dtype).
        cuda_graph: capture the steps into CUDA graphs (None: on CUDA when the run allows it).
        compile: ``torch.compile`` the model: False / "none", True / "default", or a mode name.
            Our own graphs replace inductor's: "reduce-overhead" maps to the default mode and
            "max-autotune" to "max-autotune-no-cudagraphs".
    """

    def __init__(self, run: Sampling, *, cuda_graph: bool | None = None, compile: bool | str = False):
        if compile and compile != "none":
            # inductor's own CUDA graphs would nest inside ours: its graph-free variants
            modes = {True: None, "default": None, "reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs",
                     "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}
            if compile not in modes:
                raise ConfigError(f"compile must be none, default, reduce-overhead, max-autotune or "
                                  f"max-autotune-no-cudagraphs, got {compile!r}")
            mode = modes[compile]
            run = copy.copy(run)
            run.model = torch.compile(run.model, mode=mode, dynamic=False)
        self.run = run
        self.cuda_graph = cuda_graph
        self._sets: dict[tuple, _GraphSet] = {}
        self._pool = None
        self._capture_stream = None

    # ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, y: torch.Tensor, generators, *, guidance: Guidance | None = None,
               cgs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise x_T (B, C, h, w) for classes y (B,).

        generators: one torch.Generator per sample (x_T already drawn from them, as the
        reference loop expects). Returns (x_0 (B, C, h, w) float32, norms (B, S)): norms[:, j]
        is |x| of each sample after the j-th step (the trajectory-variance trace).
        """
        if guidance is not None and guidance.manifold_term and not guidance.philox:
            # the reference loop interleaves cloud / patch draws with the step noise on the same
            # generators; pre-drawn step noise would shift them
            raise ConfigError("the fast loop needs --guidance-noise philox for ManifoldGD "
                              "(generator-drawn cloud noise shares the step-noise generators)")
        if cgs is not None:
            cgs.check_labels(y)
        B = x_T.shape[0]
        if y.shape != (B,):
            raise ConfigError(f"y must hold one class per sample: ({B},), got {tuple(y.shape)}")
        if len(generators) != B:
            raise ConfigError(f"generators: one per sample ({B}), got {len(generators)}")
        if x_T.device.type == "cuda":  # streams, capture and replay on x's device, not on the current one
            with torch.cuda.device(x_T.device):
                return self._sample(x_T, y, generators, guidance, cgs)
        return self._sample(x_T, y, generators, guidance, cgs)

    def _sample(self, x_T, y, generators, guidance, cgs):
        run, dev = self.run, x_T.device
        noise = predraw_noise(run, tuple(x_T.shape[1:]), generators, dev)
        blocker = _graph_blocker(run, dev, guidance)
        # auto: graphs unless a profiler is timing the phases (a replayed step cannot be split into them)
        use_graph = self.cuda_graph if self.cuda_graph is not None else (blocker is None and not profiling_active())
        if use_graph and blocker is not None:
            raise ConfigError(f"--loop fast with CUDA graphs: {blocker}")
        if use_graph:
            try:
                return self._sample_graphed(x_T, y, noise, guidance, cgs)
            except ConfigError:
                raise
            except Exception as e:
                # _graph_blocker sends what cannot be captured to the eager loop before any capture. A capture
                # that fails anyway may leave torch's caching allocator in capture mode (capture_end throws
                # before it ends the pool), where memory is never recycled again: stop here rather than go on
                # eagerly in this process. The run resumes.
                raise BackendError(f"CUDA graph capture failed ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]}); rerun with --loop reference (no graphs; "
                                   "finished classes are kept) and please report it") from e
        return self._sample_eager(x_T, y, noise, guidance, cgs)

    # ------------------------------------------------------------------
    def _sample_eager(self, x_T, y, noise, guidance, cgs):
        run = self.run
        S = run.schedule.steps
        x = x_T.float()
        norms = torch.empty((x.shape[0], S), device=x.device)
        for i in reversed(range(S)):
            x = denoise_step(run, i, x, y, (lambda z, i=i: noise[i]), guidance=guidance, cgs=cgs)
            norms[:, S - 1 - i] = x.flatten(1).norm(dim=1)
            step_done()
        return x, norms

    def _static_guidance(self, guidance: Guidance | None) -> Guidance | None:
        if guidance is None:
            return None
        g = copy.copy(guidance)
        g.modes = guidance.modes.clone()
        g.sample_ids = guidance.sample_ids.clone()
        g.generators = None
        if _has_class_buffers(guidance):
            (n, D), (B, width), dev = guidance.latents.shape, guidance.order.shape, guidance.latents.device
            g.latents = guidance.latents.new_zeros(_padded_rows(n), D)
            g.order = guidance.order.new_zeros(B, _padded_width(width))
            g.sorted_dists = guidance.sorted_dists.new_full((B, _padded_width(width)), float("inf"))
            g.radii = tuple(torch.zeros(B, dtype=torch.float64, device=dev) for _ in guidance.radii)
            g.n_latents = torch.zeros(B, dtype=torch.long, device=dev)
            _load_class_buffers(g, guidance)
        return g

    @staticmethod
    def _signature(x_T, y, noise, guidance: Guidance | None, cgs: CGS | None) -> tuple:
        """Everything a captured graph bakes in besides the static buffers' contents."""
        g = c = None
        if guidance is not None:
            g = (json.dumps(guidance.cfg.to_dict(), sort_keys=True, default=str), guidance.noise_seed,
                 guidance.manifold, tuple(guidance.modes.shape))
            if _has_class_buffers(guidance):     # the padded class buffers' shape and dtype
                n, D = guidance.latents.shape
                g += (_padded_rows(n), _padded_width(guidance.order.shape[1]), D, guidance.latents.dtype,
                      guidance.sorted_dists.dtype)
        if cgs is not None:
            c = (cgs.eta_dpp, cgs.eta_dm, cgs.eps, tuple(cgs.mu.shape), cgs.steps)
        return (tuple(x_T.shape), x_T.device, y.dtype, noise is None, g, c)

    def _step_into(self, gs: _GraphSet, i: int) -> None:
        run = self.run
        S = run.schedule.steps
        x = denoise_step(run, i, gs.x, gs.y, (lambda z: gs.noise[i]), guidance=gs.guidance, cgs=gs.cgs)
        gs.norms[:, S - 1 - i] = x.flatten(1).norm(dim=1)
        gs.x.copy_(x)

    def _sample_graphed(self, x_T, y, noise, guidance, cgs):
        sig = self._signature(x_T, y, noise, guidance, cgs)
        gs = self._sets.get(sig)
        if gs is None:
            static_cgs = None
            if cgs is not None:
                static_cgs = copy.copy(cgs)
                static_cgs.mu = cgs.mu.to(x_T.device).clone()
            gs = _GraphSet(x=x_T.float().clone(), y=y.clone(), noise=None if noise is None else noise.clone(),
                           norms=torch.zeros((x_T.shape[0], self.run.schedule.steps), device=x_T.device),
                           guidance=self._static_guidance(guidance), cgs=static_cgs, signature=sig)
            self._capture(gs)
            self._sets[sig] = gs
        gs.x.copy_(x_T)
        gs.y.copy_(y)
        if noise is not None:
            gs.noise.copy_(noise)
        if guidance is not None:
            gs.guidance.modes.copy_(guidance.modes)
            gs.guidance.sample_ids.copy_(guidance.sample_ids)
            if _has_class_buffers(guidance):
                _load_class_buffers(gs.guidance, guidance)
        if cgs is not None:
            gs.cgs.mu.copy_(cgs.mu)
        for i in reversed(range(self.run.schedule.steps)):
            with phase("graph_step"):
                gs.graphs[i].replay()
            step_done()
        return gs.x.clone(), gs.norms.clone()

    def _capture(self, gs: _GraphSet) -> None:
        """Warm up each step on a side stream (running it for real), then capture it."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        x_save = gs.x.clone()
        if self._capture_stream is None:  # one for every capture: torch's stream ring is 32 streams a device
            self._capture_stream = torch.cuda.Stream(device=gs.x.device)
        side = self._capture_stream
        with suspended():
            self._capture_steps(gs, side)
        gs.x.copy_(x_save)

    def _capture_steps(self, gs: _GraphSet, side) -> None:
        for i in reversed(range(self.run.schedule.steps)):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step_into(gs, i)     # warm-up: advances gs.x as the step would
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # torch.cuda.graph, written out so that a failed capture cannot leave the capture stream
            # current: its __exit__ ends the capture before it restores the stream, and a failing end
            # skips the restore. thread_local: the background PNG writer may run meanwhile.
            torch.cuda.synchronize()
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    self._step_into(gs, i)     # recorded only, not run
                except BaseException:
                    try:  # end the capture; its own error (an invalidated capture) would hide the step's
                        graph.capture_end()
                    except Exception:
                        pass
                    raise
                graph.capture_end()
            gs.graphs[i] = graph
