"""ComfyUI's UNet LoRA loading, re-implemented from its source for tests (ComfyUI is not installed here).

Source: github.com/Comfy-Org/ComfyUI (formerly comfyanonymous/ComfyUI), commit
a125cd84b054a57729b5eecab930ca9408719832 (2025-10-12). The path a kohya / LyCORIS file for an SDXL UNet takes:

  comfy/sd.py load_lora_for_models: key_map = comfy.lora.model_lora_keys_unet(model) ->
      comfy.lora_convert.convert_lora (rewrites only BFL-control / Wan-Fun / USO files: identity for lora_unet_ keys)
      -> comfy.lora.load_lora(lora, key_map) -> ModelPatcher.add_patches
  comfy/lora.py model_lora_keys_unet: 'lora_unet_<ldm path with _>' for every model weight, and for every
      '.weight' entry of comfy/utils.py unet_to_diffusers(unet_config): 'lora_unet_<diffusers path with _>' (and
      'lycoris_…', '<diffusers path>' / 'unet.<…>' with '.processor.to_…') -> 'diffusion_model.<ldm path>.weight'
  comfy/utils.py unet_to_diffusers: the diffusers-name -> ldm-name map from num_res_blocks, channel_mult,
      transformer_depth, transformer_depth_output, transformer_depth_middle (UNET_MAP_* tables)
  comfy/model_detection.py unet_config_from_diffusers_unet: the unet_config of a diffusers UNet (counted
      transformer depths, matched against fixed configs, SDXL's among them); detect_unet_config: the same config
      derived from an ldm checkpoint's keys (what ComfyUI uses for single-file checkpoints)
  comfy/sd.py load_diffusion_model_state_dict: a diffusers UNet's weights renamed through unet_to_diffusers
  comfy/weight_adapter/lora.py LoRAAdapter.load / calculate_weight, comfy/lora.py load_lora ('.diff') and
      calculate_weight ('diff'), comfy/model_patcher.py add_patches (only keys of the model's state dict) and
      patch_weight_to_device (the weight patched as a float32 copy)
  comfy/supported_models.py SDXL.unet_config (what supported_models_base.BASE.matches compares)

The code below keeps ComfyUI's names and structure so each function can be read side by side with the original.
"""
from __future__ import annotations

import torch

