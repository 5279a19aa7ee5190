"""eval.robustness on the FLUX.2-klein preset, and peft's image-gen protocol (--protocol peft-image-gen) as a dry run:
real trainer subprocesses on tiny-flux2-klein (1 step, 32 px), distances only (--no_scores; eval.subject on FLUX runs
is test_family_downstream.py's). The protocol's run folders must carry its settings where the command line left
them, the command line's where it gave them, and train on peft's cat split laid out from a stand-in cat set (20
random photos in a saved `datasets` folder: the hub is out of reach here)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import generate, robustness
from eval.robustness_protocols import PEFT_CAT_PROMPTS, PEFT_IMAGE_GEN, PEFT_SAMPLE_PROMPTS, peft_train_split

PRESET = "tiny-flux2-klein"
TINY = ["--pretrained_model_name_or_path", PRESET, "--resolution", "32", "--num_inference_steps", "1",
        "--num_validation_images", "1", "--num_threads", "1", "--max_train_steps", "1", "--studies", "lr,norms",
        "--no_scores"]

pytestmark = pytest.mark.usefixtures("tiny_cache")   # the trainer subprocesses build and share the preset once


def results(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def run_args(out: Path, row: dict) -> dict:
    return json.loads((out / "runs" / row["run"] / "run.json").read_text())["args"]


def test_a_study_on_tiny_flux2_klein_writes_its_report(tmp_path):
    """Two methods at one factor: both train, each distance is the family's Fig. 3 layer (the first double block's
    image out-projection), DeLoRA's below its bound, and the weight norms come from the transformer."""
    out = tmp_path / "study"
    assert robustness.cli(["--methods", "lora,delora", "--lr_factors", "1", "--rank", "2", "--output_dir", str(out),
                           *TINY]) == 0
    rows = {r["method"]: r for r in results(out)}
    assert {r["status"] for r in rows.values()} == {"trained"} and set(rows) == {"lora", "delora"}
    assert 0 < float(rows["delora"]["distance"]) <= float(rows["delora"]["bound"]) and float(rows["lora"]["distance"])
    report = (out / "report.md").read_text()
    assert "`transformer_blocks.0.attn.to_out.0`" in report
    assert "Weight norms (Fig. 4)" in report and "did not load" not in report
    assert (out / "fig2_lr_sweep.png").is_file()


@pytest.fixture
def cat_set(tmp_path) -> Path:
    """20 seeded random photos (as many as peft's cat set has prompts), saved the way a downloaded copy would be."""
    import datasets

    rng = np.random.RandomState(0)
    photos = [Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in PEFT_CAT_PROMPTS]
    folder = tmp_path / "cats"
    datasets.Dataset.from_dict({"image": photos}, features=datasets.Features({"image": datasets.Image()})) \
        .save_to_disk(str(folder))
    return folder


def test_peft_image_gen_dry_run_gives_every_run_the_protocols_settings(tmp_path, cat_set):
    """The protocol with the tiny overrides (preset, 32 px, 1 step, rank 4, one sample prompt): the runs keep every
    other setting of peft's (batch 2, constant rate, weight decay 1e-4, clipping at 1, weighting none, peft's
    targets, α = the rank given, gradient checkpointing, text encoders off the accelerator, bf16 frozen weights,
    center crops, sample guidance), learn at factor x peft's base rate, and train on the 14 photos of peft's split,
    each with its own prompt; eval.subject would score them against those photos."""
    out = tmp_path / "peft"
    assert robustness.cli(["--protocol", "peft-image-gen", "--protocol_data", str(cat_set), "--methods",
                           "dora,etherplus", "--lr_factors", "2", "--rank", "4", "--validation_prompt",
                           "a photo of sks cat", "--output_dir", str(out), *TINY]) == 0
    rows = {r["method"]: r for r in results(out)}
    assert {r["status"] for r in rows.values()} == {"trained"}
    assert {m: float(r["lr"]) for m, r in rows.items()} == {"dora": 2e-4, "etherplus": 2e-3}
    data = out / "data" / "peft-cat-train"
    for row in rows.values():
        a = run_args(out, row)
        assert (a["pretrained_model_name_or_path"], a["resolution"], a["rank"], a["alpha"], a["max_train_steps"]) == \
            (PRESET, 32, 4, 4.0, 1)
        assert (a["train_batch_size"], a["lr_scheduler"], a["adam_weight_decay"], a["max_grad_norm"],
                a["weighting_scheme"], a["mixed_precision"]) == (2, "constant", 1e-4, 1.0, "none", "bf16")
        assert a["gradient_checkpointing"] and a["offload"] and a["center_crop"] and a["seed"] == 0
        assert a["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                       "to_add_out", "to_qkv_mlp_proj", "linear_in", "linear_out"]
        assert (a["guidance_scale"], a["instance_prompt"], a["validation_prompt"]) == \
            (3.5, "a photo of sks cat", ["a photo of sks cat"])
        assert (Path(a["dataset_name"]), a["caption_column"]) == (data, "prompt")

    split = peft_train_split(len(PEFT_CAT_PROMPTS))
    laid_out = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in laid_out] == [PEFT_CAT_PROMPTS[i] for i in split] and len(split) == 14
    run = json.loads((out / "runs" / rows["dora"]["run"] / "run.json").read_text())
    assert run["instance_images"] == 14 and run["caption_source"] == "data"
    import datasets

    photos = datasets.load_from_disk(str(cat_set))["image"]
    real = generate.run_real_images(run, 32)   # what eval.subject scores against: the photos trained on
    assert len(real) == 14
    assert all(np.array_equal(np.asarray(img.convert("RGB")), np.asarray(Image.open(data / r["file_name"])))
               for img, r in zip([photos[i] for i in split], laid_out))


