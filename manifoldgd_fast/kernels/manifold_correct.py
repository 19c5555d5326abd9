"""Launchers of the paper-formulation term (SPEC 4.4): kNN -> Gram -> eigen-step -> apply.

``rows``: on a materialised (B, M, D) patch (``ops.manifold_correct(backend="triton")``);
``patch``: on the time-aligned patch drawn in registers, never stored
(``ops.manifold_correct_fused``). Called through ``ops`` (checks, backend choice);
nothing here validates or synchronises with the host, so both can be captured
in a CUDA graph.
"""
from __future__ import annotations

import math

from ..profile import phase
from . import knn_rows, tangent
from .row_source import Source


def _run(x, g, lengths, sample_ids, src, k, d, lambda_normal, eps, ext_scale, eig, splits):
    # the profiler's phases (no-ops unless `manifoldgd-fast profile` is timing)
    with phase("knn"):
        idx, _ = knn_rows.knn(x, lengths, sample_ids, k, src, splits=splits)
    with phase("gram_eig"):
        parts = tangent.gram(x, g, idx, sample_ids, k, src, splits=splits)
        c, alpha = tangent.coef(parts, k, d, pull=False, lam=lambda_normal, eig=eig)
    with phase("projection"):
        if eps is None:
            return tangent.apply(x, g, idx, sample_ids, c, alpha, k, src, out_dtype=g.dtype)
        return tangent.apply(x, g, idx, sample_ids, c, alpha, k, src, ext=eps, ext_kind=tangent.EXT_EPS,
                             ext_scale=ext_scale, out_dtype=eps.dtype)


def rows(x, patch, g, lengths, k, d, lambda_normal, eig=None, splits=None):
    """``g - lambda_normal P_N g`` (B, D) in g's dtype, neighbours from the rows of ``patch`` (B, M, D)."""
    return _run(x, g, lengths, lengths, Source.rows(patch), k, d, lambda_normal, None, 0.0, eig, splits)


def patch(x, latents, order, lengths, g, sample_ids, *, alpha_bar, seed, step, k, d, lambda_normal,
          eps=None, lambda_mode=0.0, eig=None, splits=None):
    """As :func:`rows` on ``sqrt(abar) latents[order] + sqrt(1 - abar) xi`` (xi in registers);
    with ``eps``, returns ``eps - lambda_mode sqrt(1 - abar) (.)`` in eps's dtype."""
    sig = math.sqrt(1.0 - alpha_bar)
    src = Source.patch(latents, order, math.sqrt(alpha_bar), sig, seed, step)
    return _run(x, g, lengths, sample_ids, src, k, d, lambda_normal, eps, lambda_mode * sig, eig, splits)
