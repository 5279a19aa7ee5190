"""FLUX.1 through the model families (training/families/flux.py): the `tiny-flux` preset (double- and
single-stream blocks, RoPE, T5 + CLIP, FLUX's VAE shift/scale) loaded by diffusers' own FluxPipeline, its
conditioning against FluxPipeline.encode_prompt, the token packing and the transformer call, the flow-matching step
(σ, noisy latents, target and every weighting scheme) recomputed by hand from the same generator draws, samples
with FLUX's own scheduler, and DreamBooth on it: lora, dora, delora and etherplus, prior preservation with checkpoint
samples, bit-identical resume.

Every run is in-process (dreambooth.main), 32 px (16x16 latents, 64 image tokens), 2-4 steps.
"""
import argparse
import copy
import json
import math
import os
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3
from PIL import Image
from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

os.environ["HF_HUB_OFFLINE"] = "1"

import lowrank  # noqa: E402
from ground import runfolder  # noqa: E402
from lowrank.inject import matches  # noqa: E402
from tests.family_runs import check_resume_after_a_kill, one_thread  # noqa: E402,F401
from tests.test_dreambooth import metrics  # noqa: E402
from training import dreambooth  # noqa: E402
from training.common import TrainingError  # noqa: E402
from training.families import FAMILIES, FLUX, default_resolution, family_of, load_family  # noqa: E402
from training.families.flux import t5_tokenizer  # noqa: E402
from training.images.diffusion import FlowMatchObjective  # noqa: E402
from training.images.samples import generate  # noqa: E402

PRESET = "tiny-flux"
SIZE = 32                      # pixels; the tiny VAE halves it: 16x16 latents, 8x8 = 64 packed tokens
PROMPT = "a photo of sks cat"  # the embedded example subject's prompt
FIG3 = "transformer_blocks.0.attn.to_out.0"
FAST = ["--pretrained_model_name_or_path", PRESET, "--seed", "0", "--resolution", str(SIZE), "--rank", "4",
        "--max_train_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none"]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one $LOWRANK_CACHE for the session


