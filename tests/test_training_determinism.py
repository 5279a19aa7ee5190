"""Reproducibility: on the CPU, one LoRA step of the mid-size UNet (bench/unet_step.py's MID_UNET) is
bit-identical for a fixed intra-op thread count, busy machine or not, and differs between thread counts
(torch splits matmul/convolution reductions per thread: another summation order). --deterministic fixes
the count (and turns on deterministic kernels), so two launches that differ only in OMP_NUM_THREADS give
the same adapter; the slow test shows it on the trainer:

    python -m pytest tests/test_training_determinism.py -m "slow or not slow"
"""
import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import lowrank
from bench.unet_step import MID_UNET
from training.common.runtime import make_deterministic

ROOT = Path(__file__).resolve().parent.parent
LR = 1e-3


@functools.cache
def base_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, **MID_UNET)


def one_step(threads: int, deterministic: bool = False) -> torch.Tensor:
    """The adapter's parameters after one AdamW step of the mid UNet at `threads` intra-op threads."""
    before = torch.get_num_threads()
    try:
        if deterministic:
            make_deterministic(threads)
        else:
            torch.set_num_threads(threads)
        unet = copy.deepcopy(base_unet())
        torch.manual_seed(0)
        lowrank.inject(unet, lowrank.AdapterConfig(method="lora", rank=4,
                                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:   # B starts at zero; non-zero values make every factor's gradient non-trivial
            p.data.normal_(0, 0.02)
        g = torch.Generator().manual_seed(1)
        x, emb = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 256, generator=g)
        opt = torch.optim.AdamW(params, lr=LR)
        unet(x, torch.tensor([500]), emb).sample.pow(2).mean().backward()
        opt.step()
        return torch.cat([p.detach().flatten() for p in params])
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(before)


def test_a_fixed_thread_count_is_bit_identical_and_another_count_is_not():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPU threads")
    two, again, one = one_step(2), one_step(2), one_step(1)
    assert torch.equal(two, again)
    diff = (two - one).abs().max().item()
    # Adam's first step moves a parameter by lr * g / (|g| + eps), at most lr either way: a reduction order
    # changes the result by more than 0 and by less than a full sign flip
    assert 0 < diff <= 2 * LR
    assert torch.equal(one_step(2, deterministic=True), two)   # deterministic kernels: same CPU arithmetic


@pytest.mark.slow
def test_deterministic_flag_makes_runs_identical_whatever_omp_num_threads(tmp_path):
    """Two trainer runs on the tiny preset that differ only in OMP_NUM_THREADS (1 vs 2)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPU threads")
    args = ["--method", "lora", "--rank", "4", "--seed", "0", "--resolution", "32", "--max_train_steps", "3",
            "--checkpointing_steps", "3", "--num_inference_steps", "1", "--num_validation_images", "1",
            "--report_to", "none"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOWRANK_CACHE=str(tmp_path / "cache"))
    outs = {}
    for threads in ("1", "2"):
        for det in (True, False):
            out = tmp_path / f"t{threads}-{det}"
            cmd = [sys.executable, str(ROOT / "training" / "dreambooth.py"), "--output_dir", str(out), *args]
            proc = subprocess.run(cmd + (["--deterministic"] if det else []), env=dict(env, OMP_NUM_THREADS=threads),
                                  cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-2000:]
            outs[threads, det] = load_file(str(out / "adapter.safetensors"))
    a, b = outs["1", True], outs["2", True]
    assert all(torch.equal(a[k], b[k]) for k in a)
