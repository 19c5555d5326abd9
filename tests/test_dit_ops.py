"""The DiT block ops' references against diffusers' own modules, their checks, dispatch and registration.

The Triton kernels against these references: ``tests/test_dit_ops_triton.py`` (interpreted on the CPU).
Ground truth is diffusers itself (``AdaLayerNormZero``, ``BasicTransformerBlock`` with
``norm_type="ada_norm_zero"``, DiT's ``norm_out``): the references are the same PyTorch ops, so in
fp32 they are compared bit for bit. Low precision follows CUDA autocast, where ``layer_norm`` runs in
fp32 (CPU autocast keeps it in bf16, so on this machine that policy is applied by hand, and checked
for real on a GPU).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifoldgd_fast import dit_ops, kernels
from manifoldgd_fast.errors import BackendError, ConfigError
from manifoldgd_fast.kernels import INTERPRET

from conftest import requires_cuda, run_without_triton

LOW = [torch.bfloat16, torch.float16]


def _ada_norm(C, seed=0):
    from diffusers.models.normalization import AdaLayerNormZero

    torch.manual_seed(seed)
    m = AdaLayerNormZero(C)                       # num_embeddings=None: takes emb directly
    with torch.no_grad():                          # adaLN-Zero's linear starts at zero in training; not here
        m.linear.weight.normal_(0, 0.3)
        m.linear.bias.normal_(0, 0.3)
    return m.eval()


def _mods(m, emb):
    """diffusers' own chunking: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (B, C) views."""
    return m.linear(m.silu(emb)).chunk(6, dim=1)


class _Fp32Policy(nn.Module):
    """What CUDA autocast does to a module on its fp32 list (layer_norm): cast the input to fp32, run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.float())


# ---------------------------------------------------------------------------
# references against diffusers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("B,N,C", [(2, 5, 72), (1, 17, 100), (3, 4, 1152)])
def test_layernorm_modulate_ref_is_adalayernormzero_fp32(B, N, C):
    """fp32: bit-identical to AdaLayerNormZero's norm(x) * (1 + scale_msa) + shift_msa (strided chunk views)."""
    m = _ada_norm(C)
    x, emb = torch.randn(B, N, C) * 2 + 0.5, torch.randn(B, C)
    with torch.no_grad():
        want = m(x, emb=emb)[0]
        shift, scale = _mods(m, emb)[:2]
        assert shift.stride(0) == 6 * C                     # the views fastdit passes
        for got in (dit_ops.layernorm_modulate_ref(x, shift, scale, eps=m.norm.eps),
                    dit_ops.layernorm_modulate(x, shift, scale, eps=m.norm.eps, backend="reference"),
                    dit_ops.layernorm_modulate(x, shift, scale, eps=m.norm.eps)):       # auto on the CPU
            assert got.dtype == torch.float32
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", LOW)
def test_layernorm_modulate_ref_is_adalayernormzero_under_the_autocast_policy(dtype):
    """bf16 / fp16 module and x, layer_norm run as CUDA autocast runs it (fp32): diffusers' fp32 result,
    rounded to x's dtype (what the next autocast linear reads), equals the reference bit for bit.
    This checks the rest of the line: 1 + scale in scale's dtype, promotions, the order of the ops."""
    C = 72
    m = _ada_norm(C).to(dtype)
    m.norm = _Fp32Policy(m.norm)
    x, emb = (torch.randn(2, 9, C) * 3).to(dtype), torch.randn(2, C).to(dtype)
    with torch.no_grad():
        full = m(x, emb=emb)[0]
        shift, scale = _mods(m, emb)[:2]
    assert full.dtype == torch.float32 and shift.dtype == dtype
    got = dit_ops.layernorm_modulate_ref(x, shift, scale, eps=1e-6)
    assert got.dtype == dtype
    assert torch.equal(got, full.to(dtype))
    # 1 + scale in scale's dtype matters: the same line with it in fp32 is another function
    other = (F.layer_norm(x.float(), (C,), eps=1e-6) * (1 + scale.float()[:, None]) + shift[:, None]).to(dtype)
    assert not torch.equal(got, other)


