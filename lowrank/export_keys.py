"""The names a pipeline part's adapters take in diffusers and kohya files (lowrank.export), and one file of several
parts: a UNet and the text encoders trained with it (DreamBooth's --train_text_encoder) go out together, each under
its own prefix, as diffusers' save_lora_weights and kohya's sd-scripts write them."""
from __future__ import annotations

import json

# the model part the adapters live in -> (diffusers key prefix, kohya key prefix)
COMPONENTS = {"unet": ("unet", "lora_unet_"), "text_encoder": ("text_encoder", "lora_te_"),
              "text_encoder_2": ("text_encoder_2", "lora_te2_"), "transformer": ("transformer", "lora_transformer_")}


def part_names(layers: dict, component: str) -> dict[str, str]:
    """{module name: its name in a diffusers/kohya file}. A text encoder's modules are named from the CLIPTextModel
    root, 'text_model.encoder.layers.…' (transformers < 5, and what A1111/ComfyUI/kohya expect); transformers 5
    flattened the model to 'encoder.layers.…', so the prefix is put back (diffusers strips it where the model
    lacks it). The metadata's target_modules keep the model's own names: peft matches them as suffixes, so they
    fit either layout."""
    if component.startswith("text_encoder"):
        return {n: n if n.startswith("text_model.") else f"text_model.{n}" for n in layers}
    return {n: n for n in layers}


def kohya_prefix(component: str, parts) -> str:
    """A part's kohya key prefix: 'lora_te1_' for the first text encoder beside a second one (SDXL, as sd-scripts
    names them and ComfyUI's model_lora_keys_clip maps them: lora_te1_ to CLIP-L, lora_te2_ to CLIP-G); else
    COMPONENTS' ('lora_te_' for SD-1.5's one text encoder)."""
    if component == "text_encoder" and "text_encoder_2" in parts:
        return "lora_te1_"
    return COMPONENTS[component][1]


def joined(files: list[tuple[dict, dict, str]]) -> tuple[dict, dict, str]:
    """One file of several parts' (state, metadata, name): the keys side by side (each under its part's prefix);
    the metadata the first part's, with diffusers' lora_adapter_metadata of every part (keys '<component>.r' …)."""
    state = {k: v for part, _, _ in files for k, v in part.items()}
    meta = dict(files[0][1])
    if len(files) > 1 and "lora_adapter_metadata" in meta:
        every = {k: v for _, m, _ in files for k, v in json.loads(m["lora_adapter_metadata"]).items()}
        meta["lora_adapter_metadata"] = json.dumps(every, indent=2, sort_keys=True)
    return state, meta, files[0][2]
