"""DoRA (and any method) into ComfyUI and AUTOMATIC1111, checked against their loaders' own rules.

The UIs are not installed here, so each rule is re-implemented from their source, cited per function, and
applied to the exported file on SD-1.5-shaped layers (widths 320/640/1280, cross-attention in = 768, the
attention projections and a 1x1 proj_in conv) held in float32 as the UIs patch them:
  - key maps: ComfyUI comfy/lora.py model_lora_keys_unet ('lora_unet_<diffusers path with _>' ->
    'diffusion_model.<ldm path>' via comfy/utils.py unet_to_diffusers); A1111 extensions-builtin/Lora/
    networks.py convert_diffusers_name_to_compvis + assign_network_names_to_compvis_modules.
  - `diff` patch: ComfyUI comfy/lora.py load_lora ('<key>.diff' -> ('diff', (w,))) and calculate_weight
    (skipped on a shape mismatch, else weight += strength · diff cast to the weight's dtype, on a float32 copy
    made by comfy/model_patcher.py patch_weight_to_device); A1111 network_full.py NetworkModuleFull.calc_updown
    + network.py finalize_updown (× calc_scale() = 1 without alpha/dim, × multiplier) + networks.py
    network_apply_weights (self.weight += updown).
  - `dora_scale`: ComfyUI comfy/weight_adapter/base.py weight_decompose (before and after its wd_on_output
    branch) and A1111 network.py NetworkModule.apply_weight_decompose.
The reference is DoRA Eq. 5 in float64 from tests/reference.py, independent of lowrank's code. Bound: the
file is float32 and the UI adds it to a float32 weight, two roundings of ≤ 2^-24 · max(|W|, |W_eff|) each;
with an adapter whose effect is ≥ 0.15 · max|W| (checked per layer) that is < 1e-6 of the effect.
"""
import copy
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowrank
from lowrank import AdapterConfig
from lowrank.export import ExportError
from tests import reference

# SD-1.5 UNet layers: diffusers module path -> (out, in, conv 1x1?), and the same layer's ldm (compvis) path
LAYERS = {
    "down_blocks.0.attentions.0.proj_in": (320, 320, True),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320, False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": (320, 320, False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": (320, 320, False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (320, 320, False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768, False),
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q": (640, 640, False),
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v": (640, 768, False),
    "mid_block.attentions.0.proj_in": (1280, 1280, True),
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (1280, 1280, False),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (1280, 768, False),
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v": (320, 320, False),
}
# SD-1.5's diffusers -> ldm block names (input_blocks.3i+j+1.1, middle_block.1, output_blocks.3i+j.1)
LDM_BLOCKS = {"down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.1.attentions.1": "input_blocks.5.1",
              "mid_block.attentions.0": "middle_block.1", "up_blocks.3.attentions.2": "output_blocks.11.1"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]


def ldm_name(diffusers_name: str) -> str:
    block = next(b for b in LDM_BLOCKS if diffusers_name.startswith(b + "."))
    return LDM_BLOCKS[block] + diffusers_name[len(block):]


def sd15_layers() -> nn.Module:
    """A module tree with SD-1.5's layer names and shapes, seeded weights of SD's scale (rows of norm ~1)."""
    root, g = nn.Module(), torch.Generator().manual_seed(0)
    for path, (out, inp, conv) in LAYERS.items():
        layer = nn.Conv2d(inp, out, 1) if conv else nn.Linear(inp, out, bias=path.endswith("to_out.0"))
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / inp ** 0.5)
        parent = root
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path.split(".")[-1], layer)
    return root


def adapted(method: str, **options) -> nn.Module:
    """SD-1.5 layers with a seeded, strongly non-trivial adapter (every trainable tensor perturbed)."""
    model = sd15_layers()
    lowrank.inject(model, AdapterConfig(method=method, target_modules=TARGETS, **options))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g) * p.abs().mean().clamp_min(0.02))
    return model


def base_weights(model) -> dict[str, torch.Tensor]:
    """{diffusers path: W0 as the UI holds it (float32, the layer's own shape)}."""
    return {n: layer.base.weight.detach().clone() for n, layer in lowrank.adapter_layers(model).items()}


def dora_reference(layer) -> torch.Tensor:
    """DoRA Eq. 5 in float64 (tests/reference.py), reshaped to the layer's weight."""
    P = {k: getattr(layer, k).detach().double() for k in ("lora_A", "lora_B", "lora_magnitude")}
    w0 = layer.base.weight.detach().double().reshape(layer.out_features, layer.in_features)
    return reference.dora(P, w0, layer.config).reshape(layer.base.weight.shape)


