"""The robustness study's report: measurements from the run folders, figures, results.csv, summary.csv,
robustness_summary.csv (eval.robustness_summary), commands.txt and report.md (its tables: eval.robustness_tables).

Everything is read back from the runs (metrics.jsonl distances, checkpoint adapters, samples, eval rows), so
rewriting the report of a finished study costs seconds. Numbers that could not be measured stay empty and
the report says why.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
from pathlib import Path

import torch

import lowrank
from ground.runfolder import list_checkpoints, read_json, read_metrics, read_run, write_text
from lowrank import read_adapter
from lowrank.analysis import delora_bound
from training.common.tracking import fill_followed_layer, library_versions
from training.families import FAMILIES

from .robustness_figures import factor_figure, long_figures, norms_figure
from .robustness_summary import CSV_COLUMNS as ROBUSTNESS_CSV
from .robustness_tables import MEASURES, SCORES, SUMMARY_FILE, cell, study_tables, study_title
from .robustness_tasks import ROOT, base_model_name, flag_value
from .tables import md_table, write_csv

TYPES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "q_proj": "q", "k_proj": "k", "v_proj": "v",
         "out_proj": "out", "query": "q", "key": "k", "value": "v", "attention.output.dense": "out"}
BLOCK_RE = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+|layers?\.\d+|\bh\.\d+)")


# ----- measurements ----------------------------------------------------------------------------------------
def figure_layer(folder: Path, rows: list[dict], wanted: str | None) -> str | None:
    if wanted:
        return wanted
    fig3 = followed_layer(folder)
    # rows between full probes carry no distance/<layer>: the first row that does names the layers
    full = next((r for r in rows if any(k.startswith("distance/") for k in r)), {})
    names = [k[len("distance/"):] for k in full if k.startswith("distance/")]
    return fig3 or (names[0] if names else None)


def followed_layer(folder: Path) -> str | None:
    """The layer the trainer measured every step (run.json's fig3_layer; None when not recorded)."""
    try:
        return read_run(folder).get("fig3_layer")
    except ValueError:
        return None


def bound_at(adapter_dir: Path, layer: str, sigma: dict) -> float | None:
    """The radius the method proves for `layer` from a saved adapter: DeLoRA (|λ| + |λ0|)·N (N = the largest
    saved ‖W̄‖ scale), mult_* |λ|·σ_max(W̄) (σ from the base model). None for unbounded methods."""
    try:
        cfg, state = read_adapter(adapter_dir)
    except Exception:
        return None
    get = lambda k: state.get(f"{layer}.{k}")   # noqa: E731
    if cfg.method == "delora" and get("delora_lambda") is not None:
        return delora_bound(state, layer)
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
               "error": r.error, "options": " ".join(s.extra), "seed": s.seed, "group": s.group}
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
        rows = fill_followed_layer(rows, followed_layer(r.folder))   # the followed layer's every step
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
                    "checkpoints": [step for step, _ in ckpts], "epochs": epoch_curve(rows, dict(curve))}
        scores, note = ({}, score_note) if score_note else task.score(r.folder, args, final_step)
        measured.update(scores, score_note=note or "")
        cache[r.folder] = measured
        out.append({**measured, **row})
    return out


def epoch_curve(rows: list[dict], distance_at: dict) -> list[dict]:
    """The trainer's per-epoch evaluations (GLUE: test/<metric> after every epoch) with the distance at that
    step: [{"epoch" (epochs completed), "step", "distance", <metric>: value}]."""
    out = []
    for m in rows:
        if "eval_epoch" in m:
            scores = {k[5:]: v for k, v in m.items() if k.startswith("test/") and isinstance(v, (int, float))}
            out.append({"epoch": m["eval_epoch"] + 1, "step": m["step"], "distance": distance_at.get(m["step"]),
                        **scores})
    return out


