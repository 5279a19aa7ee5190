"""One GLUE-style training step (forward, cross-entropy, backward, AdamW) of a BERT-like classifier per method,
ours vs peft's on the same model with the same parameter values (logits checked equal), and against a fair floor.

    python bench/glue_step.py [--device cuda] [--dtype bf16] [--size minilm|base] [--batch 32] [--seq 128]

Adapters on query and value (r = 8), the classification head trained in full (modules_to_save), as
training/glue.py does. The model is built from a config with random weights (no download): 'minilm' is
MiniLM-L6's shape (6 layers, hidden 384), 'base' RoBERTa/BERT-base's (12 layers, hidden 768), 'tiny' a 2-layer
model for smoke runs. The floor is the frozen model with only the head trainable and its backward forced through
the encoder (the embeddings' output requires grad): what every adapter pays at least.
Writes bench/results/glue_step-<device>-<dtype>-<size>.json.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank  # noqa: E402
from bench.common import base_parser, interleaved, peak_cuda_bytes, write_results  # noqa: E402

METHODS = ("lora", "dora", "delora")
SIZES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
         "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
         "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
TARGETS = ["query", "value"]


def base_model(size: str, device: str):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     **SIZES[size])
    return BertForSequenceClassification(cfg).to(device)


def ours(method: str, base, rank: int):
    model = copy.deepcopy(base)
    opts = {"delora_init": "zero_b"} if method == "delora" else {}   # peft's init, for the equality check
    lowrank.inject(model, lowrank.AdapterConfig(method=method, rank=rank, target_modules=TARGETS,
                                                modules_to_save=["classifier"], **opts))
    with torch.no_grad():   # off the initial point (B = 0): every parameter gets a gradient
        for layer in lowrank.adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if p.requires_grad and p.dim() == 2 and not name.startswith("base."):
                    p.add_(0.02 * torch.randn_like(p))
    return model


def peft_twin(method: str, base, mine, rank: int):
    from peft import DeloraConfig, LoraConfig, get_peft_model
    common = dict(target_modules=TARGETS, modules_to_save=["classifier"])
    cfg = (DeloraConfig(r=rank, delora_lambda=15.0, **common) if method == "delora" else
           LoraConfig(r=rank, lora_alpha=rank, use_dora=method == "dora", **common))
    model = get_peft_model(copy.deepcopy(base), cfg)
    theirs = dict(model.named_parameters())
    names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "lora_magnitude": "lora_magnitude_vector.default.weight", "delora_A": "delora_A.default",
             "delora_B": "delora_B.default", "delora_lambda": "delora_lambda.default"}
    with torch.no_grad():
        for name, layer in lowrank.adapter_layers(mine).items():
            for ours_name, p in layer.named_parameters():
                if ours_name in names:
                    theirs[f"base_model.model.{name}.{names[ours_name]}"].copy_(p.reshape(-1) if "magnitude" in
                                                                                 ours_name else p)
    return model


def fair_floor(base):
    """The frozen model with only the head trainable, whose backward still runs through the whole encoder:
    the embeddings' output requires grad, so every adapted layer's input gradient is computed, as with any
    adapter. What an adapter costs beyond it is its own work (the weight gradients and the adapter's ops)."""
    floor = copy.deepcopy(base).requires_grad_(False)
    floor.classifier.requires_grad_(True)
    floor.bert.embeddings.register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    return floor


def train_step(model, batch, labels, lr: float = 1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def step():
        F.cross_entropy(model(**batch).logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    p = base_parser(__doc__, reps=10, warmup=2)
    p.add_argument("--size", default="minilm", choices=sorted(SIZES), help="model shape (random weights)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=8, help="adapter rank")
    args = p.parse_args(argv)
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    methods = [m for m in METHODS if not args.methods or m in args.methods]
    base = base_model(args.size, device)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 30522, (args.batch, args.seq), generator=g).to(device),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device)}
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    floor = fair_floor(base)
    cands, diff = {"floor": floor}, {}
    for m in methods:
        cands[m] = ours(m, base, args.rank)
        cands["peft-" + m] = peft_twin(m, base, cands[m], args.rank)
        with torch.no_grad():
            a, b = cands[m](**batch).logits, cands["peft-" + m](**batch).logits
            diff[m] = float((a - b).norm() / b.norm())
    with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        fns = {k: train_step(v, batch, labels) for k, v in cands.items()}
        secs = interleaved(fns, args.reps, args.warmup, device)
        peak = {k: peak_cuda_bytes(fn, device) for k, fn in fns.items()}
    print(f"\nGLUE step: BERT {args.size} shape, batch {args.batch} x {args.seq} tokens, r={args.rank}, "
          f"{device} {args.dtype}")
    print(f"  {'method':<8} {'ms':>9} {'vs_peft':>8} {'vs_lora':>8} {'vs_floor':>9} {'peft_diff':>9}")
    summary = {}
    for m in ["floor", *methods]:
        vs_peft = secs[m] / secs["peft-" + m] if m != "floor" else float("nan")
        vs_lora = secs[m] / secs["lora"] if "lora" in secs else float("nan")
        print(f"  {m:<8} {secs[m] * 1e3:9.1f} {vs_peft:8.3f} {vs_lora:8.3f} {secs[m] / secs['floor']:9.3f} "
              f"{diff.get(m, float('nan')):9.1e}")
        if m != "floor":
            summary[m] = {"vs_peft": vs_peft, "vs_lora": vs_lora, "vs_floor": secs[m] / secs["floor"],
                          "peft_rel_diff": diff[m]}
    write_results(args, "glue_step", f"-{args.size}", argv, summary,
                  [{"seconds": secs, "peak_cuda_bytes": peak, "batch": args.batch, "seq": args.seq,
                    "rank": args.rank, "size": args.size}])


if __name__ == "__main__":
    from ground import cli
    sys.exit(cli.run_cli(main))
