"""Per-step protocol driver: the trainer's only contact with methods that act during training.

    hooks = step_hooks(model)
    loss = task_loss + hooks.extra_loss()     # e.g. dynamic-rank DoRA's DEM regulariser
    loss.backward(); optimizer.step()
    hooks.after_optimizer_step(step)          # e.g. Delta-LoRA's W update, rank pruning

Methods without hooks cost nothing here, so trainers call both unconditionally.
"""
from __future__ import annotations

import torch
from torch import nn

from .inject import adapter_layers
from .layer import AdapterLayer


class StepHooks:
    def __init__(self, model: nn.Module):
        self.layers = adapter_layers(model)
        groups: dict[type, list[AdapterLayer]] = {}
        for layer in self.layers.values():
            groups.setdefault(type(layer), []).append(layer)
        self.groups = groups
        # only classes that override a hook are called at all
        self._loss_groups = {cls: ls for cls, ls in groups.items()
                             if cls.extra_loss is not AdapterLayer.extra_loss
                             or cls.extra_loss_all.__func__ is not AdapterLayer.extra_loss_all.__func__}
        step_all = AdapterLayer.after_optimizer_step_all.__func__
        self._step_groups = {cls: ls for cls, ls in groups.items()
                             if cls.after_optimizer_step is not AdapterLayer.after_optimizer_step
                             or cls.after_optimizer_step_all.__func__ is not step_all}

    @property
    def active(self) -> bool:
        return bool(self._loss_groups or self._step_groups)

    def extra_loss(self) -> torch.Tensor | float:
        """Sum of the methods' regularisers (0.0 when no method defines one)."""
        terms = [t for t in (cls.extra_loss_all(ls) for cls, ls in self._loss_groups.items()) if t is not None]
        return torch.stack(terms).sum() if terms else 0.0

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Call after optimizer.step() with the number of optimizer steps taken so far (1, 2, ...)."""
        for cls, layers in self._step_groups.items():
            cls.after_optimizer_step_all(layers, step)


def step_hooks(model: nn.Module) -> StepHooks:
    return StepHooks(model)
