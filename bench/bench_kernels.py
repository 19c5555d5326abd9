"""GPU benchmark of the fused guidance kernels against the eager reference and torch.compile of it.

    python bench/bench_kernels.py [--quick] [--csv bench/kernels.csv]

Needs a CUDA GPU (prints why and exits 0 otherwise). Timings are
``triton.testing.do_bench`` medians with p20/p80 (warm-up excluded, device
synchronised). Physics per case:

* paper step (``manifold_correct_fused``): GB/s from counted bytes: every sample's patch rows
  (sum(lengths) x D x itemsize, "logical": the samples of a class share their rows, which L2 can
  serve, so this may pass the DRAM bandwidth) and, as ``dram_floor``, each distinct latent row
  once (min(n, sum(lengths)) rows); both plus the k chosen rows twice more, x, g, eps and the
  output. The fused op is timed as the eager loop calls it, input checks (a few host reads)
  included; inside a CUDA graph they are skipped;
* official step (``manifold_pull_fused``): Gnormal/s (the cloud is generated, not read:
  2 N D normals per sample in the kNN pass, 2 x 2 k D to regenerate the chosen points);
* eigen-step (``sym_eig``): ms per call on B small symmetric matrices, CUDA C++ (nvcc or NVRTC) vs Triton
  vs the PyTorch Jacobi vs ``torch.linalg.eigh`` (cuSOLVER, fp32);
* the issue's sweep (``patch_sweep``: B in {16, 64, 256}, patch rows M in {500, 1300, 10000},
  D in {4096, 16384}, bf16 latents, k = 10, d = 3): ms per guided step of ours, the plain-torch
  Gram path (patch formed, distances, k x k Gram), the SVD of each sample's k x D neighbours,
  and the released code's D x D covariance + ``eigh`` (timed on one sample, times B, D = 4096
  only: at 16,384 one eigh takes seconds); ours as GB/s of the patch rows every sample reads
  (B x M x D, logical: the B samples share the class's M rows, which fit L2 up to a few tens of MB)
  and of the DRAM floor (the M rows once, plus the k chosen rows, x, g, eps and the output), the
  floor as a share of the device's copy bandwidth, measured at the start (bytes read + written by
  a 1 GiB copy).

Results belong in bench/RESULTS.md with the GPU name, versions, date and this command.
"""
from __future__ import annotations

import functools
import sys

import torch

import gpu_bench  # bench/: this script's folder is on sys.path
from gpu_bench import bench_ms, compiled




