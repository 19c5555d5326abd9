"""DiT block ops outside the big matmuls: fused LayerNorm + adaLN modulate, gate + residual, attention.

What they replace in diffusers' DiT (``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``
and ``DiTTransformer2DModel``'s final layer), per token row of x (B, N, C):

* :func:`layernorm_modulate` ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]``: ``AdaLayerNormZero``'s
  ``norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]``, ``norm3`` + the MLP's modulate, and
  ``norm_out(x) * (1 + scale[:, None]) + shift[:, None]`` (all LayerNorms without affine; eps 1e-6 in DiT,
  ``norm_eps`` in diffusers' ``norm3``);
* :func:`gate_residual` ``x + gate[:, None] * y``: ``gate_msa.unsqueeze(1) * attn_output + hidden_states``
  and the same after the MLP;
* :func:`attention` ``SDPA(q, k, v).transpose(1, 2).reshape(B, N, H * Dh)``: the attention processor's
  core, with a Triton kernel for DiT's head dim 72 that neither pads it to 128 nor copies q, k, v or
  the output (``kernels.attention``); ``FusedDiT`` uses it when ``attention="triton"``.

Dtypes: the references reproduce the diffusers block **under CUDA autocast**, the way this
package runs the DiT (fp32 weights, ``torch.autocast("cuda", bf16 | fp16)``):

* ``layer_norm`` is on CUDA autocast's fp32 list, so a bf16/fp16 x is normalised in fp32 and the
  LayerNorm returns fp32; ``1 + scale`` is computed in scale's dtype (bf16: the adaLN linear's
  autocast output), the product and ``+ shift`` in fp32. Diffusers' result is fp32 and the next
  linear casts it to the autocast dtype; these ops return x's dtype (= the autocast dtype there),
  i.e. exactly what that linear reads.
* ``gate * y`` is one PyTorch op rounded to ``promote(gate, y)``, the residual add another,
  rounded to ``promote(that, x)``; the result is returned in x's dtype.

Not matched: a DiT run in bf16 *without* autocast (``layer_norm`` then returns bf16 and the
modulate rounds three times instead of once), and CPU autocast, whose policy keeps ``layer_norm``
in bf16; there these ops are the more accurate by about one bf16 rounding.

Backends (``backend=``), chosen by :func:`manifoldgd_fast.dispatch._pick_backend` (the one place):

* ``reference``: :func:`layernorm_modulate_ref` / :func:`gate_residual_ref`; runs anywhere.
* ``triton``: ``manifoldgd_fast.kernels.adaln``, one memory pass each; the same roundings as the
  references, so ``gate_residual`` is bit-identical and ``layernorm_modulate`` differs only by the
  order of the row sums. CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``), all of
  fp32 / bf16 / fp16, on one device, B * N < 2^31, C <= 4096 for ``layernorm_modulate``. An
  input it cannot take raises ``BackendError`` naming the tensor and the rule (bad shapes raise
  ``ConfigError`` on every backend). Non-contiguous tensors are read in place when their last
  dim has unit stride (e.g. ``emb.chunk(6, dim=1)`` views), else copied.
* ``auto``: ``triton`` for CUDA tensors it can take, else ``reference`` (under the interpreter,
  CPU tensors get the kernels only when ``backend="triton"`` is forced, as for the guidance ops).

Registered as ``torch.library`` custom ops (``manifoldgd_fast::layernorm_modulate``,
``manifoldgd_fast::gate_residual``; ``custom_op`` + ``register_fake``): opaque to ``torch.compile``,
check-free and without host synchronisation, so they capture in CUDA graphs. The public
functions check (shapes and dtypes only: no host sync either), then call them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import _pick_backend, library_op, load_kernels, tensors_reason
from .errors import ConfigError

__all__ = ["MAX_C", "MAX_HEAD_DIM", "layernorm_modulate", "layernorm_modulate_ref", "gate_residual",
           "gate_residual_ref", "attention", "attention_ref"]

MAX_C = 4096                     # kernels.adaln.MAX_C (kept here so this module imports without Triton)
MAX_HEAD_DIM = 256               # kernels.attention.MAX_HEAD_DIM (the same)
_MAX_C_GATE = 256 * 65535        # gate_residual: CUDA's limit on the grid's column blocks


# ----------------------------------------------------------------------------
# references: diffusers' ops, with its dtypes under CUDA autocast
# ----------------------------------------------------------------------------
def layernorm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                           ) -> torch.Tensor:
    """Reference of :func:`layernorm_modulate` (same signature, no backend)."""
    C = x.shape[-1]
    # CUDA autocast runs layer_norm in fp32 (fp64 stays fp64); the rest is diffusers' line as written
    n = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (C,), eps=eps)   # (B, N, C)
    return (n * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)


def gate_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`gate_residual` (same signature, no backend)."""
    return (gate.unsqueeze(1) * y + x).to(x.dtype)          # (B, N, C); diffusers' two ops, its order


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference of :func:`attention` (same signature, no backend): diffusers' attention processor's
    SDPA call and its ``transpose(1, 2).reshape`` back to tokens."""
    B, H, N, Dh = q.shape
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, H * Dh)


# ----------------------------------------------------------------------------
# checks and backend choice
# ----------------------------------------------------------------------------
def _check_x(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ConfigError(f"{name} must be a (B, N, C) floating tensor, got "
                          f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                          f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    if x.shape[2] < 1:
        raise ConfigError(f"{name} must have C >= 1 channels, got shape {tuple(x.shape)}")


def _check_rowvec(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    B, _, C = x.shape
    if not isinstance(t, torch.Tensor) or t.shape != (B, C) or not t.is_floating_point():
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"{name} must be (B, C) = ({B}, {C}) floats, one row per sample of x "
                          f"{tuple(x.shape)}, got {got}")


_DIT_KERNELS: tuple | None = None


def _dit_kernels():
    """:func:`~manifoldgd_fast.dispatch.load_kernels` of kernels.adaln / .attention, on first use only.

    A module-level cache, not functools.lru_cache: torch.compile traces the public ops, and Dynamo
    reads a global where it would warn about (and trace around) an lru_cache wrapper.
    """
    global _DIT_KERNELS
    if _DIT_KERNELS is None:
        _DIT_KERNELS = load_kernels("adaln", "attention")
    return _DIT_KERNELS


def device_reason(device: torch.device) -> str | None:
    """Why the DiT kernels cannot run on ``device`` at all (no Triton; not CUDA, or not the CPU under the
    interpreter), or None: for callers that choose a kernel up front (``FusedDiT(attention="triton")``)."""
    kern, why = _dit_kernels()
    if kern is None:
        return why
    if not kern.triton_device_ok(device):
        return f"the model is on {device}; the Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1)"
    return None


def _triton_reason(tensors: dict, *, max_c: int | None) -> str | None:
    """Why the DiT kernels cannot take these tensors (a sentence naming the tensor and the rule), or None.
    ``max_c``: the (B, N, C) ops' channel limit (None: not a (B, N, C) op, only the shared checks)."""
    kern, why = _dit_kernels()
    if kern is None:
        return why
    why = tensors_reason(kern, tensors, all_float=True)
    if why is not None:
        return why
    if max_c is None:
        return None
    name0, t0 = next(iter(tensors.items()))
    B, N, C = t0.shape
    if C > max_c:
        return f"{name0} has C = {C} channels; the fused kernel takes C <= {max_c}"
    if B * N >= 2 ** 31:
        return f"{name0} has B * N = {B * N} token rows; the fused kernels take fewer than 2^31"
    return None


