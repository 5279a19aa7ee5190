"""Find target modules by name, swap them for adapter layers, and put them back."""
from __future__ import annotations

import re

from torch import nn

from .config import AdapterConfig
from .errors import AdapterError, TargetError
from .layer import adapter_layers
from .registry import METHODS

__all__ = ["adapter_layers", "eject", "inject", "matches"]   # adapter_layers lives in layer.py (methods use it)


def matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: AdapterConfig, state: dict | None = None) -> list[str]:
    """Wrap every module whose name matches config.target_modules; freeze everything else.

    `state` (module name -> adapter tensors) gives the layers their initial values instead of a
    random init; load_adapter uses it so a fresh model is rebuilt bit for bit.
    Returns the adapted module names.
    """
    if adapter_layers(model):
        raise AdapterError("model already has adapters; call lowrank.eject(model) first")
    names = [n for n, _ in model.named_modules() if n and matches(n, config.target_modules)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        hint = ", ".join(linear[:6]) + (" ..." if len(linear) > 6 else "")
        raise TargetError(f"target_modules {config.target_modules!r} matched no module; "
                          f"linear modules in this model include: {hint or 'none'}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    cls = METHODS[config.method]
    for name in names:
        base = model.get_submodule(name)
        try:
            layer = cls(base, config, init_state=(state or {}).get(name))
        except AdapterError as e:
            eject(model)  # never leave a half-injected (or needlessly frozen) model behind
            for p in trainable:
                p.requires_grad_(True)
            raise type(e)(f"{name}: {e}") from None
        _set_module(model, name, layer)
    return names


def eject(model: nn.Module, merge: bool = False) -> list[str]:
    """Put the base modules back (merging the update into them first if merge=True)."""
    layers = adapter_layers(model)
    for name, layer in layers.items():
        if merge:
            layer.merge()
        else:
            layer.release()
        _set_module(model, name, layer.base)
    return list(layers)
