"""The original DiT checkpoints (facebookresearch/DiT ``DiT-XL-2-256x256.pt``) as diffusers DiTs.

The ManifoldGD and MGD³ releases load DiT through the original repository's
``.pt`` state dicts. :func:`load_dit_checkpoint` reads such a file (tensors
only: ``torch.load(weights_only=True)``) and maps it onto a
``DiTTransformer2DModel``, the same renaming diffusers'
``scripts/convert_dit_to_diffusers.py`` does:

* ``x_embedder.proj`` -> ``pos_embed.proj``. The fixed sin-cos ``pos_embed``
  is recomputed by diffusers and checked against the file's copy.
* ``t_embedder.mlp.{0,2}`` and ``y_embedder.embedding_table`` -> every block's
  ``norm1.emb``. The original model has one embedder; diffusers keeps a copy
  per block.
* ``blocks.i.adaLN_modulation.1`` -> ``transformer_blocks.i.norm1.linear``.
* ``blocks.i.attn.qkv`` -> ``attn1.to_q / to_k / to_v``, split in that order.
* ``blocks.i.attn.proj`` -> ``attn1.to_out.0``.
* ``blocks.i.mlp.fc{1,2}`` -> ``ff.net.{0.proj,2}``.
* ``final_layer.adaLN_modulation.1`` -> ``proj_out_1``.
* ``final_layer.linear`` -> ``proj_out_2``.

The architecture comes from the tensors' shapes: width, depth, patch size,
latent size (from ``pos_embed``), classes, and learned sigma. The tensors do
not show the number of heads, so it comes from the DiT family's width:
S 6, B 12, L 16, XL 16 × 72.
"""
from __future__ import annotations

import os
import re

import torch

from .errors import ModelError


