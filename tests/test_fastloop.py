"""The fast loop (static step, pre-drawn noise, CUDA graphs) against the reference loop.

Tolerances: float32 on the same device runs the very same ops as the reference loop,
so latents must be equal bit for bit; bf16 autocast is compared with the float32
reference at the bound stated in ``BF16_ATOL`` (a tiny random DiT; the DiT-XL/2 bound
is measured by bench/bench_sampling.py). On CUDA the graph replay must equal the eager
fast loop bit for bit (same kernels), and the reference loop at 1e-5 (cuBLAS may pick
other kernels for other allocation patterns).
"""
import pytest
import torch
from conftest import requires_cuda, triton_interpreting
from graph_emulation import TracedStep, emulate_cuda_graphs

from manifoldgd_fast.config import DistillConfig
from manifoldgd_fast.errors import ConfigError
from manifoldgd_fast.fastloop import FastSampler, predraw_noise
from manifoldgd_fast.guidance import Guidance, paper_neighbourhoods
from manifoldgd_fast.models import build_dit, tiny_dit_config
from manifoldgd_fast.profile import profiling
from manifoldgd_fast.sampler import Sampling, sample
from manifoldgd_fast.schedule import make_schedule

NULL = 3
BF16_RTOL = 0.05   # |bf16 - fp32| / |fp32| of the final latents, 10 steps of the trained digits DiT


@pytest.fixture(scope="module")
def model():
    return build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)


def _gens(seeds, device="cpu"):
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _setup(model, *, method="manifoldgd", formulation="official", sampler="ddpm", ddim_eta=0.0, noise="philox",
           B=3, steps=10, device="cpu", cgs=False, dtype=None, seed=0):
    cfg = DistillConfig(method=method, formulation=formulation, sampler=sampler, ddim_eta=ddim_eta, steps=steps,
                        t_stop=5, ipc=B, guidance_noise=noise, cgs=cgs).resolve(10, device)
    sched = make_schedule(steps, sampler, device=device)
    run = Sampling(model, sched, NULL, cfg_scale=4.0, formulation=formulation, ddim_eta=ddim_eta,
                   autocast_dtype=dtype)
    g = torch.Generator(device=device).manual_seed(100 + seed)
    lat = torch.randn(40, 256, generator=g, device=device)
    modes = lat[:B] + 0.1 * torch.randn(B, 256, generator=g, device=device)
    kw = {}
    if formulation == "paper" and method == "manifoldgd":
        kw = paper_neighbourhoods(cfg, lat, modes)
    # CGS's set is one class
    y = torch.tensor([1] * B if cgs else [0, 2, 1, 0, 1][:B], device=device)

    def fresh():
        gens = _gens([seed * 10 + b for b in range(B)], device)
        x_T = torch.stack([torch.randn(4, 8, 8, generator=gg, device=device) for gg in gens])
        gd = None
        if method in ("manifoldgd", "mgd3"):
            gd = Guidance(cfg, sched, modes.view(B, 4, 8, 8), gens, noise_seed=7,
                          sample_ids=[5 * b + 1 + 100 * seed for b in range(B)], **kw)
        cg = None
        if cgs:
            from manifoldgd_fast.cgs import CGS
            cg = CGS.for_run(cfg, lat.view(40, 4, 8, 8).mean(0))
        return x_T, y, gens, gd, cg
    return run, fresh


def _reference(run, fresh):
    x_T, y, gens, gd, cg = fresh()
    norms = []
    x = sample(run.model, run.schedule, x_T, y, null_class=run.null_class, cfg_scale=run.cfg_scale,
               formulation=run.formulation, ddim_eta=run.ddim_eta, guidance=gd, generators=gens,
               autocast_dtype=run.autocast_dtype, cgs=cg,
               callback=lambda i, z: norms.append(z.flatten(1).norm(dim=1)))
    return x, torch.stack(norms, 1)


