"""The trainer as users run it: `accelerate launch` subprocesses.

- every method, a few steps: the output files, checkpoints and logged distances;
- an uninterrupted run vs a run SIGKILLed after a checkpoint and resumed with
  --resume_from_checkpoint latest: the final adapters are bit-identical (CPU, fixed seed);
- two CPU processes (DDP over gloo): one set of outputs, per-process RNG state in checkpoints.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowrank

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
SCRIPT = str(ROOT / "training" / "dreambooth.py")
LAUNCH_1 = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]
ARGS = ["--method", "delora", "--rank", "4", "--seed", "0", "--resolution", "32", "--max_train_steps", "6",
        "--checkpointing_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "1",
        "--report_to", "none"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: offline, and the session's shared tiny-SD cache."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             LOWRANK_CACHE=str(tmp_path_factory.getbasetemp() / "lowrank-cache"))
    e.pop("ACCELERATE_USE_CPU", None)
    return e


# the mult_* ablation variants (DeLoRA Table 1 V5-V7) share one layer class (forward, save, merge, resume state):
# mult_relaxed, the widest, stands for the family in trainer runs; the core matrix covers each of them
TRAINER_METHODS = sorted(m for m in lowrank.METHODS if m not in ("mult_highrank", "mult_bounded"))


def run(cmd, env, timeout=300):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# every method trains through the trainer in-process (tests/test_dreambooth.py); the launch path does not depend
# on the method, so `accelerate launch` runs two of them in make test and all of them with -m slow
LAUNCH_METHODS = [m if m in ("lora", "delora") else pytest.param(m, marks=pytest.mark.slow) for m in TRAINER_METHODS]


@pytest.mark.parametrize("method", LAUNCH_METHODS)
def test_accelerate_launch_smoke_every_method(tmp_path, env, method):
    out = tmp_path / method
    args = ["--method", method, "--rank", "4", "--seed", "0", "--resolution", "32", "--max_train_steps", "2",
            "--checkpointing_steps", "1", "--num_inference_steps", "1", "--num_validation_images", "1",
            "--report_to", "none"]
    proc = run(LAUNCH_1 + [SCRIPT, "--output_dir", str(out), *args], env)
    assert f"done: 2 steps of {method}" in proc.stdout
    for name in ("adapter.safetensors", "adapter_config.json", "samples_grid.png", "samples/prompts.jsonl",
                 "run.json", "checkpoint-1/adapter.safetensors", "checkpoint-2/optimizer.bin",
                 "checkpoint-2/samples/prompts.jsonl", "pytorch_lora_weights.safetensors"):
        assert (out / name).is_file(), name
    # the diffusers file is the exact LoRA form of the final adapter (tests/test_export.py loads it in diffusers)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") for k in lora)
    assert json.loads((out / "adapter_config.json").read_text())["method"] == method
    n_layers = json.loads((out / "run.json").read_text())["adapted_layers"]
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:   # a checkpoint every step: every row is a full probe
        dists = [v for k, v in r.items() if k.startswith("distance/")]
        assert len(dists) == n_layers > 0 and all(d >= 0 for d in dists)
        assert r["distance_max"] == max(dists) > 0
    if method == "dyndora":
        assert (out / "live_ranks.json").is_file() and (out / "live_ranks.png").is_file()


def test_sigkill_then_resume_latest_equals_uninterrupted_run(tmp_path, env):
    """With --ema_decay: the moving average (ema/) ends bit-identical too."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = [*ARGS, "--ema_decay", "0.7"]
    proc = run(LAUNCH_1 + [SCRIPT, "--output_dir", str(straight), *args], env)
    assert f"Results in {straight}" in proc.stdout
    for name in ("adapter.safetensors", "adapter_config.json", "samples_grid.png", "run.json", "metrics.jsonl",
                 "samples/prompts.jsonl", "checkpoint-6/optimizer.bin", "checkpoint-2/adapter.safetensors"):
        assert (straight / name).is_file(), name

    # the same run, slowed down after each step so the kill lands mid-run, killed once checkpoint-2 exists
    victim = subprocess.Popen(LAUNCH_1 + [SCRIPT, "--output_dir", str(killed), *args, "--debug_step_delay", "0.5"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoint-2" / "trainer_state.json").exists():
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.time() < deadline, "checkpoint-2 never appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)   # the launcher and the training process it started
    victim.wait()
    assert not (killed / "adapter.safetensors").exists() and not (killed / "checkpoint-6").exists()

    assert not (killed / "ema").exists()
    proc = run(LAUNCH_1 + [SCRIPT, "--output_dir", str(killed), *args, "--resume_from_checkpoint", "latest"], env)
    assert "resumed from" in proc.stderr
    for folder in ("", "ema"):   # the adapter and its moving average
        a, b = (load_file(str(run_dir / folder / "adapter.safetensors")) for run_dir in (straight, killed))
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), (folder, key)
    ra, rb = rows(straight), rows(killed)
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]              # the killed run's extra rows were dropped
    for x, y in zip(ra, rb):
        assert x["loss"] == y["loss"] and x["distance_fig3"] == y["distance_fig3"]
        # every layer on the same steps (the checkpoints 2, 4, 6) with the same values, resumed or not
        dist = [k for k in x if k.startswith(("distance", "rel_distance"))]
        assert dist == [k for k in y if k.startswith(("distance", "rel_distance"))]
        assert [x[k] for k in dist] == [y[k] for k in dist]
    assert [r["step"] for r in rb if "distance_mean" in r] == [2, 4, 6]
    assert not list(killed.glob("*.tmp"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_ddp(tmp_path, env):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path / "ddp"
    # accelerate 1.15: `launch --cpu` runs one process (multi-CPU needs mpirun); torchrun through --multi_gpu
    # with ACCELERATE_USE_CPU=true gives DDP over gloo on CPU
    def cmd(port: int) -> list[str]:
        return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), SCRIPT,
                "--output_dir", str(out), *ARGS[:-8], "--max_train_steps", "3", "--checkpointing_steps", "2",
                "--num_inference_steps", "2", "--with_prior_preservation", "--num_class_images", "3",
                "--sample_batch_size", "1", "--report_to", "none", "--num_validation_images", "1"]

    ddp_env = dict(env, ACCELERATE_USE_CPU="true")
    proc = subprocess.run(cmd(free_port()), env=ddp_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "address already in use" in proc.stderr.lower():
        # the port free_port found was taken by another process before torchrun bound it: the machine's race, not
        # the trainer's; once more on a fresh port and a fresh folder (any other failure fails here)
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(cmd(free_port()), env=ddp_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1                              # main-process-only output
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["num_processes"] == 2
    names = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "adapter.safetensors", "optimizer.bin"} <= names
    assert sorted(p.name for p in (out / "class_images").iterdir()) == [f"class-0000{i}.png" for i in range(3)]
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert (out / "adapter.safetensors").is_file()


def test_bad_input_under_accelerate_launch_is_our_line_once_with_the_documented_setup(tmp_path, env):
    """README: `accelerate config default` once (no defaults note) and `accelerate launch -q` (accelerate's
    launcher re-raises any failure of the script as a CalledProcessError traceback unless -q): then bad input
    prints our one `error:` line and nothing else, and the finished-run rule still holds (no folder left)."""
    e = dict(env, HF_HOME=str(tmp_path / "hf"))   # accelerate's config lives under HF_HOME: a private one
    subprocess.run([ACCELERATE, "config", "default"], env=e, check=True, capture_output=True, timeout=120)
    out = tmp_path / "out"
    proc = subprocess.run([ACCELERATE, "launch", "-q", "--num_cpu_threads_per_process", "1", SCRIPT,
                           "--instance_data_dir", str(tmp_path / "nope"), "--output_dir", str(out)],
                          env=e, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert lines == [f"error: --instance_data_dir {tmp_path / 'nope'} does not exist"], proc.stderr
    assert not out.exists()
