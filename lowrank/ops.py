"""Model-wide merge/unmerge and optimizer parameter groups."""
from __future__ import annotations

from torch import nn

from .errors import AdapterError
from .inject import adapter_layers, saved_modules


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then costs what the base model costs)."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge(): base weights return to their pre-merge values (within fp32 rounding)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def parameter_groups(model: nn.Module, lr: float, lambda_lr: float | None = None,
                     weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: adapter matrices at `lr`; scalar strengths (DeLoRA's λ: names containing
    'lambda') at `lambda_lr` (default: lr), without weight decay so the boundary is not pulled to 0
    (DeLoRA appendix D trains the two groups at separate rates). Modules trained in full
    (config.modules_to_save) come in a group 'full' at `lr` with weight decay, their biases and norm
    parameters in 'full_no_decay' without (the usual transformers fine-tuning rule)."""
    layers = adapter_layers(model)
    if not layers:
        raise AdapterError("model has no adapters; call lowrank.inject(model, config) first")
    main, lam = [], []
    for layer in layers.values():
        for name, p in layer.named_parameters():
            if not p.requires_grad or name.startswith("base."):
                continue
            (lam if "lambda" in name else main).append(p)
    groups = [{"params": main, "lr": lr, "weight_decay": weight_decay, "name": "adapter"}]
    if lam:
        groups.append({"params": lam, "lr": lambda_lr if lambda_lr is not None else lr,
                       "weight_decay": 0.0, "name": "lambda"})
    decay, no_decay = [], []
    for module in saved_modules(model, next(iter(layers.values())).config).values():
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "full"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "full_no_decay"})
    return groups
