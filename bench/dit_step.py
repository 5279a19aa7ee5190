"""A DreamBooth training step per method on a FLUX-shaped transformer (flow matching), against LoRA and the floor.

    python bench/dit_step.py [--model flux-mid|klein-mid|flux|klein-4b] [--resolutions 256] [--text_tokens 512]
                             [--device cuda] [--dtype bf16] [--methods lora dora delora etherplus]

--model picks the transformer (random weights): `flux-mid` is FLUX.1's FluxTransformer2DModel and `klein-mid`
FLUX.2-klein's Flux2Transformer2DModel scaled down for a CPU (2 double-stream and 4 single-stream blocks, 4 heads
of 64, the real models' RoPE axes split and input channels); `flux` (FLUX.1-dev's 12 B shape) and `klein-4b`
(FLUX.2-klein-4B's shape) are a GPU's. The adapters go where the trainer puts them: the family's default targets
(training/families: diffusers' scripts' lists), and the transformer is called through the family's own denoise
(packing, RoPE ids, timestep / 1000), as training/dreambooth.py calls it.

One step = noise, the flow-matching interpolation (1 - σ)x + σ·noise at a uniform σ, the transformer's forward /
backward against noise - x, AdamW, step hooks, the trainers' weight-distance probe on its schedule. The latents are
random: no VAE runs (its cost is the same for every method and would only dilute the ratios). The text sequence is
--text_tokens long (the FLUX pipelines pad prompts to 512 tokens). The floor is the frozen transformer
backpropagating to its input; `lora#2` is a second, identical LoRA: how far it strays from 1.00 is the run's noise.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank  # noqa: E402
from bench.common import base_parser, interleaved, peak_cuda_bytes, write_results  # noqa: E402
from bench.unet_step import Trainer  # noqa: E402
from ground import cli  # noqa: E402
from training.common.tracking import DEFAULT_DISTANCE_LOGGING_STEPS  # noqa: E402
from training.families import FLUX, Flux2Klein  # noqa: E402

# FLUX.1: 4 latent channels x 2x2 packing = in_channels; sum(axes_dims_rope) = the head width
FLUX_MID = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, axes_dims_rope=(16, 24, 24),
                guidance_embeds=False)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                axes_dims_rope=(16, 56, 56), guidance_embeds=True)
# FLUX.2: 128 patchified latent channels, 4 RoPE axes, MLP ratio 3, text = 3 Qwen3 layers side by side
KLEIN_MID = dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=64,
                 num_attention_heads=4, joint_attention_dim=3 * 128, timestep_guidance_channels=256,
                 axes_dims_rope=(16, 16, 16, 16), guidance_embeds=False)
KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3 * 2560, timestep_guidance_channels=256,
                axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
MODELS = {"flux-mid": (FLUX, FLUX_MID), "flux": (FLUX, FLUX_DEV),
          "klein-mid": (Flux2Klein, KLEIN_MID), "klein-4b": (Flux2Klein, KLEIN_4B)}


def build(model: str, device: str):
    """(family, transformer) of `model`, random weights initialised where it runs (seconds for 4 B on a GPU)."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    family_class, cfg = MODELS[model]
    cls = FluxTransformer2DModel if family_class is FLUX else Flux2Transformer2DModel
    torch.manual_seed(0)
    with torch.device(device):
        return family_class(), cls(**cfg)


