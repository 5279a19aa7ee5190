"""eval.subject --run_dir end to end: the tiny SD preset with two saved lowrank checkpoints, images
generated per checkpoint (fixed seeds), scored into RUN/eval.jsonl, and reused on a rescore."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import lowrank
from eval import subject
from eval.common import run_main
from eval.embed import ClipEmbedder, DinoEmbedder
from eval.images import load_generated
from ground.runfolder import read_jsonl
from training.families import load_pipeline

from .test_eval_support import one_thread, tiny_models  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the trainer leaves it (run.json, metrics.jsonl, checkpoint-N adapters), with
    two different LoRA adapters on the tiny preset."""
    run = tmp_path_factory.mktemp("eval-run") / "run"
    pipe = load_pipeline("tiny")
    torch.manual_seed(0)
    lowrank.inject(pipe.unet, lowrank.AdapterConfig(method="lora", rank=2, target_modules=["to_q", "to_v"]))
    for step in (1, 2):
        with torch.no_grad():   # LoRA starts as the identity; random factors make the checkpoints differ
            for p in pipe.unet.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
        lowrank.save_adapter(pipe.unet, run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (run / "run.json").write_text(json.dumps({
        "args": {"pretrained_model_name_or_path": None, "instance_data_dir": None, "resolution": 32,
                 "instance_prompt": "a photo of sks cat", "class_prompt": "a photo of cat",
                 "num_inference_steps": 1, "guidance_scale": 7.5, "method": "lora", "learning_rate": None},
        "learning_rate": 6e-4, "adapter_config": {"method": "lora", "rank": 2}, "max_train_steps": 2}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    return run


def cli(tiny_models, run, *extra):  # noqa: F811
    return ["--run_dir", str(run), "--dino_model", str(tiny_models["dino"]), "--clip_model", str(tiny_models["clip"]),
            "--device", "cpu", "--max_prompts", "2", "--images_per_prompt", "2", "--gen_batch_size", "3", *extra]


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_run_dir_generates_scores_and_rescores(tiny_models, run_dir, monkeypatch):  # noqa: F811
    assert run_main(subject.main, cli(tiny_models, run_dir)) == 0
    rows = read_jsonl(run_dir / "eval.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["n_generated"] == 4 and r["n_real"] == 5 for r in rows)   # 2 prompts x 2 seeds; 5 example crops
    step1, step2 = run_dir / "eval" / "step-1", run_dir / "eval" / "step-2"
    listed = [json.loads(line) for line in (step1 / "prompts.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in listed] == [(p, s) for p in ("a sks cat in the jungle",
                                                                           "a sks cat in the snow") for s in (0, 1)]
    with Image.open(step1 / listed[0]["image"]) as im:
        assert im.size == (32, 32)
    # the adapter is what differs between checkpoints (same prompts, same seeds)
    assert np.abs(pixels(step1 / "p00-s0.png") - pixels(step2 / "p00-s0.png")).max() > 0
    # and the seed is what differs within one
    assert np.abs(pixels(step1 / "p00-s0.png") - pixels(step1 / "p00-s1.png")).max() > 0

    # the row is the scoring of exactly those images against the run's real images
    from training.subject.data import example_subject

    real = [(f"r{i}", img) for i, img in enumerate(example_subject(32))]
    dino, clip = DinoEmbedder(str(tiny_models["dino"])), ClipEmbedder(str(tiny_models["clip"]))
    direct = subject.score_images(real, load_generated(step2).items, dino, clip)
    for key in ("dino", "clip_i", "clip_t"):
        assert rows[1][key] == pytest.approx(direct[key], abs=1e-9)
    assert json.loads((step2 / "scores.json").read_text())["prompts"][0]["n_generated"] == 2

    # a rescore with unchanged adapters and settings reuses the images: no pipeline is loaded
    import eval.generate

    stamp = (step1 / "p00-s0.png").stat().st_mtime_ns
    monkeypatch.setattr(eval.generate, "load_pipeline", lambda *a, **k: pytest.fail("images should be reused"))
    assert run_main(subject.main, cli(tiny_models, run_dir, "--checkpoints", "last")) == 0
    again = read_jsonl(run_dir / "eval.jsonl")
    assert [r["step"] for r in again] == [1, 2]            # replaced, not appended twice
    assert again[1]["dino"] == pytest.approx(rows[1]["dino"], abs=1e-12)
    assert (step1 / "p00-s0.png").stat().st_mtime_ns == stamp


def test_other_seeds_regenerate_that_checkpoint_only(tiny_models, run_dir):  # noqa: F811
    assert run_main(subject.main, cli(tiny_models, run_dir)) == 0   # (re)uses the images of both steps
    before = {s: pixels(run_dir / "eval" / f"step-{s}" / "p00-s0.png") for s in (1, 2)}
    assert run_main(subject.main, cli(tiny_models, run_dir, "--checkpoints", "1", "--seed", "7")) == 0
    names = sorted(p.name for p in (run_dir / "eval" / "step-1").glob("*.png"))
    assert names == ["p00-s7.png", "p00-s8.png", "p01-s7.png", "p01-s8.png"]
    assert np.array_equal(pixels(run_dir / "eval" / "step-2" / "p00-s0.png"), before[2])
    assert len(read_jsonl(run_dir / "eval.jsonl")) == 2


def test_average_scores_the_moving_average_into_its_own_file(tiny_models, run_dir, tmp_path, capsys):  # noqa: F811
    """--average scores checkpoint-N/ema/ (a run trained with --ema_decay) into RUN/ema/eval/ and RUN/ema/eval.jsonl,
    leaving RUN/eval.jsonl to the trained adapters. Here checkpoint-1's average is checkpoint-2's adapter and the
    other way round: its images are the trained scoring's of the other step, pixel for pixel (same seeds)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", "eval.jsonl"))
    assert run_main(subject.main, cli(tiny_models, run, "--average")) == 2
    assert "has no moving average to score" in capsys.readouterr().err
    for step, other in ((1, 2), (2, 1)):
        shutil.copytree(run / f"checkpoint-{other}", run / f"checkpoint-{step}" / "ema",
                        ignore=shutil.ignore_patterns("trainer_state.json", "ema"))
    assert run_main(subject.main, cli(tiny_models, run)) == 0
    assert run_main(subject.main, cli(tiny_models, run, "--average")) == 0
    trained, averaged = read_jsonl(run / "eval.jsonl"), read_jsonl(run / "ema" / "eval.jsonl")
    assert [(r["step"], r["checkpoint"], r.get("average")) for r in trained] == [(1, "checkpoint-1", None),
                                                                                (2, "checkpoint-2", None)]
    assert [(r["step"], r["checkpoint"], r["average"]) for r in averaged] == [(1, "checkpoint-1/ema", "ema"),
                                                                             (2, "checkpoint-2/ema", "ema")]
    for step, other in ((1, 2), (2, 1)):
        assert np.array_equal(pixels(run / "ema" / "eval" / f"step-{step}" / "p00-s0.png"),
                              pixels(run / "eval" / f"step-{other}" / "p00-s0.png"))
        assert averaged[step - 1]["dino"] == pytest.approx(trained[other - 1]["dino"], abs=1e-9)
