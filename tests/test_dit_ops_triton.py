"""The fused DiT block kernels against their references: LayerNorm + adaLN modulate, gate + residual, and
attention (``manifoldgd_fast.dit_ops``, ``manifoldgd_fast/kernels/adaln.py`` and ``attention.py``).

Where these run: ``tests/triton_helpers.py`` (compiled on a GPU; on the CPU under ``TRITON_INTERPRET=1``,
which ``tests/test_kernels_interpreter.py`` sets in a child pytest). To run it directly:
``TRITON_INTERPRET=1 python -m pytest -q tests/test_dit_ops_triton.py``. Small shapes for the
interpreter; tolerances per dtype are stated where used.
"""
import pytest
import torch
from conftest import requires_cuda
from triton_helpers import DEV, TRITON_MARKS, assert_graph_replay_equals_eager, count_kernel_calls

from manifoldgd_fast.errors import BackendError

pytestmark = TRITON_MARKS

# ---------------------------------------------------------------------------
# DiT block ops (manifoldgd_fast.dit_ops): LayerNorm + adaLN modulate, gate + residual
# ---------------------------------------------------------------------------
# (B, N, C): DiT-XL/2's C = 1152 (a non-power of two), odd C (72 = DiT-S head sum, 100), the widest C the
# LayerNorm kernel takes (4096), one token of one channel; N small for the interpreter.
ADALN_SHAPES = [(2, 3, 1152), (1, 17, 72), (3, 5, 100), (1, 2, 4096), (1, 1, 1)]
# Tolerance of layernorm_modulate against its reference, per output dtype. The kernel rounds where the
# reference rounds (1 + scale in scale's dtype, fp32 arithmetic, one rounding to the output dtype), so they
# differ only by the order of the LayerNorm row sums: a few fp32 ulps in mean and rstd, i.e. rtol 1e-5 in
# fp32; in bf16 / fp16 that can move the final rounding by one ulp of the output, and rtol = eps of the
# dtype (2^-7, 2^-10) is at least one ulp anywhere in a binade. atol = 1e-5 x max|ref| for outputs near
# zero (shift cancelling the normalised value), where the fp32 noise is absolute.
ADALN_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _adaln_inputs(B, N, C, dtype, seed, mod_dtype=None):
    """x with a per-row offset and spread (LayerNorm has work to do); shift / scale / gate as strided
    (B, C) views of one (B, 6, C) tensor, as ``emb.chunk(6, dim=1)`` gives them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=gen) * (0.5 + 3 * torch.rand(B, N, 1, generator=gen)) \
        + 4 * torch.randn(B, N, 1, generator=gen)
    mods = (0.5 * torch.randn(B, 6, C, generator=gen)).to(mod_dtype or dtype)
    y = torch.randn(B, N, C, generator=gen)
    return x.to(dtype).to(DEV), mods.to(DEV), y.to(dtype).to(DEV)


@pytest.mark.parametrize("shape", ADALN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_layernorm_modulate_triton_matches_reference(shape, dtype, seed):
    from manifoldgd_fast import dit_ops

    x, mods, _ = _adaln_inputs(*shape, dtype, seed)
    shift, scale = mods[:, 0], mods[:, 1]
    got = dit_ops.layernorm_modulate(x, shift, scale, eps=1e-6, backend="triton")
    want = dit_ops.layernorm_modulate_ref(x, shift, scale, eps=1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    rtol = ADALN_RTOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=1e-5 * float(want.abs().max()))
    # flash-attention's rule: against the exact value (fp64 reference) the kernel's error is at most 2x
    # plain PyTorch's at this dtype (+ a floor of 1e-6 |out| for fp32, where both are at rounding level)
    truth = dit_ops.layernorm_modulate_ref(x.double(), shift.double(), scale.double(), eps=1e-6)
    err_k, err_t = float((got.double() - truth).abs().max()), float((want.double() - truth).abs().max())
    assert err_k <= 2 * err_t + 1e-6 * float(truth.abs().max()), (err_k, err_t)


@pytest.mark.parametrize("xd,md", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                   (torch.float16, torch.bfloat16)])
def test_layernorm_modulate_triton_mixed_dtypes(xd, md):
    """Modulation in another dtype than x: 1 + scale rounds in scale's dtype (as diffusers' line does);
    x read through a (B, N) stride, not copied."""
    from manifoldgd_fast import dit_ops

    x, mods, _ = _adaln_inputs(2, 12, 100, xd, seed=3, mod_dtype=md)
    x = x[:, ::2]                                                      # (2, 6, 100), stride over N 200
    got = dit_ops.layernorm_modulate(x, mods[:, 3], mods[:, 4], backend="triton")
    want = dit_ops.layernorm_modulate_ref(x, mods[:, 3], mods[:, 4])
    assert got.dtype == xd
    torch.testing.assert_close(got.double(), want.double(), rtol=ADALN_RTOL[xd], atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("shape", ADALN_SHAPES[:3] + [(2, 3, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gate_residual_triton_is_bit_identical(shape, dtype):
    """Same roundings as PyTorch's two ops (gate * y rounded, then + x; no FMA): equal bit for bit,
    also with y in another dtype and a strided x. C = 5000: the residual has no LayerNorm C limit."""
    from manifoldgd_fast import dit_ops

    x, mods, y = _adaln_inputs(*shape, dtype, seed=sum(shape))
    gate = mods[:, 2]
    for xx, yy in ((x, y), (x.float(), y), (x, y.float()), (torch.cat([x, x], 1)[:, ::2], y)):
        got = dit_ops.gate_residual(xx, gate, yy, backend="triton")
        want = dit_ops.gate_residual_ref(xx, gate, yy)
        assert got.dtype == xx.dtype and got.is_contiguous()
        assert torch.equal(got, want), float((got.double() - want.double()).abs().max())


def test_layernorm_and_gate_triton_edge_cases_and_refusals():
    from manifoldgd_fast import dit_ops

    empty = torch.zeros(0, 4, 8, device=DEV)
    v0 = torch.zeros(0, 8, device=DEV)
    assert dit_ops.layernorm_modulate(empty, v0, v0, backend="triton").shape == (0, 4, 8)
    assert dit_ops.gate_residual(empty, v0, empty, backend="triton").shape == (0, 4, 8)
    x, v = torch.randn(2, 3, 8, device=DEV), torch.randn(2, 8, device=DEV)
    # a constant row normalises to 0 (var 0 + eps): the output is the shift
    const = torch.full((2, 3, 8), 7.0, device=DEV)
    assert torch.equal(dit_ops.layernorm_modulate(const, v, v, backend="triton"), v[:, None].expand(2, 3, 8))
    with pytest.raises(BackendError, match="x has dtype torch.float64"):
        dit_ops.layernorm_modulate(x.double(), v.double(), v.double(), backend="triton")
    with pytest.raises(BackendError, match="gate has dtype torch.float64"):
        dit_ops.gate_residual(x, v.double(), x, backend="triton")
    from manifoldgd_fast.kernels import adaln

    assert dit_ops.MAX_C == adaln.MAX_C == 4096         # dit_ops keeps its own copy to import without Triton
    wide = torch.randn(1, 1, 4097, device=DEV)
    with pytest.raises(BackendError, match="x has C = 4097 channels; the fused kernel takes C <= 4096"):
        dit_ops.layernorm_modulate(wide, wide[0], wide[0], backend="triton")
    if DEV == "cpu":   # under the interpreter "auto" still picks the reference on the CPU (dispatch.py's rule)
        assert torch.equal(dit_ops.layernorm_modulate(x, v, v), dit_ops.layernorm_modulate_ref(x, v, v))


def test_layernorm_and_gate_compile_as_opaque_custom_ops():
    """torch.compile (fullgraph: no graph break) traces the public ops to the registered custom ops,
    whose fake kernels give the shapes; the compiled function equals the eager one. opcheck: schema,
    fake kernel and dispatch agree."""
    from manifoldgd_fast import dit_ops

    x, mods, y = _adaln_inputs(2, 5, 72, torch.bfloat16, seed=7)

    def block_tail(x, mods, y):
        n = dit_ops.layernorm_modulate(x, mods[:, 0], mods[:, 1], backend="triton")
        return dit_ops.gate_residual(x, mods[:, 2], n * y, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(block_tail, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, mods, y), block_tail(x, mods, y))
    torch.library.opcheck(torch.ops.manifoldgd_fast.layernorm_modulate, (x, mods[:, 0], mods[:, 1], 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.manifoldgd_fast.gate_residual, (x, mods[:, 2], y),
                          test_utils=("test_schema", "test_faketensor"))


@requires_cuda()
@pytest.mark.parametrize("B", [16, 64])
def test_layernorm_and_gate_full_shape_and_cuda_graph_gpu(B):
    """DiT-XL/2 shapes (B x 256 tokens x 1152, bf16): against the references, and replayed from a CUDA graph."""
    from manifoldgd_fast import dit_ops

    x = torch.randn(B, 256, 1152, device="cuda").bfloat16()
    mods = (0.5 * torch.randn(B, 6, 1152, device="cuda")).bfloat16()
    y = torch.randn(B, 256, 1152, device="cuda").bfloat16()
    ln = dit_ops.layernorm_modulate(x, mods[:, 0], mods[:, 1], backend="triton")
    want = dit_ops.layernorm_modulate_ref(x, mods[:, 0], mods[:, 1])
    torch.testing.assert_close(ln.float(), want.float(), rtol=2.0 ** -7, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(dit_ops.gate_residual(x, mods[:, 2], y, backend="triton"),
                       dit_ops.gate_residual_ref(x, mods[:, 2], y))

    def step():
        return dit_ops.gate_residual(x, mods[:, 2], dit_ops.layernorm_modulate(x, mods[:, 0], mods[:, 1]))

    assert_graph_replay_equals_eager(step)


# ---------------------------------------------------------------------------
# attention (dit_ops.attention, manifoldgd_fast/kernels/attention.py)
# ---------------------------------------------------------------------------
# (B, H, Nq, Nk, Dh): DiT's head dim 72 (two slabs 64 + 16), SD's 40 (32 + 16) and 160 (128 + 32), a
# power of two (one slab), a head dim under 16 (the tiny DiT's 8), queries != keys, lengths not a
# multiple of the tiles; small for the interpreter.
ATTN_SHAPES = [(2, 3, 17, 17, 72), (1, 2, 33, 20, 40), (2, 1, 64, 64, 64), (1, 2, 5, 5, 8), (1, 1, 40, 70, 160)]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _qkv(B, H, NQ, NK, DH, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(B, H, NQ, DH, generator=g)          # scores of a few units: a peaked softmax
    k = 2 * torch.randn(B, H, NK, DH, generator=g)
    v = torch.randn(B, H, NK, DH, generator=g) + 0.5
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV), v.to(dtype).to(DEV)


def _attention_bound(truth, v, dtype):
    """Largest error allowed against the float64 attention of the same (rounded) inputs.

    fp32 (IEEE dots, fp32 softmax): 1e-5 x max|out|. bf16 / fp16: the kernel rounds twice, as
    FlashAttention does: the probabilities p to the dtype before ``p v`` (|sum dp_j v_j| <= u max|v|,
    u the unit roundoff, since sum p_j = 1), and the output once (u max|out|); 10 % margin for the fp32
    sums. (The GPU test also checks flash-attention's own rule against torch's bf16 SDPA.)"""
    if dtype == torch.float32:
        return 1e-5 * float(truth.abs().max())
    return 1.1 * UNIT_ROUNDOFF[dtype] * (float(truth.abs().max()) + float(v.abs().max()))


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_triton_matches_float64(shape, dtype, seed):
    from manifoldgd_fast import dit_ops

    q, k, v = _qkv(*shape, dtype, seed)
    got = dit_ops.attention(q, k, v, backend="triton")
    B, H, NQ, _, DH = shape
    assert got.shape == (B, NQ, H * DH) and got.dtype == dtype and got.is_contiguous()
    truth = dit_ops.attention_ref(q.double(), k.double(), v.double())
    err = float((got.double() - truth).abs().max())
    assert err <= _attention_bound(truth, v, dtype), (err, _attention_bound(truth, v, dtype))
    ref = dit_ops.attention_ref(q, k, v)                          # same signature, same layout
    assert ref.shape == got.shape and ref.dtype == got.dtype


def test_attention_triton_reads_fused_qkv_views_in_place_and_takes_a_scale():
    """q, k, v as FusedDiT passes them: (B, H, N, Dh) views of one (B, N, 3, H, Dh) tensor (strides
    over n of 3 H Dh): the same numbers as from contiguous copies. A given scale is SDPA's."""
    from manifoldgd_fast import dit_ops

    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 19, 3, 2, 72, generator=g).to(DEV)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    got = dit_ops.attention(q, k, v, backend="triton")
    assert torch.equal(got, dit_ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="triton"))
    truth = dit_ops.attention_ref(q.double(), k.double(), v.double(), scale=0.3)
    err = float((dit_ops.attention(q, k, v, scale=0.3, backend="triton").double() - truth).abs().max())
    assert err <= _attention_bound(truth, v, torch.float32)


