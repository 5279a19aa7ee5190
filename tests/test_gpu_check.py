"""bench/gpu_check.py stays runnable: its CPU smoke mode end to end (SD and SDXL), and --device cuda without a GPU
fails loudly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "bench" / "gpu_check.py")


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_quick_cpu_run_writes_every_check(tmp_path, tiny_cache):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--quick", "--out", str(out)], env=env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failures"] == []
    rows = {(r["model"], r["dtype"], r["method"]): r for r in result["trainer"]}
    # SD (the tiny preset) and SDXL (tiny-sdxl: text_time conditioning, two encoders) through the same checks
    assert set(rows) == {(model, "bf16", m) for model in ("sd15", "sdxl") for m in ("lora", "delora")}
    for r in rows.values():
        assert r["exit_code"] == 0 and r["finite"] and r["steps_per_s"] > 0
        assert r["resume_equal"] and r["resume_max_abs_diff"] == 0.0
    for model in ("sd15", "sdxl"):   # each worker's first method, again with --cache_latents: the same bits
        cached = rows[model, "bf16", "lora"]
        assert cached["cache_equal"] and cached["cache_max_abs_diff"] == 0.0 and cached["cache_speedup"] > 0
        assert "cache_equal" not in rows[model, "bf16", "delora"]
    for key, unet in (("unet_step", "tiny-sd15"), ("unet_step_sdxl", "tiny-sdxl")):
        assert result[key]["unet"] == unet
        assert set(result[key]["vs_lora"]) == {"lora", "lora#2", "delora"}
        assert result[key]["vs_lora"]["lora"] == 1.0
    assert "UNet step (tiny-sdxl, 64 px, bf16)" in proc.stdout
    klein = result["dit_step_klein"]   # FLUX.2-klein's transformer (klein-mid here; klein-4b on a GPU)
    assert klein["model"] == "klein-mid" and set(klein["vs_lora"]) == {"lora", "lora#2", "delora"}
    assert klein["adapted_layers"] == 16 and "DiT step (klein-mid, 64 px, bf16)" in proc.stdout
    assert {"lora", "dora", "delora"} <= set(result["glue_step"])
    assert "steps/s" in proc.stdout and "GLUE step" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the cuda path would run for real")
def test_cuda_without_gpu_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "x.json")], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --device cuda")
    assert not (tmp_path / "x.json").exists()
