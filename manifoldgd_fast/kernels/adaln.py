"""DiT block's adaLN-Zero elementwise ops outside the big matmuls, one memory pass each.

``layernorm_modulate``: ``LayerNorm(x) * (1 + scale[b]) + shift[b]`` per row of C (DiT's ``modulate``,
diffusers' ``AdaLayerNormZero`` / ``norm3`` + modulate / ``norm_out`` + modulate), x read once.
``gate_residual``: ``x + gate[b] * y`` (diffusers' ``gate_msa.unsqueeze(1) * attn_output + hidden_states``).

Rows are the B*N tokens of x (B, N, C); token r belongs to sample ``b = r // N`` and reads that
sample's modulation row. Both kernels round where PyTorch rounds in the diffusers block under
CUDA autocast, so they compute the same function as ``manifoldgd_fast.dit_ops.*_ref``:

* ``1 + scale`` is rounded to scale's dtype (diffusers adds 1 to the bf16 adaLN output in bf16);
* LayerNorm statistics and the modulation in fp32 (autocast runs ``layer_norm`` in fp32), one
  rounding to the output dtype at the store;
* ``gate * y`` is rounded to ``promote(gate, y)`` before the residual add (two PyTorch ops);
* launched with ``enable_fp_fusion=False``: PyTorch rounds the mul and the add separately, an FMA
  would not. So ``gate_residual`` is bit-identical to its reference; ``layernorm_modulate`` differs
  only by the order of the row sums (a few fp32 ulps before the output rounding).

No checks and no host synchronisation here (``dit_ops`` does the checks). x, y: any strides over
(B, N) with unit stride over C; the (B, C) modulation rows: any row stride, unit stride over C.
Token indices in int32 (B*N < 2^31, checked), offsets in int64 (B*N*C may pass 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_C = 4096                 # one row in registers: BLOCK_C = next_pow2(C) <= 4096 fp32 per tile row
_TILE = 4096                 # elements per program (ROWS x BLOCK_C): enough bytes in flight per SM
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Not philox_normal.LAUNCH: these reproduce PyTorch's separately rounded mul and add (see above).
LAUNCH = dict(enable_fp_fusion=False)


@triton.jit
def _rne_bf16(v):
    """fp32 v rounded to the nearest bf16 (ties to even; NaN kept), as fp32: PyTorch's (c10's) rounding.

    By the bits rather than ``v.to(tl.bfloat16)``: the GPU's cvt.rn agrees, but Triton's interpreter
    truncates fp32 -> bf16, and the CPU check of these kernels should see the GPU's numbers.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _round_to(v, KIND: tl.constexpr):
    """fp32 v rounded to fp32 / bf16 / fp16 (KIND 0 / 1 / 2), as fp32: the rounding of a PyTorch op's result."""
    if KIND == 1:
        v = _rne_bf16(v)
    elif KIND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _layernorm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, R, N, C, sxb, sxn, s_shift, s_scale,
                               inv_c, eps, SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r] = (x[r] - mean) / sqrt(var + eps) * rnd(1 + scale[b]) + shift[b], biased var, fp32 (r = b N + n)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                         # (ROWS,) int32: R < 2^31
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]                             # (ROWS, BLOCK_C)
    b = rows // N
    n = (rows - b * N).to(tl.int64)
    b = b.to(tl.int64)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + (b * sxb + n * sxn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) * inv_c                                              # (ROWS,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) * inv_c                                         # two-pass: no cancellation
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    sc = tl.load(scale_ptr + b[:, None] * s_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + b[:, None] * s_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (xc * rstd[:, None]) * _round_to(1.0 + sc, SCALE_KIND) + sh
    out = _round_to(out, OUT_KIND)                                                # the cast below is then exact
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_residual_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, R, N, C, sxb, sxn, syb, syn, s_gate,
                          PROD_KIND: tl.constexpr, OUT_KIND: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """out[r] = x[r] + rnd(gate[b] * y[r]) in fp32, stored in out's dtype (r = b N + n)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                         # (ROWS,) int32: R < 2^31
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    b = rows // N
    n = (rows - b * N).to(tl.int64)
    b = b.to(tl.int64)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + (b * sxb + n * sxn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + (b * syb + n * syn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + b[:, None] * s_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = _round_to(x + _round_to(g * y, PROD_KIND), OUT_KIND)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, N, C) in x's dtype, contiguous; x (B, N, C), shift / scale (B, C); C <= MAX_C (checked by dit_ops)."""
    B, N, C = x.shape
    x, shift, scale = _unit_last(x), _unit_last(shift), _unit_last(scale)
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    R = B * N
    if R == 0:
        return out
    BLOCK_C = triton.next_power_of_2(C)
    ROWS = max(1, min(16, _TILE // BLOCK_C))
    _layernorm_modulate_kernel[(triton.cdiv(R, ROWS),)](
        x, shift, scale, out, R, N, C, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        1.0 / C, float(eps), SCALE_KIND=_ROUND[scale.dtype], OUT_KIND=_ROUND[x.dtype],
        ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=_warps(ROWS * BLOCK_C), **LAUNCH)
    return out


def gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, N, C) in x's dtype, contiguous; x, y (B, N, C), gate (B, C) (checked by dit_ops)."""
    B, N, C = x.shape
    x, gate, y = _unit_last(x), _unit_last(gate), _unit_last(y)
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    R = B * N
    if R == 0 or C == 0:
        return out
    # 256-wide column blocks waste little on C = 1152 (4.5 blocks) where next_pow2 would waste 44%
    BLOCK_C = min(triton.next_power_of_2(C), 256)
    ROWS = max(1, min(64, 2048 // BLOCK_C))
    prod = torch.promote_types(gate.dtype, y.dtype)
    _gate_residual_kernel[(triton.cdiv(R, ROWS), triton.cdiv(C, BLOCK_C))](
        x, gate, y, out, R, N, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0),
        PROD_KIND=_ROUND[prod], OUT_KIND=_ROUND[x.dtype], ROWS=ROWS, BLOCK_C=BLOCK_C,
        num_warps=_warps(ROWS * BLOCK_C), **LAUNCH)
    return out
