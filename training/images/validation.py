"""The image trainers' validation loss (--validation_loss_images N): the last N training images (DreamBooth's
instance images, the semantic map's image/map pairs) are held out of training, and at every checkpoint step and
the last step their denoising loss at fixed noise and fixed points of the schedule goes into that step's
metrics.jsonl row as `val_loss`; the base model's, measured before the adapter exists, into run.json
(`validation_loss`). The loss itself is the objective's (training.images.diffusion: validation_loss).

Class images (prior preservation) are not a held-out set: they train, in the prior half of every batch.

    train, held = hold_out(images, args.validation_loss_images, "instance images")   # before the run folder
    class DreamBooth(HeldOutImages, Task): ...   # sets held_out, defines validation_loss(model) with held_out_loss
    info["validation_loss"] = task.base_validation(model)   # before run.adapt: the base model's value
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from training.common import TrainingError
from training.common.task import VAL_LOSS


def hold_out(items: list, n: int, what: str) -> tuple[list, list]:
    """(training items, held-out items): the last `n` of `items` are held out; one at least must train."""
    if n and n > len(items) - 1:
        raise TrainingError(f"--validation_loss_images {n}: the data has {len(items)} {what}; hold out at most "
                            f"{len(items) - 1} (one at least must train)")
    return (list(items[:-n]), list(items[-n:])) if n else (list(items), [])


def held_out_loss(objective, model: torch.nn.Module, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  pixels: torch.Tensor, args, autocast) -> float:
    """The objective's validation loss of `model` (called through `denoise`) on `pixels`, with the model in eval
    mode (its mode restored after), no grad, under the run's autocast; the training RNGs are not touched."""
    was_training = model.training
    model.eval()
    try:
        with autocast():
            return objective.validation_loss(denoise, pixels, args.validation_loss_seed,
                                             args.validation_loss_timesteps)
    finally:
        model.train(was_training)


class HeldOutImages:
    """The validation loss's part of an image task (training.common.task.Task): `held_out` is its held-out batch
    (None without --validation_loss_images), `validation_loss(model)` measures it."""

    held_out = None
    run = args = objective = None

    def validation_loss(self, model: torch.nn.Module) -> float:
        raise NotImplementedError

    def at_checkpoint_step(self, step: int) -> dict | None:
        return {VAL_LOSS: self.validation_loss(self.run.model)} if self.held_out else None

    def base_validation(self, model: torch.nn.Module) -> dict | None:
        """run.json's `validation_loss`: what is measured, and the base model's value (measured on the main process;
        call it before the adapter exists, when every method has the same model)."""
        if not self.held_out:
            return None
        a = self.args
        return {"held_out_images": a.validation_loss_images, "seed": a.validation_loss_seed,
                "timesteps": self.objective.validation_timesteps(a.validation_loss_timesteps),
                "base_model": self.validation_loss(model) if self.run.is_main else None}
