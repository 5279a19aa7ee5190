"""Per-forward batched preparation of adapter factors.

A method whose forward first turns its parameters into factors (DeLoRA: the norms in Ξ, the λ/r and
‖W̄‖ scalings, the frozen initial copy) pays a dozen small ops per layer per forward and as many in
backward, whatever the layer's size: at the token counts of a UNet's inner blocks that is most of its
cost over LoRA. inject() installs a forward pre-hook on the model it adapts; each forward of that model
runs the method's prepare_all() once per group of same-shaped layers, in batched ops over stacked
parameters, and each layer takes its slice (AdapterLayer.take_prepared). A layer called on its own, after
an optimizer step, or in another grad mode than the prepared tensors falls back to its own computation,
so the outputs and gradients are the same either way.
"""
from __future__ import annotations

from torch import nn

from .layer import AdapterLayer, adapter_layers

HANDLE = "_lowrank_prepare_handle"


class Preparation:
    """The forward pre-hook: prepare_all() of every group with something to prepare."""

    def __init__(self, groups: list[list[AdapterLayer]]):
        self.groups = groups

    def __call__(self, module: nn.Module, args) -> None:
        for layers in self.groups:
            if not layers[0].merged:   # a merged layer runs its base weight: nothing to prepare
                type(layers[0]).prepare_all(layers)


def preparing_groups(model: nn.Module) -> list[list[AdapterLayer]]:
    """Adapter layers of `model` whose class overrides prepare_all, grouped by method, shape, options, device;
    groups of two or more (a layer alone computes its own factors in fewer ops than stacking a group of one)."""
    groups: dict[tuple, list[AdapterLayer]] = {}
    for layer in adapter_layers(model).values():
        if type(layer).prepare_all.__func__ is not AdapterLayer.prepare_all.__func__:
            groups.setdefault((*layer.distance_group(), layer.weight.device), []).append(layer)
    return [layers for layers in groups.values() if len(layers) > 1]


def install(model: nn.Module) -> None:
    """(Re)install the pre-hook on `model` for its current adapter layers (none when nothing prepares)."""
    uninstall(model)
    groups = preparing_groups(model)
    if groups:
        setattr(model, HANDLE, model.register_forward_pre_hook(Preparation(groups)))


def uninstall(model: nn.Module) -> None:
    handle = model.__dict__.pop(HANDLE, None)
    if handle is not None:
        handle.remove()
