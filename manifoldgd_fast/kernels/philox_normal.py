"""Counter-based noise: Philox4x32-10 keyed by the seed, counted by (column quad, row, sample, step|stream).

Every kernel that needs a Gaussian draws it through :func:`normal_tile`, and the
standalone :func:`philox_normal` materialises the same numbers with the same
helper, so a kernel's in-register noise and its materialisation are bit-identical
on one device. The layout (also in ``manifoldgd_fast.noise``):

    key      (k0, k1) = (seed mod 2^32, seed >> 32),   0 <= seed < 2^63
    counter  c0 = col // 4     column quad
             c1 = row          patch row j / cloud point j
             c2 = sample id    (B,) ids, default the batch position
             c3 = step * 16 + stream
    output   Philox gives 4 uint32 (r0..r3) per counter; u_i = uint_to_uniform_float(r_i)
             (Triton's: r as int32, negative -> ~r, times 4.6566127342e-10);
             Box-Muller (Triton's pair_uniform_to_normal) on (u0, u1) -> columns 4q, 4q+1,
             on (u2, u3) -> columns 4q+2, 4q+3.
    uniform  stream value from r0 of counter (0, row, sample, step*16 + stream).

A value therefore depends only on (seed, step, stream, sample, row, col): not on
D, the block sizes, the batch it was drawn in or the launch order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

STREAM_PATCH = 0        # paper patch xi
STREAM_CLOUD_DIR = 1    # official cloud: Gaussian whose normalisation is the direction u
STREAM_CLOUD_RADIUS = 2 # official cloud: uniform radius of the second half of the points
STREAM_CLOUD_XI = 3     # official cloud: forward-diffusion noise
STREAM_BITS = 4
MAX_STEP = 2 ** (32 - STREAM_BITS)
# Every launch pins FMA contraction on (Triton 3.9's default, which 3.10 flips), so the numbers
# (the noise included) do not change with a Triton upgrade.
LAUNCH = dict(enable_fp_fusion=True)


@triton.jit
def normal_tile(seed, rows, sample, c3, q0, NQ: tl.constexpr):
    """(R, 4*NQ) fp32 normals: rows ``rows`` (R,), columns 4*q0 ... 4*(q0+NQ)-1."""
    zero = tl.zeros((rows.shape[0], NQ), dtype=tl.uint32)
    c0 = zero + (q0 + tl.arange(0, NQ)).to(tl.uint32)[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    # (zero + v).to(...): v may be a scalar tensor or a constexpr (Triton specialises an int
    # argument equal to 1); no tl.to_tensor, which Triton 3.6 (the GPU image's) lacks. Same bits mod 2^32.
    c2 = (zero + sample).to(tl.uint32)
    c3t = (zero + c3).to(tl.uint32)
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, c2, c3t)
    n0, n1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r0),
                                              tl.random.uint_to_uniform_float(r1))
    n2, n3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r2),
                                              tl.random.uint_to_uniform_float(r3))
    # (R, NQ, 2, 2) -> (R, 4 NQ): element [q, a, b] lands on column 4q + 2a + b = n_{2a+b}
    t = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(t, (rows.shape[0], 4 * NQ))


@triton.jit
def uniform_vec(seed, rows, sample, c3):
    """(R,) fp32 uniforms in [0, 1) from r0 of counter (0, row, sample, c3)."""
    zero = tl.zeros(rows.shape, dtype=tl.uint32)
    r0, _, _, _ = tl.random.philox(seed, zero, zero + rows.to(tl.uint32),
                                   (zero + sample).to(tl.uint32), (zero + c3).to(tl.uint32))
    return tl.random.uint_to_uniform_float(r0)


@triton.jit
def _philox_normal_kernel(out_ptr, sid_ptr, seed, c3, n_rows, D,
                          BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    q0 = tl.program_id(2) * BLOCK_Q
    sid = tl.load(sid_ptr + b)
    tile = normal_tile(seed, rows, sid, c3, q0, BLOCK_Q)                        # (BLOCK_R, 4 BLOCK_Q)
    cols = q0 * 4 + tl.arange(0, 4 * BLOCK_Q)
    offs = (b.to(tl.int64) * n_rows + rows[:, None].to(tl.int64)) * D + cols[None, :]
    tl.store(out_ptr + offs, tile, mask=(rows < n_rows)[:, None] & (cols < D)[None, :])


def philox_normal(seed: int, step: int, stream: int, sample_ids: torch.Tensor, n_rows: int, D: int) -> torch.Tensor:
    """Materialise the (B, n_rows, D) fp32 normals of ``stream`` at ``step`` (checked by ops.philox_normal)."""
    B = sample_ids.shape[0]
    out = torch.empty(B, n_rows, D, device=sample_ids.device, dtype=torch.float32)
    BLOCK_R, BLOCK_Q = 16, 32
    grid = (B, triton.cdiv(n_rows, BLOCK_R), triton.cdiv(D, 4 * BLOCK_Q))
    _philox_normal_kernel[grid](out, sample_ids, seed, step * 16 + stream, n_rows, D,
                                BLOCK_R=BLOCK_R, BLOCK_Q=BLOCK_Q, **LAUNCH)
    return out
