"""DiT-XL/2's forward with its small ops fused: what the profile shows outside the big matmuls.

:class:`FusedDiT` wraps a diffusers ``DiTTransformer2DModel`` (``norm_type="ada_norm_zero"``)
and computes the same function with fewer, larger kernels:

* **Conditioning once per step.** The diffusers conversion copies DiT's one
  timestep + class embedder into every block (``norm1.emb``). When all copies are
  equal (checked once, at wrap time), the embedding is computed once per forward
  instead of 28 times. All 28 blocks' adaLN projections (C -> 6C each) then run as
  one (C -> 28 x 6C) matmul.
* **Fused QKV.** One (C -> 3C) matmul per block instead of three.
* **LayerNorm + modulate** and **gate + residual** in one pass each
  (:func:`dit_ops.layernorm_modulate`, :func:`dit_ops.gate_residual`: Triton on
  CUDA, their PyTorch twins elsewhere).
* **Attention** through ``scaled_dot_product_attention`` (the SDPA backend is the
  caller's choice: ``Sampling.attention``), or (``attention="triton"``) our kernel
  :func:`dit_ops.attention`: head dim 72 without padding to 128, q / k / v read in place
  from the QKV matmul's output, the output written token-major (no transpose copy).

The weights are not copied. The blocks' q/k/v and adaLN parameters are re-pointed
into the fused tensors, values unchanged, so the wrapped model still runs
as before and the memory stays one copy. Numerics: the same maths in another
order (fused matmuls block differently), equal to the diffusers forward to
float rounding; ``tests/test_fastdit.py`` states the tolerances. A bf16 / fp16 model run without autocast
rounds at other places than diffusers' (6e-3 of max |out| apart in bf16 on a 4-layer toy, each as far
from float64); the pipeline runs low precision under autocast with float32 weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ModelError


def _same(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


def _fuse_linears(linears: list[nn.Linear]) -> tuple[nn.Parameter, nn.Parameter]:
    """Concatenate the linears' weights (out dim) and biases into new parameters, and re-point
    each linear's weight and bias at its slice of them (views: one copy of the values)."""
    w = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
    b = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(w.data[start:start + n], requires_grad=False)
        lin.bias = nn.Parameter(b.data[start:start + n], requires_grad=False)
        start += n
    return w, b


def tie_conditioning_embedders(dit):
    """Make every block's conditioning embedder a copy of block 0's, as in the converted DiT
    checkpoints (facebook/DiT-XL-2-256): random-init models for tests and benchmarks. Returns dit."""
    src = dit.transformer_blocks[0].norm1.emb.state_dict()
    for b in dit.transformer_blocks[1:]:
        b.norm1.emb.load_state_dict(src)
    return dit


def _per_sample(name: str, t, B: int) -> torch.Tensor:
    """``t`` as (B,): one value for the whole batch (shape (1,)) broadcast, as diffusers' DiT does."""
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.shape[0] not in (1, B):
        raise ConfigError(f"{name} must be (B,) = ({B},) or (1,), got shape {tuple(t.shape)}")
    return t.expand(B) if t.shape[0] != B else t


