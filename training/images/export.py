"""Export a diffusion run (DreamBooth, semantic map; any model family): its base pipeline, loaded through
training.families, with the adapter in its UNet, as the exact files of lowrank.export or a merged pipeline
(training.exporting.export_run picks this for a run whose task is an image task)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lowrank
from ground.runfolder import is_adapter_dir
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
    # the denoiser's adapter, and the text encoders' of a run trained with --train_text_encoder (src/text_encoder/)
    parts = load_parts(family, pipe, src)
    component = family.denoiser_name
    model = parts.pop(component)
    card = {"run_dir": run_folder(src), "export_format": format, "adapter_dir": src, "name": output.resolve().name,
            "base": name}
    if format == "pipeline":
        for encoder in parts.values():   # merged into the pipeline's own text encoders, saved with it
            lowrank.eject(encoder, merge=True)
        written = export_model(model, output, format, pipeline=pipe, consume=True, component=component)
        write_model_card(output, **card)   # README.md beside the pipeline's model_index.json
        return written
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:   # kohya names its file after the final folder, not the temporary one
        # a peft config names its base: the hub name, or the local folder of a preset or a path
        base = family.local_folder(name) if _is_local(name, family) else name
        # diffusers, kohya, diff: one file with every part's keys; peft: one model a folder, text encoders in <part>/
        together = {component: model, **parts} if parts and format != "peft" else model
        written = export_model(together, tmp, format, name=output.resolve().name, component=component,
                               base_model=base)
        for key, encoder in parts.items() if format == "peft" else ():
            export_model(encoder, tmp / key, format, component=key, base_model=base)
        write_model_card(tmp, file=written.name, **card)
        move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output / written.name


def load_parts(family: Family, pipe, folder: Path) -> dict:
    """{part: module} of the pipeline parts with a saved adapter in a run or checkpoint folder, those adapters loaded:
    the denoiser's (folder itself), then the text encoders' (folder/<part>/, when the run trained them)."""
    parts = {family.denoiser_name: family.denoiser(pipe)}
    lowrank.load_adapter(parts[family.denoiser_name], folder)
    for key in family.text_encoder_parts:
        if is_adapter_dir(folder / key):
            parts[key] = getattr(pipe, key)
            lowrank.load_adapter(parts[key], folder / key)
    return parts


def _is_local(name: str | None, family: Family) -> bool:
    return family.is_preset(name) or Path(str(name)).expanduser().is_dir()
