"""FLUX.1 (FluxPipeline): a rectified-flow DiT (FluxTransformer2DModel: double-stream blocks, where text and image
tokens keep their own weights and meet in a joint attention, then single-stream blocks over the concatenation),
conditioned on T5's hidden states (the token sequence) and CLIP's pooled output (with the timestep, the
modulation); 2-D RoPE over (0, row, column) position ids; a 16-channel VAE with a shift and a scale.

As diffusers' examples/dreambooth/train_dreambooth_lora_flux.py trains it:
  latents   x = (vae.encode(pixels).latent_dist.sample() − shift_factor) · scaling_factor
  step      flow matching (training.images.diffusion.FlowMatchObjective): x_σ = (1 − σ)·x + σ·noise, target
            noise − x
  call      2×2 patches packed into tokens (FluxPipeline._pack_latents), image ids (0, row, col) of the patch grid,
            text ids zeros, timestep / 1000 (the model multiplies it back), a guidance value only for
            guidance-distilled models (FLUX.1-dev: transformer.config.guidance_embeds), then unpacked to (B, C, H, W)
  prompts   the pipeline's own encode_prompt: T5 padded to max_sequence_length (512), CLIP's pooled output
  targets   the double blocks' image and text attention projections and both feed-forwards; the single blocks'
            q/k/v (diffusers' default --lora_layers)
  samples   FluxPipeline with its own FlowMatchEulerDiscreteScheduler (resolution-dependent shift)

Its preset `tiny-flux` is FLUX.1 in miniature with random weights (2 double + 2 single blocks of width 32, RoPE
axes (4, 6, 6) = the head dim 16, a 2-layer T5 with its own offline Unigram tokenizer, CLIP at width 32, a 2-block
VAE with FLUX's shift/scale, FLUX.1-dev's scheduler config), built from configs into the cache and loaded back
through FluxPipeline.from_pretrained like any FLUX.1 folder.
"""
from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch

from training.common import TrainingError
from training.common.models import PROMPT_WORDS, write_tokenizer_files
from training.images.diffusion import FlowMatchObjective

from .base import Conditioning, Family

T5_SPECIALS = ("<pad>", "</s>", "<unk>")   # T5's ids 0, 1, 2


