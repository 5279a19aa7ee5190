"""The robustness report's tables and the command that rewrites them from the study's CSV files:

    python -m eval.robustness_tables results/tweets-minilm

report.md's tables (Fig. 2's sweep, its robustness summary, Fig. 3's prolonged runs, App. D, Table 1) are
functions of the study's rows alone; eval.robustness writes them after training, and this command writes them
again into a finished study's report.md from its results.csv (one row per run) and summary.csv (mean ± std over
the seeds), with robustness_summary.csv beside them: no run folder is read and nothing is trained, so a study
whose runs are not at hand (the committed one) gets the current tables. The report's other parts (its header,
figures, the weight norms, the commands) stay as they are, its title names the study's task.

Cells: scores (0-1: accuracy, F1, DINO, drift, mIoU, the tuning score) in percent with one decimal, their ± to the
same decimal; distances and bounds with three significant digits, their ± to the same decimal place
(eval.tables). Bad input: one `error:` line, exit status 2.
"""
from __future__ import annotations

import csv
import shlex
import sys
from pathlib import Path

from ground.runfolder import write_text
from training.common.tasks import DREAMBOOTH, TASKS

from . import EvalError
from .common import ArgumentParser, run_main
from .plots import nice
from .robustness_summary import CSV_COLUMNS as SUMMARY_CSV
from .robustness_summary import summarise, summary_table
from .robustness_tasks import ABLATION_ROWS, flag_value
from .tables import md_table, measured, percent, write_csv

MEASURES = ("distance", "bound")   # measurements of the weights
SCORES = ("tune_score", "dino", "clip_i", "drift", "miou", "metric", "accuracy", "f1", "macro_f1", "matthews",
          "pearson", "spearman")    # 0-1 (or -1..1) scores, shown in percent
LOWER_IS_BETTER = frozenset({"drift"})   # scores where less is better (eval.subject's drift; a validation loss
                                         # would join too): the summary's best is then its minimum
SCORE_TITLES = {"tune_score": "tuning score"}
SUMMARY_FILE = "robustness_summary.csv"
STUDY_COMMAND = "python -m eval.robustness"
SUMMARY_TITLE = "Learning-rate robustness (summary of Fig. 2)"
SUMMARY_TEXT = (
    "Per method, over the swept factors, of the mean over the seeds (percent): the best and the worst score and "
    "their factors; area = the trapezoid area under the score over log2(factor) / (best × the swept log2 span), "
    "1 = flat at the best; window = the run of adjacent swept factors around the best whose means are within the "
    "tolerance of the best, as doublings (0: the best factor alone); tolerance = max(1 point, the std over seeds "
    "at the best factor), the larger one named.")
STUDY_NOTE = f"`{SUMMARY_FILE}` has every digit (eval/robustness_summary.py)."


def cell(row: dict, key: str) -> str:
    """One table cell: scores in percent, measurements to three digits, with ± where the row averages seeds."""
    if key == "error":
        return row.get(key) or ""
    std = row.get(f"{key}_std") if (row.get("n") or 1) > 1 else None
    if key in MEASURES:
        return measured(row.get(key), std)
    return percent(row.get(key), std) if key in SCORES else nice(row.get(key))


def score_columns(score_names: list[str], has_tune: bool) -> list[tuple[str, str]]:
    names = list(score_names) + (["tune_score"] if has_tune else [])
    return [(f"{SCORE_TITLES.get(k, k)} (%)", k) for k in names]


def summary_section(rows: list[dict], score_names: list[str], has_tune: bool, level: str = "##",
                    note: str = STUDY_NOTE) -> tuple[list[str], list[dict]]:
    """(Markdown lines, the summaries) of the sweep's robustness summary, one table per score (eval.report's
    sweeps too: its heading at `level`, its own `note` after the definitions)."""
    lines, found = [], []
    for _, key in score_columns(score_names, has_tune):
        summaries = summarise(rows, key, higher_is_better=key not in LOWER_IS_BETTER)
        if summaries:
            found += summaries
            lower = " (lower is better: the best is the lowest, area ≥ 1)" if key in LOWER_IS_BETTER else ""
            lines += [f"**{SCORE_TITLES.get(key, key)}**{lower}", "", summary_table(summaries)]
    return ([f"{level} {SUMMARY_TITLE}", "", f"{SUMMARY_TEXT} {note}", "", *lines] if found else []), found


def study_tables(summary: list[dict], rows: list[dict], score_names: list[str]) -> tuple[list[str], list[dict]]:
    """(report.md's table sections, the robustness summaries) from the aggregated rows (`summary`: one per
    setting) and the per-run rows (`rows`)."""
    has_tune = any(r.get("tune_score") not in (None, "") for r in rows)
    base_cols = [("status", "status"), ("seeds", "n"), ("step", "step")] + score_columns(score_names, has_tune) + \
        [("distance", "distance"), ("bound", "bound"), ("error", "error")]
    md, summaries = [], []
    for study, title, first in [("lr", "Learning-rate sweep (Fig. 2)", [("method", "method"), ("factor", "factor"),
                                                                      ("lr", "lr")]),
                                ("long", "Prolonged training (Fig. 3)", [("method", "method")]),
                                ("appd", "App. D (Fig. 6)", [("variant", "label"), ("factor", "factor"),
                                                             ("lr", "lr"), ("λ lr", "lambda_lr")])]:
        sel = [r for r in summary if r["study"] == study]
        if sel:
            md += [f"## {title}", "", md_table(sel, first + base_cols, cell)]
        if study == "lr":
            section, summaries = summary_section(rows, score_names, has_tune)
            md += section
    abl = [r for r in summary if r["study"] == "ablation"]
    if abl:
        formula = {row: f for row, f, _, _ in ABLATION_ROWS}
        abl = [{**r, "formula": formula.get(r["label"], "")} for r in abl]
        md += ["## Ablation (DeLoRA Table 1, paper order)", "",
               md_table(abl, [("row", "label"), ("ΔW", "formula"), ("method", "method"), ("options", "options"),
                              ("trainable params", "trainable_params")] + base_cols, cell)]
    return md, summaries


