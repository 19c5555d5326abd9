"""Latent-cache throughput: images/s of image decoding (PIL + centre crop) vs the VAE encoder.

    python bench/bench_cache.py [--vae shipped|sd|PATH] [--size 256] [--n 256] [--batch 32] [--device cuda] [--dtype bfloat16]

``sd`` is a random-init AutoencoderKL with the SD-VAE architecture (speed does
not depend on the weights); ``shipped`` is the embedded digits VAE (32 px).
Images are synthetic JPEGs written to a temp folder at 1.5x the size, so the
decode includes a real resize + crop.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from manifoldgd_fast.data import ClassEntry, iter_class_images
from manifoldgd_fast.latents import encode_images

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
              block_out_channels=[128, 256, 512, 512], norm_num_groups=32, scaling_factor=0.18215,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", default="shipped")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    from diffusers import AutoencoderKL

    if a.vae == "sd":
        vae, size = AutoencoderKL(**SD_VAE), a.size or 256
    else:
        from manifoldgd_fast.models import load_vae
        from manifoldgd_fast.shipped import shipped_model_dir

        vae = load_vae(shipped_model_dir() if a.vae == "shipped" else a.vae)
        size = a.size or 32
    dev = torch.device(a.device)
    vae = vae.to(dev).eval()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        big = int(size * 1.5)
        files = []
        for i in range(a.n):
            p = os.path.join(tmp, f"{i}.jpg")
            Image.fromarray(rng.integers(0, 255, (big, big + 7, 3), dtype=np.uint8)).save(p, quality=90)
            files.append(p)
        entry = ClassEntry(name="x", label=0, files=files, folder=tmp)
        t0 = time.perf_counter()
        batches = [b for b, _ in iter_class_images(entry, size, a.batch)]
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            for b in batches:
                encode_images(vae, b.to(dev, non_blocking=True))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_encode = time.perf_counter() - t0
    print(f"device={dev} dtype={a.dtype} vae={a.vae} size={size} n={a.n} batch={a.batch} torch={torch.__version__}")
    print(f"image decode + crop: {a.n / t_decode:.1f} images/s ({t_decode:.2f} s)")
    print(f"VAE encode:          {a.n / t_encode:.1f} images/s ({t_encode:.2f} s)")
    print(f"together (serial):   {a.n / (t_decode + t_encode):.1f} images/s; "
          f"decode share {100 * t_decode / (t_decode + t_encode):.0f} %")


if __name__ == "__main__":
    main()
