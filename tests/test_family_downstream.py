"""A run of every non-SD family everywhere a run goes: eval.subject scoring its samples (every checkpoint), eval.report
keeping the families apart, and the app listing, comparing, generating and exporting it; for SDXL also the
merged-pipeline export against diffusers' own load_lora_weights (the FLUX families' are in test_flux.py and
test_flux2_klein.py). One DreamBooth run per preset (DeLoRA: its exact LoRA factors carry λ, the norms and the frozen
W̄; 2 steps at 32 px, rank 2) serves the whole module.

Images made after training (eval.subject's, the app's) of the FLUX families must be the trainer's own samples of
the same prompt and seed pixel for pixel: the same flow-matching scheduler, the same conditioning (the run's T5
length), the prompt reaching the pipeline that way it does in training."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from app import compare as C  # noqa: E402
from app import generate as G  # noqa: E402
from app import runs as R  # noqa: E402
from eval import report, subject  # noqa: E402
from eval.common import run_main  # noqa: E402
from ground.runfolder import read_jsonl  # noqa: E402
from training import dreambooth  # noqa: E402
from training.exporting import export_run  # noqa: E402
from training.families import family_of  # noqa: E402

from .family_runs import one_thread  # noqa: E402,F401
from .test_eval_support import tiny_models  # noqa: E402,F401

RES = 32
PROMPT = "a photo of sks cat"   # the embedded example subject's: the trainer's samples use it, seed 0
PRESETS = ("tiny-sdxl", "tiny-flux", "tiny-flux2-klein")
FLUX_PRESETS = PRESETS[1:]
# FLUX.1 with a T5 length of its own: images made later must encode prompts as the run did
EXTRA = {"tiny-flux": ["--max_sequence_length", "16"]}

pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one $LOWRANK_CACHE for the session


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """preset -> its run folder, trained on first use and kept for the module (each test asks for the runs it
    needs; the parametrised ones share them)."""
    made: dict[str, Path] = {}

    def run(preset: str) -> Path:
        if preset not in made:
            out = tmp_path_factory.mktemp(preset) / f"delora-{preset}"
            code = dreambooth.main(["--pretrained_model_name_or_path", preset, "--method", "delora", "--rank", "2",
                                    "--output_dir", str(out), "--seed", "0", "--max_train_steps", "2",
                                    "--checkpointing_steps", "1", "--resolution", str(RES),
                                    "--num_validation_images", "1", "--num_inference_steps", "2",
                                    "--report_to", "none", *EXTRA.get(preset, [])])
            assert code == 0
            made[preset] = out
        return made[preset]
    return run


@pytest.fixture(scope="module", params=PRESETS)
def family_run(request, trained):
    return trained(request.param)


@pytest.fixture(scope="module", params=FLUX_PRESETS)
def flux_run(request, trained):
    return trained(request.param)


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def final_sample(run_dir: Path) -> np.ndarray:
    """The trainer's sample of PROMPT, seed 0, from the final adapter (RUN/samples/)."""
    rows = read_jsonl(run_dir / "samples" / "prompts.jsonl")
    row = next(r for r in rows if r["prompt"] == PROMPT and r["seed"] == 0)
    return pixels(Image.open(run_dir / "samples" / row["image"]))


def test_run_json_records_the_family_and_the_folder_loaded(family_run):
    run = run_json(family_run)
    family = family_of(run["args"]["pretrained_model_name_or_path"])
    assert (run["family"], run["pipeline_class"], run["task"]) == \
        (family.name, family.pipeline_classes[0], "dreambooth")
    assert Path(run["pretrained_model_path"]) == family.preset_path()
    card = (family_run / "README.md").read_text()
    assert all(tag in card for tag in family.tags) and f"{family.pipeline_classes[0]}.from_pretrained" in card


def unet_inputs(unet, generator_seed: int = 0) -> tuple:
    """Fixed noisy latents, timestep and SDXL conditioning of the UNet's own widths."""
    g = torch.Generator().manual_seed(generator_seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, RES // 2, RES // 2, generator=g)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    pooled_width = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_width, generator=g),
             "time_ids": torch.tensor([[RES, RES, 0, 0, RES, RES]], dtype=torch.float32)}
    return x, torch.tensor([500]), text, added


def test_sdxl_merged_pipeline_export_equals_diffusers_load_lora_weights(trained, tmp_path):
    """training.export --format pipeline (W_eff merged into the UNet) and StableDiffusionXLPipeline.from_pretrained
    (the run's base folder) + load_lora_weights(RUN) (the exact LoRA factors, applied by peft at run time) are the
    same model: the two compute W0x + U(Vx) and (W0 + UV)x in float32, equal up to a few roundings of the
    output's magnitude per layer, far below 1e-5 of it."""
    from diffusers import StableDiffusionXLPipeline

    sdxl_run = trained("tiny-sdxl")
    merged_dir = export_run(sdxl_run, tmp_path / "merged", "pipeline")
    merged = StableDiffusionXLPipeline.from_pretrained(merged_dir)
    base = run_json(sdxl_run)["pretrained_model_path"]
    loaded = StableDiffusionXLPipeline.from_pretrained(base)
    loaded.load_lora_weights(sdxl_run)
    plain = StableDiffusionXLPipeline.from_pretrained(base)
    x, t, text, added = unet_inputs(merged.unet)
    with torch.no_grad():
        want = merged.unet(x, t, text, added_cond_kwargs=added).sample
        got = loaded.unet(x, t, text, added_cond_kwargs=added).sample
        before = plain.unet(x, t, text, added_cond_kwargs=added).sample
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale
    assert (want - before).abs().max() > 1e3 * 1e-5 * scale   # the adapter moved the model: the check can fail


