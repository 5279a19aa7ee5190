"""A full DreamBooth training step per method, against LoRA and against the frozen floor.

    python bench/unet_step.py [--device cuda] [--dtype bf16] [--resolutions 64 128] [--unet mid|sd15|sdxl-mid|sdxl]
                              [--distance_logging_steps 10]

--unet picks the UNet (random weights): `mid` (default; 64/128/256 channels, cross-attention everywhere), `sd15`
(SD-1.5's architecture; `--sd15` is the old spelling), `sdxl-mid` (SDXL's structure scaled down for a CPU: a
DownBlock2D then two CrossAttnDownBlock2D, several transformer layers per block, linear projections, 64-wide heads,
`text_time` added conditioning from a pooled text embedding and six time ids, the two text encoders' widths
concatenated as cross_attention_dim) and `sdxl` (SDXL's own shape, 2.6 B parameters: a GPU's). The SDXL-shaped
UNets are called with added_cond_kwargs (text_embeds, time_ids), as training.families.sdxl does.

One step = VAE encode, noise, UNet forward/backward, AdamW step, step hooks, the trainers' weight-distance
probe on their schedule: what training/dreambooth.py does per step. The floor is the frozen UNet
backpropagating to its input (the work every adapter pays for). `lora#2` is a second, identical LoRA: how far
its ratio strays from 1.00 is the noise of the run. Delta-LoRA is measured on its path after step K.

Also measured, interleaved: the share of a step the distance probe costs (training.common.tracking's
DistanceProbe, the trainers' own), two ways: amortized at --distance_logging_steps N, what a trainer pays per
step (N consecutive probe calls on the schedule, N-1 of the followed layer only and one of every layer,
divided by N), and a full sweep of every adapted layer (what every step cost with N = 1); then merged
inference (adapter folded in) against the plain base UNet.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank  # noqa: E402
from bench.common import base_parser, interleaved, peak_cuda_bytes, write_results  # noqa: E402
from ground import cli  # noqa: E402
from training.common.tracking import DEFAULT_DISTANCE_LOGGING_STEPS, DistanceProbe  # noqa: E402

MID_UNET = dict(block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=256, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                norm_num_groups=32)
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0's unet/config.json): 2048 = CLIP-L's 768 + OpenCLIP
# bigG's 1280; 2816 = 6 time ids x 256 + bigG's pooled projection 1280
SDXL_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                   use_linear_projection=True, addition_embed_type="text_time")
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, **SDXL_BLOCKS)
# SDXL scaled down for a CPU step of a second or two at 256 px: a fifth of the widths (64-wide heads as SDXL's),
# 1/2/4 transformer layers per level (SDXL 1/2/10), two text encoders of widths 192 + 320 (cross_attention_dim
# 512), the second's pooled projection 320 wide: text_time input 6 x 64 + 320 = 704
SDXL_MID_TEXT = (192, 320)   # the two text encoders' hidden sizes (bench/vs_diffusers.py builds them)
SDXL_MID_UNET = dict(block_out_channels=(64, 128, 256), attention_head_dim=(1, 2, 4),
                     transformer_layers_per_block=(1, 2, 4), cross_attention_dim=sum(SDXL_MID_TEXT),
                     addition_time_embed_dim=64, projection_class_embeddings_input_dim=6 * 64 + SDXL_MID_TEXT[1],
                     **SDXL_BLOCKS)
UNETS = {"mid": MID_UNET, "sd15": SD15_UNET, "sdxl-mid": SDXL_MID_UNET, "sdxl": SDXL_UNET}
VAE_8X = dict(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32)
LR = {"lora": 6e-4, "dora": 6e-4, "delora": 6e-3, "ether": 6e-3, "etherplus": 6e-3, "deltalora": 6e-4, "dyndora": 6e-4}


class Trainer:
    """Everything one method's training step touches, built once."""

    def __init__(self, method, unet, vae, sched, rank, device, dtype, distance_every=DEFAULT_DISTANCE_LOGGING_STEPS,
                 targets: tuple[str, ...] | None = None):
        # the frozen base weights are shared by every candidate (deepcopy's memo hands back the same
        # Parameter objects): nothing in a training step writes them, and the SD-1.5 UNet is 3.4 GB a copy
        self.unet = copy.deepcopy(unet, memo={id(p): p for p in unet.parameters()})
        self.vae, self.sched, self.device, self.dtype = vae, sched, device, dtype
        self.method = method
        if method == "floor":
            self.unet.requires_grad_(False)
            self.opt, self.hooks = None, None
        else:
            method = method.split("#")[0]   # "lora#2": a second, identical LoRA: the run's noise floor
            extra = {"dyndora": {"dyndora_total_steps": 1000},
                     "deltalora": {"deltalora_start_step": 0}}.get(method, {})   # deltalora: its path after K
            if targets:   # default: the adapter core's (q, k, v, out of every attention)
                extra["target_modules"] = list(targets)
            lowrank.inject(self.unet, lowrank.AdapterConfig(method=method, rank=rank, **extra))
            self.opt = torch.optim.AdamW(lowrank.parameter_groups(self.unet, lr=LR.get(method, 1e-4)))
            self.hooks = lowrank.step_hooks(self.unet)
            self.probe = DistanceProbe(self.unet, every=distance_every)   # as the trainers build it
        self.steps = 0

    def step(self, pixels, cond, log_distance=True):
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.sched.add_noise(latents, noise, t)
        if self.opt is None:
            noisy.requires_grad_(True)  # the floor: gradients flow to the input through the frozen UNet
        with torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.unet(noisy, t, **cond).sample
            loss = F.mse_loss(pred.float(), noise.float())
        self.backward_and_update(loss, log_distance)

    def backward_and_update(self, loss, log_distance=True):
        """The end of every trainer's step: the method's extra loss, backward, AdamW, step hooks, the probe."""
        if self.hooks is not None:
            loss = loss + self.hooks.extra_loss()
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.steps += 1
            self.hooks.after_optimizer_step(self.steps)
            if log_distance:
                self.probe(self.steps)   # the followed layer, every layer each N-th step

    def probe_cycle(self, n: int):
        """N probe calls on the schedule (steps 1..N of a probe built with every=N: N-1 followed-only, one
        full): timed as one call, its time / N is the probe's amortized cost per training step."""
        for step in range(1, n + 1):
            self.probe(step)