def test_attention_triton_edge_cases_and_refusals():
    from manifoldgd_fast import dit_ops

    q = torch.randn(1, 2, 4, 8, device=DEV)
    assert dit_ops.attention(q[:, :, :0], q, q, backend="triton").shape == (1, 0, 16)
    assert dit_ops.attention(q[:0], q[:0], q[:0], backend="triton").shape == (0, 4, 16)
    none = q[:, :, :0]                                                         # no keys: the reference's zeros
    assert torch.equal(dit_ops.attention(q, none, none, backend="triton"), dit_ops.attention_ref(q, none, none))
    one = dit_ops.attention(q, q[:, :, :1], q[:, :, :1], backend="triton")     # one key: out = v
    assert torch.allclose(one, q[:, :, :1].expand(1, 2, 4, 8).transpose(1, 2).reshape(1, 4, 16))
    with pytest.raises(BackendError, match="q has dtype torch.float64"):
        dit_ops.attention(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(BackendError, match="one dtype"):
        dit_ops.attention(q, q.half(), q, backend="triton")
    wide = torch.randn(1, 1, 2, 257, device=DEV)
    with pytest.raises(BackendError, match="head dim Dh = 257; the fused kernel takes Dh <= 256"):
        dit_ops.attention(wide, wide, wide, backend="triton")
    from manifoldgd_fast.kernels import attention as attn_k

    assert dit_ops.MAX_HEAD_DIM == attn_k.MAX_HEAD_DIM            # dit_ops keeps a copy to import without Triton
    assert [attn_k.head_split(d) for d in (8, 16, 24, 40, 64, 72, 96, 160, 256)] == \
        [(16, 0), (16, 0), (32, 0), (32, 16), (64, 0), (64, 16), (64, 32), (128, 32), (256, 0)]


def test_attention_compiles_as_an_opaque_custom_op():
    from manifoldgd_fast import dit_ops

    q, k, v = _qkv(1, 2, 9, 9, 72, torch.bfloat16, seed=2)
    fn = lambda q, k, v: dit_ops.attention(q, k, v, backend="triton") * 2     # noqa: E731
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v), fn(q, k, v))
    torch.library.opcheck(torch.ops.manifoldgd_fast.attention, (q, k, v, 72 ** -0.5),
                          test_utils=("test_schema", "test_faketensor"))


