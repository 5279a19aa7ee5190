"""The robustness study's figures: scores and distance vs learning-rate factor (Fig. 2, App. D), distance and
the per-epoch score over prolonged training with the samples of every checkpoint (Fig. 3), the pretrained weight
norms (Fig. 4). Each takes the report's rows and writes one PNG."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from ground.runfolder import PROMPTS, SAMPLES, checkpoint_dir, read_jsonl

from .plots import plt, sample_grid, save


def _panels(ax_keys, figsize_w=4.6):
    fig, axes = plt.subplots(1, len(ax_keys), figsize=(figsize_w * len(ax_keys), 4), squeeze=False)
    return fig, axes[0]


def factor_figure(rows: list[dict], series_of, score_names, path: Path, title: str) -> bool:
    """Score(s) and distance vs learning-rate factor, one line per series; bounds dashed in the same colour."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] != "failed":
            series.setdefault(series_of(r), []).append(r)
    if not series:
        return False
    keys = [k for k in score_names if any(r.get(k) is not None for pts in series.values() for r in pts)]
    fig, axes = _panels(keys + ["distance"])
    for ax, key in zip(axes, keys + ["distance"]):
        for label, pts in series.items():
            pts = sorted(pts, key=lambda r: r["factor"])
            xy = [(r["factor"], r[key], r.get(f"{key}_std", 0.0)) for r in pts if r.get(key) is not None]
            if not xy:
                continue
            x, y, err = zip(*xy)
            line = ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label=label).lines[0]
            if key == "distance":
                b = [(r["factor"], r["bound"]) for r in pts if r.get("bound") is not None]
                if b:
                    ax.plot(*zip(*b), linestyle="--", color=line.get_color(), label=f"{label} bound")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning-rate factor (× base rate)")
        ax.set_ylabel("‖W_merged − W_pre‖_F" if key == "distance" else key)
        seeds = max(r.get("n", 1) for pts in series.values() for r in pts)
        ax.set_title(f"{key} vs factor" + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save(fig, path)
    return True


def long_figures(rows: list[dict], out: Path, score_keys) -> list[str]:
    long = [r for r in rows if r["study"] == "long" and r["status"] != "failed" and r.get("curve")]
    if not long:
        return []
    scored = [k for k in score_keys if any(k in e for r in long for e in r.get("epochs") or [])
              and k not in ("distance", "bound")]
    fig, axes = _panels(["distance"] + scored[:1], figsize_w=6)
    ax = axes[0]
    for r in long:
        per_epoch = _steps_per_epoch(r)
        x = (lambda step: step / per_epoch) if per_epoch else (lambda step: step)
        line, = ax.plot([x(s) for s, _ in r["curve"]], [d for _, d in r["curve"]], label=r["label"], linewidth=1.5)
        if r.get("bounds"):
            ax.plot([x(s) for s, _ in r["bounds"]], [b for _, b in r["bounds"]], linestyle="--",
                    color=line.get_color(), label=f"{r['label']} bound")
        if scored:
            pts = [(e["epoch"], e[scored[0]]) for e in r["epochs"] if e.get(scored[0]) is not None]
            if pts:
                axes[1].plot(*zip(*pts), marker="o", markersize=3, color=line.get_color(), label=r["label"])
    unit = "epoch" if any(_steps_per_epoch(r) for r in long) else "training step"
    ax.set_title(f"Distance over training ({long[0]['layer']})", fontsize=9)
    ax.set_xlabel(unit)
    ax.set_ylabel("‖W_merged − W_pre‖_F")
    if scored:
        axes[1].set_title(f"test {scored[0]} after each epoch", fontsize=10)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel(scored[0])
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    save(fig, out / "fig3_distance_over_steps.png")
    names = ["fig3_distance_over_steps.png"]
    steps = sorted({s for r in long for s in r["checkpoints"]})
    cells = {}
    for i, r in enumerate(long):
        for j, step in enumerate(steps):
            folder = out / "runs" / r["run"]
            sdir = checkpoint_dir(folder, step) / SAMPLES
            if not sdir.is_dir():
                sdir = folder / SAMPLES if step == r["step"] else sdir
            try:
                first = read_jsonl(sdir / PROMPTS, strict=False)[0]["image"]
                cells[(i, j)] = Image.open(sdir / first).convert("RGB")
            except (OSError, IndexError, KeyError, ValueError):
                continue
    if cells:
        sample_grid([r["label"] for r in long], steps, cells, "first sample (seed 0) at each checkpoint",
                    out / "fig3_samples.png")
        names.append("fig3_samples.png")
    return names


def _steps_per_epoch(r: dict) -> float | None:
    first = next((e for e in r.get("epochs") or [] if e["epoch"] > 0), None)
    return first["step"] / first["epoch"] if first else None


def norms_figure(norms: list[dict], path: Path) -> None:
    blocks = list(dict.fromkeys(r["block"] for r in norms))
    kinds = [t for t in ("q", "k", "v", "out") if any(r["type"] == t for r in norms)]
    attns = list(dict.fromkeys(r["attention"] for r in norms))
    fig, axes = _panels(attns, figsize_w=max(4.6, 0.8 * len(blocks) + 2))
    width = 0.8 / max(1, len(kinds))
    for ax, attn in zip(axes, attns):
        for k, kind in enumerate(kinds):
            vals = []
            for b in blocks:
                sel = [r["mean_column_norm"] for r in norms if r["block"] == b and r["type"] == kind
                       and r["attention"] == attn]
                vals.append(sum(sel) / len(sel) if sel else math.nan)
            ax.bar([i + k * width for i in range(len(blocks))], vals, width, label=kind)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(blocks))], blocks, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("mean column norm of W_pre")
        ax.set_title(f"{attn or 'attention'} projections by block", fontsize=10)
        ax.legend(fontsize=8)
    save(fig, path)


