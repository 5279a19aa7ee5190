"""ComfyUI's FLUX LoRA loading (FLUX.1 and FLUX.2), re-implemented from its source for tests (ComfyUI is not
installed here). tests/comfy_keys.py is the SDXL (UNet) counterpart; its load_lora is reused as is.

Source: github.com/Comfy-Org/ComfyUI (formerly comfyanonymous/ComfyUI), the files at these commits:
  comfy/utils.py flux_to_diffusers, swap_scale_shift            b3be02d6e766a8d3743dcf99cc967118f3ec8e3e
      (with the FLUX.2 rows: single-block 'attn.to_qkv_mlp_proj' -> linear1, 'attn.to_out' -> linear2, marked
      '# Flux 2', and the double-block 'ff.linear_in/out', 'ff_context.linear_in/out' rows)
  comfy/lora.py model_lora_keys_unet (its generic part and the `isinstance(model, comfy.model_base.Flux)` branch,
      which comfy.model_base.Flux2(Flux) takes too), load_lora, calculate_weight
                                                                   ec93dcacb96b922f7cb1417b3ba22bccb082df32
  comfy/model_detection.py convert_diffusers_mmdit (Flux branch: a diffusers FLUX transformer's weights renamed
      to BFL names, q/k/v written into the rows of the fused qkv / linear1), detect_unet_config (Flux branch:
      hidden_size from img_in / txt_in, depth and depth_single_blocks counted)
                                                                   a125cd84b054a57729b5eecab930ca9408719832 and
                                                                   a9fc7512309a2e357f65f48fa770945c56bc0d50
  comfy/weight_adapter/lora.py LoRAAdapter.load / calculate_weight, comfy/model_patcher.py add_patches (a
      key-map value (key, offset[, function]) becomes a patch (strength, adapter, strength_model, offset,
      function) on `key`), comfy/sd.py load_lora_for_models   a125cd84b054a57729b5eecab930ca9408719832
  comfy/lora_convert.py convert_lora (incl. the fused-qkv splitter for Krea2 files)
                                                                   2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5

The path a file takes: load_lora_for_models: key_map = model_lora_keys_unet(model) -> convert_lora(lora) ->
load_lora(lora, key_map) -> ModelPatcher.add_patches; when the model runs, patch_weight_to_device calls
calculate_weight(patches, float32 copy of the weight, key). The code keeps ComfyUI's names and structure.
"""
from __future__ import annotations

import re

import torch

from tests.comfy_keys import count_blocks, generic_unet_keys, load_lora  # noqa: F401 (load_lora: same code for FLUX)


# ----- comfy/utils.py -----------------------------------------------------------------------------------
def swap_scale_shift(weight):
    shift, scale = weight.chunk(2, dim=0)
    new_weight = torch.cat([scale, shift], dim=0)
    return new_weight


