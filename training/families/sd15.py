"""Stable Diffusion 1.x / 2.x (StableDiffusionPipeline): one CLIP text encoder, a UNet with cross-attention, epsilon-
or v-prediction. Its preset `tiny` (also no name at all) is training.common.models' tiny SD with random weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from training.common.models import TINY, build_tiny, is_tiny, tiny_path

from .base import Conditioning, Family


class SD15(Family):
    name = "sd15"
    pipeline_classes = ("StableDiffusionPipeline",)
    preset = TINY
    tags = ("stable-diffusion", "stable-diffusion-diffusers")
    text_encoder_parts = ("text_encoder",)

    def is_preset(self, name_or_path: str | None) -> bool:
        return is_tiny(name_or_path)   # no name at all means the preset too (the trainers' default)

    def build_preset(self, directory: Path) -> None:
        build_tiny(directory)

    def preset_path(self) -> Path:
        return tiny_path()

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], size: int) -> Conditioning:
        return self.encode_with_grad(pipe, prompts, size)

    def encode_with_grad(self, pipe, prompts: list[str], size: int) -> Conditioning:
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
        return {"encoder_hidden_states": pipe.text_encoder(ids)[0]}

    def denoise(self, unet, noisy, timesteps, cond: Conditioning) -> torch.Tensor:
        return unet(noisy, timesteps, cond["encoder_hidden_states"], return_dict=False)[0]

    def new_pipeline(self, components: dict, scheduler, **config):
        comps = dict(components)
        comps.setdefault("safety_checker", None)
        comps.setdefault("feature_extractor", None)
        if comps["safety_checker"] is None:   # no checker: the pipeline must not ask for one
            config["requires_safety_checker"] = False
        return super().new_pipeline(comps, scheduler, **config)
