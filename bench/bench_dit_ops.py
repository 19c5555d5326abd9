"""GPU benchmark of the DiT block ops (LayerNorm + modulate, gate + residual) against the eager reference
and torch.compile of it, at DiT-XL/2 shapes.

    python bench/bench_dit_ops.py [--quick] [--csv bench/dit_ops.csv]

Needs a CUDA GPU (prints why and exits 0 otherwise). Shapes: x (B, 256, 1152) bf16 (B rows of CFG
batch x 256 tokens of DiT-XL/2 at 256 px), B in {16, 64, 256}; the modulation vectors are the strided
(B, C) views of one (B, 6, C) tensor, as ``emb.chunk(6, dim=1)`` gives them. Timings are
``triton.testing.do_bench`` medians with p20/p80 (warm-up excluded, device synchronised).

Physics: both ops are memory-bound, so GB/s from counted bytes, each tensor once:

* ``layernorm_modulate``: read x, write out (2 B N C itemsize) + shift, scale (2 B C itemsize);
* ``gate_residual``: read x and y, write out (3 B N C itemsize) + gate (B C itemsize).

The same byte count divides every column, so the GB/s of the eager reference and of torch.compile
are "effective" (the eager reference moves more bytes than that: an fp32 LayerNorm output, the
intermediate products). Results belong in bench/RESULTS.md with the GPU name, versions, date and
this command.
"""
from __future__ import annotations

import sys

import torch

import gpu_bench  # bench/: this script's folder is on sys.path
from gpu_bench import bench_ms, compiled

N_TOKENS, C = 256, 1152




def cases(quick):
    from manifoldgd_fast import dit_ops

    rows = []
    for B in (16, 64) if quick else (16, 64, 256):
        dtype = torch.bfloat16
        x = torch.randn(B, N_TOKENS, C, device="cuda").to(dtype)
        y = torch.randn(B, N_TOKENS, C, device="cuda").to(dtype)
        mods = (0.5 * torch.randn(B, 6, C, device="cuda")).to(dtype)
        shift, scale, gate = mods[:, 0], mods[:, 1], mods[:, 2]
        it = x.element_size()
        for op, fused, ref, args, nbytes in [
            ("layernorm_modulate", lambda a, s, c: dit_ops.layernorm_modulate(a, s, c, backend="triton"),
             dit_ops.layernorm_modulate_ref, (x, shift, scale), (2 * B * N_TOKENS * C + 2 * B * C) * it),
            ("gate_residual", lambda a, g, b: dit_ops.gate_residual(a, g, b, backend="triton"),
             dit_ops.gate_residual_ref, (x, gate, y), (3 * B * N_TOKENS * C + B * C) * it),
        ]:
            t_f = bench_ms(lambda: fused(*args), quick)        # noqa: B023
            t_r = bench_ms(lambda: ref(*args), quick)          # noqa: B023
            comp = compiled(ref, *args)
            t_c = bench_ms(lambda: comp(*args), quick) if comp is not None else [float("nan")] * 3  # noqa: B023
            gbs = lambda ms: nbytes / ms / 1e6               # noqa: E731,B023
            rows.append(dict(op=op, B=B, N=N_TOKENS, C=C, dtype="bfloat16", fused_ms=t_f[0], fused_p20=t_f[1],
                             fused_p80=t_f[2], ref_ms=t_r[0], compiled_ms=t_c[0], fused_GBs=gbs(t_f[0]),
                             ref_GBs=gbs(t_r[0]), compiled_GBs=gbs(t_c[0]), speedup=t_r[0] / t_f[0],
                             speedup_vs_compiled=t_c[0] / t_f[0]))
    return rows


def main(argv=None):
    return gpu_bench.main("bench_dit_ops", cases, __doc__.splitlines()[0], argv,
                          quick_help="B in {16, 64} only, fewer repetitions")


if __name__ == "__main__":
    sys.exit(main())
