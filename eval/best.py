"""The best checkpoint of a run: the step its tuning score picks, not the last one.

    best_checkpoint(run_dir) -> Best(step, criterion, key, value, folder)

The score is the first of these the run folder holds a value of:

    tuning score      metrics.jsonl `tune/score`: the language tasks' dev score (GLUE's tuning half)   highest
    DINO              eval.jsonl `dino` (eval.subject: DreamBooth)                                    highest
    mIoU              eval.jsonl `miou` (eval.segmentation: semantic map)                             highest
    validation loss   `val_loss` in eval.jsonl or metrics.jsonl (held-out denoising loss)             lowest

With none of them, Best says so: step None, criterion "none". Of equal values the earliest step wins (as
training/glue.py picks its best epoch). `folder` is the adapter saved at that step: its checkpoint-N, GLUE's best/
(the adapter of the best tuning epoch, epoch.json names its step) or the final adapter when the step is the last;
None when no adapter of that step was kept (the step is still named). Reads files only: no model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ground.runfolder import RUN_JSON, final_step, is_adapter_dir, list_checkpoints, read_eval, read_json, read_metrics

from .tables import md_table, measured, percent

GLUE_BEST = "best"   # training/glue.py's folder of the best tuning epoch's adapter (+ epoch.json)


@dataclass(frozen=True)
class Criterion:
    name: str                 # as tables and the app say it
    key: str                  # the logged key
    files: tuple[str, ...]    # where it is logged: "metrics" (metrics.jsonl), "eval" (eval.jsonl)
    higher_is_better: bool = True


CRITERIA = (Criterion("tuning score", "tune/score", ("metrics",)), Criterion("DINO", "dino", ("eval",)),
            Criterion("mIoU", "miou", ("eval",)),
            Criterion("validation loss", "val_loss", ("eval", "metrics"), higher_is_better=False))
NONE = "none"
CRITERIA_BY_NAME = {c.name: c for c in CRITERIA}


@dataclass(frozen=True)
class Best:
    step: int | None
    criterion: str            # a Criterion's name, or "none"
    key: str | None = None
    value: float | None = None
    folder: Path | None = None

    def describe(self) -> str:
        """'step 40 (DINO 0.612)', 'step 40 (DINO 0.612; no adapter kept at that step)' or 'none (...)'."""
        if self.step is None:
            return f"{NONE} (no tuning score, DINO, mIoU or validation loss recorded)"
        kept = "" if self.folder is not None else "; no adapter kept at that step"
        return f"step {self.step} ({self.criterion} {self.value:.4g}{kept})"


def scored_steps(logged: dict[str, list[dict]], criterion: Criterion) -> list[tuple[int, float]]:
    """(step, value) of every row (logged: file -> rows) that logs the criterion's key at an integer step."""
    rows = [r for f in criterion.files for r in logged[f]]
    return [(r["step"], float(r[criterion.key])) for r in rows
            if isinstance(r.get("step"), int) and isinstance(r.get(criterion.key), (int, float))
            and not isinstance(r.get(criterion.key), bool) and r[criterion.key] == r[criterion.key]]   # no NaN


def adapter_at(run_dir: Path, step: int) -> Path | None:
    """The adapter folder saved at `step`: checkpoint-N, GLUE's best/, or the final adapter at the last step."""
    for s, folder in list_checkpoints(run_dir):
        if s == step and is_adapter_dir(folder):
            return folder
    best = run_dir / GLUE_BEST
    if is_adapter_dir(best) and (read_json(best / "epoch.json", default={}) or {}).get("step") == step:
        return best
    if is_adapter_dir(run_dir) and final_step(run_dir, read_json(run_dir / RUN_JSON, default={}) or {}) == step:
        return run_dir
    return None


def best_checkpoint(run_dir: str | Path, metrics: list[dict] | None = None, evals: list[dict] | None = None) -> Best:
    """metrics, evals: the run's metrics.jsonl and eval.jsonl rows when the caller has read them (the app caches
    them); read here otherwise."""
    run_dir = Path(run_dir)
    logged = {"metrics": read_metrics(run_dir) if metrics is None else metrics,
              "eval": read_eval(run_dir) if evals is None else evals}
    for criterion in CRITERIA:
        points = scored_steps(logged, criterion)
        if points:
            sign = 1 if criterion.higher_is_better else -1
            step, value = max(points, key=lambda p: (sign * p[1], -p[0]))
            return Best(step, criterion.name, criterion.key, value, adapter_at(run_dir, step))
    return Best(None, NONE)


BEST_TEXT = ("By the run's tuning score: the language tasks' dev score, else DINO, else mIoU (highest), else the "
             "validation loss (lowest); none where the run has none of them. Score in percent (a loss as it is); "
             "adapter: the folder saved at that step (blank: none kept).")
BEST_COLUMNS = [("run", "run"), ("chosen by", "by"), ("best step", "step"), ("score", "value"),
                ("adapter", "adapter")]


def best_table(run_dirs: list[Path]) -> str:
    """A Markdown table of each run's best checkpoint: the step, what chose it and the adapter kept at it."""
    rows = []
    for run_dir in run_dirs:
        best = best_checkpoint(run_dir)
        value = "" if best.value is None else (measured(best.value) if not CRITERIA_BY_NAME[best.criterion]
                                               .higher_is_better else percent(best.value))
        rows.append({"run": Path(run_dir).name, "by": best.criterion, "step": "" if best.step is None else
                     str(best.step), "value": value, "adapter": "" if best.folder is None else
                     "final" if best.folder == Path(run_dir) else best.folder.name})
    return md_table(rows, BEST_COLUMNS, lambda row, key: row[key])
