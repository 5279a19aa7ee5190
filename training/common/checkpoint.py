"""Checkpoints: output_dir/checkpoint-{step}/ with the adapter, the accelerator state and extras.

    checkpoint-N/adapter_config.json, adapter.safetensors   the task's save (lowrank.save_adapter + extras)
    checkpoint-N/optimizer.bin, custom_checkpoint_0.pkl (lr scheduler), random_states_*.pkl   accelerator.save_state
    checkpoint-N/trainer_state.json                          global step, seed, method
    checkpoint-N/samples/                                    written by the task (at_checkpoint)

A checkpoint is built in checkpoint-N.tmp and renamed into place, so a kill at any moment leaves either
a complete checkpoint or a .tmp that resume ignores (and the next run deletes); what "complete" means
is ground.runfolder.is_complete_checkpoint, the one rule training, eval and the app share.

Resume order: the adapter is loaded into the plain, freshly loaded model before the optimizer exists
(lowrank.load_adapter injects it with the saved tensors instead of a random init, which would draw from
the RNG and so change everything after it). Then the optimizer is built and prepared, and
accelerator.load_state restores optimizer, scheduler and RNG states; the load hook leaves the model
alone because the adapter is already in place.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import lowrank
from ground import runfolder

from . import TrainingError
from .faults import fault_point


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """--resume_from_checkpoint -> a checkpoint folder, or None to start fresh ('latest' with none yet)."""
    if not value:
        return None
    if value == "latest":
        found = runfolder.list_checkpoints(output_dir)
        return found[-1][1] if found else None
    p = Path(value).expanduser()
    if not p.exists() and not p.is_absolute():
        p = Path(output_dir) / value
    if not runfolder.is_complete_checkpoint(p):
        raise TrainingError(f"--resume_from_checkpoint {value}: {p} is not a checkpoint folder (expected a complete "
                            f"checkpoint-N with {runfolder.TRAINER_STATE} and the adapter files); use 'latest' to "
                            f"pick the newest one")
    return p


def read_state(checkpoint: Path) -> dict:
    state = runfolder.read_json(checkpoint / runfolder.TRAINER_STATE)
    if not isinstance(state, dict) or "global_step" not in state:
        raise TrainingError(f"cannot read {checkpoint / runfolder.TRAINER_STATE}; resume from an earlier "
                            f"checkpoint with --resume_from_checkpoint DIR")
    return state


def load_accelerator_state(accelerator, checkpoint: Path) -> None:
    """Optimizer, scheduler and RNG state of a checkpoint (the adapter is loaded before, see above); a
    truncated or foreign optimizer.bin / random_states_*.pkl is one TrainingError, not a pickle traceback."""
    try:
        accelerator.load_state(str(checkpoint))
    except (KeyError, EOFError, RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise TrainingError(f"{checkpoint} is damaged ({type(e).__name__}: {str(e)[:120]}); resume from an "
                            f"earlier checkpoint with --resume_from_checkpoint DIR") from None


def register_adapter_hooks(accelerator, save) -> None:
    """accelerator.save_state writes the adapter through `save(model, folder)` instead of the full model
    weights; load_state leaves the model alone (the adapter was loaded before prepare, see above)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save(accelerator.unwrap_model(model), Path(output_dir))
        weights.clear()   # nothing else of the model is saved: base weights are the pretrained ones

    def load_hook(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, extras=None,
                    total_limit: int | None = None) -> Path:
    """Collective: every process must call it. Returns the final checkpoint folder."""
    out = Path(output_dir)
    final = runfolder.checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    index = accelerator.process_index
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            fault_point("checkpoint-before", step, index, str(tmp))
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))          # every process writes its RNG state; main the rest
        fault_point("checkpoint-between", step, index, str(tmp / runfolder.TRAINER_STATE))
        if accelerator.is_main_process:
            if extras is not None:
                extras(tmp)
            runfolder.write_json(tmp / runfolder.TRAINER_STATE, {"global_step": step, **state})
            fault_point("checkpoint-after", step, index, str(final))
            runfolder.replace_dir(tmp, final)     # e.g. re-running a step after resuming from an older checkpoint
            fault_point("checkpoint-renamed", step, index, str(final))
            if total_limit:
                for _, old in runfolder.list_checkpoints(out)[:-total_limit]:
                    runfolder.remove_dir(old)
    except OSError:   # e.g. a full disk: give the space of the partial checkpoint back; older ones are untouched
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def check_resumed_adapter(saved: lowrank.AdapterConfig, config: lowrank.AdapterConfig, folder: Path) -> None:
    """A checkpoint's adapter must be the one the flags describe: TrainingError naming the fields that differ."""
    if saved != config:
        diff = [f"{k}={v!r}" for k, v in saved.to_dict().items() if config.to_dict()[k] != v]
        raise TrainingError(f"{folder} was trained with {', '.join(diff)}; resume with the same adapter flags")
