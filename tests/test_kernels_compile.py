"""Every Triton kernel compiles for a real GPU (sm_90, sm_86, sm_80), on a machine without one.

The interpreter runs the kernels' Python semantics; it does not type-check them the
way the NVIDIA lowering does (integer widths, layouts for tl.gather / tl.dot, loop-carried
types). Triton compiles ahead of time to a cubin with its bundled ptxas, no driver needed,
so CI catches those errors here. What this cannot show: speed, occupancy at run time, or a
launch on real hardware.
"""
import os

import pytest

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from manifoldgd_fast import kernels

    _PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    WHY = None
    if not kernels.HAVE_TRITON:
        WHY = kernels.WHY_NO_TRITON
    elif kernels.INTERPRET:
        WHY = "TRITON_INTERPRET=1: the kernels are interpreted functions here"
    elif not os.path.exists(_PTXAS):
        WHY = "this Triton has no bundled ptxas (no NVIDIA backend)"
except Exception as e:  # pragma: no cover - no triton
    WHY = f"Triton unavailable ({type(e).__name__})"

pytestmark = pytest.mark.skipif(WHY is not None, reason=str(WHY))

_SRC_BLOCK = {"src_ptr": "*bf16", "src_sb": "i64", "src_sm": "i64", "ord_ptr": "*i64", "ord_sb": "i64",
              "rho_ptr": "*fp32", "gn_ptr": "*fp32", "aux_sb": "i64", "sqa": "fp32", "sig": "fp32", "seed": "i64",
              "step16": "i32"}