def flux_to_diffusers(mmdit_config: dict, output_prefix: str = "") -> dict:
    """comfy/utils.py flux_to_diffusers, line for line: {diffusers key: BFL key, or (BFL key, (dim, start, length))
    for a slice of a fused weight, or (BFL key, None, function)}."""
    n_double_layers = mmdit_config.get("depth", 0)
    n_single_layers = mmdit_config.get("depth_single_blocks", 0)
    hidden_size = mmdit_config.get("hidden_size", 0)

    key_map = {}
    for index in range(n_double_layers):
        prefix_from = "transformer_blocks.{}".format(index)
        prefix_to = "{}double_blocks.{}".format(output_prefix, index)

        for end in ("weight", "bias"):
            k = "{}.attn.".format(prefix_from)
            qkv = "{}.img_attn.qkv.{}".format(prefix_to, end)
            key_map["{}to_q.{}".format(k, end)] = (qkv, (0, 0, hidden_size))
            key_map["{}to_k.{}".format(k, end)] = (qkv, (0, hidden_size, hidden_size))
            key_map["{}to_v.{}".format(k, end)] = (qkv, (0, hidden_size * 2, hidden_size))

            k = "{}.attn.".format(prefix_from)
            qkv = "{}.txt_attn.qkv.{}".format(prefix_to, end)
            key_map["{}add_q_proj.{}".format(k, end)] = (qkv, (0, 0, hidden_size))
            key_map["{}add_k_proj.{}".format(k, end)] = (qkv, (0, hidden_size, hidden_size))
            key_map["{}add_v_proj.{}".format(k, end)] = (qkv, (0, hidden_size * 2, hidden_size))

        block_map = {
            "attn.to_out.0.weight": "img_attn.proj.weight",
            "attn.to_out.0.bias": "img_attn.proj.bias",
            "norm1.linear.weight": "img_mod.lin.weight",
            "norm1.linear.bias": "img_mod.lin.bias",
            "norm1_context.linear.weight": "txt_mod.lin.weight",
            "norm1_context.linear.bias": "txt_mod.lin.bias",
            "attn.to_add_out.weight": "txt_attn.proj.weight",
            "attn.to_add_out.bias": "txt_attn.proj.bias",
            "ff.net.0.proj.weight": "img_mlp.0.weight",
            "ff.net.0.proj.bias": "img_mlp.0.bias",
            "ff.net.2.weight": "img_mlp.2.weight",
            "ff.net.2.bias": "img_mlp.2.bias",
            "ff_context.net.0.proj.weight": "txt_mlp.0.weight",
            "ff_context.net.0.proj.bias": "txt_mlp.0.bias",
            "ff_context.net.2.weight": "txt_mlp.2.weight",
            "ff_context.net.2.bias": "txt_mlp.2.bias",
            "ff.linear_in.weight": "img_mlp.0.weight",  # LyCoris LoKr
            "ff.linear_in.bias": "img_mlp.0.bias",
            "ff.linear_out.weight": "img_mlp.2.weight",
            "ff.linear_out.bias": "img_mlp.2.bias",
            "ff_context.linear_in.weight": "txt_mlp.0.weight",
            "ff_context.linear_in.bias": "txt_mlp.0.bias",
            "ff_context.linear_out.weight": "txt_mlp.2.weight",
            "ff_context.linear_out.bias": "txt_mlp.2.bias",
            "attn.norm_q.weight": "img_attn.norm.query_norm.weight",
            "attn.norm_k.weight": "img_attn.norm.key_norm.weight",
            "attn.norm_added_q.weight": "txt_attn.norm.query_norm.weight",
            "attn.norm_added_k.weight": "txt_attn.norm.key_norm.weight",
        }

        for k in block_map:
            key_map["{}.{}".format(prefix_from, k)] = "{}.{}".format(prefix_to, block_map[k])

    for index in range(n_single_layers):
        prefix_from = "single_transformer_blocks.{}".format(index)
        prefix_to = "{}single_blocks.{}".format(output_prefix, index)

        for end in ("weight", "bias"):
            k = "{}.attn.".format(prefix_from)
            qkv = "{}.linear1.{}".format(prefix_to, end)
            key_map["{}to_q.{}".format(k, end)] = (qkv, (0, 0, hidden_size))
            key_map["{}to_k.{}".format(k, end)] = (qkv, (0, hidden_size, hidden_size))
            key_map["{}to_v.{}".format(k, end)] = (qkv, (0, hidden_size * 2, hidden_size))
            key_map["{}.proj_mlp.{}".format(prefix_from, end)] = (qkv, (0, hidden_size * 3, hidden_size * 4))

        block_map = {
            "norm.linear.weight": "modulation.lin.weight",
            "norm.linear.bias": "modulation.lin.bias",
            "proj_out.weight": "linear2.weight",
            "proj_out.bias": "linear2.bias",
            "attn.norm_q.weight": "norm.query_norm.weight",
            "attn.norm_k.weight": "norm.key_norm.weight",
            "attn.to_qkv_mlp_proj.weight": "linear1.weight",  # Flux 2
            "attn.to_out.weight": "linear2.weight",  # Flux 2
        }

        for k in block_map:
            key_map["{}.{}".format(prefix_from, k)] = "{}.{}".format(prefix_to, block_map[k])

    MAP_BASIC = {
        ("final_layer.linear.bias", "proj_out.bias"),
        ("final_layer.linear.weight", "proj_out.weight"),
        ("img_in.bias", "x_embedder.bias"),
        ("img_in.weight", "x_embedder.weight"),
        ("time_in.in_layer.bias", "time_text_embed.timestep_embedder.linear_1.bias"),
        ("time_in.in_layer.weight", "time_text_embed.timestep_embedder.linear_1.weight"),
        ("time_in.out_layer.bias", "time_text_embed.timestep_embedder.linear_2.bias"),
        ("time_in.out_layer.weight", "time_text_embed.timestep_embedder.linear_2.weight"),
        ("txt_in.bias", "context_embedder.bias"),
        ("txt_in.weight", "context_embedder.weight"),
        ("vector_in.in_layer.bias", "time_text_embed.text_embedder.linear_1.bias"),
        ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight"),
        ("vector_in.out_layer.bias", "time_text_embed.text_embedder.linear_2.bias"),
        ("vector_in.out_layer.weight", "time_text_embed.text_embedder.linear_2.weight"),
        ("guidance_in.in_layer.bias", "time_text_embed.guidance_embedder.linear_1.bias"),
        ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"),
        ("guidance_in.out_layer.bias", "time_text_embed.guidance_embedder.linear_2.bias"),
        ("guidance_in.out_layer.weight", "time_text_embed.guidance_embedder.linear_2.weight"),
        ("final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias", swap_scale_shift),
        ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight", swap_scale_shift),
        ("pos_embed_input.bias", "controlnet_x_embedder.bias"),
        ("pos_embed_input.weight", "controlnet_x_embedder.weight"),
    }

    for k in MAP_BASIC:
        if len(k) > 2:
            key_map[k[1]] = ("{}{}".format(output_prefix, k[0]), None, k[2])
        else:
            key_map[k[1]] = "{}{}".format(output_prefix, k[0])

    return key_map


