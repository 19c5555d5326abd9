"""Latent cache: keying, encoding, per-class safetensors files, resume."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from manifoldgd_fast import data as D
from manifoldgd_fast import latents as L
from manifoldgd_fast import models as M
from manifoldgd_fast.errors import DataError

SIZE = 16  # image px; the tiny VAE downsamples by 2 -> 8x8 latents


@pytest.fixture(scope="module")
def vae():
    return M.build_vae(M.tiny_vae_config(sample_size=SIZE))


def _img(path, seed, size=(24, 20)):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "data"
    for i in range(3):
        _img(str(r / "cat" / f"{i}.png"), seed=i)
    for i in range(2):
        _img(str(r / "dog" / f"{i}.png"), seed=10 + i)
    (r / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return r


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts encode calls (to prove a resumed class is not recomputed)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


def test_latent_cache_dir_keying(tmp_path, monkeypatch):
    a = L.latent_cache_dir(str(tmp_path), "/data/imagenet", "stabilityai/sd-vae-ft-ema", 256)
    assert a == L.latent_cache_dir(str(tmp_path), "/data/imagenet/", "stabilityai/sd-vae-ft-ema", 256)
    assert os.path.dirname(a) == os.path.join(str(tmp_path), "latents")
    key = os.path.basename(a)
    assert len(key) == 16 and int(key, 16) >= 0
    others = {L.latent_cache_dir(str(tmp_path), "/data/imagenet", "stabilityai/sd-vae-ft-mse", 256),
              L.latent_cache_dir(str(tmp_path), "/data/imagenet", "stabilityai/sd-vae-ft-ema", 512),
              L.latent_cache_dir(str(tmp_path), "/data/other", "stabilityai/sd-vae-ft-ema", 256)}
    assert a not in others and len(others) == 3
    monkeypatch.setenv("MANIFOLDGD_CACHE", str(tmp_path / "env"))
    assert L.latent_cache_dir(None, "/d", "v", 8).startswith(str(tmp_path / "env" / "latents"))
    monkeypatch.delenv("MANIFOLDGD_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert L.latent_cache_dir(None, "/d", "v", 8).startswith(
        str(tmp_path / "home" / ".cache" / "manifoldgd_fast" / "latents"))


def test_encode_images_is_scaled_posterior_mean(vae):
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    z = L.encode_images(vae, x)
    assert z.shape == (3, 4, SIZE // 2, SIZE // 2) and z.dtype == torch.float32
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * 0.18215
    torch.testing.assert_close(z, ref, atol=0, rtol=0)
    # Deterministic: the mean, never a posterior sample.
    torch.testing.assert_close(L.encode_images(vae, x), z, atol=0, rtol=0)


def test_cache_latents_writes_equals_and_resumes(tmp_path, root, vae):
    entries = D.scan_image_folder(str(root))
    cache = str(tmp_path / "cache")
    with pytest.warns(UserWarning, match="broken.jpg"):
        stats = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, batch_size=2,
                                progress=False, num_workers=0)
    assert sorted(os.listdir(cache)) == ["cat.safetensors", "dog.safetensors"]
    assert stats["cat"]["n"] == 3 and stats["dog"]["n"] == 2
    assert not stats["cat"]["cached"] and stats["cat"]["skipped"] == []
    assert [os.path.basename(p) for p in stats["dog"]["skipped"]] == ["broken.jpg"]

    for e in entries:
        z, files = L.load_class_latents(cache, e.name)
        good = [f for f in e.files if not f.endswith("broken.jpg")]
        assert files == [os.path.basename(f) for f in good]
        expected = L.encode_images(vae, torch.stack([D.load_image(f, SIZE) for f in good]))
        assert z.dtype == torch.float32 and z.shape == (len(good), 4, 8, 8)
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)

    with safe_open(os.path.join(cache, "dog.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["skipped"]) == ["broken.jpg"]
    assert json.loads(meta["files"]) == ["0.png", "1.png"]
    assert int(meta["image_size"]) == SIZE and float(meta["scaling_factor"]) == 0.18215

    # Second run: nothing re-encoded, files untouched.
    mtimes = {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in os.listdir(cache)}
    counting = CountingVAE(vae)
    stats2 = L.cache_latents(entries, counting, cache_dir=cache, image_size=SIZE, batch_size=2,
                             progress=False)
    assert counting.calls == 0
    assert all(s["cached"] for s in stats2.values())
    assert stats2["dog"]["n"] == 2 and len(stats2["dog"]["skipped"]) == 1
    assert {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in os.listdir(cache)} == mtimes

    # A new image in "cat": only that class is recomputed, and it holds the new row.
    _img(str(root / "cat" / "3.png"), seed=99)
    entries = D.scan_image_folder(str(root))
    stats3 = L.cache_latents(entries, counting, cache_dir=cache, image_size=SIZE, batch_size=2,
                             progress=False, num_workers=2)
    assert not stats3["cat"]["cached"] and stats3["dog"]["cached"]
    assert counting.calls == 2  # 4 cat images in batches of 2
    z, files = L.load_class_latents(cache, "cat")
    assert files == ["0.png", "1.png", "2.png", "3.png"] and z.shape[0] == 4
    torch.testing.assert_close(
        z[3:], L.encode_images(vae, D.load_image(str(root / "cat" / "3.png"), SIZE)[None]),
        atol=1e-5, rtol=1e-5)
    assert os.stat(os.path.join(cache, "dog.safetensors")).st_mtime_ns == mtimes["dog.safetensors"]
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp")]  # atomic writes left no temp


def test_damaged_cache_file_is_recomputed(tmp_path, root, vae):
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    with open(os.path.join(cache, "cat.safetensors"), "wb") as f:
        f.write(b"half a file")
    with pytest.raises(DataError, match="damaged"):
        L.load_class_latents(cache, "cat")
    stats = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    assert not stats["cat"]["cached"] and L.load_class_latents(cache, "cat")[0].shape[0] == 3


def test_load_missing_class_names_class_and_dir(tmp_path):
    with pytest.raises(DataError, match=r"class zebra has no cached latents in .*nowhere"):
        L.load_class_latents(str(tmp_path / "nowhere"), "zebra")


def test_class_without_readable_images_is_an_error(tmp_path, vae):
    bad = tmp_path / "bad" / "owl"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"nope")
    entries = D.scan_image_folder(str(tmp_path / "bad"))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="class owl .*none of its 1 images"):
        L.cache_latents(entries, vae, cache_dir=str(tmp_path / "c"), image_size=SIZE, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cache_latents_cuda_autocast_close_to_fp32(tmp_path, root, dtype):
    entries = D.scan_image_folder(str(root), classes=["cat"])
    ref_vae = M.build_vae(M.tiny_vae_config(sample_size=SIZE))
    L.cache_latents(entries, ref_vae, cache_dir=str(tmp_path / "cpu"), image_size=SIZE,
                    progress=False)
    gpu_vae = M.build_vae(M.tiny_vae_config(sample_size=SIZE))
    L.cache_latents(entries, gpu_vae, cache_dir=str(tmp_path / "gpu"), image_size=SIZE,
                    device="cuda", dtype=dtype, progress=False)
    z32, _ = L.load_class_latents(str(tmp_path / "cpu"), "cat")
    zlp, _ = L.load_class_latents(str(tmp_path / "gpu"), "cat")
    assert zlp.dtype == torch.float32
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(zlp, z32, atol=tol * z32.abs().max().item(), rtol=0)
