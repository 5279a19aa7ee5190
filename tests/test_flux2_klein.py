"""FLUX.2-klein through the model families (training/families/flux2_klein.py): the `tiny-flux2-klein` preset
(double- and single-stream blocks, a Qwen3 text encoder with an offline tokenizer and chat template,
AutoencoderKLFlux2 with BatchNorm statistics) loaded by diffusers' own Flux2KleinPipeline; its conditioning against
Flux2KleinPipeline.encode_prompt; packing, ids and the transformer call against the pipeline's; the latent path
(mode -> patchify -> BN) against the pipeline's _encode_vae_image; DreamBooth with lora, dora, delora and etherplus,
prior preservation, checkpoint samples with the pipeline's flow-matching scheduler, bit-identical resume; and the
diffusers export read back by Flux2KleinPipeline.load_lora_weights.

Every run is in-process (dreambooth.main), 32 px (16x16 VAE latents, patchified to 8x8 = 64 image tokens beside
512 text tokens), 2-4 steps.
"""
import argparse
import copy
import inspect
import json
import math
import os

import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

os.environ["HF_HUB_OFFLINE"] = "1"

import lowrank  # noqa: E402
from ground import runfolder  # noqa: E402
from lowrank.inject import matches  # noqa: E402
from tests.family_runs import check_resume_after_a_kill, one_thread  # noqa: E402,F401
from tests.test_dreambooth import metrics  # noqa: E402
from training import dreambooth  # noqa: E402
from training.common import TrainingError  # noqa: E402
from training.families import FAMILIES, Flux2Klein, default_resolution, family_of, load_family  # noqa: E402
from training.families.flux2_klein import MAX_SEQUENCE_LENGTH, TEXT_LAYERS, klein_latents  # noqa: E402
from training.images.diffusion import FlowMatchObjective  # noqa: E402

PRESET = "tiny-flux2-klein"
SIZE = 32                      # pixels; the tiny VAE halves it (16x16), patchify halves again: 8x8 tokens
PROMPT = "a photo of sks cat"  # the embedded example subject's prompt
FIG3 = "transformer_blocks.0.attn.to_out.0"
METHODS = ["lora", "dora", "delora", "etherplus"]
FAST = ["--pretrained_model_name_or_path", PRESET, "--seed", "0", "--resolution", str(SIZE), "--rank", "4",
        "--max_train_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none"]
CPU = torch.device("cpu")
U32 = 2.0 ** -24               # float32 unit roundoff
P = Flux2KleinPipeline         # its static helpers: _pack_latents, _prepare_latent_ids, ...

pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one $LOWRANK_CACHE for the session


