"""What a newcomer meets first: usage errors, --help, the demo scripts' errors.

Bad input gets one line naming the flag, exit 2, no traceback; --help shows every flag with its default.
Every test runs in tmp_path, so no ``distilled/`` is left in the working folder.
"""
import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

from manifoldgd_fast.cli import build_parser, main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MANIFOLDGD_CACHE", str(tmp_path / "cache"))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, names", [
    (["distill", "--ipc", "abc"], "argument --ipc: invalid int value: 'abc'"),
    (["modes", "--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
    (["eval", "--seeds"], "argument --seeds: expected one argument"),
    (["metrics", "--fid-resize", "blur"], "argument --fid-resize: invalid choice: 'blur'"),
])
def test_usage_error_is_one_line_naming_the_flag(argv, names, capsys):
    # argparse's default prints the whole usage (about 50 lines for distill) before the error
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"manifoldgd-fast {argv[0]}: error: ") and names in line, line
    assert f"manifoldgd-fast {argv[0]} --help" in line


def test_unknown_flag_is_named_by_its_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--ipcs", "3"])
    assert exc.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("manifoldgd-fast distill: error: unrecognized arguments: --ipcs 3"), line


@pytest.mark.parametrize("argv, unknown", [
    (["eval", "--distilled", "d", "--real-val", "v", "--seed", "5"], "--seed 5"),       # was --seeds 5: seeds 0..4
    (["eval", "--distilled", "d", "--real-val", "v", "--out", "res"], "--out res"),     # was --out-json res
    (["metrics", "--distilled", "d", "--real", "r", "--out", "res"], "--out res"),
    (["distill", "--ip", "3"], "--ip 3"),
])
def test_a_flag_is_never_taken_for_a_longer_one(argv, unknown, monkeypatch, capsys):
    """An abbreviation is no flag: another command's --seed given to eval was eval's --seeds (five seeds 0..4
    for --seed 5), its --out was --out-json; refused in one line naming it, before any work."""
    from manifoldgd_fast import pipeline
    from manifoldgd_fast.eval import cli_eval

    for mod, fn in ((cli_eval, "run_eval_from_args"), (cli_eval, "run_metrics_from_args"), (pipeline, "distill")):
        monkeypatch.setattr(mod, fn, lambda *a, **k: pytest.fail("ran with an abbreviated flag"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert _one_line(capsys.readouterr().err) == \
        f"manifoldgd-fast {argv[0]}: error: unrecognized arguments: {unknown} (see manifoldgd-fast {argv[0]} --help)"


def test_no_command_is_a_one_line_error(capsys):
    assert main([]) == 2
    io = capsys.readouterr()
    assert io.out == ""
    line = _one_line(io.err)
    assert line.startswith("manifoldgd-fast: error: give a command:") and "distill" in line and "finetune" in line


@pytest.mark.parametrize("n", ["0", "-2"])
def test_profile_classes_must_be_positive(n, tmp_path, capsys):
    # --profile-classes 0 used to profile every class (names[:0] -> no --classes filter)
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--profile-classes", n, "--data", missing, "--model", missing])
    assert exc.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "--profile-classes" in line and f"got {n}" in line, line


def _option_help(parser) -> dict[str, str]:
    """flag -> its help text as --help prints it (one line, whitespace collapsed)."""
    text = parser.format_help()
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--[a-z0-9-]+)( [A-Z_]+(?: \[[A-Z_]+ \.\.\.\])?| \{[^}]*\}|, --no-[a-z0-9-]+)?(\s+(.*))?$", line)
        if m:
            cur = m.group(1)
            out[cur] = (m.group(4) or "").strip()
        elif cur and line.startswith("    "):
            out[cur] = (out[cur] + " " + line.strip()).strip()
        elif not line.strip() or not line.startswith(" "):
            cur = None
    return out


def _subparsers():
    p = build_parser()
    return p._subparsers._group_actions[0].choices


def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(capsys):
    """The CLI's warnings clear the progress bar being drawn on stderr and print on their own line (they were
    appended to the bar's line, easy to miss)."""
    import logging
    import sys

    from tqdm import tqdm

    from manifoldgd_fast import cli

    handler = cli._StderrHandler(level=logging.WARNING)
    with tqdm(total=3, file=sys.stderr, desc="encode") as bar:
        bar.update(1)
        handler.emit(logging.LogRecord("manifoldgd_fast.data", logging.WARNING, __file__, 1,
                                       "cannot read image %s", ("a/b.png",), None))
        bar.update(2)
    err = capsys.readouterr().err
    line = "manifoldgd-fast: warning: cannot read image a/b.png"
    assert line in err.replace("\r", "\n").split("\n"), repr(err)


def test_help_never_says_default_none(capsys):
    """A default of None is resolved at run time and the flag's text says how: no --help prints "(default:
    None)" (found by a mutation audit: the formatter's None rule could go and no test failed)."""
    for name, sp in _subparsers().items():
        text = sp.format_help()
        assert "default: None" not in text, (name, [ln for ln in text.splitlines() if "None" in ln])


@pytest.mark.parametrize("command", ["cache", "modes", "distill", "profile"])
def test_an_empty_config_flag_is_refused_not_no_config(command, monkeypatch, capsys):
    """--config '' (an unset $CFG) is refused in one line, as an empty --out or --data is: it was taken as no
    --config at all, and `distill` ran the embedded demo's defaults into ./distilled."""
    from manifoldgd_fast import pipeline

    for fn in ("cache", "compute_modes", "distill", "profile_run"):
        monkeypatch.setattr(pipeline, fn, lambda *a, **k: pytest.fail("the command ran without its config"))
    assert main([command, "--config", ""]) == 2
    assert _one_line(capsys.readouterr().err) == "manifoldgd-fast: error: --config must be a file path, got ''"


def test_warnings_print_once_however_often_main_runs(capsys):
    """main() run twice in one process (the Python API, a notebook, the tests) adds its stderr handler once: a
    library warning is one line, not one per main() that ran."""
    import logging

    from manifoldgd_fast import cli

    for _ in range(2):
        assert main(["distill", "--ipc", "0"]) == 2
    capsys.readouterr()
    logging.getLogger("manifoldgd_fast.data").warning("cannot read image %s", "a/b.png")
    err = capsys.readouterr().err
    assert err.count("manifoldgd-fast: warning: cannot read image a/b.png") == 1, err
    assert sum(isinstance(h, cli._StderrHandler) for h in logging.getLogger("manifoldgd_fast").handlers) == 1


