"""Streaming k-nearest rows: one pass over the rows, the k smallest kept in registers.

Each distance becomes a 64-bit key ``(monotone bits of the fp32 distance) << 32 | row``,
so sorting keys sorts by distance and breaks ties by the lower row index,
as the reference's stable sort does. Equal distances are ties for both only where both compute
the same fp32 bits (duplicated rows): the kernel sums D in BLOCK_D tiles, torch in its own order,
so distances equal in exact arithmetic may round apart and pick either row. A program streams a contiguous range of
rows in chunks of K rows (K = k rounded up to a power of two >= 16) and folds
each chunk into its running best-K by rank selection on the union of the two
K-lists; its K keys go to a (B, splits, K) candidate buffer, and
``_knn_merge_kernel`` folds the splits the same way. Only the keys touch memory: (B, splits, K) int64.

Distances are ``sum_d (p_d - x_d)^2`` with p formed in registers (see
``row_source``): the direct difference costs what the expansion
``|p|^2 - 2 p.x + |x|^2`` costs here (one x per sample, no matrix product to
hand to tensor cores) and does not cancel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox_normal import LAUNCH
from .row_source import rows_tile


@triton.jit
def dist_key(d2, rows):
    """uint64 key ordering fp32 distances ascending (negatives from rounding included), ties by lower row.

    Real keys have a high word <= 0xFF800000 (+inf); invalid rows get high word 0xFFFFFFFF.
    """
    d2 = tl.where(d2 == d2, d2, float("inf"))                           # NaN rows last
    ub = d2.to(tl.uint32, bitcast=True)
    mono = tl.where((ub >> 31) == 1, ub ^ tl.full((), 0xFFFFFFFF, tl.uint32), ub | tl.full((), 0x80000000, tl.uint32))
    return (mono.to(tl.uint64) << 32) | rows.to(tl.uint64)


@triton.jit
def key_decode(key):
    """(row int64, distance fp32) of a key from :func:`dist_key`."""
    hi = (key >> 32).to(tl.uint32)
    bits = tl.where((hi >> 31) == 1, hi ^ tl.full((), 0x80000000, tl.uint32), hi ^ tl.full((), 0xFFFFFFFF, tl.uint32))
    return (key & tl.full((), 0xFFFFFFFF, tl.uint64)).to(tl.int64), bits.to(tl.float32, bitcast=True)


@triton.jit
def merge_topk(best, new, K: tl.constexpr):
    """The K smallest keys of best (K,) and new (K,), ascending.

    Rank selection instead of ``tl.topk``: rank_i = #{u_j < u_i} + #{j < i : u_j == u_i}
    is a permutation even with repeated sentinels, and element i goes to slot rank_i.
    O(K^2) compares in registers, noise next to the K x D distance tile; and no
    nested jit calls (the interpreter pays ~2 ms for each).
    """
    u = tl.reshape(tl.join(best, new), (2 * K,))                        # (2K,)
    ii = tl.arange(0, 2 * K)
    before = (u[None, :] < u[:, None]) | ((u[None, :] == u[:, None]) & (ii[None, :] < ii[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)                           # (2K,) a permutation of 0..2K-1
    sel = rank[:, None] == tl.arange(0, K)[None, :]                      # (2K, K), one True per column
    return tl.max(tl.where(sel, u[:, None], 0), axis=0)


@triton.jit
def invalid_key(rows):
    """Keys of rows past a sample's length: above every real key, distinct per row."""
    return tl.full(rows.shape, 0xFFFFFFFF00000000, tl.uint64) | rows.to(tl.uint64)


@triton.jit
def sentinels(K: tl.constexpr):
    """K distinct keys above every real key (high word 0xFFFFFFFF, low words 2^32 - 1 - j)."""
    return tl.full((K,), 0xFFFFFFFFFFFFFFFF, tl.uint64) - tl.arange(0, K).to(tl.uint64)


