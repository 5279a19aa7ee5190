"""What a trainer plugs into the shared loop (training/common/loop.py): its loss, and hooks with defaults for
saving, loading, samples, checkpoints, validation, epoch ends and the end of the run."""
from __future__ import annotations

from pathlib import Path

import torch

import lowrank
from ground import runfolder

# metrics.jsonl's key of a held-out loss, logged by every trainer that has one (the image trainers' denoising loss
# on held-out images, GLUE's loss on its tuning half) at the steps it measures it; eval.best: lowest is best
VAL_LOSS = "val_loss"


class Task:
    """A trainer's part of the loop. `loss` is required; every other hook has a default."""

    run = None     # the loop.TrainingRun the task belongs to (the trainers set it in __init__)
    outputs = ""   # its own files in the run folder, comma-separated, for the run's last line (those that exist)
    fig3_pattern: str | None = None   # the layer the distance curve follows (a model family's; None: DeLoRA Fig. 3's)

    def loss(self, model: torch.nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
        """The training loss of one micro-batch. `model` is the prepared (DDP-wrapped) model: call it, so
        gradients synchronise; draw all randomness from `generator` (seeded per step and micro-batch)."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, lr: float, args) -> list[dict]:
        """AdamW groups: the adapter's (λ in its own group); a trainer adds modules it trains in full."""
        return lowrank.parameter_groups(model, lr=lr, lambda_lr=args.lambda_learning_rate,
                                        weight_decay=args.adam_weight_decay)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Everything a checkpoint or the final output needs to rebuild the trained model."""
        lowrank.save_adapter(model, folder)

    def load(self, model: torch.nn.Module, folder: Path) -> list[str]:
        """Rebuild a saved state into the freshly loaded plain model (before the optimizer exists)."""
        return lowrank.load_adapter(model, folder)

    def samples(self, step: int, folder: Path, tag: str = "validation") -> None:
        """Fixed-seed samples of the model as it is now, written into `folder` (image tasks)."""

    def at_checkpoint(self, folder: Path, step: int) -> None:
        """Main process, inside checkpoint-N.tmp before it is renamed: samples into folder/samples."""
        self.samples(step, folder / runfolder.SAMPLES)

    def at_validation(self, step: int) -> None:
        """Main process, every --validation_steps that is not a checkpoint step."""
        self.samples(step, self.run.output_dir / "validation" / f"step-{step}")

    def at_checkpoint_step(self, step: int) -> dict | None:
        """Main process, at every checkpoint step and the last step, before the step's metrics row is written: a
        returned dict joins the row (the image trainers' held-out val_loss)."""
        return None

    def at_epoch_end(self, epoch: int, step: int) -> dict | None:
        """Every process, after an epoch's last step; a returned dict is logged (e.g. a dev-set score)."""
        return None

    def finish(self, output_dir: Path, step: int) -> None:
        """Main process, after the final adapter is saved: final samples, reports."""
