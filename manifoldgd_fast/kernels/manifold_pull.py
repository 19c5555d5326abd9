"""Launchers of the official-formulation term (SPEC 4b.3): kNN -> Gram -> eigen-step -> apply.

``rows``: on a materialised (B, N, D) cloud (``ops.manifold_pull(backend="triton")``);
``cloud``: on the synthetic cloud, never stored: radii (B, N), the dot-product kNN
(``cloud``), then the k chosen points regenerated (``ops.manifold_pull_fused``).
No checks and no host synchronisation here (``ops`` does the checks).
"""
from __future__ import annotations

import math

from ..profile import phase
from . import cloud as cloud_k
from . import knn_rows, tangent
from .row_source import Source


def _finish(x, idx, sample_ids, src, k, d, scale, bandwidth, mean, eig, splits):
    # the profiler's phases (no-ops unless `manifoldgd-fast profile` is timing)
    with phase("gram_eig"):
        parts = tangent.gram(x, None, idx, sample_ids, k, src, splits=splits)
        c, alpha = tangent.coef(parts, k, d, pull=True, scale=scale, bandwidth=bandwidth, eig=eig)
    with phase("projection"):
        return tangent.apply(x, None, idx, sample_ids, c, alpha, k, src, ext=mean, norm=True,
                             out_dtype=x.dtype if mean is None else mean.dtype)


def rows(x, cloud, lengths, k, d, scale, bandwidth, eig=None, splits=None):
    """The pull term (B, D) in x's dtype from the rows of ``cloud`` (B, N, D)."""
    src = Source.rows(cloud)
    with phase("knn"):
        idx, _ = knn_rows.knn(x, lengths, lengths, k, src, splits=splits)
    return _finish(x, idx, lengths, src, k, d, scale, bandwidth, None, eig, splits)


def cloud(x, modes, rho_lin, sample_ids, *, radius, alpha_bar, seed, step, n_points, k, d, scale, bandwidth,
          mean=None, eig=None, splits=None):
    """The pull term on the implicit cloud around ``modes`` (B, D); with ``mean``, ``mean + term`` in mean's dtype."""
    sqa, sig = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    with phase("knn"):
        rho = cloud_k.radii(rho_lin, sample_ids, n_points, radius, seed, step)                  # (B, N)
        idx, _, gn = cloud_k.knn(x, modes, rho, sample_ids, k, sqa, sig, seed, step, splits=splits)
    src = Source.cloud(modes, rho, gn, sqa, sig, seed, step)
    return _finish(x, idx, sample_ids, src, k, d, scale, bandwidth, mean, eig, splits)