CASES = [
    dict(method="dit"),
    dict(method="manifoldgd"),                                   # official, learned-sigma DDPM
    dict(method="manifoldgd", sampler="ddim"),
    dict(method="mgd3", sampler="ddim", ddim_eta=0.5, noise="generator"),
    dict(method="manifoldgd", formulation="paper"),
    dict(method="mgd3", formulation="paper", noise="generator"),
    dict(method="manifoldgd", cgs=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_loop_equals_reference_fp32(model, one_thread, case, seed):
    run, fresh = _setup(model, seed=seed, **case)
    want_x, want_n = _reference(run, fresh)
    x_T, y, gens, gd, cg = fresh()
    got_x, got_n = FastSampler(run).sample(x_T, y, gens, guidance=gd, cgs=cg)
    assert torch.equal(got_x, want_x)
    assert torch.equal(got_n, want_n)


@pytest.fixture(scope="module")
def digits_dit():
    from manifoldgd_fast.models import load_dit
    from manifoldgd_fast.shipped import verify_shipped

    return load_dit(verify_shipped())


@pytest.mark.parametrize("method", ["dit", "manifoldgd"])
def test_fast_loop_bf16(digits_dit, one_thread, method):
    """bf16 autocast: the reference loop's bf16 latents exactly; near the fp32 ones (the shipped,
    trained digits DiT: a random DiT under CFG 4 amplifies any rounding chaotically)."""
    run, fresh = _setup(digits_dit, method=method, dtype=torch.bfloat16)
    run.null_class = 10
    ref16, _ = _reference(run, fresh)
    x_T, y, gens, gd, cg = fresh()
    got, _ = FastSampler(run).sample(x_T, y, gens, guidance=gd)
    assert torch.equal(got, ref16)
    run32, fresh32 = _setup(digits_dit, method=method)
    run32.null_class = 10
    ref32, _ = _reference(run32, fresh32)
    rel = ((got - ref32).norm() / ref32.norm()).item()
    assert 0 < rel < BF16_RTOL, rel


def test_predraw_noise_is_the_reference_sequence():
    run = Sampling(None, make_schedule(6, "ddpm"), NULL)
    noise = predraw_noise(run, (2, 3), _gens([4, 5]), "cpu")
    assert noise.shape == (6, 2, 2, 3) and torch.equal(noise[0], torch.zeros(2, 2, 3))   # the last step draws none
    gens = _gens([4, 5])
    for i in reversed(range(1, 6)):
        want = torch.stack([torch.randn(2, 3, generator=g) for g in gens])
        assert torch.equal(noise[i], want)
    assert predraw_noise(Sampling(None, make_schedule(5, "ddim"), NULL), (2, 3), gens, "cpu") is None


def test_fast_loop_refuses_generator_cloud_noise(model):
    run, fresh = _setup(model, noise="generator")
    x_T, y, gens, gd, _ = fresh()
    with pytest.raises(ConfigError, match="guidance-noise philox"):
        FastSampler(run).sample(x_T, y, gens, guidance=gd)
    with pytest.raises(ConfigError, match="guidance-noise philox"):
        DistillConfig(loop="fast", guidance_noise="generator").validate()
    # without a manifold term nothing draws cloud / patch noise: taken, and the reference loop's latents
    from manifoldgd_fast.sampler import sample

    for formulation, off in (("official", {"manifold_scale": 0.0}), ("paper", {"lambda_n": 0.0})):
        cfg = DistillConfig(loop="fast", guidance_noise="generator", formulation=formulation, t_stop=5, steps=10,
                            ipc=3, **off).validate().resolve(10, "cpu")
        run, fresh = _setup(model, formulation=formulation, noise="generator")
        x_T, y, gens, gd, _ = fresh()
        gd.cfg = cfg
        fast, _ = FastSampler(run).sample(x_T, y, gens, guidance=gd)
        x_T, y, gens, gd, _ = fresh()
        gd.cfg = cfg
        ref = sample(model, run.schedule, x_T, y, null_class=NULL, formulation=formulation, generators=gens,
                     guidance=gd)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_cuda_graph_needs_cuda(model):
    run, fresh = _setup(model, method="dit")
    x_T, y, gens, _, _ = fresh()
    with pytest.raises(ConfigError, match="not on CUDA"):
        FastSampler(run, cuda_graph=True).sample(x_T, y, gens)


def test_a_failed_capture_stops_the_run_with_the_way_out(model, monkeypatch):
    """A capture that fails despite the blocker may leave torch's allocator in capture mode: the run stops
    with one line naming --loop reference, rather than going on eagerly in the same process."""
    from manifoldgd_fast import fastloop
    from manifoldgd_fast.errors import BackendError

    run, fresh = _setup(model, method="dit")
    x_T, y, gens, _, _ = fresh()

    def failing(self, *a):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(fastloop, "_graph_blocker", lambda *a: None)
    monkeypatch.setattr(FastSampler, "_sample_graphed", failing)
    with pytest.raises(BackendError) as e:
        FastSampler(run, cuda_graph=True).sample(x_T, y, gens)
    assert str(e.value) == ("CUDA graph capture failed (RuntimeError: operation not permitted when stream is "
                            "capturing); rerun with --loop reference (no graphs; finished classes are kept) and "
                            "please report it")


def test_fast_loop_profiles_its_steps(model, one_thread):
    run, fresh = _setup(model, method="manifoldgd")
    x_T, y, gens, gd, _ = fresh()
    with profiling("cpu") as prof:
        FastSampler(run).sample(x_T, y, gens, guidance=gd)
    rep = prof.report()
    assert rep["steps"] == 10 and rep["phases"]["dit_forward"]["total_ms"] > 0
    assert rep["guidance_overhead"] is not None and rep["guidance_overhead"] > 0


# ---------------------------------------------------------------------------- CUDA graphs, emulated on the CPU
# the paper formulation's reference patch builder sizes the patch from the lengths on the host: its graphs
# run on the fused kernels (tests/test_kernels_triton.py, under the interpreter here)
GRAPH_CASES = [c for c in CASES if not (c.get("formulation") == "paper" and c["method"] == "manifoldgd")]


@pytest.mark.parametrize("case,dtype", [(c, None) for c in GRAPH_CASES] + [(dict(method="manifoldgd"), torch.bfloat16)],
                         ids=lambda v: "-".join(f"{x}" for x in v.values()) if isinstance(v, dict) else str(v))
def test_emulated_graphs_replay_the_eager_loop_for_every_class(model, one_thread, monkeypatch, case, dtype):
    """The graph loop's plumbing without a GPU (tests/graph_emulation.py): each step frozen once, with
    its scalars baked in; then other classes (other modes, ids, labels, noise) replayed through the
    static buffers give the eager loop's bits, and nothing in a step reads the host or draws noise."""
    if triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1 runs the fused kernels in the step on the CPU, and make_fx (the emulated "
                    "capture) cannot trace the interpreter's raw-storage reads; compiled kernels are captured on "
                    "a GPU by test_kernels_triton.py::test_fused_step_captures_in_a_cuda_graph")
    emulate_cuda_graphs(monkeypatch)
    run, fresh_a = _setup(model, dtype=dtype, seed=0, **case)
    _, fresh_b = _setup(model, dtype=dtype, seed=1, **case)
    fast = FastSampler(run, cuda_graph=True)
    for fresh, flip in ((fresh_a, False), (fresh_b, True), (fresh_a, False)):
        got, want = [None, None]
        for j, sampler in enumerate((fast, FastSampler(run, cuda_graph=False))):
            x_T, y, gens, gd, cg = fresh()
            out = sampler.sample(x_T, y.flip(0) if flip else y, gens, guidance=gd, cgs=cg)
            got, want = (out, want) if j == 0 else (got, out)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(fast._sets) == 1 and fast.cuda_graph is not False   # one capture, no eager fallback


def test_emulated_graphs_recapture_when_the_cgs_settings_change(model, one_thread, monkeypatch):
    """The CGS step sizes, ridge and steps are baked into a captured step: a sampler that meets other
    settings (a library calling it with several CGS objects) captures anew, never replays stale ones;
    another class mean of the same shape is a static buffer and replays."""
    from manifoldgd_fast.cgs import CGS

    if triton_interpreting():
        pytest.skip("make_fx (the emulated capture) cannot trace the interpreter's raw-storage reads")
    emulate_cuda_graphs(monkeypatch)
    run = Sampling(model, make_schedule(6, "ddpm"), NULL, cfg_scale=4.0)
    zero, one = torch.zeros(4, 8, 8), torch.ones(4, 8, 8)
    fast = FastSampler(run, cuda_graph=True)
    settings = [dict(eta_dpp=1.0, eta_dm=0.1), dict(eta_dpp=500.0, eta_dm=0.1), dict(eta_dpp=1.0, eta_dm=1.5),
                dict(eta_dpp=1.0, eta_dm=1.5, eps=0.5), dict(eta_dpp=1.0, eta_dm=1.5, eps=0.5, steps=[5])]
    outs = []
    for n, (mu, kw) in enumerate([(zero, k) for k in settings] + [(one, settings[-1])]):
        got = want = None
        for j, sampler in enumerate((fast, FastSampler(run, cuda_graph=False))):
            gens = _gens(range(3))
            x_T = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
            out = sampler.sample(x_T, torch.full((3,), 1), gens, cgs=CGS(mu, **kw))[0]
            got, want = (out, want) if j == 0 else (got, out)
        assert torch.equal(got, want), kw
        outs.append(got)
        assert len(fast._sets) == min(n + 1, len(settings))   # a capture per setting; the last mean replays
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))


