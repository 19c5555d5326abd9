"""``manifoldgd-fast cache | modes | distill``: flags -> DistillConfig -> pipeline.

The only place that turns exceptions into exit codes: a ``ManifoldGDError``
(bad input a user can fix) prints one line naming the culprit and exits 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import re
import signal
import sys
import threading
import warnings

from .config import DistillConfig
from .errors import ConfigError, ManifoldGDError

# Help per parameter, grouped as in SPEC. Defaults are appended from DistillConfig.
GROUPS: dict[str, dict[str, str]] = {
    "data and models": {
        "data": "image folder ROOT/<class>/<image> (jpg, jpeg, png, ppm, bmp, pgm, tif, tiff, webp) (default: "
                "the embedded demo, scikit-learn's digits exported under the cache, with the shipped digits model)",
        "out": "output folder: OUT/<class>/<i>.png, OUT/latents/, OUT/manifest.json",
        "classes": "restrict to a subset: nette, woof, imagenet100, idc, imagenet1k, a text file, or 'a,b,c' "
                   "(default: every class folder)",
        "label_map": "folder name -> DiT class id: auto (ImageNet wnids if all folders are wnids, else sorted), "
                     "imagenet1k, sorted, or a class-map file: JSON {\"folder\": id} or 'folder<tab|,|space>id' lines, "
                     "id = a class id, a WordNet id (n01443537) or an ImageNet class name (goldfish)",
        "model": "DiT (a diffusers folder or a pipeline with transformer/) or Stable Diffusion 1.x / 2.x (a diffusers "
                 "folder: unet/, vae/, text_encoder/, tokenizer/): a local folder or a HF id in the local cache "
                 "(required with --data; default: the shipped digits DiT, for the embedded demo)",
        "vae": "AutoencoderKL: folder or cached HF id (e.g. stabilityai/sd-vae-ft-ema); default: the model folder's vae/",
        "cache_dir": "latent cache root (default $MANIFOLDGD_CACHE or ~/.cache/manifoldgd_fast)",
        "image_size": "image resolution (default: 8 x the model's latent size)",
        "backbone": "generator family: auto (from the model folder), dit, or sd (Stable Diffusion 1.x / 2.x, "
                    "class-name prompts)",
        "prompt_template": "sd: each class's prompt, {name} = its class name (default '{name}': the class name "
                           "alone, as the MGD3 paper; e.g. 'a photo of a {name}')",
        "negative_prompt": "sd: the prompt of the CFG null class (default: empty)",
        "class_names": "sd: class names for the prompts: '<folder> <name>' lines in a file, a JSON file, or 'a=apple,b=banana' "
                       "(a name 'tench, Tinca tinca' gives its first synonym, so LOC_synset_mapping.txt works; "
                       "default: ImageNet names of wnid folders, else the folder name with _ as spaces)",
        "device": "auto, cpu, cuda, cuda:1, ...",
        "dtype": "float32, bfloat16 or float16 (autocast of the DiT and VAE on CUDA; guidance stays fp32)",
        "seed": "run seed; class and sample seeds derive from it",
        "ipc": "images per class",
        "batch_size": "samples denoised together",
        "class_batch": "classes sampled in one batch (default: batch-size // ipc, so that small IPCs fill the GPU)",
        "encode_batch_size": "images per VAE encode batch",
        "shard": "K/N: this process takes classes j with j mod N == K, independently of the other shards (e.g. "
                 "a Slurm job array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; the same bytes as one "
                 "process; each shard brings the manifest up to date when it finishes) (default: every class, or torchrun's "
                 "ranks' share)",
        "encode_workers": "DataLoader workers reading images for the latent cache (0: in the main process; "
                          "default: min(8, CPUs / ranks))",
        "backend": "fused ops backend (the guidance ops; with --dit-impl fused also its LayerNorm-modulate and "
                   "gate-residual): auto, reference, triton",
        "guidance_noise": "cloud / patch noise: auto (philox on CUDA: the fused kernels), generator, philox",
        "loop": "sampling loop: auto (fast on CUDA), reference, fast (static step; CUDA graphs on CUDA)",
        "compile": "torch.compile the DiT in the fast loop: none, default, max-autotune, max-autotune-no-cudagraphs",
        "attention": "the DiT attention: an SDPA backend (auto, cudnn, flash, efficient, math) or triton "
                     "(our kernel for head dim 72; needs --dit-impl fused)",
        "dit_impl": "DiT forward: diffusers, or fused (fused QKV, conditioning once per step, fused LayerNorm-modulate "
                    "and gate-residual kernels; equal to float rounding)",
        "time_embedding": "DiT timestep features: auto (original for facebookresearch's DiT-XL/2 weights and .pt "
                          "checkpoints, else diffusers), original (divide by 128 and LayerNorm eps 1e-6, as "
                          "facebookresearch/DiT and the releases) or diffusers (by 127; norm3 eps from the config)",
    },
    "method": {
        "method": "manifoldgd, mgd3 (mode guidance only), dit (plain CFG sampling) or cgs (collaborative guidance alone)",
        "formulation": "official (the authors' released sampler) or paper (tangent projection of the guidance)",
        "sampler": "auto (ddpm, as the releases), ddpm (DiT: learned-range variance; SD: fixed small) or ddim",
        "steps": "sampling steps",
        "ddim_eta": "DDIM eta (0 = deterministic)",
        "cfg_scale": "classifier-free guidance scale (default: 4 for DiT, 8 for SD); <= 1 turns it off "
                     "(the conditional prediction alone, one forward per sample, as DiT's sample.py and diffusers)",
        "cfg_channels": "auto (3 for DiT under the official formulation, all for SD and the paper formulation), "
                        "3 (official DiT: CFG on the first 3 eps channels) or all",
        "t_stop": "guidance while the step is before t_stop (official: respaced index > t_stop; default: 25 for DiT; "
                  "SD: the steps with timestep > 500, 24 official / 25 paper at 50 steps)",
    },
    "mode discovery": {
        "mode_method": "auto (divisive for manifoldgd, kmeans for mgd3), kmeans, divisive, gmm, random, agglomerative",
        "modes_dir": "read each class's modes from DIR/<class>.safetensors, written by `modes` with the same flags "
                     "(default: none, each class's modes are found in the run)",
        "mode_point": "auto (medoid for official divisive), medoid or mean",
        "level": "divisive start level: official i, paper L (default: official 6 for <=10 classes, else 1; "
                 "paper 3 / 2)",
        "max_depth": "paper divisive tree depth (default: enough for the budget)",
        "min_leaf": "paper divisive: nodes with fewer points are not split",
        "linkage": "agglomerative linkage: ward, average, complete, single",
        "kmeans_iters": "k-means iterations at most (sklearn's max_iter, as the releases)",
        "gmm_iters": "--mode-method gmm: EM steps at most (sklearn GaussianMixture's max_iter)",
        "kmeans_tol": "k-means stops when the squared centre shift <= tol x the mean feature variance (sklearn's tol)",
        "bisect_inits": "2-means restarts per split",
    },
    "mode guidance": {
        "kernel": "rbf, laplace or imq",
        "kernel_bandwidth": "kernel sigma / c (default 1; paper imq h: sqrt(D))",
        "lambda_m": "mode guidance scale lambda_M",
    },
    "manifold term": {
        "k": "nearest rows for the tangent space (default: paper 10, official 12)",
        "d": "tangent dimension",
        "ridge": "covariance ridge (default: paper 1e-4, official 1e-5)",
        "lambda_n": "paper: share of the normal component removed (1 = pure tangent projection)",
        "k_min": "paper: minimum patch size (default 2k)",
        "radius_schedule": "paper radius annealing: exponential, cosine, linear, constant",
        "radius_a": "paper exponential annealing rate a",
        "radius_units": "paper radii: quantile (of mode-to-member distances) or absolute",
        "r_min": "paper smallest radius",
        "neighbourhood_dtype": "paper: the class latents the patch is built from, on the device: float32, or bfloat16 / "
                               "float16 (half the bytes of the kNN + Gram passes; neighbourhoods still ranked in fp32)",
        "r_max": "paper largest radius",
        "manifold_scale": "official lambda_man",
        "manifold_radius": "official cloud radius r (default: 0.05 for <=10 classes, else 0.1)",
        "bandwidth": "official tanh bandwidth b (default: 0.2 for <=10 classes, else 0.1)",
        "cloud_size": "official cloud points per mode",
        "warm_steps": "official radius warm-up steps",
        "warm_mult": "official warm-up multiplier M",
        "warm_schedule": "official warm-up schedule: exp, linear, cosine",
    },
    "collaborative guided sampling": {
        "cgs": "denoise each class's IPC samples as one set with DPP diversity + mean matching (SPEC 5) "
               "(default: off, except with --method cgs: CGS alone)",
        "cgs_steps": "steps CGS acts on: all (every step, as the source) or guided (only the guidance's, see --t-stop)",
        "eta_dpp": "step of the DPP diversity gradient",
        "eta_dm": "step of the distribution-matching gradient (at most --ipc; IPC / 2 lands a set's mean on the "
                  "class mean)",
        "dpp_eps": "ridge eps of -log det(K + eps I) (at least 1e-5)",
    },
    "output": {
        "save_latents": "also write the final latents (OUT/latents/<class>.safetensors)",
        "contact_sheet": "write OUT/contact_sheet.png (one row per class)",
        "output_size": "write the PNGs at this resolution (bicubic resize of the decoded images; default: the model's)",
    },
}

# What `cache` reads (its --help lists these; it accepts the others, e.g. from a --config shared with distill)
CACHE_FLAGS = frozenset({"data", "classes", "label_map", "model", "vae", "cache_dir", "image_size", "backbone",
                         "device", "dtype", "encode_batch_size", "encode_workers", "shard", "time_embedding"})

_COMMANDS = {
    "cache": "encode the image folder into the latent cache (resumable; a damaged cached class is encoded again)",
    "modes": "compute the IPC modes of every class into OUT/modes/",
    "distill": "distil the image folder into OUT (resumable)",
    "profile": "distil a few classes with per-phase timers (table + JSON; NVTX ranges on CUDA)",
}


def _type_of(f: dataclasses.Field):
    t = str(f.type)
    if "bool" in t:
        return None
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


# A help text that already states its default: "(default ...", "default: ...". A bare "default" is
# not enough: it is also a value (--compile none, default, max-autotune).
_STATES_DEFAULT = re.compile(r"\(default\b|\bdefault:", re.IGNORECASE)


def _states_default(text: str) -> bool:
    return bool(_STATES_DEFAULT.search(text))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the text does not already say it and X is not None
    (a None default is resolved at run time, and the text says how)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _states_default(text) or action.default is None:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ("manifoldgd-fast distill: error: argument --ipc: invalid int value: 'abc'"),
    exit 2: argparse's default prints the whole usage first, about 50 lines for ``distill``.
    No abbreviated flags (it and the subcommands' parsers): distill's ``--seed 5`` given to ``eval`` was its
    ``--seeds 5``, five seeds 0..4, and ``--out`` was ``--out-json``; a prefix also changes meaning as flags
    are added."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: this package's version and the libraries whose versions change the output bytes
    (as the manifest records them), for a bug report; they are imported only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .pipeline import library_versions

        v = library_versions()
        rest = ", ".join(f"{k} {x}" for k, x in v.items() if k != "manifoldgd_fast")
        print(f"{parser.prog} {v['manifoldgd_fast']} ({rest})")
        parser.exit(0)


# flags that mean the same in every command: their distill text serves a command that gives none
_SHARED_HELP = ("classes", "cache_dir", "device")


def _fill_missing_help(parser: argparse.ArgumentParser) -> None:
    """A flag without help text would be left out of --help entirely: give it the shared text of
    its name, or at least its default."""
    shared = {name: text for items in GROUPS.values() for name, text in items.items() if name in _SHARED_HELP}
    for action in parser._actions:
        if not action.option_strings or action.help:
            continue
        if action.dest in shared:
            action.help = shared[action.dest]
        elif action.default not in (None, argparse.SUPPRESS):
            action.help = "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="manifoldgd-fast",
                description="Dataset distillation with manifold-guided diffusion sampling "
                            "(ManifoldGD), mode guidance (MGD3) and plain DiT.")
    p.add_argument("--version", action=_Version, help="print the version and those of torch, diffusers, triton, "
                                                        "... (as the manifest records them), then exit")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join([*_COMMANDS, "eval", "metrics", "finetune"]) + "}")
    from .eval import cli_eval

    defaults = DistillConfig()
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    for cmd, help_ in _COMMANDS.items():
        sp = sub.add_parser(cmd, help=help_, description=help_,
                            formatter_class=_HelpFormatter)
        sp.add_argument("--config", help="YAML or JSON file of parameters; flags given here override it "
                                         "(default: none, the defaults shown below)")
        if cmd == "profile":
            sp.add_argument("--profile-classes", type=at_least_one, default=1, help="classes to distil (default: 1)")
            sp.add_argument("--json", dest="profile_json", help="also write the report to this JSON file (default: none, the table only)")
        for group, items in GROUPS.items():
            g = sp.add_argument_group(group)
            for name, text in items.items():
                f = fields[name]
                flag = "--" + name.replace("_", "-")
                default = getattr(defaults, name)
                typ = _type_of(f)
                if cmd == "profile" and name == "out":
                    text, default = "output folder (default: a temporary folder, removed afterwards)", None
                if cmd == "modes" and name == "out":
                    text = "output folder: the modes go to OUT/modes/<class>.safetensors (distill --modes-dir OUT/modes)"
                if cmd == "modes" and name == "modes_dir":
                    text = "not read by `modes`, which writes OUT/modes/ for distill --modes-dir (default: none)"
                help_ = text if default is None or _states_default(text) else f"{text} (default: {default})"
                if cmd == "cache" and name not in CACHE_FLAGS:
                    help_ = argparse.SUPPRESS   # accepted, not listed: distill's parameters do nothing here
                # SUPPRESS: only flags the user gave override the config file.
                if typ is None:
                    g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_)
                else:
                    g.add_argument(flag, dest=name, type=typ, default=argparse.SUPPRESS, metavar=name.upper(),
                                   help=help_)
    sp = sub.add_parser("eval", help=cli_eval.EVAL_HELP, description=cli_eval.EVAL_HELP,
                        formatter_class=_HelpFormatter)
    cli_eval.add_eval_args(sp)
    sp = sub.add_parser("metrics", help=cli_eval.METRICS_HELP, description=cli_eval.METRICS_HELP,
                        formatter_class=_HelpFormatter)
    cli_eval.add_metrics_args(sp)
    from .finetune import FINETUNE_HELP, add_finetune_args

    sp = sub.add_parser("finetune", help=FINETUNE_HELP, description=FINETUNE_HELP,
                        formatter_class=_HelpFormatter)
    add_finetune_args(sp)
    for sp in sub.choices.values():
        _fill_missing_help(sp)
    return p


def run_inputs(cfg: DistillConfig, config_file: str | None = None) -> dict:
    """{flag: path} of what a run reads (a report is never written over or inside one): the data, model, VAE
    and modes folders or files, the --classes / --label-map / --class-names files, the --config file."""
    given = {"--data": cfg.data, "--model": cfg.model, "--vae": cfg.vae, "--modes-dir": cfg.modes_dir,
             "--config": config_file}
    for flag, v in (("--classes", cfg.classes), ("--label-map", cfg.label_map), ("--class-names", cfg.class_names)):
        if isinstance(v, str) and os.path.isfile(v):
            given[flag] = v
    return given


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the flag and the value)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {n}")
    return n


def config_from_args(ns: argparse.Namespace) -> DistillConfig:
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "profile_classes", "profile_json")}
    config = getattr(ns, "config", None)
    if config == "":  # (an unset $VAR: it was no config at all, and `distill` ran the embedded demo)
        raise ConfigError("--config must be a file path, got ''")
    base = DistillConfig.load(config).to_dict() if config else {}
    base.update(given)
    return DistillConfig.from_dict(base)


class _StderrHandler(logging.Handler):
    """Warnings of the library (e.g. a skipped unreadable image) as one line each on the current stderr, on a
    line of their own: a progress bar being drawn is cleared and redrawn below (tqdm.write)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"manifoldgd-fast: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _setup_logging() -> None:
    log = logging.getLogger("manifoldgd_fast")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler(level=logging.WARNING))
        log.setLevel(logging.INFO)
    # the same event is logged; do not print it twice
    warnings.filterwarnings("ignore", message="skipping unreadable image")
    from PIL import Image  # (data.decode_image logs a large image naming its file; PIL's two lines name none)

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# what an interrupted command has kept for its rerun (each resumes; a command not named here keeps classes)
INTERRUPT_KEEPS = {"eval": "finished training runs are kept", "metrics": "the real images' features are kept",
                   "finetune": "the last checkpoint is kept"}


