"""Non-causal attention for DiT's odd head size (72): one pass, output written in (B, N, H * Dh) layout.

``out[b, n, h * Dh + j] = sum_m softmax_m(scale * q[b, h, n] . k[b, h, m]) v[b, h, m, j]``: what
``F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * Dh)`` computes in the
DiT block. A FlashAttention-2 style forward (online softmax over key blocks, fp32 statistics and
accumulators, no N x N matrix in memory) with two DiT-specific choices:

* **Head dim split into two power-of-two slabs.** ``tl.dot`` needs power-of-two tiles of at least 16,
  so Dh = 72 padded to 128 would waste 44 % of every dot. Here Dh = D0 + D1 with D0 the largest
  power of two <= Dh and D1 the remainder padded to a power of two >= 16 (72 = 64 + 16, 8 of them
  masked: 10 % waste; 40 = 32 + 16; 80 = 64 + 16; 96 = 64 + 32; 160 = 128 + 32). ``q k^T`` is the
  sum of the slabs' two dots, ``p v`` fills two accumulators.
* **Strided q / k / v, token-major output.** q, k, v are read through their (b, h, n) strides, so the
  views of the fused QKV matmul's (B, N, 3, H, Dh) output go in without a copy, and the output is
  stored (B, N, H, Dh)-contiguous: the ``transpose(1, 2).reshape`` copy after SDPA disappears.

Numerics: as FlashAttention, scores and softmax statistics in fp32, the probabilities rounded to the
input dtype before the ``p v`` dot (bf16 / fp16 tensor-core inputs), fp32 accumulation, one rounding
at the store. fp32 inputs use ``input_precision="ieee"`` (no TF32) for the reference-level check.
Keys may be fewer or more than queries (cross attention: k, v (B, H, Nk, Dh)).

No checks here (``manifoldgd_fast.dit_ops.attention`` does them): last-dim unit stride, Dh <= MAX_HEAD_DIM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .adaln import _rne_bf16

MAX_HEAD_DIM = 256           # two slabs of at most 128 + 128 fp32 accumulator columns per query row
_LOG2E = 1.4426950408889634


def head_split(dh: int) -> tuple[int, int]:
    """(D0, D1): the power-of-two slabs (>= 16 each, D1 = 0 when one slab covers Dh) with D0 + D1 >= Dh."""
    if dh <= 16:
        return 16, 0
    d0 = 1 << (dh.bit_length() - 1)            # largest power of two <= dh
    if d0 == dh:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(dh - d0))
    return (2 * d0, 0) if d1 >= d0 else (d0, d1)


@triton.jit
def _load_slab(base, rows, sn, cols, n_rows, HEAD_DIM: tl.constexpr, TRANS: tl.constexpr,
               COL_MASK: tl.constexpr):
    """Tile [rows, cols] of a (n_rows, HEAD_DIM) matrix with row stride sn; TRANS: the (cols, rows) tile.
    COL_MASK: some of ``cols`` lie past HEAD_DIM. Without it the mask is constant along the columns,
    so the loads stay vectorised (16 B per thread)."""
    if TRANS:
        mask = (rows < n_rows)[None, :]
        if COL_MASK:
            mask = mask & (cols < HEAD_DIM)[:, None]
        ptrs = base + rows[None, :].to(tl.int64) * sn + cols[:, None]
    else:
        mask = (rows < n_rows)[:, None]
        if COL_MASK:
            mask = mask & (cols < HEAD_DIM)[None, :]
        ptrs = base + rows[:, None].to(tl.int64) * sn + cols[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """a @ b with fp32 accumulation. EMULATE_BF16 (interpreter only, whose tl.dot misreads bf16 bits):
    the bf16 operands widened to fp32 first, exact, so the products and sums are the GPU's up to order."""
    if EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, H, NQ, NK, n_mblocks,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, son,
                          qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                          EMULATE_BF16: tl.constexpr):
    """One program: BLOCK_M query rows of one (b, h). qk_scale = scale * log2(e) (softmax in base 2)."""
    pid = tl.program_id(0)
    bh = pid // n_mblocks
    m0 = (pid - bh * n_mblocks) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    rows = m0 + tl.arange(0, BLOCK_M)
    c0 = tl.arange(0, D0)
    q0 = _load_slab(q_base, rows, sqn, c0, NQ, HEAD_DIM, False, D0 > HEAD_DIM)    # (BLOCK_M, D0)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        q1 = _load_slab(q_base, rows, sqn, c1, NQ, HEAD_DIM, False, True)         # (BLOCK_M, D1)
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kt0 = _load_slab(k_base, keys, skn, c0, NK, HEAD_DIM, True, D0 > HEAD_DIM)    # (D0, BLOCK_N)
        s = _dot(q0, kt0, IEEE, EMULATE_BF16)
        if D1 > 0:
            kt1 = _load_slab(k_base, keys, skn, c1, NK, HEAD_DIM, True, True)
            s += _dot(q1, kt1, IEEE, EMULATE_BF16)
        s = tl.where((keys < NK)[None, :], s * qk_scale, float("-inf"))             # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        v0 = _load_slab(v_base, keys, svn, c0, NK, HEAD_DIM, False, D0 > HEAD_DIM)    # (BLOCK_N, D0)
        if EMULATE_BF16:                                                            # FlashAttention's rounding of p
            p = _rne_bf16(p)                                                        # (the interpreter truncates)
        else:
            p = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None] + _dot(p, v0, IEEE, EMULATE_BF16)
        if D1 > 0:
            v1 = _load_slab(v_base, keys, svn, c1, NK, HEAD_DIM, False, True)
            acc1 = acc1 * alpha[:, None] + _dot(p, v1, IEEE, EMULATE_BF16)
    inv_l = 1.0 / l_i
    o_base = o_ptr + b * sob + h * HEAD_DIM
    omask = (rows < NQ)[:, None]
    optr = o_base + rows[:, None].to(tl.int64) * son
    if D0 > HEAD_DIM:
        omask0 = omask & (c0 < HEAD_DIM)[None, :]
    else:
        omask0 = omask
    tl.store(optr + c0[None, :], (acc0 * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=omask0)
    if D1 > 0:
        tl.store(optr + c1[None, :], (acc1 * inv_l[:, None]).to(o_ptr.dtype.element_ty),
                 mask=omask & (c1 < HEAD_DIM)[None, :])


def default_config(nq: int, nk: int, dh: int, elem_bytes: int = 2) -> dict:
    """Tile sizes and launch options: 128 x 64 tiles, 4 warps, 2 stages (FlashAttention-2's forward on
    Hopper/Ampere at head dims <= 128), shrunk to the problem for short sequences (tests, the digits DiT).
    fp32 (``elem_bytes`` 4) takes half the tiles (and one stage above head dim 128): at bf16's it asked
    115 KB of shared memory at head dim 72, over the 99 KB of an A6000 / L4 (sm_86, sm_89)."""
    wide = elem_bytes > 2
    bm = min((64 if wide else 128) if dh <= 128 else (32 if wide else 64), max(16, triton.next_power_of_2(nq)))
    bn = min(32 if wide else 64, max(16, triton.next_power_of_2(nk)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if bm * (sum(head_split(dh))) <= 128 * 128 else 8,
                num_stages=1 if wide and dh > 128 else 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: dict | None = None
              ) -> torch.Tensor:
    """(B, NQ, H * Dh) in q's dtype, contiguous; q (B, H, NQ, Dh), k / v (B, H, NK, Dh), one dtype
    (checked by dit_ops). ``config``: BLOCK_M, BLOCK_N, num_warps, num_stages (benchmark sweeps);
    None = :func:`default_config`."""
    B, H, NQ, DH = q.shape
    NK = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 or DH == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((B, NQ, H * DH), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if NK == 0:                     # no keys: SDPA (the reference) returns zeros
        return out.zero_()
    cfg = dict(default_config(NQ, NK, DH, q.element_size()), **(config or {}))
    d0, d1 = head_split(DH)
    n_mblocks = triton.cdiv(NQ, cfg["BLOCK_M"])
    _attention_fwd_kernel[(B * H * n_mblocks,)](
        q, k, v, out, H, NQ, NK, n_mblocks,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        float(scale) * _LOG2E, HEAD_DIM=DH, D0=d0, D1=d1, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        IEEE=q.dtype == torch.float32, EMULATE_BF16=INTERPRET and q.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=True)   # explicit: Triton 3.10 changes the default (FMA in the rescale)
    return out
