"""Evaluation of a distilled folder: the hard-/soft-label training protocol and distribution metrics.

- :func:`evaluate` (``protocol.py``): train ConvNet-6 / ResNetAP-10 / ResNet-18
  (``nets.py``) on ``OUT/<class>/<i>.png`` with device-side augmentation
  (``augment.py``), test top-1 on a real validation folder; writes
  ``OUT/eval.json``, ``OUT/eval.md`` and an "eval" entry in ``OUT/manifest.json``
  (``report.py``: the tables, files and manifest entries).
- :func:`compute_metrics` (``metrics.py``): FID, L2, MMD, representativeness and
  diversity on encoder features; writes ``OUT/metrics.json``.
  :func:`trajectory_variance` takes the sampler's ‖x̂0‖ traces.
- ``cli_eval.py``: the ``eval`` / ``metrics`` flags for ``cli.py``.

Imports are lazy so ``import manifoldgd_fast.eval`` stays cheap.
"""
from __future__ import annotations

__all__ = ["evaluate", "compute_metrics", "trajectory_variance", "build_net", "NET_NAMES"]


def __getattr__(name):
    if name == "evaluate":
        from .protocol import evaluate

        return evaluate
    if name in ("compute_metrics", "trajectory_variance"):
        from . import metrics

        return getattr(metrics, name)
    if name in ("build_net", "NET_NAMES"):
        from . import nets

        return getattr(nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
