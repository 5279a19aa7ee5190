"""The robustness study's report: measurements from the run folders, figures, results.csv and report.md.

Everything is read back from the runs (metrics.jsonl distances, checkpoint adapters, samples, eval rows), so
rewriting the report of a finished study costs seconds. Numbers that could not be measured stay empty and
the report says why.
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import torch

from lowrank.runfolder import list_checkpoints, read_jsonl, read_metrics, read_run, write_text

from .plots import nice, plt, sample_grid, save

TYPES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "q_proj": "q", "k_proj": "k", "v_proj": "v",
         "out_proj": "out", "query": "q", "key": "k", "value": "v", "attention.output.dense": "out"}
BLOCK_RE = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+|layers?\.\d+|\bh\.\d+)")


# ----- measurements ----------------------------------------------------------------------------------------
def figure_layer(folder: Path, rows: list[dict], wanted: str | None) -> str | None:
    if wanted:
        return wanted
    try:
        fig3 = read_run(folder).get("fig3_layer")
    except ValueError:
        fig3 = None
    names = [k[len("distance/"):] for k in (rows[0] if rows else {}) if k.startswith("distance/")]
    return fig3 or (names[0] if names else None)


def bound_at(adapter_dir: Path, layer: str, sigma: dict) -> float | None:
    """The radius the method proves for `layer` from a saved adapter: DeLoRA (|λ| + |λ0|)·N (N = the largest
    saved ‖W̄‖ scale), mult_* |λ|·σ_max(W̄) (σ from the base model). None for unbounded methods."""
    from lowrank import read_adapter

    try:
        cfg, state = read_adapter(adapter_dir)
    except Exception:
        return None
    get = lambda k: state.get(f"{layer}.{k}")   # noqa: E731
    if cfg.method == "delora" and get("delora_lambda") is not None:
        lam = abs(get("delora_lambda").item()) + (abs(get("delora_lambda0").item()) if get("delora_lambda0")
                                                   is not None else 0.0)
        return lam * float(get("delora_w_norm").max())
    if cfg.method.startswith("mult_") and get("mult_lambda") is not None and layer in sigma:
        return abs(get("mult_lambda").item()) * sigma[layer]
    return None


def weight_norms(model) -> list[dict]:
    """DeLoRA Fig. 4: mean column norm of each attention projection's pretrained weight, by block and type."""
    rows = []
    for name, m in model.named_modules():
        kind = next((t for suffix, t in TYPES.items() if name.endswith("." + suffix) or name == suffix), None)
        w = getattr(m, "weight", None)
        if kind is None or w is None or w.dim() < 2:
            continue
        block = BLOCK_RE.search(name)
        attn = "cross" if ".attn2." in name else "self" if ".attn1." in name else ""
        W = w.detach().float().reshape(w.shape[0], -1)
        rows.append({"module": name, "block": block.group(1) if block else "other", "attention": attn,
                     "type": kind, "mean_column_norm": W.norm(dim=0).mean().item()})
    return rows


def trainable_count(model, adapter_dir: Path) -> int | None:
    import lowrank

    try:
        cfg, _ = lowrank.read_adapter(adapter_dir)
        lowrank.inject(model, cfg)
        try:
            return sum(p.numel() for layer in lowrank.adapter_layers(model).values()
                       for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base."))
        finally:
            lowrank.eject(model)
    except Exception:
        return None


def measure(results, args, task, base, score_note: str | None) -> list[dict]:
    """One dict per run: final numbers, the distance and bound curves, status and scores."""
    sigma: dict = {}   # layer -> σ_max(W̄), from the base model (the mult_* bound)
    weights = dict(base.named_modules()) if base is not None else {}
    out, cache = [], {}
    for r in results:
        s = r.spec
        row = {"study": s.study, "label": s.label, "method": s.method, "factor": s.factor, "lr": s.lr,
               "lambda_lr": s.lambda_lr, "steps_planned": s.steps, "run": r.folder.name, "status": r.status,
               "error": r.error, "options": " ".join(s.extra)}
        if r.status == "failed":
            out.append(row)
            continue
        if s.study == "ablation" and base is not None:
            row["trainable_params"] = trainable_count(base, r.folder)
        if r.folder in cache:
            out.append({**cache[r.folder], **row})
            continue
        rows = read_metrics(r.folder)
        layer = figure_layer(r.folder, rows, args.layer)
        key = f"distance/{layer}"
        curve = [(m["step"], m[key]) for m in rows if key in m]
        if layer and layer not in sigma and layer in weights:
            w = weights[layer].weight.detach().double()
            sigma[layer] = float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2))
        ckpts = [(step, d) for step, d in list_checkpoints(r.folder)]
        final_step = curve[-1][0] if curve else s.steps
        if final_step not in dict(ckpts):
            ckpts.append((final_step, r.folder))
        bounds = [(step, b) for step, d in ckpts if (b := bound_at(d, layer, sigma)) is not None]
        measured = {"layer": layer, "step": final_step, "distance": curve[-1][1] if curve else None,
                    "bound": bounds[-1][1] if bounds else None, "curve": curve, "bounds": bounds,
                    "checkpoints": [step for step, _ in ckpts]}
        scores, note = ({}, score_note) if score_note else task.score(r.folder, args, final_step)
        measured.update(scores, score_note=note or "")
        cache[r.folder] = measured
        out.append({**measured, **row})
    return out