def _kept(command: str) -> str:
    """The end of the line of a command stopped by a signal or out of memory: what it kept, and that a rerun
    resumes. Not ``profile``'s: its temporary folder goes, and a rerun on its --out would time only the classes
    left (or, with all of them done, nothing)."""
    if command == "profile":
        return "a profile does not resume: rerun it (with a new --out, or none)"
    return f"{INTERRUPT_KEEPS.get(command, 'finished classes are kept')}, rerun to resume"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: Slurm's time limit or preemption, torchrun stopping its workers, `kill`.

    A KeyboardInterrupt, so that it takes Ctrl-C's path: temp files go, the manifest says which classes are
    done, locks are released, and the exit status is 143 (Slurm sends SIGKILL some 30 s later).
    """


@contextlib.contextmanager
def _signals_as_interrupt():
    """While the command runs (in the main thread): SIGTERM raises :class:`Terminated`, Ctrl-C (SIGINT)
    KeyboardInterrupt, as Python's own handler does; after the first, both are ignored, so that a second
    Ctrl-C or SIGTERM does not cut the clean-up short (it left temp folders, aborted in C++ threads, or a
    manifest behind the disk). A handler an embedding program set stays (each signal's own).

    A signal that lands while a ``__del__`` (or another finaliser) runs raises there, and Python drops that
    exception ("Exception ignored in ..."): with both signals then ignored, the run went on to its end and
    exited 0. Such a dropped stop is sent again a moment later, to land outside the finaliser."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = {sig: exc for sig, exc, default in ((signal.SIGTERM, Terminated, signal.SIG_DFL),
                                               (signal.SIGINT, KeyboardInterrupt, signal.default_int_handler))
            if signal.getsignal(sig) is default}
    before = {sig: signal.getsignal(sig) for sig in ours}
    raised, resends = [], []  # the exceptions stop raised, with their signals; the timers sending one again

    def stop(signum, frame):
        for sig in ours:
            signal.signal(sig, signal.SIG_IGN)
        exc = ours[signum]()
        raised.append((exc, signum))
        raise exc

    hook = sys.unraisablehook
    main_thread = threading.main_thread().ident

    def dropped(unraisable):
        signum = next((sig for exc, sig in raised if exc is unraisable.exc_value), None)
        if signum is None:
            return hook(unraisable)
        raised[:] = [(exc, sig) for exc, sig in raised if exc is not unraisable.exc_value]  # (and its frames)
        signal.signal(signum, stop)  # (this runs in the main thread: the finaliser that dropped it ran there)
        resends.append(threading.Timer(0.05, signal.pthread_kill, (main_thread, signum)))
        resends[-1].daemon = True
        resends[-1].start()

    for sig in ours:
        signal.signal(sig, stop)
    sys.unraisablehook = dropped
    try:
        yield
    finally:
        for t in resends:  # (the command ended before a stop sent again came: none is sent after it)
            t.cancel()
        sys.unraisablehook = hook
        for sig, handler in before.items():
            signal.signal(sig, handler)