def paper_cases(quick):
    from manifoldgd_fast import ops

    rows = []
    shapes = [(16, 20_000, 4096, 5000, torch.bfloat16), (64, 20_000, 4096, 5000, torch.bfloat16),
              (256, 100_000, 4096, 2000, torch.bfloat16), (64, 20_000, 4096, 5000, torch.float32)]
    if gpu_bench.SMOKE:
        shapes = [(2, 300, 48, 100, torch.bfloat16), (2, 300, 48, 100, torch.float32)]
    for B, n, D, Lmax, dtype in shapes:
        if quick and B > 64:
            continue
        lat = torch.randn(n, D, device=gpu_bench.DEV).to(dtype)
        order = torch.stack([torch.randperm(n, device=gpu_bench.DEV)[:Lmax] for _ in range(B)])
        lengths = torch.randint(Lmax // 2, Lmax + 1, (B,), device=gpu_bench.DEV)
        x, g, eps = (torch.randn(B, D, device=gpu_bench.DEV) for _ in range(3))
        kw = dict(alpha_bar=0.5, seed=1, step=3, k=10, d=3, lambda_normal=1.0, lambda_mode=0.1, eps=eps)
        fused = lambda: ops.manifold_correct_fused(x, lat, order, lengths, g, backend="triton", **kw)  # noqa: E731
        ref = lambda: ops.manifold_correct_fused_ref(x, lat, order, lengths, g, **kw)                  # noqa: E731
        t_f, t_r = bench_ms(fused, quick), bench_ms(ref, quick)
        comp = compiled(ref)
        t_c = bench_ms(comp, quick) if comp is not None else [float("nan")] * 3
        k = kw["k"]
        total = int(lengths.sum())
        # k chosen rows twice, x, g, eps, out; each sample's order row (the indices of its patch rows)
        rest = 2 * B * k * D * lat.element_size() + 4 * B * D * 4 + total * order.element_size()
        logical, floor = (r * D * lat.element_size() + rest for r in (total, min(n, total)))
        normals = (total + 2 * B * k) * D        # the patch's noise, drawn in-kernel (the k chosen rows again)
        rows.append(gpu_bench.row(op="manifold_correct_fused", B=B, rows=Lmax, D=D, dtype=str(dtype).split(".")[-1],
                         fused_ms=t_f[0], fused_p20=t_f[1], fused_p80=t_f[2], ref_ms=t_r[0], compiled_ms=t_c[0],
                         speedup=t_r[0] / t_f[0], speedup_vs_compiled=t_c[0] / t_f[0],
                         physics=f"{logical / t_f[0] / 1e6:.0f} GB/s logical, {floor / t_f[0] / 1e6:.0f} dram_floor, "
                                 f"{normals / t_f[0] / 1e6:.1f} Gnormal/s"))
    return rows


def official_cases(quick):
    from manifoldgd_fast import ops

    rows = []
    shapes = [(10, 4096, 300, 12), (100, 4096, 300, 12), (256, 4096, 300, 12)]
    for B, D, N, k in [(2, 48, 40, 12)] if gpu_bench.SMOKE else shapes:
        if quick and B > 100:
            continue
        modes, x, mean = (torch.randn(B, D, device=gpu_bench.DEV) for _ in range(3))
        kw = dict(radius=0.1, alpha_bar=0.4, seed=2, step=40, n_points=N, k=k, d=3, scale=0.1, bandwidth=0.1, mean=mean)
        fused = lambda: ops.manifold_pull_fused(x, modes, backend="triton", **kw)  # noqa: E731
        ref = lambda: ops.manifold_pull_fused_ref(x, modes, **kw)                  # noqa: E731
        t_f, t_r = bench_ms(fused, quick), bench_ms(ref, quick)
        comp = compiled(ref)
        t_c = bench_ms(comp, quick) if comp is not None else [float("nan")] * 3
        normals = B * (2 * N * D + 2 * 2 * k * D)
        rows.append(gpu_bench.row(op="manifold_pull_fused", B=B, rows=N, D=D, dtype="float32", fused_ms=t_f[0],
                         fused_p20=t_f[1], fused_p80=t_f[2], ref_ms=t_r[0], compiled_ms=t_c[0],
                         speedup=t_r[0] / t_f[0], speedup_vs_compiled=t_c[0] / t_f[0],
                         physics=f"{normals / t_f[0] / 1e6:.1f} Gnormal/s"))
    return rows


def eig_cases(quick):
    from manifoldgd_fast import ops

    rows = []
    for B, n in [(2, 10), (2, 33)] if gpu_bench.SMOKE else [(256, 10), (256, 12), (256, 33), (256, 64)]:
        X = torch.randn(B, n, n, device=gpu_bench.DEV)
        A = X @ X.transpose(1, 2)
        res = {}
        for name in ("cuda", "triton", "torch"):
            try:
                res[name] = bench_ms(lambda: ops.sym_eig(A, backend=name), quick)[0]  # noqa: B023
            except Exception as e:
                print(f"  sym_eig backend {name}: {type(e).__name__}: {str(e)[:100]}")
                res[name] = float("nan")
        try:  # the CUDA C++ kernel by its NVRTC way (CuPy), whichever way "cuda" above took
            from manifoldgd_fast.kernels import cuda_ext, sym_eig as sym_eig_k

            nv = cuda_ext.load_nvrtc()
            res["nvrtc"] = bench_ms(lambda: nv.sym_eig(A, sym_eig_k.MAX_SWEEPS, sym_eig_k.TOL,  # noqa: B023
                                                       torch.cuda.current_stream().cuda_stream), quick)[0]
        except Exception as e:
            print(f"  sym_eig by NVRTC: {type(e).__name__}: {str(e)[:100]}")
            res["nvrtc"] = float("nan")
        res["linalg"] = bench_ms(lambda: torch.linalg.eigh(A), quick)[0]  # noqa: B023
        best = min(v for k_, v in res.items() if k_ != "linalg" and v == v)
        rows.append(gpu_bench.row(op="sym_eig", B=B, rows=n, D=n, dtype="float32", fused_ms=best,
                         fused_p20=float("nan"),
                         fused_p80=float("nan"), ref_ms=res["linalg"], compiled_ms=float("nan"),
                         speedup=res["linalg"] / best, speedup_vs_compiled=float("nan"),
                         physics=" ".join(f"{k_}={v:.3f}ms" for k_, v in res.items())))
    return rows


def copy_bandwidth_gbs() -> float:
    """The memory ceiling, measured: bytes read + written by a 1 GiB device-to-device copy, per second."""
    if gpu_bench.SMOKE:
        return float("nan")
    a = torch.empty(1 << 28, device=gpu_bench.DEV)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), quick=False)[0]
    return 2 * a.numel() * a.element_size() / ms / 1e6


