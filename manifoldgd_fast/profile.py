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
GUIDANCE_PHASES = ("mode_term", "cloud", "patch", "knn", "gram_eig", "projection", "manifold", "cgs")
# graph_step: a whole step replayed from a CUDA graph (its phases are not separable)
STEP_PHASES = ("dit_forward", "scheduler", "graph_step") + GUIDANCE_PHASES


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
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._events: list[tuple[str, Any, Any]] = []   # (name, start, end): events or floats
        self.steps = 0
        self._nvtx_range = _nvtx_range() if self.cuda else None

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False):
        """``host``: work of the host alone (e.g. PNG encoding and writing on a background thread),
        timed with ``perf_counter`` even on CUDA: events would time that thread's stream instead."""
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with self._nvtx_range(name):
                start.record()
                try:
                    yield
                finally:
                    end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._events.append((name, t0, time.perf_counter()))

    def step_done(self) -> None:
        self.steps += 1

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, float] = defaultdict(float)
        for name, a, b in self._events:
            out[name] += (b - a) * 1e3 if isinstance(a, float) else a.elapsed_time(b)
        return dict(out)

    def report(self) -> dict[str, Any]:
        tot = self.totals_ms()
        # nested phases (e.g. knn inside manifold) are reported but not double counted in the step
        step_total = sum(v for k, v in tot.items() if k in ("dit_forward", "scheduler", "mode_term", "manifold",
                                                              "cloud", "patch", "cgs", "graph_step"))
        guidance = sum(v for k, v in tot.items() if k in ("mode_term", "manifold", "cloud", "patch", "cgs"))
        steps = max(self.steps, 1)
        phases = {k: {"total_ms": round(v, 3), "per_step_ms": round(v / steps, 4),
                      "share_of_step": round(v / step_total, 4) if step_total and k in STEP_PHASES else None}
                  for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}
        return {"device": str(self.device), "steps": self.steps, "step_total_ms": round(step_total, 3),
                "per_step_ms": round(step_total / steps, 4),
                "guidance_overhead": round(guidance / (step_total - guidance), 4) if step_total > guidance else None,
                "phases": phases}


def phase(name: str, host: bool = False):
    """Time ``name`` when a profiler is active (and mark it for Nsight); otherwise do nothing.
    ``host``: see :meth:`Profiler.phase`."""
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
    lines = [f"device {rep['device']}, {rep['steps']} steps, {rep['per_step_ms']:.3f} ms per step "
             f"(DiT forward + guidance + scheduler)",
             f"guidance overhead: {100 * rep['guidance_overhead']:.1f} % of the unguided step"
             if rep["guidance_overhead"] is not None else "guidance overhead: n/a",
             "", "| phase | total ms | ms / step | share of step |", "|---|---|---|---|"]
    for k, v in rep["phases"].items():
        share = f"{100 * v['share_of_step']:.1f} %" if v["share_of_step"] is not None else "—"
        lines.append(f"| {k} | {v['total_ms']:.1f} | {v['per_step_ms']:.3f} | {share} |")
    return "\n".join(lines)


def dump(rep: dict[str, Any], path: str) -> None:
    from .output import atomic_write_text

    atomic_write_text(path, json.dumps(rep, indent=2))