def train(out, *extra):
    return dreambooth.main(["--output_dir", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def klein(tiny_cache):
    """(family, pipeline) of the preset, built once into the session cache."""
    family, pipe = load_family(PRESET)
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


@pytest.fixture(scope="module")
def cond(klein):
    family, pipe = klein
    return family.encode(pipe, [PROMPT], SIZE)


@pytest.fixture(scope="module")
def trained(klein, tmp_path_factory):
    """method -> the folder of a finished 2-step DreamBooth run (trained once, shared). The lora run also has
    prior preservation (2 class images from the base pipeline) and a checkpoint with samples at step 2."""
    runs = {}

    def get(method):
        if method not in runs:
            root = tmp_path_factory.mktemp("klein-runs")
            extra = ["--with_prior_preservation", "--class_data_dir", str(root / "classes"), "--num_class_images",
                     "2", "--sample_batch_size", "2", "--checkpointing_steps", "2"] if method == "lora" else \
                ["--skip_final_samples"]
            assert train(root / method, "--method", method, *extra) == 0
            runs[method] = root / method
        return runs[method]

    return get


@torch.no_grad()
def transformer_out(transformer, cond):
    """The transformer's packed prediction on fixed noisy tokens at a fixed timestep, called as the pipeline does."""
    dtype = next(transformer.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, transformer.config.in_channels, SIZE // 4, SIZE // 4, generator=g).to(dtype)
    embeds = cond["encoder_hidden_states"].to(dtype)
    tokens = P._pack_latents(noisy)
    return transformer(hidden_states=tokens, encoder_hidden_states=embeds, timestep=torch.tensor([0.5], dtype=dtype),
                       img_ids=P._prepare_latent_ids(noisy), txt_ids=P._prepare_text_ids(embeds), guidance=None,
                       return_dict=False)[0]


def adapted(base, run_dir, dtype=torch.float32):
    model = copy.deepcopy(base).to(dtype)
    lowrank.load_adapter(model, run_dir)
    return model


# ----- 1. the preset ------------------------------------------------------------------------------------
def test_preset_is_flux2_klein_in_miniature(klein, tmp_path):
    family, pipe = klein
    assert isinstance(family, Flux2Klein) and family.name == "flux2-klein" and family in FAMILIES
    assert type(pipe) is Flux2KleinPipeline and pipe.config.is_distilled is False
    assert type(pipe.transformer) is Flux2Transformer2DModel and type(pipe.text_encoder) is Qwen3ForCausalLM
    assert type(pipe.vae) is AutoencoderKLFlux2 and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert family.denoiser(pipe) is pipe.transformer

    t, te, vae = pipe.transformer.config, pipe.text_encoder.config, pipe.vae.config
    assert len(pipe.transformer.transformer_blocks) >= 2 and len(pipe.transformer.single_transformer_blocks) >= 2
    assert t.guidance_embeds is False and sum(t.axes_dims_rope) == t.attention_head_dim
    # the consistency rules of diffusers' klein: text width x layers, 2x2-patchified VAE channels
    assert t.joint_attention_dim == te.hidden_size * len(TEXT_LAYERS)
    assert t.in_channels == 4 * vae.latent_channels == pipe.vae.bn.num_features
    assert te.num_hidden_layers > max(TEXT_LAYERS)   # the pipeline's default layers exist: it samples as trained
    assert te.vocab_size == len(pipe.tokenizer) < 151936
    assert pipe.vae_scale_factor == 2
    bn = pipe.vae.bn   # fixed, non-trivial statistics: the normalisation is not the identity
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))

    # the tokenizer: Qwen3's chat turn for the pipeline's call, its special tokens whole
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = pipe.tokenizer(text).input_ids
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|im_start|>" and tokens.count("<|im_end|>") == 1 and "<think>" in tokens
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer.decode(ids) == text

    # the family of a preset name and of the folder; the trainers' default resolutions
    folder = family.preset_path()
    assert isinstance(family_of(PRESET), Flux2Klein) and isinstance(family_of(str(folder)), Flux2Klein)
    assert family.local_folder(PRESET) == str(folder)
    assert default_resolution(PRESET) == 64 and Flux2Klein.default_resolution == 1024

    # fixed seeds: a second build is the same model, bit for bit
    family.build_preset(tmp_path)
    for part in ("transformer", "text_encoder", "vae"):
        a, b = (load_file(str(next((d / part).glob("*.safetensors")))) for d in (folder, tmp_path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_default_targets_are_the_klein_scripts(klein):
    family, pipe = klein
    targets = list(family.default_targets)
    names = [n for n, _ in pipe.transformer.named_modules() if n and matches(n, targets)]
    expected = [f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0")] + \
        [f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_qkv_mlp_proj", "to_out")]
    assert sorted(names) == sorted(expected)
    assert all(isinstance(pipe.transformer.get_submodule(n), torch.nn.Linear) for n in names)
    # klein-4B's last single block (19) and klein-9B's (23) are named too; the double blocks' to_out (a
    # ModuleList), the text stream's projections and the MLPs are not
    assert matches("single_transformer_blocks.19.attn.to_out", targets)
    assert matches("single_transformer_blocks.23.attn.to_out", targets)
    for other in ("transformer_blocks.0.attn.to_out", "transformer_blocks.0.attn.add_q_proj",
                  "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.linear_in",
                  "single_transformer_blocks.0.attn"):
        assert not matches(other, targets), other
    assert FIG3 in names and family.fig3_pattern in FIG3


# ----- 2. the conditioning and the denoiser call are the pipeline's -------------------------------------
def test_encode_is_the_pipelines_encode_prompt(klein):
    family, pipe = klein
    # the layers and length the pipeline samples with, by default, are the ones the family encodes with
    defaults = inspect.signature(Flux2KleinPipeline.__call__).parameters
    assert tuple(defaults["text_encoder_out_layers"].default) == TEXT_LAYERS
    assert defaults["max_sequence_length"].default == MAX_SEQUENCE_LENGTH

    prompts = [PROMPT, "a sks cat on the beach with a red ball"]
    cond = family.encode(pipe, prompts, 48)
    assert set(cond) == {"encoder_hidden_states"}
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(prompts, device=CPU)
        hidden = pipe.text_encoder(**pipe.tokenizer(
            [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False) for p in prompts],
            padding="max_length", max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt"),
            output_hidden_states=True).hidden_states
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert embeds.shape == (2, MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim)
    # the three layers side by side (B, L, 3·D), in the pipeline's order
    d = pipe.text_encoder.config.hidden_size
    for j, k in enumerate(TEXT_LAYERS):
        assert torch.allclose(embeds[..., j * d:(j + 1) * d], hidden[k], atol=1e-6)
    assert not torch.equal(embeds[0], embeds[1])
    assert text_ids.shape == (2, MAX_SEQUENCE_LENGTH, 4)
    assert torch.equal(text_ids[0, :, 3], torch.arange(MAX_SEQUENCE_LENGTH)) and not text_ids[..., :3].any()


def test_pack_unpack_round_trip_and_denoise_is_the_pipelines_transformer_call(klein, cond):
    family, pipe = klein
    g = torch.Generator().manual_seed(0)
    c = pipe.transformer.config.in_channels
    x = torch.randn(2, c, 6, 4, generator=g)   # not square: rows and columns must not swap
    ids = P._prepare_latent_ids(x)
    tokens = P._pack_latents(x)
    assert tokens.shape == (2, 24, c) and ids.shape == (2, 24, 4)
    assert torch.equal(P._unpack_latents_with_ids(tokens, ids, 6, 4), x)
    assert torch.equal(ids[0, :, 1] * 4 + ids[0, :, 2], torch.arange(24))   # (t, h, w, l) row-major

    noisy, t = torch.randn(2, c, SIZE // 4, SIZE // 4, generator=g), torch.tensor([10.0, 900.0])
    two = {"encoder_hidden_states": cond["encoder_hidden_states"].expand(2, -1, -1)}
    with torch.no_grad():
        ours = family.denoise(pipe.transformer, noisy, t, two)
        packed = P._pack_latents(noisy)
        theirs = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=None,
                                  encoder_hidden_states=two["encoder_hidden_states"],
                                  txt_ids=P._prepare_text_ids(two["encoder_hidden_states"]),
                                  img_ids=P._prepare_latent_ids(noisy), return_dict=False)[0]
    assert ours.shape == noisy.shape
    b, h, w = noisy.shape[0], noisy.shape[2], noisy.shape[3]
    assert torch.equal(ours, theirs[:, :h * w].permute(0, 2, 1).reshape(b, c, h, w))


# ----- 3. the latents are the pipeline's; the flow-matching step on them --------------------------------
def test_latent_encoder_is_the_pipelines_latent_path(klein):
    family, pipe = klein
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    with torch.no_grad():
        ours = klein_latents(pipe.vae, pixels)
        theirs = pipe._encode_vae_image(pixels, generator=None)
        mode = pipe.vae.encode(pixels).latent_dist.mode()
    assert ours.shape == (2, pipe.transformer.config.in_channels, SIZE // 4, SIZE // 4)
    assert torch.equal(ours, theirs)
    # the pipeline's decode path undoes it: un-normalise, unpatchify -> the VAE's mode
    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    back = P._unpatchify_latents(ours * torch.sqrt(bn.running_var + eps).view(1, -1, 1, 1)
                                 + bn.running_mean.view(1, -1, 1, 1))
    assert torch.allclose(back, mode, atol=1e-5)

    # the family's objective: these latents, σ from the scheduler's grid, x_σ = (1 − σ)x + σ·noise
    args = argparse.Namespace(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    objective = family.objective(pipe, torch.float32, CPU, args)
    assert isinstance(objective, FlowMatchObjective) and objective.weighting[0] == "logit_normal"
    assert objective.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
    latents, noise, timesteps, sigmas, noisy = objective.noisy_latents(pixels, torch.Generator().manual_seed(1))
    assert torch.equal(latents, ours)
    assert torch.allclose(noisy, (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise)
    assert torch.allclose(timesteps, sigmas * 1000)
    # defaults for missing flags: diffusers'
    assert family.objective(pipe, torch.float32, CPU, argparse.Namespace()).weighting == ("none", 0.0, 1.0, 1.29)
    with pytest.raises(TrainingError, match="max_sequence_length"):
        family.for_run(argparse.Namespace(max_sequence_length=256))
    assert family.for_run(argparse.Namespace(max_sequence_length=512)).call_kwargs(pipe) == {}


# ----- 4. every method trains on klein --------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_on_tiny_flux2_klein(method, klein, cond, trained):
    out = trained(method)
    assert json.loads((out / runfolder.EXIT_STATUS).read_text()) == {"code": 0, "message": "done"}
    run = json.loads((out / "run.json").read_text())
    assert run["family"] == "flux2-klein" and run["pipeline_class"] == "Flux2KleinPipeline"
    assert run["denoiser"] == "transformer" and run["pretrained_model_path"] == str(Flux2Klein().preset_path())
    assert "flux2-klein" in run["family_tags"] and run["adapter_config"]["method"] == method
    assert run["fig3_layer"] == FIG3 and run["adapted_layers"] == 12   # 2 x 4 double + 2 x 2 single
    assert "Flux2KleinPipeline" in (out / "README.md").read_text()

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["distance_fig3"]) for r in rows)
    assert rows[-1]["distance_fig3"] > 0

    # the saved adapter is the trained one: in a fresh transformer it has the last logged distance, and it
    # changes the prediction by far more than float32 rounding over the adapted layers could
    base = klein[1].transformer
    model = adapted(base, out)
    assert lowrank.weight_distance(model)[FIG3] == pytest.approx(rows[-1]["distance_fig3"], rel=1e-6, abs=1e-9)
    before, after = transformer_out(base, cond), transformer_out(model, cond)
    assert (after - before).abs().max().item() > 10 * run["adapted_layers"] * U32 * before.abs().max().item()


def test_prior_preservation_and_checkpoint_samples(trained):
    out = trained("lora")
    classes = out.parent / "classes"
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "class-00001.png"]
    assert all(Image.open(p).size == (SIZE, SIZE) for p in classes.iterdir())
    assert json.loads((out / "run.json").read_text())["class_images"] == 2
    for folder in (out / "checkpoint-2" / runfolder.SAMPLES, out / runfolder.SAMPLES):   # checkpoint, final
        lines = [json.loads(x) for x in (folder / runfolder.PROMPTS).read_text().splitlines()]
        assert [(x["prompt"], x["seed"]) for x in lines] == [(PROMPT, 0)]
        assert Image.open(folder / lines[0]["image"]).size == (SIZE, SIZE)
    assert Image.open(out / runfolder.SAMPLES_GRID).size == (SIZE, SIZE)


def test_sampling_pipeline_keeps_the_flow_matching_scheduler(klein):
    family, pipe = klein
    sampler = family.sampling_pipeline(pipe)
    assert type(sampler) is Flux2KleinPipeline and type(sampler.scheduler) is FlowMatchEulerDiscreteScheduler
    assert sampler.scheduler is not pipe.scheduler and sampler.scheduler.config == pipe.scheduler.config
    assert sampler.transformer is pipe.transformer and sampler.config.is_distilled is False
    # a distilled checkpoint (model_index.json's is_distilled) samples as one: no classifier-free guidance
    distilled = family.new_pipeline(pipe.components, pipe.scheduler, is_distilled=True)
    assert family.sampling_pipeline(distilled).config.is_distilled is True


# ----- 5. resume is bit-identical -----------------------------------------------------------------------
def test_killed_after_a_checkpoint_then_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    check_resume_after_a_kill(train, tmp_path, monkeypatch)


# ----- 6. diffusers reads the export --------------------------------------------------------------------
def test_diffusers_load_lora_weights_of_a_run_gives_our_transformer_output(klein, cond, trained):
    run_dir = trained("lora")
    run = json.loads((run_dir / "run.json").read_text())
    pipe = Flux2KleinPipeline.from_pretrained(run["pretrained_model_path"])
    pipe.load_lora_weights(str(run_dir))
    base = klein[1].transformer
    ours, before, got = (transformer_out(m, cond) for m in (adapted(base, run_dir), base, pipe.transformer))
    scale, layers = ours.abs().max().item(), run["adapted_layers"]
    tol = layers * U32 * scale
    assert (ours - before).abs().max().item() > 50 * tol   # the adapter does something measurable
    assert (got - ours).abs().max().item() <= tol