def test_peft_split_is_numpys_seeded_shuffle():
    """peft's data.py: np.random.seed(0); np.random.shuffle(arange(20)); train = the first 20 - 2 - 4."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        order = np.arange(20)
        np.random.shuffle(order)
    finally:
        np.random.set_state(state)
    assert peft_train_split(20) == order[:14].tolist()


def test_protocol_defaults_and_what_the_command_line_overrides():
    args, flags = robustness.parse(["--protocol", "peft-image-gen"])
    assert (args.methods, args.lr_factors, args.max_train_steps, args.long_steps, args.studies) == \
        (["lora", "dora", "delora", "etherplus"], [1, 2, 4, 8, 16], 750, 3000, ["lr", "long", "norms"])
    assert args.base_lrs == {"lora": 1e-4, "dora": 1e-4, "delora": 1e-3, "etherplus": 1e-3}
    assert args.dino_model == "facebook/dinov2-base" and args.output_dir.name == "robustness-peft-image-gen"

    def value(flags, flag):
        return flags[flags.index(flag) + 1]
    assert (value(flags, "--pretrained_model_name_or_path"), value(flags, "--resolution"),
            value(flags, "--train_batch_size"), value(flags, "--rank"), value(flags, "--alpha")) == \
        ("black-forest-labs/FLUX.2-klein-base-4B", "512", "2", "32", "32")
    sampled = flags[flags.index("--validation_prompt") + 1:flags.index("--validation_prompt") + 6]
    assert sampled == list(PEFT_SAMPLE_PROMPTS)
    assert "--gradient_checkpointing" in flags and value(flags, "--mixed_precision") == "bf16"

    args, flags = robustness.parse(["--protocol", "peft-image-gen", "--base_lrs", "dora=3e-4", "--long_steps", "1500",
                                    "--rank", "64", "--alpha", "16", "--resolution=1024"])
    assert args.base_lrs == {**PEFT_IMAGE_GEN.base_lrs, "dora": 3e-4} and args.long_steps == 1500
    assert [a for a in flags if a.startswith("--resolution")] == ["--resolution=1024"]
    assert (value(flags, "--rank"), value(flags, "--alpha")) == ("64", "16")   # both given: both kept
    _, flags = robustness.parse(["--protocol", "peft-image-gen", "--rank", "64"])
    assert value(flags, "--alpha") == "64"   # α follows a rank given alone, as peft's configs keep α = r


@pytest.mark.parametrize("argv, expected", [
    (["--protocol_data", "cats"], "--protocol_data names a protocol's data set: give --protocol too"),
    (["--protocol", "peft-image-gen", "--task", "glue"], "--protocol peft-image-gen is a dreambooth study"),
    (["--protocol", "peft-image-gen", "--protocol_data", "CATS", "--studies", "lr"],
     "has 3 rows; peft's cat set has 20"),
])
def test_bad_protocol_input_is_one_error_line(argv, expected, tmp_path, capsys):
    import datasets

    small = tmp_path / "three"
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 3},
                               features=datasets.Features({"image": datasets.Image()})).save_to_disk(str(small))
    argv = [str(small) if a == "CATS" else a for a in argv]
    assert robustness.cli([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "out" / "runs").exists()