def is_dit_checkpoint(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith((".pt", ".pth")) and os.path.isfile(path)


def _load_error(e: Exception) -> str:
    """torch.load's reason in a few words: its weights-only refusal is a page of advice around one line."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # random bytes, or Python objects besides tensors
        why = next((ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()), "")
        return "not a file of tensors only: " + why.split(". ")[0][:120]
    if isinstance(e, EOFError):
        return "the file ends too soon: empty or cut short"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:160]}"


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    import argparse
    import contextlib

    # DiT's train.py saves {"model", "ema", "opt", "args"}, its args an argparse.Namespace: allowed, nothing else
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than tensors
        raise ModelError(f"--model {path}: not a readable DiT checkpoint ({_load_error(e)})") from None
    if isinstance(sd, dict) and "ema" in sd and isinstance(sd["ema"], dict):  # a training checkpoint
        sd = sd["ema"]
    if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
        raise ModelError(f"--model {path}: not an original DiT state dict (no x_embedder.proj.weight)")
    odd = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise ModelError(f"--model {path}: not an original DiT state dict ({odd!r} is a {type(sd[odd]).__name__}, "
                         "not a tensor)")
    return sd


# every LayerNorm of the original DiT (diffusers' DiT gives norm3 its norm_eps, 1e-5 by default)
DIT_LAYERNORM_EPS = 1e-6

# heads of the original DiT family by width (DiT-S, -B, -L, -XL): the tensors do not show them
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def dit_config_from_state_dict(sd: dict[str, torch.Tensor], heads: int | None = None) -> dict:
    """diffusers ``DiTTransformer2DModel`` config of an original DiT state dict (``heads``: for widths
    outside the DiT family)."""
    need = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight")
    lacking = [k for k in need if k not in sd]
    if lacking:
        raise ModelError(f"not an original DiT state dict (no {', '.join(lacking)})")
    w = sd["x_embedder.proj.weight"]                       # (hidden, in_channels, p, p)
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise ModelError(f"x_embedder.proj.weight is {tuple(w.shape)}, not a square patch embedding "
                         "(hidden, channels, p, p)")
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ModelError("not an original DiT state dict (no blocks.<i>. tensors)")
    depth = 1 + max(blocks)
    if "pos_embed" not in sd:
        raise ModelError("the DiT checkpoint has no pos_embed: its latent size is unknown")
    pos = sd["pos_embed"]                                  # (1, tokens, hidden)
    side = int(round(pos.shape[1] ** 0.5)) if pos.dim() == 3 else 0
    if pos.dim() != 3 or side * side != pos.shape[1]:
        raise ModelError(f"pos_embed is {tuple(pos.shape)}, not (1, side * side tokens, hidden)")
    heads = heads or DIT_HEADS.get(hidden)
    if heads is None or hidden % heads:
        raise ModelError(f"a width-{hidden} DiT is not one of DiT-S/B/L/XL ({sorted(DIT_HEADS)}): "
                         f"its number of attention heads cannot be told from the checkpoint")
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    # + the CFG null row, which DiT adds when it trains with label dropout (all its released weights)
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_ch,
                out_channels=out_ch, num_layers=depth, sample_size=side * p, patch_size=p,
                num_embeds_ada_norm=num_classes, activation_fn="gelu-approximate", norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=DIT_LAYERNORM_EPS, attention_bias=True, dropout=0.0)


def original_keys(depth: int) -> set[str]:
    """The names of an original DiT state dict of ``depth`` blocks (its LayerNorms have no weights)."""
    keys = {"pos_embed", "y_embedder.embedding_table.weight"}
    for kind in ("weight", "bias"):
        keys |= {f"x_embedder.proj.{kind}", f"t_embedder.mlp.0.{kind}", f"t_embedder.mlp.2.{kind}",
                 f"final_layer.adaLN_modulation.1.{kind}", f"final_layer.linear.{kind}"}
        keys |= {f"blocks.{i}.{m}.{kind}" for i in range(depth)
                 for m in ("adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    return keys


def convert_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Original DiT names -> diffusers ``DiTTransformer2DModel`` names (see the module docstring)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = t + "norm1.emb."
        for j, lin in ((0, "linear_1"), (2, "linear_2")):
            out[f"{emb}timestep_embedder.{lin}.weight"] = sd[f"t_embedder.mlp.{j}.weight"]
            out[f"{emb}timestep_embedder.{lin}.bias"] = sd[f"t_embedder.mlp.{j}.bias"]
        out[f"{emb}class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        out[t + "norm1.linear.weight"] = sd[b + "adaLN_modulation.1.weight"]
        out[t + "norm1.linear.bias"] = sd[b + "adaLN_modulation.1.bias"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{t}attn1.to_q.{kind}"], out[f"{t}attn1.to_k.{kind}"], out[f"{t}attn1.to_v.{kind}"] = q, k, v
            out[f"{t}attn1.to_out.0.{kind}"] = sd[f"{b}attn.proj.{kind}"]
            out[f"{t}ff.net.0.proj.{kind}"] = sd[f"{b}mlp.fc1.{kind}"]
            out[f"{t}ff.net.2.{kind}"] = sd[f"{b}mlp.fc2.{kind}"]
    # Each tensor its own copy: every block's embedders are the same tensors, q / k / v views of one,
    # and load_state_dict(assign=True) would keep them sharing memory (on the CPU at the file's dtype,
    # where .to() copies nothing): one optimiser step would then move a shared embedder once per block,
    # and saving the model fails (safetensors refuses tensors that share memory).
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load_dit_checkpoint(path: str, *, device="cpu", dtype: torch.dtype = torch.float32, heads: int | None = None):
    """A diffusers DiT (eval mode) from an original DiT ``.pt`` checkpoint. Raises ModelError naming the file."""
    from diffusers import DiTTransformer2DModel

    sd = _state_dict(str(path))
    try:
        cfg = dit_config_from_state_dict(sd, heads)
    except ModelError as e:
        raise ModelError(f"--model {path}: {e}") from None
    with torch.device("meta"):
        model = DiTTransformer2DModel(**cfg)
    expected = original_keys(cfg["num_layers"])
    absent, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if absent or extra:  # e.g. a DiT variant with q/k norms: its extra tensors would be dropped silently
        why = [f"{word} {_few(names)}" for word, names in (("missing", absent), ("unexpected", extra)) if names]
        raise ModelError(f"--model {path}: keys do not fit an original DiT ({'; '.join(why)})")
    try:
        missing = model.load_state_dict(convert_state_dict(sd, cfg["num_layers"]), strict=False, assign=True)
    except RuntimeError as e:  # a tensor of the wrong shape: torch's line that names it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0] if lines else type(e).__name__)
        raise ModelError(f"--model {path}: does not fit a DiT ({why[:300]})") from None
    # pos_embed is a fixed sin-cos buffer diffusers computes itself: it is all that may be missing
    left = [k for k in missing.missing_keys if not k.startswith("pos_embed.pos_embed")]
    if left or missing.unexpected_keys:
        raise ModelError(f"--model {path}: keys do not fit a DiT (missing {left[:3]}, "
                         f"unexpected {missing.unexpected_keys[:3]})")
    from diffusers.models.embeddings import PatchEmbed

    # the fixed sin-cos buffer, built as DiTTransformer2DModel builds it (a small module on the CPU)
    pe = PatchEmbed(height=cfg["sample_size"], width=cfg["sample_size"], patch_size=cfg["patch_size"],
                    in_channels=cfg["in_channels"], embed_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"])
    model.pos_embed.register_buffer("pos_embed", pe.pos_embed, persistent=False)
    stored = sd["pos_embed"]  # values in [-1, 1]: a 16-bit file holds them to its own rounding
    atol = max(1e-5, 2 * torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 1e-5
    if not torch.allclose(stored.float(), pe.pos_embed.float(), atol=atol):
        raise ModelError(f"--model {path}: its pos_embed is not DiT's fixed sin-cos embedding")
    # nn.Module.to: diffusers' own .to(dtype=) warns about keeping fp32 modules (a DiT has none) on every load
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()