# ----- comfy/model_detection.py -------------------------------------------------------------------------
def convert_diffusers_mmdit(state_dict: dict, output_prefix: str = "") -> tuple[dict, list[str]]:
    """model_detection.py convert_diffusers_mmdit, Flux branch ('x_embedder.weight' in state_dict): every key of
    flux_to_diffusers found in the diffusers state dict is written to its BFL key, a (dim, start, length) entry
    into that slice of the fused weight (grown as needed), a function entry through the function. Returns
    ({BFL key: tensor}, the diffusers keys no map entry took). Works on copies: ComfyUI pops the keys and writes a
    function entry's result into the diffusers tensor itself (w[:] = fun(weight) with w = weight).

    One deviation: ComfyUI reads hidden_size from 'x_embedder.bias', which FLUX.2's bias-free
    Flux2Transformer2DModel does not have (ComfyUI loads FLUX.2 from BFL-format files, where detect_unet_config
    reads it from img_in.weight); x_embedder.weight's row count is the same number for both families."""
    state_dict = {k: v.clone() for k, v in state_dict.items()}
    assert "x_embedder.weight" in state_dict  # Flux
    depth = count_blocks(state_dict, "transformer_blocks.{}.")
    depth_single_blocks = count_blocks(state_dict, "single_transformer_blocks.{}.")
    bias = state_dict.get("x_embedder.bias")
    hidden_size = (bias if bias is not None else state_dict["x_embedder.weight"]).shape[0]
    sd_map = flux_to_diffusers({"depth": depth, "depth_single_blocks": depth_single_blocks,
                                "hidden_size": hidden_size}, output_prefix=output_prefix)
    out_sd = {}
    for k in sd_map:
        weight = state_dict.get(k, None)
        if weight is not None:
            t = sd_map[k]

            if not isinstance(t, str):
                if len(t) > 2:
                    fun = t[2]
                else:
                    def fun(a):
                        return a
                offset = t[1]
                if offset is not None:
                    old_weight = out_sd.get(t[0], None)
                    if old_weight is None:
                        old_weight = torch.empty_like(weight)
                    if old_weight.shape[offset[0]] < offset[1] + offset[2]:
                        exp = list(weight.shape)
                        exp[offset[0]] = offset[1] + offset[2]
                        new = torch.empty(exp, device=weight.device, dtype=weight.dtype)
                        new[:old_weight.shape[0]] = old_weight
                        old_weight = new

                    w = old_weight.narrow(offset[0], offset[1], offset[2])
                else:
                    old_weight = weight
                    w = weight
                w[:] = fun(weight)
                t = t[0]
                out_sd[t] = old_weight
            else:
                out_sd[t] = weight
            state_dict.pop(k)
    return out_sd, sorted(state_dict)


def detect_flux_config(state_dict: dict, key_prefix: str = "diffusion_model.") -> dict:
    """The fields of model_detection.py detect_unet_config's Flux branch that flux_to_diffusers reads: hidden_size
    (3072, then img_in.weight's rows, then txt_in.weight's), depth (double_blocks counted) and depth_single_blocks
    (its FLUX.2 branch, a9fc7512, keys on double_stream_modulation_img.lin.weight and changes none of the three)."""
    keys = list(state_dict)
    config = {"hidden_size": 3072}
    for k in ("img_in.weight", "txt_in.weight"):
        if key_prefix + k in state_dict:
            config["hidden_size"] = state_dict[key_prefix + k].shape[0]
    config["depth"] = count_blocks(keys, "{}double_blocks.".format(key_prefix) + "{}.")
    config["depth_single_blocks"] = count_blocks(keys, "{}single_blocks.".format(key_prefix) + "{}.")
    return config


# ----- comfy/lora_convert.py ----------------------------------------------------------------------------
FUSED_QKV = re.compile(r"(.*attn[._]to_)qkv(?=\.|$)")