def _signature(fn, types, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in _SRC_BLOCK:
            sig[name] = _SRC_BLOCK[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _cases():
    from manifoldgd_fast.kernels import adaln, attention, cloud, knn_rows, philox_normal, sym_eig, tangent

    i64 = {"sid_ptr": "*i64", "idx_ptr": "*i64", "cand_ptr": "*i64", "len_ptr": "*i64", "seed": "i64"}
    f = {"lam": "fp32", "scale": "fp32", "inv_bw": "fp32", "rel_tol": "fp32", "radius": "fp32", "ext_scale": "fp32",
         "sqa": "fp32", "sig": "fp32"}
    return [
        (philox_normal._philox_normal_kernel, {**i64, "out_ptr": "*fp32"}, dict(BLOCK_R=16, BLOCK_Q=32)),
        (knn_rows._knn_merge_kernel, i64, dict(K=16)),
        (sym_eig._sym_eig_kernel, {}, dict(K=64, MAX_SWEEPS=20, TOL=1e-7)),
        (cloud._cloud_radii_kernel, {**i64, **f}, dict(BLOCK=128)),
        (cloud._cloud_knn_partial_kernel, {**i64, **f, "x_ptr": "*bf16"}, dict(K=16, BLOCK_D=128)),
        (knn_rows._knn_partial_kernel, {**i64, "x_ptr": "*bf16"}, dict(SRC=1, K=16, BLOCK_D=128)),
        (knn_rows._knn_partial_kernel, {**i64, "x_ptr": "*fp16"}, dict(SRC=0, K=64, BLOCK_D=32)),
        (tangent._gram_kernel, {**i64, "g_ptr": "*bf16"}, dict(SRC=2, K=64, BLOCK_D=32, HAS_G=False)),
        (tangent._gram_kernel, {**i64, "g_ptr": "*bf16"}, dict(SRC=1, K=16, BLOCK_D=128, HAS_G=True)),
        (tangent._apply_kernel, {**i64, **f, "g_ptr": "*bf16", "ext_ptr": "*bf16", "out_ptr": "*bf16"},
         dict(SRC=1, K=16, BLOCK_D=128, HAS_G=True, EXT=1, NORM=False)),
        (tangent._apply_kernel, {**i64, **f, "ext_ptr": "*fp16", "out_ptr": "*fp16"},
         dict(SRC=2, K=16, BLOCK_D=128, HAS_G=False, EXT=2, NORM=False)),
        (tangent._apply_kernel, {**i64, **f, "x_ptr": "*bf16"}, dict(SRC=2, K=16, BLOCK_D=128, HAS_G=False, EXT=0,
                                                                     NORM=True)),
        (tangent._scale_kernel, {"ext_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK_D=128, NB=32, HAS_EXT=True)),
        (tangent._coef_kernel, f, dict(PULL=True, K=64, MAX_SWEEPS=20, TOL=1e-7, PHASE=0)),
        (tangent._coef_kernel, f, dict(PULL=False, K=16, MAX_SWEEPS=20, TOL=1e-7, PHASE=1)),
        (tangent._coef_kernel, f, dict(PULL=False, K=16, MAX_SWEEPS=20, TOL=1e-7, PHASE=2)),
        (adaln._layernorm_modulate_kernel, {"x_ptr": "*bf16", "shift_ptr": "*bf16", "scale_ptr": "*bf16",
                                            "out_ptr": "*bf16", "sxb": "i64", "inv_c": "fp32", "eps": "fp32"},
         dict(SCALE_KIND=1, OUT_KIND=1, ROWS=2, BLOCK_C=2048)),
        (adaln._layernorm_modulate_kernel, {"x_ptr": "*fp16", "shift_ptr": "*bf16", "inv_c": "fp32", "eps": "fp32",
                                            "out_ptr": "*fp16"}, dict(SCALE_KIND=0, OUT_KIND=2, ROWS=1, BLOCK_C=4096)),
        (adaln._gate_residual_kernel, {"x_ptr": "*bf16", "gate_ptr": "*bf16", "y_ptr": "*bf16", "out_ptr": "*bf16",
                                       "sxb": "i64", "syb": "i64"}, dict(PROD_KIND=1, OUT_KIND=1, ROWS=8, BLOCK_C=256)),
        (adaln._gate_residual_kernel, {"x_ptr": "*fp16", "gate_ptr": "*fp16", "y_ptr": "*fp32", "out_ptr": "*fp16"},
         dict(PROD_KIND=0, OUT_KIND=2, ROWS=64, BLOCK_C=32)),
        # DiT-XL/2's head dim 72 = 64 + 16, bf16 (the GPU path); one slab, fp16; fp32 with IEEE dots
        (attention._attention_fwd_kernel, {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16",
                                           "qk_scale": "fp32", "sqb": "i64"},
         dict(HEAD_DIM=72, D0=64, D1=16, BLOCK_M=128, BLOCK_N=64, IEEE=False, EMULATE_BF16=False)),
        # ... and with the launch options it runs with at DiT-XL/2's shape (kernels.attention.default_config)
        (attention._attention_fwd_kernel, {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16",
                                           "qk_scale": "fp32"},
         dict(HEAD_DIM=72, D0=64, D1=16, BLOCK_M=128, BLOCK_N=64, IEEE=False, EMULATE_BF16=False),
         {k: v for k, v in attention.default_config(256, 256, 72).items() if k.startswith("num_")},
         # what Triton specialises at run time for FusedDiT's views: 16-divisible pointers and strides
         # (all but the head stride 72), which turns on vectorised loads and cp.async pipelining
         ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "sqb", "sqn", "skb", "skn", "svb", "svn", "sob", "son")),
        (attention._attention_fwd_kernel, {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "o_ptr": "*fp16",
                                           "qk_scale": "fp32"},
         dict(HEAD_DIM=64, D0=64, D1=0, BLOCK_M=64, BLOCK_N=64, IEEE=False, EMULATE_BF16=False)),
        (attention._attention_fwd_kernel, {"qk_scale": "fp32"},
         dict(HEAD_DIM=40, D0=32, D1=16, BLOCK_M=64, BLOCK_N=32, IEEE=True, EMULATE_BF16=False)),
    ]


# Shared memory one block may use (opt-in maximum): H100 (sm_90), A100 (sm_80), A6000 / RTX 30xx (sm_86).
# A kernel over the limit compiles and then fails at launch, so it is checked here.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024}


def _compile_failure(fn, signature, constexprs, attrs, options, arch) -> str | None:
    """Compile for sm_<arch> to a cubin within the per-block shared memory; None, or what went wrong."""
    try:
        out = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                             target=GPUTarget("cuda", arch, 32), options=options)
        assert len(out.asm["cubin"]) > 0
        assert out.metadata.shared <= SHARED_LIMIT[arch], \
            f"{out.metadata.shared} B of shared memory, over sm_{arch}'s {SHARED_LIMIT[arch]}"
    except Exception as e:
        return f"{fn.__name__} {constexprs} {options} sm_{arch}: {type(e).__name__}: {str(e)[:800]}"
    return None


def test_kernels_compile_for_sm90_sm86_and_sm80():
    failures = []
    for fn, types, consts, *extra in _cases():
        options = {"num_warps": 8, "enable_fp_fusion": True, **(extra[0] if extra else {})}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in (extra[1] if len(extra) > 1 else ())}
        archs = (90, 86, 80) if fn.__name__ in ("_coef_kernel", "_knn_partial_kernel", "_attention_fwd_kernel") \
            else (90, 86)
        failures += [f for arch in archs
                     if (f := _compile_failure(fn, _signature(fn, types, consts), consts, attrs, options, arch))]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------- the launches production makes
class _Recorder:
    """Stand-in for the GPU: every kernel launch is recorded as Triton's run-time would compile it (its
    signature, constexprs, the specialisations Triton derives from the arguments - 16-divisible pointers
    and ints, ints equal to 1 - and the launch options), and neither compiled nor run."""

    class _Driver:   # the three calls JITFunction.run makes before it compiles
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    def __init__(self, monkeypatch):
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        self.launches = {}

        def record(fn, key, signature, device, constexprs, options, attrs, warmup):
            opts = {k: getattr(options, k) for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
            ident = (fn.__name__, str(signature), str(constexprs), str(attrs), str(opts))
            self.launches.setdefault(ident, (fn, signature, constexprs, attrs, opts))
            return None                                   # JITFunction.run: nothing compiled, nothing launched

        monkeypatch.setattr(driver, "_active", self._Driver())
        monkeypatch.setattr(JITFunction, "_do_compile", record)
        # JIT caches of the stand-in's target, dropped afterwards (a GPU machine's real launches come later)
        import collections
        import importlib
        import pkgutil

        for info in pkgutil.iter_modules(kernels.__path__):
            module = importlib.import_module(f"{kernels.__name__}.{info.name}")
            for fn in vars(module).values():
                if isinstance(fn, JITFunction):
                    monkeypatch.setattr(fn, "device_caches", collections.defaultdict(fn.create_binder))
        monkeypatch.setattr(kernels, "triton_device_ok", lambda device: True)


def _production_launches(monkeypatch):
    """Drive every fused op at the shapes and dtypes the GPU runs (DiT-XL/2 and SD-1.5 latents, k up to
    64, the DiT-XL/2 block ops and attention), with the in-kernel and the external (CUDA C++) eigen-step."""
    import torch

    from manifoldgd_fast import dit_ops, ops
    from manifoldgd_fast.kernels import cuda_ext

    monkeypatch.setattr(cuda_ext, "sym_eig", lambda A, max_sweeps, tol: (A.new_empty(A.shape[:2]), torch.empty_like(A)))
    B = 4
    for eig in ("triton", "cuda"):
        monkeypatch.setattr(ops, "_eig_backend", lambda device, eig=eig: eig)
        for D in (4096, 16384):
            for dtype, k in ((torch.bfloat16, 10), (torch.float32, 64), (torch.float16, 30)):
                lat = torch.randn(600, D).to(dtype)
                order = torch.stack([torch.randperm(600)[:300] for _ in range(B)])
                x, g, eps = (torch.randn(B, D) for _ in range(3))
                ops.manifold_correct_fused(x, lat, order, torch.full((B,), 300), g, alpha_bar=0.5, seed=1, step=3,
                                           k=k, d=3, eps=eps, backend="triton")
                ops.manifold_correct(x, lat[order[:, :80]], g, k=k, d=3, backend="triton")
            x, modes, mean = (torch.randn(B, D) for _ in range(3))
            ops.manifold_pull_fused(x, modes, radius=0.1, alpha_bar=0.4, seed=2, step=40, n_points=300, k=12, d=3,
                                    mean=mean, backend="triton")
            ops.manifold_pull(x, torch.randn(B, 300, D), k=12, d=3, backend="triton")
    for n in (10, 33, 64):
        ops.sym_eig(torch.randn(B, n, n), backend="triton")
    for dh in (72, 160, 256):   # fp32 (the default --dtype): its own tiles fit an A6000's 99 KB
        q, k, v = torch.randn(B, 256, 3, 4, dh).permute(2, 0, 3, 1, 4).unbind(0)
        dit_ops.attention(q, k, v, backend="triton")
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(B, 256, 1152).to(dtype)
        mods = torch.randn(B, 6, 1152).to(dtype)
        dit_ops.layernorm_modulate(x, mods[:, 0], mods[:, 1], backend="triton")
        dit_ops.layernorm_modulate(x.float(), mods[:, 0], mods[:, 1].float(), backend="triton")
        dit_ops.gate_residual(x, mods[:, 2], x, backend="triton")
        dit_ops.gate_residual(x.float(), mods[:, 2], x, backend="triton")
        q, k, v = torch.randn(B, 256, 3, 16, 72).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)   # FusedDiT's views
        dit_ops.attention(q, k, v, backend="triton")


def _recorder_reason():
    """Why this Triton's internals do not take the stand-in driver (the hooks are Triton >= 3.5's), or None."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if not hasattr(driver, "_active") or not hasattr(JITFunction, "_do_compile"):
        return (f"the stand-in driver hooks triton.runtime.driver._active and JITFunction._do_compile, which "
                f"Triton {triton.__version__} does not have (3.5 and later do)")
    return None


def test_production_launches_compile_and_fit(monkeypatch):
    """The launches the fused paths make at production shapes compile for sm_90 (H100) and sm_86 (A6000,
    the smallest shared memory of the GPUs we target) with their own options and specialisations, and fit
    the per-block shared memory (a kernel over it compiles and then fails at launch)."""
    if _recorder_reason():
        pytest.skip(_recorder_reason())
    rec = _Recorder(monkeypatch)
    _production_launches(monkeypatch)
    names = {ident[0] for ident in rec.launches}
    assert names >= {"_knn_partial_kernel", "_knn_merge_kernel", "_gram_kernel", "_coef_kernel", "_apply_kernel",
                     "_scale_kernel",
                     "_cloud_radii_kernel", "_cloud_knn_partial_kernel", "_sym_eig_kernel",
                     "_layernorm_modulate_kernel", "_gate_residual_kernel", "_attention_fwd_kernel"}, names
    failures = [f for fn, signature, constexprs, attrs, opts in rec.launches.values() for arch in (90, 86)
                if (f := _compile_failure(fn, signature, constexprs, attrs, opts, arch))]
    assert not failures, "\n".join(failures)

