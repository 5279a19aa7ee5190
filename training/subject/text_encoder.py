"""--train_text_encoder: DreamBooth's adapter in the text encoder(s) too, as diffusers' train_dreambooth_lora.py and
train_dreambooth_lora_sdxl.py train theirs (a LoRA on CLIPAttention's q_proj, k_proj, v_proj, out_proj).

The loop (training/common/loop.py) trains one module: with the flag that is `TrainedParts`, a ModuleDict of the
denoiser and the family's text encoders, so the optimizer, gradient clipping, the methods' step hooks, the distance
probe (layer names 'unet.…', 'text_encoder.…'), DDP and the checkpoints' optimizer state take every part unchanged.
Its forward is one denoiser call whose conditioning is computed inside it (the batch's prompts encoded with
gradients), so one DDP forward covers both. Each part keeps its own adapter (the text encoders' at
--text_encoder_rank) in its own folder: a run's or checkpoint's adapter.safetensors stays the denoiser's (what eval,
the app and lowrank.load_adapter read), the text encoders' go to text_encoder/ and text_encoder_2/ beside it.
Without the flag none of this exists: the denoiser trains alone, exactly as before.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lowrank
from ground.runfolder import is_adapter_dir
from training.common import TrainingError
from training.common.checkpoint import check_resumed_adapter
from training.common.loop import TrainingRun

# CLIPAttention's projections: the text encoder targets of diffusers' DreamBooth LoRA scripts
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class TrainedParts(nn.ModuleDict):
    """The denoiser and the text encoders that train with it, keyed by their pipeline names ('unet', 'text_encoder',
    'text_encoder_2'). The modules are the pipeline's own: samples made through the pipeline see the adapters."""

    def __init__(self, family, pipe):
        super().__init__({family.denoiser_name: family.denoiser(pipe),
                          **{key: getattr(pipe, key) for key in family.text_encoder_parts}})
        self.family = family

    @property
    def denoiser(self) -> nn.Module:
        return self[self.family.denoiser_name]

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return {key: module for key, module in self.items() if key != self.family.denoiser_name}

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict | Callable[[], dict]) -> torch.Tensor:
        """The denoiser's prediction; `cond` is the conditioning or a function that encodes it (the text encoders'
        forward then runs inside this call)."""
        return self.family.denoise(self.denoiser, noisy, timesteps, cond() if callable(cond) else cond)


def text_encoder_config(run: TrainingRun) -> lowrank.AdapterConfig:
    """The denoiser's adapter (method and options) on TEXT_ENCODER_TARGETS at --text_encoder_rank (default --rank);
    alpha: --alpha when given, else the rank (scale 1, diffusers' lora_alpha = rank); nothing trained in full."""
    args, config = run.args, run.config
    return dataclasses.replace(config, target_modules=list(TEXT_ENCODER_TARGETS), modules_to_save=[],
                               rank=args.text_encoder_rank or config.rank,
                               alpha=config.alpha if "alpha" in run.spec.adapter_given else None)


def adapt_text_encoders(run: TrainingRun, parts: TrainedParts | None, family) -> dict | None:
    """Inject the adapter into each text encoder (after the denoiser's, so its random init is the same as without the
    flag), or, resuming, load the checkpoint's; trainable parameters in fp32; --gradient_checkpointing for them too.
    Returns run.json's "text_encoder" (what the model card says); without the flag (parts None) None, after checking
    that a resumed checkpoint has no text encoder adapter the run would drop."""
    if parts is None:
        refuse_dropped_text_encoders(run, family)
        return None
    config = text_encoder_config(run)
    names = {}
    for key, encoder in parts.text_encoders.items():
        if run.resume_dir:
            saved = run.resume_dir / key
            if not is_adapter_dir(saved):
                raise TrainingError(f"{run.resume_dir} has no {key}/ adapter (trained without --train_text_encoder); "
                                    f"resume it without --train_text_encoder")
            check_resumed_adapter(lowrank.read_adapter(saved)[0], config, saved)
            names[key] = lowrank.load_adapter(encoder, saved)
        else:
            names[key] = lowrank.inject(encoder, config)
        for p in encoder.parameters():   # as TrainingRun.adapt: trainable parameters in fp32
            if p.requires_grad:
                p.data = p.data.float()
        if run.args.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
    return {"parts": list(names), "rank": config.rank, "alpha": config.alpha,
            "learning_rate": run.args.text_encoder_lr or run.spec.learning_rate,
            "target_modules": list(config.target_modules), "adapted_layers": {k: len(v) for k, v in names.items()}}


def refuse_dropped_text_encoders(run: TrainingRun, family) -> None:
    """Resuming a run whose text encoders trained without --train_text_encoder would silently drop their adapters."""
    trained = [key for key in family.text_encoder_parts if run.resume_dir and is_adapter_dir(run.resume_dir / key)]
    if trained:
        raise TrainingError(f"{run.resume_dir} has a {trained[0]}/ adapter (trained with --train_text_encoder); "
                            f"resume it with --train_text_encoder and the same --text_encoder_rank")


def parameter_groups(parts: TrainedParts, lr: float, args) -> list[dict]:
    """The denoiser's AdamW groups (as a run without the flag), then each text encoder's at --text_encoder_lr
    (default: the denoiser's), named after the part ('text_encoder', 'text_encoder_lambda' …: metrics.jsonl logs
    lr_<name>)."""
    kw = dict(lambda_lr=args.lambda_learning_rate, weight_decay=args.adam_weight_decay)
    groups = lowrank.parameter_groups(parts.denoiser, lr=lr, **kw)
    for key, encoder in parts.text_encoders.items():
        groups += [{**g, "name": key if g["name"] == "adapter" else f"{key}_{g['name']}"}
                   for g in lowrank.parameter_groups(encoder, lr=args.text_encoder_lr or lr, **kw)]
    return groups


def save_parts(parts: TrainedParts, folder: Path) -> None:
    """The text encoders' adapters into folder/<part>/, then the denoiser's into folder (its usual place)."""
    for key, encoder in parts.text_encoders.items():
        lowrank.save_adapter(encoder, folder / key)
    lowrank.save_adapter(parts.denoiser, folder)
