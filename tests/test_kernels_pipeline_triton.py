"""The whole pipeline on every fused kernel at once (guidance kernels, fused DiT ops, our attention, the fast
loop), step by step and under emulated CUDA graphs, against the reference path; and the profiler's kernel phases.

Where these run: ``tests/triton_helpers.py`` (on the CPU under ``TRITON_INTERPRET=1``, which
``tests/test_kernels_interpreter.py`` sets in a child pytest; on a GPU the graph tests are
``tests/test_fastloop.py``'s). The kernels one by one: ``tests/test_kernels_triton.py``.
"""
import pytest
import torch

from manifoldgd_fast import ops

from triton_helpers import DEV, TRITON_MARKS, count_kernel_calls

pytestmark = TRITON_MARKS


@pytest.mark.parametrize("formulation", ["official", "paper"])
def test_distill_end_to_end_on_every_kernel(tiny_world, tmp_path, monkeypatch, formulation):
    """The CLI with every fused path at once (guidance kernels, fused DiT ops, our attention, the fast
    loop) against the all-reference run on the same seed: the same latents to float rounding. On a GPU
    this is the first thing to run (both runs on the GPU, never run there yet); here it runs the interpreted
    kernels inside the real pipeline."""
    from safetensors.torch import load_file
    from test_pipeline import _args

    from manifoldgd_fast.cli import main
    from manifoldgd_fast.kernels import adaln, attention

    common = ["--formulation", formulation, "--guidance-noise", "philox", "--device", DEV]
    ref, fast = tmp_path / "ref", tmp_path / "fast"
    assert main(_args(tiny_world, ref, *common, "--backend", "reference", "--loop", "reference")) == 0
    calls = count_kernel_calls(monkeypatch, (adaln, "layernorm_modulate", "gate_residual"), (attention, "attention"))
    assert main(_args(tiny_world, fast, *common, "--backend", "triton", "--loop", "fast",
                      "--dit-impl", "fused", "--attention", "triton")) == 0
    assert all(calls.values()), f"a DiT kernel the fused run should take was never called: {calls}"
    for c in ("apple", "banana", "cherry"):
        za = load_file(str(ref / "latents" / f"{c}.safetensors"))["latents"]
        zb = load_file(str(fast / "latents" / f"{c}.safetensors"))["latents"]
        assert ((za - zb).norm() / za.norm()).item() < 1e-3, c


def test_emulated_graphs_on_every_kernel(tiny_world, tmp_path, monkeypatch):
    """The fully fused fast loop with its steps captured once and replayed for every class (CUDA graphs
    emulated on the CPU: tests/graph_emulation.py; the kernels are opaque custom ops with each step's
    scalars baked in) writes the bytes of the same path run step by step."""
    if DEV != "cpu":
        pytest.skip("on a GPU, tests/test_fastloop.py captures real CUDA graphs")
    from graph_emulation import emulate_cuda_graphs
    from test_pipeline import _args, _digest

    from manifoldgd_fast import fastloop
    from manifoldgd_fast.cli import main
    from manifoldgd_fast.kernels import adaln

    fused = ["--guidance-noise", "philox", "--backend", "triton", "--loop", "fast", "--dit-impl", "fused",
             "--attention", "triton", "--steps", "4", "--t-stop", "2"]
    calls = count_kernel_calls(monkeypatch, (adaln, "layernorm_modulate", "gate_residual"))
    assert main(_args(tiny_world, tmp_path / "steps", *fused)) == 0
    assert all(calls.values()), calls
    emulate_cuda_graphs(monkeypatch)
    captures = []
    capture = fastloop.FastSampler._capture
    monkeypatch.setattr(fastloop.FastSampler, "_capture", lambda self, gs: captures.append(1) or capture(self, gs))
    assert main(_args(tiny_world, tmp_path / "graphs", *fused)) == 0
    assert len(captures) == 1                         # one capture served all three classes
    assert _digest(tmp_path / "graphs") == _digest(tmp_path / "steps")


