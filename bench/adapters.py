"""One adapted layer, forward + backward, per method, on Stable Diffusion attention shapes.

    python bench/adapters.py [--device cuda] [--dtype bf16] [--ranks 4 16] [--reps 20] [--quick]

For every (shape, rank) the candidates run interleaved in one loop: each of our methods, peft's
implementation of the same method (lora, dora, delora, with the same parameter values: outputs are
checked equal), and the frozen base layer with input gradients only (the floor any adapter pays).
Prints a table of medians and ratios and writes bench/results/adapters-<device>-<dtype>.json.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank  # noqa: E402
from bench.common import base_parser, interleaved, peak_cuda_bytes, saved_bytes, write_results  # noqa: E402
from ground import cli  # noqa: E402

# (name, in_features, out_features, tokens): SD-1.5 self-attention at 64/32/16 px latents, and the
# cross-attention key/value projections of the 77 text tokens.
SHAPES = [("self-320", 320, 320, 4096), ("self-640", 640, 640, 1024), ("self-1280", 1280, 1280, 256),
          ("cross-kv-320", 768, 320, 77), ("cross-kv-1280", 768, 1280, 77)]
PEFT = ("lora", "dora", "delora")


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.lin = layer

    def forward(self, x):
        return self.lin(x)


def ours(method, base, rank):
    model = Holder(copy.deepcopy(base))
    opts = {"delora_init": "zero_b"} if method == "delora" else {}  # peft's init, for the equality check
    if method == "deltalora":
        opts["deltalora_start_step"] = 0
    lowrank.inject(model, lowrank.AdapterConfig(method=method, rank=rank, target_modules=["lin"], **opts))
    with torch.no_grad():  # off the initial point, so no method is benchmarked on zeros
        for n, p in model.named_parameters():
            if p.requires_grad and p.dim() == 2:
                p.add_(0.02 * torch.randn_like(p))
    return model


def peft_twin(method, base, rank, mine):
    from peft import DeloraConfig, LoraConfig, get_peft_model
    cfg = (DeloraConfig(r=rank, delora_lambda=15.0, target_modules=["lin"]) if method == "delora" else
           LoraConfig(r=rank, lora_alpha=rank, target_modules=["lin"], use_dora=method == "dora"))
    model = get_peft_model(Holder(copy.deepcopy(base)), cfg)
    theirs = dict(model.named_parameters())
    layer = mine.lin
    pairs = {"lora": {"lora_A.default.weight": "lora_A", "lora_B.default.weight": "lora_B"},
             "dora": {"lora_A.default.weight": "lora_A", "lora_B.default.weight": "lora_B",
                      "lora_magnitude_vector.default.weight": "lora_magnitude"},
             "delora": {"delora_A.default": "delora_A", "delora_B.default": "delora_B",
                        "delora_lambda.default": "delora_lambda"}}[method]
    with torch.no_grad():
        for k, ours_name in pairs.items():
            theirs[f"base_model.model.lin.{k}"].copy_(getattr(layer, ours_name))
    return model


def fwd_bwd(model, x, g):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        model(x).backward(g)
    return step


def run(args):
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    methods = [m for m in sorted(lowrank.METHODS) if not args.methods or m in args.methods]
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for name, d_in, d_out, tokens in shapes:
        for rank in args.ranks:
            torch.manual_seed(0)
            base = nn.Linear(d_in, d_out).to(device)
            nn.init.normal_(base.weight, std=1 / math.sqrt(d_in))
            x = torch.randn(1, tokens, d_in, device=device, requires_grad=True)
            g = torch.randn(1, tokens, d_out, device=device)
            frozen = Holder(copy.deepcopy(base)).requires_grad_(False)
            cands, equal = {"floor": frozen}, {}
            for m in methods:
                cands[m] = ours(m, base, rank)
                if m in PEFT:
                    cands["peft-" + m] = peft_twin(m, base, rank, cands[m])
                    with torch.no_grad():
                        a, b = cands[m](x), cands["peft-" + m](x)
                        equal[m] = float((a - b).norm() / b.norm())
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                fns = {k: fwd_bwd(v, x, g) for k, v in cands.items()}
                secs = interleaved(fns, args.reps, args.warmup, device)
                mem = {k: saved_bytes(fn) for k, fn in fns.items()}
                peak = {k: peak_cuda_bytes(fn, device) for k, fn in fns.items()}
            row = {"shape": name, "in": d_in, "out": d_out, "tokens": tokens, "rank": rank,
                   "seconds": secs, "saved_bytes": mem, "peak_cuda_bytes": peak, "peft_rel_diff": equal}
            rows.append(row)
            print(f"\n{name} (in {d_in}, out {d_out}, tokens {tokens}), r={rank}")
            print(f"  {'method':<10} {'ms':>8} {'vs_lora':>8} {'vs_peft':>8} {'vs_floor':>9} {'act_MB':>8} "
                  f"{'peft_diff':>9}")
            for m in ["floor"] + methods:
                vs_peft = secs[m] / secs["peft-" + m] if "peft-" + m in secs else float("nan")
                print(f"  {m:<10} {secs[m] * 1e3:8.2f} {secs[m] / secs['lora']:8.3f} {vs_peft:8.3f} "
                      f"{secs[m] / secs['floor']:9.3f} {mem[m] / 2**20:8.2f} {equal.get(m, float('nan')):9.1e}")
    return rows, methods


def summary(rows, methods):
    def gmean(xs):
        xs = [x for x in xs if x == x]
        return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None
    out = {}
    for m in methods:
        out[m] = {
            "vs_lora": gmean([r["seconds"][m] / r["seconds"]["lora"] for r in rows]),
            "vs_peft": gmean([r["seconds"][m] / r["seconds"]["peft-" + m] for r in rows]) if m in PEFT else None,
            "vs_floor": gmean([r["seconds"][m] / r["seconds"]["floor"] for r in rows]),
            "act_mem_vs_lora": gmean([r["saved_bytes"][m] / r["saved_bytes"]["lora"] for r in rows]),
            "max_peft_rel_diff": max((r["peft_rel_diff"][m] for r in rows), default=None) if m in PEFT else None,
        }
    return out


def main(argv=None):
    p = base_parser(__doc__, reps=15, warmup=3)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16], help="adapter ranks to measure")
    p.add_argument("--quick", action="store_true", help="two shapes only")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows, methods = run(args)
    summ = summary(rows, methods)
    print("\nsummary (geometric means over shapes and ranks)")
    for m, s in summ.items():
        print(f"  {m:<10} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}=-" for k, v in s.items()))
    write_results(args, "adapters", "", argv, summ, rows)

if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