class FusedDiT(nn.Module):
    """``model(x, timestep=t, class_labels=y).sample`` of a DiT, with fused small ops.

    Args:
        dit: a ``DiTTransformer2DModel`` with ``norm_type="ada_norm_zero"`` (DiT-XL/2 and the
            shipped digits model), in eval mode. Its parameters are re-pointed (see module doc).
        backend: "auto" | "triton" | "reference" for the LayerNorm-modulate and gate-residual ops.
        attention: "sdpa" (PyTorch's, backend chosen by the caller's ``sdpa_kernel`` context) or
            "triton" (:func:`dit_ops.attention` with the Triton kernel; raises on inputs it cannot take).
    """

    def __init__(self, dit, backend: str = "auto", attention: str = "sdpa"):
        super().__init__()
        cfg = dit.config
        if getattr(cfg, "norm_type", None) != "ada_norm_zero":
            raise ModelError(f"--dit-impl fused needs a class-conditional DiT (norm_type ada_norm_zero), "
                             f"got norm_type {getattr(cfg, 'norm_type', None)!r}")
        if getattr(cfg, "norm_elementwise_affine", False):  # the fused LayerNorm-modulate has no affine of its own
            raise ModelError("--dit-impl fused takes DiTs without LayerNorm affine weights "
                             "(norm_elementwise_affine false, as DiT's); use --dit-impl diffusers")
        if not getattr(cfg, "attention_bias", True):  # the fused q/k/v projection carries their biases
            raise ModelError("--dit-impl fused takes DiTs with attention biases (attention_bias true, as DiT's); "
                             "use --dit-impl diffusers")
        if attention not in ("sdpa", "triton"):
            raise ModelError(f"FusedDiT attention must be 'sdpa' or 'triton', got {attention!r}")
        if attention == "triton":
            from .dit_ops import device_reason

            why = device_reason(next(dit.parameters()).device)
            if why is not None:
                raise ConfigError(f"--attention triton: {why}")
        self.dit = dit
        self.backend = backend
        self.attention = attention
        blocks = list(dit.transformer_blocks)
        self.heads = blocks[0].attn1.heads
        self.shared_emb = all(_same(b.norm1.emb, blocks[0].norm1.emb) for b in blocks[1:])
        with torch.no_grad():
            self.qkv = nn.ParameterList()
            for b in blocks:
                self.qkv.extend(_fuse_linears([b.attn1.to_q, b.attn1.to_k, b.attn1.to_v]))
            if self.shared_emb:
                self.ada_w, self.ada_b = _fuse_linears([b.norm1.linear for b in blocks])

    @property
    def time_embedding(self) -> str:
        """The wrapped DiT's timestep features (models.set_time_embedding): the blocks' own embedders run them."""
        return getattr(self.dit, "time_embedding", "diffusers")

    @property
    def config(self):
        return self.dit.config

    def _mods(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, L, 6, C) adaLN shift/scale/gate of every block from the shared conditioning (B, C)."""
        L, C = len(self.dit.transformer_blocks), emb.shape[1]
        return F.linear(F.silu(emb), self.ada_w, self.ada_b).view(emb.shape[0], L, 6, C)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        from .dit_ops import attention, gate_residual, layernorm_modulate

        d, be = self.dit, self.backend
        blocks = d.transformer_blocks
        p = d.config.patch_size
        h = d.pos_embed(hidden_states)                                      # (B, N, C)
        B, N, C = h.shape
        timestep, class_labels = _per_sample("timestep", timestep, B), _per_sample("class_labels", class_labels, B)
        H = self.heads
        emb0 = blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
        mods = self._mods(emb0) if self.shared_emb else None
        for i, blk in enumerate(blocks):
            if mods is not None:
                m = mods[:, i]
            else:  # per-block embedders (weights differ): diffusers' own path for the adaLN inputs
                e = emb0 if i == 0 else blk.norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
                m = blk.norm1.linear(F.silu(e)).view(B, 6, C)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = m.unbind(1)
            n = layernorm_modulate(h, shift_msa, scale_msa, eps=blk.norm1.norm.eps, backend=be)
            qkv = F.linear(n, self.qkv[2 * i], self.qkv[2 * i + 1]).view(B, N, 3, H, C // H)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # (B, H, N, Dh) each
            if self.attention == "triton":
                a = attention(q, k, v, backend="triton")                    # (B, N, C), no copies
            else:
                a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
            a = blk.attn1.to_out[0](a)
            h = gate_residual(h, gate_msa, a, backend=be)
            n = layernorm_modulate(h, shift_mlp, scale_mlp, eps=blk.norm3.eps, backend=be)
            h = gate_residual(h, gate_mlp, blk.ff(n), backend=be)
        shift, scale = d.proj_out_1(F.silu(emb0)).chunk(2, dim=1)
        h = layernorm_modulate(h, shift, scale, eps=d.norm_out.eps, backend=be)
        h = d.proj_out_2(h)
        side = int(N ** 0.5)
        out_ch = d.out_channels
        h = h.reshape(B, side, side, p, p, out_ch)
        out = torch.einsum("nhwpqc->nchpwq", h).reshape(B, out_ch, side * p, side * p)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
