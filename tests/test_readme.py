"""The README's Python snippets, run as the README prints them.

A newcomer copies these; a renamed argument or a wrong shape there fails here. The GPU examples run
on the CPU with the shipped digits DiT standing in for DiT-XL/2: the only edits are the device and the
latent size (``device="cuda"`` dropped, 32x32 latents -> the digits' 8x8, ImageNet's null class 1000
-> the digits' 10), each applied by :func:`snippet` and checked to have matched.
"""
from __future__ import annotations

import os
import re
import textwrap

import pytest
import torch

from manifoldgd_fast.config import derive_seed

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def python_blocks() -> list[str]:
    """Every ```python block of the README, dedented (blocks inside list items are indented)."""
    return [textwrap.dedent(body) + "\n" for lang, body in fenced_blocks(open(README, encoding="utf-8").read())
            if lang == "python"]


def snippet(marker: str, edits: dict[str, str] | None = None) -> str:
    """The one python block containing ``marker``, with ``edits`` (old -> new) applied; each must match."""
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    code = found[0]
    for old, new in (edits or {}).items():
        assert old in code, f"README block with {marker!r} no longer contains {old!r}"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def digits_dit():
    from manifoldgd_fast.models import load_dit
    from manifoldgd_fast.shipped import shipped_model_dir

    return load_dit(shipped_model_dir()).eval()


ON_CPU = {', device="cuda"': "", "32, 32": "8, 8"}


def test_every_readme_python_block_is_valid_python():
    """Those not run here (ImageNet paths, a GPU) at least parse."""
    blocks = python_blocks()
    assert len(blocks) >= 5
    for n, b in enumerate(blocks):
        compile(b, f"README.md python block {n}", "exec")


def test_step_guidance_loop_runs_and_equals_our_ddim_sampler(digits_dit):
    """The hand-written diffusers DDIM loop with StepGuidance: the README says a test holds it equal to
    the built-in sampler; this is that loop, as printed, against our DDIM sampler with the same settings
    (its CFG on all 4 channels: --cfg-channels all)."""
    from manifoldgd_fast.config import DistillConfig
    from manifoldgd_fast.guidance import Guidance
    from manifoldgd_fast.sampler import sample
    from manifoldgd_fast.schedule import make_schedule

    code = snippet("guide = StepGuidance(", ON_CPU)
    B = 2
    modes = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    y, null = torch.tensor([1, 7]), torch.tensor([10, 10])
    ns = dict(dit=digits_dit, B=B, y=y, null=null, modes=modes)
    torch.manual_seed(0)
    exec(code, ns)
    torch.manual_seed(0)
    x_T = torch.randn(B, 4, 8, 8)
    guided = ns["x"]

    cfg = DistillConfig(method="manifoldgd", formulation="official", steps=50, ipc=B, t_stop=25,
                        guidance_noise="philox").resolve(1000, "cpu")   # StepGuidance's default noise
    s = make_schedule(50, "ddim")
    gens = [torch.Generator().manual_seed(derive_seed(0, "sample", b)) for b in range(B)]
    ours = sample(digits_dit, s, x_T, y, null_class=10, cfg_channels="all", generators=gens,
                  guidance=Guidance(cfg, s, modes, gens, noise_seed=derive_seed(0, "guidance")))
    plain = sample(digits_dit, s, x_T, y, null_class=10, cfg_channels="all", generators=gens)
    torch.testing.assert_close(guided, ours, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, atol=1e-3)


def test_guidance_ops_snippet_runs():
    """manifold_correct / manifold_pull as the README calls them, on small inputs of the shapes it names."""
    code = snippet("from manifoldgd_fast.ops import manifold_correct")
    g = torch.Generator().manual_seed(0)
    B, M, N, D = 2, 40, 30, 16
    ns = dict(x=torch.randn(B, D, generator=g), patch=torch.randn(B, M, D, generator=g),
              g=torch.randn(B, D, generator=g), cloud=torch.randn(B, N, D, generator=g))
    exec(code, ns)
    assert ns["g_hat"].shape == (B, D) and ns["term"].shape == (B, D)
    assert torch.isfinite(ns["g_hat"]).all() and torch.isfinite(ns["term"]).all()


def test_fast_sampler_snippet_runs_and_equals_the_reference_loop(digits_dit):
    """The FastSampler example (on the CPU: no CUDA graphs, the same step) gives the reference loop's latents."""
    from manifoldgd_fast.sampler import sample

    code = snippet("fast = FastSampler(run)", {'device="cuda"': 'device="cpu"', "null_class=1000": "null_class=10",
                                               "autocast_dtype=torch.bfloat16": "autocast_dtype=None"})
    B = 2
    gens = [torch.Generator().manual_seed(derive_seed(1, "sample", b)) for b in range(B)]
    x_T = torch.stack([torch.randn(4, 8, 8, generator=gen) for gen in gens])
    ns = dict(dit=digits_dit, x_T=x_T, y=torch.tensor([3, 3]), generators=gens,
              modes=torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2)), ids=torch.tensor([30, 31]))
    exec(code, ns)
    gens2 = [torch.Generator().manual_seed(derive_seed(1, "sample", b)) for b in range(B)]
    [torch.randn(4, 8, 8, generator=gen) for gen in gens2]
    from manifoldgd_fast.guidance import Guidance

    ref = sample(digits_dit, ns["run"].schedule, x_T, ns["y"], null_class=10, generators=gens2,
                 guidance=Guidance(ns["cfg"], ns["run"].schedule, ns["modes"], gens2, noise_seed=1, sample_ids=ns["ids"]))
    assert ns["x0"].shape == (B, 4, 8, 8) and ns["norms"].shape == (B, ns["cfg"].steps)
    torch.testing.assert_close(ns["x0"], ref, atol=1e-5, rtol=1e-5)