def console() -> None:
    """The ``manifoldgd-fast`` script: :func:`main`, and after a stop by Ctrl-C or SIGTERM the exit with
    both ignored (a second one during the interpreter's shutdown printed a traceback from an atexit hook).
    A Ctrl-C before the command starts (the parser imports torch, a second or more) has nothing to clean up.
    A path that is not UTF-8 (its bytes come as surrogates from argv) prints on stdout as on stderr, ``\\udcff``:
    stdout's strict encoding (a UTF-8 locale other than C's) raised UnicodeEncodeError after the run was done."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        code = main()
        sys.stdout.flush()  # (`... | head`: a reader that left is answered here, not by the flush at exit)
    except KeyboardInterrupt:
        print("manifoldgd-fast: interrupted before the command started; nothing was written", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        _stdout_to_devnull()
        code = 128 + signal.SIGPIPE
    if code in (130, 128 + signal.SIGTERM):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null: its buffered rest, flushed at exit, raised BrokenPipeError again there
    ("Exception ignored ... BrokenPipeError")."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # (a stdout with no descriptor)
        pass


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: the host's (MemoryError, torch's CPU allocator) or the GPU's
    (torch.OutOfMemoryError; "CUDA error: out of memory" from the CUDA runtime itself, e.g. a cuBLAS or cuDNN
    workspace, which torch raises as a plain RuntimeError), not any other RuntimeError."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return any(s in str(e) for s in ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory",
                                     "CUDA error: out of memory"))


def _oom_line(e: BaseException) -> str:
    text = str(e)
    # torch's "Tried to allocate 20.00 GiB", its CPU allocator's "tried to allocate N bytes", numpy's "Unable to
    # allocate 728. TiB for an array"
    m = re.search(r"(?:tried|Tried|Unable) to allocate (?:(\d+) bytes|([\d.]+ ?[KMGTP]?i?B))", text)
    if m:
        size = f"{int(m.group(1)) / 2 ** 30:.1f} GiB" if m.group(1) else m.group(2)
        return f"{'CUDA' if 'CUDA' in text else 'host'}: tried to allocate {size}"
    return "CUDA" if "CUDA" in text else "MemoryError" if isinstance(e, MemoryError) else type(e).__name__


def _classes(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand, whose --help lists its flags
        sub = parser._subparsers._group_actions[0].choices.get(ns.command) if ns.command else None
        (sub or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if ns.command is None:  # one line, as every other usage error; --help lists the commands
        print(f"{parser.prog}: error: give a command: {', '.join(parser._subparsers._group_actions[0].choices)} "
              f"(see {parser.prog} --help; `{parser.prog} distill` runs the embedded demo)", file=sys.stderr)
        return 2
    with _signals_as_interrupt():  # Slurm / torchrun / kill stop a run as Ctrl-C does: same clean-up
        try:
            if ns.command in ("eval", "metrics"):
                from .eval import cli_eval

                (cli_eval.run_eval_from_args if ns.command == "eval" else cli_eval.run_metrics_from_args)(ns)
                return 0
            if ns.command == "finetune":
                from .finetune import run_finetune_from_args

                run_finetune_from_args(ns)
                return 0
            cfg = config_from_args(ns).validate()
            from . import pipeline

            if ns.command == "cache":
                ctx = pipeline.cache(cfg)
                print(f"latents of {_classes(len(ctx['entries']))} in {ctx['cache']}")
            elif ns.command == "modes":
                paths = pipeline.compute_modes(cfg)
                print(f"modes of {_classes(len(paths))} in {cfg.out}/modes")
            elif ns.command == "profile":
                from .config import check_out_file
                from .profile import dump, format_table

                if ns.profile_json is not None:  # checked before the run, not after it
                    # (the model's config.json, the --config file: it wrote over them, exit 0)
                    check_out_file(ns.profile_json, "--json", inputs=run_inputs(cfg, ns.config))
                    if "out" in vars(ns):
                        real, out = os.path.realpath(ns.profile_json), os.path.realpath(cfg.out)
                        if real == out or os.path.commonpath([real, out]) == out:   # (its manifest.json, a class)
                            raise ConfigError(f"--json {ns.profile_json}: inside --out {cfg.out}, the folder the "
                                              "profiled classes are written to; give a file elsewhere")
                rep = pipeline.profile_run(cfg, classes=ns.profile_classes,
                                           out=cfg.out if "out" in vars(ns) else None)
                print(format_table(rep))
                print(f"end to end: {rep['wall_seconds']:.2f} s (models and latents included), "
                      f"{rep['images_per_second']} images/s at the run's batch shape ({_classes(rep['class_batch'])} "
                      f"a batch, padded where fewer)")
                if ns.profile_json:
                    dump(rep, ns.profile_json)
            else:
                res = pipeline.distill(cfg)
                n, before = len(res.distilled), res.finished_before
                if cfg.shard is not None:
                    which = f"{n} of the run's {res.run_classes} classes (--shard {cfg.shard})"
                    left = (f"; {res.unfinished} {'is' if res.unfinished == 1 else 'are'} left to the other shards"
                            if res.unfinished else "; every class of the run is done")
                else:
                    which = _classes(n) if n + before == res.run_classes else \
                        f"{n} of the run's {res.run_classes} classes on this rank"
                    left = ""
                resumed = f"; {before} {'was' if before == 1 else 'were'} already done" if before else ""
                print(f"distilled {which} into {res.out}{resumed}{left} (manifest: {res.manifest})")
        except ManifoldGDError as e:
            print(f"manifoldgd-fast: error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # `... | head`: the reader of stdout left (the work is done); as a tool SIGPIPE kills
            _stdout_to_devnull()
            return 128 + signal.SIGPIPE
        except OSError as e:  # a full disk, a read-only or vanished folder: the file and the reason, no traceback
            where = f"{e.filename}: " if e.filename else ""
            print(f"manifoldgd-fast: error: {where}{e.strerror or e}", file=sys.stderr)
            return 2
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            print(f"manifoldgd-fast: error: out of memory ({_oom_line(e)}): lower --batch-size (distill: also "
                  f"--class-batch; cache: --encode-batch-size); {_kept(ns.command)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            how, code = ("terminated (SIGTERM)", 128 + signal.SIGTERM) if isinstance(e, Terminated) else \
                ("interrupted", 130)
            print(f"manifoldgd-fast: {how}; {_kept(ns.command)}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