SUMMARY_KEYS = MEASURES + SCORES


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per setting over its seeds: KEY = mean, KEY_std = sample std (n − 1), n = finished seeds.
    A setting with a failed seed says so in `status`; its mean is over the seeds that finished."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out = []
    for members in groups.values():
        ok = [m for m in members if m["status"] != "failed"]
        agg = {k: v for k, v in (ok or members)[0].items() if k not in SUMMARY_KEYS}
        agg["seeds"] = [m["seed"] for m in ok]
        agg["n"] = len(ok)
        failed = len(members) - len(ok)
        agg["status"] = "failed" if not ok else (f"{failed} of {len(members)} seeds failed" if failed else
                                                  ok[0]["status"])
        agg["error"] = next((m["error"] for m in members if m["error"]), "")
        for k in SUMMARY_KEYS:
            values = [m[k] for m in ok if m.get(k) is not None]
            if values:
                agg[k] = statistics.fmean(values)
                agg[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(agg)
    return out


# ----- the report ------------------------------------------------------------------------------------------------
CSV_COLUMNS = ["study", "label", "method", "options", "factor", "lr", "lambda_lr", "seed", "step", "epoch",
               "score_names", "dino", "clip_i", "drift", "miou", "metric", "accuracy", "f1", "macro_f1", "matthews",
               "pearson", "spearman", "tune_score", "distance", "bound", "trainable_params", "status", "error",
               "score_note", "run"]
SUMMARY_COLUMNS = ["study", "label", "method", "options", "factor", "lr", "lambda_lr", "n", "step"] + \
    [c for k in SUMMARY_KEYS for c in (k, f"{k}_std")] + ["trainable_params", "status", "error"]


def csv_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        out.append({k: r.get(k) for k in CSV_COLUMNS})
        if r["study"] == "long":   # the prolonged runs: one row per evaluated epoch or logged checkpoint too
            dist, bnd, last = dict(r.get("curve") or []), dict(r.get("bounds") or []), out[-1]
            for e in r.get("epochs") or []:
                out.append({**last, **{k: v for k, v in e.items() if k in CSV_COLUMNS}, "bound": bnd.get(e["step"])})
            for step in ([] if r.get("epochs") else r.get("checkpoints", [])):
                if step != r.get("step"):
                    out.append({**last, "step": step, "distance": dist.get(step), "bound": bnd.get(step)})
    return out


def machine_info(args, results) -> dict:
    """Where and how the study ran: what a reader needs to compare a rerun's numbers with these. A command
    that trained nothing (every run reused: the report rewritten) keeps the record of the one that trained."""
    trained = len({r.spec.name for r in results if r.status == "trained"})
    previous = read_json(args.output_dir / "machine.json", default=None)
    if not trained and isinstance(previous, dict) and previous.get("wall_time_s"):
        return {**previous, "report_rewritten_by_a_later_command": True}
    return {"wall_time_s": round(getattr(args, "wall_time", 0.0), 1), "runs_trained": trained,
            "runs_reused": len({r.spec.name for r in results if r.status == "reused"}), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "jobs": args.jobs, "threads_per_run": args.threads_per_run, "versions": library_versions(),
            "launcher": getattr(args, "launcher", "local"),
            **({"ray": args.ray_cluster} if getattr(args, "ray_cluster", None) else {})}


def where(machine: dict) -> str:
    """Where the runs trained, as the header says it: this machine's cores, or the Ray cluster."""
    ray = machine.get("ray")
    if ray:
        return (f"a Ray cluster of {ray['nodes']} node(s), {ray['cpus']:g} CPUs, {ray['gpus']:g} GPUs "
                f"({ray['cpus_per_run']:g} CPU(s), {ray['gpus_per_run']:g} GPU(s) per run")
    return f"{machine['cpu_count']} CPU cores ({machine['jobs']} run(s) at a time"


def checkpoint_intervals(results) -> str:
    """The checkpoint interval the study's runs really had, per study: each run's recorded args (run.json),
    or for a run that never wrote one the --checkpointing_steps it was given, e.g. '6 steps (lr), 25 (long)'."""
    studies: dict[int, list[str]] = {}
    for r in results:
        recorded = ((read_json(r.folder / "run.json", {}) or {}).get("args") or {}).get("checkpointing_steps")
        every = recorded if recorded is not None else flag_value(r.command, "--checkpointing_steps")
        if str(every).isdigit():
            names = studies.setdefault(int(every), [])
            names += [] if r.spec.study in names else [r.spec.study]
    if len(studies) == 1:
        return f"{next(iter(studies))} steps"
    return ", ".join(f"{every} steps ({', '.join(names)})" for every, names in sorted(studies.items())) or "none"


def write_figures(rows: list[dict], summary: list[dict], norms: list[dict], score_names: list[str],
                  out: Path) -> list[str]:
    """Figs. 2, 3, 4 and App. D's Fig. 6, those the study has data for: the file names written."""
    figures = []
    if factor_figure([r for r in summary if r["study"] == "lr"], lambda r: r["method"], score_names,
                     out / "fig2_lr_sweep.png", "Fig. 2: learning-rate robustness"):
        figures.append("fig2_lr_sweep.png")
    figures += long_figures(rows, out, SUMMARY_KEYS)
    if norms:
        norms_figure(norms, out / "fig4_weight_norms.png")
        figures.append("fig4_weight_norms.png")
    appd = [r for r in summary if r["study"] == "appd"] + [{**r, "label": "delora (both ×f)"} for r in summary
                                                            if r["study"] == "lr" and r["method"] == "delora"]
    if factor_figure(appd, lambda r: r["label"], score_names, out / "fig6_appd.png",
                     "App. D (Fig. 6): DeLoRA, λ or A/B learning rate raised alone"):
        figures.append("fig6_appd.png")
    return figures


def header(args, task, passthrough: list[str], results, rows: list[dict], name: str | None,
           machine: dict) -> list[str]:
    """report.md's title and first paragraph: what was trained, how, where and what the distance measures."""
    def base_rate(method: str) -> float:
        return task.base_lr(method, passthrough, args.base_lrs)
    sizes = (f"{args.num_train_epochs} epoch(s)" if args.num_train_epochs else f"{args.max_train_steps} steps",
             f"{args.long_epochs} epoch(s)" if args.long_epochs else f"{args.long_steps} steps")
    every = checkpoint_intervals(results)   # as the runs recorded it: a run never checkpoints past its length
    deterministic = "--deterministic" in passthrough
    threads = args.threads_per_run or "torch's default"
    detail = flag_value(passthrough, f"--{task.task.output_flag}") if task.task.output_flag else None
    return [study_title(args.task, detail), "", f"Base model: `{name or 'the trainer default'}`. "
            f"Sweep runs: {sizes[0]}; " + (f"long runs: {sizes[1]}; " if "long" in args.studies else "") +
            f"checkpoints every {every}; "
            f"seeds {' '.join(map(str, args.seeds))} (tables and figures: mean ± sample std over the seeds). "
            f"Base rates: {', '.join(f'{m} {base_rate(m):g}' for m in args.methods)}. "
            f"Wall time of the command that trained the runs: {machine['wall_time_s'] / 60:.1f} min on "
            f"{where(machine)}, {threads} thread(s) each, "
            f"{'--deterministic' if deterministic else 'not --deterministic'}; machine.json). "
            f"Distance: `‖W_merged − W_pre‖_F` of "
            f"`{next((r['layer'] for r in rows if r.get('layer')), '?')}`; bound: the radius the method proves "
            f"(DeLoRA `(|λ| + |λ0|)·N`, `mult_*` `|λ|·σ_max(W̄)`), dashed in the figures. Scores in percent.", ""]


def write_report(results, args, task, passthrough: list[str], own_argv: list[str]) -> Path:
    """report.md, results.csv, summary.csv, machine.json, commands.txt and the figures, from the runs."""
    out = args.output_dir
    notes = []
    done_dirs = [r.folder for r in results if r.status != "failed"]
    name = base_model_name(task, passthrough, done_dirs)
    base = None
    try:
        base = task.load_base(name)
    except Exception as e:
        notes.append(f"The base model {name!r} did not load ({str(e).splitlines()[0][:200]}): no weight norms, "
                     f"no `mult_*` bounds, no parameter counts.")
    if task.task.kind == "image" and any(f.is_preset(name) for f in FAMILIES):
        notes.append(f"The base model is the built-in {name or 'tiny'} preset with random weights: its images are "
                     "noise, so any DINO / CLIP-I score or drift here says nothing about subject fidelity or "
                     "forgetting. The distances and bounds are real measurements of what each method did to the "
                     "weights.")
    score_note = "scores skipped (--no_scores)" if args.no_scores else (task.prepare(args) if task.prepare else None)
    if score_note:
        notes.append(score_note[:1].upper() + score_note[1:] + ".")
    rows = measure(results, args, task, base, score_note)
    summary = aggregate(rows)
    score_names = [k for k in task.score_names if any(r.get(k) is not None for r in rows)] or list(task.score_names)
    norms = weight_norms(base) if base is not None and "norms" in args.studies else []
    figures = write_figures(rows, summary, norms, score_names, out)
    table = csv_rows(rows)
    for t in table:
        t["score_names"] = ",".join(score_names)
    write_csv(out / "results.csv", CSV_COLUMNS, table)
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary)
    write_commands(out / "commands.txt", results, own_argv)
    machine = machine_info(args, results)
    write_text(out / "machine.json", json.dumps(machine, indent=2) + "\n")

    md = header(args, task, passthrough, results, rows, name, machine) + [f"- {n}" for n in notes] + \
        ([""] if notes else [])
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += [f"**{len({r['run'] for r in failed})} run(s) failed**; they are in the tables with their error "
               f"line.", ""]
    md += [f"![{f}]({f})" for f in figures] + [""]
    tables, summaries = study_tables(summary, rows, score_names)
    write_csv(out / SUMMARY_FILE, ROBUSTNESS_CSV, summaries)
    md += tables
    if norms:
        groups: dict[tuple, list[float]] = {}
        for n in norms:
            groups.setdefault((n["block"], n["attention"], n["type"]), []).append(n["mean_column_norm"])
        agg = [{"block": b, "attention": a, "type": t, "modules": len(v), "mean_column_norm": sum(v) / len(v)}
               for (b, a, t), v in groups.items()]
        md += ["## Weight norms (Fig. 4)", "", md_table(agg, [("block", "block"), ("attention", "attention"),
                                                             ("type", "type"), ("modules", "modules"),
                                                             ("mean column norm", "mean_column_norm")], cell)]
    md += ["## Commands", "", "```", (out / "commands.txt").read_text().rstrip(), "```", ""]
    return write_text(out / "report.md", "\n".join(md))


def write_commands(path: Path, results: list, own: list[str]) -> None:
    """commands.txt: this study's command, then each distinct run's trainer command (results: RunResult)."""
    lines = ["# this study", "python -m eval.robustness " + shlex.join(own), "", "# its runs"]
    seen = set()
    for r in results:
        if r.spec.name not in seen:
            seen.add(r.spec.name)
            # paths inside the checkout as they read from its root: the file is the same on every machine
            lines.append(shlex.join(r.command).replace(str(ROOT) + os.sep, ""))
    write_text(path, "\n".join(lines) + "\n")
