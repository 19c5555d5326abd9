"""Sampling throughput: diffusers DiTPipeline vs our reference, fast and graph loops, in one run.

    python bench/bench_sampling.py                       # GPU: DiT-XL/2 + SD-VAE, random weights
    python bench/bench_sampling.py --batches 8 32 128 --steps 50 --json bench/sampling.json --png docs/sampling.png
    python bench/bench_sampling.py --tiny                # CPU smoke run (tiny DiT + VAE)
    python -m pytest bench/bench_sampling.py --benchmark-only   # CPU pytest-benchmark, tiny DiT

Every row is images/s end to end of one batch: x_T -> 50 steps (CFG 4, the DiT on
2B latents) -> VAE decode to uint8 (PNG writing excluded: it runs on a background
thread). Speed does not depend on the weights, so random-init models of the real
architectures are used. Rows:

* ``diffusers-fp32`` / ``diffusers-fp16``: ``DiTPipeline`` (its DDPM scheduler), model cast;
* ``diffusers-fp16-compile``: the same with ``torch.compile(transformer, mode="reduce-overhead")``;
* ``ours-reference``: our reference loop (``sampler.sample``), bf16 autocast;
* ``ours-fast``: the fast loop without graphs; ``ours-graph``: with one CUDA graph per step;
* ``ours-graph-compile``: the graph loop around ``torch.compile`` of the DiT;
* ``...-fused``: the same DiT behind ``fastdit.FusedDiT`` (fused QKV, conditioning and adaLN once
  per step, fused LayerNorm-modulate and gate-residual kernels); ``...-fused-tattn``: and our
  Triton attention (``--attention triton``) instead of SDPA;

each of ours for ``dit`` (unguided), ``mgd3`` and ``manifoldgd`` (official, guidance on the
first 25 of 50 steps, Philox cloud noise, the fused kernels). Also: the DiT forwards' FLOPs
(``torch.utils.flop_counter`` on one forward, x 2 for CFG, x steps) over the end-to-end time (VAE
decode, guidance and setup included, so a floor on the forwards' own TFLOP/s), peak GPU memory
per batch and, from a linear fit of it, the largest batch that fits 48 GB (A6000), 80 GB
(H100) and this card; and the numerics rule of flash-attention: |ours bf16 - fp32 reference| must be
<= 2 x |plain torch bf16 - fp32 reference| (the plain run being the reference loop at bf16).

Timings: wall clock around a synchronised call, median (p20, p80) of ``--reps`` after one
warm-up (the warm-up includes graph capture and compilation, reported separately).
Results belong in bench/RESULTS.md with the GPU, versions, date and this command.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

METHODS = ("dit", "mgd3", "manifoldgd")


def sd_vae_config() -> dict:
    """The SD-VAE (sd-vae-ft-ema) architecture: 256 px images <-> 4x32x32 latents."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], norm_num_groups=32, scaling_factor=0.18215)


def build_models(tiny: bool, device):
    from manifoldgd_fast.models import build_dit, build_vae, dit_xl2_config, tiny_dit_config, tiny_vae_config

    if tiny:
        dit = build_dit(tiny_dit_config(num_classes=1000, sample_size=8), seed=0)  # DiTPipeline: null = 1000
        vae = build_vae(tiny_vae_config(sample_size=32), seed=0)
    else:
        dit = build_dit(dit_xl2_config(), seed=0)
        vae = build_vae(sd_vae_config(), seed=0)
    from manifoldgd_fast.fastdit import tie_conditioning_embedders

    # one conditioning embedder copied into every block, as in the converted checkpoints
    return tie_conditioning_embedders(dit).to(device).eval(), vae.to(device).eval()


def dit_flops_per_image(dit, device) -> float:
    """FLOPs of one image's DiT forward (one latent), counted on a batch of 1."""
    from torch.utils.flop_counter import FlopCounterMode

    c = dit.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        dit(x, timestep=torch.tensor([10], device=device), class_labels=torch.tensor([1], device=device))
    return float(fc.get_total_flops())


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def atomic_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path`` through a temp file and a rename (a kill mid-write keeps the last one)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _time(fn, device, reps):
    t0 = time.perf_counter()
    fn()                       # warm-up: capture, compilation, autotuning
    _sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8), warm


