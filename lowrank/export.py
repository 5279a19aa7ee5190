"""Exact export of a trained adapter into the files other tools load: diffusers, kohya (ComfyUI / A1111), peft.

    lowrank.export(unet, "out/", format="diffusers")   # pipe.load_lora_weights("out/")
    lowrank.export(unet, "out/", format="kohya")       # out/out.safetensors: lora_unet_… for ComfyUI / A1111
    lowrank.export(unet, "out/", format="peft")        # PeftModel.from_pretrained(unet, "out/")
    lowrank.export(unet, "out/", format="diff")        # out/out.safetensors: full ΔW per layer, any method (DoRA)

Why every method fits a plain LoRA file. Every method except DoRA changes a weight by an update of exactly
low rank, and each layer's delta_factors() already gives it as factors, ΔW = W_eff − W0 = Σ_t U_t V_t:
  lora                 s·B A                                             rank r
  deltalora            (1+λ)s·B A − λs·B_K A_K (after the snapshot K)    rank 2r (r before K)
  delora (zero_b)      (λ/r)·B Ξ A diag(‖W̄‖)                             rank r  (DeLoRA Eq. 8)
  delora (subtract)    the same minus the frozen initial update          rank 2r (DeLoRA Eq. 9)
  dyndora              s·Σ c_i b_i a_iᵀ over live components              rank = live components (c_i = 0 dropped)
  ether                H W − W = −2 Û (Ûᵀ W),  Û the n block unit vectors rank n   (one per block of H)
  etherplus one-sided  H⁺W − W = P W,  P = −ÛÛᵀ + V̂V̂ᵀ                     rank 2n
  etherplus            H⁺ W H̃⁺ − W = P W + H⁺ (W P̃)                       rank 4n
  mult_* (V5-V7)       Ĥ W − W = (up @ down) W                               rank r (mult_bounded: 2)
(ETHER's factors contain W0: the export needs the model with its base weights, not the adapter file alone.)
Concatenating the terms, [U_1 … U_T] @ [V_1; …; V_T] = ΔW with no approximation; the file's rank is the sum of
the terms' ranks. The scale (α/r, λΞ/r, ‖W̄‖ …) is folded into the factors, so the file says scale 1
(alpha = rank) and no loader can apply a different one: diffusers reads no adapter_config.json and
silently assumes alpha = rank. Each rank-1 term u vᵀ is split as (u·√(‖v‖/‖u‖), v·√(‖u‖/‖v‖)), both halves of
equal norm, so neither factor is tiny nor huge in fp16 (computed in float64, stored in float32).
Every layer is padded with zero terms to the model's largest rank, so the file has one rank and one alpha:
loaders that derive the scale from the most common rank (older diffusers) cannot get another layer wrong.

DoRA, m ⊙ (W + sBA)/‖W + sBA‖, is not low rank: it goes out in peft's DoRA layout (lora_A, lora_B,
lora_magnitude_vector), which peft and diffusers load exactly, and kohya files are refused.

For ComfyUI and A1111, the `diff` format holds any method, DoRA included, exactly: LyCORIS' full-weight
patch, '<kohya key>.diff' = ΔW = W_eff − W0 with the layer's weight shape, which both add as W += strength·diff
(ComfyUI comfy/lora.py load_lora + calculate_weight 'diff'; A1111 extensions-builtin/Lora/network_full.py).
Its cost is a full matrix per layer (README: the size on SD-1.5). Why not a kohya file with `dora_scale`:
A1111 (network.py apply_weight_decompose) and ComfyUI before its wd_on_output change (2025, comfyanonymous/
ComfyUI pull 7727) rescale *input columns*, m_j/‖(W + ΔW)_:,j‖, which no low-rank ΔW turns into DoRA's
output-row normalisation; ComfyUI after it rescales output rows but by ‖W0_i‖ instead of ‖W0 + ΔW‖_i
(comfy/weight_adapter/base.py weight_decompose), and the same (out, 1) tensor is silently misread by every
build that predates it.
Anything that cannot be exact raises ExportError naming the formats that can hold it; nothing is written.

DiT transformers (component="transformer": FLUX.1's FluxTransformer2DModel, FLUX.2-klein's
Flux2Transformer2DModel). diffusers: 'transformer.<module>.lora_A.weight' / '.lora_B.weight' (+
'.lora_magnitude_vector' for DoRA) and 'transformer.r', '.lora_alpha', '.use_dora' … in lora_adapter_metadata, as
FluxPipeline / Flux2KleinPipeline.save_lora_weights write them: both loader mixins pass such keys through
lora_state_dict unchanged and load_lora_adapter(prefix="transformer") builds the LoraConfig from the metadata
(use_dora included: peft loads DoRA exactly), so nothing is guessed.
kohya and diff: 'lora_transformer_<diffusers module path with _>' + '.lora_down.weight' / '.lora_up.weight' /
'.alpha' = R, or + '.diff'. ComfyUI maps no 'lora_unet_<diffusers path>' for a DiT (comfy/utils.py
unet_to_diffusers is empty there); its FLUX map (comfy/lora.py model_lora_keys_unet, the comfy.model_base.Flux
branch, which FLUX.2 takes too) names every '.weight' of comfy/utils.py flux_to_diffusers in four spellings,
'transformer.<path>' (diffusers/SimpleTuner), 'lycoris_<path with _>', 'lora_transformer_<path with _>'
(OneTrainer) and '<path>' (DiffSynth), FLUX.2's names included (ff.linear_in/out -> img_mlp.0/2, single-block
attn.to_qkv_mlp_proj -> linear1, attn.to_out -> linear2), and sends separate q/k/v layers into their rows of BFL's
fused weights (to_q/k/v -> double_blocks.N.img_attn.qkv rows [0,h), [h,2h), [2h,3h); add_q/k/v_proj ->
txt_attn.qkv; single-block to_q/k/v/proj_mlp -> linear1): calculate_weight narrows dim 0 to the slice, patches it
and restores the full tensor, so each layer keeps its own exact factors (or ΔW) with no fusing. lora_transformer_
is the kohya-shaped one of the four (lora_<component>_<path with _>, as lora_unet_ / lora_te_); a
'transformer.'-prefixed file is what diffusers reads as its own format. A layer ComfyUI's map has no name for
(FLUX.2's shared double_stream_modulation_* / single_stream_modulation / time_guidance_embed layers) is refused
for kohya and diff (COMFY_FLUX): ComfyUI would log 'lora key not loaded' and drop it. sd-scripts' own FLUX
form, 'lora_unet_<BFL name>' (double_blocks_N_img_attn_qkv …), was not chosen: it needs q, k and v fused into
one LoRA per BFL weight (block-diagonal up, stacked down: 3x the rank, 4x on FLUX.1's linear1). These two files
are for ComfyUI; diffusers reads the 'diffusers' file: FluxPipeline reads only the attention layers of a
lora_transformer_ file (its OneTrainer branch, _convert_mixture_state_dict_to_diffusers, fails on feed-forward
names) and Flux2KleinPipeline none of it (_convert_kohya_flux2_lora_to_diffusers knows only lora_unet_<BFL name>
keys and drops the rest with a warning).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ground.runfolder import atomic_write

from .errors import AdapterError, AdapterFileError
from .export_keys import COMPONENTS, joined, kohya_prefix, part_names
from .inject import adapter_layers, saved_modules
from .io import model_config
from .methods.lora import peft_lora_config
from .registry import METHODS

FORMATS = ("diffusers", "kohya", "peft", "diff")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"   # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# The diffusers FLUX.1 / FLUX.2 module paths ComfyUI's FLUX LoRA map names: the '.weight' keys of comfy/utils.py
# flux_to_diffusers (Comfy-Org/ComfyUI b3be02d6; rows marked '# Flux 2' and the ff.linear_in/out rows included).
# Their BFL targets (qkv/linear1 slices, norm_out's scale/shift swap) are ComfyUI's business: the file holds
# each diffusers layer's own ΔW.
COMFY_FLUX = re.compile(
    r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(_context)?\.linear"
    r"|ff(_context)?\.(net\.0\.proj|net\.2|linear_in|linear_out))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_qkv_mlp_proj|to_out)|proj_mlp|proj_out|norm\.linear)"
    r"|proj_out|x_embedder|context_embedder|norm_out\.linear|controlnet_x_embedder"
    r"|time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12]")


class ExportError(AdapterError, ValueError):
    """A method the requested format cannot hold exactly; the message names the formats that can."""


def _method(model: nn.Module) -> type:
    """The AdapterLayer class of the model's adapters: what each export asks of the method is on it."""
    return METHODS[model_config(model).method]


