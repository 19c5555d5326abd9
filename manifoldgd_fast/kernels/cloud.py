"""The official formulation's synthetic cloud, never stored: kNN from five dot products per point.

Point j of sample b (SPEC 4b.3, counters in ``philox_normal``):

    p_j = a (m + rho_j g_j / |g_j|) + s xi_j,   a = sqrt(abar), s = sqrt(1 - abar),
    g_j ~ N(0, I) (stream CLOUD_DIR), xi_j ~ N(0, I) (stream CLOUD_XI).

With A = a m - x and beta_j = a rho_j / |g_j|, ``p_j - x = A + beta_j g_j + s xi_j``, so

    |p_j - x|^2 = |A|^2 + beta_j^2 |g_j|^2 + s^2 |xi_j|^2 + 2 beta_j g_j.A + 2 s xi_j.A + 2 beta_j s g_j.xi_j

needs |A|^2, |g|^2, |xi|^2, g.A, xi.A, g.xi: accumulated in one pass over D
while g and xi are drawn in registers. |g_j|^2 goes to a (B, N) side table so
the k chosen points can be regenerated (``row_source.SRC_CLOUD``) by the Gram
and apply kernels of ``tangent``. The radii rho (B, N) come from
``_cloud_radii_kernel``: N//2 evenly spaced values (``torch.linspace``, as the
released sampler), then ``radius * U[0, 1)`` from the stream CLOUD_RADIUS.

The expansion ranks the points (its selection matches the materialised cloud's where the k-th and
(k+1)-th distances are apart) but is not a distance to use: within about 1e-3 |A| of a point it
cancels (percent-level relative error). delta_min is taken as |x - p_0| exactly, by ``tangent``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .knn_rows import (block_d_for, dist_key, invalid_key, merge, merge_topk, plan_splits, pow2_at_least, sentinels,
                       warps_for)
from .philox_normal import LAUNCH, STREAM_CLOUD_DIR, STREAM_CLOUD_RADIUS, STREAM_CLOUD_XI, normal_tile, uniform_vec

_ST_DIR = tl.constexpr(STREAM_CLOUD_DIR)
_ST_RAD = tl.constexpr(STREAM_CLOUD_RADIUS)
_ST_XI = tl.constexpr(STREAM_CLOUD_XI)


@triton.jit
def _cloud_radii_kernel(lin_ptr, sid_ptr, rho_ptr, n_lin, N, radius, seed, step16, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    sample = tl.load(sid_ptr + b)
    u = uniform_vec(seed, j, sample, step16 + _ST_RAD)
    lin = tl.load(lin_ptr + j, mask=j < n_lin, other=0.0)
    tl.store(rho_ptr + b * N + j, tl.where(j < n_lin, lin, u * radius), mask=j < N)


@triton.jit
def _cloud_knn_partial_kernel(x_ptr, mode_ptr, rho_ptr, sid_ptr, gn_ptr, cand_ptr,
                              sqa, sig, seed, step16, N, D, rows_per_split, n_splits,
                              K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    sample = tl.load(sid_ptr + b)
    start = s.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    best = sentinels(K)
    for r0 in range(start, end, K):
        rows = r0 + tl.arange(0, K)
        rmask = rows < end
        gg = tl.zeros((K,), dtype=tl.float32)
        xx = tl.zeros((K,), dtype=tl.float32)
        gA = tl.zeros((K,), dtype=tl.float32)
        xA = tl.zeros((K,), dtype=tl.float32)
        gx = tl.zeros((K,), dtype=tl.float32)
        AA = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            m = tl.load(mode_ptr + b64 * D + cols, mask=cmask, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + b64 * D + cols, mask=cmask, other=0.0).to(tl.float32)
            A = sqa * m - xv                                                           # 0 past D
            g = tl.where(cmask[None, :], normal_tile(seed, rows, sample, step16 + _ST_DIR, d0 // 4, BLOCK_D // 4), 0.0)
            xi = tl.where(cmask[None, :], normal_tile(seed, rows, sample, step16 + _ST_XI, d0 // 4, BLOCK_D // 4), 0.0)
            gg += tl.sum(g * g, axis=1)
            xx += tl.sum(xi * xi, axis=1)
            gA += tl.sum(g * A[None, :], axis=1)
            xA += tl.sum(xi * A[None, :], axis=1)
            gx += tl.sum(g * xi, axis=1)
            AA += A * A
        rho = tl.load(rho_ptr + b64 * N + rows, mask=rmask, other=0.0)
        beta = sqa * rho / tl.sqrt(gg)
        d2 = (tl.sum(AA, axis=0) + beta * beta * gg + sig * sig * xx
              + 2.0 * beta * gA + 2.0 * sig * xA + 2.0 * beta * sig * gx)
        tl.store(gn_ptr + b64 * N + rows, gg, mask=rmask)
        key = tl.where(rmask, dist_key(d2, rows), invalid_key(rows))
        best = merge_topk(best, key, K)
    tl.store(cand_ptr + (b64 * n_splits + s) * K + tl.arange(0, K), best.to(tl.int64, bitcast=True))


def radii(rho_lin, sample_ids, n_points, radius, seed, step):
    """(B, N) fp32 radii: ``rho_lin`` (N//2,) then ``radius * U[0, 1)`` (stream CLOUD_RADIUS, row = point j)."""
    B = sample_ids.shape[0]
    rho = torch.empty(B, n_points, device=sample_ids.device, dtype=torch.float32)
    BLOCK = 128
    _cloud_radii_kernel[(B, triton.cdiv(n_points, BLOCK))](rho_lin, sample_ids, rho, rho_lin.shape[0], n_points,
                                                           float(radius), int(seed), int(step) * 16, BLOCK=BLOCK, **LAUNCH)
    return rho


def knn(x, modes, rho, sample_ids, k, sqa, sig, seed, step, splits=None):
    """k nearest cloud points: (idx (B, k), d2 (B, k), gn (B, N) squared norms of the direction Gaussians)."""
    B, D = x.shape
    N = rho.shape[1]
    K = pow2_at_least(k)
    BLOCK_D = block_d_for(K, D)
    rows_per_split, n_splits = plan_splits(B, N, K, x.device, splits)
    cand = torch.empty(B, n_splits, K, device=x.device, dtype=torch.int64)
    gn = torch.empty(B, N, device=x.device, dtype=torch.float32)
    _cloud_knn_partial_kernel[(B, n_splits)](x, modes, rho, sample_ids, gn, cand, float(sqa), float(sig), int(seed),
                                             int(step) * 16, N, D, rows_per_split, n_splits,
                                             K=K, BLOCK_D=BLOCK_D, num_warps=warps_for(K, BLOCK_D), **LAUNCH)
    idx, d2 = merge(cand, k)
    return idx, d2, gn