def conditioning(unet_cfg: dict, batch: int, res: int, device: str) -> dict:
    """The UNet's keyword arguments besides the sample and timestep: 77 tokens of text embeddings; for a
    `text_time` UNet (SDXL) also added_cond_kwargs, the pooled text embedding and the six micro-conditioning
    time ids (original size, crop top-left, target size) as training.families.sdxl passes them."""
    cond = {"encoder_hidden_states": torch.randn(batch, 77, unet_cfg["cross_attention_dim"], device=device)}
    if unet_cfg.get("addition_embed_type") == "text_time":
        pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device)
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device),
                                     "time_ids": time_ids.expand(batch, 6)}
    return cond


def run_resolution(args, res, unet_cfg):
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):   # initialised where it runs: SDXL's 2.6 B parameters in seconds on a GPU
        unet = UNet2DConditionModel(sample_size=res // 8, **unet_cfg)
        vae = AutoencoderKL(**VAE_8X).requires_grad_(False)
    sched = DDPMScheduler()
    methods = [m for m in sorted(lowrank.METHODS) if not args.methods or m in args.methods]
    trainers = {"floor": Trainer("floor", unet, vae, sched, args.rank, device, dtype)}
    if "lora" in methods:
        methods.append("lora#2")
    every = args.distance_logging_steps
    trainers |= {m: Trainer(m, unet, vae, sched, args.rank, device, dtype, every) for m in methods}
    pixels = torch.randn(args.batch, 3, res, res, device=device)
    cond = conditioning(unet_cfg, args.batch, res, device)
    secs = interleaved({k: (lambda tr=tr: tr.step(pixels, cond)) for k, tr in trainers.items()},
                       args.reps, args.warmup, device)
    peak = {k: peak_cuda_bytes(lambda tr=tr: tr.step(pixels, cond), device) for k, tr in trainers.items()}
    # the distance probe per method, as a share of that method's whole step: amortized over N steps of the
    # schedule (what a trainer pays per step), and one full sweep of every layer (what N = 1 pays every step)
    probes = {f"{m}@{every}": (lambda tr=trainers[m]: tr.probe_cycle(every)) for m in methods}
    probes |= {f"{m}@full": (lambda tr=trainers[m]: tr.probe()) for m in methods}
    dist = interleaved(probes, args.reps, 1, device)
    # merged inference vs the base UNet (no grad)
    merged = copy.deepcopy(trainers["delora" if "delora" in methods else methods[0]].unet)
    lowrank.merge(merged)                      # adapters merged, wrappers still in place (unmerge-able)
    ejected = copy.deepcopy(merged)
    lowrank.eject(ejected, merge=True)         # merged into plain modules: what an exported model runs
    base = trainers["floor"].unet

    def infer(model):
        def f():
            with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                model(torch.randn(args.batch, 4, res // 8, res // 8, device=device), torch.tensor([10], device=device),
                      **cond)
        return f
    inf = interleaved({"merged": infer(merged), "ejected": infer(ejected), "base": infer(base)},
                      max(args.reps, 15), 1, device)
    row = {"resolution": res, "seconds": secs, "peak_cuda_bytes": peak,
           "distance_logging_steps": every,
           "distance_share": {m: dist[f"{m}@{every}"] / every / secs[m] for m in methods},
           "distance_share_full": {m: dist[f"{m}@full"] / secs[m] for m in methods},
           "merged_vs_base": inf["merged"] / inf["base"], "ejected_vs_base": inf["ejected"] / inf["base"]}
    size = sum(p.numel() for p in unet.parameters()) / 1e6
    kind = next((k for k, v in UNETS.items() if v is unet_cfg), "custom")
    print(f"\nUNet step at {res} px ({kind}: {size:.1f}M-param UNet), r={args.rank}")
    print(f"  {'method':<10} {'ms':>9} {'vs_lora':>8} {'vs_floor':>9}")
    for k in ["floor"] + methods:
        ref = secs.get("lora", secs[methods[0]])
        print(f"  {k:<10} {secs[k] * 1e3:9.1f} {secs[k] / ref:8.3f} {secs[k] / secs['floor']:9.3f}")
    print(f"  distance probe share of a step, amortized at --distance_logging_steps {every} (what a trainer "
          f"pays): " + ", ".join(f"{m} {100 * v:.2f} %" for m, v in row["distance_share"].items()))
    print("  distance probe share of a step, full sweep of every layer (every step at 1): " + ", ".join(
        f"{m} {100 * v:.2f} %" for m, v in row["distance_share_full"].items()))
    print(f"  merged inference vs base: {row['merged_vs_base']:.3f}x (wrapped), "
          f"{row['ejected_vs_base']:.3f}x (merged and ejected)")
    return row, methods


def main(argv=None):
    p = base_parser(__doc__, reps=7, warmup=2)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="image sizes (latents are /8)")
    p.add_argument("--unet", choices=sorted(UNETS), default="mid",
                   help="the UNet architecture, random weights (default mid; sdxl-mid: SDXL's structure scaled "
                        "down for a CPU; sdxl: SDXL's own, for a GPU)")
    p.add_argument("--sd15", action="store_true", help="the same as --unet sd15")
    p.add_argument("--rank", type=int, default=16, help="adapter rank")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--distance_logging_steps", type=int, default=DEFAULT_DISTANCE_LOGGING_STEPS,
                   help="the trainers' flag: every layer's distance every N steps, the followed layer's between "
                        f"(default {DEFAULT_DISTANCE_LOGGING_STEPS}, the trainers' default)")
    args = p.parse_args(argv)
    unet = "sd15" if args.sd15 else args.unet
    rows, methods = [], []
    for res in args.resolutions:
        row, methods = run_resolution(args, res, UNETS[unet])
        rows.append(row)
    summ = {m: {"vs_lora": sum(r["seconds"][m] / r["seconds"].get("lora", r["seconds"][m]) for r in rows) / len(rows),
                "vs_floor": sum(r["seconds"][m] / r["seconds"]["floor"] for r in rows) / len(rows)} for m in methods}
    summ["_step"] = {"distance_share": max(max(r["distance_share"].values()) for r in rows),
                     "distance_share_full": max(max(r["distance_share_full"].values()) for r in rows),
                     "distance_logging_steps": args.distance_logging_steps,
                     "merged_vs_base": sum(r["merged_vs_base"] for r in rows) / len(rows),
                     "ejected_vs_base": sum(r["ejected_vs_base"] for r in rows) / len(rows)}
    write_results(args, "unet_step", "" if unet == "mid" else f"-{unet}", argv, summ, rows)

if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
