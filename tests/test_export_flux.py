"""DiT exports (component="transformer"), FLUX.1 (FluxTransformer2DModel) and FLUX.2-klein (Flux2Transformer2DModel),
checked with the loaders as oracles: diffusers' own (FluxPipeline / Flux2KleinPipeline.load_lora_weights, run) and
ComfyUI's (re-implemented from its source in tests/comfy_flux_keys.py, cited there per function and commit).

Models: the tiny transformers of diffusers' pipeline tests (tests/pipelines/flux/test_pipeline_flux.py,
tests/pipelines/flux2/test_pipeline_flux2_klein.py get_dummy_components) with 2 double and 2 single blocks,
built from configs, float32, seeded. Targets: the training scripts' defaults (examples/dreambooth/
train_dreambooth_lora_flux.py --lora_layers default; train_dreambooth_lora_flux2_klein.py's list, whose
single_transformer_blocks.{i}.attn.to_out entries run to 24 for klein-9B). Every method gets rank 2 (alpha 6
where it has one, so the scale must be folded into the file) and a seeded perturbation of every trainable
tensor, so ΔW ≠ 0 in every term.

  diffusers: pytorch_lora_weights.safetensors is loaded by the pipeline class's own load_lora_weights into a fresh
    copy of the base transformer (a pipeline with every other component None: the loader touches only the
    transformer), for every method, DoRA included (lora_magnitude_vector + use_dora in the metadata), and the
    transformer's output on fixed inputs must equal ours. float64 (model and inputs): the only error left is the
    float32 storage of the file's factors, ≤ ~2u relative per layer's ΔW (u = 2^-24), so
    max|got − ours| ≤ 4u · (adapted layers) · max|ours − base|. float32, as people run it: two evaluations of
    the same function in a different order (peft's W x + B(A x) against lowrank's fused update) differ by a few
    rounding errors of the output's size per block, max|got − ours| ≤ 4u · (blocks) · max|ours|, while the
    adapter's effect is ≥ 100x that.
  ComfyUI: the base transformer's weights renamed to BFL names by ComfyUI's own loading of a diffusers FLUX model
    (model_detection.convert_diffusers_mmdit: q/k/v into the rows of img_attn.qkv / txt_attn.qkv / linear1), the
    unet_config it detects from them, its FLUX key map, load_lora + add_patches (every file key consumed, every
    patch kept: 'lora key not loaded' / 'NOT LOADED' fail the test) and calculate_weight with offsets (narrow dim
    0, patch, restore). Every BFL weight must equal the same conversion applied to the diffusers weights with our
    ΔW added: right rows, other rows and weights bit-identical. Bound for a LoRA patch as in
    tests/test_export_sdxl_comfy.py, (3R + 4)·u·(|up| @ |down|) against lowrank's fp32 delta_weight(), plus the
    rounding of the final add; a diff patch (DoRA, Eq. 5 in float64 from tests/reference.py) two roundings.
"""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import lowrank
from lowrank import AdapterConfig
from lowrank.export import COMFY_FLUX, ExportError
from tests import comfy_flux_keys as comfy
from tests.test_export_sdxl_comfy import LOW_RANK, randomise
from tests.test_export_ui import dora_reference

U = 2.0 ** -24   # float32 unit roundoff
OPTIONS = {   # rank 2 for all; alpha != r wherever alpha applies
    "lora": dict(alpha=6.0), "dora": dict(alpha=6.0), "delora": dict(), "ether": dict(ether_blocks=2),
    "etherplus": dict(ether_blocks=2), "deltalora": dict(alpha=6.0, deltalora_start_step=0),
    "dyndora": dict(alpha=6.0, dyndora_total_steps=10), "mult_relaxed": dict(), "mult_highrank": dict(),
    "mult_bounded": dict(),
}
DOUBLE, SINGLE = 2, 2


def flux1():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=DOUBLE, num_single_layers=SINGLE,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def flux2():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=DOUBLE, num_single_layers=SINGLE,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                   timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                   guidance_embeds=False)