def test_emulated_graphs_recapture_for_another_noise_key_guidance_or_batch(model, one_thread, monkeypatch):
    """The graph key holds what a captured step bakes in beyond the static buffers: the guidance noise's seed
    (Philox's key), the guidance settings (lambda_m, scale, window) and the batch shape. A sampler that meets
    another of any captures anew and equals the eager loop (a stale replay, or a smaller batch broadcast into
    the captured one, passed the other tests, which keep all three fixed)."""
    if triton_interpreting():
        pytest.skip("make_fx (the emulated capture) cannot trace the interpreter's raw-storage reads")
    emulate_cuda_graphs(monkeypatch)
    sched = make_schedule(6, "ddpm")
    run = Sampling(model, sched, NULL, cfg_scale=4.0)
    modes = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    fast = FastSampler(run, cuda_graph=True)
    base = dict(method="manifoldgd", steps=6, t_stop=2, ipc=3, guidance_noise="philox")
    cases = [(dict(), 7, 3), (dict(), 8, 3), (dict(lambda_m=0.5), 8, 3), (dict(manifold_scale=3.0), 8, 3),
             (None, None, 3), (None, None, 1)]   # (None: plain DiT steps, no guidance: only x_T shows the batch)
    outs = []
    for n, (extra, seed, B) in enumerate(cases):
        cfg = None if extra is None else DistillConfig(**{**base, **extra, "ipc": B}).resolve(10, "cpu")
        got = want = None
        for j, sampler in enumerate((fast, FastSampler(run, cuda_graph=False))):
            gens = _gens(range(B))
            x_T = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
            gd = None if cfg is None else Guidance(cfg, sched, modes[:B], gens, noise_seed=seed,
                                                   sample_ids=list(range(B)))
            out = sampler.sample(x_T, torch.tensor([0, 2, 1][:B]), gens, guidance=gd)[0]
            got, want = (out, want) if j == 0 else (got, out)
        assert got.shape[0] == B and torch.equal(got, want), (extra, seed, B)
        outs.append(got)
        assert len(fast._sets) == n + 1, (extra, seed, B)
    assert all(not torch.equal(a, b) for a, b in zip(outs[:3], outs[1:4]))


