"""The evaluation's reports: the markdown tables state each figure of the result they are made from."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from manifoldgd_fast.eval import report as R


def _net(bests, finals, params=1_234_567):
    s = {**R.summarize("best", bests), **R.summarize("final", finals)}
    return {"params": params, "seeds": [{"best": b, "final": f} for b, f in zip(bests, finals)], **s}


def _result(folders, seeds, per_folder=None, nets=None):
    return {"distilled": folders[0] if len(folders) == 1 else folders, "distilled_folders": folders,
            "seeds": seeds, "num_classes": 3, "ipc": 4, "size": 8, "epochs": 5, "real_val": "/val", "n_val": 18,
            "protocol": "hard-label", "nets": nets, "per_folder": per_folder or []}


def test_summarize_is_the_mean_and_the_population_std():
    v = [10.0, 20.0, 60.0]
    s = R.summarize("best", v)
    assert s == {"best_mean": pytest.approx(30.0), "best_std": pytest.approx(np.sqrt(((10 - 30) ** 2 + (20 - 30) ** 2
                                                                                      + (60 - 30) ** 2) / 3))}


def test_markdown_row_states_best_and_final_means_stds_and_each_run():
    bests, finals = [61.0, 75.5], [55.25, 70.0]
    md = R.markdown_table(_result(["/d"], [0, 1], nets={"convnet6": _net(bests, finals)}))
    lines = md.splitlines()
    assert lines[0] == "# Evaluation (hard-label): /d"
    assert lines[2].endswith("); top-1 %, mean ± std over 2 seeds")
    row = [c.strip() for c in lines[-1].strip("|").split("|")]
    sb, sf = np.std(bests), np.std(finals)
    assert row == ["convnet6", "1.23M", f"{np.mean(bests):.2f} ± {sb:.2f}", f"{np.mean(finals):.2f} ± {sf:.2f}",
                   "61.00, 75.50", "55.25, 70.00"]
    one = R.markdown_table(_result(["/d"], [3], nets={"convnet6": _net([50.0], [40.0])}))
    assert "mean ± std over 1 seed\n" in one


def test_markdown_of_several_sets_counts_runs_and_gives_each_sets_own_numbers():
    a, b = _net([60.0, 62.0], [50.0, 51.0]), _net([70.0, 80.0], [65.0, 66.0])
    pooled = _net([60.0, 62.0, 70.0, 80.0], [50.0, 51.0, 65.0, 66.0])
    per_folder = [{"distilled": "/a", "ipc": 4, "nets": {"convnet6": {
                       "params": a["params"], "best_per_seed": [60.0, 62.0], "final_per_seed": [50.0, 51.0], **a}}},
                  {"distilled": "/b", "ipc": 2, "nets": {"convnet6": {
                       "params": b["params"], "best_per_seed": [70.0, 80.0], "final_per_seed": [65.0, 66.0], **b}}}]
    for pf in per_folder:
        del pf["nets"]["convnet6"]["seeds"]
    md = R.markdown_table(_result(["/a", "/b"], [0, 1], per_folder=per_folder, nets={"convnet6": pooled}))
    assert "mean ± std over 4 runs (2 distilled sets x 2 seeds)" in md and "per run best | per run final |" in md
    assert "| 60.00, 62.00, 70.00, 80.00 | 50.00, 51.00, 65.00, 66.00 |" in md
    assert "## Set 1: /b (IPC 2; mean ± std over 2 seeds)" in md
    assert f"| {75.0:.2f} ± {5.0:.2f} | {65.5:.2f} ± {0.5:.2f} | 70.00, 80.00 | 65.00, 66.00 |" in md


def test_each_folders_manifest_gets_its_own_numbers(tmp_path):
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    for f, old in zip(folders, ({"method": "x", "eval": {"old": 1}}, {"method": "y"})):
        os.makedirs(f)
        with open(os.path.join(f, "manifest.json"), "w") as fh:
            json.dump(old, fh)
    a, b = _net([60.0], [50.0]), _net([70.0], [65.0])
    per_folder = [{"distilled": f, "ipc": 4, "nets": {"convnet6": n}} for f, n in zip(folders, (a, b))]
    R.write_eval_outputs(_result(folders, [0], per_folder=per_folder, nets={"convnet6": _net([60.0, 70.0],
                                                                                           [50.0, 65.0])}),
                         folders, None)
    assert os.path.isfile(os.path.join(folders[0], "eval_pooled.json"))
    entries = []
    for f in folders:
        with open(os.path.join(f, "manifest.json")) as fh:
            entries.append(json.load(fh)["eval"])
    assert entries[0][0] == {"old": 1} and len(entries[0]) == 2 and len(entries[1]) == 1   # an old entry kept
    assert [e[-1]["nets"]["convnet6"]["best_mean"] for e in entries] == [60.0, 70.0]
    assert entries[1][-1]["pooled"]["convnet6"]["best_mean"] == 65.0