def flux1_inputs(dtype):
    g, L, T = torch.Generator().manual_seed(0), 16, 6
    img_ids = torch.stack([torch.zeros(L), torch.arange(L) // 4, torch.arange(L) % 4], dim=1)
    return dict(hidden_states=torch.randn(1, L, 4, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, T, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
                timestep=torch.tensor([0.5], dtype=dtype),
                img_ids=img_ids.to(dtype), txt_ids=torch.zeros(T, 3, dtype=dtype), return_dict=False)


def flux2_inputs(dtype):
    g, L, T = torch.Generator().manual_seed(0), 16, 6
    img_ids = torch.stack([torch.zeros(L), torch.arange(L) // 4, torch.arange(L) % 4, torch.zeros(L)], dim=1)
    txt_ids = torch.stack([torch.zeros(T), torch.zeros(T), torch.zeros(T), torch.arange(T)], dim=1)
    return dict(hidden_states=torch.randn(1, L, 4, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, T, 16, generator=g).to(dtype),
                timestep=torch.tensor([0.5], dtype=dtype), img_ids=img_ids.to(dtype), txt_ids=txt_ids.to(dtype),
                guidance=None, return_dict=False)


FAMILIES = {
    "flux1": dict(
        build=flux1, inputs=flux1_inputs, pipeline="FluxPipeline",
        targets=["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                 "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2"],
        # the rest of ComfyUI's FLUX.1 map: proj_mlp (linear1 rows 3h..7h), norm_out (scale/shift swapped) …
        more=["proj_mlp", "single_transformer_blocks.0.proj_out", "norm.linear", "norm1.linear",
              "norm1_context.linear", "norm_out.linear", "x_embedder", "context_embedder",
              "time_text_embed.text_embedder.linear_1", "attn.to_q"]),
    "flux2": dict(
        build=flux2, inputs=flux2_inputs, pipeline="Flux2KleinPipeline",
        targets=["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                 *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)]],
        more=["add_q_proj", "add_v_proj", "to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
              "norm_out.linear", "x_embedder", "context_embedder", "proj_out", "attn.to_k",
              "single_transformer_blocks.1.attn.to_out"]),
}


# ----- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bases():
    """{family: its tiny base transformer, float32, eval}, seeded."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    out = {}
    with torch.random.fork_rng(devices=[]):
        for family, spec in FAMILIES.items():
            torch.manual_seed(0)
            out[family] = spec["build"]().eval()
    return out


class Comfy:
    """ComfyUI holding one FLUX transformer: its BFL state dict (as it loads the diffusers weights), the
    unet_config it detects from it, the LoRA key map it builds."""

    def __init__(self, transformer: nn.Module):
        self.sd = {k: v.detach() for k, v in transformer.state_dict().items()}
        self.bfl, self.unmapped = comfy.convert_diffusers_mmdit(self.sd, "diffusion_model.")
        self.config = comfy.detect_flux_config(self.bfl)
        self.key_map = comfy.model_lora_keys_unet(self.bfl, self.config)
        self.sd_map = comfy.flux_to_diffusers(self.config, "diffusion_model.")

    def target(self, name: str):
        """The key-map value of a diffusers layer: its BFL weight, slice or function."""
        return self.sd_map[f"{name}.weight"]

    def to_bfl(self, weights: dict) -> dict:
        """Diffusers-named tensors (every weight of the model, any dtype) in ComfyUI's BFL layout."""
        return comfy.convert_diffusers_mmdit({**self.sd, **weights}, "diffusion_model.")[0]

    def load(self, lora: dict) -> dict:
        """convert_lora + load_lora + add_patches: {BFL key: [patch, …]}; nothing left over."""
        assert comfy.convert_lora_rewrites(lora) is None   # the file goes on to load_lora as written
        patches, not_loaded = comfy.load_lora(lora, self.key_map)
        assert not not_loaded, f"ComfyUI: lora key not loaded: {sorted(not_loaded)[:4]} ({len(not_loaded)})"
        kept, rejected = comfy.add_patches(patches, self.bfl)
        assert not rejected, f"ComfyUI: NOT LOADED {sorted(map(str, rejected))[:4]}"
        self.patch_keys = set(patches)
        return kept


@pytest.fixture(scope="module")
def comfys(bases):
    return {family: Comfy(model) for family, model in bases.items()}


def adapted(base: nn.Module, method: str, targets, **extra) -> nn.Module:
    model = copy.deepcopy(base)
    lowrank.inject(model, AdapterConfig(method=method, rank=2, target_modules=targets, **{**OPTIONS[method], **extra}))
    randomise(model, method)
    return model


def kohya_key(name: str) -> str:
    return "lora_transformer_" + name.replace(".", "_")


# ----- ComfyUI's map and layout themselves --------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_loads_the_tiny_transformer_and_names_exactly_the_layers_we_export(family, bases, comfys):
    """ComfyUI's conversion puts each diffusers weight where BFL's layout has it (qkv = [q; k; v], FLUX.1's
    linear1 = [q; k; v; proj_mlp], FLUX.2's linear1 = to_qkv_mlp_proj), detects the config it was built with, and
    lowrank.export's COMFY_FLUX accepts exactly the Linear layers flux_to_diffusers names."""
    model, c = bases[family], comfys[family]
    sd, bfl = c.sd, c.bfl
    h = model.config.num_attention_heads * model.config.attention_head_dim
    assert c.config["hidden_size"] == h and c.config["depth"] == DOUBLE and c.config["depth_single_blocks"] == SINGLE
    for i in range(DOUBLE):
        for stream, (q, k, v) in {"img": ("to_q", "to_k", "to_v"),
                                  "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}.items():
            want = torch.cat([sd[f"transformer_blocks.{i}.attn.{p}.weight"] for p in (q, k, v)])
            assert torch.equal(bfl[f"diffusion_model.double_blocks.{i}.{stream}_attn.qkv.weight"], want)
    for i in range(SINGLE):
        parts = ([f"attn.{p}" for p in ("to_q", "to_k", "to_v")] + ["proj_mlp"] if family == "flux1"
                 else ["attn.to_qkv_mlp_proj"])
        want = torch.cat([sd[f"single_transformer_blocks.{i}.{p}.weight"] for p in parts])
        assert torch.equal(bfl[f"diffusion_model.single_blocks.{i}.linear1.weight"], want)
    # what ComfyUI leaves out of a diffusers FLUX model: FLUX.2's shared modulation / time embedding (its BFL
    # checkpoints carry them under their own names), nothing of FLUX.1's
    expected_unmapped = set() if family == "flux1" else {
        k for k in sd if k.startswith(("double_stream_modulation", "single_stream_modulation", "time_guidance"))}
    assert set(c.unmapped) == expected_unmapped
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    named = {n for n in linear if f"{n}.weight" in c.sd_map}
    assert {n for n in linear if COMFY_FLUX.fullmatch(n)} == named
    assert named == {n for n in linear if not any(n.startswith(p) for p in ("double_stream_modulation",
                                                                              "single_stream_modulation",
                                                                              "time_guidance"))}


# ----- diffusers ----------------------------------------------------------------------------------------------
@torch.no_grad()
def run(model: nn.Module, family: str) -> torch.Tensor:
    return model(**FAMILIES[family]["inputs"](next(model.parameters()).dtype))[0]


def load_with_diffusers(base: nn.Module, family: str, directory) -> nn.Module:
    """The pipeline class's own load_lora_weights(directory) into a fresh copy of the base transformer."""
    import diffusers

    fresh = copy.deepcopy(base)
    cls = getattr(diffusers, FAMILIES[family]["pipeline"])
    others = ("scheduler", "vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2")
                                                                 if family == "flux1" else ())
    pipe = cls(transformer=fresh, **dict.fromkeys(others))
    pipe.load_lora_weights(str(directory))
    assert pipe.transformer is fresh and any("lora" in n for n, _ in fresh.named_modules())
    return fresh


@pytest.mark.parametrize("method", list(lowrank.METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_file_is_what_the_flux_pipeline_loads(family, method, bases, tmp_path):
    assert set(OPTIONS) == set(lowrank.METHODS)
    targets = FAMILIES[family]["targets"]
    blocks = DOUBLE + SINGLE
    for dtype in (torch.float64, torch.float32):
        base = copy.deepcopy(bases[family]).to(dtype)
        ours_model = adapted(base, method, targets)
        layers = lowrank.adapter_layers(ours_model)
        out = tmp_path / str(dtype)
        written = lowrank.export(ours_model, out, "diffusers", component="transformer")
        with safe_open(str(written), "pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        parts = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if method == "dora" else ())
        assert keys == {f"transformer.{n}.{p}" for n in layers for p in parts}
        cfg = json.loads(meta["lora_adapter_metadata"])
        assert cfg["transformer.lora_alpha"] == cfg["transformer.r"]   # the scale is folded: 1
        assert cfg["transformer.use_dora"] == (method == "dora")
        assert cfg["transformer.target_modules"] == sorted(layers)

        base_out, ours = run(base, family), run(ours_model, family)
        got = run(load_with_diffusers(base, family, out), family)
        effect, diff = (ours - base_out).abs().max().item(), (got - ours).abs().max().item()
        if dtype == torch.float64:
            bound = 4 * U * len(layers) * effect
        else:
            bound = 4 * U * blocks * ours.abs().max().item()
            assert effect > 100 * bound, f"{family}/{method}: the adapter does too little ({effect:.2e})"
        assert diff <= bound, f"{family}/{method} {dtype}: max diff {diff:.2e} > {bound:.2e} (effect {effect:.2e})"


# ----- ComfyUI ------------------------------------------------------------------------------------------------
def check_comfyui(c: Comfy, model: nn.Module, patches: dict, want: dict, bound: dict) -> None:
    """Every layer reaches its own BFL target (slice) once; each patched BFL weight equals ComfyUI's own conversion
    of the diffusers weights with `want` (float64, per layer) put in, within `bound` (per layer) plus the
    rounding of the final add; every other row and weight is untouched."""
    layers = lowrank.adapter_layers(model)
    assert c.patch_keys == {c.target(n) for n in layers} and len(c.patch_keys) == len(layers)
    assert set(patches) == {t if isinstance(t, str) else t[0] for t in c.patch_keys}
    sd64 = {k: v.double() for k, v in c.sd.items()}
    full_want = c.to_bfl({**sd64, **{f"{n}.weight": w for n, w in want.items()}})
    full_bound = c.to_bfl({**{k: torch.zeros_like(v) for k, v in sd64.items()},
                           **{f"{n}.weight": b for n, b in bound.items()}})
    for key, w0 in c.bfl.items():
        got = comfy.calculate_weight(patches[key], w0) if key in patches else w0
        err = (got.double() - full_want[key]).abs()
        tol = full_bound[key] + U * (full_want[key].abs() + full_bound[key]) * (1 + 1e-6)
        assert (err <= tol).all(), f"{key}: {(err / tol.clamp_min(1e-300)).max():.2f} x the float32 bound"
        if key not in patches:
            assert torch.equal(got, w0) and torch.equal(full_want[key], w0.double())


def lora_expectation(model: nn.Module, lora: dict) -> tuple[dict, dict]:
    """{name: W0 + lowrank's own ΔW (delta_weight, fp32) in float64}, {name: (3R + 4)·u·(|up| @ |down|)}; asserts the
    file says scale 1 and every layer's effect is ≥ 1e3 x its bound."""
    want, bound = {}, {}
    for name, layer in lowrank.adapter_layers(model).items():
        up, down = lora[f"{kohya_key(name)}.lora_up.weight"], lora[f"{kohya_key(name)}.lora_down.weight"]
        R = down.shape[0]
        assert lora[f"{kohya_key(name)}.alpha"].item() == float(R) and up.dtype == down.dtype == torch.float32
        with torch.no_grad():
            delta = layer.delta_weight().double()
        want[name] = layer.base.weight.detach().double() + delta
        bound[name] = (3 * R + 4) * U * (up.double().abs() @ down.double().abs())
        assert delta.abs().max() > 1e3 * bound[name].max(), f"{name}: ΔW too small to test"
    return want, bound


@pytest.mark.parametrize("method", LOW_RANK)
@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_is_comfyui_exact(family, method, bases, comfys, tmp_path):
    model = adapted(bases[family], method, FAMILIES[family]["targets"])
    lora = load_file(str(lowrank.export(model, tmp_path / "k", "kohya", component="transformer")))
    layers = lowrank.adapter_layers(model)
    parts = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(lora) == {f"{kohya_key(n)}.{p}" for n in layers for p in parts}
    assert len({v.shape[0] for k, v in lora.items() if k.endswith(".lora_down.weight")}) == 1   # one rank
    c = comfys[family]
    check_comfyui(c, model, c.load(lora), *lora_expectation(model, lora))


@pytest.mark.parametrize("family", FAMILIES)
def test_dora_kohya_refused_diff_exact(family, bases, comfys, tmp_path):
    model = adapted(bases[family], "dora", FAMILIES[family]["targets"])
    with pytest.raises(ExportError) as e:
        lowrank.export(model, tmp_path / "k", "kohya", component="transformer")
    assert "'diff'" in str(e.value) and "'diffusers'" in str(e.value) and not (tmp_path / "k").exists()
    lora = load_file(str(lowrank.export(model, tmp_path / "d", "diff", component="transformer")))
    layers = lowrank.adapter_layers(model)
    assert set(lora) == {f"{kohya_key(n)}.diff" for n in layers}
    want, bound = {}, {}
    for name, layer in layers.items():
        w_eff = dora_reference(layer)   # DoRA Eq. 5, float64
        delta = w_eff - layer.base.weight.detach().double()
        assert lora[f"{kohya_key(name)}.diff"].dtype == torch.float32
        assert delta.abs().max() > 1e3 * U * layer.base.weight.abs().max(), f"{name}: DoRA's effect too small"
        want[name] = w_eff
        bound[name] = U * delta.abs() * (1 + 1e-6) + 1e-12 * delta.abs().max()   # fl(ΔW) in the file
    c = comfys[family]
    check_comfyui(c, model, c.load(lora), want, bound)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_comfyuis_flux_map_names(family, bases, comfys, tmp_path):
    """Beyond the default targets: every slice kind (FLUX.1's proj_mlp into linear1 rows 3h..7h, the text stream's
    add_*_proj), whole fused weights, norm_out.linear (ComfyUI swaps scale/shift through the map's function), the
    embedders; as kohya and as diff (lora: ΔW = s·B A in float64 from the layer's own tensors)."""
    spec = FAMILIES[family]
    model = adapted(bases[family], "lora", spec["targets"] + spec["more"])
    layers = lowrank.adapter_layers(model)
    assert {"norm_out.linear", "x_embedder", "context_embedder"} <= set(layers)
    c = comfys[family]
    lora = load_file(str(lowrank.export(model, tmp_path / "k", "kohya", component="transformer")))
    check_comfyui(c, model, c.load(lora), *lora_expectation(model, lora))

    lora = load_file(str(lowrank.export(model, tmp_path / "d", "diff", component="transformer")))
    want, bound = {}, {}
    for name, layer in layers.items():
        B, A = layer.lora_B.detach().double(), layer.lora_A.detach().double()
        delta = layer.scale * B @ A
        want[name] = layer.base.weight.detach().double() + delta
        # the factors the export multiplies are the layer's delta_factors(), (s·B in float32, A): one rounding
        # of s·B, then fl(ΔW) in the file
        bound[name] = U * (delta.abs() + 2 * abs(layer.scale) * B.abs() @ A.abs()) * (1 + 1e-6)
    check_comfyui(c, model, c.load(lora), want, bound)
    # strength 0.5 (ComfyUI's slider) adds half, in the slice only
    name = next(n for n in layers if n.endswith("attn.to_k"))
    key, offset = c.target(name)
    patch = c.load({f"{kohya_key(name)}.diff": lora[f"{kohya_key(name)}.diff"]})[key]
    half = comfy.calculate_weight([(0.5, *patch[0][1:])], c.bfl[key])
    want = c.bfl[key].clone()
    want.narrow(*offset).add_(0.5 * lora[f"{kohya_key(name)}.diff"])
    torch.testing.assert_close(half, want, rtol=0, atol=0)


def test_layers_outside_comfyuis_map_are_refused(bases, tmp_path):
    """FLUX.2's shared modulation has no name in ComfyUI's FLUX map: kohya and diff refuse (nothing written),
    naming the formats that hold it; the diffusers file holds it."""
    model = adapted(bases["flux2"], "lora", ["to_q", "single_stream_modulation.linear"])
    for fmt in ("kohya", "diff"):
        with pytest.raises(ExportError, match="single_stream_modulation.linear.*'diffusers' or 'peft'"):
            lowrank.export(model, tmp_path / fmt, fmt, component="transformer")
        assert not (tmp_path / fmt).exists()
    written = lowrank.export(model, tmp_path / "diffusers", "diffusers", component="transformer")
    assert "transformer.single_stream_modulation.linear.lora_A.weight" in load_file(str(written))
