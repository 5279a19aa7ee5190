"""The app starts semantic-map runs: uploaded image + label-map pairs staged in the ADE20K layout and checked
by the trainer's own code (refusals name the file, nothing left behind), the trainer command, and one run
end to end through gradio_client's /start_semantic with the real training/semantic_map.py."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import commands
from app import runs as R
from app.inputs import InputError, check_form
from app.semantic import stage_pairs

from .test_app_support import FAST, running_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


def pairs(folder: Path, n: int = 2, size=(40, 32), top_label: int = 3) -> tuple[list[str], list[str]]:
    """n photos with label maps of the same stems: left half label 1, right half `top_label`."""
    folder.mkdir(parents=True, exist_ok=True)
    images, maps = [], []
    w, h = size
    for i in range(n):
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[:, : w // 2], rgb[:, w // 2:] = (120, 30 * i, 40), (10, 200, 90)
        label = np.ones((h, w), np.uint8)
        label[:, w // 2:] = top_label
        Image.fromarray(rgb).save(folder / f"scene {i}.jpg")
        Image.fromarray(label).save(folder / f"scene {i}.png")
        images.append(str(folder / f"scene {i}.jpg"))
        maps.append(str(folder / f"scene {i}.png"))
    return images, maps


def test_pairs_are_staged_in_the_ade20k_layout_with_maps_untouched(tmp_path):
    images, maps = pairs(tmp_path / "up")
    assert stage_pairs(images, maps, tmp_path / "staged", max_mb=5) == 2
    assert sorted(p.name for p in (tmp_path / "staged/images/training").iterdir()) == ["scene_0.png", "scene_1.png"]
    staged = np.asarray(Image.open(tmp_path / "staged/annotations/training/scene_1.png"))
    assert np.array_equal(staged, np.asarray(Image.open(maps[1])))


@pytest.mark.parametrize("case, message", [
    ("unpaired image", "Image 'scene_1' has no label map"),
    ("unpaired map", "Label map 'scene_1' has no image"),
    ("label above 150", "holds label 151, above ADE20K's 150 classes"),
    ("size differs", "a map must have its image's size"),
    ("jpeg map", "maps must be PNG"),
    ("not an image", "is not an image"),
])
def test_bad_pairs_are_refused_with_one_message_and_nothing_left(tmp_path, case, message):
    images, maps = pairs(tmp_path / "up", top_label=151 if case == "label above 150" else 3)
    if case == "unpaired image":
        maps = maps[:1]
    elif case == "unpaired map":
        images = images[:1]
    elif case == "size differs":
        Image.fromarray(np.ones((10, 10), np.uint8)).save(maps[0])
    elif case == "jpeg map":
        Image.open(maps[0]).convert("RGB").save(tmp_path / "up/scene 0.jpeg")
        maps[0] = str(tmp_path / "up/scene 0.jpeg")
    elif case == "not an image":
        Path(maps[0]).write_text("not a png")
    with pytest.raises(InputError) as excinfo:
        stage_pairs(images, maps, tmp_path / "staged", max_mb=5)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not (tmp_path / "staged").exists()


def test_semantic_command_runs_the_semantic_trainer_without_dreambooth_flags(tmp_path):
    form = check_form(["delora"], "cat", "sks", 4, "", 5, 2, 12.0, "tiny", 3, 32, 2, 1)
    cmd = commands.semantic_train_command(form, "delora", tmp_path / "run", tmp_path / "data", launcher="python")
    assert Path(cmd[1]).name == "semantic_map.py" and Path(cmd[1]).is_file()
    text = " ".join(cmd)
    for flag in ("--method delora", "--rank 4", "--max_train_steps 5", "--checkpointing_steps 2", "--seed 3",
                 f"--train_data_dir {tmp_path / 'data'}", "--delora_lambda 12.0", "--resolution 32",
                 "--num_inference_steps 2", "--num_validation_maps 1"):
        assert flag in text
    assert "--instance_data_dir" not in text and "--pretrained_model_name_or_path" not in text
    embedded = commands.semantic_train_command(form, "lora", tmp_path / "run", None, launcher="python")
    assert "--train_data_dir" not in embedded and "--delora_lambda" not in embedded


def test_start_semantic_trains_on_uploaded_pairs_end_to_end(tmp_path):
    images, maps = pairs(tmp_path / "up")
    runs = tmp_path / "runs"
    p = {**FAST, "steps": 1}                     # one step, one checkpoint: the wiring, not the training
    with running_app(runs, launcher="python") as (url, _):
        client = Client(url, verbose=False)
        bad = client.predict([handle_file(images[0])], [], False, ["lora"], "cat", "sks", p["rank"], "", p["steps"],
                             p["checkpoint_every"], 15, "tiny", 0, p["resolution"], p["sample_steps"],
                             p["num_samples"], api_name="/start_semantic")
        assert "has no label map" in bad[1] and not any(runs.iterdir())
        job = client.submit([handle_file(f) for f in images], [handle_file(f) for f in maps], False, ["lora"],
                            "cat", "sks", p["rank"], "", p["steps"], p["checkpoint_every"], 15, "tiny", 0,
                            p["resolution"], p["sample_steps"], p["num_samples"], api_name="/start_semantic")
        while not job.done():
            time.sleep(0.2)
        bar, status, _, _, batch = job.outputs()[-1]
    assert 'data-state="done"' in bar, status
    assert [(b["method"], b["status"], b["step"]) for b in batch] == [("lora", "finished", 1)]
    run = runs / batch[0]["name"]
    assert sorted(p.name for p in (run / "seg_data/annotations/training").iterdir()) == ["scene_0.png",
                                                                                         "scene_1.png"]
    assert R.is_adapter_dir(run) and [s for s, _ in R.checkpoints(run)] == [1]
    assert (run / "conditioning_encoder.safetensors").is_file()            # the encoder beside the adapter
    assert (run / "checkpoint-1" / "conditioning_encoder.safetensors").is_file()
    assert R.read_json(run / R.APP_JSON)["task"] == "semantic_map"
    assert not list(runs.glob(".staging-*"))