def convert_lora_rewrites(sd: dict) -> str | None:
    """Which of lora_convert.py convert_lora's rewrites a file triggers (None: the file goes on unchanged): BFL
    control, Wan-Fun, USO, or (2bffe2f4) a Krea2 file with one fused attn.to_qkv adapter."""
    if "img_in.lora_A.weight" in sd and "single_blocks.0.norm.key_norm.scale" in sd:
        return "bfl_control"
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in sd:
        return "wan_fun"
    if ("single_blocks.37.processor.qkv_lora.up.weight" in sd
            and "double_blocks.18.processor.qkv_lora2.up.weight" in sd):
        return "uso"
    if any(FUSED_QKV.search(k) is not None and ("text_fusion" in k or "transformer_blocks" in k) for k in sd):
        return "krea2_fused_qkv"
    return None


# ----- comfy/lora.py, comfy/model_patcher.py, comfy/weight_adapter/lora.py --------------------------------
def model_lora_keys_unet(model_state_dict: dict, unet_config: dict) -> dict:
    """lora.py model_lora_keys_unet for a comfy.model_base.Flux model: 'lora_unet_<BFL path with _>' and
    '<BFL path>' for every model weight (unet_to_diffusers is {} without num_res_blocks, so its loop adds
    nothing); the Flux branch: for every '.weight' entry of flux_to_diffusers(unet_config, 'diffusion_model.'),
    'transformer.<path>', 'lycoris_<path with _>', 'lora_transformer_<path with _>' and '<path>' (DiffSynth),
    each to the entry's value (a slice or function kept); and '<…>.linear1_qkv' -> the first 3·hidden rows of
    every linear1."""
    key_map = generic_unet_keys(model_state_dict.keys())

    diffusers_keys = flux_to_diffusers(unet_config, output_prefix="diffusion_model.")
    for k in diffusers_keys:
        if k.endswith(".weight"):
            to = diffusers_keys[k]
            key_map["transformer.{}".format(k[:-len(".weight")])] = to
            key_map["lycoris_{}".format(k[:-len(".weight")].replace(".", "_"))] = to
            key_map["lora_transformer_{}".format(k[:-len(".weight")].replace(".", "_"))] = to
            key_map[k[:-len(".weight")]] = to
    for k in model_state_dict.keys():
        hidden_size = unet_config.get("hidden_size", 0)
        if k.endswith(".weight") and ".linear1." in k:
            key_map["{}".format(k.replace(".linear1.weight", ".linear1_qkv"))] = (k, (0, 0, hidden_size * 3))
    return key_map


def add_patches(patches: dict, model_state_dict: dict, strength_patch: float = 1.0,
                strength_model: float = 1.0) -> tuple[dict, set]:
    """model_patcher.py add_patches: a patch-dict key is a model key or (key, offset[, function]); a patch is kept
    (appended to that key's list as (strength, patch, strength_model, offset, function)) only when its key is in
    the model's state dict. Returns ({model key: [patch, …]}, the patch-dict keys not kept: load_lora_for_models
    logs 'NOT LOADED' for each)."""
    kept, p = {}, set()
    for k in patches:
        offset = None
        function = None
        if isinstance(k, str):
            key = k
        else:
            offset = k[1]
            key = k[0]
            if len(k) > 2:
                function = k[2]
        if key in model_state_dict:
            p.add(k)
            kept.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
    return kept, set(patches) - p


def calculate_weight(patches: list, weight: torch.Tensor) -> torch.Tensor:
    """patch_weight_to_device (a float32 copy of the weight) + lora.py calculate_weight, for the patch kinds a lowrank
    file holds. Per patch: with an offset the weight is narrowed to that slice (a view) and patched in place, then
    the full tensor is restored; strength_model scales the weight first; 'lora' (weight_adapter/lora.py
    LoRAAdapter.calculate_weight): lora_diff = mm(up.flatten(1), down.flatten(1)) in float32, reshaped to the
    (narrowed) weight's shape (a mismatch raises there: ComfyUI logs 'ERROR' and leaves the weight),
    weight += function((strength · alpha / rank) · lora_diff) (alpha / rank = 1.0 without '.alpha'); 'diff':
    skipped on a shape mismatch ('WEIGHT NOT MERGED'), else weight += function(strength · diff)."""
    weight = weight.to(torch.float32, copy=True)
    for p in patches:
        strength, v, strength_model, offset, function = p
        if function is None:
            def function(a):
                return a

        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])

        if strength_model != 1.0:
            weight *= strength_model

        kind, v = v
        if kind == "lora":
            mat1, mat2, alpha = v[0].to(torch.float32), v[1].to(torch.float32), v[2]
            alpha = alpha / mat2.shape[0] if alpha is not None else 1.0
            lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
            weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
        else:
            assert kind == "diff"
            diff = v[0]
            assert diff.shape == weight.shape, \
                f"ComfyUI: WEIGHT NOT MERGED {tuple(diff.shape)} != {tuple(weight.shape)}"
            if strength != 0.0:
                weight += function(strength * diff.to(weight.dtype))

        if old_weight is not None:
            weight = old_weight
    return weight
