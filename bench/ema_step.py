"""What --ema_decay costs per training step: the step with and without the moving average's update, interleaved.

    python bench/ema_step.py [--unet mid|sd15] [--resolution 256] [--methods lora delora] [--device cuda]

One step: the UNet's forward on a latent batch (resolution / 8), an MSE loss, backward, AdamW on a rank-4 adapter
of the trainers' default targets. The EMA arm adds training.common.ema.AdapterEMA.update (the fp32 average of every
trained tensor: d * average + (1 - d) * weights) after the optimizer step, as the training loop does; a third arm
times the update alone. Saving and sampling the average at checkpoints are not per-step costs and are not timed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank  # noqa: E402
from bench.common import base_parser, interleaved, write_results  # noqa: E402
from bench.unet_step import UNETS  # noqa: E402
from ground import cli  # noqa: E402
from training.common.ema import AdapterEMA  # noqa: E402


def run_method(args, method: str) -> dict:
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg, size = UNETS[args.unet], args.resolution // 8
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=size, **cfg).requires_grad_(False)
        lowrank.inject(unet, lowrank.AdapterConfig(method=method, rank=4))
        latents = torch.randn(1, cfg.get("in_channels", 4), size, size)
        emb, t = torch.randn(1, 77, cfg["cross_attention_dim"]), torch.tensor([500])
    opt = torch.optim.AdamW(lowrank.parameter_groups(unet, lr=1e-4))
    ema, count = AdapterEMA(unet, decay=0.999), [0]

    def step(average: bool):
        def f():
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                loss = F.mse_loss(unet(latents, t, emb, return_dict=False)[0].float(), latents)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if average:
                count[0] += 1
                ema.update(count[0])
        return f

    def update():
        count[0] += 1
        ema.update(count[0])

    secs = interleaved({"step": step(False), "step_with_ema": step(True), "ema_update": update},
                       args.reps, args.warmup, device)
    trained = sum(ema.live[k].numel() for k in ema.trained)
    row = {"method": method, "seconds": secs, "ema_vs_plain": secs["step_with_ema"] / secs["step"],
           "update_share": secs["ema_update"] / secs["step"], "averaged_parameters": trained}
    print(f"{method}: step {secs['step'] * 1e3:.0f} ms, with the EMA update {secs['step_with_ema'] * 1e3:.0f} ms "
          f"({row['ema_vs_plain']:.3f}x); the update alone {secs['ema_update'] * 1e3:.2f} ms "
          f"({100 * row['update_share']:.2f} % of a step) over {trained:,} averaged parameters")
    return row


def main(argv=None):
    p = base_parser(__doc__, reps=7, warmup=1)
    p.add_argument("--unet", choices=["mid", "sd15"], default="mid", help="the UNet, random weights (default mid)")
    p.add_argument("--resolution", type=int, default=256, help="image size (latents are /8; default 256)")
    args = p.parse_args(argv)
    print(f"{args.unet} UNet at {args.resolution} px, batch 1, {args.device} {args.dtype}")
    rows = [run_method(args, m) for m in (args.methods or ["lora", "delora"])]
    summary = {"ema_vs_plain": {r["method"]: r["ema_vs_plain"] for r in rows},
               "update_share": {r["method"]: r["update_share"] for r in rows}}
    write_results(args, "ema_step", f"-{args.unet}", argv, summary, rows)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