@triton.jit
def _knn_partial_kernel(x_ptr, len_ptr, sid_ptr, cand_ptr,
                        src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, step16,
                        D, rows_per_split, n_splits,
                        SRC: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    length = tl.load(len_ptr + b)
    sample = tl.load(sid_ptr + b)
    start = s.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, length)
    best = sentinels(K)
    for r0 in range(start, end, K):  # chunks of K rows
        rows = r0 + tl.arange(0, K)
        rmask = rows < end
        acc = tl.zeros((K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            p = rows_tile(SRC, b, rows, rmask, d0, cols, cmask, src_ptr, src_sb, src_sm, ord_ptr, ord_sb,
                          rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, sample, step16, BLOCK_D)
            xv = tl.load(x_ptr + b64 * D + cols, mask=cmask, other=0.0).to(tl.float32)
            diff = tl.where(rmask[:, None] & cmask[None, :], p - xv[None, :], 0.0)
            acc += tl.sum(diff * diff, axis=1)
        key = tl.where(rmask, dist_key(acc, rows), invalid_key(rows))
        best = merge_topk(best, key, K)
    offs = (b64 * n_splits + s) * K + tl.arange(0, K)
    tl.store(cand_ptr + offs, best.to(tl.int64, bitcast=True))


@triton.jit
def _knn_merge_kernel(cand_ptr, idx_ptr, d2_ptr, n_splits, k, K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    best = sentinels(K)
    for s in range(n_splits):
        c = tl.load(cand_ptr + (b * n_splits + s) * K + tl.arange(0, K)).to(tl.uint64, bitcast=True)
        best = merge_topk(best, c, K)
    row, d2 = key_decode(best)
    jj = tl.arange(0, K)
    tl.store(idx_ptr + b * k + jj, row, mask=jj < k)
    tl.store(d2_ptr + b * k + jj, d2, mask=jj < k)


def pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def plan_splits(B: int, M: int, chunk: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(rows_per_split, n_splits): enough programs to fill the GPU, rows_per_split a multiple of chunk."""
    if splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, (4 * sms + B - 1) // B)
        else:  # the interpreter runs programs one after another: fewer, longer programs
            splits = 2
    splits = max(1, min(splits, triton.cdiv(M, chunk)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), chunk) * chunk
    return rows_per_split, triton.cdiv(M, rows_per_split)


def merge(cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold (B, splits, K) candidate keys into (idx (B, k) int64, d2 (B, k) fp32)."""
    B, n_splits, K = cand.shape
    idx = torch.empty(B, k, device=cand.device, dtype=torch.int64)
    d2 = torch.empty(B, k, device=cand.device, dtype=torch.float32)
    _knn_merge_kernel[(B,)](cand, idx, d2, n_splits, k, K=K, **LAUNCH)
    return idx, d2


def block_d_for(K: int, D: int) -> int:
    """Columns per tile: K x BLOCK_D fp32 tiles of ~4-8K elements (a guess; not tuned on a GPU yet)."""
    return min(128 if K <= 16 else 64 if K <= 32 else 32, max(16, triton.next_power_of_2(D)))


def warps_for(K: int, block_d: int = 0) -> int:
    """8 warps for K x BLOCK_D tiles >= 2048 and for the 64 x 64 eigen-step (4 spill or sit at 255
    registers in ptxas -v for sm_80/sm_90), else 4. From register counts, not timings."""
    return 8 if K >= 64 or K * block_d >= 2048 else 4


def knn(x, lengths, sample_ids, k, src, splits=None):
    """k nearest rows of each sample: (idx (B, k) int64 ascending by distance, ties to the lower row; d2 (B, k) fp32).

    ``src`` is a ``row_source.Source`` (materialised rows or the patch); ``lengths`` (B,) valid rows.
    """
    B, D = x.shape
    K = pow2_at_least(k)
    BLOCK_D = block_d_for(K, D)
    rows_per_split, n_splits = plan_splits(B, src.n_rows, K, x.device, splits)
    cand = torch.empty(B, n_splits, K, device=x.device, dtype=torch.int64)
    _knn_partial_kernel[(B, n_splits)](x, lengths, sample_ids, cand, *src.args(), D, rows_per_split, n_splits,
                                       SRC=src.kind, K=K, BLOCK_D=BLOCK_D, num_warps=warps_for(K, BLOCK_D), **LAUNCH)
    return merge(cand, k)
