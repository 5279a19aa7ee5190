"""Per-step metrics: output_dir/metrics.jsonl (always) plus accelerate trackers (TensorBoard ...), and
the weight-distance probe every trainer runs after every optimizer step.

metrics.jsonl holds one JSON object per optimizer step:
    {"step", "loss", "lr", "distance_fig3", "rel_distance_fig3", "time/step", "time/distance",
     "time/distance_share", ...}
and on the full-probe steps (every --distance_logging_steps steps, every checkpoint step, the last step)
every adapted layer besides:
    {"distance/<layer>", "rel_distance/<layer>", "distance_mean", "distance_max", "rel_distance_mean",
     "rel_distance_max"}
and on checkpoint steps and the last step what the task measures there (Task.at_checkpoint_step: the image
trainers' "val_loss"); on an epoch's last step what it measures at epoch ends (GLUE's "tune/*", "val_loss").
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import lowrank
from ground import cli, runfolder

from . import TrainingError

logger = logging.getLogger("lowrank.training")

FIG3_PATTERN = "attn1.to_out.0"   # DeLoRA Fig. 3: out-projection of the first self-attention
DEFAULT_DISTANCE_LOGGING_STEPS = 10   # --distance_logging_steps: every layer's distance every 10 steps


class _Format(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def setup_console(main: bool = True) -> logging.Logger:
    """The trainers' logger: info as plain lines, `warning: ...` otherwise; quiet on non-main processes."""
    log = logging.getLogger("lowrank.training")
    if not any(isinstance(h, cli.StderrHandler) for h in log.handlers):
        handler = cli.StderrHandler()
        handler.setFormatter(_Format())
        log.addHandler(handler)
        log.propagate = False   # one line per message, whatever the root logger has
    log.setLevel(logging.INFO if main else logging.ERROR)
    return log


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("lowrank", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_info(args, **resolved) -> dict:
    """run.json: every argument as given, what the trainer resolved from them, library versions."""
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **resolved, "versions": library_versions(), "command": sys.argv,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def fig3_layer(names: list[str], pattern: str | None = None) -> str | None:
    """The layer the progress bar and the figures follow: the first whose name holds `pattern` (a model family's
    choice; default DeLoRA Fig. 3's, a UNet's first self-attention out-projection); in a model without
    self-attention blocks of that kind (a language model) the first adapted layer. A UNet whose targets leave
    the Fig. 3 layer out has None (that layer has not moved)."""
    found = next((n for n in names if (pattern or FIG3_PATTERN) in n), None)
    if found is None and names and not any(".attn1." in n for n in names):
        return names[0]
    return found


class DistanceProbe:
    """‖W_eff − W0‖_F of the adapted layers, absolute and relative, with the time it took.

    The schedule (--distance_logging_steps N): every step the followed layer (fig3_layer) only, as
    distance_fig3 / rel_distance_fig3; a full probe (distance/<layer>, rel_distance/<layer> of every adapted
    layer, their mean and max) every N steps, at every checkpoint step and at the last step. A full sweep's
    Gram products cost r²(in + out) per layer, over a percent of a UNet step for some methods; between full
    probes only the followed layer's are computed. The adapter layers are collected once here, not per call."""

    def __init__(self, model, every: int = 1, checkpoint_every: int | None = None, last_step: int | None = None,
                 fig3_pattern: str | None = None):
        self.model = model
        self.layers = lowrank.adapter_layers(model)
        self.names = list(self.layers)
        self.fig3 = fig3_layer(self.names, fig3_pattern)
        self.followed = {self.fig3: self.layers[self.fig3]} if self.fig3 else {}
        # the rest of a full probe: the followed layer is measured in its own call both ways, so the per-step
        # number and the full row's distance/<layer> are the same bits on any device (a batched Gram product
        # need not round a layer alike in a group of 1 and of 30)
        self.others = {n: layer for n, layer in self.layers.items() if n not in self.followed}
        self.every, self.checkpoint_every, self.last_step = every, checkpoint_every, last_step
        # ‖W0‖_F is fixed at inject time: dividing by it here gives exactly what
        # weight_distance(relative=True) returns, at half the cost of a second call
        self.w0_norms = {n: float(layer.w0_norm) for n, layer in self.layers.items()}
        self.dynamic = bool(lowrank.live_ranks(model))   # dynamic-rank method: live ranks every step

    def full_at(self, step: int) -> bool:
        """Whether the probe after optimizer step `step` measures every adapted layer."""
        return (step % self.every == 0 or step == self.last_step
                or (self.checkpoint_every is not None and step % self.checkpoint_every == 0))

    def __call__(self, step: int | None = None) -> dict[str, float]:
        """The row's distances after optimizer step `step` following the schedule; every layer when None."""
        full = step is None or self.full_at(step)
        t0 = time.perf_counter()
        dist = lowrank.layer_distances(self.followed)
        if full:
            dist = {**dist, **lowrank.layer_distances(self.others)}
            dist = {n: dist[n] for n in self.names}   # model order, as weight_distance gives it
        rel = {k: v / self.w0_norms[k] for k, v in dist.items()}
        row: dict[str, float] = {}
        for prefix, values in (("distance", dist), ("rel_distance", rel)):
            if full:
                row.update({f"{prefix}/{k}": v for k, v in values.items()})
            # the Fig. 3 layer is not adapted when target_modules leave it out: then it has not moved
            row[f"{prefix}_fig3"] = values.get(self.fig3, 0.0) if self.fig3 else 0.0
            if full:
                summary = lowrank.distance_summary(values)
                row[f"{prefix}_mean"], row[f"{prefix}_max"] = summary.get("mean", 0.0), summary.get("max", 0.0)
        row["time/distance"] = time.perf_counter() - t0
        if self.dynamic:
            ranks = lowrank.live_ranks(self.model)   # live components per layer
            row.update({f"rank/{k}": v for k, v in ranks.items()})
            row["rank_mean"] = sum(ranks.values()) / len(ranks)
        return row


def fill_followed_layer(rows: list[dict], layer: str | None) -> list[dict]:
    """metrics.jsonl rows with distance/<layer> and rel_distance/<layer> of the followed layer on every row:
    rows between full probes carry it as distance_fig3 / rel_distance_fig3 (the same number a full row logs
    under the layer's name, see DistanceProbe), so a per-step curve of that layer reads like any other key."""
    if not layer:
        return rows
    out = []
    for r in rows:
        extra = {f"{p}/{layer}": r[f"{p}_fig3"] for p in ("distance", "rel_distance")
                 if f"{p}/{layer}" not in r and isinstance(r.get(f"{p}_fig3"), (int, float))}
        out.append({**r, **extra} if extra else r)
    return out


def rank_records(rows: list[dict]) -> list[tuple[int, dict[str, int]]]:
    """(step, {layer: live rank}) from metrics.jsonl rows that carry rank/<layer> columns."""
    return [(r["step"], {k[5:]: v for k, v in r.items() if k.startswith("rank/")})
            for r in rows if any(k.startswith("rank/") for k in r)]


def write_rank_heatmap(records: list[tuple[int, dict[str, int]]], path: str | Path) -> Path:
    """PNG heat map of live rank, layers (rows) x steps (columns), from (step, live_ranks()) records
    (DynDoRA Fig. 2). Written to a temporary name and renamed, so readers never see half a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("write_rank_heatmap: no (step, ranks) records to plot")
    path = Path(path)
    steps = [s for s, _ in records]
    layers = list(records[0][1])
    grid = np.array([[ranks.get(n, np.nan) for _, ranks in records] for n in layers], dtype=float)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.18 * len(layers) + 1.5)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xlabel("optimizer step")
    ax.set_title("Live rank per adapted layer")
    fig.colorbar(im, ax=ax, label="live components")
    fig.tight_layout()
    try:
        runfolder.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path


TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}


def _installed(tracker: str) -> bool:
    return any(importlib.util.find_spec(p) for p in TRACKERS[tracker])


def resolve_report_to(value: str | None) -> str | list[str] | None:
    """The trackers for accelerate's log_with: None (the default) means tensorboard when it is installed; 'none'
    no tracker; 'all' every tracker of --report_to's choices that is installed (tensorboard and wandb with the
    dev extra), not accelerate's every-tracker-it-knows. A named tracker that is not installed is an error."""
    if value is None:
        value = "tensorboard" if _installed("tensorboard") else "none"
    if value == "none":
        return None
    if value == "all":
        found = [t for t in TRACKERS if _installed(t)]
        if not found:
            raise TrainingError("--report_to all: no tracker is installed; pip install tensorboard wandb, or use "
                                "--report_to none (metrics.jsonl is always written)")
        return found
    if value in TRACKERS and not _installed(value):
        package = TRACKERS[value][0]
        raise TrainingError(f"--report_to {value}: the {package} package is not installed; pip install {package} "
                            f"or use --report_to tensorboard / none (metrics.jsonl is always written)")
    return value