def test_graph_emulation_refuses_what_capture_cannot_take():
    """The emulation's own check: a data-dependent shape or a random draw in a step is refused."""
    from torch.fx.experimental.proxy_tensor import make_fx

    t = torch.tensor([0.0, 1.0, 2.0])
    A = torch.eye(3) + 0.1
    for step in (lambda: torch.nonzero(t), lambda: t + torch.randn(3), lambda: t[t > 0], lambda: torch.randn_like(t),
                 lambda: torch.linalg.cholesky(A), lambda: torch.linalg.eigh(A)[0], lambda: torch.linalg.solve(A, A),
                 lambda: t * torch.tensor([1.0, 2.0, 3.0]), lambda: torch.bincount(t.long())):
        with pytest.raises(AssertionError, match="cannot be captured"):
            TracedStep(make_fx(step, tracing_mode="real")())
    with pytest.raises(RuntimeError):
        make_fx(lambda: t * float(t.sum()), tracing_mode="real")()       # a host read, as under capture
    TracedStep(make_fx(lambda: t * 2, tracing_mode="real")())
    TracedStep(make_fx(lambda: torch.linalg.cholesky_ex(A)[0] + torch.full((3,), 2.0), tracing_mode="real")())


# ---------------------------------------------------------------------------- CUDA graphs (GPU only)
@requires_cuda()
@pytest.mark.parametrize("case", [dict(method="dit"), dict(method="mgd3"), dict(method="manifoldgd"),
                                  dict(method="manifoldgd", sampler="ddim"), dict(method="manifoldgd", cgs=True),
                                  dict(method="manifoldgd", formulation="paper")],
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_graph_loop_equals_eager_on_cuda(case, dtype):
    m = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1).cuda()
    run, fresh = _setup(m, device="cuda", dtype=dtype, **case)
    x_T, y, gens, gd, cg = fresh()
    eager = FastSampler(run, cuda_graph=False).sample(x_T, y, gens, guidance=gd, cgs=cg)
    fast = FastSampler(run, cuda_graph=True)
    for _ in range(2):  # capture, then a pure replay
        x_T, y, gens, gd, cg = fresh()
        got = fast.sample(x_T, y, gens, guidance=gd, cgs=cg)
        assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
    assert len(fast._sets) == 1 and fast.cuda_graph is not False   # captured once, no fallback
    if dtype is None:  # bf16: the graph equals the eager fast loop above; the fp32 bound is the CPU test's
        ref, _ = _reference(run, fresh)
        torch.testing.assert_close(got[0], ref, atol=1e-5, rtol=1e-5)


