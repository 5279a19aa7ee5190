"""Export a trained adapter for use elsewhere: the exact LoRA files of lowrank.export, or a merged pipeline.

    export_model(unet, run_dir, "diffusers")        # in memory, e.g. at the end of training
    export_run("runs/cat", "out/cat", "kohya")      # a run folder on disk: training.exporting (it picks the
                                                    # diffusion exporter, training.images.export, or the language one)
    python -m training.export runs/cat --format pipeline --output out/cat-pipeline

Why here and not in lowrank: the factors of ETHER (H W − W) and DeLoRA (‖W̄‖) depend on the pretrained
weights W0, so exporting a saved adapter means loading the base model, which takes diffusers; lowrank stays
torch-only. The base is the run's own (run.json's args.pretrained_model_name_or_path / revision) unless
`pipeline` names another.

Formats: diffusers, kohya, peft (lowrank.export: exact LoRA files) and pipeline: a complete diffusers
pipeline folder with the adapter merged into the UNet (lowrank.eject(merge=True): every method, DoRA
included), for StableDiffusionPipeline.from_pretrained(dir). GLUE and instruction runs: peft, and merged
(a transformers model folder with the adapter merged in, for AutoModelFor....from_pretrained(dir)).
The CLI writes into a temporary folder beside the output and renames it into place, so an interrupted
export never leaves a half-written folder.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import lowrank
from ground.runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EMA_DIR, RUN_JSON, is_adapter_dir, public_dir
from lowrank.export import FORMATS as FILE_FORMATS

from . import TrainingError
from .tracking import logger

FORMATS = (*FILE_FORMATS, "pipeline", "merged")   # diffusers, kohya, peft + pipeline (SD), merged (language)
MERGED_FORMATS = ("pipeline", "merged")   # whole model folders: written into a new or empty folder


class ExportInputError(TrainingError, ValueError):
    """Bad input to an export (not an adapter folder, unknown format, output in the way): one line, exit 2."""


def run_candidates(adapter_dir: Path) -> list[Path]:
    """Where an adapter folder's run.json may be: the folder itself (a run's final adapter), its parent (a
    checkpoint-N, RUN/ema) and, for a moving average (--ema_decay), its grandparent (RUN/checkpoint-N/ema)."""
    return [adapter_dir, adapter_dir.parent] + ([adapter_dir.parent.parent] if adapter_dir.name == EMA_DIR else [])


def run_json(adapter_dir: Path) -> dict | None:
    """run.json of the run an adapter folder belongs to (see `run_candidates`)."""
    for d in run_candidates(adapter_dir):
        f = d / RUN_JSON
        if f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ExportInputError(f"cannot read {f}: {e}") from None
    return None


def base_model(adapter_dir: Path, pipeline: str | None) -> tuple[str | None, str | None]:
    """(name or path, revision) of the base pipeline: `pipeline` if given, else the run's base model."""
    if pipeline:
        return pipeline, None
    info = run_json(adapter_dir)
    if info is None:
        raise ExportInputError(f"{adapter_dir} has no run.json (nor its parent), so its base model is unknown; "
                               f"pass --pipeline BASE (a hub name, a local pipeline folder or 'tiny')")
    args = info.get("args", {})
    return args.get("pretrained_model_name_or_path"), args.get("revision")


def _check(format: str) -> None:
    if format not in FORMATS:
        raise ExportInputError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")


def _check_output(output: Path, format: str) -> None:
    if output.exists() and not output.is_dir():
        raise ExportInputError(f"--output {output} is a file; give a folder (it is created if missing)")
    if format in MERGED_FORMATS and output.is_dir() and any(output.iterdir()):
        raise ExportInputError(f"--output {output} is a folder that is not empty; a merged model needs a new "
                               f"or empty folder (stale files would mix with the new model)")


