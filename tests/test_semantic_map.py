"""Semantic-map trainer: data layouts, palette, the conditioning encoder (zero init, save/load), resume,
bad input, the canny path, the mIoU arithmetic, and one accelerate-launched run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eval.miou import confusion_matrix, scores_from_confusion
from ground import ade20k
from training import semantic_map as sm
from training.segmap import data as sd
from training.segmap.sets import MapData, load_data

from .test_eval_support import tiny_upernet  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--method", "delora", "--rank", "4", "--seed", "0", "--resolution", "32", "--num_inference_steps", "1",
        "--num_validation_images", "1", "--num_validation_maps", "1", "--report_to", "none"]


pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one tiny-SD cache for the session


def random_label(rng, h, w, classes=(1, 4, 13, 150)):
    return rng.choice(np.array((0, *classes), dtype=np.uint8), size=(h, w))


def write_ade(root: Path, n_train=3, n_val=1, size=(40, 36)):
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            stem = f"ADE_{split}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / split / f"{stem}.jpg")
            Image.fromarray(random_label(rng, size[1], size[0]), "L").save(
                root / "annotations" / split / f"{stem}.png")
    return root


def write_imagefolder(root: Path, n=2):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        sd.paint(random_label(rng, 32, 32)).save(root / f"map{i}.png")   # a painted map, as diffusers' sets hold
        rows.append({"file_name": f"img{i}.png", "conditioning_image": f"map{i}.png", "text": f"caption {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_palette_round_trip_map_colours_map():
    label = np.arange(256, dtype=np.int64).reshape(16, 16) % (ade20k.NUM_CLASSES + 1)
    back = sd.unpaint(sd.paint(label))
    expected = label.copy()
    for raw, reads_as in ade20k.SHARED_COLOUR.items():   # the standard palette's one shared colour
        expected[label == raw] = reads_as
    assert np.array_equal(back, expected)
    assert np.asarray(sd.paint(np.zeros((2, 2), np.uint8))).max() == 0   # "other" is black
    assert tuple(np.asarray(sd.paint(np.full((1, 1), 3, np.uint8)))[0, 0]) == ade20k.PALETTE[2]
    assert sd.caption_from_map(np.array([[3, 3, 1], [0, 0, 0]])) == "a photo of sky, wall"


def test_ade20k_layout_pairs_by_stem_resizes_maps_nearest_and_captions_from_map(tmp_path):
    root = write_ade(tmp_path / "ADEChallengeData2016")
    args = sm.parse_args(["--train_data_dir", str(root), "--output_dir", str(tmp_path / "o"), *FAST]).args
    train, val, source = load_data(MapData.from_args(args))
    assert [e.stem for e in train] == [f"ADE_training_{i:08d}" for i in range(3)] and len(val) == 1
    assert "ADE20K layout" in source
    item = sd.prepare(train[0], 32, "seg", 0)
    # NEAREST: every value in the resized map is one of the original ids, and the control image is its painting
    assert set(np.unique(item["label"])) <= {0, 1, 4, 13, 150}
    assert np.array_equal(np.asarray(item["control"]), np.asarray(sd.paint(item["label"])))
    assert item["caption"].startswith("a photo of ") and item["image"].size == (32, 32)
    batch = sd.collate([sd.SemanticMapDataset(train, 32, "seg", 0)[k] for k in (0, 4)])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["conditioning_pixel_values"].min() >= 0


def test_imagefolder_metadata_layout_takes_captions_and_painted_maps(tmp_path):
    root = write_imagefolder(tmp_path / "folder")
    args = sm.parse_args(["--train_data_dir", str(root), "--output_dir", str(tmp_path / "o"), *FAST]).args
    train, val, _ = load_data(MapData.from_args(args))
    assert [e.caption for e in train] == ["caption 0", "caption 1"] and len(val) == 1
    item = sd.prepare(train[1], 32, "seg", 0)
    assert np.array_equal(np.asarray(item["control"]), np.asarray(Image.open(root / "map1.png").convert("RGB")))


def test_canny_condition_through_controlnet_aux():
    pytest.importorskip("controlnet_aux")
    img = np.zeros((48, 48, 3), np.uint8)
    img[:, 24:] = 255   # one vertical edge
    ex = sd.Example("edge", Image.fromarray(img), np.ones((48, 48), np.uint8))
    control = np.asarray(sd.prepare(ex, 32, "canny", 0)["control"])
    assert control.shape == (32, 32, 3)
    cols = np.nonzero(control.max(axis=(0, 2)))[0]
    assert len(cols) and abs(cols.mean() - 15.5) < 3 and control[:, :8].max() == 0   # edges at the step only


def tiny_model():
    from training.families import load_pipeline

    pipe = load_pipeline("tiny")
    torch.manual_seed(0)
    encoder = sm.conditioning_encoder(pipe.unet, pipe.vae_scale_factor)
    return pipe, sm.ConditionedUNet(pipe.unet, encoder)


def test_encoder_layout_at_sd15_width():
    from types import SimpleNamespace

    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=(320, 640, 1280, 1280)))   # SD-1.5's widths
    enc = sm.conditioning_encoder(unet, 8)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2), (256, 320, 1)]
    assert sum(p.numel() for p in enc.parameters()) == 1_086_480
    assert not convs[-1].weight.any() and not convs[-1].bias.any()
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 320, 8, 8)


def test_zero_init_is_the_base_unet_and_saved_encoder_reloads_exactly(tmp_path):
    pipe, model = tiny_model()
    g = torch.Generator().manual_seed(0)
    sample, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    control, t = torch.rand(2, 3, 32, 32, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        base = pipe.unet(sample, t, emb).sample
        assert torch.equal(model(sample, t, emb, control), base)          # step 0 = base UNet, exactly
        for p in model.conditioning_embedding.parameters():              # a trained encoder: non-zero weights
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        trained = model(sample, t, emb, control)
        assert not torch.equal(trained, base)
        sm.save_encoder(model.conditioning_embedding, tmp_path)
        fresh = sm.conditioning_encoder(pipe.unet, pipe.vae_scale_factor)
        sm.load_encoder(fresh, tmp_path)
        model.conditioning_embedding.load_state_dict(fresh.state_dict())
        assert torch.equal(model(sample, t, emb, control), trained)
        assert torch.equal(pipe.unet(sample, t, emb).sample, base)       # no control set: the hook adds nothing


def read_final(out: Path):
    return load_file(str(out / "adapter.safetensors")), load_file(str(out / sm.ENCODER_FILE))


def test_resume_equals_uninterrupted_run_and_eval_scores_the_run(tmp_path, tiny_upernet):  # noqa: F811
    import shutil

    from eval import segmentation as seg

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*FAST, "--max_train_steps", "3", "--checkpointing_steps", "2"]
    assert sm.main(["--output_dir", str(straight), *args]) == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert sm.main(["--output_dir", str(resumed), *args, "--resume_from_checkpoint", "latest"]) == 0
    (a_ad, a_enc), (b_ad, b_enc) = read_final(straight), read_final(resumed)
    assert a_ad.keys() == b_ad.keys() and all(torch.equal(a_ad[k], b_ad[k]) for k in a_ad)
    assert a_enc.keys() == b_enc.keys() and all(torch.equal(a_enc[k], b_enc[k]) for k in a_enc)
    assert any(v.any() for k, v in a_enc.items() if k.startswith("conv_out"))   # the encoder did train
    run = json.loads((straight / "run.json").read_text())
    assert run["caption_source"] == "map" and run["condition"] == "seg"
    assert run["conditioning_encoder_parameters"] == sum(v.numel() for v in a_enc.values())
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lr_conditioning"] == 1e-4 for r in rows)    # DeLoRA's default lr, capped at 1e-4

    # eval.segmentation --run_dir: bounds once, then one row per chosen checkpoint, the mean recorded
    argv = ["--run_dir", str(straight), "--model", str(tiny_upernet), "--num_inference_steps", "1", "--max_maps",
            "1", "--checkpoints", "last", "--miou_mean", "all", "--device", "cpu"]
    assert seg.main(argv) == 0
    evals = [json.loads(x) for x in (straight / "eval.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in evals] == [("real", None), ("base", None), ("checkpoint", 3)]
    assert all(r["miou_mean"] == "all" and r["num_inference_steps"] == 1 and r["scheduler"] == "DDIMScheduler"
               and 0 <= r["miou"] <= r["pixel_accuracy"] * 150 for r in evals)
    assert len(list((straight / "eval" / "seg-step-3").glob("*-s0.png"))) == 1


@pytest.fixture
def bad(tmp_path):
    t = tmp_path
    (t / "empty").mkdir()
    write_ade(t / "orphan_image")
    next((t / "orphan_image" / "annotations" / "training").iterdir()).unlink()
    write_ade(t / "orphan_map")
    next((t / "orphan_map" / "images" / "training").iterdir()).unlink()
    write_ade(t / "high_label")
    Image.fromarray(np.full((36, 40), 151, np.uint8), "L").save(
        t / "high_label" / "annotations" / "training" / "ADE_training_00000001.png")
    write_ade(t / "size")
    Image.fromarray(np.ones((20, 20), np.uint8), "L").save(t / "size" / "annotations" / "training" /
                                                          "ADE_training_00000002.png")
    write_ade(t / "junk")
    (t / "junk" / "images" / "training" / "notes.txt").write_text("x")
    return t


BAD = {
    "map without image": (["--train_data_dir", "{t}/orphan_map"], "has no image of the same name"),
    "image without map": (["--train_data_dir", "{t}/orphan_image"], "has no label map"),
    "label above 150": (["--train_data_dir", "{t}/high_label"], "holds label 151"),
    "size differs": (["--train_data_dir", "{t}/size"], "a map must have its image's size"),
    "not an image": (["--train_data_dir", "{t}/junk"], "notes.txt is not an image file"),
    "empty folder": (["--train_data_dir", "{t}/empty"], "is empty"),
    "unknown condition": (["--condition", "depth"], "--condition 'depth' is unknown"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_exit_2(bad, capsys, case):
    argv = [a.replace("{t}", str(bad)) for a in BAD[case][0]]
    code = sm.main(["--output_dir", str(bad / "out"), *FAST, *argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and BAD[case][1] in lines[0], err
    assert not (bad / "out").exists()


def test_miou_aacc_against_a_hand_computed_confusion_matrix():
    # labels (rows) vs predictions (columns), 3 classes, 255 ignored:
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, label, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    s = scores_from_confusion(cm)
    iou = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]   # TP / (row + column - TP)
    assert s["iou"] == pytest.approx(iou) and s["miou"] == pytest.approx(sum(iou) / 3)
    assert s["pixel_accuracy"] == pytest.approx(4 / 7)          # diagonal / valid pixels
    assert s["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    # a 4th class in neither labels nor predictions: 'present' leaves it out, 'all' (mit-semseg) counts 0
    cm4 = confusion_matrix(pred, label, 4)
    assert scores_from_confusion(cm4, "present")["miou"] == pytest.approx(sum(iou) / 3)
    assert scores_from_confusion(cm4, "all")["miou"] == pytest.approx(sum(iou) / 4)
    assert scores_from_confusion(cm4, "all")["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 4)


def test_accelerate_launch_smoke(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "training" / "semantic_map.py"), "--output_dir", str(out), *FAST, "--max_train_steps", "1",
           "--checkpointing_steps", "1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 1 steps of delora" in proc.stdout
    for name in ("adapter.safetensors", sm.ENCODER_FILE, "checkpoint-1/" + sm.ENCODER_FILE, "samples_grid.png",
                 "checkpoint-1/samples/p00-map.png", "checkpoint-1/samples/p00-s0.png", "samples/grid.png"):
        assert (out / name).is_file(), name
    row = json.loads((out / "checkpoint-1" / "samples" / "prompts.jsonl").read_text().splitlines()[0])
    assert row["map"] == "p00-map.png" and row["prompt"].startswith("a photo of")
    assert Image.open(out / "samples" / "grid.png").size == (64, 32)   # map | sample


def test_default_run_length_is_a_meaningful_run(monkeypatch):
    """No step or epoch flag: 200 steps with 2 checkpoints (what make demo-seg shows), not one epoch of 5 pairs."""
    monkeypatch.delenv("LOWRANK_MAX_STEPS", raising=False)
    a = sm.parse_args([])
    assert (a.max_train_steps, a.checkpointing_steps, a.num_train_epochs) == (200, 100, 1)
    a = sm.parse_args(["--num_train_epochs", "10"])
    assert (a.max_train_steps, a.checkpointing_steps) == (None, 500)
    monkeypatch.setenv("LOWRANK_MAX_STEPS", "2")
    assert (sm.parse_args([]).max_train_steps, sm.parse_args([]).checkpointing_steps) == (2, 1)
