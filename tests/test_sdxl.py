"""SDXL through the model families (training/families): the `tiny-sdxl` preset, its conditioning against
diffusers' own StableDiffusionXLPipeline, DreamBooth with every method on it, prior preservation and checkpoint
samples, bit-identical resume, and the diffusers export read back by StableDiffusionXLPipeline.load_lora_weights.

Every run is in-process (dreambooth.main), 32 px (16x16 latents), 2-4 steps; one trained run per method is
shared by the training and export tests.
"""
import copy
import json
import math
import os
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

os.environ["HF_HUB_OFFLINE"] = "1"

import lowrank  # noqa: E402
from ground import runfolder  # noqa: E402
from tests.family_runs import check_resume_after_a_kill, one_thread  # noqa: E402,F401
from tests.stderr import one_error_line  # noqa: E402
from tests.test_dreambooth import metrics  # noqa: E402
from training import dreambooth  # noqa: E402
from training.common import TrainingError  # noqa: E402
from training.families import SDXL, FamilyError, default_resolution, family_of, load_family  # noqa: E402

PRESET = "tiny-sdxl"
SIZE = 32                      # pixels; the tiny VAE halves it: 16x16 latents
PROMPT = "a photo of sks cat"  # the embedded example subject's prompt
FAST = ["--pretrained_model_name_or_path", PRESET, "--seed", "0", "--resolution", str(SIZE), "--rank", "4",
        "--max_train_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none"]
U32 = 2.0 ** -24               # float32 unit roundoff

pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one $LOWRANK_CACHE for the session


