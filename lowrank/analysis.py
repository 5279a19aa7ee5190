"""Measurements of what an adapter does to the model: distances, parameter counts, DoRA ΔM/ΔD."""
from __future__ import annotations

import torch
from torch import nn

from .inject import adapter_layers
from .layer import AdapterLayer


@torch.no_grad()
def weight_distance(model: nn.Module, relative: bool = False) -> dict[str, float]:
    """{module name: ‖W_eff − W_pretrained‖_F} (÷ ‖W_pretrained‖_F if relative), cheap enough per step.

    Layers that express ΔW as low-rank factors are grouped by factor shape and their Gram products
    taken in one batched matmul per group; layers with their own
    distance() (DoRA) compute it themselves. One device sync for the whole model."""
    layers = adapter_layers(model)
    if not layers:
        return {}
    sq: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list] = {}
    for name, layer in layers.items():
        if type(layer).distance is not AdapterLayer.distance:
            sq[name] = layer.distance().double() ** 2
            continue
        factors = layer.delta_factors()
        if len(factors) == 1:   # one product: no cancellation between terms, fp32 Grams suffice
            U, V = factors[0]
        else:                   # a difference of nearly equal terms (Eq. 9 style): float64
            U = torch.cat([u.double() for u, _ in factors], dim=1)
            V = torch.cat([v.double() for _, v in factors], dim=0)
        groups.setdefault((U.shape, V.shape, U.dtype, U.device), []).append((name, U, V))
    for items in groups.values():
        U = torch.stack([u for _, u, _ in items])
        V = torch.stack([v for _, _, v in items])
        total = ((U.mT @ U) * (V @ V.mT)).sum(dim=(1, 2)).double().clamp_min(0)
        sq.update({name: t for (name, _, _), t in zip(items, total)})
    device = next(iter(sq.values())).device
    d = torch.stack([sq[name].to(device) for name in layers]).sqrt()
    if relative:
        d = d / torch.stack([layer.w0_norm.double().to(device) for layer in layers.values()])
    return dict(zip(layers, d.tolist()))


def distance_summary(distances: dict[str, float]) -> dict[str, float]:
    vals = list(distances.values())
    return {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else {}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable adapter parameters vs all parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


@torch.no_grad()
def magnitude_direction(W0: torch.Tensor, W: torch.Tensor) -> tuple[float, float]:
    """DoRA §3.2: ΔM = mean_n |‖W_n‖ − ‖W0_n‖|,  ΔD = mean_n (1 − cos(W_n, W0_n)) over the norm axis
    of DoRA's magnitude (output rows of an (out, in) weight)."""
    W0, W = W0.double(), W.double()
    dm = (W.norm(dim=1) - W0.norm(dim=1)).abs().mean()
    dd = (1 - torch.nn.functional.cosine_similarity(W, W0, dim=1)).mean()
    return float(dm), float(dd)
