"""Stable Diffusion XL (StableDiffusionXLPipeline): two CLIP text encoders (the second with a projection, whose
pooled output conditions the UNet), the UNet's `text_time` added conditioning (pooled text embedding + the
micro-conditioning `add_time_ids` = original size, crop top-left, target size), epsilon prediction.

Its preset `tiny-sdxl` is SDXL's architecture in miniature with random weights (both encoders at width 32, a
`text_time` UNet with two transformer layers in its cross-attention block), built from configs into the cache
and loaded back through StableDiffusionXLPipeline.from_pretrained like any SDXL folder.

As diffusers' train_dreambooth_lora_sdxl.py: the prompt goes through the pipeline's own encode_prompt (the
penultimate hidden states of both encoders, concatenated; the second encoder's pooled projection) and the time
ids of a training image are (height, width, top, left, size, size): the image's size when it was cropped and the
crop's corner (our loaders resize the short side to the resolution first, as diffusers' train_resize does, so the
first pair is the resized size, not the file's), the training resolution as the target. Prompts alone (samples,
class images) get (size, size, 0, 0, size, size), as the pipeline's own defaults.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from training.common.models import write_tokenizer_files

from .base import Conditioning, Family


class SDXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    preset = "tiny-sdxl"
    tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    default_resolution = 1024
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    vae_in_fp32 = True   # train_dreambooth_lora_sdxl.py: "to avoid NaN losses" with fp16

    def build_preset(self, directory: Path) -> None:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        with tempfile.TemporaryDirectory() as tok_dir:
            vocab_size = write_tokenizer_files(Path(tok_dir))
            tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
            tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                    vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu",
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):   # leave the caller's RNG untouched
            torch.manual_seed(0)
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=64,
                # text_time: 6 time ids x 8 + the pooled projection's 32 (SDXL: 6 x 256 + 1280)
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
            torch.manual_seed(0)
            vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=64)
            torch.manual_seed(0)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text))
            torch.manual_seed(0)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32))
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        pipe.save_pretrained(directory)
        (directory / "README.md").write_text(
            "lowrank tiny-sdxl preset: SDXL's architecture in miniature, random weights, built from configs. For "
            "tests and demos of the training machinery; its images are noise.\n")

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], size: int) -> Conditioning:
        return self.encode_with_grad(pipe, prompts, size)

    def encode_with_grad(self, pipe, prompts: list[str], size: int) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.text_encoder.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=embeds.device)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": time_ids.expand(len(prompts), -1)}

    def image_conditioning(self, cond: Conditioning, crops: torch.Tensor, size: int | tuple[int, int]) -> Conditioning:
        """add_time_ids per image: (original height, width, crop top, left, target height, width); the target is
        the square `size`, or (height, width) of an aspect-ratio bucket."""
        target = torch.tensor(size if isinstance(size, tuple) else (size, size)).expand(len(crops), 2)
        time_ids = torch.cat([crops, target], dim=1).to(cond["time_ids"])
        return {**cond, "time_ids": time_ids}

    def denoise(self, unet, noisy, timesteps, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return unet(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]
