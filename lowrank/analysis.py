"""Measurements of what an adapter does to the model: distances and parameter counts."""
from __future__ import annotations

import torch
from torch import nn

from .inject import adapter_layers


@torch.no_grad()
def weight_distance(model: nn.Module, relative: bool = False) -> dict[str, float]:
    """{module name: ‖W_eff − W_pretrained‖_F} (÷ ‖W_pretrained‖_F if relative), cheap enough per step.

    Layers are grouped by method, shape and options, and each group is measured in one batched call
    (AdapterLayer.distance_all: Gram products of stacked factors, no out x in matrix). One device sync
    for the whole model."""
    layers = adapter_layers(model)
    if not layers:
        return {}
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(layer.distance_group(), []).append(name)
    order = [n for names in groups.values() for n in names]
    parts = [key[0].distance_all([layers[n] for n in names]) for key, names in groups.items()]
    device = parts[0].device
    d = torch.cat([p.to(device) for p in parts]).sqrt()
    if relative:
        d = d / torch.stack([layers[n].w0_norm.double().to(device) for n in order])
    values = dict(zip(order, d.tolist()))
    return {name: values[name] for name in layers}


def distance_summary(distances: dict[str, float]) -> dict[str, float]:
    vals = list(distances.values())
    return {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else {}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable adapter parameters vs all parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}

