"""Find target modules by name, swap them for adapter layers, and put them back."""
from __future__ import annotations

import re

from torch import nn

from . import prepare
from .config import AdapterConfig
from .errors import AdapterError, TargetError
from .layer import adapter_layers
from .registry import METHODS

# adapter_layers lives in layer.py (methods use it)
__all__ = ["adapter_layers", "eject", "inject", "matches", "saved_modules"]


def matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def saved_modules(model: nn.Module, config: AdapterConfig, adapted: list[str] | None = None) -> dict[str, nn.Module]:
    """{name: module} of config.modules_to_save in `model` (outermost matches only): the modules trained in
    full and saved with the adapter. TargetError when a name matches nothing or holds an adapted layer."""
    if not config.modules_to_save:
        return {}
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and matches(name, config.modules_to_save) and not any(name.startswith(f + ".") for f in found):
            found[name] = module
    missing = [t for t in config.modules_to_save if not any(matches(n, [t]) for n in found)]
    if missing:
        raise TargetError(f"modules_to_save {missing[0]!r} matched no module of this model")
    adapted = adapted if adapted is not None else list(adapter_layers(model))
    for name in found:
        inner = [a for a in adapted if a == name or a.startswith(name + ".")]
        if inner:
            raise TargetError(f"{name} is in modules_to_save but holds the adapted layer {inner[0]}; "
                              f"train a module either in full or through an adapter")
    return found


def inject(model: nn.Module, config: AdapterConfig, state: dict | None = None) -> list[str]:
    """Wrap every module whose name matches config.target_modules, leave config.modules_to_save trainable
    (trained in full), freeze everything else.

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
    full = saved_modules(model, config, names)   # checked before anything changes
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
    for module in full.values():   # e.g. a new classification head: trained in full, saved with the adapter
        module.requires_grad_(True)
    prepare.install(model)   # batched per-forward factor preparation for methods that have one
    return names


def eject(model: nn.Module, merge: bool = False) -> list[str]:
    """Put the base modules back (merging the update into them first if merge=True)."""
    layers = adapter_layers(model)
    prepare.uninstall(model)
    for name, layer in layers.items():
        layer._prepared = None
        if merge:
            layer.merge()
        else:
            layer.release()
        _set_module(model, name, layer.base)
    return list(layers)