def _refuse_unless_low_rank(method: type, fmt: str) -> None:
    """Files of LoRA factors alone hold only methods whose ΔW is exactly low rank."""
    if not method.low_rank_exact:
        raise ExportError(method.export_refusal.format(fmt=fmt))


def _refuse_unless_comfy_flux(layers: dict, component: str, fmt: str) -> None:
    """A DiT transformer's kohya / diff file is read through ComfyUI's FLUX map: every layer must have a name there."""
    if component != "transformer":
        return
    unnamed = [n for n in layers if not COMFY_FLUX.fullmatch(n)]
    if unnamed:
        raise ExportError(f"ComfyUI's FLUX LoRA map (comfy/utils.py flux_to_diffusers) has no name for "
                          f"{unnamed[0]}{f' (and {len(unnamed) - 1} more)' if len(unnamed) > 1 else ''}, so a "
                          f"{fmt} file would lose it; export it as 'diffusers' or 'peft', or leave it out of "
                          f"target_modules")


# ----- factors --------------------------------------------------------------------------------------
@torch.no_grad()
def _balanced(up: torch.Tensor, down: torch.Tensor, drop_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down unchanged, each rank-1 term split so that ‖up_k‖ = ‖down_k‖ (float64);
    terms that are exactly zero (pruned dyndora components, B = 0 columns) dropped when drop_zero."""
    up, down = up.double(), down.double()
    nu, nv = up.norm(dim=0), down.norm(dim=1)
    live = (nu > 0) & (nv > 0)
    if drop_zero:
        up, down, nu, nv, live = up[:, live], down[live], nu[live], nv[live], live[live]
    g = torch.where(live, (nv / nu.where(live, torch.ones_like(nu))).sqrt(), torch.ones_like(nu))
    return up * g, down / g.unsqueeze(1)


@torch.no_grad()
def lora_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, k), down (k, in)) in float64 with up @ down = ΔW = W_eff − W0 exactly (module docstring)."""
    _refuse_unless_low_rank(type(layer), "LoRA")
    terms = layer.delta_factors()
    up = torch.cat([u.detach().double() for u, _ in terms], dim=1)
    down = torch.cat([v.detach().double() for _, v in terms], dim=0)
    return _balanced(up, down)


def _pad(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = up.shape[1]
    return (torch.cat([up, up.new_zeros(up.shape[0], rank - k)], dim=1),
            torch.cat([down, down.new_zeros(rank - k, down.shape[1])], dim=0))


def _as_layer_weight(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """float32, contiguous, on the CPU; 4-D (…, 1, 1) for a 1x1 conv, as peft's and kohya's conv LoRA hold it."""
    t = t.detach().float().cpu()
    return (t.reshape(*t.shape, 1, 1) if conv else t).contiguous()


def _checked_layers(model: nn.Module) -> dict:
    model_config(model)   # raises "model has no adapters" with the one wording lowrank uses
    layers = adapter_layers(model)
    for name, layer in layers.items():
        if layer.merged:
            raise AdapterError(f"{name} is merged; unmerge(model) before exporting (the factors need W0)")
    return layers


def low_rank_state(model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """{module name: (up (out, R), down (R, in))} with one rank R for every layer (zero-padded), and R."""
    layers = _checked_layers(model)
    factors = {name: lora_factors(layer) for name, layer in layers.items()}
    rank = max(1, max(u.shape[1] for u, _ in factors.values()))
    return {name: _pad(u, v, rank) for name, (u, v) in factors.items()}, rank


def _magnitude_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{name: (up, down, magnitude)} of a method that is not low_rank_exact (DoRA), the scale folded into the
    factors (peft's DoRA sees only s·BA)."""
    out = {}
    for name, layer in _checked_layers(model).items():
        up, down, mag = layer.magnitude_factors()
        out[name] = (*_balanced(up, down, drop_zero=False), mag)
    return out


# ----- formats --------------------------------------------------------------------------------------
def _diffusers(model: nn.Module, component: str) -> tuple[dict, dict, str]:
    """Keys as diffusers' save_lora_weights writes them: '<component>.<module>.lora_A.weight' / 'lora_B.weight'
    (+ '.lora_magnitude_vector' for DoRA), and the peft config as 'lora_adapter_metadata' JSON with keys
    '<component>.r', '<component>.lora_alpha' … (diffusers' _pack_dict_with_prefix)."""
    prefix = COMPONENTS[component][0]
    layers = adapter_layers(model)
    file_names = part_names(layers, component)
    state: dict[str, torch.Tensor] = {}
    low_rank = _method(model).low_rank_exact
    if not low_rank:
        dora = _magnitude_state(model)
        for name, (up, down, mag) in dora.items():
            conv, key = layers[name].is_conv, f"{prefix}.{file_names[name]}"
            state[f"{key}.lora_A.weight"] = _as_layer_weight(down, conv)
            state[f"{key}.lora_B.weight"] = _as_layer_weight(up, conv)
            # peft's DoRA magnitude: (out,) for Linear, (1, out, 1, 1) for Conv2d
            state[f"{key}.lora_magnitude_vector"] = mag.float().cpu().reshape(
                (1, -1, 1, 1) if conv else (-1,)).contiguous()
        rank = next(iter(dora.values()))[0].shape[1]
    else:
        factors, rank = low_rank_state(model)
        for name, (up, down) in factors.items():
            conv, key = layers[name].is_conv, f"{prefix}.{file_names[name]}"
            state[f"{key}.lora_A.weight"] = _as_layer_weight(down, conv)
            state[f"{key}.lora_B.weight"] = _as_layer_weight(up, conv)
    cfg = peft_lora_config(rank, float(rank), sorted(layers), dora=not low_rank)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in cfg.items()},
                                                                indent=2, sort_keys=True)}
    return state, meta, DIFFUSERS_WEIGHTS


def _kohya(model: nn.Module, component: str, file_name: str, prefix: str) -> tuple[dict, dict, str]:
    """kohya-ss sd-scripts' networks.lora keys, what ComfyUI and A1111 read: 'lora_unet_<module path with _>'
    + '.lora_down.weight' (R, in[, 1, 1]), '.lora_up.weight' (out, R[, 1, 1]), '.alpha' = R (scale alpha/R = 1)."""
    _refuse_unless_low_rank(_method(model), "kohya")
    layers = adapter_layers(model)
    _refuse_unless_comfy_flux(layers, component, "kohya")
    factors, rank = low_rank_state(model)
    state = {}
    file_names = part_names(layers, component)
    for name, (up, down) in factors.items():
        key = prefix + file_names[name].replace(".", "_")
        conv = layers[name].is_conv
        state[f"{key}.lora_down.weight"] = _as_layer_weight(down, conv)
        state[f"{key}.lora_up.weight"] = _as_layer_weight(up, conv)
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "lowrank_method": model_config(model).method}
    return state, meta, file_name


@torch.no_grad()
def dense_delta(layer: nn.Module) -> torch.Tensor:
    """ΔW = W_eff − W0 of one layer as an (out, in) float64 matrix: the product of its exact factors, or for a
    method that is not low_rank_exact (DoRA) its own float64 dense_delta(). Not the layer's delta_weight(): that
    one is fp32, which is too coarse for the diff file of a small effect."""
    if not layer.low_rank_exact:
        return layer.dense_delta()
    up, down = lora_factors(layer)
    return up @ down


def _diff(model: nn.Module, component: str, file_name: str, prefix: str) -> tuple[dict, dict, str]:
    """LyCORIS' full-weight patch under kohya keys: 'lora_unet_<module path with _>.diff' = ΔW in the layer
    weight's own shape ((out, in, 1, 1) for a 1x1 conv: ComfyUI skips a diff whose shape differs), float32."""
    layers = _checked_layers(model)
    _refuse_unless_comfy_flux(layers, component, "diff")
    file_names = part_names(layers, component)
    state = {}
    for name, layer in layers.items():
        delta = dense_delta(layer)
        if getattr(layer, "fan_in_fan_out", False):   # GPT-2 Conv1D keeps its weight as (in, out)
            delta = delta.T
        key = prefix + file_names[name].replace(".", "_")
        state[f"{key}.diff"] = delta.float().cpu().reshape(layer.base.weight.shape).contiguous()
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"}),
            "lowrank_method": model_config(model).method}
    return state, meta, file_name


