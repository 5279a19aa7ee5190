"""Model families at the trainer's door: SD-1.5 trains the adapter it trained before families existed (the bits of
a run written by the earlier code), a folder's model_index.json picks the family, and a bad folder is one `error:`
line with nothing written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.families import SD15, SDXL, default_resolution, family_of
from training.families.base import FamilyError

ROOT = Path(__file__).resolve().parent.parent
BEFORE = ROOT / "tests" / "fixtures" / "dreambooth-sd15-before-families"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_sd15_dreambooth_gives_the_adapter_bits_of_the_code_before_families(tmp_path):
    """The fixture's adapter was written by training/dreambooth.py before the task registry and the families
    (written_by.json: the commit and the flags: delora, prior preservation with generated class images, batch 2,
    --deterministic on one thread). The same flags now give the same tensors, bit for bit. On another CPU
    capability or torch version the float32 kernels may round differently, so there the check is 1e-5 relative
    (three AdamW steps of an fp32 adapter move by far less than that between two summation orders)."""
    meta = json.loads((BEFORE / "written_by.json").read_text())
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "dreambooth.py"), "--output_dir", str(out),
                           *meta["flags"]], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, now = load_file(BEFORE / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert before.keys() == now.keys() and len(now) > 0
    same_machine = (meta["cpu_capability"], meta["torch"]) == (torch.backends.cpu.get_cpu_capability(),
                                                               torch.__version__)
    for k in before:
        if same_machine:
            assert torch.equal(before[k], now[k]), k
        else:
            torch.testing.assert_close(now[k], before[k], rtol=1e-5, atol=1e-7)
    assert json.loads((out / "run.json").read_text())["family"] == "sd15"


def test_model_index_picks_the_family(tmp_path):
    sd, xl = SD15().preset_path(), SDXL().preset_path()
    assert family_of("tiny").name == family_of(None).name == family_of(str(sd)).name == "sd15"
    assert family_of("tiny-sdxl").name == family_of(str(xl)).name == "sdxl"
    copy = shutil.copytree(xl, tmp_path / "my-sdxl")   # a hub-layout folder elsewhere, as diffusers wrote it
    assert family_of(str(copy)).name == "sdxl"
    assert (default_resolution("tiny-sdxl"), default_resolution(str(copy)), default_resolution(str(sd))) == \
        (64, 1024, 512)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableCascadePipeline"}))
    with pytest.raises(FamilyError, match="StableCascadePipeline"):
        family_of(str(copy))


@pytest.mark.parametrize("damage, message", [
    ("text_encoder_2", "lacks text_encoder_2/"),
    ("model_index", "is a StableCascadePipeline"),
])
def test_a_bad_sdxl_folder_is_one_error_line_and_nothing_written(tmp_path, damage, message):
    folder = shutil.copytree(SDXL().preset_path(), tmp_path / "bad-sdxl")
    if damage == "text_encoder_2":
        shutil.rmtree(folder / "text_encoder_2")
    else:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableCascadePipeline"}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "dreambooth.py"), "--output_dir", str(out),
                           "--pretrained_model_name_or_path", str(folder), "--max_train_steps", "1"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_sdxl_trains_under_bf16_mixed_precision(tmp_path):
    """accelerate's bf16 autocast on the CPU (frozen weights in bf16, SDXL's VAE kept in fp32): the run finishes
    with finite losses and an fp32 adapter."""
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                           str(ROOT / "training" / "dreambooth.py"), "--pretrained_model_name_or_path", "tiny-sdxl",
                           "--method", "delora", "--rank", "2", "--max_train_steps", "2", "--resolution", "32",
                           "--output_dir", str(out), "--skip_final_samples", "--seed", "0", "--num_threads", "1"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["mixed_precision"] == "bf16" and run["family"] == "sdxl"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(map(np.isfinite, losses))
    assert all(t.dtype == torch.float32 for t in load_file(out / "adapter.safetensors").values())
