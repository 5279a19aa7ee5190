"""Measurements of what an adapter does to the model: distances and parameter counts."""
from __future__ import annotations

import torch
from torch import nn

from .inject import adapter_layers
from .layer import AdapterLayer


@torch.no_grad()
def weight_distance(model: nn.Module, relative: bool = False) -> dict[str, float]:
    """{module name: ‖W_eff − W_pretrained‖_F} (÷ ‖W_pretrained‖_F if relative), cheap enough per step.
    Every adapted layer of the model (adapter_layers), measured by layer_distances."""
    return layer_distances(adapter_layers(model), relative)


@torch.no_grad()
def layer_distances(layers: dict[str, AdapterLayer], relative: bool = False) -> dict[str, float]:
    """weight_distance of the given {module name: AdapterLayer} only: a caller that measures every step
    keeps the dict (or part of it) and skips the model walk.

    Layers are grouped by method, shape and options, and each group is measured in one batched call
    (AdapterLayer.distance_all: Gram products of stacked factors, no out x in matrix). One device sync
    for the whole dict."""
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


def delora_bound(state: dict[str, torch.Tensor], layer: str) -> float | None:
    """DeLoRA's proven radius for one layer from its saved tensors (`read_adapter`'s state): ‖ΔW‖_F ≤
    (|λ| + |λ0|) · max‖W̄‖ (DeLoRA Eq. 8; λ0 the frozen initial term of the subtract init, Eq. 9; the norm
    the largest saved ‖W̄‖ scale). None when the layer has no DeLoRA tensors."""
    lam, lam0, norm = (state.get(f"{layer}.{k}") for k in ("delora_lambda", "delora_lambda0", "delora_w_norm"))
    if lam is None or norm is None:
        return None
    return (abs(lam.item()) + (abs(lam0.item()) if lam0 is not None else 0.0)) * float(norm.max())
