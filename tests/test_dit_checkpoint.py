"""Original DiT .pt checkpoints (facebookresearch/DiT layout) load as the diffusers DiT they were converted to."""
import pytest
import torch
import torch.nn.functional as F

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
    # DiT's LayerNorms all have eps 1e-6; a diffusers DiT gives its norm3 the config's norm_eps
    dit = tie_conditioning_embedders(build_dit({**tiny_dit_config(num_classes=10, **cfg), "norm_eps": 1e-6}, seed=5))
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


def original_dit_forward(sd, x, t, y, heads):
    """facebookresearch/DiT's ``DiT.forward`` (models.py) on an original state dict, written out:
    patchify + pos_embed, c = t_embedder(t) + y_embedder(y), adaLN-Zero blocks (LayerNorm eps 1e-6,
    timm attention, tanh GELU), the final layer, unpatchify."""
    w = sd["x_embedder.proj.weight"]
    C, p = w.shape[0], w.shape[2]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    B, N, _ = h.shape
    temb = _release_timestep_embedding(t)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(temb + sd["y_embedder.embedding_table.weight"][y])  # (B, C), SiLU'd as adaLN_modulation's input

    def modulated(v, shift, scale):
        return F.layer_norm(v, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def lin(v, name):
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = lin(c, b + "adaLN_modulation.1").chunk(6, dim=1)
        qkv = lin(modulated(h, s_msa, c_msa), b + "attn.qkv")                     # (B, N, 3C)
        q, k, v = qkv.view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)   # each (B, heads, N, Dh)
        a = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v  # (B, heads, N, Dh)
        h = h + g_msa[:, None] * lin(a.transpose(1, 2).reshape(B, N, C), b + "attn.proj")
        m = F.gelu(lin(modulated(h, s_mlp, c_mlp), b + "mlp.fc1"), approximate="tanh")
        h = h + g_mlp[:, None] * lin(m, b + "mlp.fc2")
    shift, scale = lin(c, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(modulated(h, shift, scale), "final_layer.linear")  # (B, N, p * p * C_out)
    side, c_out = int(N ** 0.5), out.shape[-1] // (p * p)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, side, side, p, p, c_out))
    return out.reshape(B, c_out, side * p, side * p)


@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=3, sample_size=16, patch_size=4)])
def test_original_checkpoint_runs_as_the_original_dit(tmp_path, cfg):
    """What loads from a .pt (and the fused DiT around it) computes DiT's own forward on its tensors:
    the renaming, the q/k/v split, the timestep features and the LayerNorm eps of the original."""
    from manifoldgd_fast.fastdit import FusedDiT
    from manifoldgd_fast.models import set_time_embedding

    sd = original_state_dict(tie_conditioning_embedders(build_dit(tiny_dit_config(num_classes=10, **cfg), seed=3)))
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in sd.items() if k != "pos_embed"} | {
        "pos_embed": sd["pos_embed"]}  # random weights everywhere: adaLN-Zero's zero init would hide the blocks
    path = tmp_path / "DiT.pt"
    torch.save(sd, path)
    heads = tiny_dit_config(**cfg)["num_attention_heads"]
    got = load_dit_checkpoint(str(path), heads=heads)
    set_time_embedding(got, "original")  # what load_dit's auto picks for a .pt
    assert all(blk.norm3.eps == 1e-6 for blk in got.transformer_blocks)
    side = got.config.sample_size
    x = torch.randn(4, 4, side, side, generator=g)
    t, y = torch.tensor([0, 1, 500, 999]), torch.tensor([0, 3, 9, 10])  # 10: the CFG null class
    with torch.no_grad():
        want = original_dit_forward(sd, x, t, y, heads)
        for model in (got, FusedDiT(got)):
            torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, want, atol=1e-4, rtol=1e-5)


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


