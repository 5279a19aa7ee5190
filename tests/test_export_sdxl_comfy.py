"""SDXL exports into ComfyUI: the kohya file's keys through ComfyUI's own SDXL key map, its LoRA rule giving our ΔW,
and DoRA's `diff` file through the '.diff' rule.

ComfyUI is not installed, so tests/comfy_keys.py re-implements, from its source (Comfy-Org/ComfyUI commit a125cd8,
cited per function there), the path a LoRA for the UNet takes: comfy/model_detection.py gives the unet_config
(unet_config_from_diffusers_unet for a diffusers SDXL UNet; what detect_unet_config derives for any other), comfy/
utils.py unet_to_diffusers maps diffusers names to ldm names, comfy/lora.py model_lora_keys_unet accepts
'lora_unet_<diffusers path with _>' for each, load_lora consumes the file's keys (leftovers are ComfyUI's "lora key
not loaded"), model_patcher.py add_patches keeps patches for the model's own weights only, and comfy/weight_adapter/
lora.py calculate_weight adds (alpha / rank) · up.flatten(1) @ down.flatten(1) in float32.

  - tiny-sdxl (a StableDiffusionXLPipeline folder): every low-rank method, default targets (to_q/to_k/to_v/to_out.0),
    exported as kohya; every key lands on a weight of its own layer with that layer's (out, in), nothing is left
    over, and ComfyUI's ΔW is lowrank's layer.delta_weight() within the float32 bound below. DoRA: kohya refuses,
    `diff` applies exactly (two float32 roundings) against DoRA Eq. 5 in float64 (tests/reference.py).
  - the real SDXL base 1.0 UNet layout (built on the meta device, no weights): ComfyUI recognises it as SDXL, our
    config derivation agrees with its fixed SDXL config, and all 8 · (Σ transformer depths) attention projections
    the default targets pick are in its key map; an SDXL-layout UNet of small width exports exactly those keys.

Bound for the LoRA rule. Both sides multiply the same float32 factors of delta_factors(): lowrank's delta_weight()
sums T terms u_t @ v_t in float32 (≤ (R + T)·u·(|U||V|)_ij, u = 2^-24, T ≤ R), the export balances them in float64
and stores float32 (two roundings, ≤ 2u), ComfyUI's float32 mm of length R adds ≤ R·u; alpha / R = 1 is exact.
So |ΔW_comfy − ΔW_ours|_ij ≤ (3R + 4)·u·(|up| @ |down|)_ij (balancing leaves |up_k||down_k| = |u_k||v_k|).
"""
import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowrank
from lowrank import AdapterConfig
from lowrank.export import ExportError
from lowrank.inject import matches
from tests import comfy_keys as comfy
from tests.test_export_ui import dora_reference

U = 2.0 ** -24   # float32 unit roundoff
DEFAULT_TARGETS = AdapterConfig().target_modules   # to_q, to_k, to_v, to_out.0
OPTIONS = {   # alpha != r wherever alpha applies: the scale must be folded into the file, not assumed
    "lora": dict(rank=4, alpha=6.0),
    "delora": dict(rank=2),                                   # default: subtract init, rank 2r in the file
    "ether": dict(ether_blocks=2),
    "etherplus": dict(),
    "deltalora": dict(rank=2, alpha=6.0, deltalora_start_step=0),
    "dyndora": dict(rank=3, alpha=6.0, dyndora_total_steps=10),
    "mult_relaxed": dict(rank=4),
    "mult_highrank": dict(rank=4),
    "mult_bounded": dict(),
}
LOW_RANK = [m for m, cls in lowrank.METHODS.items() if cls.low_rank_exact]

# SDXL base 1.0's unet/config.json, the fields that shape the module tree
SDXL_BASE = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# the same tree at a small width (names depend on the blocks and depths only): 70 real transformer blocks
SDXL_NARROW = {**SDXL_BASE, "block_out_channels": (32, 64, 128), "attention_head_dim": [1, 2, 4],
               "cross_attention_dim": 32, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80}