class Ours:
    """Our loops on one batch: modes, guidance, sampler, decode."""

    def __init__(self, dit, vae, *, steps, method, loop, compile_mode, dtype, device, B, model=None):
        from manifoldgd_fast.config import DistillConfig, suggest_t_stop
        from manifoldgd_fast.fastloop import FastSampler
        from manifoldgd_fast.sampler import Sampling
        from manifoldgd_fast.schedule import make_schedule

        dit = model if model is not None else dit   # model: the same DiT behind another forward (FusedDiT)
        self.dit, self.vae, self.device, self.B, self.dtype = dit, vae, torch.device(device), B, dtype
        c = dit.config
        self.shape = (c.in_channels, c.sample_size, c.sample_size)
        self.cfg = DistillConfig(method=method, steps=steps, t_stop=suggest_t_stop("official", steps), ipc=B,
                                 guidance_noise="philox").resolve(1000, str(device))
        self.run = Sampling(dit, make_schedule(steps, "ddpm", device=device), c.num_embeds_ada_norm,
                            cfg_scale=4.0, autocast_dtype=dtype)
        self.loop = loop
        self.fast = None if loop == "reference" else FastSampler(
            self.run, cuda_graph=(loop == "graph"), compile=compile_mode)
        g = torch.Generator(device=device).manual_seed(0)
        self.modes = torch.randn((B,) + self.shape, generator=g, device=device)

    def __call__(self, return_latents=False):
        from manifoldgd_fast.guidance import Guidance
        from manifoldgd_fast.classrun import decode_latents
        from manifoldgd_fast.sampler import sample

        dev, B = self.device, self.B
        gens = [torch.Generator(device=dev).manual_seed(b) for b in range(B)]
        x_T = torch.stack([torch.randn(self.shape, generator=g, device=dev) for g in gens])
        y = torch.arange(B, device=dev) % 1000
        gd = None
        if self.cfg.method != "dit":
            gd = Guidance(self.cfg, self.run.schedule, self.modes, gens, noise_seed=1, sample_ids=list(range(B)))
        if self.fast is None:
            r = self.run
            lat = sample(r.model, r.schedule, x_T, y, null_class=r.null_class, cfg_scale=r.cfg_scale,
                         guidance=gd, generators=gens, autocast_dtype=self.dtype)
        else:
            lat, _ = self.fast.sample(x_T, y, gens, guidance=gd)
        if return_latents:
            return lat
        return decode_latents(self.vae, lat, B, self.dtype or torch.float32)


def diffusers_runner(dit, vae, *, steps, dtype, compile_mode, B, device):
    from diffusers import DDPMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDPMScheduler(num_train_timesteps=1000)).to(device, dtype)
    if compile_mode:
        pipe.transformer = torch.compile(pipe.transformer, mode=compile_mode)
    pipe.set_progress_bar_config(disable=True)
    labels = [b % 1000 for b in range(B)]

    def run():
        with torch.no_grad():
            pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps, output_type="np",
                 generator=torch.Generator(device=device).manual_seed(0))
    return run


def reset_peak(device) -> None:
    """Start a row's peak-memory window (read by :func:`peak_gib` after its timed calls: no extra run)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    """GiB allocated at most since :func:`reset_peak` (the models kept on the device for later rows included:
    the largest-batch estimates from it err on the safe side)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def numerics(dit, vae, steps, device, B, dtype) -> dict:
    """flash-attention's rule: |fast bf16 - fp32| <= 2 |reference bf16 - fp32| on the same noise."""
    ref32 = Ours(dit, vae, steps=steps, method="manifoldgd", loop="reference", compile_mode="none", dtype=None,
                 device=device, B=B)(return_latents=True)
    ref16 = Ours(dit, vae, steps=steps, method="manifoldgd", loop="reference", compile_mode="none", dtype=dtype,
                 device=device, B=B)(return_latents=True)
    loop = "graph" if torch.device(device).type == "cuda" else "fast"
    fast16 = Ours(dit, vae, steps=steps, method="manifoldgd", loop=loop, compile_mode="none", dtype=dtype,
                  device=device, B=B)(return_latents=True)
    e_ref = ((ref16 - ref32).norm() / ref32.norm()).item()
    e_fast = ((fast16 - ref32).norm() / ref32.norm()).item()
    return dict(loop=loop, rel_err_reference_bf16=e_ref, rel_err_fast_bf16=e_fast,
                ratio=e_fast / e_ref if e_ref > 0 else None, rule_ok=e_fast <= 2 * e_ref + 1e-12)