@pytest.fixture
def tiny_original(monkeypatch):
    """An original-format state dict of a tiny tied DiT (width 16, registered as a 2-head family member)."""
    from manifoldgd_fast.dit_checkpoint import DIT_HEADS

    monkeypatch.setitem(DIT_HEADS, 16, 2)
    return original_state_dict(tie_conditioning_embedders(build_dit(tiny_dit_config(num_classes=10), seed=0)))


def test_checkpoint_files_that_do_not_fit_one_line(tmp_path, tiny_original, capsys):
    """Each fault names the file and the tensor: keys missing or left over (a DiT variant's extra tensors
    are never dropped silently), a tensor of the wrong shape; no traceback and no diffusers warning."""
    import logging

    good = tiny_original
    cases = [({k: v for k, v in good.items() if k != "final_layer.linear.weight"},
              "not an original DiT state dict (no final_layer.linear.weight)"),
             ({k: v for k, v in good.items() if k != "y_embedder.embedding_table.weight"},
              "not an original DiT state dict (no y_embedder.embedding_table.weight)"),
             ({k: v for k, v in good.items() if k != "blocks.1.mlp.fc1.bias"},
              "keys do not fit an original DiT (missing blocks.1.mlp.fc1.bias)"),
             ({**good, "blocks.0.attn.q_norm.weight": torch.ones(8)},
              "keys do not fit an original DiT (unexpected blocks.0.attn.q_norm.weight)"),
             ({**good, "blocks.1.mlp.fc1.weight": torch.zeros(3, 16)},
              "does not fit a DiT (size mismatch for transformer_blocks.1.ff.net.0.proj.weight: "
              "copying a param with shape torch.Size([3, 16])"),
             # (these gave tracebacks: max() of nothing, int('norm'), allclose of shapes, an IndexError, .contiguous)
             ({k: v for k, v in good.items() if not k.startswith("blocks.")},
              "not an original DiT state dict (no blocks.<i>. tensors)"),
             ({**good, "blocks.norm.weight": torch.ones(16)},
              "keys do not fit an original DiT (unexpected blocks.norm.weight)"),
             ({**good, "pos_embed": good["pos_embed"][:, :15]}, "pos_embed is (1, 15, 16), not (1, side * side tokens"),
             ({**good, "pos_embed": good["pos_embed"][0]}, "pos_embed is (16, 16), not (1, side * side tokens"),
             ({**good, "x_embedder.proj.weight": good["x_embedder.proj.weight"].flatten(1)},
              "x_embedder.proj.weight is (16, 16), not a square patch embedding"),
             ({**good, "step": 3}, "not an original DiT state dict ('step' is a int, not a tensor)")]
    for i, (sd, why) in enumerate(cases):
        path = tmp_path / f"bad{i}.pt"
        torch.save(sd, path)
        with pytest.raises(ModelError) as e:
            load_dit_checkpoint(str(path))
        assert str(e.value).startswith(f"--model {path}: {why}") and "\n" not in str(e.value), str(e.value)
    caplog_lines = []
    handler = logging.Handler()
    handler.emit = lambda record: caplog_lines.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        torch.save(good, tmp_path / "good.pt")
        load_dit_checkpoint(str(tmp_path / "good.pt"), dtype=torch.bfloat16)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not caplog_lines and not capsys.readouterr().err