# ----- figures ----------------------------------------------------------------------------------------------
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
            xy = [(r["factor"], r[key]) for r in pts if r.get(key) is not None]
            if not xy:
                continue
            line, = ax.plot(*zip(*xy), marker="o", label=label)
            if key == "distance":
                b = [(r["factor"], r["bound"]) for r in pts if r.get("bound") is not None]
                if b:
                    ax.plot(*zip(*b), linestyle="--", color=line.get_color(), label=f"{label} bound")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning-rate factor (× base rate)")
        ax.set_ylabel("‖W_merged − W_pre‖_F" if key == "distance" else key)
        ax.set_title(f"{key} vs factor", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save(fig, path)
    return True


def long_figures(rows: list[dict], out: Path) -> list[str]:
    long = [r for r in rows if r["study"] == "long" and r["status"] != "failed" and r.get("curve")]
    if not long:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in long:
        line, = ax.plot(*zip(*r["curve"]), label=r["label"], linewidth=1.5)
        if r.get("bounds"):
            ax.plot(*zip(*r["bounds"]), linestyle="--", color=line.get_color(), label=f"{r['label']} bound")
    ax.set_title(f"Distance over training steps ({long[0]['layer']})", fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel("‖W_merged − W_pre‖_F")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out / "fig3_distance_over_steps.png")
    names = ["fig3_distance_over_steps.png"]
    from PIL import Image

    steps = sorted({s for r in long for s in r["checkpoints"]})
    cells = {}
    for i, r in enumerate(long):
        for j, step in enumerate(steps):
            folder = out / "runs" / r["run"]
            sdir = folder / f"checkpoint-{step}" / "samples"
            if not sdir.is_dir():
                sdir = folder / "samples" if step == r["step"] else sdir
            try:
                first = read_jsonl(sdir / "prompts.jsonl", strict=False)[0]["image"]
                cells[(i, j)] = Image.open(sdir / first).convert("RGB")
            except (OSError, IndexError, KeyError, ValueError):
                continue
    if cells:
        sample_grid([r["label"] for r in long], steps, cells, "first sample (seed 0) at each checkpoint",
                    out / "fig3_samples.png")
        names.append("fig3_samples.png")
    return names


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


# ----- the report ------------------------------------------------------------------------------------------------
CSV_COLUMNS = ["study", "label", "method", "options", "factor", "lr", "lambda_lr", "step", "score_names", "dino",
               "clip_i", "miou", "metric", "distance", "bound", "trainable_params", "status", "error", "score_note",
               "run"]


def csv_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        out.append({k: r.get(k) for k in CSV_COLUMNS})
        if r["study"] == "long":   # the prolonged runs: one row per logged checkpoint step too
            dist, bnd = dict(r.get("curve") or []), dict(r.get("bounds") or [])
            for step in r.get("checkpoints", []):
                if step != r.get("step"):
                    out.append({**out[-1], "step": step, "distance": dist.get(step), "bound": bnd.get(step)})
    return out


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(t for t, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(nice(r.get(k)) if k != "error" else (r.get(k) or "")
                                           for _, k in columns) + " |\n" for r in rows)


def write_report(results, args, task, passthrough: list[str], own_argv: list[str]) -> Path:
    from .robustness import ABLATION_ROWS, write_commands
    from .robustness_tasks import base_model_name

    out = args.output_dir
    notes = []
    done_dirs = [r.folder for r in results if r.status != "failed"]
    name = base_model_name(task, passthrough, done_dirs)
    base = None
    try:
        base = task.load_base(name)
    except Exception as e:
        notes.append(f"The base model {name!r} did not load ({str(e).splitlines()[0][:200]}): no weight norms, "
                     f"no mult_* bounds, no parameter counts.")
    from training.common.models import is_tiny

    if args.task != "glue" and is_tiny(name):
        notes.append("The base model is the built-in tiny SD with random weights: its images are noise, so any "
                     "DINO / CLIP-I score here says nothing about subject fidelity. The distances and bounds are "
                     "real measurements of what each method did to the weights.")
    score_note = "scores skipped (--no_scores)" if args.no_scores else (task.prepare(args) if task.prepare else None)
    if score_note:
        notes.append(score_note[:1].upper() + score_note[1:] + ".")
    rows = measure(results, args, task, base, score_note)
    figures = []
    if factor_figure([r for r in rows if r["study"] == "lr"], lambda r: r["method"], task.score_names,
                     out / "fig2_lr_sweep.png", "Fig. 2: learning-rate robustness"):
        figures.append("fig2_lr_sweep.png")
    figures += long_figures(rows, out)
    norms = weight_norms(base) if base is not None and "norms" in args.studies else []
    if norms:
        norms_figure(norms, out / "fig4_weight_norms.png")
        figures.append("fig4_weight_norms.png")
    appd = [r for r in rows if r["study"] == "appd"] + [{**r, "label": "delora (both ×f)"} for r in rows
                                                         if r["study"] == "lr" and r["method"] == "delora"]
    if factor_figure(appd, lambda r: r["label"], task.score_names, out / "fig6_appd.png",
                     "App. D (Fig. 6): DeLoRA, λ or A/B learning rate raised alone"):
        figures.append("fig6_appd.png")

    table = csv_rows(rows)
    for t in table:
        t["score_names"] = ",".join(task.score_names)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in t.items()} for t in table)
    write_text(out / "results.csv", buf.getvalue())
    write_commands(out / "commands.txt", results, own_argv)

    scores = [(k, k) for k in task.score_names]
    md = [f"# Robustness study: {args.task}", "", f"Base model: `{name or 'the trainer default'}`. "
          f"Sweep runs: {args.max_train_steps} steps; long runs: {args.long_steps} steps; checkpoints every "
          f"{args.checkpointing_steps}; seed {args.seed}. Distance: ‖W_merged − W_pre‖_F of "
          f"`{next((r['layer'] for r in rows if r.get('layer')), '?')}`; bound: the radius the method proves "
          f"(DeLoRA (|λ| + |λ0|)·N, mult_* |λ|·σ_max(W̄)), dashed in the figures.", ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += [f"**{len({r['run'] for r in failed})} run(s) failed**; they are in the tables with their error "
               f"line.", ""]
    md += [f"![{f}]({f})" for f in figures] + [""]
    base_cols = [("status", "status"), ("step", "step")] + scores + [("distance", "distance"), ("bound", "bound"),
                                                                       ("error", "error")]
    for study, title, first in [("lr", "Learning-rate sweep (Fig. 2)", [("method", "method"), ("factor", "factor"),
                                                                      ("lr", "lr")]),
                                ("long", "Prolonged training (Fig. 3)", [("method", "method")]),
                                ("appd", "App. D (Fig. 6)", [("label", "variant"), ("factor", "factor"),
                                                             ("lr", "lr"), ("lambda_lr", "λ lr")])]:
        sel = [r for r in rows if r["study"] == study]
        if sel:
            md += [f"## {title}", "", md_table(sel, [(t, k) for k, t in first] + [(t, k) for k, t in base_cols])]
    abl = [r for r in rows if r["study"] == "ablation"]
    if abl:
        formula = {row: f for row, f, _, _ in ABLATION_ROWS}
        for r in abl:
            r["formula"] = formula.get(r["label"], "")
        md += ["## Ablation (DeLoRA Table 1, paper order)", "",
               md_table(abl, [("row", "label"), ("ΔW", "formula"), ("method", "method"), ("options", "options"),
                              ("trainable params", "trainable_params")] + [(t, k) for k, t in base_cols])]
    if norms:
        groups: dict[tuple, list[float]] = {}
        for n in norms:
            groups.setdefault((n["block"], n["attention"], n["type"]), []).append(n["mean_column_norm"])
        agg = [{"block": b, "attention": a, "type": t, "modules": len(v), "mean_column_norm": sum(v) / len(v)}
               for (b, a, t), v in groups.items()]
        md += ["## Weight norms (Fig. 4)", "", md_table(agg, [("block", "block"), ("attention", "attention"),
                                                             ("type", "type"), ("modules", "modules"),
                                                             ("mean column norm", "mean_column_norm")])]
    md += ["## Commands", "", "```", (out / "commands.txt").read_text().rstrip(), "```", ""]
    return write_text(out / "report.md", "\n".join(md))
