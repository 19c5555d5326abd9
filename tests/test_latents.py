"""Latent cache: keying, encoding, per-class safetensors files, resume."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from manifoldgd_fast import data as D
from manifoldgd_fast import latents as L
from manifoldgd_fast import models as M
from manifoldgd_fast.errors import ConfigError, DataError

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
              L.latent_cache_dir(str(tmp_path), "/data/other", "stabilityai/sd-vae-ft-ema", 256),
              L.latent_cache_dir(str(tmp_path), "/data/imagenet", "stabilityai/sd-vae-ft-ema", 256, "bfloat16"),
              L.latent_cache_dir(str(tmp_path), "/data/imagenet", "stabilityai/sd-vae-ft-ema", 256, "float16")}
    assert a not in others and len(others) == 5
    # float32 keeps the key it had before the precision joined it: existing caches stay valid
    assert a == L.latent_cache_dir(str(tmp_path), "/data/imagenet", "stabilityai/sd-vae-ft-ema", 256, "float32")
    assert os.path.basename(a) == hashlib.sha1(json.dumps(
        [os.path.abspath("/data/imagenet"), "stabilityai/sd-vae-ft-ema", 256]).encode()).hexdigest()[:16]
    # the encoder runs in bf16/fp16 under CUDA autocast only; elsewhere the cache is float32's
    assert L.encode_precision("cpu", torch.bfloat16) == "float32"
    assert L.encode_precision("cuda", torch.bfloat16) == "bfloat16"
    assert L.encode_precision("cuda:1", torch.float16) == "float16"
    assert L.encode_precision("cuda", torch.float32) == "float32"
    with pytest.raises(ConfigError, match="precision"):
        L.latent_cache_dir(str(tmp_path), "/d", "v", 8, "int8")
    # a local VAE folder counts by its absolute path: the same folder given relatively from two places
    vae_dir = tmp_path / "models" / "vae"
    vae_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    here = L.latent_cache_dir(str(tmp_path), "/d", "models/vae", 8)
    monkeypatch.chdir(tmp_path / "models")
    assert L.latent_cache_dir(str(tmp_path), "/d", "vae", 8) == here
    assert here == L.latent_cache_dir(str(tmp_path), "/d", str(vae_dir), 8)
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
    # A half-precision mean (the encoder under autocast) is scaled in float32: rounded once, not twice.
    mean = (ref / 0.18215).bfloat16()
    half = SimpleNamespace(config=vae.config, parameters=vae.parameters,
                           encode=lambda _x: SimpleNamespace(latent_dist=SimpleNamespace(mean=mean)))
    torch.testing.assert_close(L.encode_images(half, x), mean.float() * 0.18215, atol=0, rtol=0)
    assert not torch.equal(L.encode_images(half, x), (mean * 0.18215).float())  # what bf16 scaling gave


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
    # what changes only the rounding is recorded, not keyed: a cache made with another batch size is reused
    made = {"batch_size": 2, "device": "cpu", "precision": "float32"}
    assert json.loads(meta["encoded_with"]) == made and stats["dog"]["encoded_with"] == made

    # Second run: nothing re-encoded, files untouched.
    mtimes = {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in os.listdir(cache)}
    counting = CountingVAE(vae)
    stats2 = L.cache_latents(entries, counting, cache_dir=cache, image_size=SIZE, batch_size=3,
                             progress=False)
    assert counting.calls == 0 and stats2["cat"]["encoded_with"] == made   # the file's, not this call's
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


def test_damaged_cache_file_is_recomputed(tmp_path, root, vae, caplog):
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    with open(os.path.join(cache, "cat.safetensors"), "wb") as f:
        f.write(b"half a file")
    with pytest.raises(DataError, match="damaged"):
        L.load_class_latents(cache, "cat")
    with caplog.at_level("WARNING", logger="manifoldgd_fast.latents"):
        stats = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    assert not stats["cat"]["cached"] and L.load_class_latents(cache, "cat")[0].shape[0] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cat.safetensors of class cat is unreadable" in m for m in warned), warned


@pytest.mark.parametrize("fn", [L.cache_latents, L.cache_latents_ref], ids=["fast", "ref"])
def test_verify_encodes_a_class_whose_latents_are_damaged_again(tmp_path, root, vae, caplog, fn):
    """A byte of a cached class's latents changed on disk passes the header's checks: the cache reported the
    class cached and every later run stopped at it ("delete it to recompute"). ``verify`` (what `manifoldgd-fast
    cache` asks for) reads the latents, warns, and encodes the class again, to the bytes it had; an intact
    class is kept as it is, and without ``verify`` nothing is read."""
    entries = D.scan_image_folder(str(root))
    cache = str(tmp_path / "cache")
    fn(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    path, dog = os.path.join(cache, "cat.safetensors"), os.path.join(cache, "dog.safetensors")
    good, dog_mtime = open(path, "rb").read(), os.stat(dog).st_mtime_ns
    data = bytearray(good)
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert fn(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)["cat"]["cached"]
    with caplog.at_level("WARNING", logger="manifoldgd_fast.latents"):
        stats = fn(entries, vae, cache_dir=cache, image_size=SIZE, progress=False, verify=True)
    assert not stats["cat"]["cached"] and stats["dog"]["cached"]
    assert open(path, "rb").read() == good and os.stat(dog).st_mtime_ns == dog_mtime
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cat.safetensors of class cat is damaged (its latents' sha256" in m for m in warned), warned
    assert fn(entries, vae, cache_dir=cache, image_size=SIZE, progress=False, verify=True)["cat"]["cached"]


def _cache_cat_and_rewrite(tmp_path, root, vae, edit):
    """Cache class cat, then rewrite its file with ``edit(latents)``, metadata and sha256 made to fit (an edited
    or foreign file). Returns (entries, cache folder, the latents as encoded)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    path = os.path.join(cache, "cat.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    z = load_file(path)["latents"]
    bad = edit(z.clone()).contiguous()
    save_file({"latents": bad}, path, metadata=dict(meta, latents_sha256=L.latents_sha256(bad)))
    return entries, cache, z


def test_a_cache_file_holding_nan_is_named_with_its_class(tmp_path, root, vae):
    def nan(z):
        z[0, 0, 0, 0] = float("nan")       # as an encoder that overflowed in half precision wrote it
        return z

    _, cache, _ = _cache_cat_and_rewrite(tmp_path, root, vae, nan)
    with pytest.raises(DataError, match=r"^class cat: latent cache file .*cat.safetensors holds NaN or inf"):
        L.load_class_latents(cache, "cat")


@pytest.mark.parametrize("cut", ["channels", "side"])
def test_a_cache_file_with_latents_of_another_shape_is_encoded_again(tmp_path, root, vae, caplog, cut):
    """A cache file whose latents have another per-image shape than the VAE gives (an edited or foreign file,
    its metadata and sha256 intact) was reused, and the run died in torch.stack ('stack expects each tensor to
    be equal size') when its class met another: it is unreadable, warned about, and encoded again."""
    entries, cache, z = _cache_cat_and_rewrite(tmp_path, root, vae,
                                               lambda z: z[:, :2] if cut == "channels" else z[:, :, :-1, :-1])
    with caplog.at_level("WARNING", logger="manifoldgd_fast.latents"):
        stats = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    assert not stats["cat"]["cached"]
    assert torch.equal(L.load_class_latents(cache, "cat")[0], z)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cat.safetensors of class cat is unreadable" in m for m in warned), warned


def test_a_byte_changed_in_a_cache_files_data_is_named_when_it_is_loaded(tmp_path, root, vae):
    """The header's checks (class, files, stamps, VAE) cannot see a byte of the latents changed on disk (a
    bad sector, a copy gone wrong; an exponent flip stays finite): each file records its latents' sha256,
    and loading the class stops in one line naming the file and the way out. Deleting it re-encodes the
    class to the same bytes."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    path = os.path.join(cache, "cat.safetensors")
    good = open(path, "rb").read()
    z, _ = L.load_class_latents(cache, "cat")
    assert L.latents_sha256(z) == json.loads(open(path, "rb").read()[8:8 + int.from_bytes(good[:8], "little")]
                                              )["__metadata__"]["latents_sha256"]
    data = bytearray(good)
    data[-1] ^= 0x01                     # an exponent bit of the last value: 4x or 1/4 of it, still finite
    open(path, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"^class cat: latent cache file .*cat.safetensors is damaged \(its latents' "
                                        r"sha256 is not the one recorded when it was written\); delete it to "
                                        r"recompute, or run `manifoldgd-fast cache`, which encodes it again$"):
        L.load_class_latents(cache, "cat")
    os.unlink(path)
    L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    assert open(path, "rb").read() == good


def test_weights_digest_takes_zero_dim_tensors():
    """A 0-dim parameter or buffer (a learnt scale, a step counter) is hashed by its bytes, as any other
    (it raised 'self.dim() cannot be 0 to view Float as Byte')."""
    a, b = torch.nn.Module(), torch.nn.Module()
    a.register_buffer("s", torch.tensor(1.0))
    b.register_buffer("s", torch.tensor(2.0))
    assert L.weights_digest(a) != L.weights_digest(b)
    assert L.weights_digest(a) == L.weights_digest(a)


def test_stale_temps_of_killed_cache_writes_are_swept(tmp_path, root, vae):
    """A killed write's temp in the shared, unlocked cache folder goes once it is an hour old; a fresh one
    (maybe another process's write in flight) stays."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = tmp_path / "cache"
    cache.mkdir()
    old, fresh = cache / ".tmp-cat.safetensors-dead", cache / ".tmp-dog.safetensors-live"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    L.cache_latents(entries, vae, cache_dir=str(cache), image_size=SIZE, progress=False)
    assert not old.exists() and fresh.exists()


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


# --------------------------------------------------------------------------- #
# the DataLoader path
# --------------------------------------------------------------------------- #
@pytest.fixture
def mixed_root(root):
    """root plus a class whose unreadable file sits mid-class: the loader's
    chunks (by file) and the encoder's batches (by readable image) then differ."""
    for i, name in enumerate(["a.png", "c.png", "d.png", "e.png"]):
        _img(str(root / "eel" / name), seed=20 + i, size=(17, 23))
    (root / "eel" / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def _files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def test_read_image_uint8_and_lut_give_load_image_bit_for_bit(mixed_root):
    lut = L.normalise_lut()
    for f in sorted((mixed_root / "eel").iterdir()) + sorted((mixed_root / "cat").iterdir()):
        if f.name == "b.jpg":
            with pytest.raises(DataError, match="b.jpg"):
                L.read_image_uint8(str(f), SIZE)
            continue
        x = L.read_image_uint8(str(f), SIZE)
        assert x.dtype == torch.uint8 and x.shape == (3, SIZE, SIZE) and x.is_contiguous()
        assert torch.equal(lut[x.int()], D.load_image(str(f), SIZE))


@pytest.mark.parametrize("workers,batch", [(0, 2), (2, 2), (2, 4), (1, 3)])
def test_loader_files_are_byte_identical_to_reference(tmp_path, mixed_root, vae, workers, batch):
    entries = D.scan_image_folder(str(mixed_root))
    with pytest.warns(UserWarning) as rec:
        stats = L.cache_latents(entries, vae, cache_dir=str(tmp_path / "new"), image_size=SIZE,
                                batch_size=batch, progress=False, num_workers=workers)
    # Each unreadable file warned once, in the main process, in class and file order. (rec holds every
    # warning: Python >= 3.12 adds a DeprecationWarning per worker forked from a multi-threaded process.)
    skipped = [str(w.message).split()[-1] for w in rec if issubclass(w.category, UserWarning)]
    assert [os.path.basename(p) for p in skipped] == ["broken.jpg", "b.jpg"]
    with pytest.warns(UserWarning):
        L.cache_latents_ref(entries, vae, cache_dir=str(tmp_path / "ref"), image_size=SIZE,
                            batch_size=batch)
    new, ref = _files(tmp_path / "new"), _files(tmp_path / "ref")
    assert list(new) == ["cat.safetensors", "dog.safetensors", "eel.safetensors"]
    assert new == ref
    z, files = L.load_class_latents(str(tmp_path / "new"), "eel")
    assert files == ["a.png", "c.png", "d.png", "e.png"] and z.shape == (4, 4, 8, 8)
    assert [os.path.basename(p) for p in stats["eel"]["skipped"]] == ["b.jpg"]
    for k in ("decode_seconds", "load_wait_seconds", "encode_seconds"):
        assert stats["eel"][k] > 0
    assert stats["eel"]["seconds"] >= stats["eel"]["encode_seconds"]


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (7, 3, 5, 2)])
def test_safetensors_bytes_deterministic_and_readable(tmp_path, shape):
    from safetensors.torch import load as st_load

    z = torch.randn(shape)
    meta = {"format": L.FORMAT, "class": "x", "files": '["a.png"]', "skipped": "[]",
            "image_size": "16", "scaling_factor": "0.18215"}
    blob = L.safetensors_bytes(z, meta)
    assert blob == L.safetensors_bytes(z.clone(), dict(reversed(meta.items())))
    assert int.from_bytes(blob[:8], "little") % 8 == 0
    assert torch.equal(st_load(blob)["latents"], z)
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("latents"), z)