def tracker_init_kwargs(report_to, output_dir: Path) -> dict:
    """wandb writes its run beside the run's TensorBoard logs (output_dir/logs/wandb) unless $WANDB_DIR says
    where, and names it after the output folder; WANDB_MODE=offline keeps it on this machine (wandb sync
    uploads it later)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in names:
        return {}
    logs = Path(output_dir) / "logs"
    if not os.environ.get("WANDB_DIR"):
        logs.mkdir(parents=True, exist_ok=True)
    return {"wandb": {"name": Path(output_dir).resolve().name, **({} if os.environ.get("WANDB_DIR")
                                                                   else {"dir": str(logs)})}}


class MetricsLogger:
    """Main-process writer of metrics.jsonl and the accelerate trackers.

    On resume, rows after the resumed step (written by the killed run) are dropped, so the file again
    holds exactly one row per step of the run that produced the final adapter."""

    def __init__(self, accelerator, output_dir: str | Path, project: str, config: dict,
                 resume_step: int | None, report_to: str | list[str] | None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / runfolder.METRICS
        self.trackers = report_to is not None
        if accelerator.is_main_process:
            keep = [r for r in runfolder.read_metrics(output_dir) if r["step"] <= resume_step] if resume_step else []
            runfolder.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
            self.file = open(self.path, "a")
        if self.trackers:
            # trackers take flat scalars/strings only
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
            accelerator.init_trackers(project, config=flat, init_kwargs=tracker_init_kwargs(report_to, output_dir))

    def log(self, step: int, row: dict) -> None:
        row = {"step": step, **row}
        if self.accelerator.is_main_process:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                                 step=step)

    def log_images(self, step: int, images, tag: str = "validation") -> None:
        if not self.trackers:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(tag, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
            elif tracker.name == "wandb":   # accelerate wraps each in wandb.Image (a PNG under the run's media/)
                tracker.log_images({tag: list(images)}, step=step)

    def close(self) -> None:
        if self.accelerator.is_main_process:
            self.file.close()
        if self.trackers:
            self.accelerator.end_training()