# ----- the loaders, re-implemented -------------------------------------------------------------------
def comfy_apply_diff(weights: dict, lora: dict, strength: float = 1.0) -> tuple[dict, set]:
    """ComfyUI: key map (model_lora_keys_unet), load_lora's '.diff' patches, calculate_weight's 'diff' rule.
    Returns the patched weights and the file keys it did not consume (ComfyUI logs 'lora key not loaded')."""
    key_map = {"lora_unet_" + n.replace(".", "_"): "diffusion_model." + ldm_name(n) for n in weights}
    by_ldm = {"diffusion_model." + ldm_name(n): n for n in weights}
    loaded, out = set(), {}
    for x, target in key_map.items():
        diff = lora.get(f"{x}.diff")
        if diff is None:
            continue
        loaded.add(f"{x}.diff")
        w = weights[by_ldm[target]].to(torch.float32, copy=True)   # patch_weight_to_device: float32 copy
        assert diff.shape == w.shape, f"ComfyUI would skip {x}: WEIGHT NOT MERGED {diff.shape} != {w.shape}"
        w += strength * diff.to(w.dtype)
        out[by_ldm[target]] = w
    return out, set(lora) - loaded


def a1111_compvis(key: str) -> str:
    """networks.py convert_diffusers_name_to_compvis, the attention branches an SD-1.5 LoRA reaches."""
    for pattern, fmt in ((r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)",
                          lambda i, j, s: f"diffusion_model_input_blocks_{1 + 3 * i + j}_1_{s}"),
                         (r"lora_unet_mid_block_attentions_(\d+)_(.+)",
                          lambda _j, s: f"diffusion_model_middle_block_1_{s}"),
                         (r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)",
                          lambda i, j, s: f"diffusion_model_output_blocks_{3 * i + j}_1_{s}")):
        m = re.match(pattern, key)
        if m:
            return fmt(*[int(g) if g.isdigit() else g for g in m.groups()])
    return key


def a1111_apply_diff(weights: dict, lora: dict, multiplier: float = 1.0) -> tuple[dict, set]:
    """A1111 >= 1.5: load_network groups '<key>.<part>' by compvis module, ModuleTypeFull takes a 'diff',
    finalize_updown reshapes and scales (no alpha, no dim: calc_scale() = 1), network_apply_weights adds."""
    mapping = {"diffusion_model_" + ldm_name(n).replace(".", "_"): n for n in weights}   # network_layer_mapping
    matched, failed = {}, set()
    for key_network, tensor in lora.items():
        key_without_parts, part = key_network.split(".", 1)
        module = mapping.get(a1111_compvis(key_without_parts))
        if module is None:
            failed.add(key_network)
            continue
        matched.setdefault(module, {})[part] = tensor
    out = {}
    for module, w in matched.items():
        assert set(w) == {"diff"}, w.keys()
        orig = weights[module]
        updown = w["diff"].to(orig.device, dtype=orig.dtype)
        if orig.numel() == updown.numel():
            updown = updown.reshape(orig.shape)
        out[module] = orig + updown * 1.0 * multiplier
    return out, failed


def comfy_weight_decompose(dora_scale, weight, lora_diff, output_axis_branch: bool):
    """comfy/weight_adapter/base.py weight_decompose (strength 1, alpha folded): W' = (W + ΔW) · scale / norm.
    Before the wd_on_output change the norm is always per input column of W + ΔW; after it, a dora_scale with
    shape[0] == out selects the output-row norm of the *original* W, plus finfo(W.dtype).eps."""
    weight_calc = weight + lora_diff
    col = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
    col = col.reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1)
    if not output_axis_branch:
        return weight_calc * (dora_scale / col)
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = col
    return weight_calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def a1111_weight_decompose(dora_scale, orig_weight, updown):
    """A1111 network.py apply_weight_decompose: per input column of W + ΔW, returns the new weight."""
    merged = updown + orig_weight
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale / norm)


def relative_error(patched: dict, reference_weights: dict, base: dict) -> float:
    """max over layers of max|patched − ours| / max|ours − W0| (the adapter's effect on that layer)."""
    worst = 0.0
    for name, want in reference_weights.items():
        effect = (want - base[name].double()).abs().max().item()
        # two float32 roundings ≤ 2^-23 · max|W| must stay under 1e-6 of the effect: effect ≥ 0.12 · max|W|
        assert effect > 0.15 * base[name].abs().max().item(), f"{name}: adapter too weak to test ({effect:.2e})"
        worst = max(worst, (patched[name].double() - want).abs().max().item() / effect)
    return worst


