"""What the model-family test modules (test_sdxl, test_flux, test_flux2_klein) share: one intra-op thread per
module, and the check that a run killed after a checkpoint and resumed ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ground import runfolder
from tests.test_dreambooth import metrics
from tests.test_training_faults import same_adapter
from training.common import faults


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the module (conftest's count restored after it): a tiny model's kernels gain nothing
    from a second thread on a shared 2-core machine, and the in-process trainer keeps the count, so resume stays
    bit-identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check_resume_after_a_kill(train, tmp_path, monkeypatch, *extra: str) -> None:
    """As tests/test_dreambooth_resume.py's SIGKILL test for SD, in-process: the `abort` fault
    (training/common/faults.py) stops the run right after step 2 and its checkpoint with the files as a kill leaves
    them; --resume_from_checkpoint latest then finishes the 4 steps. Adapters (final and checkpoint-4), the losses
    and distances of every step (the validation losses too, with `extra` flags that log them) and the diffusers
    file equal the uninterrupted run's, tensor by tensor."""
    args = ["--method", "delora", "--max_train_steps", "4", "--checkpointing_steps", "2", "--skip_final_samples",
            *extra]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(straight, *args) == 0

    faults.reset()
    monkeypatch.setenv(faults.ENV, "step:abort")
    monkeypatch.setenv(faults.ENV_STEP, "2")
    try:
        with pytest.raises(faults.Abort):
            train(killed, *args)
    finally:
        monkeypatch.delenv(faults.ENV)
        monkeypatch.delenv(faults.ENV_STEP)
        faults.reset()
    assert [s for s, _ in runfolder.list_checkpoints(killed)] == [2]
    assert not (killed / runfolder.ADAPTER_WEIGHTS).exists()

    assert train(killed, *args, "--resume_from_checkpoint", "latest") == 0
    assert json.loads((killed / runfolder.RUN_JSON).read_text())["resumed_from"].endswith("checkpoint-2")
    same_adapter(straight, killed)
    same_adapter(straight / "checkpoint-4", killed / "checkpoint-4")
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss"], r["distance_fig3"], r.get("val_loss")) for r in a] == \
        [(r["loss"], r["distance_fig3"], r.get("val_loss")) for r in b]
    x, y = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (straight, killed))
    assert x.keys() == y.keys() and len(x) > 0 and all(torch.equal(x[k], y[k]) for k in x)