# ----- comfy/utils.py -----------------------------------------------------------------------------------
UNET_MAP_ATTENTIONS = {
    "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight", "norm.bias",
}
TRANSFORMER_BLOCKS = {
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
}
UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias",
}
UNET_MAP_BASIC = {
    ("label_emb.0.0.weight", "class_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "class_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "class_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "class_embedding.linear_2.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
}


def unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers, line for line: {diffusers state-dict key: ldm state-dict key}."""
    if "num_res_blocks" not in unet_config:
        return {}
    num_res_blocks = unet_config["num_res_blocks"]
    channel_mult = unet_config["channel_mult"]
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    num_blocks = len(channel_mult)

    transformers_mid = unet_config.get("transformer_depth_middle", None)

    diffusers_unet_map = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in UNET_MAP_RESNET:
                diffusers_unet_map["down_blocks.{}.resnets.{}.{}".format(x, i, UNET_MAP_RESNET[b])] = \
                    "input_blocks.{}.0.{}".format(n, b)
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    diffusers_unet_map["down_blocks.{}.attentions.{}.{}".format(x, i, b)] = \
                        "input_blocks.{}.1.{}".format(n, b)
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        diffusers_unet_map[
                            "down_blocks.{}.attentions.{}.transformer_blocks.{}.{}".format(x, i, t, b)] = \
                            "input_blocks.{}.1.transformer_blocks.{}.{}".format(n, t, b)
            n += 1
        for k in ["weight", "bias"]:
            diffusers_unet_map["down_blocks.{}.downsamplers.0.conv.{}".format(x, k)] = \
                "input_blocks.{}.0.op.{}".format(n, k)

    i = 0
    for b in UNET_MAP_ATTENTIONS:
        diffusers_unet_map["mid_block.attentions.{}.{}".format(i, b)] = "middle_block.1.{}".format(b)
    for t in range(transformers_mid):
        for b in TRANSFORMER_BLOCKS:
            diffusers_unet_map["mid_block.attentions.{}.transformer_blocks.{}.{}".format(i, t, b)] = \
                "middle_block.1.transformer_blocks.{}.{}".format(t, b)

    for i, n in enumerate([0, 2]):
        for b in UNET_MAP_RESNET:
            diffusers_unet_map["mid_block.resnets.{}.{}".format(i, UNET_MAP_RESNET[b])] = \
                "middle_block.{}.{}".format(n, b)

    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        l = num_res_blocks[x] + 1  # noqa: E741 (ComfyUI's name)
        for i in range(l):
            c = 0
            for b in UNET_MAP_RESNET:
                diffusers_unet_map["up_blocks.{}.resnets.{}.{}".format(x, i, UNET_MAP_RESNET[b])] = \
                    "output_blocks.{}.0.{}".format(n, b)
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    diffusers_unet_map["up_blocks.{}.attentions.{}.{}".format(x, i, b)] = \
                        "output_blocks.{}.1.{}".format(n, b)
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        diffusers_unet_map[
                            "up_blocks.{}.attentions.{}.transformer_blocks.{}.{}".format(x, i, t, b)] = \
                            "output_blocks.{}.1.transformer_blocks.{}.{}".format(n, t, b)
            if i == l - 1:
                for k in ["weight", "bias"]:
                    diffusers_unet_map["up_blocks.{}.upsamplers.0.conv.{}".format(x, k)] = \
                        "output_blocks.{}.{}.conv.{}".format(n, c, k)
            n += 1

    for k in UNET_MAP_BASIC:
        diffusers_unet_map[k[1]] = k[0]

    return diffusers_unet_map


# ----- comfy/model_detection.py -------------------------------------------------------------------------
def count_blocks(state_dict_keys, prefix_string: str) -> int:
    """model_detection.py count_blocks: how many consecutive '<prefix>{i}' indices some key starts with."""
    count = 0
    while True:
        c = False
        for k in state_dict_keys:
            if k.startswith(prefix_string.format(count)):
                c = True
                break
        if not c:
            break
        count += 1
    return count


# unet_config_from_diffusers_unet's SDXL entry (dtype None), verbatim. Its other fixed configs (SDXL refiner,
# SSD-1B, Vega, KOALA, inpaint/ip2p, SD-1.x/2.x, control-net sizes) differ from it in at least one matched field
# (transformer_depth, context_dim, model_channels, in_channels, adm_in_channels), so for an SDXL-base UNet the
# first match in ComfyUI's list is this one; a UNet that matches none of them is not loadable as diffusers (None).
SDXL = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
        'num_classes': 'sequential', 'adm_in_channels': 2816, 'dtype': None, 'in_channels': 4, 'model_channels': 320,
        'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10], 'channel_mult': [1, 2, 4],
        'transformer_depth_middle': 10, 'use_linear_in_transformer': True, 'context_dim': 2048,
        'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
        'use_temporal_attention': False, 'use_temporal_resblock': False}
SUPPORTED_SDXL = {   # comfy/supported_models.py class SDXL.unet_config: what BASE.matches requires
    "model_channels": 320, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10],
    "context_dim": 2048, "adm_in_channels": 2816, "use_temporal_attention": False,
}


def convert_config(unet_config: dict) -> dict:
    """model_detection.py convert_config: an int num_res_blocks to a list (the fixed configs have no
    attention_resolutions, so its other branch does not apply to them)."""
    new_config = unet_config.copy()
    num_res_blocks = new_config.get("num_res_blocks", None)
    channel_mult = new_config.get("channel_mult", None)
    if isinstance(num_res_blocks, int):
        num_res_blocks = len(channel_mult) * [num_res_blocks]
    assert "attention_resolutions" not in new_config
    new_config["num_res_blocks"] = num_res_blocks
    return new_config


def unet_config_from_diffusers_unet(state_dict: dict, templates=(SDXL,)) -> dict | None:
    """model_detection.py unet_config_from_diffusers_unet: count the transformer blocks under every down block's
    attentions (0 per resnet for a block without), read model/in channels, context_dim and adm_in_channels from
    the weights' shapes, and return the first fixed config all of them equal (only SDXL's is carried here)."""
    if "conv_in.weight" not in state_dict:
        return None
    match = {}
    transformer_depth = []
    down_blocks = count_blocks(state_dict, "down_blocks.{}")
    for i in range(down_blocks):
        attn_blocks = count_blocks(state_dict, "down_blocks.{}.attentions.".format(i) + '{}')
        res_blocks = count_blocks(state_dict, "down_blocks.{}.resnets.".format(i) + '{}')
        for ab in range(attn_blocks):
            transformer_count = count_blocks(
                state_dict, "down_blocks.{}.attentions.{}.transformer_blocks.".format(i, ab) + '{}')
            transformer_depth.append(transformer_count)
            if transformer_count > 0:
                match["context_dim"] = state_dict[
                    "down_blocks.{}.attentions.{}.transformer_blocks.0.attn2.to_k.weight".format(i, ab)].shape[1]
        if attn_blocks == 0:
            for i in range(res_blocks):  # noqa: B020 (ComfyUI reuses i; harmless, the outer loop re-binds it)
                transformer_depth.append(0)
    match["transformer_depth"] = transformer_depth
    match["model_channels"] = state_dict["conv_in.weight"].shape[0]
    match["in_channels"] = state_dict["conv_in.weight"].shape[1]
    match["adm_in_channels"] = None
    if "class_embedding.linear_1.weight" in state_dict:
        match["adm_in_channels"] = state_dict["class_embedding.linear_1.weight"].shape[1]
    elif "add_embedding.linear_1.weight" in state_dict:
        match["adm_in_channels"] = state_dict["add_embedding.linear_1.weight"].shape[1]
    for unet_config in templates:
        if all(match[k] == unet_config[k] for k in match):
            return convert_config(unet_config)
    return None


def unet_config_of(state_dict: dict) -> dict:
    """The unet_config fields unet_to_diffusers reads, for any diffusers UNet2DConditionModel: what
    model_detection.py detect_unet_config derives from the same network saved as an ldm checkpoint (ComfyUI's
    single-file form), read off the diffusers keys. Per down block: num_res_blocks = its resnets, channel_mult =
    resnets.0.conv2 out channels // model_channels (detect_unet_config: out_layers.3), transformer_depth += the
    transformer blocks under attentions.j (0 without); transformer_depth_output lists the up blocks' attentions in
    the order detect_unet_config appends them (output_blocks from last to first, which unet_to_diffusers pops from
    the end); transformer_depth_middle = mid_block.attentions.0's count, -1 for a resnet-only middle, -2 for none.
    Checked against ComfyUI's own fixed SDXL config in the tests (unet_config_from_diffusers_unet)."""
    keys = list(state_dict)
    model_channels = state_dict["conv_in.weight"].shape[0]

    def depth(prefix: str) -> int:
        return count_blocks(keys, prefix + ".transformer_blocks.{}.")

    num_res_blocks, channel_mult, transformer_depth, per_output_block = [], [], [], []
    for i in range(count_blocks(keys, "down_blocks.{}.")):
        res = count_blocks(keys, f"down_blocks.{i}.resnets." + "{}.")
        num_res_blocks.append(res)
        channel_mult.append(state_dict[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] // model_channels)
        transformer_depth += [depth(f"down_blocks.{i}.attentions.{j}") for j in range(res)]
    for x in range(count_blocks(keys, "up_blocks.{}.")):
        per_output_block += [depth(f"up_blocks.{x}.attentions.{i}")
                             for i in range(count_blocks(keys, f"up_blocks.{x}.resnets." + "{}."))]
    if "mid_block.attentions.0.proj_in.weight" in state_dict:
        middle = depth("mid_block.attentions.0")
    elif "mid_block.resnets.0.norm1.weight" in state_dict:
        middle = -1
    else:
        middle = -2
    adm = state_dict.get("add_embedding.linear_1.weight", state_dict.get("class_embedding.linear_1.weight"))
    context = next((state_dict[k].shape[1] for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((state_dict[k] for k in keys if k.endswith("attentions.0.proj_in.weight")), None)
    return {"model_channels": model_channels, "in_channels": state_dict["conv_in.weight"].shape[1],
            "adm_in_channels": None if adm is None else adm.shape[1], "context_dim": context,
            "use_linear_in_transformer": proj_in is not None and proj_in.dim() == 2, "use_temporal_attention": False,
            "num_res_blocks": num_res_blocks, "channel_mult": channel_mult, "transformer_depth": transformer_depth,
            "transformer_depth_output": per_output_block[::-1], "transformer_depth_middle": middle}


# ----- comfy/sd.py ----------------------------------------------------------------------------------------
def diffusers_to_ldm(state_dict: dict, unet_config: dict) -> tuple[dict, list[str], list[str]]:
    """sd.py load_diffusion_model_state_dict, diffusers branch: new_sd[diffusers_keys[k]] = sd.pop(k) for every
    key of unet_to_diffusers found in sd (a map key not in sd is logged), then BaseModel holds them under
    'diffusion_model.'. Returns ({'diffusion_model.<ldm key>': tensor}, the map's keys missing from the model
    (ComfyUI warns), the model's keys no map entry takes (their weights would never be loaded))."""
    diffusers_keys = unet_to_diffusers(unet_config)
    new_sd, missing = {}, []
    for k in diffusers_keys:
        if k in state_dict:
            new_sd["diffusion_model." + diffusers_keys[k]] = state_dict[k]
        else:
            missing.append(k)
    return new_sd, missing, sorted(set(state_dict) - set(diffusers_keys))


# ----- comfy/lora.py, comfy/weight_adapter/lora.py, comfy/model_patcher.py --------------------------------
def generic_unet_keys(model_state_dict_keys) -> dict[str, str]:
    """lora.py model_lora_keys_unet's first loop, every model's: 'lora_unet_<ldm path with _>' and '<ldm path>' for
    each 'diffusion_model.' weight."""
    key_map = {}
    for k in model_state_dict_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map["lora_unet_{}".format(key_lora)] = k
                key_map["{}".format(k[:-len(".weight")])] = k
            else:
                key_map["{}".format(k)] = k
    return key_map


def model_lora_keys_unet(model_state_dict_keys, unet_config: dict) -> dict[str, str]:
    """lora.py model_lora_keys_unet (the UNet part; the SD3 / Stable Cascade / DiT branches do not apply)."""
    key_map = generic_unet_keys(model_state_dict_keys)
    diffusers_keys = unet_to_diffusers(unet_config)
    for k in diffusers_keys:
        if k.endswith(".weight"):
            unet_key = "diffusion_model.{}".format(diffusers_keys[k])
            key_lora = k[:-len(".weight")].replace(".", "_")
            key_map["lora_unet_{}".format(key_lora)] = unet_key
            key_map["lycoris_{}".format(key_lora)] = unet_key
            for p in ["", "unet."]:
                diffusers_lora_key = "{}{}".format(p, k[:-len(".weight")].replace(".to_", ".processor.to_"))
                if diffusers_lora_key.endswith(".to_out.0"):
                    diffusers_lora_key = diffusers_lora_key[:-2]
                key_map[diffusers_lora_key] = unet_key
    return key_map


def load_lora(lora: dict, to_load: dict) -> tuple[dict, set]:
    """lora.py load_lora for the patch kinds a lowrank file holds: weight_adapter/lora.py LoRAAdapter.load
    ('<x>.lora_up.weight' / '.lora_down.weight' [+ '.lora_mid.weight'], '<x>.alpha' read as .item()) and
    '<x>.diff' -> ('diff', (w,)). Returns ({model key: patch}, the file keys nothing consumed: ComfyUI logs
    'lora key not loaded' for each)."""
    patch_dict, loaded_keys = {}, set()
    for x in to_load:
        alpha_name = "{}.alpha".format(x)
        alpha = None
        if alpha_name in lora:
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        if "{}.lora_up.weight".format(x) in lora:
            up, down = "{}.lora_up.weight".format(x), "{}.lora_down.weight".format(x)
            mid = lora.get("{}.lora_mid.weight".format(x))
            assert mid is None, "lowrank writes no LoCon mid weights"
            patch_dict[to_load[x]] = ("lora", (lora[up], lora[down], alpha))
            loaded_keys.update((up, down))
        diff_name = "{}.diff".format(x)
        if diff_name in lora:
            patch_dict[to_load[x]] = ("diff", (lora[diff_name],))
            loaded_keys.add(diff_name)
    return patch_dict, set(lora) - loaded_keys


def add_patches(patches: dict, model_state_dict: dict) -> tuple[dict, set]:
    """model_patcher.py add_patches: a patch is kept only for a key of the model's state dict; the rest are
    reported by load_lora_for_models as 'NOT LOADED'."""
    kept = {k: v for k, v in patches.items() if k in model_state_dict}
    return kept, set(patches) - set(kept)


def lora_update(patch, weight_shape, strength: float = 1.0) -> torch.Tensor:
    """weight_adapter/lora.py LoRAAdapter.calculate_weight without dora_scale: mat1 = up, mat2 = down cast to
    the float32 intermediate dtype, alpha = alpha / mat2.shape[0] (1.0 without '.alpha'), lora_diff =
    mm(mat1.flatten(1), mat2.flatten(1)).reshape(weight.shape) (a wrong shape raises there: ComfyUI logs
    'ERROR' and leaves the weight as it is); the weight gets + (strength · alpha) · lora_diff."""
    kind, (mat1, mat2, alpha) = patch
    assert kind == "lora"
    mat1, mat2 = mat1.to(torch.float32), mat2.to(torch.float32)
    alpha = alpha / mat2.shape[0] if alpha is not None else 1.0
    lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight_shape)
    return (strength * alpha) * lora_diff


def calculate_weight(patch, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """model_patcher.py patch_weight_to_device (a float32 copy of the weight) + lora.py calculate_weight: 'diff'
    adds strength · diff cast to the weight's dtype, skipped on a shape mismatch ('WEIGHT NOT MERGED'); 'lora'
    adds lora_update. (The float32 result goes back through stochastic_rounding to the model's dtype: a no-op
    for float32 weights.)"""
    weight = weight.to(torch.float32, copy=True)
    kind, v = patch
    if kind == "diff":
        diff = v[0]
        assert diff.shape == weight.shape, f"ComfyUI: WEIGHT NOT MERGED {tuple(diff.shape)} != {tuple(weight.shape)}"
        weight += strength * diff.to(weight.dtype)
    else:
        weight += lora_update(patch, weight.shape, strength).type(weight.dtype)
    return weight


# ----- comfy/lora.py model_lora_keys_clip (text encoders) -------------------------------------------------
# the CLIP weights a LoRA may patch, under the suffix ComfyUI's kohya keys give them
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def clip_state_keys(names, clip: str) -> set[str]:
    """The state-dict keys ComfyUI's own text encoder holds for a transformers CLIP text model's `names` (its state
    dict keys, with or without the 'text_model.' root): '<clip>.transformer.text_model.<path>' (comfy/sd1_clip.py
    SDClipModel as `transformer`, held as clip_l / clip_g by the SD-1.x and SDXL clip models)."""
    return {f"{clip}.transformer.text_model.{n.removeprefix('text_model.')}" for n in names}


def model_lora_keys_clip(model_state_dict_keys) -> dict[str, str]:
    """lora.py model_lora_keys_clip, the CLIP-L / CLIP-G branches (SD-1.x, SDXL): for every encoder layer b < 32
    and LORA_CLIP_MAP entry c whose weight the model holds. CLIP-L (SD-1.x's one, SDXL's first) takes
    'lora_te_text_model_encoder_layers_<b>_<c with _>', the same with 'lora_te1_', and diffusers'
    'text_encoder.text_model.encoder.layers.<b>.<c>'; CLIP-G beside a CLIP-L (SDXL) takes 'lora_te2_…' and
    'text_encoder_2.text_model.…', a CLIP-G alone (the refiner) the CLIP-L names plus 'lora_prior_te_…'.
    CLIP-L is looked up before CLIP-G for each layer, so from layer 0 on SDXL's CLIP-G gets the te2 names."""
    sdk = set(model_state_dict_keys)
    key_map, clip_l_present = {}, False
    for b in range(32):
        for c, kohya in LORA_CLIP_MAP.items():
            stem, path = f"text_model_encoder_layers_{b}_{kohya}", f"text_model.encoder.layers.{b}.{c}"
            k = f"clip_l.transformer.{path}.weight"
            if k in sdk:
                clip_l_present = True
                for lora_key in (f"lora_te_{stem}", f"lora_te1_{stem}", f"text_encoder.{path}"):
                    key_map[lora_key] = k
            k = f"clip_g.transformer.{path}.weight"
            if k in sdk:
                names = (f"lora_te2_{stem}", f"text_encoder_2.{path}") if clip_l_present \
                    else (f"lora_te_{stem}", f"text_encoder.{path}", f"lora_prior_te_{stem}")
                for lora_key in names:
                    key_map[lora_key] = k
    return key_map
