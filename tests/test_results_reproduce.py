"""The committed real-weights study (results/tweets-minilm) is reproducible: one cell of its table, re-run from
scratch through the same command, matches what is committed; its report's tables and robustness summary, and the
summary table of README "Results", are what the code computes from its committed results.csv and summary.csv.

Tolerance. The study runs every trainer with --deterministic and one thread (machine.json), so on the machine
type that produced it a rerun is bit-identical: equal predictions, equal weights. On another CPU, torch may pick
other vector kernels and the float32 sums round differently; those differences are around 1e-6 relative per
step and move the final weights by far less than the distance's 4 significant digits, but a tweet whose two
logits are nearly equal may flip. We allow one flipped test tweet per seed: |Δ mean accuracy| ≤ 1/n_test (the
mean of 3 seeds moves by 1/(3 n_test) per flip), and 1e-3 relative on the mean distance.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from eval import robustness, robustness_summary, robustness_tables
from training.text.tweet_data import VALIDATION_SIZE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "tweets-minilm"


def _summary(folder: Path, name: str = "summary.csv") -> list[dict]:
    with open(folder / name) as f:
        return list(csv.DictReader(f))


def test_the_readme_summary_table_is_computed_from_the_committed_runs():
    """README "Results": worst / area / window of the test accuracy per method, from results.csv's rows."""
    table = robustness_summary.summary_table(robustness_summary.summarise(_summary(RESULTS, "results.csv"),
                                                                          "accuracy"))
    assert table in (ROOT / "README.md").read_text().split("## Results", 1)[1]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| lora", "| dora", "| delora",
                                                                         "| etherplus"]


@pytest.mark.parametrize("study", ["", "pilot"])
def test_the_committed_report_is_what_the_code_writes_from_the_committed_csv(tmp_path, study):
    """eval.robustness_tables on a copy of the committed folder changes nothing: report.md's tables and
    robustness_summary.csv are up to date with the code."""
    folder = RESULTS / study
    copy = tmp_path / "study"
    shutil.copytree(folder, copy)
    assert robustness_tables.main([str(copy)]) == 0
    for name in ("report.md", "robustness_summary.csv"):
        assert (copy / name).read_text() == (folder / name).read_text(), name
    assert (folder / "report.md").read_text().startswith("# Robustness study: glue (tweet_polarity)\n")


@pytest.mark.slow   # three 2-minute MiniLM runs, two at a time
def test_one_cell_of_the_committed_table(tmp_path):
    method = "delora"
    committed = next(r for r in _summary(RESULTS) if r["study"] == "lr" and r["method"] == method
                     and float(r["factor"]) == 1.0)
    machine = json.loads((RESULTS / "machine.json").read_text())
    assert machine["threads_per_run"] == 1 and "--deterministic" in (RESULTS / "commands.txt").read_text()
    out = tmp_path / "cell"
    assert robustness.cli(["--task", "glue", "--task_name", "tweet_polarity", "--methods", method, "--lr_factors",
                           "1", "--seeds", "0", "1", "2", "--studies", "lr", "--jobs", "2", "--deterministic",
                           "--num_threads", "1", "--output_dir", str(out)]) == 0
    rerun = next(r for r in _summary(out) if r["method"] == method)
    assert rerun["n"] == committed["n"] == "3"
    n_test = VALIDATION_SIZE - VALIDATION_SIZE // 2          # the test half of the validation tweets
    assert abs(float(rerun["accuracy"]) - float(committed["accuracy"])) <= 1 / n_test
    assert float(rerun["distance"]) == pytest.approx(float(committed["distance"]), rel=1e-3)
