"""What the Compare and Train views show, computed from run folders (no Gradio here):

    sample_grid(runs)            one PIL image: rows = runs (methods; a run's EMA under it), columns = checkpoints
    gallery_items(runs)          [(png, caption)] for a zoomable gallery of the same samples
    curves(runs, key)            long DataFrame (step, value, run) for a line plot of any metrics key
    loss_curves(runs)            the same for the loss, and the held-out val_loss where a run logs one
    metrics_table(runs)          one row per run: settings, last loss/distance, eval/ scores, the best step
    curve_png(frame, ...)        curve_image as a PNG data URL, rendered once per distinct data (app.cache)
    tradeoff_png(points, ...)    the same for tradeoff_figure
"""
from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from eval.best import best_checkpoint
from eval.robustness_tables import LOWER_IS_BETTER  # drift (eval/drift.py): 0 = the base model's own images
from ground.runfolder import EMA_DIR

matplotlib.use("Agg")    # a server: never a GUI backend

from . import cache, lineplot, runs

DISTANCE_KEYS = ("distance_fig3", "distance_mean", "distance_max",
                 "rel_distance_fig3", "rel_distance_mean", "rel_distance_max")
VAL_LOSS = "val_loss"   # training.common.task.VAL_LOSS: a held-out loss (the image trainers', GLUE's tuning part)
EVAL_KEYS = ("dino", "clip_i", "clip_t", "drift", "miou", "pixel_accuracy")   # eval.subject; eval.segmentation
CELL = 128
MARGINS = dict(left=0.11, right=0.98, bottom=0.15, top=0.9)   # fixed: a constrained layout draws twice
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def curve_image(frame: pd.DataFrame, title: str, ylabel: str) -> Image.Image:
    """One line per run against the step (app.lineplot: PIL, a few ms where matplotlib took ~100), sent
    as a PNG through gr.Plot: it redraws reliably while the set of runs grows, which the native plot's
    fixed colour domain does not."""
    series = []
    for i, (run, part) in enumerate(frame.groupby("run", sort=False)):
        part = part.sort_values("step")
        series.append((run, part["step"].tolist(), part["value"].tolist(), PALETTE[i % len(PALETTE)]))
    return lineplot.line_plot(series, title, "step", ylabel)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:        # Pillow < 10.1
        return ImageFont.load_default()


def row_label(run: runs.RunInfo) -> str:
    return f"{run.method} r{run.rank}" if run.rank is not None else run.method


def _cells(run: runs.RunInfo, sub: str = "") -> dict[str, tuple[Path, str]]:
    """{column label: (first sample, prompt)} of the adapters in run's checkpoints (each one's `sub` folder: the
    trained adapter's samples, or with sub=ema/ its moving average's) and its final samples when the last step has
    no checkpoint."""
    cells: dict[str, tuple[Path, str]] = {}
    for step, path in runs.checkpoints(run.path):
        got = runs.samples(path / sub)
        if got:
            cells[f"step {step}"] = got[0]
    final = runs.samples(run.path / sub)
    if final and f"step {run.total_steps}" not in cells:
        cells["final"] = final[0]
    return cells


def columns(run_infos: list[runs.RunInfo]) -> list[tuple[runs.RunInfo, dict[str, tuple[Path, str]], str]]:
    """A row per run: (run, {column label: (first sample, prompt)}, row label), and under a run trained with
    --ema_decay a row of its moving average's samples (`· EMA`), same prompt and seed per column."""
    out = []
    for run in run_infos:
        out.append((run, _cells(run), row_label(run)))
        average = _cells(run, EMA_DIR)
        if average:
            out.append((run, average, f"{row_label(run)} · EMA"))
    return out


def _order(labels: set[str]) -> list[str]:
    return sorted(labels, key=lambda c: (c == "final", int(c.split()[1]) if c.startswith("step ") else 0))


