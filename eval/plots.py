"""The report's figures (matplotlib, Agg: no display needed). Each takes plain data and writes one PNG
atomically; every axes has a title, labelled axes and a legend."""
from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ground.runfolder import atomic_write  # noqa: E402

SCORE_NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
# eval.subject's drift (eval/drift.py): base vs a checkpoint's images of unrelated prompts, lower is better
DRIFT_NAMES = {"drift": "Drift"}
DRIFT_UNIT = " ((1 − cos) / 2, lower is better)"
# metrics.jsonl's held-out measures, for every task alike: the image trainers' validation loss (and GLUE's loss on
# its tuning part), the language tasks' dev score
VALIDATION_NAMES = {"val_loss": "Validation loss (held out)", "tune/score": "Dev score (tuning part)"}


def wrap(text: str, width: int = 48) -> str:
    """A title in lines of at most `width` characters (a layer name is one long word: it is cut too), so no
    title runs past its axes; constrained layout then makes room for every line."""
    return "\n".join(textwrap.fill(line, width, break_long_words=True) for line in str(text).split("\n"))


def figure(rows: int, cols: int, figsize) -> tuple:
    """plt.subplots with constrained layout: titles, labels and legends are kept inside the figure."""
    return plt.subplots(rows, cols, figsize=figsize, squeeze=False, layout="constrained")


def save(fig, path) -> None:
    if fig.get_layout_engine() is None:     # a figure not made by figure(): lay it out here
        fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), parents=True)
    plt.close(fig)


def colour_of(label: str, colours: dict | None):
    return (colours or {}).get(label)


def distance_vs_step(curves: dict[str, tuple[list, list]], key: str, path, colours: dict | None = None) -> None:
    """curves: label -> (steps, distances). DeLoRA Fig. 3: bounded methods level off, unbounded keep going.
    colours: label -> colour, so a run has the same colour in every figure."""
    fig, axes = figure(1, 1, (7, 4.5))
    ax = axes[0][0]
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label, linewidth=1.5, color=colour_of(label, colours))
    ax.set_title(wrap(f"Weight distance vs step\n({key})", 70), fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel("‖W_eff − W0‖_F")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def scores_vs_step(curves: dict[str, dict[str, tuple[list, list]]], path, colours: dict | None = None,
                   names: dict[str, str] = SCORE_NAMES, unit: str = " (cosine)") -> None:
    """curves: score key -> label -> (steps, values); one panel per key of `names` (key -> its name) that has
    curves, its y axis the name + `unit`."""
    keys = [k for k in names if curves.get(k)]
    fig, axes = figure(1, len(keys), (4.5 * len(keys), 4))
    for ax, key in zip(axes[0], keys):
        for label, (steps, values) in curves[key].items():
            ax.plot(steps, values, marker="o", markersize=3, label=label, color=colour_of(label, colours))
        ax.set_title(wrap(f"{names[key]} vs step"))
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{names[key]}{unit}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path)


def lr_sweep(sweeps: dict[str, list[dict]], base: dict[str, float], distance_key: str, path) -> None:
    """sweeps: method -> [{"factor", "dino", "clip_i", "clip_t", "drift", "distance"}] sorted by factor. DeLoRA
    Fig. 2: how scores, drift and the final distance react to a larger learning rate."""
    names = {**SCORE_NAMES, **DRIFT_NAMES}
    panels = [k for k in names if any(p.get(k) is not None for pts in sweeps.values() for p in pts)]
    panels.append("distance")
    fig, axes = figure(1, len(panels), (4.5 * len(panels), 4))
    for ax, key in zip(axes[0], panels):
        for method, points in sweeps.items():
            pts = [(p["factor"], p[key]) for p in points if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{method} (×1 = lr {base[method]:g})")
        name = names.get(key, "final distance")
        ax.set_title(wrap(f"{name} vs learning-rate factor"))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(wrap("learning-rate factor (lr / smallest lr of the method's sweep)"))
        lower = ", lower is better" if key in DRIFT_NAMES else ""
        ax.set_ylabel("‖W_eff − W0‖_F at the last step" if key == "distance" else f"{name} (last scored step{lower})")
        if key == "distance":
            ax.annotate(distance_key, (0.01, 0.01), xycoords="axes fraction", fontsize=6, alpha=0.7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path)


def sample_grid(rows: list[str], columns: list[int], cells: dict[tuple[int, int], object], caption: str, path) -> None:
    """rows: labels (one per run), columns: steps (or a str title), cells[(row, col)] = PIL image. Blank where a run
    has no checkpoint at that step."""
    size = 1.9
    fig, axes = figure(len(rows), len(columns), (size * len(columns) + 1.6, size * len(rows) + 0.8))
    for r, label in enumerate(rows):
        for c, step in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if (r, c) in cells:
                ax.imshow(cells[(r, c)])
            if r == 0:
                ax.set_title(step if isinstance(step, str) else f"step {step}", fontsize=9)   # "map" column
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(wrap(caption, 20 * len(columns) + 20), fontsize=9)
    save(fig, path)


def nice(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