def _native_peft(model: nn.Module, prefix: str) -> tuple[dict, dict] | None:
    """The adapter as peft itself would train it (the method's peft_config and peft_state): a peft user can keep
    training it. None where peft has no such method, or not with these options or layers."""
    cfg = model_config(model)
    layers = _checked_layers(model)
    peft_cfg = METHODS[cfg.method].peft_config(cfg, sorted(layers), any(layer.is_conv for layer in layers.values()))
    if peft_cfg is None:
        return None
    state = {f"{prefix}{name}.{k}": v.float().contiguous().cpu()
             for name, layer in layers.items() for k, v in layer.peft_state().items()}
    return state, peft_cfg


def _peft(model: nn.Module, prefix: str) -> tuple[dict, dict]:
    native = _native_peft(model, prefix)
    if native is not None:
        return native
    layers = adapter_layers(model)
    state = {}
    if not _method(model).low_rank_exact:   # DoRA on 1x1 convs: peft's conv DoRA layout, scale folded
        for name, (up, down, mag) in _magnitude_state(model).items():
            conv = layers[name].is_conv
            state[f"{prefix}{name}.lora_A.weight"] = _as_layer_weight(down, conv)
            state[f"{prefix}{name}.lora_B.weight"] = _as_layer_weight(up, conv)
            state[f"{prefix}{name}.lora_magnitude_vector"] = mag.float().cpu().reshape(
                (1, -1, 1, 1) if conv else (-1,)).contiguous()
        rank, dora = model_config(model).rank, True
    else:   # every other method: an exact plain LoRA of the rank it needs (module docstring)
        factors, rank = low_rank_state(model)
        for name, (up, down) in factors.items():
            conv = layers[name].is_conv
            state[f"{prefix}{name}.lora_A.weight"] = _as_layer_weight(down, conv)
            state[f"{prefix}{name}.lora_B.weight"] = _as_layer_weight(up, conv)
        dora = False
    return state, {"peft_type": "LORA", **peft_lora_config(rank, float(rank), sorted(layers), dora=dora)}


