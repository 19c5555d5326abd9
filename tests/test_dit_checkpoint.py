"""Original DiT .pt checkpoints (facebookresearch/DiT layout) load as the diffusers DiT they were converted to."""
import pytest
import torch

from manifoldgd_fast.dit_checkpoint import dit_config_from_state_dict, load_dit_checkpoint
from manifoldgd_fast.errors import ModelError
from manifoldgd_fast.fastdit import tie_conditioning_embedders
from manifoldgd_fast.models import build_dit, tiny_dit_config


def original_state_dict(dit):
    """A diffusers DiT written back in the original repository's names, as its models.py defines them:
    one t/y embedder, attn.qkv = [q; k; v], mlp.fc1/fc2, adaLN_modulation.1, final_layer."""
    d = dit.state_dict()
    b0 = "transformer_blocks.0.norm1.emb."
    sd = {"x_embedder.proj.weight": d["pos_embed.proj.weight"], "x_embedder.proj.bias": d["pos_embed.proj.bias"],
          "pos_embed": dit.pos_embed.pos_embed.clone(),
          "t_embedder.mlp.0.weight": d[b0 + "timestep_embedder.linear_1.weight"],
          "t_embedder.mlp.0.bias": d[b0 + "timestep_embedder.linear_1.bias"],
          "t_embedder.mlp.2.weight": d[b0 + "timestep_embedder.linear_2.weight"],
          "t_embedder.mlp.2.bias": d[b0 + "timestep_embedder.linear_2.bias"],
          "y_embedder.embedding_table.weight": d[b0 + "class_embedder.embedding_table.weight"],
          "final_layer.adaLN_modulation.1.weight": d["proj_out_1.weight"],
          "final_layer.adaLN_modulation.1.bias": d["proj_out_1.bias"],
          "final_layer.linear.weight": d["proj_out_2.weight"], "final_layer.linear.bias": d["proj_out_2.bias"]}
    for i in range(len(dit.transformer_blocks)):
        t = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([d[f"{t}attn1.to_{c}.{kind}"] for c in "qkv"])
            sd[f"blocks.{i}.attn.proj.{kind}"] = d[f"{t}attn1.to_out.0.{kind}"]
            sd[f"blocks.{i}.mlp.fc1.{kind}"] = d[f"{t}ff.net.0.proj.{kind}"]
            sd[f"blocks.{i}.mlp.fc2.{kind}"] = d[f"{t}ff.net.2.{kind}"]
            sd[f"blocks.{i}.adaLN_modulation.1.{kind}"] = d[f"{t}norm1.linear.{kind}"]
    return {k: v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=3, sample_size=16, patch_size=4)])
@pytest.mark.parametrize("ema", [False, True])
def test_original_checkpoint_loads_as_the_same_dit(tmp_path, cfg, ema):
    dit = tie_conditioning_embedders(build_dit(tiny_dit_config(num_classes=10, **cfg), seed=5))
    sd = original_state_dict(dit)
    path = tmp_path / "DiT-tiny.pt"
    torch.save({"ema": sd, "opt": {}} if ema else sd, path)
    heads = dit.config.num_attention_heads
    got = load_dit_checkpoint(str(path), heads=heads)
    for k, v in dit.config.items():
        if not k.startswith("_") and k in dit_config_from_state_dict(sd, heads):
            assert got.config[k] == v, k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dit.config.sample_size, dit.config.sample_size, generator=g)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        torch.testing.assert_close(got(x, timestep=t, class_labels=y).sample, dit(x, timestep=t, class_labels=y).sample,
                                   atol=0, rtol=0)


def test_xl2_shapes_give_the_xl2_config():
    from manifoldgd_fast.models import dit_xl2_config

    with torch.device("meta"):
        dit = build_dit(dit_xl2_config(), seed=None)
    cfg = dit_config_from_state_dict(original_state_dict_shapes(dit))
    want = dit_xl2_config()
    assert {k: cfg[k] for k in want} == want