def test_python_api_digits_snippet_runs(tmp_path, monkeypatch, private_cache):
    """`distill(DistillConfig(ipc=1, out="out/digits"))` on the CPU: the embedded demo, as the README says."""
    monkeypatch.chdir(tmp_path)
    code = snippet('res = distill(DistillConfig(ipc=1, out="out/digits"))')
    ns = {}
    exec("from manifoldgd_fast import DistillConfig, distill\n" + code, ns)  # the import is the block above it
    res = ns["res"]
    assert res.classes["0"]["status"] == "done"
    assert os.path.realpath(res.out) == os.path.realpath(tmp_path / "out" / "digits")
    assert [f for f in os.listdir(tmp_path / "out" / "digits" / "0") if f.endswith(".png")] == ["0.png"]


# --------------------------------------------------------------------------- the documented command lines
DOCS = [README, os.path.join(os.path.dirname(README), "docs", "SCALING.md")]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, fences paired in order (an indented fence too)."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        fence = re.match(r"^ *```(\w*)\s*$", line)
        if fence and lang is None:
            lang, body = fence.group(1), []
        elif fence:
            blocks.append((lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, subcommand or "" for top-level flags, tokens after it) of every `manifoldgd-fast ...` or
    `-m manifoldgd_fast ...` line in the docs' shell blocks (bash, sh or none), with backslash continuations
    joined and comments cut."""
    import shlex

    out = []
    for path in DOCS:
        for lang, block in fenced_blocks(open(path, encoding="utf-8").read()):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(r"(?:^|\s)(?:manifoldgd-fast|-m manifoldgd_fast)\s+(.*)$", line)
                if not m:
                    continue
                words = shlex.split(m.group(1).split(" #")[0].replace("$", ""))
                if words and not words[0].startswith("-"):
                    out.append((os.path.basename(path), words[0], words[1:]))
                elif words:
                    out.append((os.path.basename(path), "", words))   # top-level flags (--version)
    return out


def test_every_documented_command_line_uses_flags_its_command_has():
    """A flag renamed or dropped in the CLI but left in the README / SCALING.md fails here, naming the line."""
    from manifoldgd_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    found = documented_commands()
    assert len(found) >= 20 and {c for _, c, _ in found} >= {"", "cache", "modes", "distill", "eval", "metrics",
                                                              "finetune", "profile"}
    for where, cmd, words in found:
        assert not cmd or cmd in sub.choices, f"{where}: manifoldgd-fast {cmd}: no such command"
        flags = {s for a in (sub.choices[cmd] if cmd else parser)._actions for s in a.option_strings}
        for w in words:
            flag = w.split("=")[0]
            if flag.startswith("--"):
                assert flag in flags, f"{where}: manifoldgd-fast {cmd} {' '.join(words)}: {flag} is not a flag of {cmd}"


def test_every_documented_flag_value_is_one_its_flag_takes():
    """A literal value the docs give a flag (a choice such as ``--loop fast``, a number, ``--shard 0/4``) passes
    the flag's own argparse type and choices, and a DistillConfig field's choices (config.CHOICES): a choice
    renamed in the CLI but left in the docs fails here, naming the line. Placeholders (upper case: OUT, K/N, a
    $VAR's name) are passed over."""
    import argparse

    from manifoldgd_fast.cli import build_parser
    from manifoldgd_fast.config import CGS_STEPS, CHOICES

    choices = {**CHOICES, "cgs_steps": CGS_STEPS}

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for where, cmd, words in documented_commands():
        actions = {s: a for a in (sub.choices[cmd] if cmd else parser)._actions for s in a.option_strings}
        for flag, value in zip(words, words[1:] + [""]):
            flag, _, inline = flag.partition("=")
            action = actions.get(flag)
            value = inline or value
            if action is None or action.nargs == 0 or not re.fullmatch(r"[a-z0-9._,:/+-]+", value):
                continue
            line = f"{where}: manifoldgd-fast {cmd} {' '.join(words)}"
            try:
                got = action.type(value) if callable(action.type) else value
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                raise AssertionError(f"{line}: {flag} {value}: {e}") from None
            allowed = action.choices if action.choices is not None else choices.get(action.dest)
            assert allowed is None or got in allowed, f"{line}: {flag} {value}: not one of {', '.join(allowed)}"
            checked += 1
    assert checked >= 30, checked


# flags of other programs the docs show: torchrun, Slurm's srun / sbatch, pytest-benchmark, pip, the released code's own
OTHER_PROGRAMS = {"--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--nodes", "--ntasks-per-node",
                  "--gpus-per-node", "--array", "--gpus-per-task", "--benchmark-only", "--closest", "--index-url"}


def test_every_flag_the_docs_name_exists():
    """Every --flag anywhere in the README or SCALING.md (prose included) is a flag of a manifoldgd-fast command,
    of a script in bench/ or manifoldgd_fast/demo/ (its argparse source names it), or of another program the
    docs run (torchrun, srun, pytest-benchmark)."""
    import argparse
    import glob

    from manifoldgd_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {s for c in [parser, *sub.choices.values()] for a in c._actions for s in a.option_strings} | OTHER_PROGRAMS
    root = os.path.dirname(README)
    scripts = "".join(open(f, encoding="utf-8").read() for pattern in ("bench/*.py", "manifoldgd_fast/demo/*.py")
                      for f in glob.glob(os.path.join(root, pattern)))
    for doc in DOCS:
        for flag in sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", open(doc, encoding="utf-8").read()))):
            assert flag in known or f'"{flag}"' in scripts, f"{os.path.basename(doc)} names {flag}, which nothing has"
