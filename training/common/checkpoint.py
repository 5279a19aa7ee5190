"""Checkpoints: output_dir/checkpoint-{step}/ with the adapter, the accelerator state and extras.

    checkpoint-N/adapter_config.json, adapter.safetensors   lowrank.save_adapter (via a save-state hook)
    checkpoint-N/optimizer.bin, custom_checkpoint_0.pkl (lr scheduler), random_states_*.pkl   accelerator.save_state
    checkpoint-N/trainer_state.json                          global step, seed, method
    checkpoint-N/samples/                                    written by the trainer (extras callback)

A checkpoint is built in checkpoint-N.tmp and renamed into place, so a kill at any moment leaves either
a complete checkpoint or a .tmp that resume ignores (and the next run deletes).

Resume order (what makes it exact): the adapter is loaded with lowrank.load_adapter into the *plain*
freshly loaded model, which injects it with the saved tensors before any initial fold into the base
weight (DeLoRA's subtract init) happens, so base weights are bit-identical to the original run's.
Only then are the optimizer built, prepared, and accelerator.load_state restores optimizer, scheduler
and RNG states; the load hook skips model weights because the adapter is already in place.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import lowrank

from . import TrainingError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"   # what lowrank.save_adapter writes (with adapter.safetensors)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """--resume_from_checkpoint -> a checkpoint folder, or None to start fresh ('latest' with none yet)."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    p = Path(value).expanduser()
    if not p.exists() and not p.is_absolute():
        p = Path(output_dir) / value
    if not (p / STATE_NAME).is_file() or not (p / ADAPTER_CONFIG).is_file():
        raise TrainingError(f"--resume_from_checkpoint {value}: {p} is not a checkpoint folder (expected "
                            f"checkpoint-N with {STATE_NAME}); use 'latest' to pick the newest one")
    return p


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"cannot read {checkpoint / STATE_NAME}: {e}") from None


def load_accelerator_state(accelerator, checkpoint: Path) -> None:
    """Optimizer, scheduler and RNG state of a checkpoint (the adapter is loaded before, see above); a
    truncated or foreign optimizer.bin / random_states_*.pkl is one TrainingError, not a pickle traceback."""
    try:
        accelerator.load_state(str(checkpoint))
    except (KeyError, EOFError, RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise TrainingError(f"{checkpoint} is damaged ({type(e).__name__}: {str(e)[:120]}); resume from an "
                            f"earlier checkpoint with --resume_from_checkpoint DIR") from None


def remove_stale(output_dir: str | Path) -> None:
    """Delete leftovers of a killed run: half-written checkpoint-N.tmp and half-deleted *.old folders."""
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name.endswith((".tmp", ".old")):
                shutil.rmtree(p, ignore_errors=True)


def _delete(path: Path) -> None:
    """Rename first, so a kill mid-delete never leaves a half checkpoint under a valid name."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    shutil.rmtree(old, ignore_errors=True)


def register_adapter_hooks(accelerator) -> None:
    """accelerator.save_state writes the adapter (lowrank format) instead of the full UNet weights;
    load_state leaves the model alone (the adapter was loaded before prepare, see the module doc)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                lowrank.save_adapter(accelerator.unwrap_model(model), output_dir)
        weights.clear()   # nothing else of the model is saved: base weights are the pretrained ones

    def load_hook(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, extras=None,
                    total_limit: int | None = None) -> Path:
    """Collective: every process must call it. Returns the final checkpoint folder."""
    out = Path(output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))          # every process writes its RNG state; main the rest
    if accelerator.is_main_process:
        if extras is not None:
            extras(tmp)
        write_json_atomic(tmp / STATE_NAME, {"global_step": step, **state})
        if final.exists():                    # e.g. re-running a step after resuming from an older checkpoint
            _delete(final)
        os.rename(tmp, final)
        if total_limit:
            for _, old in list_checkpoints(out)[:-total_limit]:
                _delete(old)
    accelerator.wait_for_everyone()
    return final