@requires_cuda()
def test_graph_serves_other_modes_and_ids_without_recapture():
    """Static buffers: a second class (other modes, other noise ids) replays the same graphs."""
    m = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1).cuda()
    run, fresh_a = _setup(m, device="cuda", seed=0)
    _, fresh_b = _setup(m, device="cuda", seed=1)
    fast = FastSampler(run, cuda_graph=True)
    for fresh in (fresh_a, fresh_b):
        x_T, y, gens, gd, _ = fresh()
        got = fast.sample(x_T, y, gens, guidance=gd)
        x_T, y, gens, gd, _ = fresh()
        want = FastSampler(run, cuda_graph=False).sample(x_T, y, gens, guidance=gd)
        assert torch.equal(got[0], want[0])
    assert len(fast._sets) == 1


# ---------------------------------------------------------------------------- through the pipeline
@pytest.mark.parametrize("extra", [[], ["--method", "mgd3", "--sampler", "ddim"], ["--cgs", "--class-batch", "1"],
                                   ["--formulation", "paper", "--class-batch", "1"], ["--class-batch", "2"],
                                   ["--cgs", "--class-batch", "2"], ["--formulation", "paper", "--class-batch", "2"]])
def test_pipeline_fast_loop_writes_the_reference_bytes(tiny_world, tmp_path, extra):
    import os

    from test_pipeline import _args, _digest

    from manifoldgd_fast.cli import main

    common = ["--guidance-noise", "philox", *extra]
    assert main(_args(tiny_world, tmp_path / "ref", "--loop", "reference", *common)) == 0
    # ManifoldGD's default (auto) noise is philox under --loop fast, on the CPU too
    assert main(_args(tiny_world, tmp_path / "fast", "--loop", "fast", *(common if extra else []))) == 0
    ref, fast = _digest(tmp_path / "ref"), _digest(tmp_path / "fast")
    assert ref == fast and len(ref) == 9   # 3 classes x (2 PNGs + latents)
    import json
    a = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    b = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    assert a["fingerprint"] == b["fingerprint"]
    assert (a["classes"]["apple"]["trajectory_variance"] == b["classes"]["apple"]["trajectory_variance"])
    assert os.path.isfile(tmp_path / "fast" / "contact_sheet.png")


def test_compile_needs_the_fast_loop():
    with pytest.raises(ConfigError, match="--compile applies to the fast loop"):
        DistillConfig(loop="reference", compile="default").validate()


def test_compiled_dit_in_the_fast_loop(model, one_thread):
    """torch.compile (inductor, CPU here) changes the DiT's numerics in the last bits only."""
    run, fresh = _setup(model, method="manifoldgd")
    ref, _ = _reference(run, fresh)
    x_T, y, gens, gd, _ = fresh()
    got, _ = FastSampler(run, compile="default").sample(x_T, y, gens, guidance=gd)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-3, rel


def test_attention_backend_math_matches_default(model, one_thread):
    """--attention picks the SDPA backend: 'math' instead of the CPU's fused kernel, the same up to rounding."""
    run, fresh = _setup(model, method="dit")
    want, _ = _reference(run, fresh)
    run.attention = "math"
    x_T, y, gens, _, _ = fresh()
    got, _ = FastSampler(run).sample(x_T, y, gens)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    with pytest.raises(ConfigError, match="--attention"):
        DistillConfig(attention="fast").validate()