def test_dataset_pickles_for_spawn_workers(mixed_root):
    import pickle

    ds = pickle.loads(pickle.dumps(L.ImageFiles(SIZE)))
    assert pickle.loads(pickle.dumps(L.collate_class_chunk)) is L.collate_class_chunk
    good, bad = str(mixed_root / "eel" / "a.png"), str(mixed_root / "eel" / "b.jpg")
    batch = L.collate_class_chunk([ds[(2, 0, good)], ds[(2, 1, bad)]])
    assert batch["class"] == 2 and batch["n_files"] == 2 and batch["paths"] == [good]
    assert torch.equal(batch["images"][0], L.read_image_uint8(good, SIZE))
    assert batch["errors"][0][0] == bad and "cannot read image" in batch["errors"][0][1]
    assert L.collate_class_chunk([ds[(0, 0, bad)]])["images"] is None


def test_chunks_never_span_classes(mixed_root):
    entries = D.scan_image_folder(str(mixed_root))  # 3, 3 and 5 files
    chunks = list(L.ClassChunks(entries, 2))
    assert len(chunks) == len(L.ClassChunks(entries, 2)) == 2 + 2 + 3
    assert [[c for c, _, _ in ch] for ch in chunks] == [[0, 0], [0], [1, 1], [1], [2, 2], [2, 2], [2]]
    assert [p for ch in chunks for _, _, p in ch] == [f for e in entries for f in e.files]