# ----------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------
def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       backend: str = "auto") -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]``, LayerNorm over C without affine.

    Args:
        x: (B, N, C) tokens, fp32 / bf16 / fp16 (fp64 on the reference backend).
        shift, scale: (B, C) adaLN modulation of each sample (any float dtype; views with a row
            stride, as ``emb.chunk(6, dim=1)`` gives, are read in place by the kernel).
        eps: LayerNorm's epsilon (DiT: 1e-6), >= 0.
        backend: "auto" | "reference" | "triton" (see the module docstring).
    Returns: (B, N, C) in x's dtype. Statistics (biased variance) and arithmetic in fp32, with
        ``1 + scale`` rounded to scale's dtype as diffusers computes it.
    """
    _check_x("x", x)
    _check_rowvec("shift", shift, x)
    _check_rowvec("scale", scale, x)
    if not float(eps) >= 0.0:
        raise ConfigError(f"eps must be >= 0, got {eps}")
    why = lambda: _triton_reason({"x": x, "shift": shift, "scale": scale}, max_c=MAX_C)  # noqa: E731
    if _pick_backend(backend, x.device, why, "DiT") == "triton":
        return torch.ops.manifoldgd_fast.layernorm_modulate(x, shift, scale, float(eps))
    return layernorm_modulate_ref(x, shift, scale, eps=eps)


def gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``x + gate[:, None] * y``: adaLN-Zero's gated residual.

    Args:
        x: (B, N, C) residual stream, fp32 / bf16 / fp16 (fp64 on the reference backend).
        gate: (B, C) gate of each sample. y: (B, N, C) the branch output (attention or MLP).
        backend: "auto" | "reference" | "triton" (see the module docstring).
    Returns: (B, N, C) in x's dtype: fp32 arithmetic, ``gate * y`` rounded to ``promote(gate, y)``
        before the add (two PyTorch ops in diffusers), so the kernel is bit-identical to the reference.
    """
    _check_x("x", x)
    _check_rowvec("gate", gate, x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"y must be floats of x's shape {tuple(x.shape)}, got {got}")
    why = lambda: _triton_reason({"x": x, "gate": gate, "y": y}, max_c=_MAX_C_GATE)  # noqa: E731
    if _pick_backend(backend, x.device, why, "DiT") == "triton":
        return torch.ops.manifoldgd_fast.gate_residual(x, gate, y)
    return gate_residual_ref(x, gate, y)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConfigError(f"{name} must be a (B, H, N, Dh) floating tensor, got {got}")
    B, H, _, Dh = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != Dh or v.shape != k.shape:
        raise ConfigError(f"k and v must be (B, H, Nk, Dh) = ({B}, {H}, Nk, {Dh}) like q {tuple(q.shape)}, "
                          f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Dh < 1:
        raise ConfigError(f"q must have a head dim Dh >= 1, got shape {tuple(q.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Non-causal softmax attention, returned token-major: ``SDPA(q, k, v).transpose(1, 2).reshape(B, N, H Dh)``.

    Args:
        q: (B, H, N, Dh); k, v: (B, H, Nk, Dh); one dtype, fp32 / bf16 / fp16 (fp64 on the reference
            backend). Any strides (the kernel reads views of a fused QKV output in place when their
            last dim has unit stride).
        scale: the score scale; None = 1 / sqrt(Dh), as SDPA.
        backend: "auto" | "reference" | "triton" (``kernels.attention``: one pass, head dim split
            into power-of-two slabs, Dh <= 256). As for the other ops, "auto" takes the kernel for CUDA
            tensors it can take; the DiT uses it only when asked (``attention="triton"``), since
            cuDNN / flash SDPA are the measured defaults.
    Returns: (B, N, H * Dh) in q's dtype, contiguous. Scores and softmax in fp32; the kernel rounds the
        probabilities to the input dtype before ``p v``, as FlashAttention does (tolerance: the
        flash-attention rule, ``tests/test_dit_ops_triton.py``).
    """
    _check_qkv(q, k, v)
    if scale is None:
        scale = q.shape[3] ** -0.5

    def why():
        r = _triton_reason({"q": q, "k": k, "v": v}, max_c=None)
        if r is None and not (q.dtype == k.dtype == v.dtype):
            r = f"q, k, v must have one dtype for the fused kernel, got {q.dtype}, {k.dtype}, {v.dtype}"
        if r is None and q.shape[3] > MAX_HEAD_DIM:
            r = f"q has head dim Dh = {q.shape[3]}; the fused kernel takes Dh <= {MAX_HEAD_DIM}"
        return r

    if _pick_backend(backend, q.device, why, "DiT") == "triton":
        return torch.ops.manifoldgd_fast.attention(q, k, v, float(scale))
    return attention_ref(q, k, v, scale=scale)


# ----------------------------------------------------------------------------
# torch.library registration (check-free, no host sync: capturable)
# ----------------------------------------------------------------------------
def _register_library_ops() -> None:
    @library_op("layernorm_modulate", "(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor")
    def _layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        from .kernels import adaln

        return adaln.layernorm_modulate(x, shift, scale, eps)

    @_layernorm_modulate.register_fake
    def _(x, shift, scale, eps):
        return x.new_empty(x.shape)            # the kernel's output: new, contiguous, x's dtype

    @library_op("gate_residual", "(Tensor x, Tensor gate, Tensor y) -> Tensor")
    def _gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from .kernels import adaln

        return adaln.gate_residual(x, gate, y)

    @_gate_residual.register_fake
    def _(x, gate, y):
        return x.new_empty(x.shape)

    @library_op("attention", "(Tensor q, Tensor k, Tensor v, float scale) -> Tensor")
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        from .kernels import attention as attn

        return attn.attention(q, k, v, scale)

    @_attention.register_fake
    def _(q, k, v, scale):
        B, H, N, Dh = q.shape
        return q.new_empty((B, N, H * Dh))


_register_library_ops()