def train(out, *extra):
    return dreambooth.main(["--output_dir", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def sdxl(tiny_cache):
    """(family, pipeline) of the preset, built once into the session cache."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()   # "no LoRA keys for the text encoders": true and expected here
    family, pipe = load_family(PRESET)
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


@pytest.fixture(scope="module")
def cond(sdxl):
    """The UNet's inputs besides the latents: the preset's own conditioning of PROMPT at SIZE."""
    family, pipe = sdxl
    return family.encode(pipe, [PROMPT], SIZE)


@pytest.fixture(scope="module")
def trained(sdxl, tmp_path_factory):
    """method -> the folder of a finished 2-step DreamBooth run on tiny-sdxl (trained once, shared)."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp("sdxl-runs") / method
            assert train(out, "--method", method, "--skip_final_samples") == 0
            runs[method] = out
        return runs[method]

    return get


@torch.no_grad()
def unet_out(unet, cond):
    """The UNet's prediction on fixed noisy latents at a fixed timestep, in the UNet's dtype; `cond` is passed
    as diffusers' pipeline passes it (encoder_hidden_states + added_cond_kwargs)."""
    dtype = next(unet.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=g).to(dtype)
    c = {k: v.to(dtype) for k, v in cond.items()}
    return unet(noisy, torch.tensor([500]), c["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}).sample


def adapted_unet(base, run_dir, dtype=torch.float32):
    """A fresh copy of the base UNet in `dtype` with the run's adapter loaded by lowrank.load_adapter."""
    unet = copy.deepcopy(base).to(dtype)
    lowrank.load_adapter(unet, run_dir)
    return unet


# ----- 1. the preset and how a folder's family is read -------------------------------------------------
def test_preset_is_sdxl_in_miniature_and_folders_are_recognised(sdxl, tmp_path, capsys):
    family, pipe = sdxl
    assert isinstance(family, SDXL) and family.name == "sdxl"
    assert type(pipe) is StableDiffusionXLPipeline
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    # text_time's input: 6 time ids x addition_time_embed_dim + the second encoder's pooled projection
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + \
        pipe.text_encoder_2.config.projection_dim
    # the cross-attention width is both encoders' hidden states side by side
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    depths = [len(m.transformer_blocks) for m in pipe.unet.modules() if hasattr(m, "transformer_blocks")]
    assert max(depths) > 1 and max(cfg.transformer_layers_per_block) > 1   # SDXL's stacked transformer layers

    preset_dir = family.preset_path()
    assert (preset_dir / "model_index.json").is_file()
    assert isinstance(family_of(str(preset_dir)), SDXL) and isinstance(family_of(PRESET), SDXL)
    assert family.local_folder(PRESET) == str(preset_dir)
    assert default_resolution(PRESET) == 64

    # the same model saved elsewhere by diffusers' own save_pretrained: an SDXL folder like any other
    copy_dir = tmp_path / "my-sdxl"
    pipe.save_pretrained(copy_dir)
    assert isinstance(family_of(str(copy_dir)), SDXL)
    assert family.local_folder(str(copy_dir)) == str(copy_dir.resolve())
    assert default_resolution(str(copy_dir)) == SDXL.default_resolution == 1024
    again_family, again = load_family(str(copy_dir))
    assert isinstance(again_family, SDXL) and type(again) is StableDiffusionXLPipeline
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)

    # a pipeline class lowrank does not train: refused in one line that names it and what is trained
    other = tmp_path / "other"
    shutil.copytree(preset_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(FamilyError) as err:
        family_of(str(other))
    message = str(err.value)
    assert isinstance(err.value, TrainingError) and "\n" not in message
    assert "StableDiffusion3Pipeline" in message and "StableDiffusionXLPipeline" in message
    # ... and the trainer says so as its one error line, exit 2, leaving no run folder behind
    out = tmp_path / "out"
    capsys.readouterr()
    code = dreambooth.main(["--output_dir", str(out), *FAST, "--pretrained_model_name_or_path", str(other)])
    line = one_error_line(capsys)
    assert code == 2 and "StableDiffusion3Pipeline" in line, line
    assert not out.exists()


# ----- 2. the conditioning is the pipeline's own ---------------------------------------------------------
def test_encode_is_the_pipelines_encode_prompt_and_time_ids(sdxl):
    family, pipe = sdxl
    prompts = [PROMPT, "a sks cat on the beach with a red ball"]
    size = 48
    cond = SDXL().encode(pipe, prompts, size)
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=torch.device("cpu"),
                                                             num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)
    assert neg is None and neg_pooled is None
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["text_embeds"], pooled)
    assert embeds.shape == (2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    assert pooled.shape == (2, pipe.text_encoder_2.config.projection_dim)
    assert not torch.equal(embeds[0], embeds[1])   # two prompts, two conditionings

    ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert ids.shape == (1, 6) and cond["time_ids"].dtype == ids.dtype
    assert torch.equal(cond["time_ids"], ids.expand(2, -1))

    # the family's denoiser is the UNet called as the pipeline calls it
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    with torch.no_grad():
        ours = family.denoise(pipe.unet, noisy, t, cond)
        theirs = pipe.unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(2, -1)},
                           return_dict=False)[0]
    assert torch.equal(ours, theirs)


# ----- 3. every method trains on SDXL --------------------------------------------------------------------
@pytest.mark.parametrize("method", list(lowrank.METHODS))
def test_every_method_trains_on_tiny_sdxl(method, sdxl, cond, trained):
    out = trained(method)
    assert json.loads((out / runfolder.EXIT_STATUS).read_text()) == {"code": 0, "message": "done"}
    assert {"adapter.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"} <= \
        {p.name for p in out.iterdir()}
    run = json.loads((out / "run.json").read_text())
    assert run["family"] == "sdxl" and run["pipeline_class"] == "StableDiffusionXLPipeline"
    assert os.path.isdir(run["pretrained_model_path"])
    assert run["pretrained_model_path"] == str(SDXL().preset_path())
    assert "stable-diffusion-xl" in run["family_tags"] and run["adapter_config"]["method"] == method
    assert "StableDiffusionXLPipeline" in (out / "README.md").read_text()   # the model card's how-to-load
    # every attention projection of every transformer layer, the second of each stack included
    assert run["adapted_layers"] == sum(1 for n, _ in sdxl[1].unet.named_modules()
                                        if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["distance_fig3"]) and r["distance_fig3"] >= 0
    assert rows[-1]["distance_fig3"] > 0 and math.isfinite(rows[-1]["distance_max"])

    # the saved adapter is the trained one: in a fresh UNet it has the last logged distance ...
    base = sdxl[1].unet
    unet = adapted_unet(base, out)
    assert lowrank.weight_distance(unet)[run["fig3_layer"]] == pytest.approx(rows[-1]["distance_fig3"],
                                                                              rel=1e-6, abs=1e-9)
    # ... and it changes the UNet's output by far more than float32 rounding could: a forward through L adapted
    # layers that merely re-associates sums differs from the base by at most about L ulps of the output
    before, after = unet_out(base, cond), unet_out(unet, cond)
    rounding = run["adapted_layers"] * U32 * before.abs().max().item()
    assert (after - before).abs().max().item() > 10 * rounding


# ----- 4. prior preservation and checkpoint samples -----------------------------------------------------
def test_prior_preservation_and_checkpoint_samples(tmp_path):
    out, classes = tmp_path / "out", tmp_path / "classes"
    assert train(out, "--method", "delora", "--with_prior_preservation", "--class_data_dir", str(classes),
                 "--num_class_images", "2", "--sample_batch_size", "2", "--checkpointing_steps", "2") == 0
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "class-00001.png"]
    assert all(Image.open(p).size == (SIZE, SIZE) for p in classes.iterdir())
    run = json.loads((out / "run.json").read_text())
    assert run["class_images"] == 2 and run["family"] == "sdxl"
    assert all(math.isfinite(r["loss"]) for r in metrics(out))

    for folder in (out / "checkpoint-2" / runfolder.SAMPLES, out / runfolder.SAMPLES):   # checkpoint, final
        lines = [json.loads(x) for x in (folder / runfolder.PROMPTS).read_text().splitlines()]
        assert [(x["prompt"], x["seed"]) for x in lines] == [(PROMPT, 0)]
        assert Image.open(folder / lines[0]["image"]).size == (SIZE, SIZE)
    assert Image.open(out / runfolder.SAMPLES_GRID).size == (SIZE, SIZE)
    assert {"adapter.safetensors", "optimizer.bin", "trainer_state.json"} <= \
        {p.name for p in (out / "checkpoint-2").iterdir()}


