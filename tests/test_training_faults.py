"""Faults during training, injected at exact points (training/common/faults.py), never by chance timing:

- a death at each phase of a checkpoint write (before, between, after the files; after the rename), then
  --resume_from_checkpoint latest: the final adapter is bit-identical to an uninterrupted run's. In-process
  (`abort`: the files as a kill leaves them) in the suite, a real SIGKILL of a trainer at each phase in the
  slow test;
- one of two DDP processes dying: the other stops at once with one `error:` line (slow);
- a full disk (ENOSPC) while writing a checkpoint or the final adapter: one `error:` line, exit 1, the
  previous checkpoint intact, and resuming from it ends identical to the uninterrupted run;
- SIGTERM: a checkpoint at the current step and a `stopped:` line saying how to resume, exit 143;
- RUN/exit_status.json holds the trainer's own code and line in every case.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ground import runfolder
from training import dreambooth
from training.common import faults

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--method", "delora", "--rank", "4", "--seed", "0", "--resolution", "32", "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--num_inference_steps", "1", "--num_validation_images", "1",
        "--report_to", "none", "--num_threads", "2"]
RESUME = ["--resume_from_checkpoint", "latest"]
PHASES = ["checkpoint-before", "checkpoint-between", "checkpoint-after", "checkpoint-renamed"]




@pytest.fixture(scope="module")
def straight(tiny_cache, tmp_path_factory):
    """The uninterrupted run every faulty one must end equal to."""
    out = tmp_path_factory.mktemp("straight")
    assert dreambooth.main(["--output_dir", str(out), *ARGS]) == 0
    return out


def train(out, *extra, fault=None, step=None, monkeypatch=None):
    """dreambooth.main in this process, with LOWRANK_FAULT set to `fault` (at global step `step`)."""
    faults.reset()
    if fault:
        monkeypatch.setenv(faults.ENV, fault)
        monkeypatch.setenv(faults.ENV_STEP, str(step))
    else:
        monkeypatch.delenv(faults.ENV, raising=False)
        monkeypatch.delenv(faults.ENV_STEP, raising=False)
    try:
        return dreambooth.main(["--output_dir", str(out), *ARGS, *extra])
    finally:
        monkeypatch.delenv(faults.ENV, raising=False)
        monkeypatch.delenv(faults.ENV_STEP, raising=False)
        faults.reset()


def same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(str(a / runfolder.ADAPTER_WEIGHTS)), load_file(str(b / runfolder.ADAPTER_WEIGHTS))
    assert x.keys() == y.keys() and len(x) > 0
    for key in x:
        assert torch.equal(x[key], y[key]), key


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file but the adapter weights (compared as tensors)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != runfolder.ADAPTER_WEIGHTS}


def status(out: Path) -> dict:
    return json.loads((out / runfolder.EXIT_STATUS).read_text())


def test_a_death_at_every_phase_of_a_checkpoint_write_then_resume_equals_the_uninterrupted_run(
        straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # a death in this process at each phase in turn while writing checkpoint-4 (the files as a SIGKILL leaves
    # them; the slow test below kills a real process at each phase)
    for phase in PHASES:
        with pytest.raises(faults.Abort):
            train(out, *RESUME, fault=f"{phase}:abort", step=4, monkeypatch=monkeypatch)
        tmp = out / "checkpoint-4.tmp"
        if phase == "checkpoint-before":
            assert tmp.is_dir() and not any(tmp.iterdir())
        elif phase == "checkpoint-between":                     # half written: adapter, no trainer state
            assert (tmp / runfolder.ADAPTER_WEIGHTS).is_file() and not (tmp / runfolder.TRAINER_STATE).exists()
        elif phase == "checkpoint-after":                       # every file written, not yet renamed
            assert (tmp / runfolder.TRAINER_STATE).is_file()
        if phase != "checkpoint-renamed":
            assert [s for s, _ in runfolder.list_checkpoints(out)] == [2]
            assert not (out / runfolder.EXIT_STATUS).exists()   # a death leaves no word
    # the last death came after checkpoint-4 was renamed into place, before the final adapter
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2, 4]
    assert not (out / runfolder.ADAPTER_WEIGHTS).exists()
    assert train(out, *RESUME, monkeypatch=monkeypatch) == 0   # resumes at the last step: only the final save
    same_adapter(straight, out)
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))
    assert [r["step"] for r in runfolder.read_metrics(out)] == [1, 2, 3, 4]
    assert status(out) == {"code": 0, "message": "done"}


def test_a_full_disk_in_a_checkpoint_and_in_the_final_adapter_keeps_the_last_checkpoint(
        straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(out, fault="checkpoint-between:enospc", step=4, monkeypatch=monkeypatch) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "No space left on device" in err[-1]
    assert "checkpoint-2; free space, then continue with --resume_from_checkpoint latest" in err[-1]
    assert not [line for line in err if "Traceback" in line]
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2]
    assert not list(out.glob("*.tmp"))                          # the partial checkpoint's space is given back
    same_adapter(straight / "checkpoint-2", out / "checkpoint-2")   # safetensors' metadata order varies: tensors
    assert digest(out / "checkpoint-2") == digest(straight / "checkpoint-2")
    assert status(out) == {"code": 1, "message": err[-1]}

    assert train(out, *RESUME, fault="final:enospc", step=4, monkeypatch=monkeypatch) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "adapter.safetensors" in err[-1] and "checkpoint-4" in err[-1]
    assert not (out / runfolder.ADAPTER_WEIGHTS).exists()
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2, 4]

    assert train(out, *RESUME, monkeypatch=monkeypatch) == 0
    same_adapter(straight, out)
    same_adapter(straight / "checkpoint-4", out / "checkpoint-4")


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_says_how_to_resume(
        straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(out, fault="step:term", step=3, monkeypatch=monkeypatch) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"stopped: SIGTERM at step 3 of 4; checkpoint-3 is saved in {out}; continue with the same "
                       f"command and --resume_from_checkpoint latest")
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2, 3]
    assert not (out / "checkpoint-3" / runfolder.SAMPLES).exists()   # no sampling in the grace period
    assert status(out) == {"code": 143, "message": err[-1]}
    assert [r["step"] for r in runfolder.read_metrics(out)] == [1, 2, 3]

    assert train(out, *RESUME, monkeypatch=monkeypatch) == 0
    same_adapter(straight, out)
    assert status(out)["code"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_a_real_sigkill_at_each_phase_then_resume_equals_the_uninterrupted_run(straight, tmp_path, phase):
    """python -m pytest tests/test_training_faults.py -m slow  (about 25 s a phase on 2 CPU cores)"""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "training" / "dreambooth.py"), "--output_dir", str(out), *ARGS]
    env = {**os.environ, faults.ENV: f"{phase}:kill", faults.ENV_STEP: "4"}
    killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    expected = [2, 4] if phase == "checkpoint-renamed" else [2]
    assert [s for s, _ in runfolder.list_checkpoints(out)] == expected
    env.pop(faults.ENV)
    done = subprocess.run(cmd + RESUME, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / f'checkpoint-{expected[-1]}'}" in done.stderr
    same_adapter(straight, out)


@pytest.mark.slow
def test_one_ddp_worker_dying_stops_the_other_with_one_clear_line(tiny_cache, tmp_path):
    """python -m pytest tests/test_training_faults.py -m slow -k ddp  (2 CPU processes over gloo, ~30 s)"""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "training" / "dreambooth.py"), "--output_dir", str(out), *ARGS[:-2],
           "--checkpointing_steps", "1", "--ddp_timeout", "60"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", faults.ENV: "step:exit", faults.ENV_STEP: "2",
           faults.ENV_PROCESS: "1"}                                 # process 1 dies after step 2
    # the bound: the survivor must be done well within the timeout (a hang would be --ddp_timeout and more)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "another training process stopped" in lines[0], proc.stderr[-3000:]
    assert "continue with --resume_from_checkpoint latest" in lines[0]
    assert status(out) == {"code": 1, "message": lines[0]}
    assert runfolder.list_checkpoints(out)[-1][0] in (2, 3)         # the survivor saw the death at step 3's all-reduce