def plan_rows(cuda: bool, compile_rows: bool = True) -> list[tuple[str, str, dict]]:
    """The benchmark's rows in order: (name, "diffusers" | "ours", settings). An "ours" row's ``fused`` names
    the FusedDiT attention (None: the plain diffusers DiT; "sdpa"; "triton": our attention kernel)."""
    rows = [("diffusers-fp32", "diffusers", dict(dtype=torch.float32, compile_mode=None))]
    if cuda:
        rows += [("diffusers-fp16", "diffusers", dict(dtype=torch.float16, compile_mode=None))]
        if compile_rows:
            rows += [("diffusers-fp16-compile", "diffusers", dict(dtype=torch.float16, compile_mode="reduce-overhead"))]
    top = "graph" if cuda else "fast"
    # (loop, compile mode, FusedDiT attention: None = the plain diffusers DiT, "sdpa" or "triton")
    loops = [("reference", "none", None), ("fast", "none", None)] + ([("graph", "none", None)] if cuda else [])
    loops.append((top, "none", "sdpa"))                   # FusedDiT: fused QKV, adaLN once, fused LN / gate
    if cuda:
        loops.append(("graph", "none", "triton"))         # ... and our attention kernel (head dim 72 unpadded)
    if cuda and compile_rows:
        loops += [("graph", "default", None), ("graph", "default", "sdpa")]
    for m in METHODS:
        for loop, comp, fused in loops:
            tag = {None: "", "sdpa": "-fused", "triton": "-fused-tattn"}[fused]
            name = f"ours-{loop}{'-compile' if comp != 'none' else ''}{tag}-{m}"
            rows.append((name, "ours", dict(method=m, loop=loop, compile_mode=comp, fused=fused)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny DiT + VAE (a CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=None, help="subset of rows to run (names as printed)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--png", help="write a chart of images/s per row and batch here (needs matplotlib)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if not cuda and not a.tiny:
        print("no CUDA GPU: the full-size benchmark needs one (use --tiny for a CPU smoke run)")
        return 0
    batches = a.batches or ([8, 32, 128] if cuda else [4])
    dit, vae = build_models(a.tiny, dev)
    bf16 = torch.bfloat16
    flops = dit_flops_per_image(dit, dev) * 2 * a.steps   # CFG: 2 forwards per image per step
    fused_dits = {}

    def fused_dit(attention):   # its own copy of the DiT: FusedDiT re-points the weights
        if attention not in fused_dits:
            from manifoldgd_fast.fastdit import FusedDiT
            fused_dits[attention] = FusedDiT(copy.deepcopy(dit), attention=attention)
        return fused_dits[attention]

    plan = plan_rows(cuda, compile_rows=not a.no_compile)
    if a.rows:
        unknown = sorted(set(a.rows) - {name for name, _, _ in plan})
        if unknown:
            print(f"--rows: no row named {', '.join(unknown)} here (rows: {', '.join(n for n, _, _ in plan)})")
            return 2
        plan = [r for r in plan if r[0] in a.rows]
    rows = []
    for name, kind, kw in plan:   # the FusedDiT copies are built only for the rows that run
        if kind == "ours":
            fused = kw.pop("fused")
            kw["model"] = fused_dit(fused) if fused is not None else None
        rows.append((name, kind, kw))

    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name() if cuda else "cpu",
                torch=torch.__version__, steps=a.steps, tiny=a.tiny, dit_gflop_per_image_forward=flops / 2 / a.steps / 1e9,
                command=" ".join([sys.executable.split("/")[-1], "bench/bench_sampling.py", *(argv or sys.argv[1:])]))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import diffusers
        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    results = []
    for name, kind, kw in rows:
        for B in batches:
            if kind == "diffusers":
                # the pipeline casts its models: a private copy (a deep copy on the device: rebuilding
                # DiT-XL/2's random init on the host took seconds of device time per row and batch)
                d2, v2 = copy.deepcopy(dit), copy.deepcopy(vae)
                fn = diffusers_runner(d2, v2, steps=a.steps, B=B, device=dev, **kw)
            else:
                fn = Ours(dit, vae, steps=a.steps, dtype=bf16 if cuda else None, device=dev, B=B, **kw)
            try:
                reset_peak(dev)
                med, p20, p80, warm = _time(fn, dev, a.reps)
                mem = peak_gib(dev)
            except torch.cuda.OutOfMemoryError:
                print(f"{name:32s} B={B:4d}  out of memory")
                med = None
            finally:   # (an out-of-memory row too: its buffers go before the next row)
                fn = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            if med is None:
                continue
            ips = B / med
            r = dict(row=name, batch=B, images_per_s=ips, p20=B / p80, p80=B / p20, warmup_s=warm,
                     tflops=ips * flops / 1e12, peak_gib=mem)
            results.append(r)
            print(f"{name:32s} B={B:4d}  {ips:8.2f} img/s ({B / p80:.2f}-{B / p20:.2f})  "
                  f"{r['tflops']:7.1f} TFLOP/s  warm-up {warm:6.1f} s" + (f"  peak {mem:6.2f} GiB" if mem else ""),
                  flush=True)
            if a.json:   # after every row: a run cut at its deadline keeps what it measured
                atomic_json(a.json, dict(meta=meta, results=results, partial=True))
    fits = {}
    for name in sorted({r["row"] for r in results}):
        pts = [(r["batch"], r["peak_gib"]) for r in results if r["row"] == name and r["peak_gib"] is not None]
        if len(pts) >= 2:
            (b0, m0), (b1, m1) = pts[0], pts[-1]
            per = (m1 - m0) / (b1 - b0)
            # "48 GB" / "80 GB" cards hold about 47.5 / 79.6 GiB (A6000, H100 SXM: their total_memory); this card's own
            caps = {"48GB": 47.5, "80GB": 79.6}
            if cuda:
                caps["this_card"] = torch.cuda.get_device_properties(dev).total_memory / 2 ** 30
            fits[name] = {f"max_batch_{k}": int((gib - (m0 - per * b0)) / per) if per > 0 else None
                          for k, gib in caps.items()}
    num = numerics(dit, vae, min(a.steps, 50), dev, min(batches[0], 8), bf16)   # (fp32 at batch 32 took ~15 s)
    print("numerics (manifoldgd, bf16 vs fp32 reference):", json.dumps(num))
    for k, v in fits.items():
        print(f"{k:32s} largest batch: {v}")
    if a.json:
        atomic_json(a.json, dict(meta=meta, results=results, max_batch=fits, numerics=num))
    if a.png:
        chart(results, a.png, meta)
    return 0


def chart(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(r["row"] for r in results))
    batches = sorted({r["batch"] for r in results})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) * len(batches)), 4))
    w = 0.8 / len(batches)
    for j, B in enumerate(batches):
        vals = [next((r["images_per_s"] for r in results if r["row"] == n and r["batch"] == B), 0) for n in rows]
        ax.bar([i + j * w for i in range(len(rows))], vals, w, label=f"batch {B}")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(rows))], rows, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("images/s (sampling + VAE decode)")
    ax.set_title(f"{meta['device']}, {meta['steps']} steps, CFG 4")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- pytest-benchmark (CPU, tiny)
try:
    import pytest
except ImportError:  # the script does not need pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("loop", ["reference", "fast"])
    def test_sampling_cpu(benchmark, loop, method):
        torch.set_num_threads(2)
        dit, vae = build_models(True, "cpu")
        fn = Ours(dit, vae, steps=10, method=method, loop=loop, compile_mode="none", dtype=None, device="cpu", B=4)
        benchmark.extra_info.update(loop=loop, method=method, B=4, steps=10)
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