def test_fused_dit_with_triton_attention_equals_sdpa(monkeypatch):
    """FusedDiT on every kernel (LayerNorm-modulate, gate-residual, attention) computes the diffusers DiT's
    function (fp32: to float rounding)."""
    import copy

    from manifoldgd_fast.fastdit import FusedDiT, tie_conditioning_embedders
    from manifoldgd_fast.kernels import adaln, attention
    from manifoldgd_fast.models import build_dit, tiny_dit_config

    dit = tie_conditioning_embedders(build_dit(tiny_dit_config(num_classes=10, attention_head_dim=24), seed=1)).to(DEV)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([3, 10])
    x, t, y = x.to(DEV), t.to(DEV), y.to(DEV)
    with torch.no_grad():
        want = dit(x, timestep=t, class_labels=y).sample
        calls = count_kernel_calls(monkeypatch, (adaln, "layernorm_modulate", "gate_residual"),
                                   (attention, "attention"))
        got = FusedDiT(copy.deepcopy(dit), backend="triton", attention="triton")(x, timestep=t, class_labels=y).sample
    depth = len(dit.transformer_blocks)
    assert calls == {"layernorm_modulate": 2 * depth + 1, "gate_residual": 2 * depth, "attention": depth}, calls
    torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=0)


@requires_cuda()
@pytest.mark.parametrize("B", [16, 64])
def test_attention_full_shape_flash_rule_and_cuda_graph_gpu(B):
    """DiT-XL/2 (B x 16 heads x 256 tokens x 72, bf16 views of one QKV output): flash-attention's rule,
    |ours - fp64| <= 2 |torch bf16 SDPA - fp64| (+ one ulp of headroom), and a CUDA-graph replay equal to eager."""
    from manifoldgd_fast import dit_ops

    qkv = torch.randn(B, 256, 3, 16, 72, device="cuda").bfloat16()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    truth = dit_ops.attention_ref(q.double(), k.double(), v.double())
    ours = float((dit_ops.attention(q, k, v, backend="triton").double() - truth).abs().max())
    plain = float((dit_ops.attention_ref(q, k, v).double() - truth).abs().max())
    assert ours <= 2 * plain + UNIT_ROUNDOFF[torch.bfloat16] * float(truth.abs().max()), (ours, plain)
    assert_graph_replay_equals_eager(lambda: dit_ops.attention(q, k, v, backend="triton"))