def test_overlapped_mode_discovery_writes_the_same_bytes(tiny_world, tmp_path, monkeypatch):
    """Modes of class c+1 discovered on a background thread while class c samples: same bytes."""
    from test_pipeline import _args, _digest

    from manifoldgd_fast import classrun
    from manifoldgd_fast.cli import main

    common = ["--formulation", "paper", "--guidance-noise", "philox"]
    assert main(_args(tiny_world, tmp_path / "seq", *common)) == 0
    threads = set()
    real = classrun.class_inputs

    def spy(*a, **k):
        import threading
        threads.add(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(classrun, "PREFETCH_ON_CPU", True)
    monkeypatch.setattr(classrun, "class_inputs", spy)
    assert main(_args(tiny_world, tmp_path / "overlap", *common)) == 0
    assert threads and all(t.startswith("manifoldgd-modes") for t in threads)
    assert _digest(tmp_path / "seq") == _digest(tmp_path / "overlap")


def test_auto_graphs_step_aside_for_the_profiler(model, monkeypatch):
    """Under an active profiler the auto mode runs eagerly, so every phase is timed."""
    from manifoldgd_fast import fastloop

    run, fresh = _setup(model, method="dit")
    x_T, y, gens, _, _ = fresh()
    monkeypatch.setattr(fastloop, "_graph_blocker", lambda *a: None)   # pretend CUDA
    calls = []
    monkeypatch.setattr(FastSampler, "_sample_graphed", lambda self, *a: calls.append("graph") or (x_T, None))
    with profiling("cpu"):
        FastSampler(run).sample(x_T, y, gens)
    assert calls == []
    FastSampler(run).sample(x_T, y, gens)
    assert calls == ["graph"]


@requires_cuda()
@pytest.mark.parametrize("extra", [[], ["--method", "mgd3"], ["--cgs"], ["--formulation", "paper"]])
def test_pipeline_on_cuda_graphs_and_async_outputs(tiny_world, tmp_path, extra):
    """On CUDA: the graph loop, the prefetch on a side stream and the copy-stream outputs write the
    bytes the eager reference loop writes on the same GPU."""
    from test_pipeline import _args, _digest

    from manifoldgd_fast.cli import main

    common = ["--device", "cuda", "--guidance-noise", "philox", *extra]
    assert main(_args(tiny_world, tmp_path / "ref", "--loop", "reference", *common)) == 0
    assert main(_args(tiny_world, tmp_path / "fast", "--loop", "fast", *common)) == 0
    assert _digest(tmp_path / "ref") == _digest(tmp_path / "fast")


def test_graph_blocker_names_manifold_runs_that_cannot_be_captured(monkeypatch):
    """ManifoldGD's reference ops sync with the host (the paper patch's lengths, the official cloud's eigh,
    host-built noise counters): such runs go eager up front (auto) or are refused (forced graphs) instead of
    failing mid-capture, in both formulations; a run without the manifold term is never blocked by it."""
    from types import SimpleNamespace

    from manifoldgd_fast import dispatch, fastloop

    cuda = torch.device("cuda")

    def guidance(backend="auto", B=4, n=300, k=10, formulation="paper", width=None, cloud=300, scale=0.1,
                 lambda_n=1.0, manifold=True):
        cfg = SimpleNamespace(formulation=formulation, backend=backend, k=k, cloud_size=cloud, manifold_scale=scale,
                              lambda_n=lambda_n)
        g = SimpleNamespace(manifold=manifold, cfg=cfg, modes=torch.zeros(B, 16), latents=torch.zeros(n, 16),
                            order=torch.zeros(B, width or n, dtype=torch.long))
        g.manifold_term = Guidance.manifold_term.fget(g)   # Guidance's own rule, on this stand-in
        return g

    monkeypatch.setattr(dispatch, "_kernels", lambda: (object(), None))   # as if the fused kernels imported
    assert fastloop._graph_blocker(None, cuda, guidance()) is None
    assert fastloop._graph_blocker(None, cuda, guidance(formulation="official")) is None
    for official in (False, True):
        kw = dict(formulation="official") if official else {}
        assert "--backend auto or triton" in fastloop._graph_blocker(None, cuda, guidance(backend="reference", **kw))
        # no manifold term (mgd3, or its weight 0): the reference ops never run, nothing blocks
        assert fastloop._graph_blocker(None, cuda, guidance(backend="reference", manifold=False, **kw)) is None
        off = dict(scale=0.0) if official else dict(lambda_n=0.0)
        assert fastloop._graph_blocker(None, cuda, guidance(backend="reference", **off, **kw)) is None
    assert "the row count = 100001 is above" in fastloop._graph_blocker(
        None, cuda, guidance(formulation="official", cloud=100_001))
    assert "B = 300 is above" in fastloop._graph_blocker(None, cuda, guidance(formulation="official", B=300))
    assert "B = 300 is above" in fastloop._graph_blocker(None, cuda, guidance(B=300))
    assert "k = 65 is above" in fastloop._graph_blocker(None, cuda, guidance(k=65))
    # the kernels' row limit is on each row's order (its class), not on the stacked latents of a class batch
    assert fastloop._graph_blocker(None, cuda, guidance(n=3 * dispatch.MAX_ROWS, width=1300)) is None
    assert fastloop._graph_blocker(None, cuda, guidance(n=99_000)) is None       # its bucket stops at the limit
    assert "the row count = 100096 is above" in fastloop._graph_blocker(None, cuda, guidance(n=100_001))
    monkeypatch.setattr(dispatch, "_kernels", lambda: (None, "no triton here"))
    assert "no triton here" in fastloop._graph_blocker(None, cuda, guidance())
    assert fastloop._graph_blocker(None, torch.device("cpu"), None) == "not on CUDA"


def test_fast_sampler_checks_its_inputs(model):
    run, fresh = _setup(model, method="dit")
    x_T, y, gens, _, _ = fresh()
    with pytest.raises(ConfigError, match=r"y must hold one class per sample"):
        FastSampler(run).sample(x_T, y[:-1], gens)
    with pytest.raises(ConfigError, match=r"generators: one per sample"):
        FastSampler(run).sample(x_T, y, gens[:1])
    with pytest.raises(ConfigError, match="compile must be"):
        FastSampler(run, compile="fast")


def test_class_buffer_buckets_are_few_and_cover_their_rows():
    """The paper formulation's padded class buffers: every bucket holds its rows, is a multiple of PAD_ROWS,
    grows with n, wastes under a quarter beyond one PAD_ROWS, and an octave has four buckets at most. So one
    ImageNet class (732 to 1,300 rows) has 4 buckets, as before, and 12 classes stacked (8,784 to 15,600
    rows) have 4 too, where multiples of PAD_ROWS gave 27 graph sets."""
    from manifoldgd_fast.fastloop import PAD_ROWS, _padded_rows

    buckets = [_padded_rows(n) for n in range(1, 70_000)]
    assert all(b >= n and b % PAD_ROWS == 0 for n, b in enumerate(buckets, 1))
    assert all(a <= b for a, b in zip(buckets, buckets[1:]))
    assert all(b - n < max(PAD_ROWS, n / 4) for n, b in enumerate(buckets, 1))
    for k in range(8, 16):                              # octaves (2^k, 2^(k+1)]
        assert len(set(buckets[2 ** k:2 ** (k + 1)])) <= 4, k
    assert _padded_rows(1300) == 1536 and _padded_rows(PAD_ROWS + 10) == 2 * PAD_ROWS
    assert len({_padded_rows(n) for n in range(732, 1301)}) == 4
    assert len({_padded_rows(n) for n in range(12 * 732, 12 * 1300 + 1)}) == 4
    # the order buffer's width: at least the width, and within the kernels' limit wherever the width is (widths
    # 99,841 .. 100,000 were padded to 100,096, past it: the paper formulation fell back to the eager loop)
    from manifoldgd_fast.dispatch import MAX_ROWS
    from manifoldgd_fast.fastloop import _padded_width

    widths = {w: _padded_width(w) for w in range(1, MAX_ROWS + 1)}
    assert all(w <= b <= MAX_ROWS for w, b in widths.items())
    assert len(set(widths.values())) < 200 and _padded_width(MAX_ROWS + 1) > MAX_ROWS
    # the order's width (each row's class size) buckets the same way, but never past the kernels' row limit
    from manifoldgd_fast.dispatch import MAX_ROWS
    from manifoldgd_fast.fastloop import _padded_width

    widths = range(1, MAX_ROWS + 2 * PAD_ROWS)
    assert all(_padded_width(w) == _padded_rows(w) for w in range(1, 65_537))
    assert all(w <= _padded_width(w) <= MAX_ROWS for w in widths if w <= MAX_ROWS // PAD_ROWS * PAD_ROWS)
    assert _padded_rows(99_000) > MAX_ROWS and _padded_width(99_000) == MAX_ROWS // PAD_ROWS * PAD_ROWS
    assert _padded_width(MAX_ROWS + 1) == -(-(MAX_ROWS + 1) // PAD_ROWS) * PAD_ROWS > MAX_ROWS


def test_graph_key_holds_the_class_buffers_and_the_cgs_sets():
    """What a captured step bakes in that the emulated capture does not reach (the paper formulation's
    manifold term syncs with the host on the CPU): the padded class buffers' bucket (rows: the stacked
    latents; width: the widest class) and dtype, and the number of CGS sets in a batch of the same shape (a
    one-set class mean was broadcast into a two-set graph's buffer). Classes within a bucket share a key."""
    from manifoldgd_fast.cgs import CGS
    from manifoldgd_fast.guidance import merge_paper_neighbourhoods

    cfg = DistillConfig(method="manifoldgd", formulation="paper", steps=10, t_stop=5, ipc=2,
                        guidance_noise="philox").resolve(10, "cpu")
    sched = make_schedule(10, "ddpm")
    x_T, y = torch.zeros(2, 4, 8, 8), torch.tensor([0, 0])
    g = torch.Generator().manual_seed(0)

    def part(n, dtype=torch.float32):
        lat = torch.randn(n, 256, generator=g)
        kw = paper_neighbourhoods(cfg, lat, lat[:2])
        lat_dtype, dist_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)
        return dict(kw, class_latents=kw["class_latents"].to(lat_dtype), sorted_dists=kw["sorted_dists"].to(dist_dtype))

    def key(*sizes, dtype=torch.float32):
        parts = [part(n, dtype) for n in sizes]
        kw = parts[0] if len(parts) == 1 else merge_paper_neighbourhoods(parts, [(c, 0) for c in range(2)])
        gd = Guidance(cfg, sched, torch.randn(2, 4, 8, 8, generator=g), None, noise_seed=7, sample_ids=[0, 1], **kw)
        return FastSampler._signature(x_T, y, None, gd, None)

    assert key(40) == key(41) == key(256) != key(257)        # one class: buckets of PAD_ROWS rows
    assert key(100, 120) == key(90, 110) != key(200, 200)     # two classes: rows 220 / 200 (256), 400 (512) ...
    assert key(200, 200) != key(400)                          # ... and width 200 (256) / 400 (512), rows 512
    bf16, fp32 = torch.bfloat16, torch.float32                # (latents, sorted distances)
    assert len({key(40), key(40, dtype=(bf16, fp32)), key(40, dtype=(fp32, bf16))}) == 3
    mean = torch.randn(2, 4, 8, 8, generator=g)
    cgs = [FastSampler._signature(x_T, y, None, None, CGS(m, eta_dpp=1.0, eta_dm=0.1, sets=s))
           for m, s in ((mean[0], 1), (mean, 2), (mean[1], 1))]
    assert cgs[0] != cgs[1] and cgs[0] == cgs[2]


def test_static_class_buffers_hold_the_batch_and_nothing_of_the_last():
    """A bucket's static class buffers after a larger class of the same bucket: the rows and columns past this
    class are reset (distance +inf and order 0: never inside a patch; latents 0), and each row's class size is
    this class's, not the padded width (a stale distance put the last class's rows into this one's patch)."""
    from manifoldgd_fast.fastloop import _load_class_buffers

    cfg = DistillConfig(method="manifoldgd", formulation="paper", steps=10, t_stop=5, ipc=2,
                        guidance_noise="philox").resolve(10, "cpu")
    sched = make_schedule(10, "ddpm")
    g = torch.Generator().manual_seed(0)

    def guidance(n):
        lat = torch.randn(n, 256, generator=g)
        return Guidance(cfg, sched, lat[:2].view(2, 4, 8, 8), None, noise_seed=7, sample_ids=[0, 1],
                        **paper_neighbourhoods(cfg, lat, lat[:2]))

    big, small = guidance(200), guidance(50)
    static = FastSampler(None)._static_guidance(big)
    assert static.latents.shape[0] == static.order.shape[1] == 256
    _load_class_buffers(static, small)
    assert torch.equal(static.latents[:50], small.latents) and not static.latents[50:].any()
    assert torch.equal(static.order[:, :50], small.order) and not static.order[:, 50:].any()
    assert torch.equal(static.sorted_dists[:, :50], small.sorted_dists)
    assert torch.isinf(static.sorted_dists[:, 50:]).all()
    assert static.n_latents.tolist() == [50, 50]
    assert [r.tolist() for r in static.radii] == [[float(r)] * 2 for r in small.radii]
