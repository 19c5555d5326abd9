"""DiT / VAE builders and offline loading (folders, pipeline folders, HF cache)."""
from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch

from manifoldgd_fast import models as M
from manifoldgd_fast.errors import ModelError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_dit():
    return M.build_dit(M.tiny_dit_config(num_classes=10, sample_size=8))


@pytest.fixture(scope="module")
def tiny_vae():
    return M.build_vae(M.tiny_vae_config(sample_size=16))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _dit_out(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


# --------------------------------------------------------------------------- builders
def test_tiny_dit_shape_learned_sigma_and_null_class(tiny_dit):
    info = M.dit_info(tiny_dit)
    assert info == {"num_classes": 10, "null_class": 10, "latent_size": 8, "in_channels": 4,
                    "out_channels": 8, "learned_sigma": True, "patch_size": 2,
                    "time_embedding": "diffusers"}
    # diffusers keeps a CFG row (num_classes + 1) when class dropout > 0, as DiT does.
    table = tiny_dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11
    assert not tiny_dit.training
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 999, 999])
    out = _dit_out(tiny_dit, x, t, torch.tensor([0, 9, 10]))  # 10 = null class
    assert out.shape == (3, 8, 8, 8) and torch.isfinite(out).all()
    # The label conditions the output: same input, different labels -> different outputs.
    same_x = x[:1].expand(2, -1, -1, -1)
    out2 = _dit_out(tiny_dit, same_x, t[:2], torch.tensor([3, 10]))
    assert (out2[0] - out2[1]).abs().max() > 1e-4
    # Eval mode: no random label dropout, so the forward is deterministic.
    torch.testing.assert_close(out, _dit_out(tiny_dit, x, t, torch.tensor([0, 9, 10])), atol=0, rtol=0)


def test_build_is_seeded():
    a = M.build_dit(M.tiny_dit_config(), seed=3)
    b = M.build_dit(M.tiny_dit_config(), seed=3)
    c = M.build_dit(M.tiny_dit_config(), seed=4)
    assert _same_weights(a, b) and not _same_weights(a, c)


def test_dit_xl2_config_architecture():
    from diffusers import DiTTransformer2DModel

    cfg = M.dit_xl2_config()
    with torch.device("meta"):  # the architecture without allocating 2.7 GB
        model = DiTTransformer2DModel(**cfg)
    info = M.dit_info(model)
    assert info == {"num_classes": 1000, "null_class": 1000, "latent_size": 32, "in_channels": 4,
                    "out_channels": 8, "learned_sigma": True, "patch_size": 2,
                    "time_embedding": "diffusers"}
    assert len(model.transformer_blocks) == 28 and model.inner_dim == 16 * 72 == 1152
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 1001


def test_tiny_vae_shapes(tiny_vae):
    info = M.vae_info(tiny_vae)
    assert info == {"scaling_factor": 0.18215, "latent_channels": 4, "downsample": 2}
    with torch.no_grad():
        z = tiny_vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        assert tiny_vae.decode(z).sample.shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------- loading
def test_save_load_folder_roundtrip(tmp_path, tiny_dit, tiny_vae):
    dit_dir = M.save_pretrained_folder(tiny_dit, str(tmp_path / "dit"))
    vae_dir = M.save_pretrained_folder(tiny_vae, str(tmp_path / "vae"))
    assert os.path.getsize(os.path.join(dit_dir, WEIGHTS)) < 1_000_000
    assert os.path.getsize(os.path.join(vae_dir, WEIGHTS)) < 1_000_000
    dit = M.load_dit(dit_dir)
    vae = M.load_vae(vae_dir)
    assert _same_weights(dit, tiny_dit) and _same_weights(vae, tiny_vae)
    assert not dit.training and not vae.training
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 10])
    torch.testing.assert_close(_dit_out(dit, x, t, y), _dit_out(tiny_dit, x, t, y), atol=0, rtol=0)