def save_merged_pipeline(pipe, model, directory: Path, component: str = "unet") -> None:
    """pipe's components with `model` (adapters merged in and ejected) as its `component` (the UNet, a DiT's
    transformer), saved by save_pretrained."""
    lowrank.eject(model, merge=True)   # W_eff into the base weights (DoRA too), plain diffusers modules back
    original = getattr(pipe, component)
    setattr(pipe, component, model)
    try:
        pipe.save_pretrained(directory, safe_serialization=True)
    finally:
        setattr(pipe, component, original)


def export_model(unet, output: str | os.PathLike, format: str = "diffusers", pipeline=None,
                 consume: bool = False, name: str | None = None, component: str = "unet",
                 base_model: str | None = None) -> Path:
    """Export the adapters injected in `unet` (in memory; a DiT family's transformer with component="transformer").
    Returns the written file (or pipeline folder).

    diffusers / kohya / peft: lowrank.export into `output` (created if missing; each file written atomically,
    other files in the folder left alone: a run folder can hold pytorch_lora_weights.safetensors beside its
    own adapter, and pipe.load_lora_weights(run_folder) picks it). pipeline: `pipeline` is the loaded
    StableDiffusionPipeline the UNet belongs to (its other components are saved as they are); the UNet is
    merged in a deep copy unless consume=True (then `unet` loses its adapters). `unet` must be unwrapped
    (accelerator.unwrap_model) and unmerged. Raises lowrank.AdapterError (e.g. ExportError) or
    ExportInputError with one-line messages.
    """
    _check(format)
    output = Path(output)
    _check_output(output, "file" if format != "pipeline" else format)
    if format != "pipeline":
        return lowrank.export(unet, output, format, component=component, name=name, base_model=base_model)
    if pipeline is None:
        raise ExportInputError("format 'pipeline' needs the pipeline the UNet belongs to (pipeline=...)")
    model = unet if consume else copy.deepcopy(unet)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        save_merged_pipeline(pipeline, model, tmp, component)
        move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def move_into_place(tmp: Path, output: Path) -> None:
    """tmp -> output: one rename when output is missing or empty; else each file replaced atomically."""
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        os.rename(public_dir(tmp), output)   # mkdtemp made it 0700: readable by this user only
        return
    for f in tmp.iterdir():
        os.replace(f, output / f.name)


def check_source(run_or_adapter_dir: str | os.PathLike, output: str | os.PathLike, format: str) -> tuple[Path, Path]:
    """(source, output) as paths, or ExportInputError: the format is known, the source holds an adapter, the
    output can take it."""
    _check(format)
    src, output = Path(run_or_adapter_dir).expanduser(), Path(output).expanduser()
    if not src.is_dir() or not is_adapter_dir(src):
        raise ExportInputError(f"{src} is not a run or adapter folder (expected {ADAPTER_CONFIG} and "
                               f"{ADAPTER_WEIGHTS}; a run folder holds its final adapter at the top)")
    _check_output(output, format)
    if output.resolve() == src.resolve() and format in MERGED_FORMATS:
        raise ExportInputError(f"--output must not be the adapter folder itself for format {format!r}")
    return src, output


def run_folder(adapter_dir: Path) -> Path:
    """The run folder an adapter belongs to (see `run_candidates`): where run.json is."""
    return next((d for d in run_candidates(adapter_dir) if (d / RUN_JSON).is_file()), adapter_dir)


def export_diffusers(unet, output_dir: str | os.PathLike, component: str = "unet") -> Path | None:
    """The trainers' end-of-run export: output_dir/pytorch_lora_weights.safetensors beside the run's own
    adapter, so pipe.load_lora_weights(output_dir) works on a run folder. A method the format cannot hold
    is a warning, not a failure: the run itself is done and its own adapter saved."""
    try:
        return export_model(unet, output_dir, "diffusers", component=component)
    except lowrank.AdapterError as e:
        logger.warning("no diffusers file written: %s", e)
        return None
