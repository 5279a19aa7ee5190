"""What the Generate tab does (no Gradio here): images from a run's checkpoint (seeded, reproducible),
optionally with the adapter merged into the base weights, and the checkpoint's adapter exported as a file
diffusers, peft, ComfyUI or AUTOMATIC1111 load (training.common.export).

One pipeline per base model is cached. For each request the adapter is loaded into it, used and
ejected again, and the base weights it touched are restored bit for bit from a snapshot, so requests
never leak into one another (merge/unmerge round trips are exact only to fp32 rounding).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from eval import EvalError
from eval.best import best_checkpoint
from eval.generate import sampling_kwargs
from ground import runfolder
from lowrank import AdapterError, eject, load_adapter, merge, read_adapter
from training.common import TrainingError
from training.exporting import export_run
from training.families import denoiser_of, load_pipeline

from . import runs
from .inputs import InputError

BASE = "base model (no adapter)"
FINAL = "final"
BEST = "best"      # the step the run's tuning score picks (eval.best), resolved when it is used
EMA = " (EMA)"     # 'step N (EMA)', 'final (EMA)': the moving average beside a checkpoint or the final adapter
# the Generate tab's export choices -> training.common.export formats (exact files; see lowrank/export.py)
EXPORT_FORMATS = {"diffusers (pipe.load_lora_weights)": "diffusers", "kohya (ComfyUI / AUTOMATIC1111)": "kohya",
                  "peft (PeftModel.from_pretrained)": "peft",
                  "diff (ComfyUI / AUTOMATIC1111, full ΔW: any method, DoRA too)": "diff"}
EXPORTS = "exports"


def checkpoint_choices(run_dir: Path) -> list[str]:
    """'step N' per checkpoint, 'final', each followed by its moving average ('step N (EMA)', 'final (EMA)') where
    the run kept one (--ema_decay), 'best: step N (...)' where the run's tuning score names a step whose
    adapter was kept (eval.best: the language tasks' dev score, DINO, mIoU or the validation loss), the base."""
    out = []
    for label, folder in [(f"step {s}", path) for s, path in runs.checkpoints(run_dir)] + \
            ([(FINAL, run_dir)] if runs.is_adapter_dir(run_dir) else []):
        out += [label] + ([label + EMA] if runs.is_adapter_dir(folder / runfolder.EMA_DIR) else [])
    best = best_checkpoint(run_dir)
    return out + ([f"{BEST}: {best.describe()}"] if best.folder is not None else []) + [BASE]


def default_choice(choices: list[str]) -> str | None:
    """The choice the Generate tab starts on: the best step where there is one, else the last adapter the run
    trained (the final one, else its newest checkpoint), not a moving average."""
    kept = [c for c in choices if c != BASE and not c.endswith(EMA)]
    return kept[-1] if kept else (choices[0] if choices else None)


def adapter_dir(run_dir: Path, choice: str) -> Path | None:
    """The folder holding the adapter for a checkpoint choice ('step N', 'final', 'best' as it is now, each with
    ' (EMA)' for its moving average; also 'checkpoint-N', 'ema', 'checkpoint-N/ema'); None for the base."""
    choice = str(choice or "").strip()
    if choice == BASE:
        return None
    if choice.endswith(EMA) or choice == runfolder.EMA_DIR or choice.endswith("/" + runfolder.EMA_DIR):
        plain = choice.removesuffix(EMA).removesuffix(runfolder.EMA_DIR).rstrip("/") or FINAL
        trained = adapter_dir(run_dir, plain)
        folder = trained / runfolder.EMA_DIR if trained is not None else None
        if folder is None or not runs.is_adapter_dir(folder):
            raise InputError(f"{plain} of run {run_dir.name} has no moving average (train with --ema_decay).")
        return folder
    if choice.split(":")[0].strip() == BEST:
        best = best_checkpoint(run_dir)
        if best.folder is None:
            raise InputError(f"This run has no best checkpoint to load: {best.describe()}. Score it (Compare) or "
                             f"pick a step.")
        return best.folder
    if choice in (FINAL, ""):
        if not runs.is_adapter_dir(run_dir):
            raise InputError("This run has no final adapter yet (still training, cancelled or failed): "
                             "pick a checkpoint.")
        return run_dir
    for step, path in runs.checkpoints(run_dir):
        if choice in (f"step {step}", str(step), path.name):
            return path
    raise InputError(f"No checkpoint {choice!r} in run {run_dir.name}.")


def export(run_dir: Path, choice: str, label: str) -> Path:
    """Export a checkpoint's (or the final) adapter as a file other tools load; returns the file to download
    (peft's two files zipped). Written under RUN/exports/<checkpoint>-<format>/, each file atomically."""
    fmt = EXPORT_FORMATS.get(str(label or "").strip(), str(label or "").strip())
    if fmt not in EXPORT_FORMATS.values():
        raise InputError(f"Unknown export format {label!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    adir = adapter_dir(Path(run_dir), choice)
    if adir is None:
        raise InputError("The base model has no adapter to export: pick a checkpoint or 'final'.")
    tag = "final" if adir == Path(run_dir) else adir.name
    if adir.name == runfolder.EMA_DIR:   # RUN/ema, RUN/checkpoint-N/ema
        tag = ("final" if adir.parent == Path(run_dir) else adir.parent.name) + "-ema"
    out = Path(run_dir) / EXPORTS / f"{tag}-{fmt}"
    try:
        written = export_run(adir, out, fmt)
    except (AdapterError, TrainingError, OSError) as e:   # e.g. DoRA as kohya: the error names the formats that can
        raise InputError(f"Cannot export {Path(run_dir).name} ({tag}) as {fmt}: {e}") from None
    if fmt != "peft":
        return written
    archive = out.with_suffix(".zip")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        made = shutil.make_archive(str(Path(tmp) / out.name), "zip", root_dir=out)
        Path(made).replace(archive)
    return archive


class Generator:
    def __init__(self, device: str | None = None, max_models: int = 1):
        self._lock = threading.Lock()
        self._pipes: OrderedDict[str, object] = OrderedDict()
        self.max_models = max_models
        self.device = device

    def pipeline(self, model: str):
        key = model or "tiny"
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        try:
            pipe = load_pipeline(None if key == "tiny" else key)
        except Exception as e:  # ModelLoadError and anything from_pretrained raises
            raise InputError(f"Cannot load the base model {key!r}: {str(e).splitlines()[0][:300]}") from None
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = pipe.to(device)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        pipe.set_progress_bar_config(disable=True)
        while len(self._pipes) >= self.max_models:
            self._pipes.popitem(last=False)
        self._pipes[key] = pipe
        return pipe

    @staticmethod
    def call_kwargs(run_dir: Path, pipe) -> dict:
        run = runs.read_json(Path(run_dir) / runfolder.RUN_JSON, {}) or {}
        try:
            return sampling_kwargs(run, pipe)
        except EvalError as e:
            raise InputError(f"Cannot generate from {Path(run_dir).name}: {e}") from None

    def generate(self, run_dir: Path, choice: str, prompt: str, seed: int = 0, num_images: int = 1,
                 steps: int = 25, guidance: float = 7.5, merged: bool = False, resolution: int | None = None):
        prompt = str(prompt or "").strip()
        if not prompt:
            raise InputError("Type a prompt.")
        adir = adapter_dir(Path(run_dir), choice)
        info = runs.info(Path(run_dir))
        args = runs.read_json(Path(run_dir) / runfolder.RUN_JSON, {}) or {}
        args = args.get("args", args)
        res = resolution or args.get("resolution")
        with self._lock:
            pipe = self.pipeline(info.model)
            unet = denoiser_of(pipe)   # the UNet, or a DiT family's transformer
            snapshot = {}
            if adir is not None:
                try:
                    _, state = read_adapter(adir)
                except Exception as e:
                    raise InputError(f"Cannot read the adapter in {adir.name}: {e}") from None
                modules = dict(unet.named_modules())
                for name in {k.rpartition(".")[0] for k in state}:
                    mod = modules.get(name)
                    if mod is not None:
                        snapshot[name] = {k: v.detach().clone() for k, v in mod.named_parameters(recurse=False)}
                try:
                    load_adapter(unet, adir)
                except Exception as e:
                    raise InputError(f"Cannot load the adapter of {Path(run_dir).name} ({choice}): {e}") from None
            try:
                if adir is not None and merged:
                    merge(unet)
                gen = torch.Generator("cpu").manual_seed(int(seed))
                kwargs = {"height": int(res), "width": int(res)} if res else {}
                # the run's own conditioning settings (FLUX.1's T5 length); the prompt by name: a
                # Flux2KleinPipeline's first parameter is an input image
                kwargs.update(self.call_kwargs(run_dir, pipe))
                with torch.inference_mode():
                    out = pipe(prompt=prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
                               num_images_per_prompt=int(num_images), generator=gen, **kwargs)
                return list(out.images)
            finally:
                if adir is not None:
                    eject(unet)
                    modules = dict(unet.named_modules())
                    with torch.no_grad():
                        for name, params in snapshot.items():
                            for k, v in params.items():
                                getattr(modules[name], k).copy_(v)