def test_load_pipeline_layout_and_dtype(tmp_path, tiny_dit, tiny_vae):
    pipe = tmp_path / "pipe"
    M.save_pretrained_folder(tiny_dit, str(pipe / "transformer"))
    M.save_pretrained_folder(tiny_vae, str(pipe / "vae"))
    assert _same_weights(M.load_dit(str(pipe)), tiny_dit)
    assert _same_weights(M.load_vae(str(pipe)), tiny_vae)
    half = M.load_dit(str(pipe), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # A DiT folder is not a VAE folder.
    with pytest.raises(ModelError, match="--vae .*describes a DiTTransformer2DModel; expected AutoencoderKL"):
        M.load_vae(str(pipe / "transformer"))
    # --model given the DiT's own folder and no --vae: the VAE is looked for there; the error said only
    # "describes a DiTTransformer2DModel; expected AutoencoderKL", not what to give
    with pytest.raises(ModelError) as e:
        M.load_vae(str(pipe / "transformer"), flag="--model")
    assert str(e.value).endswith("expected AutoencoderKL (it has no vae/: give the VAE with --vae)"), e.value
    # Without a class name, weights that do not cover the model are refused, not half-loaded.
    cfg_path = pipe / "transformer" / "config.json"
    vae_cfg = json.loads((pipe / "vae" / "config.json").read_text())
    vae_cfg.pop("_class_name")
    cfg_path.write_text(json.dumps(vae_cfg))
    with pytest.raises(ModelError, match=r"--vae .*do not fit AutoencoderKL \(\d+ tensors missing"):
        M.load_vae(str(pipe / "transformer"))


def test_load_from_hf_cache_layout(tmp_path, tiny_dit, tiny_vae):
    """A repo id resolves from the local Hugging Face cache only (no network)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-dit"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    M.save_pretrained_folder(tiny_dit, str(snap / "transformer"))
    M.save_pretrained_folder(tiny_vae, str(snap / "vae"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    assert _same_weights(M.load_dit("org/tiny-dit", cache_dir=str(cache)), tiny_dit)
    assert _same_weights(M.load_vae("org/tiny-dit", cache_dir=str(cache)), tiny_vae)


def test_pickled_weights_load_without_diffusers_fallback_lines(tmp_path, tiny_dit, tiny_vae):
    """A folder with .bin weights alone (older exports) loads, without diffusers' two warnings that it found
    no .safetensors and falls back to pickle (on every load, on the user's terminal)."""
    tiny_dit.save_pretrained(str(tmp_path / "m" / "transformer"), safe_serialization=False)
    tiny_vae.save_pretrained(str(tmp_path / "m" / "vae"), safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "m" / "vae")) == ["config.json", "diffusion_pytorch_model.bin"]
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    lib = logging.getLogger("diffusers")     # diffusers' own handler writes to stderr and does not propagate
    lib.addHandler(handler)
    try:
        assert _same_weights(M.load_dit(str(tmp_path / "m")), tiny_dit)
        assert _same_weights(M.load_vae(str(tmp_path / "m")), tiny_vae)
    finally:
        lib.removeHandler(handler)
    assert not seen, seen


def test_fp16_variant_only_folder_loads(tmp_path, tiny_dit, tiny_vae, caplog):
    """A folder (or HF cache) holding only ``diffusion_pytorch_model.fp16.safetensors``, as
    ``from_pretrained(..., variant="fp16")`` leaves it, loads: diffusers finds nothing unless the variant is named."""
    tiny_dit.save_pretrained(str(tmp_path / "m" / "transformer"), variant="fp16")
    tiny_vae.save_pretrained(str(tmp_path / "m" / "vae"), variant="fp16")
    assert sorted(os.listdir(tmp_path / "m" / "vae")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert M.weights_variant(str(tmp_path / "m" / "vae")) == "fp16"
    assert _same_weights(M.load_dit(str(tmp_path / "m")), tiny_dit)
    assert _same_weights(M.load_vae(str(tmp_path / "m")), tiny_vae)
    tiny_vae.save_pretrained(str(tmp_path / "m" / "vae"), variant="ema")    # of two variants fp16 loads, said
    with caplog.at_level(logging.INFO, logger="manifoldgd_fast.models"):
        assert M.weights_variant(str(tmp_path / "m" / "vae")) == "fp16"
    assert "loading the fp16 variant (it also holds ema)" in caplog.text
    os.remove(tmp_path / "m" / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    assert M.weights_variant(str(tmp_path / "m" / "vae")) == "ema"
    tiny_vae.save_pretrained(str(tmp_path / "m" / "vae"))                   # plain weights beside it win
    assert M.weights_variant(str(tmp_path / "m" / "vae")) is None


def test_unknown_model_is_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"^--model org/no-such-dit: no DiT found \(not a local folder, not in the "
                                         rf"Hugging Face cache\); looked in {re.escape(str(tmp_path))}\. .*"
                                         r"`hf download org/no-such-dit`"):
        M.load_dit("org/no-such-dit", cache_dir=str(tmp_path))
    with pytest.raises(ModelError, match="^--vae"):
        M.load_vae(str(tmp_path / "missing-folder"), cache_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither config.json nor transformer/config.json"):
        M.load_dit(str(tmp_path / "empty"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "wrong_shape"])
def test_damaged_weights_name_the_file(tmp_path, tiny_dit, damage):
    folder = M.save_pretrained_folder(tiny_dit, str(tmp_path / "dit"))
    wpath = os.path.join(folder, WEIGHTS)
    blob = open(wpath, "rb").read()
    if damage == "truncate":
        open(wpath, "wb").write(blob[: len(blob) // 2])
    elif damage == "garbage":
        open(wpath, "wb").write(b"\x00" * 64 + os.urandom(256))
    elif damage == "missing":
        os.remove(wpath)
    else:  # weights of another architecture under a valid header
        cfg = json.load(open(os.path.join(folder, "config.json")))
        cfg["num_embeds_ada_norm"] = 7
        json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ModelError) as ei:
        M.load_dit(folder)
    msg = str(ei.value)
    assert msg.startswith("--model ") and "\n" not in msg
    if damage == "missing":
        assert "no weights" in msg
    elif damage == "wrong_shape":
        assert folder in msg
    else:  # (the test's own folder name holds "damaged": the whole phrase is checked)
        assert f"weight file {wpath} is damaged (" in msg, msg


def test_hub_style_transformer2d_config_loads(tmp_path, tiny_dit):
    """facebook/DiT-XL-2-256 ships a Transformer2DModel config; it must load as a DiT."""
    folder = M.save_pretrained_folder(tiny_dit, str(tmp_path / "dit"))
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update({"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
                "cross_attention_dim": None, "num_vector_embeds": None,
                "only_cross_attention": False, "use_linear_projection": False})
    json.dump(cfg, open(cfg_path, "w"))
    dit = M.load_dit(folder)
    assert type(dit).__name__ == "DiTTransformer2DModel" and _same_weights(dit, tiny_dit)