# ----- 5. resume is bit-identical ------------------------------------------------------------------------
def test_killed_after_a_checkpoint_then_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    check_resume_after_a_kill(train, tmp_path, monkeypatch)


# ----- 6. diffusers reads the export exactly -------------------------------------------------------------
# lora and delora (subtract init: rank 2r factors in the file) and dora, which is not low-rank exact and is
# written in diffusers' DoRA layout (lora_magnitude_vector), loaded by diffusers through peft's use_dora
@pytest.mark.parametrize("method", ["lora", "delora", "dora"])
def test_diffusers_load_lora_weights_of_a_run_gives_our_unet_output(method, sdxl, cond, trained):
    run_dir = trained(method)
    run = json.loads((run_dir / "run.json").read_text())
    layers = run["adapted_layers"]
    base = sdxl[1].unet

    # what a user does: the base model the run names, then the run folder (it holds our adapter files and
    # pytorch_lora_weights.safetensors; diffusers picks the latter)
    pipe = StableDiffusionXLPipeline.from_pretrained(run["pretrained_model_path"])
    pipe.load_lora_weights(str(run_dir))
    assert any("lora" in n for n, _ in pipe.unet.named_modules())

    # float32, as people run it: both sides compute the same function with sums in other orders; each of the
    # L adapted layers adds at most a few ulps of the activations it passes on, so |diff| <= L·u·max|out|
    ours, before = unet_out(adapted_unet(base, run_dir), cond), unet_out(base, cond)
    got = unet_out(pipe.unet, cond)
    scale = ours.abs().max().item()
    effect = (ours - before).abs().max().item()
    tol32 = layers * U32 * scale
    assert effect > 50 * tol32, f"{method}: the adapter does (almost) nothing ({effect:.2e}); proves nothing"
    assert (got - ours).abs().max().item() <= tol32, f"{method}: fp32 diff vs {tol32:.2e}"

    # float64, as tests/test_export.py checks exactness: the only error left is the float32 storage of the
    # file's factors (each value off by <= u relative, independently): a random walk over the L layers,
    # 2·sqrt(L)·u·max|out|; a lost layer or scale would be ~effect/L, far above it
    ours64 = unet_out(adapted_unet(base, run_dir, torch.float64), cond)
    got64 = unet_out(pipe.unet.to(torch.float64), cond)
    tol64 = 2 * math.sqrt(layers) * U32 * scale
    assert effect / layers > 10 * tol64
    assert (got64 - ours64).abs().max().item() <= tol64, f"{method}: fp64 diff vs {tol64:.2e}"