def test_emulated_graphs_paper_formulation_serve_every_class_of_a_bucket(monkeypatch):
    """The paper formulation under (emulated) CUDA graphs on the fused kernels: classes of other sizes,
    other radii, modes, labels and noise replay through the padded static buffers, one capture per
    size bucket, and give the eager loop's bits."""
    if DEV != "cpu":
        pytest.skip("on a GPU, tests/test_fastloop.py captures real CUDA graphs")
    from graph_emulation import emulate_cuda_graphs
    from test_fastloop import NULL, _gens

    from manifoldgd_fast.config import DistillConfig
    from manifoldgd_fast.fastloop import PAD_ROWS, FastSampler
    from manifoldgd_fast.guidance import Guidance, paper_neighbourhoods
    from manifoldgd_fast.models import build_dit, tiny_dit_config
    from manifoldgd_fast.sampler import Sampling
    from manifoldgd_fast.schedule import make_schedule

    B, steps = 3, 4
    cfg = DistillConfig(method="manifoldgd", formulation="paper", steps=steps, t_stop=2, ipc=B,
                        guidance_noise="philox", backend="triton").resolve(10, "cpu")
    sched = make_schedule(steps, "ddpm")
    run = Sampling(build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1), sched, NULL, cfg_scale=4.0,
                   formulation="paper")

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        lat = torch.randn(n, 256, generator=g) * (1 + seed)          # other radii per class
        modes = lat[:B] + 0.1 * torch.randn(B, 256, generator=g)
        gens = _gens([seed * 10 + b for b in range(B)])
        x_T = torch.stack([torch.randn(4, 8, 8, generator=gg) for gg in gens])
        gd = Guidance(cfg, sched, modes.view(B, 4, 8, 8), gens, noise_seed=7,
                      sample_ids=[seed * B + b for b in range(B)], **paper_neighbourhoods(cfg, lat, modes))
        return x_T, torch.tensor([seed % 3, (seed + 1) % 3, (seed + 2) % 3]), gens, gd

    eager = FastSampler(run, cuda_graph=False)
    emulate_cuda_graphs(monkeypatch)
    fast = FastSampler(run, cuda_graph=True)
    sizes = (40, 90, PAD_ROWS + 10)                                   # buckets 1, 1, 2
    for seed, n in enumerate(sizes):
        x_T, y, gens, gd = batch(n, seed)
        got = fast.sample(x_T, y, gens, guidance=gd)
        x_T, y, gens, gd = batch(n, seed)
        want = eager.sample(x_T, y, gens, guidance=gd)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), n
    assert len(fast._sets) == 2 and fast.cuda_graph is not False      # one capture per bucket, no fallback

    # two classes in one batch (--class-batch): stacked latents, per-row radii and sizes, through the graphs
    from manifoldgd_fast.guidance import merge_paper_neighbourhoods

    def merged():
        parts = [batch(n, seed) for seed, n in ((0, 40), (1, 90))]
        rows = [(c, j) for c in range(2) for j in range(B)]
        kw = merge_paper_neighbourhoods([dict(class_latents=p[3].latents, order=p[3].order,
                                              sorted_dists=p[3].sorted_dists, radii=p[3].radii) for p in parts], rows)
        gens = parts[0][2] + parts[1][2]
        gd = Guidance(cfg, sched, torch.cat([p[3].modes for p in parts]), gens, noise_seed=7,
                      sample_ids=torch.cat([p[3].sample_ids for p in parts]), **kw)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), gens, gd

    x_T, y, gens, gd = merged()
    got = fast.sample(x_T, y, gens, guidance=gd)
    x_T, y, gens, gd = merged()
    want = eager.sample(x_T, y, gens, guidance=gd)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    alone = []
    for seed, n in ((0, 40), (1, 90)):     # each class alone: the same rows up to the DiT's batch rounding
        x_T, y, gens, gd = batch(n, seed)
        alone.append(eager.sample(x_T, y, gens, guidance=gd)[0])
    torch.testing.assert_close(got[0], torch.cat(alone), atol=1e-3, rtol=1e-4)
    assert len(fast._sets) == 3


def test_fused_ops_report_the_profilers_kernel_phases():
    """Under `profile`, the fused term is split into knn, gram_eig (Gram + eigen-step) and projection."""
    from manifoldgd_fast.profile import profiling

    B, D = 2, 33
    gen = torch.Generator().manual_seed(5)
    modes = torch.randn(B, D, generator=gen).to(DEV)
    x = 0.5 * modes + torch.randn(B, D, generator=gen).to(DEV)
    with profiling(DEV) as prof:
        ops.manifold_pull_fused(x, modes, radius=0.2, alpha_bar=0.3, seed=5, step=3, n_points=64, k=12, d=3,
                                backend="triton")
    assert {"knn", "gram_eig", "projection"} <= set(prof.report()["phases"])
