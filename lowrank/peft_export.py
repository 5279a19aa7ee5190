"""Export lora / dora / delora adapters in peft's format (adapter_config.json + adapter_model.safetensors),
so `peft.PeftModel.from_pretrained(base, dir)` (and tools that read peft files, e.g. diffusers) load them.

Conventions pinned here (peft ≥ 0.18): DoRA's magnitude is per output row, key `lora_magnitude_vector`;
DeLoRA's w_norm is per input column, key `delora_w_norm`. peft has no DeLoRA subtract init (Eq. 9) and no
frobenius/none norm, so only delora_init='zero_b' with delora_norm='column' exports.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .errors import AdapterError
from .inject import adapter_layers
from .io import _atomic_write, model_config

PEFT_WEIGHTS = "adapter_model.safetensors"


def export_peft(model: nn.Module, directory: str | os.PathLike, prefix: str = "base_model.model.") -> Path:
    cfg = model_config(model)
    layers = adapter_layers(model)
    if cfg.method not in ("lora", "dora", "delora"):
        raise AdapterError(f"peft has no {cfg.method} method; peft export supports lora, dora and delora")
    if cfg.method == "delora" and (cfg.delora_init != "zero_b" or cfg.delora_norm != "column"):
        raise AdapterError("peft's DeLoRA only has B = 0 init and column norms: "
                           "train with delora_init=zero_b and delora_norm=column to export")
    state = {}
    for name, layer in layers.items():
        if layer.merged:
            raise AdapterError(f"{name} is merged; unmerge(model) before exporting")
        if layer.is_conv and cfg.method != "lora":
            raise AdapterError(f"{name} is a 1x1 conv; peft export of {cfg.method} supports nn.Linear only")
        key = prefix + name
        conv = (1, 1) if layer.is_conv else ()
        if cfg.method in ("lora", "dora"):
            state[f"{key}.lora_A.weight"] = layer.lora_A.detach().reshape(*layer.lora_A.shape, *conv)
            state[f"{key}.lora_B.weight"] = layer.lora_B.detach().reshape(*layer.lora_B.shape, *conv)
            if cfg.method == "dora":
                state[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude.detach()
        else:
            for t in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"):
                state[f"{key}.{t}"] = getattr(layer, t).detach()
    state = {k: v.float().contiguous().cpu() for k, v in state.items()}
    targets = sorted(layers)
    if cfg.method == "delora":
        peft_cfg = {"peft_type": "DELORA", "r": cfg.rank, "delora_lambda": cfg.delora_lambda,
                    "module_dropout": cfg.dropout, "target_modules": targets, "init_weights": True}
    else:
        peft_cfg = {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                    "target_modules": targets, "use_dora": cfg.method == "dora", "bias": "none",
                    "init_lora_weights": True}
    peft_cfg.update({"task_type": None, "base_model_name_or_path": None, "inference_mode": True})
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(peft_cfg, indent=2)))
    return out