def test_final_layer_norm_out_modulate():
    """DiT's final layer: norm_out (LayerNorm, no affine, eps 1e-6) * (1 + scale) + shift from proj_out_1."""
    C = 100
    norm_out, proj = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6), nn.Linear(C, 2 * C)
    x, emb = torch.randn(3, 7, C), torch.randn(3, C)
    with torch.no_grad():
        shift, scale = proj(F.silu(emb)).chunk(2, dim=1)
        want = norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        assert torch.equal(dit_ops.layernorm_modulate(x, shift, scale, eps=norm_out.eps), want)


def test_basic_transformer_block_ada_norm_zero_replayed_with_the_ops():
    """A whole diffusers DiT block (fp32) rebuilt from its modules + the two ops: bit-identical output."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(1)
    C, heads = 72, 2
    blk = BasicTransformerBlock(C, heads, C // heads, activation_fn="gelu-approximate", num_embeds_ada_norm=10,
                                attention_bias=True, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in blk.norm1.linear.parameters():
            p.normal_(0, 0.2)
        h = torch.randn(2, 16, C)
        t, y = torch.tensor([3, 900]), torch.tensor([1, 7])
        want = blk(h, timestep=t, class_labels=y)

        emb = blk.norm1.emb(t, y, hidden_dtype=h.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _mods(blk.norm1, emb)
        n = dit_ops.layernorm_modulate(h, shift_msa, scale_msa, eps=blk.norm1.norm.eps)
        h2 = dit_ops.gate_residual(h, gate_msa, blk.attn1(n))
        n = dit_ops.layernorm_modulate(h2, shift_mlp, scale_mlp, eps=blk.norm3.eps)
        got = dit_ops.gate_residual(h2, gate_mlp, blk.ff(n))
    assert float(gate_msa.abs().min()) > 0 and float((got - h).abs().max()) > 0.1     # the gates do something
    assert torch.equal(got, want)


@pytest.mark.parametrize("xd,gd,yd", [(torch.float32, torch.float32, torch.float32),
                                      (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                      (torch.float16, torch.float16, torch.float16),
                                      (torch.float32, torch.bfloat16, torch.bfloat16),
                                      (torch.bfloat16, torch.float32, torch.bfloat16)])
def test_gate_residual_ref_is_diffusers_two_ops(xd, gd, yd):
    """gate.unsqueeze(1) * y, then + x (each rounded by PyTorch), returned in x's dtype."""
    x, g, y = torch.randn(2, 5, 40).to(xd), torch.randn(2, 40).to(gd), torch.randn(2, 5, 40).to(yd)
    p = g.unsqueeze(1) * y
    want = (p + x).to(xd)
    got = dit_ops.gate_residual(x, g, y, backend="reference")
    assert got.dtype == xd and torch.equal(got, want)
    assert torch.equal(dit_ops.gate_residual_ref(x, g, y), want)


def test_reference_takes_float64_as_truth():
    """fp64 stays fp64 (autocast never touches it): what the kernel tests use as the exact value."""
    x, s, c = torch.randn(2, 3, 50, dtype=torch.float64), torch.randn(2, 50).double(), torch.randn(2, 50).double()
    out = dit_ops.layernorm_modulate_ref(x, s, c, eps=1e-6)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (x - mu) / torch.sqrt(var + 1e-6) * (1 + c[:, None]) + s[:, None],
                               atol=1e-12, rtol=1e-12)