def train(out, *extra):
    return dreambooth.main(["--output_dir", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def flux(tiny_cache):
    """(family, pipeline) of the preset, built once into the session cache."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    family, pipe = load_family(PRESET)
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


@pytest.fixture(scope="module")
def cond(flux):
    family, pipe = flux
    return family.encode(pipe, [PROMPT], SIZE)


@torch.no_grad()
def transformer_out(model, cond, seed=0):
    """The transformer's packed prediction on fixed noisy latents at a fixed timestep, called as FluxPipeline calls
    it (packed tokens, image ids of the patch grid, zero text ids, timestep / 1000)."""
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=g)
    ids = FluxPipeline._prepare_latent_image_ids(1, SIZE // 4, SIZE // 4, CPU, torch.float32)
    emb = cond["encoder_hidden_states"]
    return model(hidden_states=FluxPipeline._pack_latents(noisy, 1, 4, SIZE // 2, SIZE // 2),
                 timestep=torch.tensor([0.5]), guidance=None, pooled_projections=cond["pooled_projections"],
                 encoder_hidden_states=emb, txt_ids=torch.zeros(emb.shape[1], 3), img_ids=ids,
                 return_dict=False)[0]


# ----- 1. the preset --------------------------------------------------------------------------------------
def test_preset_is_flux1_in_miniature(flux, tmp_path):
    family, pipe = flux
    assert isinstance(family, FLUX) and family.name == "flux" and family in FAMILIES
    assert type(pipe) is FluxPipeline and family.denoiser(pipe) is pipe.transformer
    assert family.denoiser_name == "transformer" and not family.vae_in_fp32
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is T5EncoderModel
    assert isinstance(pipe.tokenizer_2, T5TokenizerFast)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    tr = pipe.transformer
    cfg = tr.config
    assert isinstance(tr, FluxTransformer2DModel)
    assert len(tr.transformer_blocks) >= 2 and len(tr.single_transformer_blocks) >= 2   # double + single stream
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim and len(cfg.axes_dims_rope) == 3   # RoPE
    assert list(tr.pos_embed.axes_dim) == list(cfg.axes_dims_rope)
    assert cfg.guidance_embeds is False
    # FLUX's consistency rules (reference/model-families.md §3)
    vae = pipe.vae.config
    assert cfg.in_channels == 4 * vae.latent_channels and pipe.vae_scale_factor == 2
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (vae.shift_factor, vae.scaling_factor) == (0.1159, 0.3611)   # FLUX.1's VAE latent handling
    assert pipe.scheduler.config.use_dynamic_shifting
    # the default targets hit the double blocks' image + text attention and feed-forwards, the single blocks' q/k/v
    names = [n for n, _ in tr.named_modules() if matches(n, list(family.default_targets))]
    assert FIG3 in names and any(n.startswith("single_transformer_blocks.") for n in names)
    assert {n.split(".", 2)[2] for n in names if n.startswith("transformer_blocks.0.")} == set(family.default_targets)
    assert {n.split(".", 2)[2] for n in names if n.startswith("single_transformer_blocks.")} == \
        {"attn.to_q", "attn.to_k", "attn.to_v"}

    # the offline T5 tokenizer: T5's special ids, '</s>' appended, whole prompt words; the saved file reads back
    tok = pipe.tokenizer_2
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == FLUX.max_sequence_length == 512
    assert tok.tokenize(PROMPT) == ["▁a", "▁photo", "▁of", "▁sks", "▁cat"]
    fresh = t5_tokenizer()
    for text in (PROMPT, "a sks cat on the beach with a red ball", "Zebra! 42 ünïcode"):
        ids = tok(text).input_ids
        assert ids == fresh(text).input_ids and ids[-1] == 1 and max(ids) < pipe.text_encoder_2.config.vocab_size

    preset_dir = family.preset_path()
    assert (preset_dir / "model_index.json").is_file() and "random weights" in (preset_dir / "README.md").read_text()
    assert isinstance(family_of(PRESET), FLUX) and isinstance(family_of(str(preset_dir)), FLUX)
    assert family.local_folder(PRESET) == str(preset_dir) and default_resolution(PRESET) == 64

    # built from fixed seeds: a second build is the same model
    family.build_preset(tmp_path / "again")
    again = FluxPipeline.from_pretrained(tmp_path / "again")
    for a, b in ((again.transformer, tr), (again.vae, pipe.vae), (again.text_encoder_2, pipe.text_encoder_2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    # the same model saved by diffusers' own save_pretrained elsewhere: a FLUX.1 folder like any other
    copy_dir = tmp_path / "my-flux"
    shutil.copytree(tmp_path / "again", copy_dir)
    assert isinstance(family_of(str(copy_dir)), FLUX) and default_resolution(str(copy_dir)) == 512


# ----- 2. the conditioning is the pipeline's own ------------------------------------------------------------
def test_encode_is_the_pipelines_encode_prompt(flux):
    family, pipe = flux
    prompts = [PROMPT, "a sks cat on the beach with a red ball"]
    cond = family.encode(pipe, prompts, SIZE)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=CPU,
                                                      max_sequence_length=512)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["pooled_projections"], pooled)
    assert embeds.shape == (2, 512, pipe.text_encoder_2.config.d_model)
    assert pooled.shape == (2, pipe.text_encoder.config.hidden_size)
    assert torch.equal(text_ids, torch.zeros(512, 3))   # what denoise rebuilds
    assert not torch.equal(embeds[0], embeds[1]) and not torch.equal(pooled[0], pooled[1])

    # --max_sequence_length: the run's length (Family.for_run), at most the T5 tokenizer's limit; samples get it too
    run16 = family.for_run(argparse.Namespace(max_sequence_length=16))
    short = run16.encode(pipe, prompts, SIZE)
    with torch.no_grad():
        embeds16, _, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=CPU, max_sequence_length=16)
    assert short["encoder_hidden_states"].shape[1] == 16 and torch.equal(short["encoder_hidden_states"], embeds16)
    assert run16.call_kwargs(pipe) == {"max_sequence_length": 16} and family.max_sequence_length == 512
    unset = family.for_run(argparse.Namespace(max_sequence_length=None))
    assert unset.call_kwargs(pipe) == {"max_sequence_length": 512}
    for bad in (0, 4096):   # FluxPipeline refuses more than 512: refused before anything is loaded or written
        with pytest.raises(TrainingError, match=f"--max_sequence_length {bad}: give 1 to 512"):
            family.for_run(argparse.Namespace(max_sequence_length=bad))
    limited = copy.copy(pipe.tokenizer_2)
    limited.model_max_length = 77
    assert family.sequence_length(type("P", (), {"tokenizer_2": limited})()) == 77


# ----- 3. packing and the transformer call -----------------------------------------------------------------
def test_pack_unpack_is_exact_and_denoise_is_the_transformer_on_tokens(flux, cond):
    family, pipe = flux
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 6, generator=g)
    tokens = family.pack(x)
    assert tokens.shape == (2, 4 * 3, 16)
    # token (i, j), channel 4c + 2di + dj is latent (c, 2i + di, 2j + dj): FLUX's 2x2 patches
    assert tokens[1, 1 * 3 + 2, 4 * 3 + 2 * 1 + 0] == x[1, 3, 2 + 1, 4 + 0]
    assert torch.equal(family.unpack(tokens, 8, 6), x)
    assert torch.equal(family.unpack(tokens, 8, 6), FluxPipeline._unpack_latents(tokens, 8 * 2, 6 * 2, 2))

    tr = pipe.transformer
    noisy = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g)
    t = torch.tensor([1000.0, 250.0])
    c = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    ids = FluxPipeline._prepare_latent_image_ids(2, SIZE // 4, SIZE // 4, CPU, torch.float32)
    assert ids.shape == (64, 3) and torch.equal(ids[9], torch.tensor([0.0, 1.0, 1.0]))   # (0, row, col)
    with torch.no_grad():
        ours = family.denoise(tr, noisy, t, c)
        packed = tr(hidden_states=FluxPipeline._pack_latents(noisy, 2, 4, SIZE // 2, SIZE // 2), timestep=t / 1000,
                    guidance=None, pooled_projections=c["pooled_projections"],
                    encoder_hidden_states=c["encoder_hidden_states"], txt_ids=torch.zeros(512, 3), img_ids=ids,
                    return_dict=False)[0]
    assert ours.shape == noisy.shape
    assert torch.equal(ours, FluxPipeline._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor))

    # a guidance-distilled transformer (FLUX.1-dev) gets the guidance value; the preset's (schnell-like) none
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dev = FluxTransformer2DModel.from_config({**tr.config, "guidance_embeds": True}).eval()
    with torch.no_grad():
        got = family.denoise(dev, noisy, t, c)
        want = dev(hidden_states=FluxPipeline._pack_latents(noisy, 2, 4, SIZE // 2, SIZE // 2), timestep=t / 1000,
                   guidance=torch.full((2,), FLUX.guidance_scale), pooled_projections=c["pooled_projections"],
                   encoder_hidden_states=c["encoder_hidden_states"], txt_ids=torch.zeros(512, 3), img_ids=ids,
                   return_dict=False)[0]
        other = dev(hidden_states=FluxPipeline._pack_latents(noisy, 2, 4, SIZE // 2, SIZE // 2), timestep=t / 1000,
                    guidance=torch.full((2,), 1.0), pooled_projections=c["pooled_projections"],
                    encoder_hidden_states=c["encoder_hidden_states"], txt_ids=torch.zeros(512, 3), img_ids=ids,
                    return_dict=False)[0]
    assert torch.equal(got, FluxPipeline._unpack_latents(want, SIZE, SIZE, 2)) and not torch.equal(want, other)


# ----- 4. the flow-matching step by hand -------------------------------------------------------------------
class Args:
    def __init__(self, scheme="none", mean=0.0, std=1.0, mode_scale=1.29):
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = scheme, mean, std, mode_scale


def by_hand(pipe, pixels, seed, scheme="none", mean=0.0, std=1.0, mode_scale=1.29):
    """(latents, noise, timesteps, σ, noisy) from the same draws as FlowMatchObjective: VAE sample, noise, u."""
    g = torch.Generator().manual_seed(seed)
    vae = pipe.vae
    with torch.no_grad():
        x = (vae.encode(pixels).latent_dist.sample(generator=g) - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn(x.shape, generator=g)
    b = x.shape[0]
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(mean, std, size=(b,), generator=g))
    elif scheme == "mode":
        u = torch.rand(b, generator=g)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(b, generator=g)
    index = (u * 1000).long()
    # FLUX's scheduler shifts at inference only (dynamic shifting): the training grid is linear, σ_i = 1 − i/1000
    sigma = 1 - index.double() / 1000
    timesteps = sigma * 1000
    s = sigma.float().view(-1, 1, 1, 1)
    return x, noise, timesteps, sigma, (1 - s) * x + s * noise


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_flow_matching_sigma_noisy_and_target_follow_the_formulas(flux, cond, scheme):
    family, pipe = flux
    args = Args(scheme, mean=0.3, std=0.8)
    objective = family.objective(pipe, torch.float32, CPU, args)
    assert isinstance(objective, FlowMatchObjective) and objective.weighting == (scheme, 0.3, 0.8, 1.29)
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents, noise, timesteps, sigmas, noisy = objective.noisy_latents(pixels, torch.Generator().manual_seed(7))
    x, n, t, sigma, want = by_hand(pipe, pixels, 7, scheme, 0.3, 0.8)
    assert torch.equal(latents, x) and torch.equal(noise, n)
    assert torch.allclose(sigmas.double(), sigma, atol=1e-6) and torch.allclose(timesteps.double(), t, atol=1e-3)
    assert torch.allclose(noisy, want, atol=1e-6)
    assert latents.shape == (4, 4, 8, 8)

    # the loss is the MSE of the family's prediction against noise − x
    c = {k: v.expand(4, *v.shape[1:]) for k, v in cond.items()}
    seen = {}

    def denoise(z, ts):
        seen["pred"] = family.denoise(pipe.transformer, z, ts, c)
        return seen["pred"]

    with torch.no_grad():
        loss = objective.loss(pixels, denoise, torch.Generator().manual_seed(7))
    assert torch.allclose(loss, ((seen["pred"] - (n - x)) ** 2).mean(), rtol=1e-6)


def test_weighting_schemes_weight_the_loss_as_sd3(flux, cond):
    """sigma_sqrt and cosmap draw σ as `none` does (uniform) and weight each sample's MSE by σ⁻² and
    2/(π(1 − 2σ + 2σ²)); the prior-preservation split weights the class half."""
    family, pipe = flux
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    c = {k: v.expand(4, *v.shape[1:]) for k, v in cond.items()}
    x, n, _, sigma, noisy = by_hand(pipe, pixels, 11)
    with torch.no_grad():
        pred = family.denoise(pipe.transformer, noisy, sigma.float() * 1000, c)
    per_sample = ((pred - (n - x)) ** 2).mean(dim=(1, 2, 3))
    losses = {}
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        objective = family.objective(pipe, torch.float32, CPU, Args(scheme))
        with torch.no_grad():
            losses[scheme] = objective.loss(pixels, lambda z, ts: family.denoise(pipe.transformer, z, ts, c),
                                            torch.Generator().manual_seed(11))
        weight = compute_loss_weighting_for_sd3(scheme, sigma.float())
        assert torch.allclose(losses[scheme], (weight * per_sample).mean(), rtol=1e-5), scheme
    s = sigma.float()
    assert torch.allclose(losses["sigma_sqrt"], (per_sample / s ** 2).mean(), rtol=1e-5)
    assert torch.allclose(losses["cosmap"], (per_sample * 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))).mean(), rtol=1e-5)
    assert len({round(v.item(), 6) for v in losses.values()}) == 3

    objective = family.objective(pipe, torch.float32, CPU, Args("sigma_sqrt"))
    with torch.no_grad():
        prior = objective.loss(pixels, lambda z, ts: family.denoise(pipe.transformer, z, ts, c),
                               torch.Generator().manual_seed(11), prior_loss_weight=0.5)
    w = per_sample / s ** 2
    assert torch.allclose(prior, w[:2].mean() + 0.5 * w[2:].mean(), rtol=1e-5)

    # args without the flow-matching flags: diffusers' defaults
    assert family.objective(pipe, torch.float32, CPU, object()).weighting == ("none", 0.0, 1.0, 1.29)


# ----- 5. samples with FLUX's own scheduler ----------------------------------------------------------------
def test_sampling_pipeline_keeps_the_flow_matching_scheduler(flux):
    family, pipe = flux
    sampler = family.sampling_pipeline(pipe)
    assert type(sampler) is FluxPipeline and type(sampler.scheduler) is FlowMatchEulerDiscreteScheduler
    assert sampler.transformer is pipe.transformer and sampler._progress_bar_config == {"disable": True}
    shots = generate(sampler, [PROMPT], 2, SIZE, 2, 3.5)
    assert [(p, s) for p, s, _ in shots] == [(PROMPT, 0), (PROMPT, 1)]
    assert all(img.size == (SIZE, SIZE) for _, _, img in shots)
    again = generate(sampler, [PROMPT], 2, SIZE, 2, 3.5)
    assert all(a[2].tobytes() == b[2].tobytes() for a, b in zip(shots, again))   # fixed seeds
    direct = pipe(prompt=[PROMPT], generator=[torch.Generator().manual_seed(1)], height=SIZE, width=SIZE,
                  num_inference_steps=2, guidance_scale=3.5).images[0]
    assert direct.tobytes() == shots[1][2].tobytes()


# ----- 6. DreamBooth on tiny-flux ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "delora", "etherplus"])
def test_dreambooth_trains_every_method_on_tiny_flux(method, flux, cond, tmp_path):
    out = tmp_path / method
    assert train(out, "--method", method, "--skip_final_samples") == 0
    assert json.loads((out / runfolder.EXIT_STATUS).read_text()) == {"code": 0, "message": "done"}
    run = json.loads((out / "run.json").read_text())
    assert run["family"] == "flux" and run["pipeline_class"] == "FluxPipeline" and run["denoiser"] == "transformer"
    assert run["pretrained_model_path"] == str(FLUX().preset_path()) and "flux" in run["family_tags"]
    assert run["adapter_config"]["method"] == method and run["fig3_layer"] == FIG3
    tr = flux[1].transformer
    assert run["adapted_layers"] == sum(1 for n, _ in tr.named_modules()
                                        if matches(n, list(FLUX.default_targets))) == 30

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["distance_fig3"]) for r in rows)
    assert rows[-1]["distance_fig3"] > 0 and rows[-1][f"distance/{FIG3}"] == rows[-1]["distance_fig3"]

    # the saved adapter is the trained one: in a fresh transformer it has the logged distance and changes the output
    model = copy.deepcopy(tr)
    lowrank.load_adapter(model, out)
    assert lowrank.weight_distance(model)[FIG3] == pytest.approx(rows[-1]["distance_fig3"], rel=1e-6, abs=1e-9)
    before, after = transformer_out(tr, cond), transformer_out(model, cond)
    assert (after - before).abs().max().item() > 1e-4 * before.abs().max().item()


def test_prior_preservation_and_checkpoint_samples(tmp_path):
    out, classes = tmp_path / "out", tmp_path / "classes"
    assert train(out, "--method", "delora", "--with_prior_preservation", "--class_data_dir", str(classes),
                 "--num_class_images", "2", "--sample_batch_size", "2", "--checkpointing_steps", "2",
                 "--weighting_scheme", "logit_normal") == 0
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "class-00001.png"]
    assert all(Image.open(p).size == (SIZE, SIZE) for p in classes.iterdir())
    run = json.loads((out / "run.json").read_text())
    assert run["class_images"] == 2 and run["family"] == "flux"
    rows = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["distance_fig3"] > 0

    for folder in (out / "checkpoint-2" / runfolder.SAMPLES, out / runfolder.SAMPLES):   # checkpoint, final
        lines = [json.loads(x) for x in (folder / runfolder.PROMPTS).read_text().splitlines()]
        assert [(x["prompt"], x["seed"]) for x in lines] == [(PROMPT, 0)]
        assert Image.open(folder / lines[0]["image"]).size == (SIZE, SIZE)
    assert Image.open(out / runfolder.SAMPLES_GRID).size == (SIZE, SIZE)
    assert {"adapter.safetensors", "optimizer.bin", "trainer_state.json"} <= \
        {p.name for p in (out / "checkpoint-2").iterdir()}


def test_sequence_length_offload_and_checkpointing_train_the_same_adapter(tmp_path, monkeypatch):
    """--max_sequence_length reaches every prompt encoding (training and samples); --offload (text encoders off the
    accelerator between samples) and --gradient_checkpointing (the transformer recomputes activations in
    backward) save memory only: the same seed gives the same adapter bits without them."""
    lengths, offloaded = [], []
    encode_prompt = FluxPipeline.encode_prompt
    monkeypatch.setattr(FluxPipeline, "encode_prompt",
                        lambda self, *a, **k: lengths.append(k["max_sequence_length"]) or encode_prompt(self, *a, **k))
    moved_to = dreambooth.moved_to
    monkeypatch.setattr(dreambooth, "moved_to", lambda modules, device: offloaded.append(
        sorted(type(m).__name__ for m in modules)) or moved_to(modules, device))
    lean = tmp_path / "lean"
    assert train(lean, "--method", "delora", "--max_sequence_length", "16", "--offload", "--gradient_checkpointing",
                 "--checkpointing_steps", "2") == 0
    assert set(lengths) == {16} and len(lengths) >= 3   # the instance prompt, checkpoint and final samples
    assert offloaded == [["CLIPTextModel", "T5EncoderModel"]] * 2   # checkpoint-2's samples and the final ones
    assert json.loads((lean / "run.json").read_text())["args"]["offload"] is True
    plain = tmp_path / "plain"
    assert train(plain, "--method", "delora", "--max_sequence_length", "16", "--skip_final_samples") == 0
    ours, theirs = lowrank.read_adapter(lean)[1], lowrank.read_adapter(plain)[1]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_killed_after_a_checkpoint_then_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    check_resume_after_a_kill(train, tmp_path, monkeypatch)