def t5_tokenizer(model_max_length: int = 512):
    """A T5TokenizerFast built offline: T5's own structure (a Unigram model, pad/eos/unk = 0/1/2, Metaspace
    word boundaries, '</s>' appended) over a small vocabulary: every prompt word of training.common.models as one
    piece, any other word as printable-ASCII pieces, the rest <unk>. No hub, no sentencepiece."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    vocab = [(tok, 0.0) for tok in T5_SPECIALS] + [("▁", -8.0)]
    vocab += [("▁" + w, -5.0) for w in dict.fromkeys(PROMPT_WORDS)]
    vocab += [(c, -10.0) for c in string.printable[:94]]   # digits, letters, punctuation (no whitespace)
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # what transformers' T5 tokenizer builds around a Unigram vocabulary (so it reads the saved file back as is)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)


class FLUX(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    preset = "tiny-flux"
    tags = ("flux", "flux-diffusers")
    denoiser_name = "transformer"
    flow_matching = True
    default_resolution = 512
    vae_in_fp32 = False   # train_dreambooth_lora_flux.py keeps the VAE in weight_dtype
    # diffusers' --lora_layers default: double blocks' image + text attention and feed-forwards; single blocks'
    # attn.to_q/k/v (their proj_mlp / proj_out are not targeted)
    default_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")
    fig3_pattern = "transformer_blocks.0.attn.to_out.0"   # the first double block's image-attention out-projection
    max_sequence_length = 512   # T5 tokens (diffusers' --max_sequence_length; FluxPipeline's default)
    guidance_scale = 3.5        # the guidance a guidance-distilled model trains with (diffusers' --guidance_scale)

    # ----- the preset ------------------------------------------------------------------------------------
    def build_preset(self, directory: Path) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

        with tempfile.TemporaryDirectory() as tok_dir:
            clip_vocab = write_tokenizer_files(Path(tok_dir))
            tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        tokenizer_2 = t5_tokenizer(self.max_sequence_length)
        clip = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=clip_vocab, max_position_embeddings=77, layer_norm_eps=1e-5,
                              hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        # T5 v1.1 (FLUX's T5-XXL) in miniature: gated GELU, no tied embeddings; d_model 24 (not 32) so that a
        # mix-up of the two text encoders' widths fails loudly
        t5 = T5Config(vocab_size=len(tokenizer_2), d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
        with torch.random.fork_rng(devices=[]):   # leave the caller's RNG untouched
            torch.manual_seed(0)
            # 4 latent channels packed 2x2 -> 16 token channels; 2 heads x 16, RoPE axes 4 + 6 + 6 = 16
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=t5.d_model, pooled_projection_dim=clip.hidden_size,
                guidance_embeds=False, axes_dims_rope=(4, 6, 6))
            torch.manual_seed(0)
            # FLUX's VAE: no quant convs, latents shifted then scaled (its 16 channels here 4, 8x here 2x)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64,
                                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                                scaling_factor=0.3611)
            torch.manual_seed(0)
            text_encoder = CLIPTextModel(clip)
            torch.manual_seed(0)
            text_encoder_2 = T5EncoderModel(t5)
        # FLUX.1-dev's scheduler config: dynamic (resolution-dependent) shift at inference, linear training sigmas
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
        pipe.save_pretrained(directory)
        (directory / "README.md").write_text(
            "lowrank tiny-flux preset: FLUX.1's architecture in miniature (FluxPipeline: 2 double-stream and 2 "
            "single-stream transformer blocks with RoPE, T5 + CLIP text encoders, a VAE with FLUX's shift and "
            "scale), random weights, built from configs. For tests and demos of the training machinery; its "
            "images are noise.\n")

    # ----- training ----------------------------------------------------------------------------------------
    def objective(self, pipe, weight_dtype: torch.dtype, device: torch.device, args):
        vae = pipe.vae
        shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor

        def encode(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return (vae.encode(pixels).latent_dist.sample(generator=gen) - shift) * scale

        return FlowMatchObjective(encode, vae.dtype, pipe.scheduler, weight_dtype, device,
                                  getattr(args, "weighting_scheme", "none"), getattr(args, "logit_mean", 0.0),
                                  getattr(args, "logit_std", 1.0), getattr(args, "mode_scale", 1.29))

    def for_run(self, args) -> FLUX:
        length = getattr(args, "max_sequence_length", None)
        if length is not None and not 1 <= length <= 512:   # FluxPipeline refuses more than 512
            raise TrainingError(f"--max_sequence_length {length}: give 1 to 512 T5 tokens (default 512)")
        run = super().for_run(args)
        run.max_sequence_length = length or self.max_sequence_length
        return run

    def sequence_length(self, pipe) -> int:
        """T5 tokens of a prompt: the run's (--max_sequence_length, default 512), at most the T5 tokenizer's."""
        return min(self.max_sequence_length, pipe.tokenizer_2.model_max_length)

    def call_kwargs(self, pipe) -> dict:
        return {"max_sequence_length": self.sequence_length(pipe)}

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], size: int) -> Conditioning:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=pipe.text_encoder.device,
                                               max_sequence_length=self.sequence_length(pipe))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}   # text ids: zeros, made in denoise

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2 · W/2, 4C): 2x2 patches as tokens (FluxPipeline._pack_latents)."""
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    @staticmethod
    def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """pack's inverse, to (B, C, height, width) latents (FluxPipeline._unpack_latents at scale factor 1: its
        pixel height over the VAE factor is the latent height)."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(tokens, height, width, 1)

    def denoise(self, model, noisy, timesteps, cond: Conditioning) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, _, h, w = noisy.shape
        embeds = cond["encoder_hidden_states"]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        config = getattr(model, "module", model).config   # a DDP-wrapped model keeps its config on .module
        guidance = torch.full((b,), self.guidance_scale, device=noisy.device, dtype=torch.float32) \
            if config.guidance_embeds else None
        out = model(hidden_states=self.pack(noisy), timestep=timesteps / 1000, guidance=guidance,
                    pooled_projections=cond["pooled_projections"], encoder_hidden_states=embeds, txt_ids=txt_ids,
                    img_ids=img_ids, return_dict=False)[0]
        return self.unpack(out, h, w)

    def sampling_pipeline(self, pipe):
        """FluxPipeline on the training modules with a copy of its own flow-matching scheduler (DPM-Solver is for
        the DDPM families), as diffusers' log_validation for FLUX."""
        return self.new_pipeline(pipe.components, type(pipe.scheduler).from_config(pipe.scheduler.config))
