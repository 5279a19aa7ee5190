"""Export a diffusion run (DreamBooth, semantic map; any model family): its base pipeline, loaded through
training.families, with the adapter in its UNet, as the exact files of lowrank.export or a merged pipeline
(training.exporting.export_run picks this for a run whose task is an image task)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lowrank
from training.common.export import ExportInputError, base_model, export_model, move_into_place, run_folder
from training.common.model_card import write_model_card
from training.families import Family, load_family


def export_image_run(src: Path, output: Path, format: str, pipeline: str | None = None) -> Path:
    """Export a saved adapter of a diffusion run (a run folder, a checkpoint-N folder or any lowrank adapter
    folder; `check_source` first).

    Loads the base pipeline (`pipeline`, default: the run's base model from run.json), loads the adapter into
    its UNet and exports it; the output appears complete or not at all (written into a temporary folder
    beside it, then renamed). Returns the written file (pipeline: the folder)."""
    if format == "merged":
        raise ExportInputError("--format merged writes a transformers model (GLUE and instruction runs); a Stable "
                               "Diffusion run merges into a diffusers pipeline with --format pipeline")
    name, revision = base_model(src, pipeline)
    family, pipe = load_family(name, revision=revision)   # as saved: a merged pipeline keeps every component
    model, component = family.denoiser(pipe), family.denoiser_name
    lowrank.load_adapter(model, src)
    card = {"run_dir": run_folder(src), "export_format": format, "adapter_dir": src, "name": output.resolve().name,
            "base": name}
    if format == "pipeline":
        written = export_model(model, output, format, pipeline=pipe, consume=True, component=component)
        write_model_card(output, **card)   # README.md beside the pipeline's model_index.json
        return written
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:   # kohya names its file after the final folder, not the temporary one
        # a peft config names its base: the hub name, or the local folder of a preset or a path
        base = family.local_folder(name) if _is_local(name, family) else name
        written = export_model(model, tmp, format, name=output.resolve().name, component=component, base_model=base)
        write_model_card(tmp, file=written.name, **card)
        move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output / written.name


def _is_local(name: str | None, family: Family) -> bool:
    return family.is_preset(name) or Path(str(name)).expanduser().is_dir()
