"""An exponential moving average of an adapter's trained tensors (--ema_decay, --ema_start_step).

The average covers what lowrank.save_adapter writes (adapter layers' tensors and the modules trained in full)
plus any other parameter the model trains (the semantic map's conditioning encoder), kept in fp32 on the
tensors' devices: trained parameters are averaged, everything else (buffers, frozen parameters) is copied.
Swapped in, the average is put back inside its method's constraints (AdapterLayer.constrain_average: dynamic-rank
DoRA's pruned components are zero in it, as in the weights).
Until `start_step` the average equals the current weights. `swapped()` puts the average into the model for
sampling or saving and restores the training weights bit for bit, so training never sees it.

`RunAverage` is what the training loop (training/common/loop.py) calls, a no-op without --ema_decay:

    update(step)                     after every optimizer step (after the methods' own step hooks)
    at_checkpoint(folder, step, ..)  checkpoint-N/ema/ (the task's save of the average, + samples/) and
                                     checkpoint-N/ema_state.safetensors (the fp32 average, for resume)
    finish(output_dir, step, ..)     output_dir/ema/ (+ samples/)
A resumed run loads the checkpoint's state, so its average is bit-identical to the uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ground.runfolder import EMA_DIR, EMA_STATE, SAMPLES, atomic_write
from lowrank.inject import adapter_layers, saved_modules
from lowrank.io import FULL_PREFIX, model_config, save_adapter

from . import TrainingError
from .tracking import logger


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's saved adapter tensors (save_adapter's keys), as the live parameters and buffers, and every
    other parameter it trains (under its parameter name)."""
    live = {f"{name}.{k}": v for name, layer in adapter_layers(model).items()
            for k, v in layer.state_dict(keep_vars=True).items() if not k.startswith("base.")}
    for name, module in saved_modules(model, model_config(model)).items():
        live.update({f"{FULL_PREFIX}{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    seen = {id(v) for v in live.values()}
    live.update({name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in seen})
    return live


class AdapterEMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay, self.start_step = model, float(decay), int(start_step)
        self.live = live_tensors(model)
        self.trained = {k for k, v in self.live.items() if isinstance(v, nn.Parameter) and v.requires_grad}
        self.shadow = {k: v.detach().float().clone() for k, v in self.live.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based): average from start_step on, else copy the weights."""
        for k, v in self.live.items():
            if k in self.trained and step > self.start_step:
                self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
            else:
                self.shadow[k].copy_(v.detach())

    @contextlib.contextmanager
    def swapped(self):
        """Within the block the model holds the average (cast to each tensor's dtype); restored exactly after."""
        backup = {k: v.detach().clone() for k, v in self.live.items()}
        try:
            with torch.no_grad():
                for k, v in self.live.items():
                    v.copy_(self.shadow[k])
            for layer in adapter_layers(self.model).values():   # the method's constraints (dynamic rank's masks)
                layer.constrain_average()
            yield self.model
        finally:
            with torch.no_grad():
                for k, v in self.live.items():
                    v.copy_(backup[k])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the average as its own adapter folder (atomic, loadable with lowrank.load_adapter)."""
        with self.swapped():
            return save_adapter(self.model, directory)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match the model's adapter tensors")
        with torch.no_grad():
            for k, v in state.items():
                self.shadow[k].copy_(v)


class RunAverage:
    """A run's EMA as the training loop uses it (see the module docstring); every call is a no-op when
    `args.ema_decay` is None. `task.save` writes the average (so the semantic map's encoder goes with it) and
    `task.samples` draws it, both inside `swapped()`."""

    def __init__(self, model: nn.Module, task, args, resume_dir: Path | None = None):
        decay = getattr(args, "ema_decay", None)
        self.task = task
        self.ema = AdapterEMA(model, decay, getattr(args, "ema_start_step", 0)) if decay is not None else None
        if self.ema is not None and resume_dir is not None:
            self.restore(Path(resume_dir))

    def update(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(step)

    def write(self, folder: Path, step: int, samples: bool, tag: str) -> None:
        """folder/ema/: the average as the task saves an adapter, with its samples in folder/ema/samples."""
        with self.ema.swapped():
            self.task.save(self.ema.model, folder / EMA_DIR)
            if samples:
                self.task.samples(step, folder / EMA_DIR / SAMPLES, tag=tag)

    def at_checkpoint(self, folder: Path, step: int, samples: bool = True) -> None:
        """Main process, inside checkpoint-N.tmp: ema/ and the state a resumed run continues from."""
        if self.ema is None:
            return
        self.write(folder, step, samples, tag="ema")
        meta = {"decay": repr(self.ema.decay), "start_step": str(self.ema.start_step), "step": str(step)}
        state = self.ema.state_dict()
        atomic_write(folder / EMA_STATE, lambda p: save_file(state, str(p), metadata=meta))

    def finish(self, output_dir: Path, step: int, samples: bool = True) -> None:
        if self.ema is not None:
            self.write(output_dir, step, samples, tag="ema_final")

    def restore(self, checkpoint: Path) -> None:
        """The checkpoint's average; a checkpoint of a run without --ema_decay starts it from the resumed weights."""
        path = checkpoint / EMA_STATE
        if not path.is_file():
            logger.warning("%s holds no moving average (trained without --ema_decay): it starts from the resumed "
                           "weights", checkpoint)
            return
        try:
            with safe_open(str(path), "pt") as f:   # one read: the tensors and the settings they were kept with
                state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
            self.ema.load_state_dict(state)
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise TrainingError(f"cannot restore the moving average from {path} ({type(e).__name__}: {str(e)[:120]}); "
                                f"resume with the adapter flags it was trained with, or from an earlier checkpoint "
                                f"with --resume_from_checkpoint DIR") from None
        saved = (meta.get("decay"), meta.get("start_step"))
        if saved != (repr(self.ema.decay), str(self.ema.start_step)):   # allowed, but no longer one run's average
            logger.warning("%s's moving average was kept with --ema_decay %s --ema_start_step %s; it continues with "
                           "--ema_decay %s --ema_start_step %s, so it is not the average of an uninterrupted run",
                           checkpoint.name, *saved, repr(self.ema.decay), self.ema.start_step)