class SlowVAE(CountingVAE):
    """An encoder slower than decoding, so an unbounded loader would read every class ahead."""

    def encode(self, x):
        import time

        time.sleep(0.03)
        return super().encode(x)


@pytest.mark.parametrize("workers", [0, 2])
def test_host_memory_holds_one_class_and_a_bounded_prefetch(tmp_path, vae, monkeypatch, workers):
    method = multiprocessing.get_start_method()
    if workers and method != "fork":  # Python 3.14's default on Linux is forkserver
        pytest.skip(f"the loader's workers see this test's logging reader only if they fork (start method: {method})")
    n_classes, per_class, batch = 8, 3, 2
    for c in range(n_classes):
        for i in range(per_class):
            _img(str(tmp_path / "data" / f"c{c}" / f"{i}.png"), seed=100 * c + i)
    entries = D.scan_image_folder(str(tmp_path / "data"))
    log_path = str(tmp_path / "events.log")

    def event(line):  # O_APPEND: lines from worker processes and this one interleave whole
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, (line + "\n").encode())
        os.close(fd)

    read, write, buffer_init = L.read_image_uint8, L.atomic_write_bytes, L.ClassBuffer.__init__

    def logged_read(path, size):
        event(f"read {os.path.basename(os.path.dirname(path))}")
        return read(path, size)

    def logged_write(path, data):
        write(path, data)
        event(f"write {os.path.basename(path).split('.')[0]}")

    def logged_buffer(self, entry, stamps):
        buffer_init(self, entry, stamps)
        event(f"open {entry.name}")

    monkeypatch.setattr(L, "read_image_uint8", logged_read)  # workers fork after this: they see it
    monkeypatch.setattr(L, "atomic_write_bytes", logged_write)
    monkeypatch.setattr(L.ClassBuffer, "__init__", logged_buffer)
    L.cache_latents(entries, SlowVAE(vae), cache_dir=str(tmp_path / "cache"), image_size=SIZE,
                    batch_size=batch, progress=False, num_workers=workers)

    events = [line.split() for line in open(log_path).read().splitlines()]
    pos = {f"c{c}": c for c in range(n_classes)}
    open_classes, peak_open, reads, bound = set(), 0, [], workers * L.PREFETCH * batch
    for kind, name in events:
        if kind == "open":
            open_classes.add(name)
            peak_open = max(peak_open, len(open_classes))
        elif kind == "read":
            reads.append(pos[name])
        else:
            open_classes.discard(name)
            ahead = sum(r > pos[name] for r in reads)  # images of later classes read so far
            assert ahead <= bound, (name, ahead, events)
    assert peak_open == 1
    assert sorted(reads) == [c for c in range(n_classes) for _ in range(per_class)]
    assert [name for kind, name in events if kind == "write"] == [f"c{c}" for c in range(n_classes)]


