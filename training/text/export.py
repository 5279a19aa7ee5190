"""Export a language run (GLUE, instruction tuning): peft files for its transformers model, or the model with the
adapter merged in (training.exporting.export_run picks this for a run whose task is a text task)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lowrank
from training.common.export import ExportInputError, move_into_place, run_folder
from training.common.model_card import write_model_card
from training.common.tasks import TaskInfo

from .glue_data import TASKS
from .language import MINILM, load_language_model, resolve_model
from .tweet_data import TWEET_TASKS


def export_language_run(src: Path, output: Path, format: str, task: TaskInfo, info: dict,
                        model: str | None = None) -> Path:
    """A GLUE or instruction run: its base transformers model (run.json's, or `model`) with the adapter loaded.
    peft: exported by lowrank.export with the head trained in full as peft's modules_to_save, so
    PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=...), DIR)
    gives the trained model's logits. merged: W_eff merged into the base weights (lowrank.eject(merge=True),
    every method), the trained head in place, saved with the tokenizer by save_pretrained: a plain transformers
    folder for AutoModelForSequenceClassification / AutoModelForCausalLM.from_pretrained(DIR)."""
    if format not in ("peft", "merged"):
        raise ExportInputError(f"a {task.name} run exports as --format peft (a transformers model with a peft "
                               f"adapter) or merged (a transformers model folder); {format!r} is for diffusion runs")
    args = info.get("args", {})
    kind, extra = task.head, {}
    # each trainer's default model when the run was given none (glue.py: MiniLM, instruct.py: the tiny LLaMA)
    name = model or args.get("model_name_or_path") or (MINILM if kind == "classification" else "tiny-llama")
    if kind == "classification":
        glue_task = {**TASKS, **TWEET_TASKS}.get(info.get("glue_task") or args.get("task_name") or "sst2")
        if glue_task is None:
            raise ExportInputError(f"{src}: run.json names an unknown GLUE task {info.get('glue_task')!r}")
        extra["num_labels"] = glue_task.num_labels
    base, tokenizer = load_language_model(name, kind, revision=args.get("revision"), **extra)
    lowrank.load_adapter(base, src)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        if format == "merged":
            lowrank.eject(base, merge=True)
            base.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            written = output
        else:
            # the config names its base as transformers loads it: a hub name, or a preset's / a path's folder
            written = output / lowrank.export(base, tmp, "peft", base_model=resolve_model(name, name)).name
        write_model_card(tmp, run_folder(src), format, written.name, adapter_dir=src, name=output.resolve().name)
        move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
