"""FLUX.2-klein (Flux2KleinPipeline): a rectified-flow DiT (Flux2Transformer2DModel: double-stream blocks, then
single-stream blocks with a fused qkv+MLP projection), conditioned on a Qwen3 causal LM's hidden states, with
AutoencoderKLFlux2 latents that are patchified 2x2 and batch-normalised by the VAE's running statistics.

As diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py does it, with two deliberate differences:

- The prompt goes through the pipeline's own encode_prompt: Qwen3's chat template (user turn, generation prompt,
  thinking off), padded to 512 tokens, hidden states of layers (9, 18, 27) side by side, as Flux2KleinPipeline
  samples. The training script defaults to --text_encoder_out_layers 10 20 30 (huggingface/diffusers#13445):
  training on other layers than the pipeline samples with would condition the adapter on features it never sees at
  inference, so this family follows the pipeline, and training and sampling agree.
- Latents: vae.encode(pixels).latent_dist.mode() -> _patchify_latents -> (x - bn.running_mean) /
  sqrt(bn.running_var + batch_norm_eps), the pipeline's own latent path (_encode_vae_image), dtype included.

The denoiser call is the script's: latents packed to (B, H·W, C) tokens with (t, h, w, l) ids, text ids
(0, 0, 0, l), timestep / 1000 (the model multiplies by 1000), no guidance (klein has no guidance embedding;
guidance_scale only sets the pipeline's classifier-free guidance), the prediction trimmed to the image tokens and
scattered back to (B, C, H, W) by its ids, so the flow-matching target noise − latents has its shape.

Its preset `tiny-flux2-klein` is FLUX.2-klein in miniature with random weights: 2 double + 2 single blocks
(2 heads of 16, RoPE axes 4+4+4+4 = 16), a 36-layer Qwen3 at width 32 (as Qwen3-4B/8B have 36 layers: the
pipeline's default layers (9, 18, 27) exist, so the preset samples with the pipeline's defaults; joint_attention_dim
= 3 × 32), a byte-level BPE tokenizer with Qwen3's chat special tokens and a minimal Qwen3 chat template, a
2-block AutoencoderKLFlux2 (8x smaller images than FLUX.2's: vae_scale_factor 2) with fixed non-trivial BN
statistics, and FLUX's flow-matching scheduler (shift 3, dynamic shifting).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from training.common import TrainingError
from training.common.models import write_tokenizer_files
from training.images.diffusion import FlowMatchObjective

from .base import Conditioning, Family

TEXT_LAYERS = (9, 18, 27)      # Flux2KleinPipeline's text_encoder_out_layers (the training script's: 10, 20, 30)
MAX_SEQUENCE_LENGTH = 512      # the pipeline's, so training sees the text tokens sampling gives the transformer
SINGLE_BLOCKS = 24             # klein-9B's single blocks (4B: 20), as the training script's target list

# Qwen3's chat template reduced to what the pipeline asks of it: user turns, the generation prompt, and the
# empty think block that enable_thinking=False adds (Qwen3's own template does the same for these inputs)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
CHAT_SPECIAL = ("<|im_start|>", "<|im_end|>")   # special tokens of Qwen3's tokenizer
CHAT_ADDED = ("<think>", "</think>")            # added, not special (Qwen3 keeps them when decoding)


def build_tokenizer(directory: Path):
    """A Qwen2TokenizerFast built offline: write_tokenizer_files' byte-level vocabulary and merges, Qwen3's
    special tokens (<|endoftext|> pads, <|im_end|> ends a turn) and CHAT_TEMPLATE."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    write_tokenizer_files(directory)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    for token in CHAT_SPECIAL + CHAT_ADDED:
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = Qwen2TokenizerFast.from_pretrained(directory, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                   model_max_length=MAX_SEQUENCE_LENGTH)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_SPECIAL)})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAT_ADDED])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def klein_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """FLUX.2's latents of `pixels` (B, 3, H, W) in [-1, 1]: the VAE's mode, 2x2-patchified, normalised by the
    VAE's BatchNorm running statistics; (B, 4·latent_channels, H/(2·s), W/(2·s)) for vae_scale_factor s."""
    from diffusers import Flux2KleinPipeline

    latents = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
    bn, like = vae.bn, dict(device=latents.device, dtype=latents.dtype)
    mean = bn.running_mean.view(1, -1, 1, 1).to(**like)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(**like)
    return (latents - mean) / std


