"""An SDXL run everywhere a run goes: the merged-pipeline export against diffusers' own load_lora_weights, eval.subject
scoring its samples, eval.report keeping it apart from SD runs, and the app listing, comparing, generating and
exporting it. One DreamBooth run of the tiny-sdxl preset (DeLoRA: its exact LoRA factors carry λ, the norms and
the frozen W̄) serves the whole module."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from app import compare as C  # noqa: E402
from app import generate as G  # noqa: E402
from app import runs as R  # noqa: E402
from eval import report, subject  # noqa: E402
from eval.common import run_main  # noqa: E402
from ground.runfolder import read_jsonl  # noqa: E402
from training import dreambooth  # noqa: E402
from training.exporting import export_run  # noqa: E402

from .test_eval_support import one_thread, tiny_models  # noqa: E402,F401

RES = 32


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl") / "delora-sdxl"
    code = dreambooth.main(["--pretrained_model_name_or_path", "tiny-sdxl", "--method", "delora", "--rank", "2",
                            "--output_dir", str(out), "--seed", "0", "--max_train_steps", "2",
                            "--checkpointing_steps", "1", "--resolution", str(RES), "--num_validation_images", "1",
                            "--num_inference_steps", "2"])
    assert code == 0
    return out


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


def test_run_json_records_the_family_and_the_folder_loaded(sdxl_run):
    run = json.loads((sdxl_run / "run.json").read_text())
    assert (run["family"], run["pipeline_class"], run["task"]) == ("sdxl", "StableDiffusionXLPipeline", "dreambooth")
    assert (Path(run["pretrained_model_path"]) / "text_encoder_2").is_dir()
    card = (sdxl_run / "README.md").read_text()
    assert "stable-diffusion-xl" in card and "StableDiffusionXLPipeline.from_pretrained" in card


def test_merged_pipeline_export_equals_diffusers_load_lora_weights(sdxl_run, tmp_path):
    """training.export --format pipeline (W_eff merged into the UNet) and StableDiffusionXLPipeline.from_pretrained
    (the run's base folder) + load_lora_weights(RUN) (the exact LoRA factors, applied by peft at run time) are the
    same model: the two compute W0x + U(Vx) and (W0 + UV)x in float32, equal up to a few roundings of the
    output's magnitude per layer, far below 1e-5 of it."""
    from diffusers import StableDiffusionXLPipeline

    merged_dir = export_run(sdxl_run, tmp_path / "merged", "pipeline")
    merged = StableDiffusionXLPipeline.from_pretrained(merged_dir)
    base = json.loads((sdxl_run / "run.json").read_text())["pretrained_model_path"]
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


def test_eval_subject_scores_the_sdxl_samples(sdxl_run, tiny_models, one_thread):  # noqa: F811
    cli = ["--run_dir", str(sdxl_run), "--dino_model", str(tiny_models["dino"]), "--clip_model",
           str(tiny_models["clip"]), "--device", "cpu", "--max_prompts", "1", "--images_per_prompt", "1",
           "--checkpoints", "all"]
    assert run_main(subject.main, cli) == 0
    rows = read_jsonl(sdxl_run / "eval.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["dino"]) and np.isfinite(r["clip_i"]) for r in rows)


def test_the_report_keeps_families_apart(sdxl_run):
    sd = {"task": "dreambooth", "args": {"instance_prompt": "a photo of sks cat"}}
    old = {"task": "semantic-map", "args": {}}   # what run.json said before the registry
    xl = json.loads((sdxl_run / "run.json").read_text())
    assert (report.task_of(sd), report.task_of(xl), report.task_of(old)) == \
        ("dreambooth", "dreambooth-sdxl", "semantic-map")


def test_the_app_lists_compares_generates_and_exports_the_sdxl_run(sdxl_run):
    listed = {r.name: r for r in R.list_runs(sdxl_run.parent)}
    run = listed[sdxl_run.name]
    assert run.model == "tiny-sdxl" and run.method == "delora"
    assert C.sample_grid([run]) is not None and len(C.metrics_table([run])) == 1
    images = G.Generator(device="cpu").generate(sdxl_run, "final", "a photo of sks cat", steps=2, resolution=RES)
    assert len(images) == 1 and images[0].size == (RES, RES)
    written = G.export(sdxl_run, "final", "diffusers")
    assert Path(written).is_file()
    peft_dir = sdxl_run / "exports" / "final-peft"
    G.export(sdxl_run, "final", "peft")   # its config names the base: the preset's folder, as run.json records it
    base = json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == json.loads((sdxl_run / "run.json").read_text())["pretrained_model_path"]
