"""An exponential moving average of an adapter's trained tensors (the building block of --ema_decay).

The average covers exactly what lowrank.save_adapter writes (adapter layers' tensors and the modules trained
in full), kept in fp32 on the tensors' devices: trained parameters are averaged, everything else (buffers,
frozen parameters) is copied. Before `start_step` the average equals the current weights. `swapped()` puts
the average into the model for sampling or saving and restores the training weights bit for bit.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from lowrank.inject import adapter_layers, saved_modules
from lowrank.io import FULL_PREFIX, model_config, save_adapter


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's saved adapter tensors (save_adapter's keys), as the live parameters and buffers."""
    live = {f"{name}.{k}": v for name, layer in adapter_layers(model).items()
            for k, v in layer.state_dict(keep_vars=True).items() if not k.startswith("base.")}
    for name, module in saved_modules(model, model_config(model)).items():
        live.update({f"{FULL_PREFIX}{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
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
