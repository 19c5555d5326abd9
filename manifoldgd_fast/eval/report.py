"""The evaluation's reports: mean ± std over seeds, the markdown tables, the JSON and markdown files,
and the summary appended to each distilled folder's manifest (``eval`` by :mod:`.protocol`,
``metrics`` by :mod:`.metrics`)."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os

import numpy as np

from ..errors import DataError
from ..output import LOCK_NAME, MANIFEST, MANIFEST_LOCK, RunLock, atomic_write_text, class_done, lock_is_held

log = logging.getLogger(__name__)


def summarize(key: str, values) -> dict:
    """``{key_mean, key_std}`` over seeds (numpy std, ddof 0, as the DD literature reports)."""
    v = np.asarray(values, dtype=np.float64)
    return {f"{key}_mean": float(v.mean()), f"{key}_std": float(v.std())}


def check_not_being_written(folder: str, flag: str = "--distilled") -> None:
    """DataError when a distill run still writes ``folder`` (it holds OUT's run lock): an evaluation read the
    classes finished by then and recorded its numbers as the run's (found by a concurrency audit)."""
    try:  # a whole run holds OUT/.lock exclusively; each --shard K/N process its OUT/.lock-shard-K-of-N
        locks = [LOCK_NAME, *sorted(n for n in os.listdir(folder) if n.startswith(".lock-shard-"))]
    except OSError:
        return
    for name in locks:
        lock = os.path.join(folder, name)
        if os.path.isfile(lock) and lock_is_held(lock, exclusive_only=True):
            try:
                with open(lock, encoding="utf-8", errors="replace") as f:
                    holder = f.read(200).strip()
            except OSError:
                holder = ""
            raise DataError(f"{flag} {folder} is being written by a distill run ({holder or 'another process'}); "
                            "evaluate it once that run has finished")
    _check_finished(folder, flag)


def _check_finished(folder: str, flag: str) -> None:
    """DataError when ``folder``'s manifest names classes that are not finished: a run killed, or
    --shard K/N tasks still to run (a job array's shards start hours apart, holding no lock in between). The
    classes finished so far were scored and recorded as the run's, exit 0 (audit)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            classes = json.load(f).get("classes")
    except (OSError, ValueError, AttributeError):  # no manifest (a folder of images), or not a run's
        return
    if not isinstance(classes, dict):
        return
    # done: its .complete mark on disk, or "done" in the manifest (a copy made without hidden files has no marks;
    # a class still to run is "pending" there, a stale manifest's finished class has its mark)
    left = [name for name, info in classes.items()
            if not class_done(folder, name) and not (isinstance(info, dict) and info.get("status") == "done")]
    if left:
        raise DataError(f"{flag} {folder} is an unfinished distill run: {len(left)} of its {len(classes)} classes "
                        f"are not done ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}); finish it (rerun "
                        "its command, or the --shard K/N processes still to run) before evaluating it")


def report_lock(report: str, what: str) -> RunLock:
    """One run per report at a time: ``.lock-<name>`` beside ``report``, refused naming ``what`` holds it (two
    evaluations into one report both said "results: eval.json", which held the last one's, and their
    read-modify-writes of the partial file lost each other's finished runs: an audit)."""
    return RunLock(os.path.dirname(os.path.abspath(report)), name=f".lock-{os.path.basename(report)}", what=what,
                   flag="--out-json", target=report)


def append_manifest(out_dir: str, key: str, entry: dict) -> str | None:
    """Append ``entry`` to the list ``manifest[key]`` of OUT/manifest.json, atomically; None if absent.
    Holding OUT's manifest lock: another evaluation's record, or a distill rewriting the manifest, is not
    lost (each read the file, then wrote it back without the other's change)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(RunLock(out_dir, name=MANIFEST_LOCK, wait=True))
        except OSError:  # (a read-only folder: its manifest cannot be written either, which is said below)
            pass
        return _append_manifest(path, key, entry)


def _append_manifest(path: str, key: str, entry: dict) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("not recording %s in %s: cannot read it (%s)", key, path, e)
        return None
    if not isinstance(manifest, dict):
        log.warning("not recording %s in %s: it holds no manifest (a JSON %s)", key, path, type(manifest).__name__)
        return None
    old = manifest.get(key)
    manifest[key] = (old if isinstance(old, list) else [old] if old else []) + [entry]
    try:  # the result files are written first: a read-only distilled folder still gets its numbers elsewhere
        atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    except OSError as e:
        log.warning("not recording %s in %s: cannot write it (%s)", key, path, e.strerror or e)
        return None
    return path


def _net_rows(nets: dict, what: str = "per seed") -> list[str]:
    lines = [f"| net | params | best top-1 | final top-1 | {what} best | {what} final |",
             "|---|---:|---:|---:|---|---|"]
    for net, r in nets.items():
        bests = [s["best"] for s in r["seeds"]] if "seeds" in r else r["best_per_seed"]
        finals = [s["final"] for s in r["seeds"]] if "seeds" in r else r["final_per_seed"]
        lines.append(f"| {net} | {r['params'] / 1e6:.2f}M | {r['best_mean']:.2f} ± {r['best_std']:.2f} | "
                     f"{r['final_mean']:.2f} ± {r['final_std']:.2f} | {', '.join(f'{v:.2f}' for v in bests)} | "
                     f"{', '.join(f'{v:.2f}' for v in finals)} |")
    return lines


TABLE_TITLE = "# Evaluation ("   # the first line of every table markdown_table writes


def is_eval_table(path: str) -> bool:
    """Whether ``path`` holds a table an evaluation wrote (:func:`markdown_table`'s first line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(200).startswith(TABLE_TITLE)
    except OSError:
        return False


def markdown_table(result: dict) -> str:
    """Per net: params, best and final top-1 mean ± std, and each run's best / final; with several
    distilled folders the pooled table (all (folder, seed) runs) comes first, then one per folder."""
    folders = result.get("distilled_folders") or [result["distilled"]]
    n_seeds = len(result["seeds"])
    seeds = f"{n_seeds} seed" if n_seeds == 1 else f"{n_seeds} seeds"
    head = (f"{result['num_classes']} classes, IPC {result['ipc']}, {result['size']} px, {result['epochs']} epochs, "
            f"validation {result['real_val']} ({result['n_val']} images"
            + (f", labelled by {result['val_labels']}" if result.get("val_labels") else "")
            + "); top-1 %, mean ± std over ")
    if len(folders) == 1:
        lines = [f"{TABLE_TITLE}{result['protocol']}): {folders[0]}", "", head + seeds, "",
                 *_net_rows(result["nets"])]
    else:
        lines = [f"{TABLE_TITLE}{result['protocol']}): {len(folders)} distilled sets", "",
                 head + f"{len(folders) * n_seeds} runs ({len(folders)} distilled sets x {seeds})", "",
                 *_net_rows(result["nets"], "per run")]
        for i, pf in enumerate(result["per_folder"]):
            lines += ["", f"## Set {i}: {pf['distilled']} (IPC {pf['ipc']}; mean ± std over {seeds})", "",
                      *_net_rows(pf["nets"])]
    return "\n".join(lines) + "\n"


def _summary(nets: dict) -> dict:
    return {n: {k: r[k] for k in ("best_mean", "best_std", "final_mean", "final_std")} for n, r in nets.items()}


def eval_json_path(folders: list[str], out_json: str | None) -> str:
    """Where the evaluation's JSON goes: ``out_json``, else OUT/eval.json (OUT1/eval_pooled.json for several)."""
    return out_json or os.path.join(folders[0], "eval_pooled.json" if len(folders) > 1 else "eval.json")


def eval_markdown_path(out_json: str) -> str:
    """The markdown table beside the JSON: OUT/eval.md beside OUT/eval.json."""
    return os.path.splitext(out_json)[0] + ".md"


def write_eval_outputs(result: dict, folders: list[str], out_json: str | None) -> None:
    """Write the JSON and the markdown (default OUT/eval.json; OUT1/eval_pooled.json for several
    folders) and append a summary to each folder's manifest "eval" list (its own numbers, and the
    pooled ones when there are several folders)."""
    several = len(folders) > 1
    out_json = eval_json_path(folders, out_json)
    out_md = eval_markdown_path(out_json)
    result["files"] = {"json": os.path.abspath(out_json), "markdown": os.path.abspath(out_md)}
    base = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "file": result["files"]["json"], "protocol": result["protocol"], "size": result["size"],
            "epochs": result["epochs"], "seeds": result["seeds"], "real_val": result["real_val"],
            # the other settings its numbers depend on (two records of one folder at another --val-resize,
            # --restrict-val, --teacher or --lr read alike; the file both name holds only the last)
            **{k: result.get(k) for k in ("val_labels", "restrict_val", "n_val", "val_resize", "resample", "teacher",
                                          "temperature", "hparams", "tested", "precision_mode")}}
    paths = [os.path.join(os.path.abspath(f), MANIFEST) for f in folders]     # where the summaries go
    manifests = [p if os.path.isfile(p) else None for p in paths]
    result["manifest"], result["manifests"] = manifests[0], manifests
    atomic_write_text(out_json, json.dumps(result, indent=2, sort_keys=True, default=str))
    atomic_write_text(out_md, markdown_table(result))
    recorded = []
    for i, folder in enumerate(folders):  # after the results: a folder we cannot write loses only its summary
        entry = dict(base, nets=_summary(result["per_folder"][i]["nets"] if several else result["nets"]))
        if several:
            entry.update(pooled=_summary(result["nets"]), distilled_folders=result["distilled_folders"])
        recorded.append(append_manifest(os.path.abspath(folder), "eval", entry))
    result["manifest"], result["manifests"] = recorded[0], recorded      # what was written (the CLI says it)
