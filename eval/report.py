"""Compare trained runs: a Markdown + CSV table and PNG figures.

    python -m eval.report outputs/dog-lora outputs/dog-delora --out reports/dog

Writes into --out:
    report.md, report.csv     task, method, rank, lr, step, dino, clip_i, clip_t, drift, distance: one row per
                              scored checkpoint (RUN/eval.jsonl from eval.subject), else the last step;
                              report.md gives scores in percent with one decimal, distances to three digits,
                              and names each run's best checkpoint by its tuning score (eval.best); a
                              method run at several learning rates gets its robustness summary
                              (eval.robustness_summary: worst, area, window over factor = lr / its smallest lr)
    distance_vs_step.png      weight distance of every run on one axes (DeLoRA Fig. 3)
    scores_vs_step.png        DINO / CLIP-I / CLIP-T per scored checkpoint
    drift_vs_step.png         drift per scored checkpoint (eval.subject: the base model's and the checkpoint's
                              images of unrelated prompts, (1 − mean DINO cosine) / 2, lower is better)
    validation_vs_step.png    metrics.jsonl's held-out measures: val_loss (the image trainers'
                              --validation_loss_images, GLUE's tuning-part loss), the dev score tune/score
    lr_sweep.png              runs of one method at several learning rates: scores, drift and final distance
                              against the learning-rate factor (DeLoRA Fig. 2)
    sample_grid.png           rows = runs, columns = checkpoints: the first sample (same prompt and seed);
                              semantic-map runs get their control map as the first column
A run trained with --ema_decay brings its moving average as a run of its own under it (`· EMA`): its samples in the
grid, its scores (eval.subject --average) in the table and score curves; it has no distance of its own and is never
a point of a learning-rate sweep.

Runs of different tasks (DreamBooth, semantic map, each GLUE task, instruction tuning: read from run.json)
are never compared: report.md has one section per task with its own table, and each task its own figures,
named <figure>-<task>.png when the report holds more than one task.

The distance is the Fig. 3 layer by default: the out-projection of the first self-attention
(the first metrics key distance/...attn1.to_out.0, of transformer block 0), else distance_mean. The trainers
log that layer every step (distance_fig3) and every layer every --distance_logging_steps steps; its curve
has every step, another layer's or distance_mean's the full-probe steps.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ground.runfolder import (
    EMA_DIR,
    EVAL,
    PROMPTS,
    SAMPLES,
    final_step,
    list_checkpoints,
    read_eval,
    read_jsonl,
    read_metrics,
    read_run,
    run_setting,
    write_text,
)
from training.common.tasks import task_of as registered_task
from training.common.tracking import fill_followed_layer
from training.families import SD15

from . import EvalError, plots
from .best import BEST_TEXT, best_table
from .common import ArgumentParser, logger, run_main
from .images import first_sample, sample_map
from .robustness_tables import summary_section
from .tables import md_table, measured, percent

FIG3_LAYER = "attn1.to_out.0"
COLUMNS = ["run", "task", "method", "rank", "lr", "step", "dino", "clip_i", "clip_t", "drift", "distance"]
CSV_COLUMNS = COLUMNS + ["distance_key"]     # the csv names each row's distance (Markdown: each section's)
SCORES = ("dino", "clip_i", "clip_t", "drift")   # eval.subject's row; drift (eval/drift.py): lower is better
SWEEP_NOTE = ("Here a method's runs at two or more learning rates are its sweep: factor = lr / its smallest lr, "
              "each run's score at its last scored step, runs at the same lr averaged as seeds.")


@dataclass
class Run:
    path: Path
    method: str
    rank: int | None
    lr: float | None
    metrics: list[dict]
    evals: list[dict]
    distance_key: str | None
    final_step: int | None
    label: str = ""
    task: str = ""
    samples: dict[int, Path] = field(default_factory=dict)   # step -> samples folder
    average: bool = False   # the run's moving average (--ema_decay), its folder RUN/ema

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{EMA_DIR}" if self.average else self.path.name


def pick_distance_key(metrics: list[dict], choice: str = "auto") -> str | None:
    """The logged key to plot as "the" distance. auto: distance/<first transformer block>.attn1.to_out.0
    (the paper's layer), else any attn1.to_out.0 layer, else distance_mean."""
    # the first row, the first full-probe row (per-layer keys; with --distance_logging_steps N the first row
    # may have only distance_fig3) and the last row
    full = [next((row for row in metrics if "distance_mean" in row), {})]
    keys = list(dict.fromkeys(k for row in metrics[:1] + full + metrics[-1:] for k in row))
    if choice != "auto":
        return choice if choice in keys else None
    layer = [k for k in keys if k.startswith("distance/") and FIG3_LAYER in k]
    first_block = [k for k in layer if "transformer_blocks.0." in k]
    for candidates in (first_block, layer, ["distance_mean"] if "distance_mean" in keys else []):
        if candidates:
            return candidates[0]
    return None


def task_of(run: dict) -> str:
    """The group a run belongs to: its task (the registry's, from run.json), with the flag that names its data
    where the task has one (glue-sst2) and the model family when it is not SD-1.x/2.x (dreambooth-sdxl); '' when
    run.json does not say. A GLUE distance and an SD layer's, or
    accuracies and DINO scores, are different quantities and never share a line or column."""
    task = registered_task(run)
    if task is None:
        return ""
    detail = run_setting(run, task.output_flag) if task.output_flag else None
    group = f"{task.slug}-{detail}" if detail else task.slug
    # model families apart: an SDXL layer's distance is another quantity than an SD-1.5 layer's (runs written
    # before families, and SD-1.x/2.x runs, keep the task's own group)
    family = run.get("family")
    return f"{group}-{family}" if family and family != SD15.name else group


def by_task(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.task, []).append(r)
    return groups


def value_at(metrics: list[dict], key: str | None, step: int | None):
    """metrics[key] at `step` (the last row at or before it), or None."""
    if key is None:
        return None
    best = None
    for row in metrics:
        s = row.get("step")
        if isinstance(s, int) and (step is None or s <= step) and isinstance(row.get(key), (int, float)):
            if best is None or s >= best[0]:
                best = (s, row[key])
    return best[1] if best else None


def load_run(path: str | Path, distance_choice: str) -> Run:
    path = Path(path).expanduser()
    run = read_run(path)
    # the followed layer (run.json's fig3_layer) is logged every step as distance_fig3, and under its
    # own name on full-probe rows only: every row gets its distance/<layer>, for a per-step curve
    metrics = fill_followed_layer(read_metrics(path), run.get("fig3_layer"))
    if not metrics:
        logger.warning("%s has no metrics.jsonl rows: no distance for it", path)
    evals = read_jsonl(path / EVAL, strict=False) if (path / EVAL).is_file() else []
    evals = sorted((e for e in evals if isinstance(e.get("step"), int)), key=lambda e: e["step"])
    scorers = {(e.get("dino_model"), e.get("clip_model")) for e in evals}
    if len(scorers) > 1:   # scores from different models are not comparable
        logger.warning("%s/eval.jsonl mixes scoring models (%s); its rows are shown as they are", path,
                       "; ".join(f"{d} + {c}" for d, c in sorted(scorers, key=str)))
    key = pick_distance_key(metrics, distance_choice)
    if distance_choice != "auto" and key is None and metrics:
        logger.warning("%s does not log %r: no distance for it", path, distance_choice)
    lr = run_setting(run, "learning_rate")
    r = Run(path=path, method=str(run_setting(run, "method", "?")), rank=run_setting(run, "rank"),
            lr=float(lr) if isinstance(lr, (int, float)) else None, metrics=metrics, evals=evals,
            distance_key=key, final_step=final_step(path, run), task=task_of(run))
    r.samples = {step: d / SAMPLES for step, d in list_checkpoints(path) if (d / SAMPLES / PROMPTS).is_file()}
    if (path / SAMPLES / PROMPTS).is_file() and isinstance(r.final_step, int):
        r.samples.setdefault(r.final_step, path / SAMPLES)
    return r


def average_of(r: Run) -> Run | None:
    """The run's moving average (--ema_decay) as a run of its own, or None: its samples (checkpoint-N/ema/samples,
    ema/samples) and its scores (RUN/ema/eval.jsonl, eval.subject --average); no distance or held-out curves (those
    are the trained weights')."""
    ema = r.path / EMA_DIR
    samples = {step: d / EMA_DIR / SAMPLES for step, d in list_checkpoints(r.path)
               if (d / EMA_DIR / SAMPLES / PROMPTS).is_file()}
    if (ema / SAMPLES / PROMPTS).is_file() and isinstance(r.final_step, int):
        samples.setdefault(r.final_step, ema / SAMPLES)
    evals = [e for e in read_eval(ema) if isinstance(e.get("step"), int)]
    if not samples and not evals:
        return None
    return replace(r, path=ema, metrics=[], evals=evals, distance_key=None, samples=samples, average=True)


def label_runs(runs: list[Run]) -> None:
    """Legend labels: method, rank and lr (`· EMA` for a moving average); the folder name too where they collide."""
    for r in runs:
        r.label = f"{r.method} r={r.rank} lr={r.lr:g}" if r.lr is not None else f"{r.method} r={r.rank}"
        r.label += " · EMA" if r.average else ""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label += f" ({r.name})"


# ----- the table ----------------------------------------------------------------------------------
def table_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        points = r.evals or [{"step": r.final_step}]
        for e in points:
            step = e.get("step")
            rows.append({"run": r.name, "task": r.task, "distance_key": r.distance_key, "method": r.method,
                         "rank": r.rank, "lr": r.lr, "step": step,
                         **{k: e.get(k) for k in SCORES}, "distance": value_at(r.metrics, r.distance_key, step)})
    return rows


def fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS} for row in rows)
    return buf.getvalue()


