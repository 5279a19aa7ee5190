"""A DreamBooth training step with and without --cache_latents, interleaved in one run.

    python bench/cache_latents.py [--unet mid|sd15] [--resolutions 256] [--device cuda] [--dtype bf16]

One step is the trainer's own: training.images.diffusion.DiffusionObjective.loss (VAE encode and sample, noise,
timesteps, the UNet's forward), backward, AdamW on a rank-4 LoRA. The cached arm's objective reads the VAE through
training.images.latent_cache.CachedVAE, warmed by the untimed repetitions, so every timed step is a cache hit (what
the steps after a run's first epoch are); the uncached arm encodes every step. Both arms train the same UNet and see
the same image. The VAE is SD's (stable-diffusion-v1-5's vae/config.json: 128/256/512/512 channels, 2 layers per
block; SDXL's has the same shape), random weights; --unet picks the UNet (bench/unet_step.py's presets).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank  # noqa: E402
from bench.common import base_parser, interleaved, write_results  # noqa: E402
from bench.unet_step import UNETS  # noqa: E402
from ground import cli  # noqa: E402
from training.images.diffusion import DiffusionObjective  # noqa: E402
from training.images.latent_cache import CachedVAE  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def run_resolution(args, res: int) -> dict:
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = UNETS[args.unet]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=res // 8, **cfg)
        vae = AutoencoderKL(**SD_VAE).requires_grad_(False).eval()
        unet.requires_grad_(False)
        lowrank.inject(unet, lowrank.AdapterConfig(method="lora", rank=4))
        emb = torch.randn(args.batch, 77, cfg["cross_attention_dim"])
        pixels = torch.rand(args.batch, 3, res, res) * 2 - 1
    opt = torch.optim.AdamW(lowrank.parameter_groups(unet, lr=1e-4))
    sched = DDPMScheduler()
    objectives = {"uncached": DiffusionObjective(vae, sched, torch.float32, torch.device(device)),
                  "cached": DiffusionObjective(CachedVAE(vae), sched, torch.float32, torch.device(device))}
    gen = torch.Generator().manual_seed(0)

    def step(objective):
        def f():
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                loss = objective.loss(pixels, lambda noisy, t: unet(noisy, t, emb, return_dict=False)[0], gen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return f

    def encode():
        with torch.no_grad():
            vae.encode(pixels).latent_dist.sample(generator=gen)

    secs = interleaved({k: step(o) for k, o in objectives.items()} | {"vae_encode": encode},
                       args.reps, args.warmup, device)
    cache = objectives["cached"].vae
    assert cache.encodes == 1, cache.encodes   # the warm-up filled it; every timed step was a hit
    row = {"resolution": res, "seconds": secs, "cached_vs_uncached": secs["cached"] / secs["uncached"],
           "encode_share": secs["vae_encode"] / secs["uncached"]}
    size = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"\n{args.unet} UNet ({size:.0f}M parameters) at {res} px, batch {args.batch}, {args.device} {args.dtype}: "
          f"step {secs['uncached'] * 1e3:.0f} ms uncached, {secs['cached'] * 1e3:.0f} ms cached "
          f"({row['cached_vs_uncached']:.3f}x); the VAE encode alone {secs['vae_encode'] * 1e3:.0f} ms "
          f"({100 * row['encode_share']:.1f} % of the uncached step)")
    return row


def main(argv=None):
    p = base_parser(__doc__, reps=5, warmup=1)
    p.add_argument("--unet", choices=["mid", "sd15"], default="mid", help="the UNet, random weights (default mid)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256], help="image sizes (latents are /8)")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    args = p.parse_args(argv)
    rows = [run_resolution(args, res) for res in args.resolutions]
    summary = {"cached_vs_uncached": {r["resolution"]: r["cached_vs_uncached"] for r in rows},
               "encode_share": {r["resolution"]: r["encode_share"] for r in rows}}
    write_results(args, "cache_latents", f"-{args.unet}", argv, summary, rows)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