# ----- tests ------------------------------------------------------------------------------------------
def test_dora_diff_file_is_exact_in_comfyui_and_a1111(tmp_path):
    model = adapted("dora", rank=16, alpha=8.0)
    base = base_weights(model)
    ours = {n: dora_reference(layer) for n, layer in lowrank.adapter_layers(model).items()}
    written = lowrank.export(model, tmp_path / "dora-sd15", "diff")
    assert written.name == "dora-sd15.safetensors"
    lora = load_file(str(written))
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert {k.rsplit(".", 1)[0] for k in lora} == {"lora_unet_" + n.replace(".", "_") for n in LAYERS}
    for rule in (comfy_apply_diff, a1111_apply_diff):
        patched, not_loaded = rule(base, lora)
        assert not not_loaded and set(patched) == set(LAYERS), (rule.__name__, not_loaded)
        err = relative_error(patched, ours, base)
        assert err <= 1e-6, f"{rule.__name__}: {err:.2e} of the adapter's effect"
    # strength 0.5 (ComfyUI's slider, A1111's <lora:name:0.5>) is half the update, as for any LoRA
    half, _ = comfy_apply_diff(base, lora, strength=0.5)
    name = next(iter(LAYERS))
    torch.testing.assert_close(half[name].double(), (base[name].double() + ours[name]) / 2, rtol=0, atol=1e-6)


def test_diff_holds_any_method(tmp_path):
    """The same file type for a low-rank method (DeLoRA, the default): lowrank's own W_eff (float64 copy)."""
    model = adapted("delora", rank=16)
    with torch.no_grad():   # λ bounds ‖ΔW‖ (DeLoRA Eq. 8): raise it so the effect clears the float32 floor
        for layer in lowrank.adapter_layers(model).values():
            layer.delora_lambda.mul_(8)
    base = base_weights(model)
    model64 = copy.deepcopy(model).double()
    ours = {n: (layer.base.weight.double() + layer.delta_weight().reshape(layer.base.weight.shape)).detach()
            for n, layer in lowrank.adapter_layers(model64).items()}
    lora = load_file(str(lowrank.export(model, tmp_path / "d", "diff")))
    for rule in (comfy_apply_diff, a1111_apply_diff):
        patched, _ = rule(base, lora)
        assert relative_error(patched, ours, base) <= 1e-6, rule.__name__


def test_dora_scale_forms_are_not_dora_so_kohya_refuses(tmp_path):
    """Why no dora_scale file: the UIs' weight-decompose rules given DoRA's own tensors (peft's magnitude as an
    (out, 1) dora_scale, the conversion people post) miss DoRA by over 100x the bound; and the magnitude folded
    so that the newest ComfyUI rule is exact is read as something else by A1111 and older ComfyUI, silently."""
    model = adapted("dora", rank=16, alpha=8.0)
    base = base_weights(model)
    layers = lowrank.adapter_layers(model)
    ours = {n: dora_reference(layer) for n, layer in layers.items()}
    naive = {"comfy_new": {}, "comfy_old": {}, "a1111": {}}
    folded = {"comfy_new": {}, "comfy_old": {}, "a1111": {}}
    for n, layer in layers.items():
        w = base[n]
        delta = (layer.scale * layer.lora_B @ layer.lora_A).detach().reshape(w.shape)
        mag = layer.lora_magnitude.detach().reshape(-1, *[1] * (w.dim() - 1))   # (out, 1[, 1, 1])
        v_norm = (w + delta).reshape(w.shape[0], -1).norm(dim=1).reshape(mag.shape)
        w_norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(mag.shape)
        for scale, out in ((mag, naive), (mag * (w_norm + torch.finfo(w.dtype).eps) / v_norm, folded)):
            out["comfy_new"][n] = comfy_weight_decompose(scale, w, delta, output_axis_branch=True)
            out["comfy_old"][n] = comfy_weight_decompose(scale, w, delta, output_axis_branch=False)
            out["a1111"][n] = a1111_weight_decompose(scale, w, delta)
    for rule, patched in naive.items():
        assert relative_error(patched, ours, base) > 1e-4, f"{rule} would apply peft's magnitude as DoRA"
    assert relative_error(folded["comfy_new"], ours, base) <= 1e-5   # exact only in ComfyUI after wd_on_output
    for rule in ("comfy_old", "a1111"):
        assert relative_error(folded[rule], ours, base) > 1e-4, f"{rule} reads the folded (out, 1) scale as DoRA"
    with pytest.raises(ExportError) as e:
        lowrank.export(model, tmp_path / "k", "kohya")
    assert "'diff'" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "k").exists()


def test_cli_writes_the_diff_file(tmp_path):
    """python -m training.export RUN --format diff: the run's base model, file named after the output folder."""
    import json

    from training import export as cli
    from training.families import load_pipeline

    pipe = load_pipeline("tiny")
    lowrank.inject(pipe.unet, AdapterConfig(method="dora", rank=2))
    run_dir = tmp_path / "run"
    lowrank.save_adapter(pipe.unet, run_dir)
    (run_dir / "run.json").write_text(json.dumps({"args": {"pretrained_model_name_or_path": "tiny"}}))
    assert cli.main([str(run_dir), "--format", "diff", "--output", str(tmp_path / "dog")]) == 0
    lora = load_file(str(tmp_path / "dog" / "dog.safetensors"))
    layers = lowrank.adapter_layers(pipe.unet)
    assert len(lora) == len(layers) and all(k.startswith("lora_unet_") and k.endswith(".diff") for k in lora)