def cell(row: dict, key: str) -> str:
    """A Markdown cell: scores in percent with one decimal, the distance to three significant digits."""
    if key in SCORES:
        return percent(row.get(key))
    return measured(row.get(key)) if key == "distance" else fmt(row.get(key))


def section(runs: list[Run], rows: list[dict], figures: list[str], distance_choice: str,
            level: str = "##") -> list[str]:
    """The table, best checkpoints, runs and figures of one task's runs (their headings at `level`)."""
    keys = sorted({r.distance_key for r in runs if r.distance_key})
    titles = [(f"{k} (%)" if k in SCORES else k, k) for k in COLUMNS]
    averages = sum(r.average for r in runs)
    lines = [f"{len(runs) - averages} run(s){f' and {averages} moving average(s) (`RUN/ema`)' if averages else ''}. "
             f"distance = ‖W_eff − W0‖_F of `{', '.join(keys) or 'none logged'}` "
             f"(--distance_key {distance_choice}) at the row's step. Scores: eval.subject (cosines in percent, "
             f"higher is closer; drift = (1 − mean DINO cosine of the base model's and the checkpoint's images of "
             f"unrelated prompts) / 2 in percent, lower is better); blank = not scored.", "",
             md_table(rows, titles, cell).rstrip("\n")]
    sweep = [{"study": "lr", "method": m, **p} for m, points in lr_sweeps(runs)[0].items() for p in points]
    lines += ["", *summary_section(sweep, list(SCORES), False, level, SWEEP_NOTE)[0]]
    lines += [f"{level} Best checkpoints", "", BEST_TEXT, "",
              best_table([r.path for r in runs if not r.average]).rstrip("\n")]
    lines += ["", f"{level} Runs", ""] + [f"- `{r.name}`: {r.label}, {r.path}" for r in runs]
    if figures:
        lines += ["", f"{level} Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return lines


def to_markdown(sections: list[tuple[str, list[str]]]) -> str:
    """sections: (task, its lines); one task: its lines as they are, else one `## Task:` heading each."""
    lines = ["# lowrank report", ""]
    if len(sections) == 1:
        return "\n".join(lines + sections[0][1]) + "\n"
    lines += [f"Runs of {len(sections)} tasks, kept apart: one table and one set of figures per task.", ""]
    for task, body in sections:
        lines += [f"## Task: {task or 'unknown (run.json names no task)'}", "", *body, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ----- figures ------------------------------------------------------------------------------------
def lr_sweeps(runs: list[Run]) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Methods run at two or more learning rates: one point per run, factor = lr / the smallest lr."""
    sweeps, base = {}, {}
    for method in dict.fromkeys(r.method for r in runs):
        group = [r for r in runs if r.method == method and r.lr and not r.average]   # an average is no seed
        if len({r.lr for r in group}) < 2:
            continue
        base[method] = min(r.lr for r in group)
        sweeps[method] = sorted(({"factor": r.lr / base[method], "run": r.name,
                                  **{k: (r.evals[-1].get(k) if r.evals else None) for k in SCORES},
                                  "distance": value_at(r.metrics, r.distance_key, None)} for r in group),
                                key=lambda p: p["factor"])
    return sweeps, base


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that have a numeric `key`."""
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get("step"), int) and isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def spread(steps: list[int], n: int) -> list[int]:
    """At most n steps, evenly spaced, always keeping the last."""
    if len(steps) <= n:
        return steps
    idx = {round(i * (len(steps) - 1) / (n - 1)) for i in range(n)}
    return [steps[i] for i in sorted(idx)]


def write_figures(runs: list[Run], out: Path, max_columns: int, suffix: str = "") -> list[str]:
    """The figures of one task's runs, named <figure><suffix>.png."""
    written = []
    colours = {r.label: f"C{i % 10}" for i, r in enumerate(runs)}   # one colour per run in every figure
    curves = {r.label: series(r.metrics, r.distance_key) for r in runs if r.distance_key}
    curves = {k: v for k, v in curves.items() if v[0]}
    if curves:
        keys = sorted({r.distance_key for r in runs if r.distance_key})
        plots.distance_vs_step(curves, keys[0] if len(keys) == 1 else "per-run key: " + ", ".join(keys),
                               out / f"distance_vs_step{suffix}.png", colours)
        written.append(f"distance_vs_step{suffix}.png")
    score_curves = {k: {r.label: series(r.evals, k) for r in runs if series(r.evals, k)[0]} for k in SCORES}
    if any(score_curves.get(k) for k in plots.SCORE_NAMES):
        plots.scores_vs_step(score_curves, out / f"scores_vs_step{suffix}.png", colours)
        written.append(f"scores_vs_step{suffix}.png")
    if score_curves.get("drift"):
        plots.scores_vs_step(score_curves, out / f"drift_vs_step{suffix}.png", colours, plots.DRIFT_NAMES,
                             plots.DRIFT_UNIT)
        written.append(f"drift_vs_step{suffix}.png")
    held_out = {k: {r.label: series(r.metrics, k) for r in runs if series(r.metrics, k)[0]}
                for k in plots.VALIDATION_NAMES}
    if any(held_out.values()):
        plots.scores_vs_step(held_out, out / f"validation_vs_step{suffix}.png", colours, plots.VALIDATION_NAMES, "")
        written.append(f"validation_vs_step{suffix}.png")
    sweeps, base = lr_sweeps(runs)
    if sweeps:
        plots.lr_sweep(sweeps, base, ", ".join(sorted({r.distance_key for r in runs if r.distance_key})),
                       out / f"lr_sweep{suffix}.png")
        written.append(f"lr_sweep{suffix}.png")
    with_samples = [r for r in runs if r.samples]
    if with_samples:
        columns = spread(sorted({s for r in with_samples for s in r.samples}), max_columns)
        cells, want = {}, None
        for i, r in enumerate(with_samples):
            for j, step in enumerate(columns):
                if step in r.samples:
                    img, key = first_sample(r.samples[step], want)
                    if img is not None:
                        cells[(i, j)], want = img, want or key
        # semantic-map runs: the map the samples were drawn from, first (map | samples per checkpoint)
        maps = {i: m for i, r in enumerate(with_samples)
                if (m := sample_map(r.samples[max(r.samples)], want)) is not None}
        if maps:
            cells = {(i, j + 1): im for (i, j), im in cells.items()} | {(i, 0): m for i, m in maps.items()}
            columns = ["map", *columns]
        if cells:
            caption = f"prompt {want[0]!r}, seed {want[1]}" if want else ""
            plots.sample_grid([r.label for r in with_samples], columns, cells, caption,
                              out / f"sample_grid{suffix}.png")
            written.append(f"sample_grid{suffix}.png")
    return written


# ----- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders (run.json, metrics.jsonl, ...)")
    p.add_argument("--out", required=True, help="folder for report.md, report.csv and the PNG figures")
    p.add_argument("--distance_key", default="auto",
                   help="metrics.jsonl key to plot as the distance (default auto: the first transformer block's "
                        "attn1.to_out.0 layer, else distance_mean)")
    p.add_argument("--max_grid_columns", type=int, default=10,
                   help="checkpoints shown in the sample grid, evenly spaced, last kept (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_grid_columns < 2:
        raise EvalError("--max_grid_columns must be at least 2")
    runs = [load_run(p, args.distance_key) for p in dict.fromkeys(args.runs)]
    runs = [x for r in runs for x in (r, average_of(r)) if x is not None]   # each run's average under it
    label_runs(runs)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a directory")
    groups = by_task(runs)
    rows, figures, sections = [], [], []
    for task, group in groups.items():   # one task: the figures keep their plain names
        suffix = f"-{task or 'unknown'}" if len(groups) > 1 else ""
        task_rows, task_figures = table_rows(group), write_figures(group, out, args.max_grid_columns, suffix)
        rows, figures = rows + task_rows, figures + task_figures
        sections.append((task, section(group, task_rows, task_figures, args.distance_key,
                                       "##" if len(groups) == 1 else "###")))
    write_text(out / "report.csv", to_csv(rows), parents=True)
    write_text(out / "report.md", to_markdown(sections), parents=True)
    print(f"report of {len(runs)} run(s) of {len(groups)} task(s): {out / 'report.md'}, report.csv, "
          f"{', '.join(figures) or 'no figures'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