@requires_cuda()
@pytest.mark.parametrize("dtype", LOW)
def test_references_match_diffusers_under_real_cuda_autocast(dtype):
    """The documented policy for real: fp32 AdaLayerNormZero under torch.autocast('cuda'), bf16/fp16 x."""
    C = 1152
    m = _ada_norm(C).cuda()
    x, emb = torch.randn(4, 256, C, device="cuda").to(dtype), torch.randn(4, C, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        full, gate_msa = m(x, emb=emb)[:2]
        shift, scale = _mods(m, emb)[:2]
        attn = torch.randn(4, 256, C, device="cuda").to(dtype)
        resid = gate_msa.unsqueeze(1) * attn + x
    assert full.dtype == torch.float32 and scale.dtype == dtype
    assert torch.equal(dit_ops.layernorm_modulate_ref(x, shift, scale, eps=1e-6), full.to(dtype))
    assert torch.equal(dit_ops.gate_residual_ref(x, gate_msa, attn), resid)


# ---------------------------------------------------------------------------
# checks, dispatch, registration
# ---------------------------------------------------------------------------
def test_checks_name_the_tensor_and_the_rule():
    x, v = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(ConfigError, match=r"x must be a \(B, N, C\) floating tensor, got \(2, 8\)"):
        dit_ops.layernorm_modulate(v, v, v)
    with pytest.raises(ConfigError, match=r"x must be a \(B, N, C\) floating tensor, got \(2, 3, 8\) torch.int64"):
        dit_ops.gate_residual(x.long(), v, x)
    with pytest.raises(ConfigError, match=r"shift must be \(B, C\) = \(2, 8\) .* got \(1, 8\)"):
        dit_ops.layernorm_modulate(x, v[:1], v)
    with pytest.raises(ConfigError, match=r"scale must be \(B, C\) = \(2, 8\) .* got \(2, 3, 8\)"):
        dit_ops.layernorm_modulate(x, v, x)
    with pytest.raises(ConfigError, match=r"gate must be \(B, C\) = \(2, 8\) .* got \(2, 7\)"):
        dit_ops.gate_residual(x, v[:, :7], x)
    with pytest.raises(ConfigError, match=r"y must be floats of x's shape \(2, 3, 8\), got \(2, 4, 8\)"):
        dit_ops.gate_residual(x, v, torch.randn(2, 4, 8))
    with pytest.raises(ConfigError, match="C >= 1"):
        dit_ops.layernorm_modulate(torch.randn(2, 3, 0), torch.randn(2, 0), torch.randn(2, 0))
    with pytest.raises(ConfigError, match="eps must be >= 0"):
        dit_ops.layernorm_modulate(x, v, v, eps=-1.0)
    with pytest.raises(ConfigError, match="backend must be one of"):
        dit_ops.gate_residual(x, v, x, backend="cuda")


@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="CPU tensors are the kernels' own here")
@pytest.mark.skipif(not kernels.HAVE_TRITON, reason=f"the kernels are not offered at all here: "
                                                  f"{kernels.WHY_NO_TRITON}")
def test_forced_triton_on_the_cpu_says_why():
    x, v = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(BackendError, match=r"x is on cpu; the Triton kernels take CUDA tensors"):
        dit_ops.layernorm_modulate(x, v, v, backend="triton")
    with pytest.raises(BackendError, match=r"x is on cpu"):
        dit_ops.gate_residual(x, v, x, backend="triton")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(BackendError, match=r"q is on cpu"):
        dit_ops.attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------
