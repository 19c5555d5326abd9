"""Latent-cache throughput: images/s of ``cache_latents`` and where the time goes,
image decoding (PIL read + resize + crop, timed inside the DataLoader workers)
vs the VAE encoder, for each ``num_workers``.

    python bench/bench_cache.py [--vae shipped|sd|PATH] [--size 256] [--n 256] [--classes 4]
        [--batch 32] [--workers 0 2] [--repeat 3] [--device cuda] [--dtype bfloat16] [--csv out.csv]

``sd`` is a random-init AutoencoderKL with the SD-VAE architecture (speed does
not depend on the weights); ``shipped`` is the embedded digits VAE (32 px).
Images are synthetic JPEGs at 1.5x the size in ``--classes`` class folders, so
the decode includes a real resize + crop and classes end mid-stream as in
ImageNet. Each run fills a fresh cache; one small untimed run warms up first.

Per run:
- images/s: images / wall time of the whole ``cache_latents`` call;
- decode: seconds the workers spent reading (summed over workers; they run in
  parallel with the encoder and with each other);
- encoder: seconds the main process spent encoding (with the device synchronised
  once per class, when the latents come back to the host);
- waiting: seconds the encoder sat idle waiting for decoded images. When it is
  near 0 the encoder is the bottleneck; when it is large, add workers. On CUDA
  the encoder's kernels run asynchronously, so GPU work that overlaps a wait is
  counted as waiting (the once-per-class sync lands in encoder): there the
  encoder column is a floor of the GPU's encode time, and images / wall time
  is the figure to compare.
Median and p20/p80 over ``--repeat`` runs.
"""
import argparse
import csv
import os
import tempfile
import time

# As in tests/conftest.py: idle OpenMP threads sleep instead of spinning. On a shared,
# oversubscribed CPU, spinning threads made the encoder up to 8x slower and the figures
# noise (bench/RESULTS.md). Must precede `import torch`; set it to ACTIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from manifoldgd_fast.data import ClassEntry  # noqa: E402
from manifoldgd_fast.latents import cache_latents  # noqa: E402

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
              block_out_channels=[128, 256, 512, 512], norm_num_groups=32, scaling_factor=0.18215,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def make_classes(root, n, n_classes, size, seed=0):
    rng = np.random.default_rng(seed)
    big = int(size * 1.5)
    entries = []
    for c in range(n_classes):
        folder = os.path.join(root, f"c{c:03d}")
        os.makedirs(folder)
        files = []
        for i in range(c, n, n_classes):
            p = os.path.join(folder, f"{i:06d}.jpg")
            Image.fromarray(rng.integers(0, 255, (big, big + 7, 3), dtype=np.uint8)).save(p, quality=90)
            files.append(p)
        entries.append(ClassEntry(name=f"c{c:03d}", label=c, files=files, folder=folder))
    return entries


def one_run(entries, vae, cache, a, dt, workers):
    t0 = time.perf_counter()
    stats = cache_latents(entries, vae, cache_dir=cache, image_size=a.size, batch_size=a.batch,
                          dtype=dt, progress=False, num_workers=workers)
    wall = time.perf_counter() - t0
    n = sum(s["n"] for s in stats.values())
    return {"wall": wall, "img_s": n / wall,
            "decode": sum(s["decode_seconds"] for s in stats.values()),
            "encode": sum(s["encode_seconds"] for s in stats.values()),
            "wait": sum(s["load_wait_seconds"] for s in stats.values())}


def files_of(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", default="shipped")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--csv", default=None, help="append one row per num_workers to this CSV")
    a = ap.parse_args()
    from diffusers import AutoencoderKL

    if a.vae == "sd":
        vae = AutoencoderKL(**SD_VAE)
        a.size = a.size or 256
    else:
        from manifoldgd_fast.models import load_vae
        from manifoldgd_fast.shipped import shipped_model_dir

        vae = load_vae(shipped_model_dir() if a.vae == "shipped" else a.vae)
        a.size = a.size or 32
    dev = torch.device(a.device)
    vae = vae.to(dev).eval()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device={name} dtype={a.dtype} vae={a.vae} size={a.size} n={a.n} classes={a.classes} "
          f"batch={a.batch} torch={torch.__version__} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        entries = make_classes(os.path.join(tmp, "data"), a.n, a.classes, a.size)
        warm = [ClassEntry(name="warm", label=0, files=entries[0].files[:a.batch], folder=entries[0].folder)]
        one_run(warm, vae, os.path.join(tmp, "warm"), a, dt, 0)
        outputs = {}
        for j, w in enumerate(a.workers):
            runs = []
            for r in range(a.repeat):
                cache = os.path.join(tmp, f"cache-{j}-w{w}-r{r}")  # a fresh cache: nothing is reused
                runs.append(one_run(entries, vae, cache, a, dt, w))
            outputs[w] = files_of(cache)
            q = {k: np.percentile([x[k] for x in runs], [50, 20, 80]) for k in runs[0]}
            rows.append({"workers": w, **{f"{k}_{s}": float(v) for k in q
                                          for s, v in zip(("p50", "p20", "p80"), q[k])}})
            print(f"num_workers={w}: {q['img_s'][0]:.1f} images/s (p20 {q['img_s'][1]:.1f}, p80 {q['img_s'][2]:.1f}); "
                  f"wall {q['wall'][0]:.2f} s = encoder {q['encode'][0]:.2f} s + waiting for images "
                  f"{q['wait'][0]:.2f} s + rest {q['wall'][0] - q['encode'][0] - q['wait'][0]:.2f} s; "
                  f"decode {q['decode'][0]:.2f} worker-s ({a.n / q['decode'][0]:.0f} images/s per worker), "
                  f"encoder alone {a.n / q['encode'][0]:.1f} images/s")
        same = all(outputs[w] == outputs[a.workers[0]] for w in a.workers)
        print(f"cache files byte-identical across num_workers {a.workers}: {'yes' if same else 'NO'}")
    if a.csv:
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["date", "device", "dtype", "vae", "size", "n", "batch", *rows[0]])
            if new:
                wr.writeheader()
            for row in rows:
                wr.writerow({"date": time.strftime("%Y-%m-%d"), "device": name, "dtype": a.dtype, "vae": a.vae,
                             "size": a.size, "n": a.n, "batch": a.batch, **row})


if __name__ == "__main__":
    main()