def test_a_loaded_checkpoint_shares_no_memory_between_its_weights(tmp_path, tiny_original):
    """Every block gets its own copy of the (one) t / y embedder and q / k / v are separate tensors: at the
    file's dtype on the CPU they shared memory, so one optimiser step moved a shared embedder once per block,
    and saving the model failed (safetensors refuses shared tensors)."""
    from manifoldgd_fast.models import load_dit, save_pretrained_folder

    torch.save(tiny_original, tmp_path / "tiny.pt")
    m = load_dit(str(tmp_path / "tiny.pt"))
    ptrs = [p.untyped_storage().data_ptr() for p in m.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    w = m.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.weight
    before = w.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(before - w.detach(), torch.ones_like(before))
    save_pretrained_folder(m, str(tmp_path / "saved"))


@pytest.mark.parametrize("width, heads", [(384, 6), (768, 12), (1024, 16), (1152, 16)])
def test_the_dit_familys_heads_follow_from_its_width(width, heads):
    """DiT-S / B / L / XL: 6, 12, 16, 16 heads (models.py); a given --heads overrides the table."""
    e = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    sd = {"x_embedder.proj.weight": e(width, 4, 2, 2), "pos_embed": e(1, 256, width),
          "final_layer.linear.weight": e(32, width), "y_embedder.embedding_table.weight": e(1001, width),
          "blocks.0.attn.qkv.weight": e(3 * width, width)}
    assert dit_config_from_state_dict(sd)["num_attention_heads"] == heads
    assert dit_config_from_state_dict(sd, heads=8)["num_attention_heads"] == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads(tmp_path, tiny_original, dtype):
    """A .pt saved in fp16 / bf16 loads: its pos_embed is DiT's sin-cos to that dtype's rounding."""
    sd = {k: v.to(dtype) for k, v in tiny_original.items()}
    torch.save(sd, tmp_path / "half.pt")
    got = load_dit_checkpoint(str(tmp_path / "half.pt"))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.transformer_blocks[0].attn1.to_q.weight,
                               sd["blocks.0.attn.qkv.weight"][:16].float(), atol=0, rtol=0)
    sd["pos_embed"] = sd["pos_embed"] + 0.05  # not the sin-cos embedding: still refused
    torch.save(sd, tmp_path / "half.pt")
    with pytest.raises(ModelError, match="its pos_embed is not DiT's fixed sin-cos embedding"):
        load_dit_checkpoint(str(tmp_path / "half.pt"))


@pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"),
                    reason="torch.serialization.safe_globals (torch >= 2.5) lets weights-only torch.load take "
                           "train.py's argparse.Namespace")
def test_dit_training_checkpoint_with_its_args_loads(tmp_path, tiny_original):
    """DiT's train.py saves {"model", "ema", "opt", "args"} with args an argparse.Namespace: its EMA loads."""
    import argparse

    sd = tiny_original
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, global_seed=0)
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": args},
               tmp_path / "0400000.pt")
    got = load_dit_checkpoint(str(tmp_path / "0400000.pt"))
    assert torch.equal(got.proj_out_2.weight, sd["final_layer.linear.weight"])  # the EMA weights, not "model"


def test_missing_checkpoint_file_is_no_such_file(tmp_path):
    from manifoldgd_fast.models import load_dit

    for arg in ("pretrained_models/DiT-XL-2-256x256.pt", str(tmp_path / "DiT-XL-2-512x512.pt")):
        with pytest.raises(ModelError) as e:
            load_dit(arg, cache_dir=str(tmp_path))
        assert str(e.value) == f"--model {arg}: no such file"


def test_a_checkpoint_named_in_capitals_loads(tmp_path, tiny_original):
    """DiT-XL-2-256x256.PT (a Windows copy, an upper-case download) is a checkpoint as .pt is (it was refused as
    'not a DiT checkpoint (.pt / .pth)')."""
    from manifoldgd_fast.models import check_model_source, load_dit

    torch.save(tiny_original, tmp_path / "DiT-tiny.PT")
    check_model_source(str(tmp_path / "DiT-tiny.PT"))
    assert load_dit(str(tmp_path / "DiT-tiny.PT")).config.num_layers == 2


def test_fused_dit_refuses_a_dit_without_attention_biases():
    from manifoldgd_fast.fastdit import FusedDiT

    with pytest.raises(ModelError, match="--dit-impl fused takes DiTs with attention biases"):
        FusedDiT(build_dit({**tiny_dit_config(), "attention_bias": False}))


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