# ----- entry points ---------------------------------------------------------------------------------
def export(model: nn.Module | dict[str, nn.Module], directory: str | os.PathLike, format: str = "diffusers",
           component: str = "unet", peft_prefix: str = "base_model.model.", name: str | None = None,
           base_model: str | None = None) -> Path:
    """Write the adapters injected in `model` to `directory` in `format`; returns the weights file's path.

    diffusers: directory/pytorch_lora_weights.safetensors, for pipe.load_lora_weights(directory).
    kohya:     directory/<name>.safetensors (lora_unet_… keys; name defaults to the directory's name), for
               ComfyUI / A1111 (copy it into their LoRA folder) and diffusers; a transformer's
               (lora_transformer_… keys) is for ComfyUI.
    diff:      directory/<name>.safetensors with '<kohya key>.diff' full ΔW tensors: ComfyUI / A1111, any
               method exactly (DoRA's only way into them), a full matrix per layer.
    peft:      directory/{adapter_config.json, adapter_model.safetensors}, for PeftModel.from_pretrained.
    `component` says which pipeline part `model` is ("unet", "text_encoder", or "transformer" for a DiT's
    FluxTransformer2DModel / Flux2Transformer2DModel): it sets the key prefix of diffusers and kohya files
    ('transformer.' for FluxPipeline / Flux2KleinPipeline.load_lora_weights, 'lora_transformer_' for ComfyUI's
    FLUX map; module docstring). `model` may instead be {component: model} of several parts of one pipeline
    (a UNet and the text encoders trained with it): diffusers, kohya and diff files then hold every part's keys
    under its own prefix, as diffusers' save_lora_weights and kohya's sd-scripts write them (SDXL's two text
    encoders: 'text_encoder.' / 'text_encoder_2.', 'lora_te1_' / 'lora_te2_'; SD-1.5's one: 'lora_te_'); a peft
    file holds one model. `base_model` is what a peft config names as its base_model_name_or_path (a
    hub name or a local folder; peft's AutoPeftModel loads the base from it). The model must hold its
    pretrained base weights, unmerged (ETHER's and DeLoRA's factors depend on W0). Raises ExportError for a
    method the format cannot hold exactly (DoRA in kohya), before anything is written.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    parts = dict(model) if isinstance(model, dict) else {component: model}
    unknown = [c for c in parts if c not in COMPONENTS]
    if unknown:
        raise ExportError(f"unknown component {unknown[0]!r}; choose one of {', '.join(COMPONENTS)}")
    if format == "peft" and len(parts) > 1:
        raise ExportError(f"a peft folder holds one model; export {', '.join(parts)} one at a time")
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out} exists and is not a directory; choose another output path")
    # every tensor is built (and every refusal raised) before the first byte is written
    if format == "diffusers":
        state, meta, name = joined([_diffusers(m, c) for c, m in parts.items()])
    elif format in ("kohya", "diff"):
        writer = _kohya if format == "kohya" else _diff
        file_name = f"{name or out.resolve().name or 'lora'}.safetensors"
        state, meta, name = joined([writer(m, c, file_name, kohya_prefix(c, parts)) for c, m in parts.items()])
    else:
        state, peft_cfg = _peft(parts[next(iter(parts))], peft_prefix)
        peft_cfg.update({"task_type": None, "base_model_name_or_path": base_model, "inference_mode": True})
        _peft_extras(parts[next(iter(parts))], peft_prefix, state, peft_cfg)
        meta, name = {"format": "pt"}, PEFT_WEIGHTS
    _check_finite(state)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / name, lambda p: save_file(state, str(p), metadata=meta))
    if format == "peft":
        atomic_write(out / PEFT_CONFIG, lambda p: p.write_text(json.dumps(peft_cfg, indent=2)))
    return out / name


def _peft_extras(model: nn.Module, prefix: str, state: dict, peft_cfg: dict) -> None:
    """What peft keeps beside the adapters: the modules trained in full under their own names
    ('<prefix><module>.<tensor>', peft's modules_to_save keys, which its loader maps to the wrapper's copy) and
    fan_in_fan_out for GPT-2 Conv1D layers (weight stored transposed; the factors stay (r, in) and (out, r))."""
    full = saved_modules(model, model_config(model))
    for name, module in full.items():
        state.update({f"{prefix}{name}.{k}": v.detach().float().contiguous().cpu()
                      for k, v in module.state_dict().items()})
    if full:
        peft_cfg["modules_to_save"] = sorted(full)
    if any(getattr(layer, "fan_in_fan_out", False) for layer in adapter_layers(model).values()):
        peft_cfg["fan_in_fan_out"] = True


def _check_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"the adapter has non-finite values ({bad[0]}{' …' if len(bad) > 1 else ''}); "
                          f"export an earlier checkpoint")


def export_peft(model: nn.Module, directory: str | os.PathLike, prefix: str = "base_model.model.") -> Path:
    """peft's format (adapter_config.json + adapter_model.safetensors): export(model, directory, 'peft')."""
    export(model, directory, "peft", peft_prefix=prefix)
    return Path(directory)


if __name__ == "__main__":   # the CLI needs the base model, which needs diffusers: it lives in training/
    print("error: exporting needs the base model's weights (ETHER's and DeLoRA's factors depend on W0), so the "
          "command is: python -m training.export RUN_OR_ADAPTER_DIR --format diffusers --output DIR",
          file=sys.stderr)
    sys.exit(2)