def test_eval_subject_scores_every_checkpoint(family_run, tiny_models):  # noqa: F811
    cli = ["--run_dir", str(family_run), "--dino_model", str(tiny_models["dino"]), "--clip_model",
           str(tiny_models["clip"]), "--device", "cpu", "--max_prompts", "1", "--images_per_prompt", "1",
           "--checkpoints", "all"]
    assert run_main(subject.main, cli) == 0
    rows = read_jsonl(family_run / "eval.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["dino"]) and np.isfinite(r["clip_i"]) for r in rows)
    # each family samples with its own scheduler (SD's DPM-Solver++ is for the DDPM families), as the trainer did
    family = family_of(run_json(family_run)["args"]["pretrained_model_name_or_path"])
    done = json.loads((family_run / "eval" / "step-2" / "generation.json").read_text())
    want = "DPMSolverMultistepScheduler" if family.name == "sdxl" else "FlowMatchEulerDiscreteScheduler"
    assert done["scheduler"] == want


def test_eval_subject_images_are_the_trainers_samples(flux_run, tiny_models, tmp_path):  # noqa: F811
    """The final adapter's image of the sample prompt, seed 0, made by eval.subject, is the trainer's final sample:
    the family's scheduler, the run's T5 length (tiny-flux trained with 16 tokens) and the run's guidance."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    cli = ["--run_dir", str(flux_run), "--dino_model", str(tiny_models["dino"]), "--clip_model",
           str(tiny_models["clip"]), "--device", "cpu", "--prompts_file", str(prompts), "--images_per_prompt", "1",
           "--checkpoints", "2", "--regenerate"]
    assert run_main(subject.main, cli) == 0
    made = pixels(Image.open(flux_run / "eval" / "step-2" / "p00-s0.png"))
    assert np.abs(made - final_sample(flux_run)).max() <= 1   # PNG rounding of the same float image


def test_the_report_keeps_families_apart(trained, tmp_path):
    """report.task_of names the family of every non-SD run (from run.json's family), and eval.report puts each
    family's runs in a section of their own, each with its followed layer's distance."""
    sd = {"task": "dreambooth", "args": {"instance_prompt": "a photo of sks cat"}}
    old = {"task": "semantic-map", "args": {}}   # what run.json said before the registry
    assert (report.task_of(sd), report.task_of(old)) == ("dreambooth", "semantic-map")
    folders = [trained(p) for p in PRESETS]
    want = {f"dreambooth-{family_of(p).name}" for p in PRESETS}
    assert {report.task_of(run_json(f)) for f in folders} == want \
        == {"dreambooth-sdxl", "dreambooth-flux", "dreambooth-flux2-klein"}
    assert run_main(report.main, [*map(str, folders), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == want
    assert all(float(r["distance"]) > 0 for r in rows)
    text = (tmp_path / "report" / "report.md").read_text()
    assert all(f"## Task: {task}\n" in text for task in want), text


def test_the_app_lists_compares_generates_and_exports_the_run(family_run):
    listed = {r.name: r for r in R.list_runs(family_run.parent)}
    run = listed[family_run.name]
    preset = run_json(family_run)["args"]["pretrained_model_name_or_path"]
    assert run.model == preset and run.method == "delora"
    assert C.sample_grid([run]) is not None and len(C.metrics_table([run])) == 1
    gen = G.Generator(device="cpu")
    images = gen.generate(family_run, "final", PROMPT, steps=2, resolution=RES)
    base = gen.generate(family_run, G.BASE, PROMPT, steps=2, resolution=RES)
    assert len(images) == 1 and images[0].size == (RES, RES)
    assert np.abs(pixels(images[0]) - pixels(base[0])).max() > 0   # the adapter went into the denoiser
    written = G.export(family_run, "final", "diffusers")
    assert Path(written).is_file()
    peft_dir = family_run / "exports" / "final-peft"
    G.export(family_run, "final", "peft")   # its config names the base: the preset's folder, as run.json records it
    base_name = json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name == run_json(family_run)["pretrained_model_path"]


def test_the_apps_flux_images_are_the_trainers_samples(flux_run):
    """The Generate tab on the final adapter, with the trainer's sample settings (seed 0, its steps and guidance),
    gives the trainer's final sample: FLUX pipelines sample with their own scheduler in both, and the app passes
    the prompt by name (Flux2KleinPipeline's first parameter is an image) and the run's T5 length."""
    args = run_json(flux_run)["args"]
    images = G.Generator(device="cpu").generate(flux_run, "final", PROMPT, seed=0, steps=args["num_inference_steps"],
                                                guidance=args["guidance_scale"], resolution=RES)
    assert np.abs(pixels(images[0]) - final_sample(flux_run)).max() <= 1