def _gather_k(x, patch, k):
    """The k patch rows nearest to each x (B, k, D), centred (the kNN of ops.knn_rows_ref): what the SVD and
    the naive path start from."""
    from manifoldgd_fast import ops

    lengths = torch.full((x.shape[0],), patch.shape[1], device=x.device)
    idx, _ = ops.knn_rows_ref(x, patch, k, lengths)
    X = torch.gather(patch, 1, idx.unsqueeze(-1).expand(-1, -1, patch.shape[-1]))
    return X - X.mean(1, keepdim=True)


def sweep_cases(quick, k=10, d=3, patch_limit_gb=None):
    """The grid of the issue: ours, plain-torch Gram, SVD of the k neighbours, naive D x D eigh (one sample x B).

    The torch paths run where their fp32 patch fits ``patch_limit_gb`` (default: a third of the device's free
    memory, 12 GB off CUDA); one that runs out of memory anyway gives NaN, and the sweep goes on."""
    from manifoldgd_fast import ops

    if patch_limit_gb is None:
        patch_limit_gb = torch.cuda.mem_get_info()[0] / 3e9 if gpu_bench.DEV == "cuda" else 12.0
    bw = copy_bandwidth_gbs()
    if gpu_bench.SMOKE:
        grid = [(2, 30, 48)]
    elif quick:
        grid = [(16, 500, 4096), (64, 1300, 4096), (64, 10_000, 4096), (64, 1300, 16_384)]
    else:
        grid = [(B, M, D) for D in (4096, 16_384) for M in (500, 1300, 10_000) for B in (16, 64, 256)]
    rows = []
    for B, M, D in grid:
        dev, dtype = gpu_bench.DEV, torch.bfloat16
        lat = torch.randn(M, D, device=dev).to(dtype)                          # one class of M latents: the patch
        order = torch.stack([torch.randperm(M, device=dev) for _ in range(B)])
        lengths = torch.full((B,), M, device=dev)
        x, g, eps = (torch.randn(B, D, device=dev) for _ in range(3))
        kw = dict(alpha_bar=0.5, seed=1, step=3, k=k, d=d, lambda_normal=1.0, lambda_mode=0.1, eps=eps)
        ours = functools.partial(ops.manifold_correct_fused, x, lat, order, lengths, g, backend="triton", **kw)
        gram = functools.partial(ops.manifold_correct_fused_ref, x, lat, order, lengths, g, **kw)
        t_ours = bench_ms(ours, quick)[0]
        fits = B * M * D * 4 / 1e9 <= patch_limit_gb                          # the torch paths hold the fp32 patch
        t_gram = t_svd = t_naive = float("nan")
        if fits:
            patch = Xc = None
            try:
                t_gram = bench_ms(gram, quick)[0]
                patch = ops.time_aligned_patch_philox(lat, order, lengths, 0.5, seed=1, step=3)
                Xc = _gather_k(x, patch, k)                                   # (B, k, D) fp32
                t_svd = bench_ms(functools.partial(torch.linalg.svd, Xc, full_matrices=False), quick)[0]
                if D <= 4096:                                                 # the released code, per sample
                    X1 = Xc[0]

                    def naive():
                        w, V = torch.linalg.eigh(X1.T @ X1 / k)               # (D, D) covariance
                        return V[:, -d:]

                    t_naive = B * bench_ms(naive, quick)[0]
            except torch.cuda.OutOfMemoryError:                               # what did not fit stays NaN
                print(f"  patch_sweep B={B} M={M} D={D}: a torch path ran out of memory", flush=True)
            del patch, Xc
        it = lat.element_size()
        # k chosen rows twice, x, g, eps, out, and every sample's order row (B x M int64 indices)
        rest = 2 * B * k * D * it + 4 * B * D * 4 + B * M * order.element_size()
        logical, floor = ((r * D * it + rest) / t_ours / 1e6 for r in (B * M, M))  # every sample's rows / each once
        rows.append(gpu_bench.row(op="patch_sweep", B=B, M=M, D=D, dtype="bfloat16", ours_ms=t_ours,
                         torch_gram_ms=t_gram, svd_ms=t_svd, naive_eigh_ms=t_naive, gram_speedup=t_gram / t_ours,
                         patch_GBs_logical=logical, dram_floor_GBs=floor, floor_pct_of_copy_bw=100 * floor / bw))
        del ours, gram, lat, order, x, g, eps
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(f"device copy bandwidth (read + write): {bw:.0f} GB/s")
    return rows


def main(argv=None):
    def cases(quick):
        rows = []
        for family in (paper_cases, official_cases, eig_cases, sweep_cases):   # one failing family keeps the others
            try:
                rows += family(quick)
            except Exception as e:  # an out-of-memory, a compile error on this Triton: said, the next family runs
                print(f"  {family.__name__} stopped: {type(e).__name__}: {str(e)[:200]}", flush=True)
                if gpu_bench.SMOKE:
                    raise
                torch.cuda.empty_cache()
        return rows

    return gpu_bench.main("bench_kernels", cases, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