# attention: the reference is diffusers' attention processor
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_ref_is_the_diffusers_attention_processor(dtype):
    """DiT's self-attention (diffusers Attention + AttnProcessor2_0, bias, no mask): its q, k, v
    projections, then attention_ref and its output projection give the module's output bit for bit."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    C, H = 48, 2
    attn = Attention(query_dim=C, heads=H, dim_head=C // H, bias=True, out_bias=True).eval().to(dtype)
    x = torch.randn(3, 10, C).to(dtype)
    with torch.no_grad():
        want = attn(x)
        q, k, v = (lin(x).view(3, 10, H, C // H).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))
        for got in (dit_ops.attention_ref(q, k, v), dit_ops.attention(q, k, v, backend="reference"),
                    dit_ops.attention(q, k, v)):                     # auto on the CPU: the reference
            assert torch.equal(attn.to_out[0](got), want)


def test_attention_reference_takes_the_score_scale():
    """scale= multiplies the scores (softmax(q k^T scale) v), as SDPA's; None is 1 / sqrt(Dh). The Triton
    tests compare the kernel with this reference at other scales, so a reference ignoring it would hide one."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    for scale in (None, 0.3, 2.0):
        s = 7 ** -0.5 if scale is None else scale
        want = (torch.softmax(q @ k.transpose(-1, -2) * s, -1) @ v).transpose(1, 2).reshape(2, 5, 21)
        for got in (dit_ops.attention_ref(q, k, v, scale=scale), dit_ops.attention(q, k, v, scale=scale)):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_attention_checks_name_the_tensor_and_the_rule():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ConfigError, match=r"q must be a \(B, H, N, Dh\) floating tensor, got \(2, 4, 8\)"):
        dit_ops.attention(q[0], q, q)
    with pytest.raises(ConfigError, match=r"v must be a \(B, H, N, Dh\) floating tensor, got \(1, 2, 4, 8\) torch.int64"):
        dit_ops.attention(q, q, q.long())
    with pytest.raises(ConfigError, match=r"k and v must be \(B, H, Nk, Dh\) = \(1, 2, Nk, 8\) .* got k \(1, 3, 4, 8\)"):
        dit_ops.attention(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))
    with pytest.raises(ConfigError, match="backend must be one of"):
        dit_ops.attention(q, q, q, backend="flash")


def test_attention_triton_needs_the_fused_dit_and_a_device_it_runs_on(tiny_world, tmp_path):
    """--attention triton is FusedDiT's kernel: without --dit-impl fused it is a config error, and on
    the CPU (no interpreter) a one-line error before anything is written, not a traceback mid-run."""
    from test_pipeline import _args

    from manifoldgd_fast.cli import main
    from manifoldgd_fast.config import DistillConfig

    with pytest.raises(ConfigError, match="--attention triton is the fused DiT's kernel: add --dit-impl fused"):
        DistillConfig(attention="triton").validate()
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("the kernel runs on this machine's tensors (GPU or TRITON_INTERPRET=1)")
    out = tmp_path / "out"
    assert main(_args(tiny_world, out, "--dit-impl", "fused", "--attention", "triton")) == 2
    assert not (out / "manifest.json").exists()


def test_library_ops_trace_under_fake_tensors():
    """The ops trace without running (FakeTensorMode): what torch.compile and graph capture need."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, v = torch.empty(4, 256, 1152, dtype=torch.bfloat16), torch.empty(4, 6, 1152, dtype=torch.bfloat16)
        out = torch.ops.manifoldgd_fast.layernorm_modulate(x, v[:, 0], v[:, 1], 1e-6)
        assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
        out = torch.ops.manifoldgd_fast.gate_residual(x.float(), v[:, 2], x)
        assert out.shape == x.shape and out.dtype == torch.float32
        q = torch.empty(4, 16, 256, 72, dtype=torch.bfloat16)
        out = torch.ops.manifoldgd_fast.attention(q, q, q, 72 ** -0.5)
        assert out.shape == (4, 256, 1152) and out.dtype == torch.bfloat16 and out.is_contiguous()


def test_dit_ops_import_and_run_without_triton():
    """No Triton (simulated): the module imports, auto runs the reference, forced triton says why."""
    run_without_triton(
        "from manifoldgd_fast import dit_ops\n"
        "from manifoldgd_fast.errors import BackendError\n"
        "x, v = torch.randn(2, 3, 8), torch.randn(2, 8)\n"
        "assert torch.equal(dit_ops.layernorm_modulate(x, v, v), dit_ops.layernorm_modulate_ref(x, v, v))\n"
        "assert torch.equal(dit_ops.gate_residual(x, v, x), dit_ops.gate_residual_ref(x, v, x))\n"
        "try:\n"
        "    dit_ops.gate_residual(x, v, x, backend='triton')\n"
        "except BackendError as e:\n"
        "    assert 'cannot be imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no BackendError')\n"
        "print('ok')\n"
    )