class Flux2Klein(Family):
    name = "flux2-klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    preset = "tiny-flux2-klein"
    tags = ("flux2-klein", "flux2-klein-diffusers")   # the training script's model-card tags
    # train_dreambooth_lora_flux2_klein.py's defaults: the double blocks' attention projections, the single
    # blocks' fused qkv+MLP input and their output projection (`attn.to_out`, a Linear; in the double blocks the
    # same name is a ModuleList, so it is named per block: suffixes match whole names, never a ModuleList)
    default_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                       *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(SINGLE_BLOCKS)))
    fig3_pattern = "transformer_blocks.0.attn.to_out.0"   # the first double block's image out-projection
    default_resolution = 1024   # the klein README trains at 1024 px (the script's default 512 is peft's benchmark)
    denoiser_name = "transformer"
    flow_matching = True

    def build_preset(self, directory: Path) -> None:
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2KleinPipeline,
            Flux2Transformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3ForCausalLM

        with tempfile.TemporaryDirectory() as tok_dir:
            tokenizer = build_tokenizer(Path(tok_dir))
        hidden, latent_channels = 32, 4
        text = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=36,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=MAX_SEQUENCE_LENGTH, tie_word_embeddings=True,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=None)
        with torch.random.fork_rng(devices=[]):   # leave the caller's RNG untouched
            torch.manual_seed(0)
            transformer = Flux2Transformer2DModel(
                patch_size=1, in_channels=4 * latent_channels, num_layers=2, num_single_layers=2,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden * len(TEXT_LAYERS),
                timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
            torch.manual_seed(0)
            text_encoder = Qwen3ForCausalLM(text)
            torch.manual_seed(0)
            vae = AutoencoderKLFlux2(block_out_channels=(32, 64), layers_per_block=1, latent_channels=latent_channels,
                                     down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)
            # the trained VAE's statistics are far from (0, 1): fixed ones, so the normalisation is not the identity
            torch.manual_seed(0)
            vae.bn.running_mean.copy_(0.2 * torch.randn(4 * latent_channels))
            vae.bn.running_var.copy_(torch.empty(4 * latent_channels).uniform_(0.5, 2.0))
        # FLUX.1-dev's scheduler config, which diffusers' convert_flux2_to_diffusers.py gives FLUX.2
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=False)
        pipe.save_pretrained(directory)
        (directory / "README.md").write_text(
            "lowrank tiny-flux2-klein preset: FLUX.2-klein's architecture in miniature (Flux2KleinPipeline, "
            "Qwen3 text encoder, AutoencoderKLFlux2), random weights, built from configs. For tests and demos of "
            "the training machinery; its images are noise.\n")

    # ----- training -------------------------------------------------------------------------------------
    def for_run(self, args) -> Flux2Klein:
        length = getattr(args, "max_sequence_length", None)
        if length not in (None, MAX_SEQUENCE_LENGTH):
            raise TrainingError(f"--max_sequence_length {length}: the {self.name} family encodes prompts with "
                                f"{MAX_SEQUENCE_LENGTH} tokens, as Flux2KleinPipeline samples; leave it unset")
        return super().for_run(args)

    def objective(self, pipe, weight_dtype: torch.dtype, device: torch.device, args):
        """Flow matching on klein_latents, with diffusers' --weighting_scheme flags and defaults."""
        vae = pipe.vae
        return FlowMatchObjective(lambda pixels, gen: klein_latents(vae, pixels), vae.dtype, pipe.scheduler,
                                  weight_dtype, device, getattr(args, "weighting_scheme", "none"),
                                  getattr(args, "logit_mean", 0.0), getattr(args, "logit_std", 1.0),
                                  getattr(args, "mode_scale", 1.29))

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], size: int) -> Conditioning:
        embeds, _ = pipe.encode_prompt(prompts, device=pipe.text_encoder.device, num_images_per_prompt=1,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH, text_encoder_out_layers=TEXT_LAYERS)
        return {"encoder_hidden_states": embeds}   # text ids are rebuilt per call (denoise): (0, 0, 0, l)

    def denoise(self, model, noisy, timesteps, cond: Conditioning) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline as P

        embeds = cond["encoder_hidden_states"]
        img_ids = P._prepare_latent_ids(noisy).to(noisy.device)
        txt_ids = P._prepare_text_ids(embeds).to(noisy.device)
        tokens = P._pack_latents(noisy)
        pred = model(hidden_states=tokens, encoder_hidden_states=embeds, timestep=timesteps / 1000,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        pred = pred[:, :tokens.shape[1]]
        return P._unpack_latents_with_ids(pred, img_ids, noisy.shape[2], noisy.shape[3])

    def sampling_pipeline(self, pipe):
        """Flux2KleinPipeline on the training modules with a copy of its own flow-matching scheduler (the base's
        DPM-Solver is for DDPM models) and the loaded model's is_distilled (a config value pipe.components leaves
        out: a distilled checkpoint samples without classifier-free guidance)."""
        return self.new_pipeline(pipe.components, type(pipe.scheduler).from_config(pipe.scheduler.config),
                                 is_distilled=bool(pipe.config.get("is_distilled", False)))