def test_main_runs_outside_the_main_thread(capsys):
    """main() from a worker thread (a notebook's or a GUI's) runs the command without touching the signal
    handlers (signal.signal raised ValueError there): a user error is still one line and exit 2."""
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(main(["distill", "--ipc", "0"])))
    t.start()
    t.join()
    assert got == [2]
    assert _one_line(capsys.readouterr().err) == "manifoldgd-fast: error: --ipc must be an integer >= 1, got 0"


def test_an_embedding_programs_signal_handlers_stay(monkeypatch, capsys):
    """A program that runs main() with its own SIGTERM / SIGINT handlers keeps them, during the command and
    after: main() takes over only Python's defaults."""
    import signal

    from manifoldgd_fast import cli, pipeline

    def mine(signum, frame):  # pragma: no cover (never called)
        pass

    seen = []
    monkeypatch.setattr(pipeline, "distill", lambda cfg: seen.append((signal.getsignal(signal.SIGTERM),
                                                                      signal.getsignal(signal.SIGINT))) or 1 / 0)
    monkeypatch.setattr(cli, "config_from_args", lambda ns: type("C", (), {"validate": lambda self: self,
                                                                           "shard": None})())
    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(ZeroDivisionError):
            main(["distill"])
        assert seen == [(mine, mine)]
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_every_flag_of_every_command_has_help():
    # a flag without help text is left out of --help entirely (finetune's --steps, --lr, ...)
    from manifoldgd_fast.cli import CACHE_FLAGS

    for name, sp in _subparsers().items():
        helps = _option_help(sp)
        flags = {s for a in sp._actions for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")
                 and a.help != argparse.SUPPRESS}
        flags.discard("--help")
        if name == "cache":  # it lists what it reads, and accepts the rest (a --config shared with distill)
            assert flags == {"--config", *("--" + f.replace("_", "-") for f in CACHE_FLAGS)}, flags
            assert build_parser().parse_args(["cache", "--ipc", "5", "--lambda-m", "0.2"]).ipc == 5
        missing = sorted(f for f in flags if not helps.get(f))
        assert not missing, f"{name}: no help for {missing}"
        # a default alone says nothing of what the flag does (finetune's --steps read "default: 1000")
        bare = sorted(f for f in flags if re.fullmatch(r"\(?default: [^)]*\)?", helps[f]))
        assert not bare, f"{name}: only a default, no description, for {bare}"


def test_every_option_states_its_default_or_that_it_is_required():
    """A newcomer reads a flag's default in --help: --config, --modes-dir, --cgs, --shard, --k, ... said nothing
    (their default is None, resolved at run time, so the formatter adds none: the text must say it)."""
    for name, sp in _subparsers().items():
        helps = _option_help(sp)
        for a in sp._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or "--help" in a.option_strings:
                continue
            flag = next(s for s in a.option_strings if s.startswith("--"))
            text = helps[flag]
            assert "(required)" in text if a.required else "default" in text.lower(), (name, flag, text)


def test_help_states_defaults_that_were_missing():
    subs = _subparsers()
    distill = _option_help(subs["distill"])
    # "default" as a value (--compile none, default, ...) no longer hides the real default
    assert distill["--compile"].endswith("(default: none)"), distill["--compile"]
    assert "embedded demo" in distill["--data"], distill["--data"]
    assert "shipped digits DiT" in distill["--model"], distill["--model"]
    assert "(default: every class folder)" in distill["--classes"]
    assert "(default: empty)" in distill["--negative-prompt"]
    assert "default: min(8, CPUs / ranks)" in distill["--encode-workers"]
    # profile writes into a temporary folder unless --out is given, not into distilled/
    prof = _option_help(subs["profile"])
    assert "temporary folder" in prof["--out"] and "distilled" not in prof["--out"], prof["--out"]
    ft = _option_help(subs["finetune"])
    assert ft["--steps"].endswith("(default: 1000)") and ft["--lr"].endswith("(default: 0.0001)"), ft
    assert "0: none" in ft["--grad-clip"], ft


