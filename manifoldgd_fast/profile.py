"""Per-phase timers and NVTX ranges for one distillation.

``phase(name)`` marks a region (DiT forward, kNN, eigensolve, scheduler, VAE
decode, I/O...). It is a no-op unless a :class:`Profiler` is active, so the
library calls it unconditionally. With an active profiler each phase is timed
(CUDA events on the GPU, so timing adds no host synchronisation inside a
step; ``perf_counter`` on the CPU) and, on CUDA, pushed as an NVTX range so
an Nsight Systems timeline shows the same phases.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import time
from collections import defaultdict
from typing import Any

import torch

_ACTIVE: contextvars.ContextVar["Profiler | None"] = contextvars.ContextVar("manifoldgd_profiler", default=None)

# Phases that belong to guidance (the overhead the headline reports).
GUIDANCE_PHASES = ("mode_term", "cloud", "patch", "manifold", "cgs")
# Phases timed inside "manifold" (kNN, Gram + eigensolve, projection; both backends): reported with their
# share of the step, never added to the step a second time
MANIFOLD_PARTS = ("knn", "gram_eig", "projection")
# graph_step: a whole step replayed from a CUDA graph (its phases are not separable)
TOP_STEP_PHASES = ("dit_forward", "scheduler", "graph_step") + GUIDANCE_PHASES
STEP_PHASES = TOP_STEP_PHASES + MANIFOLD_PARTS


def _nvtx_range():
    """The NVTX range context of a phase: the nvtx package's ``annotate`` (the [cuda] extra), else
    ``torch.cuda.nvtx.range``, so that an Nsight timeline shows the phases either way."""
    try:
        import nvtx

        return nvtx.annotate
    except ImportError:
        return torch.cuda.nvtx.range


class Profiler:
    """Collects phase times; ``report()`` gives per-phase totals, per-step means and shares."""

    def __init__(self, device: torch.device | str = "cpu"):
        from .devices import resolve_device

        self.device = resolve_device(device)  # ("auto", DistillConfig's default, was torch's RuntimeError)
        self.cuda = self.device.type == "cuda"
        self._events: list[tuple[str, Any, Any, int]] = []   # (name, start, end, step): events or floats
        self.steps = 0          # denoising steps of every batch (steps x batches)
        self.guided_steps = 0   # those in which a guidance phase ran
        self._guided = False
        self._first_guided = False  # whether the run's first step was guided (it is left out of the report)
        self._nvtx_range = _nvtx_range() if self.cuda else None

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False):
        """``host``: work of the host alone (e.g. PNG encoding and writing on a background thread),
        timed with ``perf_counter`` even on CUDA: events would time that thread's stream instead.
        On CUDA every phase, host ones too, is an NVTX range (ranges are per thread)."""
        if name in GUIDANCE_PHASES:
            self._guided = True
        with self._nvtx_range(name) if self.cuda else contextlib.nullcontext():
            if self.cuda and not host:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    yield
                finally:
                    end.record()
                self._events.append((name, start, end, self.steps))
            else:
                t0 = time.perf_counter()
                try:
                    yield
                finally:
                    self._events.append((name, t0, time.perf_counter(), self.steps))

    def step_done(self) -> None:
        if self.steps == 0:
            self._first_guided = self._guided
        self.steps += 1
        self.guided_steps += self._guided
        self._guided = False

    def _warmup(self) -> bool:
        """Whether the run's first step is left out: it pays one-time costs (lazy imports, first kernel
        launches, Triton compilation, library start-up) that no later step does. Kept when it is the only one."""
        return self.steps > 1

    def totals_ms(self, skip_first: bool = False) -> dict[str, float]:
        """Total ms per phase; ``skip_first``: without the step phases of the run's first step."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, float] = defaultdict(float)
        for name, a, b, step in self._events:
            if skip_first and step == 0 and name in STEP_PHASES:
                continue
            out[name] += (b - a) * 1e3 if isinstance(a, float) else a.elapsed_time(b)
        return dict(out)

    def report(self) -> dict[str, Any]:
        """Per phase: total ms, ms per step and share of the step time (the MANIFOLD_PARTS are shares
        inside "manifold", not added again). ``guidance_overhead``: guidance ms per guided step over the
        plain step's ms (DiT forward + scheduler, per step); ``guidance_share``: guidance over all steps.
        The run's first step is left out of these (``first_step_ms`` reports it: one-time costs such as
        kernel compilation land there) when there are others; ``steps`` / ``guided_steps`` count all."""
        skip = self._warmup()
        tot = self.totals_ms(skip_first=skip)
        first = sum(v for k, v in self.totals_ms().items() if k in TOP_STEP_PHASES) - \
            sum(v for k, v in tot.items() if k in TOP_STEP_PHASES)
        step_total = sum(v for k, v in tot.items() if k in TOP_STEP_PHASES)
        guidance = sum(v for k, v in tot.items() if k in GUIDANCE_PHASES)
        steps = max(self.steps - skip, 1)
        guided_steps = self.guided_steps - (skip and self._first_guided)
        plain_per_step = (step_total - guidance) / steps
        phases = {k: {"total_ms": round(v, 3), "per_step_ms": round(v / steps, 4) if k in STEP_PHASES else None,
                      "share_of_step": round(v / step_total, 4) if step_total and k in STEP_PHASES else None,
                      **({"within": "manifold"} if k in MANIFOLD_PARTS else {})}
                  for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}
        overhead = None
        if guided_steps and plain_per_step > 0 and "graph_step" not in tot:
            overhead = round(guidance / guided_steps / plain_per_step, 4)
        return {"device": str(self.device), "steps": self.steps, "guided_steps": self.guided_steps,
                "first_step_ms": round(first, 3) if skip else None,
                "step_total_ms": round(step_total, 3), "per_step_ms": round(step_total / steps, 4),
                "guidance_overhead": overhead,
                "guidance_share": round(guidance / step_total, 4) if step_total else None,
                "phases": phases}


