"""Images/s of Stable Diffusion sampling: diffusers' StableDiffusionPipeline vs our pipeline's loop.

    python bench/bench_sd.py [--batch 8] [--steps 50] [--repeats 3] [--csv bench/sd.csv]
    python bench/bench_sd.py --tiny            # CPU smoke run of the script (seconds), no GPU needed

Models are random-init at SD 1.5's size (UNet 860 M on 4x64x64 latents, CLIP ViT-L/14 text
tower, SD VAE at 512 px): the speed does not depend on the weights. A toy tokenizer stands in
for CLIP's. Our rows embed the prompts once per class, outside the timed call (as distill does);
the diffusers row tokenizes and runs the text encoder inside its call (a few ms of the total).
Rows, all DDIM with CFG ``sd.SD_CFG_SCALE`` and VAE decoding:

* ``diffusers StableDiffusionPipeline``: fp16 weights (``--dtype``), DDIMScheduler as SD's;
* ``ours unguided`` / ``ours mgd3`` / ``ours manifoldgd``: ``classrun.distill_class`` on one
  class of ``--batch`` images, as ``manifoldgd-fast distill --backbone sd`` runs it (fp32
  weights under autocast at ``--dtype``, the fast loop where the pipeline picks it; mode
  discovery over ``--class-latents`` random latents included).

Each row: median seconds per batch over ``--repeats`` runs after one warm-up (device
synchronised), p20 / p80, images/s. Results belong in bench/RESULTS.md with the GPU name,
versions, date and this command.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

# idle OpenMP threads sleep instead of spinning (the --tiny CPU run on a shared machine); before `import torch`
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy-size models on the CPU: checks the script in seconds")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 (float32 on the CPU)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (= IPC of the timed class)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--class-latents", type=int, default=64, help="real-latent count of the class (mode discovery)")
    ap.add_argument("--methods", default="unguided,mgd3,manifoldgd")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers pipeline row")
    ap.add_argument("--csv", default=None, help="also append the rows to this CSV file")
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cpu" if a.tiny else "cuda"
    if a.dtype is None:
        a.dtype = "float32" if a.device == "cpu" else "float16"
    for name in ("batch", "steps", "repeats", "class_latents"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: use --tiny (or --device cpu) for a CPU run")
    return a


def build_models(tiny: bool, folder: str):
    """(unet, vae, text_encoder, tokenizer), random-init, fp32, eval mode."""
    from manifoldgd_fast import sd
    from manifoldgd_fast.models import build_vae, tiny_vae_config

    tok = sd.build_tiny_clip_tokenizer(folder, model_max_length=32 if tiny else 77)
    if tiny:
        unet = sd.build_sd_unet(sd.tiny_sd_unet_config(sample_size=8, cross_attention_dim=32))
        text = sd.build_clip_text_encoder(sd.tiny_clip_text_config(len(tok), max_position_embeddings=32,
                                                                   bos_token_id=tok.bos_token_id,
                                                                   eos_token_id=tok.eos_token_id))
        vae = build_vae(tiny_vae_config(sample_size=16))
    else:
        unet = sd.build_sd_unet(sd.sd15_unet_config())
        text = sd.build_clip_text_encoder(sd.sd15_text_config())  # toy token ids all lie inside CLIP's vocab
        vae = build_vae(sd.sd15_vae_config())
    return unet, vae, text, tok


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: allocations, autotuning, graph capture
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _row(what: str, secs: list[float], batch: int) -> dict:
    q = statistics.quantiles(secs, n=5, method="inclusive") if len(secs) > 1 else [secs[0]] * 4  # within the data
    med = statistics.median(secs)
    return {"what": what, "seconds_median": round(med, 4), "seconds_p20": round(q[0], 4),
            "seconds_p80": round(q[3], 4), "images_per_s": round(batch / med, 3)}


def run(a: argparse.Namespace, emit=None) -> list[dict]:
    """The rows, each handed to ``emit`` as soon as it is measured (a run cut at its deadline keeps those)."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from manifoldgd_fast import sd
    from manifoldgd_fast.config import DistillConfig, suggest_t_stop
    from manifoldgd_fast.models import dit_info
    from manifoldgd_fast.classrun import distill_class
    from manifoldgd_fast.schedule import diffusers_schedule_kwargs

    dev = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    prompt = "a photo of a tench"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        unet, vae, text, tok = build_models(a.tiny, tmp)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    sched = DDIMScheduler.from_config(sd.SD15_SCHEDULER_CONFIG)

    if not a.no_diffusers:
        pipe = StableDiffusionPipeline(vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text), tokenizer=tok,
                                       unet=copy.deepcopy(unet), scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False).to(dev, dtype)
        pipe.set_progress_bar_config(disable=True)

        def diffusers_batch():
            with torch.no_grad():
                pipe([prompt] * a.batch, num_inference_steps=a.steps, guidance_scale=sd.SD_CFG_SCALE, height=size,
                     width=size, output_type="pt")
        rows.append(_row("diffusers StableDiffusionPipeline", _time(diffusers_batch, dev, a.repeats), a.batch))
        if emit:
            emit(rows[-1])
        del pipe

    unet, vae, text = unet.to(dev), vae.to(dev), text.to(dev)
    emb = sd.encode_prompts(text, tok, [prompt, ""])
    model = sd.TextConditionedDenoiser(unet, emb, [0], prompts={0: prompt},
                                       schedule_kwargs=diffusers_schedule_kwargs(sd.SD15_SCHEDULER_CONFIG))
    info = dit_info(model)
    z = torch.randn(a.class_latents, 4, info["latent_size"], info["latent_size"],
                    generator=torch.Generator().manual_seed(0))
    for m in a.methods.split(","):
        method = {"unguided": "dit"}.get(m, m)
        # DDIM, as the diffusers row (not the SD default sampler, whatever it is)
        rcfg = DistillConfig(method=method, ipc=a.batch, batch_size=a.batch, steps=a.steps,
                             t_stop=suggest_t_stop("official", a.steps),
                             sampler="ddim", dtype=a.dtype, device=a.device).resolve(10, a.device, backbone="sd")
        ctx = dict(device=dev, dtype=dtype, model=model, dit_info=info, vae=vae, schedule_kw=model.schedule_kwargs,
                   prompts={"tench": prompt})  # a fresh context per method: the fast loop is built per run config
        secs = _time(lambda: distill_class(rcfg, ctx, "tench", 0, z).result(), dev, a.repeats)
        rows.append(_row(f"ours {m}", secs, a.batch))
        if emit:
            emit(rows[-1])
    return rows


def main(argv=None) -> int:
    from manifoldgd_fast.sd import SD_CFG_SCALE

    a = parse_args(argv)
    gpu = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    print(f"{gpu}, {a.dtype}, batch {a.batch}, {a.steps} DDIM steps, CFG {SD_CFG_SCALE}, "
          f"{'tiny' if a.tiny else 'SD 1.5 size'}, repeats {a.repeats}", flush=True)

    def emit(r: dict) -> None:   # printed and appended row by row
        print(f"{r['what']:<36} {r['images_per_s']:>9.3f} images/s   median {r['seconds_median']:.3f} s "
              f"(p20 {r['seconds_p20']:.3f}, p80 {r['seconds_p80']:.3f})", flush=True)
        if a.csv:
            with open(a.csv, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["gpu", "dtype", "batch", "steps", *r])
                if f.tell() == 0:
                    w.writeheader()
                w.writerow({"gpu": gpu, "dtype": a.dtype, "batch": a.batch, "steps": a.steps, **r})

    run(a, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