def inputs(family, cfg: dict, batch: int, res: int, text_tokens: int, device: str):
    """(latents, conditioning) as the family's denoise takes them: FLUX.1's 8x latents before 2x2 packing, FLUX.2's
    16x patchified ones; T5/Qwen3 text states of the joint attention width (+ FLUX.1's pooled CLIP vector)."""
    if isinstance(family, Flux2Klein):
        latents = torch.randn(batch, cfg["in_channels"], res // 16, res // 16, device=device)
        cond = {}
    else:
        latents = torch.randn(batch, cfg["in_channels"] // 4, res // 8, res // 8, device=device)
        cond = {"pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], device=device)}
    cond["encoder_hidden_states"] = torch.randn(batch, text_tokens, cfg["joint_attention_dim"], device=device)
    return latents, cond


class DiTTrainer(Trainer):
    """unet_step's Trainer (adapters, AdamW, hooks, the distance probe) with the flow-matching step of a DiT."""

    def __init__(self, method, family, model, rank, device, dtype, every):
        super().__init__(method, model, None, None, rank, device, dtype, every, targets=family.default_targets)
        self.family = family

    def step(self, latents, cond, log_distance=True):
        noise = torch.randn_like(latents)
        sigma = torch.rand(latents.shape[0], device=latents.device).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise   # training.images.diffusion.FlowMatchObjective
        if self.opt is None:
            noisy.requires_grad_(True)  # the floor: gradients flow to the input through the frozen transformer
        with torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.family.denoise(self.unet, noisy, sigma.flatten() * 1000, cond)
            loss = F.mse_loss(pred.float(), (noise - latents).float())
        self.backward_and_update(loss, log_distance)


def run_resolution(args, res: int) -> tuple[dict, list[str]]:
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    family, model = build(args.model, device)
    cfg = MODELS[args.model][1]
    methods = [m for m in sorted(lowrank.METHODS) if not args.methods or m in args.methods]
    if "lora" in methods:
        methods.append("lora#2")
    every = args.distance_logging_steps
    trainers = {m: DiTTrainer(m, family, model, args.rank, device, dtype, every) for m in ["floor"] + methods}
    adapted = len(lowrank.adapter_layers(trainers[methods[0]].unet))
    latents, cond = inputs(family, cfg, args.batch, res, args.text_tokens, device)
    secs = interleaved({k: (lambda tr=tr: tr.step(latents, cond)) for k, tr in trainers.items()},
                       args.reps, args.warmup, device)
    peak = {k: peak_cuda_bytes(lambda tr=tr: tr.step(latents, cond), device) for k, tr in trainers.items()}
    size = sum(p.numel() for p in model.parameters()) / 1e6
    tokens = (res // 16) ** 2
    print(f"\nDiT step at {res} px ({args.model}: {size:.1f}M-param transformer, {tokens} image + {args.text_tokens} "
          f"text tokens, {adapted} adapted layers), r={args.rank}, {args.dtype}")
    print(f"  {'method':<10} {'ms':>9} {'vs_lora':>8} {'vs_floor':>9}")
    ref = secs.get("lora", secs[methods[0]])
    for k in ["floor"] + methods:
        print(f"  {k:<10} {secs[k] * 1e3:9.1f} {secs[k] / ref:8.3f} {secs[k] / secs['floor']:9.3f}")
    return {"resolution": res, "image_tokens": tokens, "text_tokens": args.text_tokens, "adapted_layers": adapted,
            "params_millions": round(size, 1), "seconds": secs, "peak_cuda_bytes": peak}, methods


def main(argv=None):
    p = base_parser(__doc__, reps=7, warmup=2)
    p.add_argument("--model", choices=sorted(MODELS), default="klein-mid",
                   help="the transformer, random weights (default klein-mid; flux-mid, klein-mid: CPU-sized; flux, "
                        "klein-4b: the real shapes, for a GPU)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256], help="image sizes (tokens: (px/16)^2)")
    p.add_argument("--text_tokens", type=int, default=512, help="text sequence length (the pipelines pad to 512)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--distance_logging_steps", type=int, default=DEFAULT_DISTANCE_LOGGING_STEPS,
                   help=f"the trainers' flag (default {DEFAULT_DISTANCE_LOGGING_STEPS})")
    args = p.parse_args(argv)
    rows, methods = [], []
    for res in args.resolutions:
        row, methods = run_resolution(args, res)
        rows.append(row)
    summ = {m: {"vs_lora": sum(r["seconds"][m] / r["seconds"].get("lora", r["seconds"][m]) for r in rows) / len(rows),
                "vs_floor": sum(r["seconds"][m] / r["seconds"]["floor"] for r in rows) / len(rows)} for m in methods}
    write_results(args, "dit_step", f"-{args.model}", argv, summ, rows)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