def test_crash_mid_run_then_resume_gives_the_reference_bytes(tmp_path, mixed_root, vae, monkeypatch):
    entries = D.scan_image_folder(str(mixed_root))
    cache = str(tmp_path / "cache")
    write = L.atomic_write_bytes
    written = []

    def dies_on_second_class(path, data):
        if written:
            raise KeyboardInterrupt("killed")
        write(path, data)
        written.append(os.path.basename(path))

    monkeypatch.setattr(L, "atomic_write_bytes", dies_on_second_class)
    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
        L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, batch_size=2,
                        progress=False, num_workers=2)
    monkeypatch.setattr(L, "atomic_write_bytes", write)
    assert written == ["cat.safetensors"] and os.listdir(cache) == ["cat.safetensors"]

    counting = CountingVAE(vae)
    with pytest.warns(UserWarning):
        stats = L.cache_latents(entries, counting, cache_dir=cache, image_size=SIZE, batch_size=2,
                                progress=False, num_workers=2)
    assert stats["cat"]["cached"] and not stats["dog"]["cached"] and not stats["eel"]["cached"]
    assert counting.calls == 1 + 2  # dog: 2 readable images; eel: 4
    with pytest.warns(UserWarning):
        L.cache_latents_ref(entries, vae, cache_dir=str(tmp_path / "ref"), image_size=SIZE,
                            batch_size=2)
    assert _files(tmp_path / "cache") == _files(tmp_path / "ref")


def test_bad_loader_arguments_are_config_errors(tmp_path, root, vae):
    from manifoldgd_fast.errors import ConfigError

    entries = D.scan_image_folder(str(root), classes=["cat"])
    with pytest.raises(ConfigError, match="num_workers -1"):
        L.cache_latents(entries, vae, cache_dir=str(tmp_path), image_size=SIZE, num_workers=-1)
    with pytest.raises(ConfigError, match="encode-batch-size 0"):
        L.cache_latents(entries, vae, cache_dir=str(tmp_path), image_size=SIZE, batch_size=0)


