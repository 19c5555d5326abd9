"""CUDA-graph capture emulated on the CPU, so the graph loop's plumbing is tested without a GPU.

A CUDA graph freezes, at capture, the step's sequence of kernels, every kernel argument
(the Python scalars of that step) and every buffer it reads or writes; a replay reruns
exactly that on whatever the static buffers hold by then. ``make_fx`` in "real" mode
records the same thing: the aten (and custom) ops with their scalar arguments baked in,
and every tensor not made inside the step as a constant held by identity, so a replay
reads the static buffers' current contents. Like capture, it refuses a host read of a
tensor (``.item()``, ``bool(t)``, ``int(t)``).

What it cannot see, and the scan below adds: ops whose output shape depends on the data
(``nonzero`` and kin sync the host under CUDA capture; an FX replay would just recompute
them), random draws inside the step (the fast loop pre-draws all step noise), linear algebra
that checks its result on the host (``cholesky``, ``solve``, ``inv``, ``eigh``: the ``_ex`` forms
do not) and host tensors copied in (``torch.tensor(list)`` inside the step).
What stays for a GPU: allocator and stream behaviour, and the CUDA kernels themselves.
"""
from __future__ import annotations

import functools

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from manifoldgd_fast import fastloop, noise

_aten = torch.ops.aten
DATA_DEPENDENT = {_aten.nonzero, _aten.masked_select, _aten._unique2, _aten.unique_dim, _aten.unique_consecutive,
                  _aten.repeat_interleave, _aten._local_scalar_dense, _aten.bincount}
RANDOM = {_aten.randn, _aten.rand, _aten.randint, _aten.normal, _aten.normal_, _aten.uniform_, _aten.bernoulli,
          _aten.bernoulli_, _aten.multinomial, _aten.randperm, _aten.exponential_, _aten.randn_like, _aten.rand_like,
          _aten.randint_like}
# the host reads an info flag (torch.linalg.cholesky / solve / inv check their result; eigh on CUDA), or copies a
# host tensor in (torch.tensor(list) inside the step: a pageable host-to-device copy under capture)
HOST_SYNC = {_aten._linalg_check_errors, _aten._linalg_eigh, _aten.lift_fresh_copy}
STAND_INS = frozenset({_aten._linalg_eigh, _aten.lift_fresh_copy})  # the reference manifold ops' (see _capture)


def _masked(node: torch.fx.Node) -> bool:
    """x[mask] / x[mask] = v: a boolean index has a data-dependent number of elements."""
    if node.op != "call_function" or getattr(node.target, "overloadpacket", None) not in (_aten.index, _aten.index_put,
                                                                                          _aten.index_put_):
        return False
    idx = node.args[1] if len(node.args) > 1 else []
    return any(isinstance(i, torch.fx.Node) and getattr(i.meta.get("val"), "dtype", None) == torch.bool for i in idx)


class TracedStep:
    """One step's traced graph; ``replay()`` runs it on the static buffers, as ``CUDAGraph.replay``."""

    def __init__(self, gm: torch.fx.GraphModule, allow: frozenset = frozenset()):
        self.gm = gm
        self.ops = {n.target.overloadpacket for n in gm.graph.nodes
                    if n.op == "call_function" and hasattr(n.target, "overloadpacket")}
        bad = {str(op) for op in self.ops & (DATA_DEPENDENT | RANDOM | HOST_SYNC) - allow}
        bad |= {f"{n.target} with a boolean mask" for n in gm.graph.nodes if _masked(n)}
        assert not bad, f"the step cannot be captured as it stands: {sorted(bad)}"

    def replay(self) -> None:
        self.gm()


def _capture(self: fastloop.FastSampler, gs) -> None:
    """FastSampler._capture with make_fx in place of torch.cuda.graph (and no warm-up or stream)."""
    x_save = gs.x.clone()
    capturing = noise._capturing
    noise._capturing = lambda device: True   # the host-side checks step aside under capture, as on CUDA
    # ManifoldGD's manifold term runs the reference ops on the CPU (eigh, host-built noise counters); on CUDA the
    # fused kernels stand in for them (fastloop._graph_blocker refuses a capture without), so they are let through
    # here, and only here: the rest of the step is held to the capture rules
    allow = STAND_INS if gs.guidance is not None and gs.guidance.manifold_term else frozenset()
    try:
        for i in reversed(range(self.run.schedule.steps)):
            gs.graphs[i] = TracedStep(make_fx(functools.partial(self._step_into, gs, i), tracing_mode="real")(), allow)
    finally:
        noise._capturing = capturing
    gs.x.copy_(x_save)


def emulate_cuda_graphs(monkeypatch) -> None:
    """Make ``FastSampler(..., cuda_graph=True)`` capture and replay on the CPU."""
    blocker = fastloop._graph_blocker

    def cpu_ok(run, device, guidance):
        why = blocker(run, device, guidance)
        return None if why == "not on CUDA" else why

    monkeypatch.setattr(fastloop, "_graph_blocker", cpu_ok)
    monkeypatch.setattr(fastloop.FastSampler, "_capture", _capture)
