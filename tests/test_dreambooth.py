"""DreamBooth trainer, in-process through main(argv): every method, outputs, distances, bad input, NaN.

The real `accelerate launch` path, kill-and-resume and 2-process DDP are in test_dreambooth_resume.py.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

import lowrank  # noqa: E402
from training import dreambooth  # noqa: E402
from training.families import load_pipeline  # noqa: E402
from training.images.files import load_image_dir  # noqa: E402
from training.subject import args as subject_args  # noqa: E402

FAST = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--seed", "0", "--resolution", "32",
        "--num_inference_steps", "2", "--num_validation_images", "2", "--rank", "4", "--report_to", "none"]
ADAPTER_FILES = {"adapter_config.json", "adapter.safetensors"}
# the mult_* ablation variants (DeLoRA Table 1 V5-V7) share one layer class (forward, save, merge, resume state):
# mult_relaxed, the widest, stands for the family in trainer runs; the core matrix covers each of them
TRAINER_METHODS = sorted(m for m in lowrank.METHODS if m not in ("mult_highrank", "mult_bounded"))


pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one tiny-SD cache for the session


def train(out, *extra, base=FAST):
    return dreambooth.main(["--output_dir", str(out), *base, *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_samples(folder, n):
    lines = [json.loads(x) for x in (folder / "prompts.jsonl").read_text().splitlines()]
    assert len(lines) == n
    for line in lines:
        assert line["prompt"] and Image.open(folder / line["image"]).size == (32, 32)
    return lines


@pytest.mark.parametrize("method", TRAINER_METHODS)
def test_every_method_trains_checkpoints_and_logs_distances(tmp_path, method):
    out = tmp_path / "out"
    assert train(out, "--method", method) == 0

    assert ADAPTER_FILES <= {p.name for p in out.iterdir()}
    assert Image.open(out / "samples_grid.png").size == (64, 32)       # 2 seeds x 1 prompt of 32 px
    check_samples(out / "samples", 2)
    ckpt = out / "checkpoint-2"
    state_files = {"optimizer.bin", "random_states_0.pkl", "trainer_state.json"}
    assert ADAPTER_FILES | state_files <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
    check_samples(ckpt / "samples", 2)
    assert not list(out.glob("*.tmp"))

    run = json.loads((out / "run.json").read_text())
    assert run["args"]["method"] == method and run["adapter_config"]["method"] == method
    assert {"torch", "diffusers", "transformers", "accelerate", "lowrank"} <= set(run["versions"])
    assert run["fig3_layer"].endswith("attn1.to_out.0")

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # default --distance_logging_steps 10: every layer at the checkpoint (2) and the last step (3) only
    layers = check_distance_rows(rows, run["fig3_layer"], full_steps=[2, 3])
    assert len(layers) == run["adapted_layers"] > 0
    for r in rows:
        assert math.isfinite(r["loss"]) and r["lr"] > 0

    start = run["distance_at_start"]   # a full probe before the first step
    assert {"distance_fig3", "distance_mean", "distance_max", "rel_distance_max"} <= set(start)
    if method == "ether":    # a reflection from the start: never the identity
        assert start["rel_distance_max"] > 0.1 and rows[0]["distance_fig3"] > 0
    else:                    # starts at the pretrained weights and moves away
        assert start["rel_distance_max"] < 1e-5
        assert 0 < rows[1]["distance_max"] < rows[2]["distance_max"]

    # the saved adapter is the trained one: reloaded into a fresh model it has the last logged distance
    unet = load_pipeline().unet
    lowrank.load_adapter(unet, out)
    fig3 = lowrank.weight_distance(unet)[run["fig3_layer"]]
    assert fig3 == pytest.approx(rows[-1]["distance_fig3"], rel=1e-6, abs=1e-9)


def check_distance_rows(rows, fig3, full_steps):
    """distance_fig3 and the probe's time on every row; every adapted layer, their mean and max on the
    full-probe rows (exactly `full_steps`), and there distance_fig3 == distance/<fig3 layer>. The layers."""
    full = [r for r in rows if "distance_mean" in r]
    assert [r["step"] for r in full] == full_steps
    layers = [k[len("distance/"):] for k in full[0] if k.startswith("distance/")]
    for r in rows:
        assert r["distance_fig3"] >= 0 and r["rel_distance_fig3"] >= 0 and 0 < r["time/distance_share"] < 1
        assert r["time/step"] > r["time/distance"] > 0
        names = sorted(k.split("/", 1)[1] for k in r if k.startswith(("distance/", "rel_distance/")))
        if r["step"] not in full_steps:   # the followed layer only
            assert names == [] and not {"distance_max", "rel_distance_mean", "rel_distance_max"} & set(r)
            continue
        assert names == sorted(layers * 2)
        assert r["distance_fig3"] == r["distance/" + fig3] and r["rel_distance_fig3"] == r["rel_distance/" + fig3]
        assert r["distance_max"] == max(r["distance/" + n] for n in layers)
        assert r["distance_mean"] == pytest.approx(sum(r["distance/" + n] for n in layers) / len(layers))
        assert r["rel_distance_max"] == max(r["rel_distance/" + n] for n in layers)
        assert all(r["rel_distance/" + n] >= 0 for n in layers)
    return layers


def test_rotation_validation_accumulation_and_tensorboard(tmp_path):
    out = tmp_path / "out"
    extra = ["--method", "lora", "--max_train_steps", "5", "--checkpointing_steps", "2", "--checkpoints_total_limit",
             "1", "--validation_steps", "3", "--gradient_accumulation_steps", "2", "--train_batch_size", "2",
             "--gradient_checkpointing", "--validation_prompt", "a sks cat", "a sks cat on the beach",
             "--export_diffusers", "false", "--distance_logging_steps", "3"]
    has_tb = importlib_has("tensorboard")
    if has_tb:
        extra += ["--report_to", "tensorboard"]
    assert train(out, *extra) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]      # checkpoint-2 rotated out
    assert not (out / "pytorch_lora_weights.safetensors").exists()                  # --export_diffusers false
    lines = check_samples(out / "validation" / "step-3", 4)
    assert {x["prompt"] for x in lines} == {"a sks cat", "a sks cat on the beach"}
    assert {x["seed"] for x in lines} == {0, 1}
    assert Image.open(out / "samples_grid.png").size == (64, 64)
    rows = metrics(out)
    # 5 images, batch 2, 2 micro-batches per step: 2 optimizer steps per epoch
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r["epoch"] for r in rows] == [0, 0, 1, 1, 2]
    run = json.loads((out / "run.json").read_text())
    assert run["steps_per_epoch"] == 2
    # every layer every 3 steps, at the checkpoints (2, 4) and the last step (5): all but step 1
    check_distance_rows(rows, run["fig3_layer"], full_steps=[2, 3, 4, 5])
    if has_tb:
        assert list((out / "logs").rglob("events.out.tfevents.*"))


def importlib_has(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_prior_preservation_generates_missing_class_images_once(tmp_path):
    out, classes = tmp_path / "out", tmp_path / "classes"
    prior = ["--method", "delora", "--with_prior_preservation", "--class_data_dir", str(classes),
             "--num_class_images", "3", "--sample_batch_size", "2", "--max_train_steps", "2"]
    assert train(out, *prior) == 0
    files = sorted(classes.iterdir())
    assert [p.name for p in files] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    stamps = [p.stat().st_mtime_ns for p in files]
    run = json.loads((out / "run.json").read_text())
    assert run["class_images"] == 3 and run["args"]["class_prompt"] == "a photo of cat"
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    assert train(tmp_path / "again", *prior) == 0
    assert [p.stat().st_mtime_ns for p in sorted(classes.iterdir())] == stamps     # reused, not regenerated


def make_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    rgba = np.dstack([rgb, np.zeros((48, 64), np.uint8)])           # fully transparent: becomes white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray(rgb[:16, :16]).save(folder / "tiny.png")
    (folder / "notes.txt").write_text("not an image")
    good = folder / "rgb.jpg"
    (folder / "corrupt.png").write_bytes(good.read_bytes()[:200])       # truncated
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)


def test_image_folder_converts_formats_and_skips_bad_files(tmp_path, capsys):
    folder = tmp_path / "subject"
    make_images(folder)
    images = load_image_dir(folder, 32)
    err = capsys.readouterr().err
    assert len(images) == 7
    assert all(img.mode == "RGB" and min(img.size) == 32 for img in images)
    for name in ("notes.txt", "corrupt.png", "broken.jpg"):
        assert name in err
    assert "warning:" in err and "tiny.png (16x16)" in err and "upscaling" in err
    by_name = dict(zip(sorted(p.name for p in folder.iterdir()
                              if p.name not in ("notes.txt", "corrupt.png", "broken.jpg")), images))
    assert np.asarray(by_name["gray16.png"]).min() == 255            # 16-bit full scale -> 8-bit full scale
    assert np.asarray(by_name["rgba.png"]).min() == 255              # transparent -> white background
    # and it trains on them
    assert train(tmp_path / "out", "--instance_data_dir", str(folder), "--instance_prompt", "a photo of sks thing",
                 "--max_train_steps", "1", "--method", "lora") == 0


@pytest.fixture
def bad_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hello")
    (tmp_path / "junk" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "afile").write_text("x")
    return tmp_path


BAD = {
    "missing dir": (["--instance_data_dir", "{t}/nope", "--instance_prompt", "p"], "does not exist"),
    "empty dir": (["--instance_data_dir", "{t}/empty", "--instance_prompt", "p"], "is empty"),
    "only junk": (["--instance_data_dir", "{t}/junk", "--instance_prompt", "p"], "no readable images"),
    "no prompt": (["--instance_data_dir", "{t}/junk"], "--instance_prompt is required"),
    # the most useful error first: the folder is missing (not: the prompt that goes with it)
    "missing dir, no prompt": (["--instance_data_dir", "{t}/nope"], "does not exist"),
    "unknown method": (["--method", "nope"], "unknown method 'nope'"),
    "output is a file": (["--output_dir", "{t}/afile"], "is not a directory"),
    "zero steps": (["--max_train_steps", "0"], "must be positive"),
    "zero distance steps": (["--distance_logging_steps", "0"], "--distance_logging_steps must be positive, got 0"),
    "bad rank": (["--rank", "0"], "rank must be a positive integer"),
    "unknown flag": (["--bogus", "1"], "unrecognized arguments"),
    "bad bool": (["--dora_detach_norm", "maybe"], "expected true or false"),
    "not a checkpoint": (["--resume_from_checkpoint", "{t}/empty"], "not a checkpoint folder"),
    "unreachable model": (["--pretrained_model_name_or_path", "no-such-org/no-such-model"], "cannot reach model"),
    "odd resolution": (["--resolution", "30"], "must be a multiple of 4"),
    "no target": (["--target_modules", "nothing_like_this"], "matched no module"),
    "bad regex": (["--target_modules", "re:("], "does not compile"),
    "output under a file": (["--output_dir", "{t}/afile/sub"], "is not a directory"),
    "class dir is a file": (["--with_prior_preservation", "--class_prompt", "a cat", "--class_data_dir", "{t}/afile"],
                            "is not a directory"),
    "tracker not installed": (["--report_to", "comet_ml"], "not installed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_exit_2(bad_dirs, capsys, case):
    argv, expected = BAD[case]
    argv = [a.replace("{t}", str(bad_dirs)) for a in argv]
    out = ["--output_dir", str(bad_dirs / "out")] if "--output_dir" not in argv else []
    code = dreambooth.main(out + [*FAST, *argv] if case != "odd resolution" else out + argv + FAST[:6])
    if case == "tracker not installed" and importlib_has("comet_ml"):
        pytest.skip("comet_ml is installed here")
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(error_lines) == 1 and expected in error_lines[0], err
    # only the trainer's own lines (the error, its warnings, its note on the example subject): no library chatter
    own = ("error:", "warning:", "instance images:")
    assert all(line.startswith(own) for line in err.splitlines() if line.strip()), err
    assert not (bad_dirs / "out").exists()       # bad input leaves no empty output folder behind


def test_damaged_checkpoint_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(out, "--method", "lora") == 0
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(b"PK\x03\x04 truncated")
    capsys.readouterr()
    code = train(out, "--method", "lora", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint-2 is damaged" in err and "Traceback" not in err, err


def test_nan_loss_stops_keeps_last_checkpoint_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--method", "lora", "--max_train_steps", "5"]
    assert train(out, *args, "--debug_nan_at_step", "3") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the loss is nan at step 3") and "checkpoint-2" in err[-1]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (out / "adapter.safetensors").exists()                  # no final adapter from a diverged run
    assert [r["step"] for r in metrics(out)] == [1, 2]
    unet = load_pipeline().unet
    lowrank.load_adapter(unet, out / "checkpoint-2")
    assert all(math.isfinite(v) for v in lowrank.weight_distance(unet).values())

    # resuming needs the same adapter flags ...
    assert train(out, "--method", "ether", "--max_train_steps", "5", "--resume_from_checkpoint", "latest") == 2
    assert "method='lora'" in capsys.readouterr().err
    # ... and then carries on from the last good checkpoint
    assert train(out, *args, "--resume_from_checkpoint", "latest") == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-2")


def test_every_flag_has_help_and_every_adapter_option_is_a_flag(capsys):
    parser = subject_args.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit) as exit_:
        dreambooth.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, help_text in lowrank.AdapterConfig.help().items():
        assert f"--{name}" in text and " ".join(help_text.split())[:40] in text, name
    for name in ("--pretrained_model_name_or_path", "--instance_data_dir", "--with_prior_preservation",
                 "--lambda_learning_rate", "--resume_from_checkpoint", "--validation_steps"):
        assert name in text
    assert "--debug_nan_at_step" not in text                         # test-only flags stay hidden


# make the methods that act after optimizer steps act within a 5-step run (when lowrank has them)
# dyndora: the schedule spans --dyndora_total_steps; set it so a run stopped at step 3 and one killed there agree
ACTIVE_HOOKS = {"deltalora": ["--deltalora_start_step", "1"],
                "dyndora": ["--dyndora_prune_interval", "1", "--dyndora_total_steps", "5"]}


# methods whose resume restores state beyond A and B (DeLoRA's frozen initial update, Delta-LoRA's snapshot,
# dynamic-rank DoRA's scores and masks) and LoRA run in make test; every method with -m slow
RESUME_METHODS = [m if m in ("lora", "delora", "deltalora", "dyndora") else pytest.param(m, marks=pytest.mark.slow)
                  for m in TRAINER_METHODS]


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_resume_mid_epoch_with_accumulation_is_exact(tmp_path, method):
    """In-process twin of the SIGKILL test for every method: batch 2, 2 micro-batches per step, resume
    inside an epoch; the adapter checkpoint alone (plus optimizer state) must restore everything."""
    args = ["--method", method, "--max_train_steps", "5", "--checkpointing_steps", "3",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", *ACTIVE_HOOKS.get(method, [])]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, *args) == 0
    assert train(b, *args[:3], "3", *args[4:]) == 0                 # stop at step 3 (mid-epoch 1)
    assert train(b, *args, "--resume_from_checkpoint", "latest") == 0
    from safetensors.torch import load_file

    sa, sb = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]


def test_checkpoint_listing_ignores_partial_and_stale_folders(tmp_path):
    from ground.runfolder import list_checkpoints, remove_stale
    from training.common import TrainingError
    from training.common.checkpoint import resolve_resume

    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-4.old", "checkpoint-x",
                 "checkpoint-6"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-6"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
        (tmp_path / name / "adapter_config.json").write_text("{}")
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp"):   # checkpoint-6 lacks its weights
        (tmp_path / name / "adapter.safetensors").write_bytes(b"")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10]      # numeric order, complete ones only
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-10"
    assert resolve_resume(tmp_path, "checkpoint-2").name == "checkpoint-2"
    with pytest.raises(TrainingError):
        resolve_resume(tmp_path, "checkpoint-12.tmp")
    assert resolve_resume(tmp_path / "empty", "latest") is None
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-6",
                                                          "checkpoint-x"]


def test_default_run_length_is_a_meaningful_run(monkeypatch):
    """No step or epoch flag: 300 steps with 3 checkpoints (not diffusers' one epoch of 5 images);
    $LOWRANK_MAX_STEPS changes that number only; a step or epoch flag gives diffusers' defaults."""
    monkeypatch.delenv("LOWRANK_MAX_STEPS", raising=False)
    a = dreambooth.parse_args([])
    assert (a.max_train_steps, a.checkpointing_steps, a.num_train_epochs) == (300, 100, 1)
    a = dreambooth.parse_args(["--checkpointing_steps", "50"])
    assert (a.max_train_steps, a.checkpointing_steps) == (300, 50)
    assert (dreambooth.parse_args(["--max_train_steps", "7"]).checkpointing_steps) == 500
    a = dreambooth.parse_args(["--num_train_epochs", "2"])
    assert (a.max_train_steps, a.checkpointing_steps, a.num_train_epochs) == (None, 500, 2)
    monkeypatch.setenv("LOWRANK_MAX_STEPS", "7")
    assert (dreambooth.parse_args([]).max_train_steps, dreambooth.parse_args([]).checkpointing_steps) == (7, 2)
    assert dreambooth.parse_args(["--max_train_steps", "4"]).max_train_steps == 4   # a flag wins
    monkeypatch.setenv("LOWRANK_MAX_STEPS", "two")
    from training.common import TrainingError

    with pytest.raises(TrainingError, match="LOWRANK_MAX_STEPS must be a positive number"):
        dreambooth.parse_args([])


def test_default_run_writes_checkpoints_and_the_done_line_names_only_what_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWRANK_MAX_STEPS", "2")
    out = tmp_path / "out"
    fast = FAST[4:]   # FAST without its step flags
    assert train(out, "--method", "lora", "--export_diffusers", "false", base=fast) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "checkpoint-1" / "samples" / "prompts.jsonl").is_file()
    assert (out / "checkpoint-2" / "samples" / "prompts.jsonl").is_file()
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert done.startswith("done: 2 steps of lora") and "checkpoint-1/ ... checkpoint-2/ (2)" in done, done
    assert "pytorch_lora_weights" not in done and not (out / "pytorch_lora_weights.safetensors").exists()
    named = [n.split()[0].rstrip("/") for n in done.split(": ", 2)[2].split(", ") if "..." not in n]
    assert named and all((out / n).exists() for n in named), named


def test_skip_final_samples_keeps_checkpoint_samples(tmp_path):
    out = tmp_path / "out"
    assert train(out, "--method", "lora", "--skip_final_samples") == 0
    assert (out / "adapter.safetensors").is_file()
    assert not (out / "samples").exists() and not (out / "samples_grid.png").exists()
    check_samples(out / "checkpoint-2" / "samples", 2)   # checkpoints still sample