def sample_grid(run_infos: list[runs.RunInfo], cell: int = CELL) -> Image.Image | None:
    """Rows = runs, columns = checkpoints; an empty cell where a run has no sample for that step."""
    cols = columns(run_infos)
    labels = _order({c for _, cells, _ in cols for c in cells})
    if not labels:
        return None
    font, small = _font(14), _font(11)
    left, top, pad = 170, 26, 4
    grid = Image.new("RGB", (left + len(labels) * (cell + pad), top + len(cols) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels):
        draw.text((left + j * (cell + pad) + 4, 6), label, fill="black", font=font)
    for i, (run, cells, row) in enumerate(cols):
        y = top + i * (cell + pad)
        draw.text((6, y + cell // 2 - 16), row, fill="black", font=font)
        draw.text((6, y + cell // 2 + 2), run.name[-24:], fill="#666666", font=small)
        for j, label in enumerate(labels):
            x = left + j * (cell + pad)
            got = cells.get(label)
            if got is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline="#cccccc")
                continue
            tile = cache.file_memo(cache.TILES, [got[0]], lambda p=got[0]: _tile(p, cell), extra=cell)
            if tile is not None:
                grid.paste(tile, (x, y))
    return grid


def _tile(path: Path, cell: int) -> Image.Image | None:
    """A sample resized to a grid cell; None when it cannot be read (a half-written file shows empty)."""
    try:
        with Image.open(path) as im:
            tile = im.convert("RGB")
    except OSError:
        return None
    resample = Image.NEAREST if max(tile.size) < cell else Image.LANCZOS
    return tile.resize((cell, cell), resample)


def gallery_items(run_infos: list[runs.RunInfo]) -> list[tuple[str, str]]:
    items = []
    for _, cells, row in columns(run_infos):
        for label in _order(set(cells)):
            path, prompt = cells[label]
            items.append((str(path), f"{row} · {label} · {prompt}".strip(" ·")))
    return items


def prompt_of(run_infos: list[runs.RunInfo]) -> str:
    for _, cells, _ in columns(run_infos):
        for _, prompt in cells.values():
            if prompt:
                return prompt
    return ""


def curve_frame(rows: list[dict]) -> pd.DataFrame:
    """Typed even when empty: an empty object column would make the plot's axes categorical."""
    return pd.DataFrame(rows, columns=["step", "value", "run"]).astype(
        {"step": "int64", "value": "float64", "run": "str"})


def curves(run_infos: list[runs.RunInfo], key: str) -> pd.DataFrame:
    """Long format for gr.LinePlot(x='step', y='value', color='run'); runs without the key are skipped."""
    rows = []
    for run in run_infos:
        label = f"{run.method} · {run.name}"
        for m in runs.read_metrics(run.path):
            v = m.get(key)
            if isinstance(v, (int, float)) and v == v:
                rows.append({"step": int(m["step"]), "value": float(v), "run": label})
    return curve_frame(rows)


def loss_curves(run_infos: list[runs.RunInfo]) -> pd.DataFrame:
    """The training loss of each run, and its held-out val_loss (a second line, '<run> · val_loss') where logged."""
    held_out = curves(run_infos, VAL_LOSS)
    held_out["run"] = held_out["run"] + f" · {VAL_LOSS}"
    return pd.concat([curves(run_infos, "loss"), held_out], ignore_index=True) if len(held_out) else \
        curves(run_infos, "loss")


def distance_key(run_infos: list[runs.RunInfo], preferred: str | None = None) -> str:
    """The distance key to plot: the preferred one if any run logs it, else the first one logged (any row: the
    mean and max are on full-probe rows only, and a running run's last row may not be one)."""
    logged = {k for run in run_infos for m in runs.read_metrics(run.path) for k in m}
    for key in ([preferred] if preferred else []) + list(DISTANCE_KEYS):
        if key in logged:
            return key
    return preferred or DISTANCE_KEYS[0]


def _num(v, digits: int = 4):
    return round(float(v), digits) if isinstance(v, (int, float)) else None


def best_label(run_dir: Path, metrics: list[dict], evals: list[dict]) -> str:
    """The run's best checkpoint as the table shows it: '4 (DINO)', '' when nothing chose one (eval.best)."""
    best = best_checkpoint(run_dir, metrics, evals)
    return "" if best.step is None else f"{best.step} ({best.criterion})"


def metrics_table(run_infos: list[runs.RunInfo]) -> pd.DataFrame:
    cols = ["run", "method", "rank", "lr", "status", "step", "loss", VAL_LOSS, *DISTANCE_KEYS, "scored step",
            *EVAL_KEYS,
            "best step"]
    rows = []
    for run in run_infos:
        metrics = runs.read_metrics(run.path)
        last = (metrics or [{}])[-1]
        # each distance as last logged: distance_mean/max only on full-probe rows (every N steps, checkpoints,
        # the last step), which a running run's last row may not be
        latest = {k: next((m[k] for m in reversed(metrics) if k in m), None) for k in (*DISTANCE_KEYS, VAL_LOSS)}
        ev = runs.read_eval(run.path)
        best = best_label(run.path, metrics, ev)
        ev = [e for e in ev if isinstance(e.get("step"), int)]   # bound rows (real/base images) have no step
        score = ev[-1] if ev else {}
        steps = f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step)
        rows.append({"run": run.name, "method": run.method, "rank": run.rank, "lr": run.learning_rate,
                     "status": run.status, "step": steps, "loss": _num(last.get("loss")),
                     VAL_LOSS: _num(latest[VAL_LOSS]),
                     **{k: _num(latest[k]) for k in DISTANCE_KEYS},
                     "scored step": score.get("step"), **{k: _num(score.get(k)) for k in EVAL_KEYS},
                     "best step": best})
        # its moving average, once scored (`eval.subject --average`: RUN/ema/eval.jsonl); loss and distances are
        # the trained weights', so they stay empty
        average = [e for e in runs.read_eval(run.path / EMA_DIR) if isinstance(e.get("step"), int)]
        if average:
            rows.append({"run": f"{run.name} · EMA", "method": run.method, "rank": run.rank, "lr": run.learning_rate,
                         "status": run.status, "step": steps, "scored step": average[-1]["step"],
                         **{k: _num(average[-1].get(k)) for k in EVAL_KEYS}, "best step": ""})
    return pd.DataFrame(rows, columns=cols)


def tradeoff_points(run_infos: list[runs.RunInfo], distance: str, metric: str) -> pd.DataFrame:
    """One point per scored checkpoint: its weight distance (x) and an eval/ score (y), like peft's
    Pareto plot: how far a method moved the weights against how well it keeps the subject."""
    rows = []
    for run in run_infos:
        by_step = {m["step"]: m for m in runs.read_metrics(run.path)}
        for ev in runs.read_eval(run.path):
            step, y = ev.get("step"), ev.get(metric)
            x = (by_step.get(step) or {}).get(distance)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                rows.append({"run": f"{run.method} · {run.name}", "method": run.method, "step": step,
                             "distance": float(x), "score": float(y)})
    return pd.DataFrame(rows, columns=["run", "method", "step", "distance", "score"])


def pareto_front(points: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """Points no other point beats on both axes (smaller distance, and a higher score, or a lower one where
    lower is better: drift)."""
    sign = 1 if higher_is_better else -1
    pts = points.sort_values(["distance", "score"], ascending=[True, not higher_is_better])
    keep, best = [], float("-inf")
    for i, row in pts.iterrows():
        if sign * row["score"] > best:
            keep.append(i)
            best = sign * row["score"]
    return pts.loc[keep]


def tradeoff_figure(points: pd.DataFrame, distance: str, metric: str) -> Figure:
    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    fig.subplots_adjust(**MARGINS)
    ax = fig.subplots()
    if len(points):
        for i, (run, part) in enumerate(points.groupby("run", sort=False)):
            part = part.sort_values("step")
            ax.plot(part["distance"], part["score"], marker="o", markersize=4, linewidth=0.8,
                    color=PALETTE[i % len(PALETTE)], label=run)
            last = part.iloc[-1]
            ax.annotate(f"{last['step']}", (last["distance"], last["score"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        front = pareto_front(points, metric not in LOWER_IS_BETTER)
        ax.plot(front["distance"], front["score"], linestyle="--", color="#444444", linewidth=1, label="Pareto front")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no scored checkpoints: press 'Score unscored runs'", ha="center", va="center",
                transform=ax.transAxes, color="#888888")
    ax.set_xlabel(f"{distance} (lower = closer to the base model)")
    ax.set_ylabel(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} = better)")
    ax.set_title(f"{metric} vs. weight distance (labels: step)")
    ax.grid(alpha=0.3)
    return fig


# ----- rendered plots: drawing is most of a Compare click, and the same data draws the same PNG -----
def _png(fig: Figure | Image.Image) -> str:
    """A figure or image as a PNG data URL: what gr.Plot sends for a matplotlib figure."""
    with io.BytesIO() as buf:
        if isinstance(fig, Image.Image):
            fig.save(buf, format="png", compress_level=1)   # zlib level 6 took half the time
        else:
            fig.savefig(buf, format="png")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _digest(frame: pd.DataFrame, *labels: str) -> tuple:
    """A key for the data a figure draws: a hash of every row and column name, and the labels."""
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()
    return (hashlib.sha256(rows).hexdigest(), tuple(frame.columns), len(frame), *labels)


def curve_png(frame: pd.DataFrame, title: str, ylabel: str) -> str:
    return cache.memo(cache.FIGURES, ("curve", *_digest(frame, title, ylabel)),
                      lambda: _png(curve_image(frame, title, ylabel)))


def tradeoff_png(points: pd.DataFrame, distance: str, metric: str) -> str:
    return cache.memo(cache.FIGURES, ("tradeoff", *_digest(points, distance, metric)),
                      lambda: _png(tradeoff_figure(points, distance, metric)))