def study_title(task: str, detail: str | None) -> str:
    """report.md's first line: the study's task and, where the task has one, the flag that names its data."""
    return f"# Robustness study: {task}" + (f" ({detail})" if detail else "")


def task_of_commands(folder: Path) -> tuple[str, str | None] | None:
    """(task, its data flag's value) of the study command recorded in FOLDER/commands.txt; None when there is
    no such command (or no such task)."""
    path = Path(folder) / "commands.txt"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    line = next((ln for ln in lines if ln.startswith(STUDY_COMMAND + " ")), None)
    try:
        argv = shlex.split(line)[3:] if line is not None else None   # written by shlex.join
    except ValueError:      # unbalanced quotes: a hand-edited file
        argv = None
    task = TASKS.get(flag_value(argv, "--task") or DREAMBOOTH.name) if argv is not None else None
    if task is None:
        return None
    return task.name, (flag_value(argv, f"--{task.output_flag}") if task.output_flag else None)


# ----- rewriting a finished study's tables -------------------------------------------------------------------
REQUIRED = ("study", "method", "factor", "status")
TEXT = {"study", "label", "method", "options", "status", "error", "score_names", "score_note", "run", "seed", "epoch"}


def typed(row: dict) -> dict:
    """A CSV row with its numbers as numbers ('' -> None), so it renders like the report's own rows."""
    out = {}
    for k, v in row.items():
        if k in TEXT or v is None:
            out[k] = v
        elif v == "":
            out[k] = None
        else:
            number = float(v)
            out[k] = int(number) if k in ("n", "step", "trainable_params") else number
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvalError(f"{path} does not exist: give a folder `python -m eval.robustness` wrote")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"no column {', '.join(missing)}")
            return [typed(r) for r in reader]
    except (ValueError, csv.Error) as e:
        raise EvalError(f"{path} is not a robustness study's CSV ({e})") from None


def replace_sections(report: str, title: str, tables: list[str], owned: set[str]) -> str:
    """report.md with its title line replaced and its `## ` sections whose titles are in `owned` replaced by
    `tables`, placed where the first of them was (before the first section that stays, if none was there)."""
    lines = report.splitlines()
    head, blocks, current = [], [], None
    for line in lines[1:] if lines and lines[0].startswith("# ") else lines:
        if line.startswith("## "):
            current = [line]
            blocks.append(current)
        elif current is None:
            head.append(line)
        else:
            current.append(line)
    kept, at = [], None
    for block in blocks:
        if block[0][3:].strip() in owned:
            at = len(kept) if at is None else at
        else:
            kept.append(block)
    if at is None:   # none there yet: before the sections that come after the tables
        at = next((i for i, b in enumerate(kept) if b[0][3:].strip() in AFTER_TABLES), len(kept))
    new = "\n".join(tables).split("\n")   # as write_report joins them
    body = [ln for b in kept[:at] for ln in b] + new + [ln for b in kept[at:] for ln in b]
    return "\n".join([title, *head, *body]).rstrip("\n") + "\n"


AFTER_TABLES = ("Weight norms (Fig. 4)", "Commands")
OWNED = {"Learning-rate sweep (Fig. 2)", SUMMARY_TITLE, "Prolonged training (Fig. 3)", "App. D (Fig. 6)",
         "Ablation (DeLoRA Table 1, paper order)"}


def rewrite(folder: Path) -> Path:
    """The tables of FOLDER/report.md (and FOLDER/robustness_summary.csv) from its results.csv and summary.csv."""
    if not (folder / "report.md").is_file():
        raise EvalError(f"{folder} has no report.md: give a folder `python -m eval.robustness` wrote")
    rows, summary = read_rows(folder / "results.csv"), read_rows(folder / "summary.csv")
    names = next((r["score_names"] for r in rows if r.get("score_names")), "")
    score_names = [k for k in names.split(",") if k and any(r.get(k) is not None for r in rows)]
    tables, summaries = study_tables(summary, rows, score_names)
    write_csv(folder / SUMMARY_FILE, SUMMARY_CSV, summaries)
    report = (folder / "report.md").read_text()
    study = task_of_commands(folder)
    title = study_title(*study) if study else (report.splitlines() or ["# Robustness study"])[0]
    report = replace_sections(report, title, tables, OWNED)
    return write_text(folder / "report.md", report)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.robustness_tables", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a report folder of eval.robustness (report.md, results.csv, summary.csv)")
    args = p.parse_args(argv)
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise EvalError(f"{folder} is not a folder: give a report folder `python -m eval.robustness` wrote")
    print(f"report: {rewrite(folder)} (tables from results.csv and summary.csv; {SUMMARY_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