def test_console_entry_point_usage_error(tmp_path):
    # the real process: one line on stderr, exit 2, nothing on stdout
    r = subprocess.run([sys.executable, "-m", "manifoldgd_fast", "distill", "--batch-size", "x"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "MANIFOLDGD_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and r.stdout == ""
    line = _one_line(r.stderr)
    assert "argument --batch-size: invalid int value: 'x'" in line
    assert not (tmp_path / "distilled").exists()


def test_a_clone_shadows_no_other_package():
    """`python -m ...` in a clone puts its root first on sys.path: the only package there may be ours. A
    top-level kernels/ package shadowed Hugging Face's `kernels` (a transformers >= 5 dependency), and
    transformers' CLIP import then failed with an ImportError from the wrong package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packages = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py")))
    assert packages == ["manifoldgd_fast"], packages
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0 and not r.stdout.strip().startswith(root + os.sep), r.stdout + r.stderr


# --------------------------------------------------------------------------- demo scripts
def test_compare_bad_numbers_are_refused_before_any_work(monkeypatch, capsys):
    from manifoldgd_fast.demo import compare

    calls = []
    monkeypatch.setattr(compare, "run", lambda *a, **k: calls.append(a))
    for argv, flag in [(["--ipc", "0"], "--ipc"), (["--seeds", "-1"], "--seeds"), (["--epochs", "0"], "--epochs"),
                       (["--ceiling-epochs", "0"], "--ceiling-epochs")]:
        with pytest.raises(SystemExit) as exc:
            compare.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be an integer >= 1" in err and "Traceback" not in err, err
    assert calls == []


def test_compare_user_error_is_one_line(monkeypatch, capsys):
    from manifoldgd_fast.demo import compare
    from manifoldgd_fast.errors import DataError

    def boom(*a, **k):
        raise DataError("class 3 has 2 readable images, fewer than --ipc 5")

    monkeypatch.setattr(compare, "run", boom)
    assert compare.main(["--ipc", "5", "--methods", "dit"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == "python -m manifoldgd_fast.demo.compare: error: class 3 has 2 readable images, fewer than --ipc 5"


def test_train_check_names_the_missing_out_folder(tmp_path, capsys):
    from manifoldgd_fast.demo import train

    missing = str(tmp_path / "no-model")
    assert train.main(["--check", "--out", missing]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("python -m manifoldgd_fast.demo.train: error: --out ") and missing in line, line


# --------------------------------------------------------------------------- errors that named the wrong thing
@pytest.fixture
def image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "a" / f"{i}.png")
    return root


@pytest.mark.parametrize("kind, says", [
    ("missing", "no model found (not a local folder, not in the Hugging Face cache)"),
    ("empty", "no model in"),
    ("file", "a file, but not a DiT checkpoint (.pt / .pth)"),
])
def test_a_bad_model_is_named_before_the_vae_is_looked_for(kind, says, tmp_path, image_folder, capsys):
    # the VAE is read from --model's vae/, so a bad --model used to read "no VAE found"
    model = tmp_path / "model"
    if kind == "empty":
        model.mkdir()
    elif kind == "file":
        model.write_text("x")
    argv = ["distill", "--data", str(image_folder), "--model", str(model), "--ipc", "1", "--out", str(tmp_path / "o")]
    if kind == "file":
        argv += ["--vae", str(tmp_path / "vae")]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"manifoldgd-fast: error: --model {model}: {says}"), line
    assert "VAE" not in line, line
    assert not (tmp_path / "o").exists()


def test_version_names_the_libraries_that_change_the_bytes(capsys):
    from manifoldgd_fast import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr()
    assert e.value.code == 0 and not out.err
    assert out.out.startswith(f"manifoldgd-fast {__version__} (torch {torch.__version__}, diffusers ") and "pillow" in out.out


def test_an_uncached_hub_id_says_where_it_looked_and_how_to_fetch_it(tmp_path, image_folder, capsys, monkeypatch):
    """An id not in the cache: the cache folder looked in and the one command that fills it; a path that
    does not exist gets no such hint (it is simply not there)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for model, hint in [("org/not-cached", True), (str(tmp_path / "nope"), False)]:
        assert main(["distill", "--data", str(image_folder), "--model", model, "--ipc", "1",
                     "--out", str(tmp_path / "o")]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"manifoldgd-fast: error: --model {model}: no model found"), line
        assert (f"looked in {tmp_path / 'hub'}" in line and f"`hf download {model}`" in line) == hint, line


@pytest.mark.parametrize("flag, kind, says", [
    ("--config", "dir", "a folder, not a YAML or JSON file"),
    ("--config", "missing", "no such file"),
    ("--cache-dir", "file", "exists and is not a folder"),
    ("--modes-dir", "missing", "no such folder (write it with `manifoldgd-fast modes`"),
    ("--modes-dir", "file", "not a folder"),
])
def test_path_flags_name_themselves(flag, kind, says, tmp_path, image_folder, capsys):
    path = tmp_path / "p"
    if kind == "dir":
        path.mkdir()
    elif kind == "file":
        path.write_text("x")
    assert main(["distill", "--data", str(image_folder), "--model", str(tmp_path / "none"), "--ipc", "1",
                 "--out", str(tmp_path / "o"), flag, str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"manifoldgd-fast: error: {flag} {path}: {says}" or \
        line.startswith(f"manifoldgd-fast: error: {flag} {path}: {says}"), line


@pytest.mark.parametrize("command", ["eval", "metrics"])
@pytest.mark.parametrize("kind, says", [("dir", "a folder; give a file name"), ("under_file", "is a file, not a folder"),
                                        ("file_slash", "a folder; give a file name"),
                                        ("new_slash", "a folder; give a file name")])
def test_out_json_is_checked_before_any_training(command, kind, says, tmp_path, image_folder, capsys, monkeypatch):
    """A trailing / names a folder: `--out-json res.json/` passed the check (its parent is writable) and failed
    only at the write, after the training, with "Not a directory" and no flag named."""
    import manifoldgd_fast.eval.metrics as metrics
    import manifoldgd_fast.eval.protocol as protocol

    for mod in (protocol, metrics):
        monkeypatch.setattr(mod, "train_net", lambda *a, **k: pytest.fail("trained before --out-json was checked"))
    out = tmp_path / "j"
    if kind == "dir":
        out.mkdir()
    elif kind == "under_file":
        out.write_text("x")
        out = out / "r.json"
    else:
        if kind == "file_slash":
            out.write_text("x")
        out = str(out) + os.sep
    real = "--real-val" if command == "eval" else "--real"
    assert main([command, "--distilled", str(image_folder), real, str(image_folder), "--out-json", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"manifoldgd-fast: error: --out-json {out}: ") and says in line, line


def test_eval_distilled_file_is_not_a_folder(tmp_path, image_folder, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert main(["eval", "--distilled", str(f), "--real-val", str(image_folder)]) == 2
    assert _one_line(capsys.readouterr().err) == f"manifoldgd-fast: error: --distilled {f}: not a folder"


@pytest.mark.parametrize("n", [0, -1, True, 1.5])
def test_profile_run_classes_must_be_a_positive_int(n, image_folder):
    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.pipeline import profile_run

    with pytest.raises(ConfigError, match=r"^--profile-classes .*: must be an integer >= 1$"):
        profile_run({"data": str(image_folder), "model": "x", "ipc": 1}, classes=n)


def test_finetune_ranges_state_the_rule(tmp_path):
    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.finetune import finetune

    for kw, rule in ((dict(steps=0), "--steps 0: must be >= 1"), (dict(ema_decay=1.0), "--ema-decay 1.0: must be in [0, 1)"),
                     (dict(grad_clip=-1.0), "--grad-clip -1.0: must be >= 0 (0: no clipping)")):
        with pytest.raises(ConfigError, match="^" + re.escape(rule) + "$"):
            finetune(data=str(tmp_path), model="x", out=str(tmp_path / "o"), **kw)


@pytest.mark.parametrize("name, text, says", [
    ("run.yaml", "ipc: 2\nclasses: [a, b\nsteps: 10\n", "cannot be parsed: expected ',' or ']', but got ':' "
                                                          "(line 3, column 6)"),
    ("run.json", '{"ipc": 2,\n "steps": }', "cannot be parsed: Expecting value: line 2 column 11 (char 21)"),
    # a key given twice kept its last value without a word (YAML and JSON alike)
    ("run.yaml", "ipc: 2\nsteps: 10\nipc: 3\n", "cannot be parsed: duplicate key 'ipc' (line 3, column 1)"),
    ("run.yaml", "ipc: 2\nlabel_map: {a: 1, a: 2}\n", "cannot be parsed: duplicate key 'a' (line 2, column 19)"),
    ("run.json", '{"ipc": 2, "steps": 10, "ipc": 3}', "cannot be parsed: duplicate key 'ipc'"),
])
def test_a_config_that_does_not_parse_names_its_line(name, text, says, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    assert main(["distill", "--config", str(path)]) == 2
    assert _one_line(capsys.readouterr().err) == f"manifoldgd-fast: error: --config {path}: {says}"


def test_a_config_that_is_no_regular_file_is_not_called_missing(capsys):
    assert main(["distill", "--config", os.devnull]) == 2
    assert _one_line(capsys.readouterr().err) == \
        f"manifoldgd-fast: error: --config {os.devnull}: not a regular file (a YAML or JSON file)"


@pytest.mark.parametrize("command, kept", [
    ("eval", "finished training runs are kept"), ("metrics", "the real images' features are kept"),
    ("finetune", "the last checkpoint is kept"), ("distill", "finished classes are kept"),
])
@pytest.mark.parametrize("sigterm", [False, True])
def test_ctrl_c_says_what_the_command_kept(command, kept, sigterm, monkeypatch, capsys):
    """Ctrl-C and SIGTERM: one line saying what is kept, 130 / 143, and SIGTERM's default action back after."""
    import signal

    from manifoldgd_fast import cli, finetune, pipeline
    from manifoldgd_fast.eval import cli_eval

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process has its own SIGTERM handler, which main() leaves in place")

    def interrupted(*a, **k):
        if sigterm:  # the real signal, through main()'s handler
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            signal.raise_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    for mod, fn in ((cli_eval, "run_eval_from_args"), (cli_eval, "run_metrics_from_args"),
                    (finetune, "run_finetune_from_args"), (pipeline, "distill")):
        monkeypatch.setattr(mod, fn, interrupted)
    monkeypatch.setattr(cli, "config_from_args", lambda ns: type("C", (), {"validate": lambda self: self,
                                                                           "shard": None})())
    argv = {"eval": ["eval", "--distilled", "d", "--real-val", "v"],
            "metrics": ["metrics", "--distilled", "d", "--real", "r"],
            "finetune": ["finetune", "--data", "d", "--model", "m", "--out", "o"], "distill": ["distill"]}[command]
    assert main(argv) == (143 if sigterm else 130)
    how = "terminated (SIGTERM)" if sigterm else "interrupted"
    assert _one_line(capsys.readouterr().err) == f"manifoldgd-fast: {how}; {kept}, rerun to resume"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("stop, code, how", [
    (KeyboardInterrupt, 130, "interrupted"),
    (MemoryError, 2, "error: out of memory (MemoryError): lower --batch-size (distill: also --class-batch; cache: "
                     "--encode-batch-size)"),
])
def test_a_stopped_profile_does_not_promise_a_resume(stop, code, how, monkeypatch, capsys):
    """`profile` stopped by Ctrl-C or out of memory: its temporary folder is removed and a rerun on its --out
    times only the classes left (or refuses), so the line does not say "finished classes are kept, rerun to
    resume" as distill's does."""
    from manifoldgd_fast import cli, pipeline

    def stopped(*a, **k):
        raise stop()

    monkeypatch.setattr(pipeline, "profile_run", stopped)
    monkeypatch.setattr(cli, "config_from_args", lambda ns: type("C", (), {"validate": lambda self: self,
                                                                           "shard": None, "out": None})())
    assert main(["profile"]) == code
    assert _one_line(capsys.readouterr().err) == \
        f"manifoldgd-fast: {how}; a profile does not resume: rerun it (with a new --out, or none)"


@pytest.mark.parametrize("first, second", [("SIGINT", "SIGINT"), ("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT"),
                                           ("SIGTERM", "SIGTERM")])
def test_a_second_ctrl_c_or_sigterm_does_not_cut_the_clean_up_short(first, second, monkeypatch, capsys):
    """The first Ctrl-C / SIGTERM stops the run; one more during its clean-up (a double Ctrl-C, Slurm's
    second signal) is ignored, so the clean-up ends (it left a temp folder, a manifest behind the disk, or
    aborted); the handlers are Python's own again after."""
    import signal

    from manifoldgd_fast import cli, pipeline

    first, second = getattr(signal, first), getattr(signal, second)
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("this test process has its own SIGINT / SIGTERM handler, which main() leaves in place")
    cleaned = []

    def interrupted(*a, **k):
        try:
            signal.raise_signal(first)
        finally:  # the run's clean-up (temp folders, the manifest, the lock)
            signal.raise_signal(second)
            cleaned.append(True)

    monkeypatch.setattr(pipeline, "distill", interrupted)
    monkeypatch.setattr(cli, "config_from_args", lambda ns: type("C", (), {"validate": lambda self: self,
                                                                           "shard": None})())
    assert main(["distill"]) == (130 if first == signal.SIGINT else 143)
    assert cleaned == [True]
    how = "interrupted" if first == signal.SIGINT else "terminated (SIGTERM)"
    assert _one_line(capsys.readouterr().err) == f"manifoldgd-fast: {how}; finished classes are kept, rerun to resume"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_that_lands_in_a_finaliser_is_not_lost(sig, monkeypatch, capsys):
    """A Ctrl-C / SIGTERM that arrives while a __del__ runs raised there, where Python drops the exception
    ("Exception ignored in ... __del__"); both signals were then ignored, so the run went on to its end and
    exited 0 (the audit saw it in 3 of 3 Ctrl-C at one moment of a demo run). It is sent again and stops the
    run; the dropped one prints nothing."""
    import gc
    import signal
    import time

    from manifoldgd_fast import cli, pipeline

    signum = getattr(signal, sig)
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("this test process has its own SIGINT / SIGTERM handler, which main() leaves in place")

    class Finalised:
        def __del__(self):
            signal.raise_signal(signum)  # the stop lands here, in the finaliser

    ran = []

    def run(*a, **k):
        obj = Finalised()
        del obj  # (refcount: __del__ runs here, and its exception is dropped)
        gc.collect()
        for _ in range(200):  # the rest of the run: long enough for the stop sent again
            time.sleep(0.01)
        ran.append("to its end")

    monkeypatch.setattr(pipeline, "distill", run)
    monkeypatch.setattr(cli, "config_from_args", lambda ns: type("C", (), {"validate": lambda self: self,
                                                                           "shard": None})())
    assert main(["distill"]) == (130 if signum == signal.SIGINT else 143)
    assert ran == []
    err = capsys.readouterr().err
    how = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    assert _one_line(err) == f"manifoldgd-fast: {how}; finished classes are kept, rerun to resume", err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_script_exits_with_further_signals_ignored(monkeypatch):
    """`manifoldgd-fast` (cli.console): after a stop by a signal, the interpreter's shutdown ignores more."""
    import signal

    from manifoldgd_fast import cli

    set_to = {}
    monkeypatch.setattr(signal, "signal", lambda sig, handler: set_to.__setitem__(sig, handler))
    for code, ignored in ((130, True), (143, True), (0, False), (2, False)):
        set_to.clear()
        monkeypatch.setattr(cli, "main", lambda: code)
        with pytest.raises(SystemExit) as e:
            cli.console()
        assert e.value.code == code
        assert set_to == ({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN} if ignored else {})


def test_ctrl_c_before_the_command_starts_is_one_line(monkeypatch, capsys):
    """A Ctrl-C while the parser is built (it imports torch: a second or more on a cold start) stops the
    script in one line and exit 130, not torch's import traceback."""
    from manifoldgd_fast import cli

    def slow_import():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", slow_import)
    monkeypatch.setattr(cli.signal, "signal", lambda sig, handler: None)
    with pytest.raises(SystemExit) as e:
        cli.console()
    assert e.value.code == 130
    assert _one_line(capsys.readouterr().err) == \
        "manifoldgd-fast: interrupted before the command started; nothing was written"


def test_a_path_that_is_not_utf8_prints_on_a_strict_stdout(monkeypatch):
    """A folder named by bytes that are not UTF-8 (argv gives them as surrogates) in the summary line: the
    script prints it as stderr does (\\udcff) on a stdout whose encoding is strict (a UTF-8 locale other than
    C's); it raised UnicodeEncodeError, a traceback and exit 1, after the run was done."""
    import io

    from manifoldgd_fast import cli

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(cli, "main", lambda: print("distilled 1 class into /data/o\udcff") or 0)
    with pytest.raises(SystemExit) as e:
        cli.console()
    out.flush()
    assert e.value.code == 0
    assert raw.getvalue() == b"distilled 1 class into /data/o\\udcff\n"


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    """`manifoldgd-fast ... | head`: the reader closes the pipe before the summary (or a profile's table) is
    written. It was "manifoldgd-fast: error: Broken pipe", exit 2, after a run that had finished (or, where the
    summary sat in stdout's buffer, "Exception ignored ... BrokenPipeError" at exit): now nothing is said and
    the exit is a SIGPIPE'd tool's, 141."""
    import subprocess

    script = ("import sys\n"
              "from manifoldgd_fast import cli, pipeline\n"
              "pipeline.cache = lambda cfg: {'entries': [1, 2], 'cache': '/c'}\n"
              "cli.config_from_args = lambda ns: type('C', (), {'validate': lambda self: self, 'shard': None})()\n"
              "big = sys.argv[1] == 'big'\n"
              "if big: cli._classes = lambda n: 'x' * 1000000\n"     # more than a pipe holds: raised in main()
              "sys.argv = ['manifoldgd-fast', 'cache']\n"
              "cli.console()\n")
    for size in ("small", "big"):
        r, w = os.pipe()
        os.close(r)                                               # the reader left before anything was written
        proc = subprocess.run([sys.executable, "-c", script, size], stdout=w, stderr=subprocess.PIPE, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        os.close(w)
        assert (proc.returncode, proc.stderr.decode()) == (141, ""), (size, proc.stderr.decode()[-500:])


@pytest.mark.parametrize("error, says", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory (host: tried to allocate 37252.9 GiB)"),
    ("cuda", "out of memory (CUDA: tried to allocate 20.00 GiB)"),
    (MemoryError(), "out of memory (MemoryError)"),
    # the CUDA runtime's own (a cuBLAS / cuDNN workspace): a plain RuntimeError, and was a traceback
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
                  "call, so the stacktrace below might be incorrect."), "out of memory (CUDA)"),
    # numpy's (sklearn's k-means, the metrics' features): its size, not "_ArrayMemoryError"
    ("numpy", "out of memory (host: tried to allocate 728. TiB)"),
])
def test_out_of_memory_is_one_line_with_the_way_out(error, says, monkeypatch, capsys):
    """A --batch-size past the host's or the GPU's memory: one line saying so and which flags to lower (it was
    torch's allocator traceback); any other RuntimeError still shows its traceback (a bug to report)."""
    import torch

    from manifoldgd_fast import cli, pipeline

    if error == "cuda":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                       "of 79.10 GiB of which 3.00 GiB is free.")
    if error == "numpy":
        import numpy as np

        with pytest.raises(MemoryError) as caught:
            np.empty((10 ** 7, 10 ** 7))  # 728 TiB: more than any host's address space
        error = caught.value
    monkeypatch.setattr(pipeline, "distill", lambda cfg: (_ for _ in ()).throw(error))
    monkeypatch.setattr(cli, "config_from_args", lambda ns: type("C", (), {"validate": lambda self: self,
                                                                           "shard": None})())
    assert main(["distill"]) == 2
    assert _one_line(capsys.readouterr().err) == (f"manifoldgd-fast: error: {says}: lower --batch-size (distill: "
                                                  "also --class-batch; cache: --encode-batch-size); finished "
                                                  "classes are kept, rerun to resume")
    monkeypatch.setattr(pipeline, "distill", lambda cfg: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["distill"])


# --------------------------------------------------------------------------- bad input found by a CLI fuzz (2026-12-06)
@pytest.mark.parametrize("text, says", [
    (b"\xff\xfe ipc: 1\n", "not UTF-8 text (byte 0); a YAML or JSON file"),
    (b"data: 5\n", "--data must be a folder path, got 5"),
    (b"save_latents: 'no'\n", "save_latents must be true or false, got 'no'"),
    (b"contact_sheet: 3\n", "contact_sheet must be true or false, got 3"),
    (b"seed: true\n", "--seed must be a non-negative integer, got True"),
    (b"sampler: ddim\nddim_eta: 1.5\n", "--ddim-eta must lie in [0, 1] (0: DDIM, 1: DDPM's variance), got 1.5"),
    (b"output_size: 100000\n", "--output-size must be <= 4096 px, got 100000"),
    (b"classes: [1.5]\n", "--classes must be a subset name (imagenet1k, nette, woof, imagenet100, idc), a class file "
                          "or 'a,b,c', got [1.5]"),
    (b"classes: ''\n", "a class file or 'a,b,c', got ''"),
    (b"classes: yes\n", "a class file or 'a,b,c', got True"),      # YAML's yes is no class folder 'True'
    # a float that is not optional, left empty (None: a TypeError traceback)
    (b"r_min: null\n", "--r-min must be a number >= 0, got None"),
    (b"r_max:\n", "--r-max must be a number >= 0, got None"),
    (b"modes_dir: 1.5\n", "--modes-dir must be a folder path, got 1.5"),          # (a TypeError traceback)
    (b"method: cgs\ncgs: 0\n", "--cgs must be true or false, got 0"),
    (b"vae: 5\n", "--vae must be a model folder, a checkpoint file or a hub id, got 5"),   # (refused at load only)
    (b"device: 0\n", "--device must be auto, cpu, cuda or cuda:N, got 0"),       # (was taken: torch's cuda:0)
    (b"ipc: 1\n2: 3\n", "unknown parameter(s) 2"),       # a key YAML reads as a number: an AttributeError  # 0 == False, but not `is`: CGS ran
])
def test_config_values_of_the_wrong_kind_are_one_line(text, says, tmp_path, image_folder, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    argv = ["distill", "--config", str(path), "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    if b"data:" not in text:
        argv += ["--data", str(image_folder)]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.endswith(says), line
    assert not (tmp_path / "o").exists()


def test_the_apis_path_model_and_torch_device_are_the_flags_strings(tmp_path):
    """DistillConfig(model=Path(...), device=torch.device("cpu")): the strings the flags give, so that the
    manifest, the fingerprint and a resume spelt with the flags see one run."""
    import pathlib

    import torch

    from manifoldgd_fast.config import DistillConfig, fingerprint

    kw = dict(data=str(tmp_path), out=str(tmp_path / "o"), ipc=1)
    api = DistillConfig(model=pathlib.Path(tmp_path / "m"), vae=pathlib.Path(tmp_path / "v"),
                        device=torch.device("cpu"), **kw).validate()
    flags = DistillConfig(model=str(tmp_path / "m"), vae=str(tmp_path / "v"), device="cpu", **kw).validate()
    assert (api.model, api.vae, api.device) == (flags.model, flags.vae, flags.device)
    assert fingerprint(api) == fingerprint(flags) and api.to_dict() == flags.to_dict()


def test_yaml_natural_forms_of_list_and_number_flags_are_taken(tmp_path):
    from manifoldgd_fast.config import DistillConfig

    path = tmp_path / "run.yaml"
    path.write_text("classes: [a, b]\ncfg_channels: 3\n")
    cfg = DistillConfig.load(str(path)).validate()
    assert cfg.classes == "a,b" and cfg.cfg_channels == "3"
    # numbered class folders (the demo's digits): YAML reads them as ints; `classes: 0` ran every class (0 is
    # falsy) and `classes: [0, 1]` was refused as "empty"
    for text, classes in [("classes: [0, 1]\n", "0,1"), ("classes: 0\n", "0"), ("classes: [n01440764, 7]\n",
                                                                                    "n01440764,7")]:
        path.write_text(text)
        assert DistillConfig.load(str(path)).validate().classes == classes, text
    # YAML 1.1 reads a number with an exponent and no dot as a string: `--dpp-eps 1e-3` was taken, `dpp_eps: 1e-3`
    # refused ("must be a number > 0, got '1e-3'")
    path.write_text("dpp_eps: 1e-3\nkmeans_tol: 1E-5\nlambda_m: +2e-1\nwarm_mult: 25e-1\n")
    cfg = DistillConfig.load(str(path)).validate()
    assert (cfg.dpp_eps, cfg.kmeans_tol, cfg.lambda_m, cfg.warm_mult) == (1e-3, 1e-5, 0.2, 2.5)
    path.write_text("prompt_template: 1e3 {name}\nclasses: 1e3\n")   # (a string field keeps its text)
    assert DistillConfig.load(str(path)).validate().classes == "1e3"


def test_an_empty_classes_flag_is_refused_not_every_class(tmp_path, image_folder, capsys):
    """`--classes "$SUBSET"` with SUBSET unset ran every class folder, as if --classes were not given."""
    for value in ("", " "):
        assert main(["distill", "--data", str(image_folder), "--classes", value, "--model", str(tmp_path / "none"),
                     "--ipc", "1", "--out", str(tmp_path / "o")]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line == ("manifoldgd-fast: error: --classes must be a subset name (imagenet1k, nette, woof, "
                        f"imagenet100, idc), a class file or 'a,b,c', got {value!r}"), line
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe{}"])
def test_a_manifest_that_is_not_a_json_object_is_one_line(content, tmp_path, image_folder, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    from manifoldgd_fast.pipeline import _read_manifest
    from manifoldgd_fast.errors import DataError

    with pytest.raises(DataError, match="is not a readable manifest"):
        _read_manifest(str(out / "manifest.json"))
    from manifoldgd_fast.eval.report import append_manifest

    assert append_manifest(str(out), "eval", {"x": 1}) is None            # warned, not raised
    assert (out / "manifest.json").read_bytes() == content


def test_a_read_only_manifest_loses_only_the_summary(tmp_path, monkeypatch):
    """The evaluation's result files are written before the manifest's summary: a distilled folder that
    cannot be written still gives its numbers (the manifest's write fails with a warning)."""
    import manifoldgd_fast.eval.report as report

    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    real = report.atomic_write_text

    def no_manifest(path, text):
        if os.path.basename(path) == "manifest.json":
            raise PermissionError(13, "Permission denied", path)
        real(path, text)

    monkeypatch.setattr(report, "atomic_write_text", no_manifest)
    res = {"nets": {}, "protocol": "p", "size": 8, "epochs": 1, "seeds": [0], "real_val": "r"}
    monkeypatch.setattr(report, "markdown_table", lambda r: "table\n")
    out_json = tmp_path / "res.json"
    report.write_eval_outputs(res, [str(folder)], str(out_json))
    assert out_json.is_file() and (tmp_path / "res.md").is_file()
    assert res["manifest"] is None and (folder / "manifest.json").read_text() == "{}"


def test_default_out_json_in_a_read_only_folder_is_refused_before_training(tmp_path, image_folder, capsys, monkeypatch):
    import manifoldgd_fast.config as config
    import manifoldgd_fast.eval.protocol as protocol

    monkeypatch.setattr(protocol, "train_net", lambda *a, **k: pytest.fail("trained before the default --out-json"))
    real_access = os.access
    monkeypatch.setattr(config.os, "access", lambda p, m: False if os.path.realpath(p) == os.path.realpath(image_folder)
                        else real_access(p, m))
    assert main(["eval", "--distilled", str(image_folder), "--real-val", str(image_folder)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (f"manifoldgd-fast: error: --out-json (default) {image_folder / 'eval.json'}: "
                    f"folder {image_folder} is not writable"), line


@pytest.mark.parametrize("command", ["eval", "metrics"])
def test_eval_size_and_lr_bounds(command, tmp_path, image_folder, capsys):
    real = "--real-val" if command == "eval" else "--real"
    argv = [command, "--distilled", str(image_folder), real, str(image_folder), "--out-json", str(tmp_path / "r.json")]
    assert main(argv + ["--size", "100000"]) == 2
    assert _one_line(capsys.readouterr().err) == "manifoldgd-fast: error: --size 100000: must be <= 1024 px"
    if command == "eval":
        for lr, shown in (("inf", "inf"), ("1e39", "1e+39")):  # 1e39: finite, not as SGD's float32 (it overflowed)
            assert main(argv + ["--lr", lr]) == 2
            assert _one_line(capsys.readouterr().err) == \
                f"manifoldgd-fast: error: --lr {shown}: must be a number > 0 and finite in float32"


def test_an_atomic_write_that_fails_names_the_file_asked_for(tmp_path):
    from manifoldgd_fast.output import atomic_write_text

    target = tmp_path / "manifest.json"
    target.mkdir()                                     # os.replace onto a folder fails
    with pytest.raises(OSError) as e:
        atomic_write_text(str(target), "{}")
    assert e.value.filename == str(target)
    assert os.listdir(tmp_path) == ["manifest.json"]   # no temp left beside it


@pytest.mark.parametrize("kw, rule", [
    (dict(lr=float("inf")), "--lr inf: must be > 0 and finite in float32"),
    (dict(rsm_lambda=float("inf")), "--rsm-lambda inf: must be >= 0 and finite"),
    (dict(seed=-1), "--seed -1: must be >= 0"),
])
def test_finetune_refuses_inf_and_negative_seed(kw, rule, tmp_path):
    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.finetune import finetune

    with pytest.raises(ConfigError, match="^" + re.escape(rule) + "$"):
        finetune(data=str(tmp_path), model="x", out=str(tmp_path / "o"), **kw)


@pytest.mark.parametrize("where", ["inside_data", "other_folder", "model"])
def test_finetune_out_is_guarded_as_distills(where, tmp_path, image_folder):
    from manifoldgd_fast.errors import ConfigError
    from manifoldgd_fast.finetune import finetune

    model = tmp_path / "model"
    model.mkdir()
    out = {"inside_data": image_folder / "zz", "other_folder": image_folder, "model": model}[where]
    if where == "other_folder":   # another image folder, given as --out of a fine-tune on other data
        data = tmp_path / "data2"
        (data / "b").mkdir(parents=True)
    else:
        data = image_folder
    says = {"inside_data": "inside --data", "other_folder": "already holds a, not a fine-tune's files",
            "model": "is --model"}[where]
    with pytest.raises(ConfigError, match=re.escape(says)):
        finetune(data=str(data), model=str(model), out=str(out), steps=1)
    assert not (image_folder / "zz").exists()


@pytest.mark.parametrize("trailing", ["", os.sep])
def test_profile_json_is_checked_before_the_run(trailing, tmp_path, image_folder, capsys, monkeypatch):
    """--json j/ where j is a file (a report already written): it was found out only after the profile, by the
    write ("profile.json/: Not a directory", no flag named)."""
    from manifoldgd_fast import pipeline

    monkeypatch.setattr(pipeline, "profile_run", lambda *a, **k: pytest.fail("profiled before --json was checked"))
    (tmp_path / "j").mkdir() if not trailing else (tmp_path / "j").write_text("{}")
    js = str(tmp_path / "j") + trailing
    assert main(["profile", "--data", str(image_folder), "--model", "x", "--ipc", "1", "--json", js]) == 2
    assert _one_line(capsys.readouterr().err) == f"manifoldgd-fast: error: --json {js}: a folder; give a file name"


def test_devices_that_cannot_run_are_refused_in_one_line(monkeypatch, tiny_world, tmp_path, capsys):
    """--device takes cpu and cuda[:N] of this machine: mps / xla / meta (which torch.device accepts) ended in
    torch's traceback mid-run, and cuda:3 on a one-GPU machine in 'invalid device ordinal'."""
    import torch

    from manifoldgd_fast.devices import resolve_device
    from manifoldgd_fast.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda")
    for name in ("mps", "meta", "xla"):
        with pytest.raises(ConfigError, match=f"^--device {name}: runs on cpu or cuda\\[:N\\], not on {name}$"):
            resolve_device(name)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^--device cuda:3: this machine has 1 CUDA device\(s\), cuda:0 \.\. cuda:0$"):
        resolve_device("cuda:3")
    monkeypatch.undo()
    from manifoldgd_fast.cli import main

    assert main(["distill", "--data", tiny_world["data"], "--model", tiny_world["model"], "--out", str(tmp_path / "o"),
                 "--device", "mps"]) == 2
    assert _one_line(capsys.readouterr().err) == "manifoldgd-fast: error: --device mps: runs on cpu or cuda[:N], not on mps"
    assert not (tmp_path / "o").exists()


CGS_ON = dict(method="cgs")


@pytest.mark.parametrize("kw", [
    dict(warm_steps=0), dict(level=0), dict(formulation="paper", level=0), dict(max_depth=0), dict(encode_workers=0),
    dict(method="dit", t_stop=0), dict(method="dit", t_stop=50), dict(image_size=8), dict(output_size=8),
    dict(output_size=4096), dict(seed=0), dict(warm_mult=1.0), dict(formulation="paper", r_min=0.0, r_max=1.0),
    dict(r_min=0.5, r_max=0.5), dict(d=11), dict(formulation="paper", d=9), dict(k=300, cloud_size=300),
    dict(k=12, k_min=12), dict(sampler="ddim", ddim_eta=1.0), dict(CGS_ON, ipc=10, eta_dm=10.0),
    dict(CGS_ON, dpp_eps=1e-5), dict(CGS_ON, ipc=1, eta_dpp=0.0, eta_dm=0.1), dict(cfg_scale=0.0),
], ids=str)
def test_parameter_bounds_take_their_edge(kw, tmp_path):
    """Each bound takes its edge value (SPEC's ranges: no warm-up, the paper's root level, d = k - 1, ...)."""
    from manifoldgd_fast.config import DistillConfig

    DistillConfig(out=str(tmp_path / "o"), **kw).validate()


@pytest.mark.parametrize("kw,says", [
    (dict(warm_steps=-1), "--warm-steps"), (dict(level=-1), "--level"), (dict(encode_workers=-1), "--encode-workers"),
    (dict(image_size=7), "--image-size"), (dict(output_size=7), "--output-size"), (dict(output_size=4097), "--output-size"),
    (dict(seed=-1), "--seed"), (dict(k=1, d=1), "--k must be an integer >= 2"), (dict(warm_mult=0.99), "--warm-mult"), (dict(warm_mult=float("nan")), "--warm-mult"),
    (dict(formulation="paper", r_max=1.01), "--r-max"), (dict(r_min=0.6, r_max=0.5), "--r-min"), (dict(d=12), "--d"),
    (dict(k=301, cloud_size=300), "--k must be <= --cloud-size"), (dict(k=12, k_min=11), "--k-min"),
    (dict(method="dit", t_stop=51), "--t-stop"), (dict(sampler="ddim", ddim_eta=1.01), "--ddim-eta"),
    (dict(CGS_ON, ipc=10, eta_dm=10.5), "--eta-dm"), (dict(CGS_ON, dpp_eps=0.99e-5), "--dpp-eps"),
    (dict(CGS_ON, ipc=1, eta_dm=0.0), "CGS at --ipc 1"), (dict(CGS_ON, eta_dpp=0.0, eta_dm=0.0), "CGS with --eta-dpp 0"),
    (dict(cfg_scale=-1.0), "--cfg-scale"), (dict(manifold_radius=0.0), "--manifold-radius"),
    (dict(bandwidth=0.0), "--bandwidth"), (dict(kernel_bandwidth=0.0), "--kernel-bandwidth"),
    (dict(neighbourhood_dtype="float64"), "--neighbourhood-dtype"), (dict(attention="triton"), "--attention"),
    (dict(compile="default", loop="reference"), "--compile"),
    (dict(loop="fast", guidance_noise="generator"), "--loop fast"), (dict(ipc=True), "--ipc"),
    (dict(backbone="sd", cfg_channels="3"), "--cfg-channels"), (dict(CGS_ON, cgs_steps="some"), "--cgs-steps"),
], ids=str)
def test_parameter_bounds_refuse_past_their_edge(kw, says, tmp_path):
    """One step past each bound (or a value another setting rules out) is refused by a ConfigError that begins
    with the flag."""
    from manifoldgd_fast.config import DistillConfig
    from manifoldgd_fast.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        DistillConfig(out=str(tmp_path / "o"), **kw).validate()
    assert str(e.value).startswith(says), str(e.value)


def test_defaults_are_the_specs():
    """SPEC's defaults, as given and as resolved for an ImageNette-sized run (10 classes) and an ImageNet-100 one,
    under both formulations (a changed default passed every test that sets the parameter itself)."""
    from manifoldgd_fast.config import DistillConfig

    c = DistillConfig()
    assert (c.method, c.formulation, c.steps, c.ipc, c.seed, c.dtype) == ("manifoldgd", "official", 50, 10, 0, "float32")
    assert (c.lambda_m, c.kernel, c.d, c.lambda_n, c.manifold_scale) == (0.1, "rbf", 3, 1.0, 0.1)
    assert (c.radius_schedule, c.radius_a, c.radius_units, c.r_min, c.r_max) == ("exponential", 5.0, "quantile", 0.2, 0.9)
    assert (c.cloud_size, c.warm_steps, c.warm_mult, c.warm_schedule) == (300, 5, 2.0, "exp")
    assert (c.bisect_inits, c.kmeans_iters, c.kmeans_tol, c.min_leaf, c.linkage) == (10, 300, 1e-4, 2, "ward")
    assert (c.ddim_eta, c.eta_dpp, c.eta_dm, c.dpp_eps, c.cgs_steps) == (0.0, 1.0, 0.1, 1e-3, "all")
    want = {  # (formulation, classes): k, ridge, k_min, level, manifold_radius, bandwidth, cfg_channels, mode_point
        ("official", 10): (12, 1e-5, 24, 6, 0.05, 0.2, "3", "medoid"),
        ("official", 11): (12, 1e-5, 24, 1, 0.1, 0.1, "3", "medoid"),
        ("paper", 10): (10, 1e-4, 20, 3, 0.05, 0.2, "all", "mean"),
        ("paper", 100): (10, 1e-4, 20, 2, 0.1, 0.1, "all", "mean"),
    }
    for (formulation, n), values in want.items():
        r = DistillConfig(formulation=formulation).resolve(n, "cpu")
        got = (r.k, r.ridge, r.k_min, r.level, r.manifold_radius, r.bandwidth, r.cfg_channels, r.mode_point)
        assert got == values, (formulation, n, got)
        assert (r.cfg_scale, r.sampler, r.t_stop, r.mode_method, r.kernel_bandwidth) == (4.0, "ddpm", 25, "divisive", None)
        assert (r.cgs, r.guidance_noise, r.backbone) == (False, "generator", "dit")
    assert DistillConfig(method="mgd3").resolve(10, "cpu").mode_method == "kmeans"
    assert DistillConfig(loop="fast").resolve(10, "cpu").guidance_noise == "philox"   # pre-drawn in the fast loop
    assert DistillConfig(ipc=10, batch_size=16).resolve(5, "cpu").class_batch == 1
    assert DistillConfig(ipc=2, batch_size=16).resolve(5, "cpu").class_batch == 5
    assert DistillConfig(ipc=50, batch_size=16).resolve(5, "cpu").class_batch == 1