def phase(name: str, host: bool = False):
    """Time ``name`` when a profiler is active (and mark it for Nsight); otherwise do nothing.
    ``host``: see :meth:`Profiler.phase`."""
    if torch.compiler.is_compiling():  # inside torch.compile: untimed (dynamo cannot trace ContextVar.get)
        return contextlib.nullcontext()
    prof = _ACTIVE.get()
    return prof.phase(name, host=host) if prof is not None else contextlib.nullcontext()


def active() -> bool:
    """Whether a profiler is timing phases now."""
    return _ACTIVE.get() is not None


def step_done() -> None:
    prof = _ACTIVE.get()
    if prof is not None:
        prof.step_done()


@contextlib.contextmanager
def suspended():
    """No phase is timed inside (CUDA graph capture: an event record there would be captured too)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def profiling(device="cpu"):
    """Activate a Profiler for the enclosed code: ``with profiling(dev) as prof: ...; prof.report()``."""
    prof = Profiler(device)
    token = _ACTIVE.set(prof)
    try:
        yield prof
    finally:
        _ACTIVE.reset(token)


def format_table(rep: dict[str, Any]) -> str:
    """The report as text: a header, the guidance overhead, then a markdown table of the phases."""
    if rep["guidance_overhead"] is not None:
        head = (f"guidance overhead: {100 * rep['guidance_overhead']:.1f} % of a plain step (DiT forward + "
                f"scheduler) per guided step; {100 * rep['guidance_share']:.1f} % of all step time")
    else:
        head = "guidance overhead: n/a (no guided step, or whole steps replayed from CUDA graphs)"
        if rep["guided_steps"] and rep.get("first_step_ms") is not None and rep["guidance_share"] == 0:
            head = ("guidance overhead: n/a (the only guided step is the run's first, which is left out: profile "
                    "with more guided steps: --steps, --t-stop)")
    first = (f"; the first step ({rep['first_step_ms']:.1f} ms: one-time costs such as kernel compilation) is "
             "left out of the figures below" if rep.get("first_step_ms") is not None else "")
    lines = [f"device {rep['device']}, {rep['steps']} denoising steps over all batches "
             f"({rep['guided_steps']} guided), {rep['per_step_ms']:.3f} ms per step "
             f"(DiT forward + guidance + scheduler){first}", head,
             "", "| phase | total ms | ms / step | share of step |", "|---|---|---|---|"]
    for k, v in rep["phases"].items():
        share = f"{100 * v['share_of_step']:.1f} %" if v["share_of_step"] is not None else "—"
        per_step = f"{v['per_step_ms']:.3f}" if k in STEP_PHASES else "—"  # decode, I/O, modes: not per step
        name = f"{v['within']}: {k}" if "within" in v else k
        lines.append(f"| {name} | {v['total_ms']:.1f} | {per_step} | {share} |")
    return "\n".join(lines)


def dump(rep: dict[str, Any], path: str) -> None:
    from .output import atomic_write_text

    atomic_write_text(path, json.dumps(rep, indent=2))