def test_an_image_rewritten_while_its_class_is_read_is_encoded_again_next_time(tmp_path, root, vae, monkeypatch):
    """A class's file stamps are taken before any of its files is read: an image rewritten just after a
    worker decoded it (before its class's stamps were taken, as they once were) would be cached with its
    new stamp and its old pixels for good. Now the next run sees the change and encodes the class again."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    kw = dict(cache_dir=cache, image_size=SIZE, batch_size=2, progress=False, num_workers=0)
    target = str(root / "cat" / "0.png")
    real = L.ImageFiles.__getitem__

    def getitem(self, index):
        out = real(self, index)
        if index[2] == target:                     # decoded: now the file changes under the run
            _img(target, seed=99)
            st = os.stat(target)
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return out

    monkeypatch.setattr(L.ImageFiles, "__getitem__", getitem)
    L.cache_latents(entries, vae, **kw)
    monkeypatch.setattr(L.ImageFiles, "__getitem__", real)
    stats = L.cache_latents(entries, vae, **kw)
    assert not stats["cat"]["cached"]
    fresh = L.cache_latents(entries, vae, **{**kw, "cache_dir": str(tmp_path / "fresh")})
    assert fresh["cat"]["n"] == 3
    assert torch.equal(L.load_class_latents(cache, "cat")[0], L.load_class_latents(str(tmp_path / "fresh"), "cat")[0])


def test_a_cache_file_of_another_class_is_not_taken(tmp_path, root, vae):
    """Two class names that differ only in case share a file on a case-insensitive file system: a file whose
    metadata names another class is encoded again (cache) or refused in one line (load)."""
    import shutil

    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    kw = dict(cache_dir=cache, image_size=SIZE, batch_size=2, progress=False, num_workers=0)
    L.cache_latents(entries, vae, **kw)
    shutil.copytree(root / "cat", root / "Cat")
    shutil.copy(os.path.join(cache, "cat.safetensors"), os.path.join(cache, "Cat.safetensors"))  # as if one file
    with pytest.raises(DataError, match=r"^class Cat: latent cache file .*Cat.safetensors holds class 'cat'; class "
                                        r"names that differ only in case"):
        L.load_class_latents(cache, "Cat")
    stats = L.cache_latents(D.scan_image_folder(str(root), classes=["Cat"]), vae, **kw)
    assert not stats["Cat"]["cached"] and L.load_class_latents(cache, "Cat")[0].shape[0] == 3


def _filled_cache(tmp_path, root, vae):
    """Every class of ``root`` encoded by ``vae`` into a fresh cache: (entries, cache, cache_latents keywords,
    cat's latents)."""
    entries = D.scan_image_folder(str(root))
    cache = str(tmp_path / "cache")
    kw = dict(cache_dir=cache, image_size=SIZE, batch_size=2, progress=False, num_workers=0)
    with pytest.warns(UserWarning):
        L.cache_latents(entries, vae, **kw)
    return entries, cache, kw, L.load_class_latents(cache, "cat")[0]


def _vae_like(vae, **config):
    """A tiny VAE (the fixture's config, ``config`` overriding it) holding ``vae``'s weights."""
    other = M.build_vae(dict(M.tiny_vae_config(sample_size=SIZE), **config))
    with torch.no_grad():
        for (_, a), (_, b) in zip(sorted(other.state_dict().items()), sorted(vae.state_dict().items())):
            a.copy_(b)
    return other


def test_cache_is_stale_when_an_image_or_the_vae_weights_change(tmp_path, root, vae):
    """The same file names are not enough: a rewritten image re-encodes its class, and other VAE weights
    (same config, same folder name) re-encode every class."""
    entries, cache, kw, cat_before = _filled_cache(tmp_path, root, vae)

    _img(str(root / "cat" / "1.png"), seed=123)                        # same name, other pixels
    st = os.stat(root / "cat" / "1.png")
    os.utime(root / "cat" / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on a coarse clock
    counting = CountingVAE(vae)
    stats = L.cache_latents(entries, counting, **kw)
    assert not stats["cat"]["cached"] and stats["dog"]["cached"] and counting.calls > 0
    cat_after = L.load_class_latents(cache, "cat")[0]
    assert torch.equal(cat_after[0], cat_before[0]) and not torch.equal(cat_after[1], cat_before[1])

    other = _vae_like(vae)
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    assert L.weights_digest(other) != L.weights_digest(vae) and L.weights_digest(CountingVAE(vae)) == L.weights_digest(vae)
    with pytest.warns(UserWarning):
        stats = L.cache_latents(entries, other, **kw)
    assert not stats["cat"]["cached"] and not stats["dog"]["cached"]


def test_cache_is_stale_at_another_image_size(tmp_path, root, vae):
    """A cache file of the class at another --image-size (the same cache folder given by hand) is encoded
    again, not taken."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    assert L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)["cat"]["cached"]
    again = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE * 2, progress=False)
    assert not again["cat"]["cached"] and L.load_class_latents(cache, "cat")[0].shape[-1] == SIZE  # 2x down


def test_encode_images_scales_by_the_vaes_own_scaling_factor():
    """The scaling factor comes from the VAE's config (SDXL's 0.13025, SD3's 1.5305, ...), not SD's 0.18215."""
    other = M.build_vae(dict(M.tiny_vae_config(sample_size=SIZE), scaling_factor=0.5))
    assert other.config.scaling_factor == 0.5
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        mean = other.encode(x).latent_dist.mean
    torch.testing.assert_close(L.encode_images(other, x), mean.float() * 0.5, atol=0, rtol=0)


def test_cache_is_stale_when_only_the_scaling_factor_changes(tmp_path, root, vae):
    """Same weights (same digest), same images, another scaling_factor in the VAE's config: every class is
    encoded again, and the new latents are the old ones rescaled."""
    entries, cache, kw, cat_before = _filled_cache(tmp_path, root, vae)
    rescaled = _vae_like(vae, scaling_factor=0.5)
    assert L.weights_digest(rescaled) == L.weights_digest(vae) and rescaled.config.scaling_factor == 0.5
    counting = CountingVAE(rescaled)
    with pytest.warns(UserWarning):
        stats = L.cache_latents(entries, counting, **kw)
    assert not stats["cat"]["cached"] and not stats["dog"]["cached"] and counting.calls > 0
    cat_after = L.load_class_latents(cache, "cat")[0]
    torch.testing.assert_close(cat_after, cat_before / 0.18215 * 0.5, atol=1e-5, rtol=1e-5)


def _rewrite_meta(path, **fields):
    """Rewrite the cache file at ``path`` with its latents and its metadata, ``fields`` replacing some."""
    with safe_open(path, framework="pt") as f:
        z, meta = f.get_tensor("latents").clone(), f.metadata()
    with open(path, "wb") as f:
        f.write(L.safetensors_bytes(z, dict(meta, **fields)))


def _cached_cat(tmp_path, root, vae):
    """Class cat cached: (its entries, the cache folder, cache_latents' keywords, its file, the file's bytes)."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    kw = dict(cache_dir=cache, image_size=SIZE, batch_size=2, progress=False, num_workers=0)
    L.cache_latents(entries, vae, **kw)
    path = os.path.join(cache, "cat.safetensors")
    return entries, cache, kw, path, open(path, "rb").read()


@pytest.mark.parametrize("field,value", [("files", '"0.png"'), ("files", "null"), ("skipped", '{"a": 1}'),
                                         ("files", "[0, 1, 2]"), ("encoded_with", "[1]")])
def test_cache_metadata_of_the_wrong_types_is_encoded_again(tmp_path, root, vae, caplog, field, value):
    """Metadata that is valid JSON of the wrong type (a hand-edited or foreign file) is as unreadable as broken
    JSON: the class is encoded again with a warning (it raised a TypeError out of cache_latents), and loading
    such a file names it as damaged (it returned a string or None as the class's file names)."""
    entries, cache, kw, path, good = _cached_cat(tmp_path, root, vae)
    _rewrite_meta(path, **{field: value})
    if field == "files":
        with pytest.raises(DataError, match=r"^class cat: latent cache file .*cat.safetensors is damaged"):
            L.load_class_latents(cache, "cat")
    with caplog.at_level("WARNING", logger="manifoldgd_fast.latents"):
        stats = L.cache_latents(entries, vae, **kw)
    assert not stats["cat"]["cached"] and open(path, "rb").read() == good
    assert any("cat.safetensors of class cat is unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change,why", [
    (lambda z: z.half(), r"its latents are F16, not F32"),
    (lambda z: torch.cat([z, z[:1]]), r"its latents have shape \(4, 4, 8, 8\), not \(3, C, h, w\) for its 3 image"),
    (lambda z: z[:2], r"its latents have shape \(2, 4, 8, 8\), not \(3, C, h, w\)"),
    (lambda z: z.flatten(1), r"its latents have shape \(3, 256\), not \(3, C, h, w\)")],
    ids=["float16", "a row added", "a row lost", "flattened"])
def test_a_cache_file_whose_latents_do_not_fit_its_record_is_encoded_again(tmp_path, root, vae, caplog, change, why):
    """A file whose metadata is right but whose tensor is not the (n, C, h, w) float32 of its n image files
    (another dtype, rows added or lost: a foreign or hand-made file, sha256 recorded to match) was reused as
    cached and loaded as is: float16 latents, or rows no longer aligned with the file names. It is now encoded
    again, and loading it names what is wrong."""
    from safetensors.torch import save_file

    entries, cache, kw, path, good = _cached_cat(tmp_path, root, vae)
    with safe_open(path, framework="pt") as f:
        z, meta = f.get_tensor("latents").clone(), f.metadata()
    bad = change(z).contiguous()
    save_file({"latents": bad}, path, metadata=dict(meta, latents_sha256=L.latents_sha256(bad)))
    with pytest.raises(DataError, match=r"^class cat: latent cache file .*cat.safetensors is damaged \(" + why):
        L.load_class_latents(cache, "cat")
    with caplog.at_level("WARNING", logger="manifoldgd_fast.latents"):
        stats = L.cache_latents(entries, vae, **kw)
    assert not stats["cat"]["cached"] and open(path, "rb").read() == good
    assert any("cat.safetensors of class cat is unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cache", [L.cache_latents, L.cache_latents_ref])
def test_a_class_entry_without_files_is_a_data_error_before_anything_is_encoded(tmp_path, root, vae, cache):
    """A ClassEntry with no image files (built by hand: scan_image_folder refuses such a folder) raised a bare
    KeyError (cache_latents) or IndexError (cache_latents_ref) after the classes before it were encoded; it is
    now a DataError naming the class, before any class is encoded."""
    entries = D.scan_image_folder(str(root), classes=["cat"]) + [D.ClassEntry("owl", 7, [], str(root / "owl"))]
    with pytest.raises(DataError, match=r"^class owl in .*data has no image files$"):
        cache(entries, vae, cache_dir=str(tmp_path / "cache"), image_size=SIZE, progress=False, num_workers=0)
    assert not os.path.exists(tmp_path / "cache" / "cat.safetensors")


def test_loaded_latents_survive_their_cache_file_being_cut_in_place(tmp_path, root, vae):
    """load_class_latents returned safetensors' tensor, which maps the cache file: once the file was cut in
    place (a cp over it; on NFS, a file replaced from another node) a read of the class's latents killed the
    process with SIGBUS. The latents are now the process's own memory."""
    import subprocess
    import sys

    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False)
    expected = float(L.load_class_latents(cache, "cat")[0].double().sum())
    code = ("import sys; from manifoldgd_fast import latents as L\n"
            "z, _ = L.load_class_latents(sys.argv[1], 'cat')\n"
            "open(sys.argv[2], 'wb').close()\n"
            "print(repr(float(z.double().sum())))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(L.__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, cache, os.path.join(cache, "cat.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert float(out.stdout) == expected


@pytest.mark.parametrize("encode", [L.cache_latents, L.cache_latents_ref])
def test_a_cached_class_reports_what_its_encoding_reported(tmp_path, root, vae, caplog, encode):
    """The stats of a class taken from the cache are those of the run that encoded it: its rows, the full paths
    of its skipped images (the pipeline makes them relative to the class folder), the digest of its image files'
    stamps (what a done mark keeps) and how it was encoded; the encoding run warned of the skipped images."""
    entries = D.scan_image_folder(str(root))
    kw = dict(cache_dir=str(tmp_path / "cache"), image_size=SIZE, batch_size=2, progress=False, num_workers=0)
    with caplog.at_level("WARNING", logger="manifoldgd_fast.latents"), pytest.warns(UserWarning, match="broken.jpg"):
        made = encode(entries, vae, **kw)
    assert "class dog: skipped 1 unreadable image(s)" in [r.getMessage() for r in caplog.records]
    cached = L.cache_latents(entries, vae, **kw)
    keys = ("n", "skipped", "stamps", "encoded_with", "path")
    for e in entries:
        assert cached[e.name]["cached"] and not made[e.name]["cached"]
        assert {k: cached[e.name][k] for k in keys} == {k: made[e.name][k] for k in keys}
        assert made[e.name]["stamps"] == L.stamps_digest(L.file_stamps(e))
    assert made["dog"]["skipped"] == [str(root / "dog" / "broken.jpg")]


def test_weights_digest_tells_shapes_and_dtypes_apart():
    """The same bytes under another shape or dtype are other weights."""
    def module(t):
        m = torch.nn.Module()
        m.register_buffer("w", t)
        return m

    w = torch.arange(6, dtype=torch.float32)
    digests = {L.weights_digest(module(t)) for t in (w.view(2, 3), w.view(3, 2), w.view(torch.int32).view(2, 3))}
    assert len(digests) == 3


def test_decoding_workers_leave_sigterm_to_the_main_process():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        L._worker_ignores_sigterm(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_cache_file_whose_scaling_factor_is_not_a_number_is_encoded_again(tmp_path, root, vae, value):
    """A recorded scaling factor of nan passed the check |recorded - the VAE's| >= 1e-12 (a comparison with nan is
    false), so the file was reused whatever VAE asked for it; it is now stale, as any other mismatch."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    kw = dict(cache_dir=str(tmp_path / "cache"), image_size=SIZE, batch_size=2, progress=False, num_workers=0)
    L.cache_latents(entries, vae, **kw)
    path = os.path.join(kw["cache_dir"], "cat.safetensors")
    good = open(path, "rb").read()
    _rewrite_meta(path, scaling_factor=value)
    stats = L.cache_latents(entries, vae, **kw)
    assert not stats["cat"]["cached"] and open(path, "rb").read() == good


@pytest.mark.parametrize("encode", [L.cache_latents, L.cache_latents_ref])
@pytest.mark.parametrize("size", [0, -16, 16.0, True, "16"])
def test_an_image_size_that_is_not_a_positive_integer_is_a_config_error(tmp_path, root, vae, encode, size):
    """image_size 0 or negative made every image 'unreadable' (PIL cannot resize to 0 px) and the class an error
    blaming its files; True or 16.0 reached the encoder or PIL. Each is now a ConfigError naming the value,
    before any image is read."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    with pytest.raises(ConfigError, match=r"^--image-size .*: must be an integer >= 1$"):
        encode(entries, vae, cache_dir=str(tmp_path / "cache"), image_size=size, progress=False, num_workers=0)
    assert not os.path.exists(tmp_path / "cache" / "cat.safetensors")


def test_a_skipped_image_that_reads_now_is_encoded_on_the_next_run(tmp_path, root, vae, monkeypatch):
    """An image skipped once for a passing reason (no read permission, a disk away, out of memory) was recorded
    in the class's cache file and never read again: a chmod changes neither its size nor its mtime, the
    stamps the cache compares. A recorded skip is tried again; one that reads now re-encodes the class."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    real = L.read_image_uint8

    def denied(path, *a, **k):
        if path.endswith("1.png"):
            raise DataError(f"cannot read image {path}: [Errno 13] Permission denied")
        return real(path, *a, **k)

    monkeypatch.setattr(L, "read_image_uint8", denied)
    with pytest.warns(UserWarning, match="1.png"):
        first = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False, num_workers=0)
    assert first["cat"]["n"] == 2
    again = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False, num_workers=0)
    assert again["cat"]["cached"] and again["cat"]["n"] == 2        # still unreadable: reused
    monkeypatch.setattr(L, "read_image_uint8", real)
    fixed = L.cache_latents(entries, vae, cache_dir=cache, image_size=SIZE, progress=False, num_workers=0)
    assert not fixed["cat"]["cached"] and fixed["cat"]["n"] == 3 and fixed["cat"]["skipped"] == []
    z, files = L.load_class_latents(cache, "cat")
    assert files == ["0.png", "1.png", "2.png"] and z.shape[0] == 3


@pytest.mark.parametrize("where", ["data", "class", "env"])
def test_a_cache_inside_the_data_folder_is_refused(where, root, tmp_path, monkeypatch, capsys):
    """--cache-dir (or $MANIFOLDGD_CACHE) at or inside --data: the run wrote DATA/latents/, read by every later
    run as a class (no images: refused; under --classes, every later class's sorted label moved, silently)."""
    from manifoldgd_fast.cli import main

    cache = {"data": root, "class": root / "cat", "env": root}[where]
    flag = []
    if where == "env":
        monkeypatch.setenv(L.CACHE_ENV, str(cache))
    else:
        flag = ["--cache-dir", str(cache)]
    before = sorted(os.listdir(root))
    assert main(["cache", "--data", str(root), "--model", str(tmp_path / "none"), *flag]) == 2
    err = capsys.readouterr().err.strip()
    name = "--cache-dir" if flag else "$MANIFOLDGD_CACHE"
    assert err == (f"manifoldgd-fast: error: {name} {cache}: its latents/ folder would lie inside --data {root} "
                   "and be read as a class; use a cache folder outside the data folder"), err
    assert sorted(os.listdir(root)) == before


def test_a_cache_or_out_through_a_link_in_the_data_folder_is_refused(root, tmp_path, capsys):
    """DATA/link -> a folder elsewhere: --cache-dir DATA/link (or --out DATA/link) resolved outside DATA and
    passed, but a scan of DATA reads the link as a class folder, the cache's latents/ (or the run's classes)
    within it. Refused as a folder inside DATA is; the link's target is left empty."""
    from manifoldgd_fast.cli import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / "link")
    try:
        assert main(["cache", "--data", str(root), "--model", str(tmp_path / "none"),
                     "--cache-dir", str(root / "link")]) == 2
        assert "its latents/ folder would lie inside --data" in capsys.readouterr().err
        assert main(["distill", "--data", str(root), "--model", str(tmp_path / "none"),
                     "--out", str(root / "link" / "out")]) == 2
        assert "is inside --data" in capsys.readouterr().err
        assert os.listdir(elsewhere) == []
    finally:
        os.unlink(root / "link")


def test_a_cache_in_a_hidden_folder_of_the_data_folder_is_kept(tiny_world, tmp_path):
    """--cache-dir DATA/.cache: its latents/ is in a hidden folder, which no scan reads as a class; it was refused
    as "read as a class" along with a cache at DATA itself (which is)."""
    import shutil

    from manifoldgd_fast.cli import main

    data = shutil.copytree(tiny_world["data"], tmp_path / "data")
    assert main(["cache", "--data", str(data), "--model", tiny_world["model"], "--cache-dir", str(data / ".cache"),
                 "--classes", "apple", "--device", "cpu"]) == 0
    assert os.path.isdir(data / ".cache" / "latents")
    assert [e.name for e in D.scan_image_folder(str(data))] == ["apple", "banana", "cherry"]


def test_a_tilde_in_the_cache_root_is_the_home_folder_as_for_the_digits(tmp_path, monkeypatch):
    """$MANIFOLDGD_CACHE='~/c' (quoted, or from an env file) sent the digits export to HOME/c and the latents to
    ./~/c/latents in each working directory (a cache per folder the command ran in); so did --cache-dir=~/c,
    which no shell expands, and a config file's cache_dir."""
    from manifoldgd_fast.demo.digits import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(L.CACHE_ENV, "~/c")
    assert L.default_cache_root() == default_cache_dir() == str(tmp_path / "home" / "c")
    assert L.latent_cache_dir(None, "/d", "v", 8).startswith(str(tmp_path / "home" / "c" / "latents" / ""))
    assert L.latent_cache_dir("~/x", "/d", "v", 8).startswith(str(tmp_path / "home" / "x" / "latents" / ""))


@pytest.mark.parametrize("encode", [L.cache_latents, L.cache_latents_ref])
def test_a_read_only_cache_with_classes_to_encode_is_refused_before_encoding(tmp_path, root, vae, monkeypatch, encode):
    """A shared read-only cache missing a class: the class was encoded (minutes for an ImageNet class on a CPU),
    then its write failed with "Permission denied"; a complete read-only cache is read as before."""
    entries = D.scan_image_folder(str(root), classes=["cat"])
    cache = str(tmp_path / "cache")
    kw = dict(cache_dir=cache, image_size=SIZE, batch_size=2, progress=False, num_workers=0)
    access = os.access  # (root writes anywhere: the cache made read-only, as a read-only mount is)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: access(p, mode, **k) and not (
        os.path.realpath(p) == os.path.realpath(cache) and mode & os.W_OK))
    counting = CountingVAE(vae)
    with pytest.raises(ConfigError) as e:
        encode(entries, counting, **kw)
    assert str(e.value) == (f"latent cache folder {cache} is not writable, and class cat is not cached there, or "
                            "its file is stale or damaged (1 class(es) to encode): give a writable --cache-dir (or "
                            "$MANIFOLDGD_CACHE)")
    assert counting.calls == 0 and os.listdir(cache) == []
    monkeypatch.undo()
    encode(entries, vae, **kw)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not mode & os.W_OK)
    assert encode(entries, vae, **kw)["cat"]["cached"]