def original_state_dict_shapes(dit):
    """The shapes an original checkpoint of ``dit``'s architecture has, as meta tensors."""
    C = dit.config.num_attention_heads * dit.config.attention_head_dim
    p, cin = dit.config.patch_size, dit.config.in_channels
    n = (dit.config.sample_size // p) ** 2
    e = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    sd = {"x_embedder.proj.weight": e(C, cin, p, p), "pos_embed": e(1, n, C),
          "final_layer.linear.weight": e(p * p * dit.config.out_channels, C),
          "y_embedder.embedding_table.weight": e(dit.config.num_embeds_ada_norm + 1, C)}
    for i in range(dit.config.num_layers):
        sd[f"blocks.{i}.attn.qkv.weight"] = e(3 * C, C)
    return sd


def test_bad_checkpoints_one_line(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="not a readable DiT checkpoint"):
        load_dit_checkpoint(str(bad))
    # torch's weights-only refusal is a page of advice: the line keeps only its reason
    torch.save({"x": ModelError("a Python object")}, tmp_path / "obj.pt")
    bad.write_bytes(b"")
    for path, why in [(tmp_path / "obj.pt", "not a file of tensors only: Unsupported global"),
                      (bad, "the file ends too soon: empty or cut short")]:
        with pytest.raises(ModelError) as e:
            load_dit_checkpoint(str(path))
        msg = str(e.value)
        assert msg.startswith(f"--model {path}: not a readable DiT checkpoint ({why}") and "\n" not in msg, msg
        assert len(msg) < 200 + len(str(path)), msg
    torch.save({"weight": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(ModelError, match="not an original DiT state dict"):
        load_dit_checkpoint(str(tmp_path / "y.pt"))
    dit = build_dit(tiny_dit_config(num_classes=10), seed=0)          # width 16: not a DiT-S/B/L/XL
    torch.save(original_state_dict(tie_conditioning_embedders(dit)), tmp_path / "z.pt")
    with pytest.raises(ModelError, match="number of attention heads"):
        load_dit_checkpoint(str(tmp_path / "z.pt"))


def test_distill_from_an_original_checkpoint(tiny_world, tmp_path, capsys, monkeypatch):
    """--model DiT.pt (+ --vae) distils to the same bytes as the diffusers folder it came from."""
    import os

    from diffusers import DiTTransformer2DModel
    from test_pipeline import _args, _digest

    from manifoldgd_fast.cli import main
    from manifoldgd_fast.dit_checkpoint import DIT_HEADS

    from manifoldgd_fast.models import save_pretrained_folder

    # the original format has one conditioning embedder: a diffusers folder of the same (tied) DiT
    src = tie_conditioning_embedders(
        DiTTransformer2DModel.from_pretrained(os.path.join(tiny_world["model"], "transformer")))
    save_pretrained_folder(src, str(tmp_path / "tied"))
    heads = src.config.num_attention_heads
    monkeypatch.setitem(DIT_HEADS, heads * src.config.attention_head_dim, heads)  # the tiny width as a family member
    ckpt = tmp_path / "DiT-tiny.pt"
    torch.save(original_state_dict(src), ckpt)
    vae = os.path.join(tiny_world["model"], "vae")

    def args(out, model):
        a = _args(tiny_world, out)
        a[a.index("--model") + 1] = model
        return a

    assert main(args(tmp_path / "b", str(ckpt))) == 2 and "--vae is required" in capsys.readouterr().err
    # a .pt checkpoint runs the original timestep features (auto); the folder does so when asked
    assert main([*args(tmp_path / "a", str(tmp_path / "tied")), "--vae", vae, "--time-embedding", "original"]) == 0
    assert main([*args(tmp_path / "b", str(ckpt)), "--vae", vae]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    import json
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["dit_time_embedding"] == "original"


def _release_timestep_embedding(t, dim=256, max_period=10000):
    """facebookresearch/DiT's TimestepEmbedder.timestep_embedding, which the ManifoldGD release runs, written out."""
    import math

    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_time_embedding_original_is_the_releases_and_auto_picks_it_for_original_weights(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from manifoldgd_fast.dit_checkpoint import DIT_HEADS

    from manifoldgd_fast.fastdit import FusedDiT
    from manifoldgd_fast.models import load_dit, save_pretrained_folder, set_time_embedding, time_embedding_for

    dit = build_dit(tiny_dit_config(num_classes=10), seed=5)
    t = torch.tensor([1, 500, 999])
    proj = dit.transformer_blocks[0].norm1.emb.time_proj
    want = _release_timestep_embedding(t)
    assert (proj(t) - want).abs().max() > 0.1        # diffusers' own DiT divides by 127: not the release's
    set_time_embedding(dit, "original")
    assert dit.time_embedding == "original"
    for blk in dit.transformer_blocks:
        torch.testing.assert_close(blk.norm1.emb.time_proj(t), want, atol=1e-6, rtol=0)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 7, 10])
    with torch.no_grad():                             # the fused DiT runs the blocks' own embedders: the same features
        torch.testing.assert_close(FusedDiT(dit)(x, t, y).sample, dit(x, timestep=t, class_labels=y).sample,
                                   atol=1e-5, rtol=1e-5)
    assert FusedDiT(dit).time_embedding == "original"

    # auto: original for a .pt checkpoint and for the architecture facebookresearch released (DiT-XL/2, 1,000 classes)
    path = tmp_path / "DiT-tiny.pt"
    tied = tie_conditioning_embedders(build_dit(tiny_dit_config(num_classes=10), seed=5))
    heads = tied.config.num_attention_heads
    monkeypatch.setitem(DIT_HEADS, heads * tied.config.attention_head_dim, heads)  # the tiny width as a family member
    torch.save(original_state_dict(tied), path)
    assert load_dit(str(path)).time_embedding == "original"
    assert load_dit(str(path), time_embedding="diffusers").time_embedding == "diffusers"
    folder = tmp_path / "tiny"
    save_pretrained_folder(build_dit(tiny_dit_config(num_classes=10), seed=5), str(folder))
    assert load_dit(str(folder)).time_embedding == "diffusers"
    (folder / "finetune.json").write_text('{"time_embedding": "original"}')   # a fine-tune of original weights
    assert load_dit(str(folder)).time_embedding == "original"
    xl2 = SimpleNamespace(config=SimpleNamespace(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                                 patch_size=2, num_embeds_ada_norm=1000))
    assert time_embedding_for(xl2, "/models/anything") == "original"
    xl2.config.num_embeds_ada_norm = 10
    assert time_embedding_for(xl2, "/models/anything") == "diffusers"
