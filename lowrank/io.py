"""Save and load adapters: adapter_config.json + adapter.safetensors (never pickle).

Keys are "<module name>.<tensor name>" (e.g. "down_blocks.0.attentions.0...to_q.lora_A"); the full weights
of the modules trained in full (config.modules_to_save, e.g. a classification head) are stored under
"modules_to_save.<module name>.<tensor name>" (e.g. "modules_to_save.classifier.weight"). Files are
written under a temporary name and renamed, so a crash never leaves a half-written file; the config also
rides in the safetensors metadata, so a crash between the two renames (new weights, old config) is
detected on load instead of silently pairing tensors with another save's options.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ground.runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_write

from .config import AdapterConfig
from .errors import AdapterError, AdapterFileError, AdapterMismatchError
from .inject import adapter_layers, eject, inject, saved_modules

FORMAT = "lowrank/1"
FULL_PREFIX = "modules_to_save."   # key prefix of the modules trained in full


def model_config(model: nn.Module) -> AdapterConfig:
    layers = adapter_layers(model)
    if not layers:
        raise AdapterError("model has no adapters; call lowrank.inject(model, config) first")
    return next(iter(layers.values())).config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"{name}.{k}": v.detach().contiguous().cpu()
             for name, layer in adapter_layers(model).items() for k, v in layer.adapter_state().items()}
    for name, module in saved_modules(model, model_config(model)).items():
        state.update({f"{FULL_PREFIX}{name}.{k}": v.detach().contiguous().cpu()
                      for k, v in module.state_dict().items()})
    return state


def _full_loader(model: nn.Module, config: AdapterConfig, full: dict[str, torch.Tensor], adapted: list[str]):
    """Check the saved full-module tensors against the model's modules_to_save (names and shapes) and return
    a function that copies them in: everything is validated before anything changes."""
    modules = saved_modules(model, config, adapted)
    plan = []
    for name, module in modules.items():
        own = module.state_dict()
        saved = {k[len(name) + 1:]: v for k, v in full.items() if k.startswith(name + ".")}
        if set(saved) != set(own):
            raise AdapterMismatchError(f"{name} (modules_to_save): saved tensors {sorted(saved)} do not match the "
                                       f"module's {sorted(own)}; the adapter was made for another model")
        for k, v in saved.items():
            if own[k].shape != v.shape:
                raise AdapterMismatchError(f"{name}.{k} (modules_to_save): saved shape {tuple(v.shape)} != "
                                           f"{tuple(own[k].shape)}; the adapter was made for another model "
                                           f"(e.g. another number of labels)")
        plan.append((module, saved))
    stray = [k for k in full if not any(k.startswith(n + ".") for n in modules)]
    if stray:
        raise AdapterMismatchError(f"saved adapter has full weights for {stray[0]!r}, which is not in its "
                                   f"modules_to_save; the file is damaged or from another tool")

    def load() -> None:
        with torch.no_grad():
            for module, saved in plan:
                own = module.state_dict(keep_vars=True)
                for k, v in saved.items():
                    own[k].copy_(v)
    return load


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapter to directory/{adapter_config.json, adapter.safetensors}."""
    config = model_config(model)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out} exists and is not a directory; choose another output path")
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    meta = {"format": FORMAT, "method": config.method, "config": config.to_json()}
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(state, str(p), metadata=meta))
    atomic_write(out / ADAPTER_CONFIG, lambda p: p.write_text(config.to_json()))
    return out


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    d = Path(directory)
    if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise AdapterFileError(f"{d} is not an adapter directory: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        text = (d / ADAPTER_CONFIG).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"cannot read {d / ADAPTER_CONFIG}: {e}") from None
    config = AdapterConfig.from_json(text)
    try:
        with safe_open(str(d / ADAPTER_WEIGHTS), framework="pt") as f:   # one read: tensors and metadata
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{d / ADAPTER_WEIGHTS} is not a valid safetensors file ({e})") from None
    if "config" in meta and AdapterConfig.from_json(meta["config"]) != config:
        raise AdapterFileError(f"{d / ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} come from different saves (interrupted "
                               f"save?); save the adapter again or use an earlier checkpoint")
    return config, state


def _split(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    per_layer: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, value in state.items():
        name, _, tensor = key.rpartition(".")
        if name not in per_layer:
            raise AdapterMismatchError(f"saved adapter has tensors for module {name!r}, which is not adapted in this "
                                       f"model; was it made for another model or other target_modules?")
        per_layer[name][tensor] = value
    return per_layer


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load a saved adapter. A plain model is injected with the saved config (bit-exact rebuild);
    a model that already has adapters must carry the same method, and gets the saved values."""
    config, state = read_adapter(directory)
    full = {k[len(FULL_PREFIX):]: v for k, v in state.items() if k.startswith(FULL_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(FULL_PREFIX)}
    layers = adapter_layers(model)
    if layers:
        current = model_config(model)
        if current.method != config.method:
            raise AdapterMismatchError(f"model has {current.method} adapters but {directory} holds a "
                                       f"{config.method} adapter; eject them first or load into a plain model")
        ours, saved = current.to_dict(), config.to_dict()
        differ = [k for k in ours if k != "target_modules" and ours[k] != saved[k]]
        if differ:   # the tensors would fit, but they mean something else under other options
            raise AdapterMismatchError(f"the model's {current.method} adapters differ from the saved ones in "
                                       f"{', '.join(f'{k} ({ours[k]!r} vs {saved[k]!r})' for k in differ)}; "
                                       f"eject them first or load into a plain model")
        per_layer = _split(state, list(layers))
        for name, layer in layers.items():  # validate everything before changing anything
            if layer.merged:
                raise AdapterError(f"{name} is merged; unmerge(model) before loading an adapter")
            try:
                layer.check_adapter_state(per_layer[name])
            except AdapterMismatchError as e:
                raise AdapterMismatchError(f"{name}: {e}") from None
        load_full = _full_loader(model, config, full, list(layers))
        for name, layer in layers.items():
            layer.load_adapter_state(per_layer[name])
        load_full()
        return list(layers)
    names_in_file = sorted({k.rpartition(".")[0] for k in state})
    missing = [n for n in names_in_file if n not in dict(model.named_modules())]
    if missing:
        raise AdapterMismatchError(f"saved adapter targets modules missing from this model (e.g. {missing[0]!r}); "
                                   f"it was made for another model")
    per_layer = _split(state, names_in_file)
    load_full = _full_loader(model, config, full, names_in_file)
    names = inject(model, config, state=per_layer)   # validates shapes; ejects again on failure
    if sorted(names) != names_in_file:
        eject(model)
        raise AdapterMismatchError(f"the saved config targets {len(names)} modules of this model but the file holds "
                                   f"{len(names_in_file)}; the adapter was made for another model")
    load_full()
    return names
