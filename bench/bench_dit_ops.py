"""GPU benchmark of the DiT block ops (LayerNorm + modulate, gate + residual, attention) against the eager
reference and torch.compile of it, and our attention kernel against every SDPA backend, at DiT-XL/2 shapes.

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
intermediate products).

Attention (the second table): q, k, v are the (B, 16, 256, 72) bf16 views of one fused QKV output
(B, 256, 3, 16, 72), as ``FusedDiT`` passes them; each row is the whole op the block needs, i.e.
SDPA + ``transpose(1, 2).reshape`` for the SDPA backends (cuDNN, flash, efficient, math), one
launch for ours (``dit_ops.attention``, default tiles), and ours at the best of a small sweep of
tile sizes / warps / stages (its config reported, to set the defaults from). TFLOP/s from
4 B H N^2 Dh FLOPs (two matmuls). Results belong in bench/RESULTS.md with the GPU name, versions,
date and this command.
"""
from __future__ import annotations

import sys

import torch

import gpu_bench  # bench/: this script's folder is on sys.path
from gpu_bench import bench_ms, compiled

N_TOKENS_XL, C_XL = 256, 1152




def _batches(quick):
    return (1,) if gpu_bench.SMOKE else (16, 64) if quick else (16, 64, 256)


def cases(quick):
    from manifoldgd_fast import dit_ops

    N_TOKENS, C = (16, 72) if gpu_bench.SMOKE else (N_TOKENS_XL, C_XL)
    rows = []
    for B in _batches(quick):
        dtype = torch.bfloat16
        x = torch.randn(B, N_TOKENS, C, device=gpu_bench.DEV).to(dtype)
        y = torch.randn(B, N_TOKENS, C, device=gpu_bench.DEV).to(dtype)
        mods = (0.5 * torch.randn(B, 6, C, device=gpu_bench.DEV)).to(dtype)
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
            rows.append(gpu_bench.row(op=op, B=B, N=N_TOKENS, C=C, dtype="bfloat16", fused_ms=t_f[0], fused_p20=t_f[1],
                             fused_p80=t_f[2], ref_ms=t_r[0], compiled_ms=t_c[0], fused_GBs=gbs(t_f[0]),
                             ref_GBs=gbs(t_r[0]), compiled_GBs=gbs(t_c[0]), speedup=t_r[0] / t_f[0],
                             speedup_vs_compiled=t_c[0] / t_f[0]))
    return rows


ATTN_H, ATTN_DH = 16, 72
# tile sweep of our attention kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)
ATTN_SWEEP = [(128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 2),
              (64, 32, 4, 3), (128, 128, 8, 2)]


def attention_cases(quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from manifoldgd_fast import dit_ops
    from manifoldgd_fast.kernels import attention as attn_k

    rows = []
    H, Dh, N = (2, ATTN_DH, 40) if gpu_bench.SMOKE else (ATTN_H, ATTN_DH, N_TOKENS_XL)
    for B in _batches(quick):
        qkv = torch.randn(B, N, 3, H, Dh, device=gpu_bench.DEV).bfloat16()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # (B, H, N, Dh) views, as FusedDiT
        flop = 4 * B * H * N * N * Dh
        truth = dit_ops.attention_ref(q.double(), k.double(), v.double())
        times = {}
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
            def run(be=be):
                with sdpa_kernel(be):
                    return dit_ops.attention_ref(q, k, v)
            try:
                run()
                times[name] = bench_ms(run, quick)[0]
            except RuntimeError as e:                                  # a backend that does not take Dh = 72
                print(f"  SDPA {name}: {str(e).splitlines()[0][:100]}")
                times[name] = float("nan")
        ours = lambda: dit_ops.attention(q, k, v, backend="triton")   # noqa: E731
        t_ours = bench_ms(ours, quick)
        err_ours = float((ours().double() - truth).abs().max())
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                err_flash = float((dit_ops.attention_ref(q, k, v).double() - truth).abs().max())
        except RuntimeError:                                           # no flash kernel here (e.g. --smoke)
            err_flash = float("nan")
        best = (float("inf"), None)
        for bm, bn, w, st in ATTN_SWEEP[:3] if quick else ATTN_SWEEP:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            try:
                t = bench_ms(lambda: attn_k.attention(q, k, v, Dh ** -0.5, cfg), quick)[0]   # noqa: B023
            except Exception as e:                                      # e.g. out of shared memory
                print(f"  ours {cfg}: {type(e).__name__}")
                continue
            best = min(best, (t, f"{bm}x{bn} w{w} s{st}"), key=lambda x: x[0])
        tf = lambda ms: flop / ms / 1e9                                 # noqa: E731,B023
        rows.append(gpu_bench.row(op="attention", B=B, H=H, N=N, Dh=Dh, ours_ms=t_ours[0], ours_p20=t_ours[1],
                         ours_p80=t_ours[2], ours_TFLOPs=tf(t_ours[0]), best_ms=best[0], best_cfg=best[1],
                         cudnn_ms=times["cudnn"], flash_ms=times["flash"], efficient_ms=times["efficient"],
                         math_ms=times["math"], best_sdpa_TFLOPs=tf(min(v for v in times.values() if v == v)),
                         err_ours=err_ours, err_flash=err_flash))
    return rows


def all_cases(quick):
    return cases(quick) + attention_cases(quick)


def main(argv=None):
    return gpu_bench.main("bench_dit_ops", all_cases, __doc__.splitlines()[0], argv,
                          quick_help="B in {16, 64} only, fewer repetitions")


if __name__ == "__main__":
    sys.exit(main())
