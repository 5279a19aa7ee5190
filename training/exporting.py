"""Export any run folder (or a checkpoint-N / adapter folder in one): the task recorded in its run.json picks the
exporter, diffusion runs through training.images.export, language runs through training.text.export. The CLI
(`python -m training.export`) and the app's Generate tab both come here.
"""
from __future__ import annotations

import os
from pathlib import Path

from training.common.export import check_source, run_json
from training.common.tasks import task_of
from training.images.export import export_image_run
from training.text.export import export_language_run


def export_run(run_or_adapter_dir: str | os.PathLike, output: str | os.PathLike, format: str = "diffusers",
               pipeline: str | None = None) -> Path:
    """Export a saved adapter into `output` in `format`; `pipeline` names another base model than the run's.
    Returns the written file (or folder); ExportInputError / lowrank.AdapterError with one-line messages."""
    src, output = check_source(run_or_adapter_dir, output, format)
    info = run_json(src) or {}
    task = task_of(info)
    if task is not None and task.kind == "text":
        return export_language_run(src, output, format, task, info, model=pipeline)
    return export_image_run(src, output, format, pipeline)