STRUCTURE = ("num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_output",
             "transformer_depth_middle", "use_linear_in_transformer")


def targeted(unet: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of what the default targets pick (lowrank.inject's own name matching)."""
    return {n: m for n, m in unet.named_modules() if n and matches(n, DEFAULT_TARGETS)}


def kohya_key(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


class Comfy:
    """ComfyUI holding one UNet: its unet_config, the ldm state dict it loads, the LoRA key map it builds."""

    def __init__(self, state_dict: dict, config: dict):
        self.config = config
        self.ldm, self.missing, self.unmapped = comfy.diffusers_to_ldm(state_dict, config)
        self.key_map = comfy.model_lora_keys_unet(self.ldm, config)
        self.ldm_of = {k[:-len(".weight")]: "diffusion_model." + v
                       for k, v in comfy.unet_to_diffusers(config).items() if k.endswith(".weight")}

    def load(self, lora: dict) -> dict:
        """load_lora + add_patches: {model key: patch}; asserts ComfyUI would report nothing left out."""
        patches, not_loaded = comfy.load_lora(lora, self.key_map)
        assert not not_loaded, f"ComfyUI: lora key not loaded: {sorted(not_loaded)[:4]} ({len(not_loaded)})"
        kept, rejected = comfy.add_patches(patches, self.ldm)
        assert not rejected, f"ComfyUI: NOT LOADED {sorted(rejected)[:4]}"
        return kept


def check_loadable(c: Comfy) -> None:
    """ComfyUI's renaming takes every weight of the model, and every map entry it lacks is not an attention weight
    (the entries ComfyUI always emits: conv_shortcut where channels do not change, class_embedding beside
    add_embedding, the last level's down/upsampler): a wrong transformer depth would show in both."""
    assert not c.unmapped, f"weights ComfyUI would not load: {c.unmapped[:4]}"
    assert not [k for k in c.missing if ".attentions." in k], c.missing


def randomise(unet: nn.Module, method: str, seed: int = 1) -> None:
    """Every trainable tensor perturbed (seeded), as tests/test_export.py does, so ΔW ≠ 0 in every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in unet.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g).to(p.dtype) * p.abs().mean().clamp_min(0.2))
        if method == "deltalora":   # the snapshot term B_K A_K ≠ 0 (B starts at 0)
            for layer in lowrank.adapter_layers(unet).values():
                layer.deltalora_B_start.normal_(generator=g).mul_(0.1)
        if method == "dyndora":   # one pruned component (c = 0): dropped from the file
            for layer in lowrank.adapter_layers(unet).values():
                layer.dyndora_c[0] = 0.0


# ----- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    """tiny-sdxl's UNet (float32), loaded as any SDXL folder through the family (StableDiffusionXLPipeline)."""
    from training.families import SDXL, load_pipeline

    assert (SDXL().preset_path() / "model_index.json").is_file()
    pipe = load_pipeline("tiny-sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.unet.config.addition_embed_type == "text_time"
    return pipe.unet.float().eval()


@pytest.fixture(scope="module")
def tiny_comfy(base):
    sd = base.state_dict()
    assert comfy.unet_config_from_diffusers_unet(sd) is None   # no fixed config: ComfyUI loads it as a checkpoint
    c = Comfy(sd, comfy.unet_config_of(sd))
    check_loadable(c)
    return c


@pytest.fixture(scope="module")
def sdxl_meta():
    """SDXL base 1.0's UNet2DConditionModel on the meta device: every name and shape, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684   # SDXL base's UNet
    return unet


@pytest.fixture(scope="module")
def sdxl_comfy(sdxl_meta):
    """ComfyUI holding SDXL base: the unet_config it detects for the diffusers UNet (its fixed SDXL config)."""
    sd = sdxl_meta.state_dict()
    config = comfy.unet_config_from_diffusers_unet(sd)
    assert config is not None, "ComfyUI would not recognise this UNet"
    c = Comfy(sd, config)
    check_loadable(c)
    return c


# ----- tiny-sdxl: kohya for every low-rank method, diff for DoRA -------------------------------------------
def test_every_method_is_listed():
    assert set(OPTIONS) == set(LOW_RANK) == set(lowrank.METHODS) - {"dora"}


@pytest.mark.parametrize("method", LOW_RANK)
def test_kohya_file_is_comfyui_exact_on_sdxl(method, base, tiny_comfy, tmp_path):
    unet = copy.deepcopy(base)
    names = lowrank.inject(unet, AdapterConfig(method=method, **OPTIONS[method]))
    assert set(names) == set(targeted(base)) and all(isinstance(m, nn.Linear) for m in targeted(base).values())
    randomise(unet, method)
    lora = load_file(str(lowrank.export(unet, tmp_path / "sdxl", "kohya")))
    patches = tiny_comfy.load(lora)
    layers = lowrank.adapter_layers(unet)
    # every layer reached once, under its own ldm weight (not another layer's of the same shape)
    assert set(patches) == {tiny_comfy.ldm_of[n] for n in layers} and len(patches) == len(layers)
    rank = {v.shape[0] for k, v in lora.items() if k.endswith(".lora_down.weight")}
    assert len(rank) == 1 and {v.item() for k, v in lora.items() if k.endswith(".alpha")} == {float(rank.pop())}
    for name, layer in layers.items():
        key = tiny_comfy.key_map[kohya_key(name)]
        weight = tiny_comfy.ldm[key]
        assert weight.shape == layer.base.weight.shape == (layer.out_features, layer.in_features)
        kind, (up, down, alpha) = patches[key]
        R = down.shape[0]
        assert kind == "lora" and up.shape == (weight.shape[0], R) and down.shape == (R, weight.shape[1])
        assert up.dtype == down.dtype == torch.float32
        theirs = comfy.lora_update(patches[key], weight.shape).double()
        with torch.no_grad():
            ours = layer.delta_weight().double()
        bound = (3 * R + 4) * U * (up.double().abs() @ down.double().abs())
        err = (theirs - ours).abs()
        assert (err <= bound).all(), f"{name}: {(err / bound).max():.2f} x the float32 bound"
        effect = ours.abs().max().item()
        assert effect > 1e3 * bound.max().item(), f"{name}: ΔW {effect:.2e} too small to test"
        patched = comfy.calculate_weight(patches[key], weight)   # and it is what the weight gets
        torch.testing.assert_close(patched, weight + theirs.float(), rtol=0, atol=0)


def test_dora_kohya_refused_diff_exact_on_sdxl(base, tiny_comfy, tmp_path):
    unet = copy.deepcopy(base)
    lowrank.inject(unet, AdapterConfig(method="dora", rank=2, alpha=4.0))
    randomise(unet, "dora")
    with pytest.raises(ExportError) as e:
        lowrank.export(unet, tmp_path / "k", "kohya")
    assert "'diff'" in str(e.value) and not (tmp_path / "k").exists()

    lora = load_file(str(lowrank.export(unet, tmp_path / "d", "diff")))
    layers = lowrank.adapter_layers(unet)
    assert set(lora) == {kohya_key(n) + ".diff" for n in layers}
    patches = tiny_comfy.load(lora)
    assert set(patches) == {tiny_comfy.ldm_of[n] for n in layers}
    for name, layer in layers.items():
        key = tiny_comfy.key_map[kohya_key(name)]
        w0 = tiny_comfy.ldm[key]
        kind, (diff,) = patches[key]
        assert kind == "diff" and diff.dtype == torch.float32 and diff.shape == w0.shape == layer.base.weight.shape
        patched = comfy.calculate_weight(patches[key], w0).double()
        want = dora_reference(layer)   # DoRA Eq. 5, float64
        delta = want - w0.double()
        # fl(ΔW) in the file, then fl(W0 + fl(ΔW)) in ComfyUI: two roundings, elementwise
        bound = U * (delta.abs() + want.abs()) * (1 + 1e-6) + 1e-12 * delta.abs().max()
        err = (patched - want).abs()
        assert (err <= bound).all(), f"{name}: {(err / bound).max():.2f} x the float32 bound"
        assert delta.abs().max() > 1e3 * U * w0.abs().max(), f"{name}: DoRA's effect too small to test"
    # strength 0.5 (ComfyUI's slider) adds half the diff
    key = tiny_comfy.key_map[kohya_key(next(iter(layers)))]
    half = comfy.calculate_weight(patches[key], tiny_comfy.ldm[key], strength=0.5)
    torch.testing.assert_close(half, tiny_comfy.ldm[key] + 0.5 * patches[key][1][0], rtol=0, atol=0)


# ----- SDXL base 1.0's layout -------------------------------------------------------------------------------
def test_sdxl_base_layout_is_comfyuis_sdxl(sdxl_meta, sdxl_comfy):
    """ComfyUI detects the diffusers SDXL base UNet as its SDXL config, supported_models.SDXL matches it, and the
    derivation the tiny test relies on (comfy_keys.unet_config_of) gives that config exactly."""
    config = sdxl_comfy.config
    assert config == comfy.convert_config(comfy.SDXL)
    assert all(config[k] == v for k, v in comfy.SUPPORTED_SDXL.items())
    derived = comfy.unet_config_of(sdxl_meta.state_dict())
    assert {k: derived[k] for k in derived} == {k: config[k] for k in derived}


def test_sdxl_base_attention_projections_are_in_comfyuis_map(sdxl_meta, sdxl_comfy):
    config = sdxl_comfy.config
    picked = targeted(sdxl_meta)
    linear = [n for n, m in sdxl_meta.named_modules()
              if isinstance(m, nn.Linear) and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    blocks = (sum(config["transformer_depth"]) + sum(config["transformer_depth_output"])
              + config["transformer_depth_middle"])
    assert blocks == 70 and len(picked) == len(linear) == blocks * 2 * 4 == 560
    assert set(picked) == set(linear)
    targets = set()
    for name, module in picked.items():
        key = kohya_key(name)
        assert key in sdxl_comfy.key_map, f"ComfyUI's SDXL map has no {key}"
        target = sdxl_comfy.key_map[key]
        assert target in sdxl_comfy.ldm and sdxl_comfy.ldm[target].shape == module.weight.shape
        targets.add(target)
    assert len(targets) == len(picked)   # one ldm weight per layer
    # and nothing else: the map's attention projections are exactly the ones the default targets pick
    in_map = {k[:-len(".weight")] for k in comfy.unet_to_diffusers(config)
              if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))}
    assert in_map == set(picked)


def test_sdxl_layout_export_loads_under_comfyuis_sdxl_map(sdxl_comfy, tmp_path):
    """A real UNet with SDXL base's tree at small width, adapted and exported: ComfyUI's SDXL map takes every key,
    each onto the weight of the SDXL module of the same name, with no key left over."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_NARROW)
    narrow = comfy.unet_config_of(unet.state_dict())
    assert {k: narrow[k] for k in STRUCTURE} == {k: sdxl_comfy.config[k] for k in STRUCTURE}
    lowrank.inject(unet, AdapterConfig(method="lora", rank=1))
    randomise(unet, "lora")
    lora = load_file(str(lowrank.export(unet, tmp_path / "xl", "kohya")))
    layers = lowrank.adapter_layers(unet)
    assert len(layers) == 560 and len(lora) == 3 * 560
    patches = sdxl_comfy.load(lora)
    assert set(patches) == {sdxl_comfy.ldm_of[n] for n in layers}
