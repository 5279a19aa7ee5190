"""eval.robustness --launcher ray on a real local Ray cluster (2 CPUs, started once for the module in this
process; the command uses that connection): a tiny GLUE study (random tiny-bert, 16 tweets, 4 steps) gives the
same results and adapter bits as the local launcher; a run whose Ray worker is SIGKILLed after its first
checkpoint is retried, resumes from it and ends bit-identical; the checks before any run are one error line; the
ablation of a study with the stand-in trainer gives the local launcher's rows."""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval import robustness
from eval.robustness_progress import read_progress
from ground.runfolder import ADAPTER_WEIGHTS, RUN_JSON, is_complete_checkpoint
from tests.test_eval_robustness import calls_of, fake  # noqa: F401
from tests.test_eval_robustness import study as robustness_study
from training.common import faults

ray = pytest.importorskip("ray")

STUDY = ["--task", "glue", "--task_name", "tweet_polarity", "--model_name_or_path", "tiny-bert", "--studies", "lr",
         "--num_train_epochs", "1", "--checkpointing_steps", "2", "--max_train_samples", "16", "--max_eval_samples",
         "8", "--train_batch_size", "4", "--num_threads", "1"]
FOUR_RUNS = ["--methods", "lora,delora", "--lr_factors", "1,2"]
VICTIM = "delora-lr0.002-e1-s0"   # 16 examples in batches of 4: steps 1-4, checkpoints 2 and 4


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    """The baseline: the same study trained by the local launcher, two runs at a time."""
    out = tmp_path_factory.mktemp("local") / "study"
    assert robustness.cli([*STUDY, *FOUR_RUNS, "--jobs", "2", "--output_dir", str(out)]) == 0
    return out


def rows(study: Path) -> dict[str, dict]:
    with open(study / "results.csv") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def same_bits(a: Path, b: Path) -> None:
    x, y = load_file(str(a / ADAPTER_WEIGHTS)), load_file(str(b / ADAPTER_WEIGHTS))
    assert x.keys() == y.keys() and x
    assert all(torch.equal(x[k], y[k]) for k in x), a.name


def attempts(study: Path, run: str) -> list[dict]:
    path = study / "runs" / f"{run}.attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_ray_study_equals_the_local_one_and_reuses_finished_runs(tmp_path, cluster, local_study, capsys):
    out = tmp_path / "study"
    assert robustness.cli([*STUDY, *FOUR_RUNS, "--launcher", "ray", "--output_dir", str(out)]) == 0
    assert "done 4, running 0, failed 0" in capsys.readouterr().err
    local, remote = rows(local_study), rows(out)
    assert len(remote) == 4 and remote.keys() == local.keys()
    for run, r in remote.items():
        assert r["status"] == "trained"
        same_bits(local_study / "runs" / run, out / "runs" / run)
        for column in ("accuracy", "f1", "tune_score", "distance", "bound", "step", "lr"):
            assert r[column] == local[run][column], (run, column)
        assert [a["attempt"] for a in attempts(out, run) if "worker_pid" in a] == [1]
    machine = json.loads((out / "machine.json").read_text())
    assert machine["launcher"] == "ray" and machine["ray"]["cpus"] == 2 and machine["ray"]["cpus_per_run"] == 1
    assert "a Ray cluster of 1 node(s)" in (out / "report.md").read_text()
    progress = read_progress(out)   # what the app's Robustness tab followed while it ran
    assert progress["finished"] and progress["launcher"] == "ray"
    assert progress["counts"] == {"queued": 0, "running": 0, "trained": 4, "reused": 0, "failed": 0}

    # again: every run is finished, nothing is trained or started as a Ray task
    assert robustness.cli([*STUDY, *FOUR_RUNS, "--launcher", "ray", "--output_dir", str(out)]) == 0
    assert {r["status"] for r in rows(out).values()} == {"reused"}
    assert read_progress(out)["counts"]["reused"] == 4
    assert all(len(attempts(out, run)) == 2 for run in remote)


def kill_worker_after_first_checkpoint(run_dir: Path, study: Path, seen: dict) -> None:
    """Wait for checkpoint-2 (the trainer then hangs there), SIGKILL the Ray worker running the trainer and
    record whether the trainer died with it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        started = [a for a in attempts(study, run_dir.name) if "trainer_pid" in a]
        if started and is_complete_checkpoint(run_dir / "checkpoint-2"):
            break
        time.sleep(0.1)
    else:
        seen["error"] = "checkpoint-2 never appeared"
        return
    worker_pid = next(a["worker_pid"] for a in attempts(study, run_dir.name) if "worker_pid" in a)
    seen["trainer_pid"], seen["worker_pid"] = started[0]["trainer_pid"], worker_pid
    os.kill(worker_pid, signal.SIGKILL)
    seen["trainer_died"] = False
    for _ in range(100):
        stat = Path(f"/proc/{seen['trainer_pid']}/stat")
        if not stat.is_file() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            seen["trainer_died"] = True
            return
        time.sleep(0.1)
    os.kill(seen["trainer_pid"], signal.SIGKILL)   # left behind: the assertion below fails, nothing leaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the trainer dies with its worker via prctl")
def test_a_killed_worker_is_retried_and_resumes_bit_identical(tmp_path, cluster, local_study, monkeypatch):
    out = tmp_path / "study"
    # the trainer stops for good right after checkpoint-2 is in place; the retry resumes past step 2
    monkeypatch.setenv(faults.ENV, "checkpoint-renamed:hang")
    monkeypatch.setenv(faults.ENV_STEP, "2")
    seen: dict = {}
    watcher = threading.Thread(target=kill_worker_after_first_checkpoint, args=(out / "runs" / VICTIM, out, seen))
    watcher.start()
    try:
        code = robustness.cli([*STUDY, "--methods", "delora", "--lr_factors", "1", "--launcher", "ray",
                               "--output_dir", str(out)])
    finally:
        watcher.join()
    assert "error" not in seen and code == 0
    assert seen["trainer_died"], "the trainer outlived its killed Ray worker"
    tries = [a for a in attempts(out, VICTIM) if "worker_pid" in a]
    assert [a["attempt"] for a in tries] == [1, 2] and tries[1]["worker_pid"] != seen["worker_pid"]
    run = out / "runs" / VICTIM
    log = (out / "runs" / f"{VICTIM}.log").read_text()
    assert "--- attempt 2" in log and "resumed from" in log and "checkpoint-2 at step 2" in log
    assert json.loads((run / RUN_JSON).read_text())["resumed_from"].endswith("checkpoint-2")
    same_bits(local_study / "runs" / VICTIM, run)
    same_bits(local_study / "runs" / VICTIM / "checkpoint-4", run / "checkpoint-4")
    r, baseline = rows(out)[VICTIM], rows(local_study)[VICTIM]
    assert r["status"] == "trained" and r["distance"] == baseline["distance"] and r["accuracy"] == baseline["accuracy"]


def test_checks_before_any_run_are_one_error_line(tmp_path, cluster, monkeypatch, capsys):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    cases = [
        (["--launcher", "ray", "--ray_address", "127.0.0.1:1"], tmp_path / "o1", "no Ray cluster answers"),
        (["--launcher", "ray"], not_a_folder / "study", "storage every node sees"),
        (["--cpus_per_run", "2"], tmp_path / "o2", "only with --launcher ray"),
        (["--launcher", "ray", "--jobs", "2"], tmp_path / "o3", "--jobs is the local launcher's"),
    ]
    for argv, out, says in cases:
        assert robustness.cli([*STUDY, *argv, "--output_dir", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], (argv, err)
        assert not out.exists()
    monkeypatch.setitem(sys.modules, "ray", None)   # as if Ray were not installed
    out = tmp_path / "o4"
    assert robustness.cli([*STUDY, "--launcher", "ray", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs Ray, which is not installed" in err[0] and not out.exists()


def test_a_run_that_fails_on_its_own_is_reported_not_retried(tmp_path, cluster):
    out = tmp_path / "study"
    assert robustness.cli([*STUDY, "--methods", "lora", "--lr_factors", "1", "--launcher", "ray", "--rank", "0",
                           "--output_dir", str(out)]) == 1
    (row,) = rows(out).values()
    assert row["status"] == "failed" and row["error"].startswith("exit 2: error: rank must be")
    assert [a["attempt"] for a in attempts(out, row["run"]) if "worker_pid" in a] == [1]


def test_the_ablation_of_a_dreambooth_style_study_under_ray_equals_the_local_one(tmp_path, cluster, fake):
    """--ablation (Table 1's rows on top of the sweep, the prolonged runs and the norms) with the stand-in trainer
    of tests/test_eval_robustness.py: the same rows, distances, bounds and error lines as the local launcher; the
    runs it refuses are failed rows, each started once."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert robustness_study(local, "--ablation") == 1
    local_calls = len(calls_of(fake))
    assert robustness_study(remote, "--ablation", "--launcher", "ray") == 1
    assert len(calls_of(fake)) == 2 * local_calls   # each run started once: nothing retried
    def table(study: Path) -> dict[tuple, dict]:   # a run shared by two studies is a row of each
        with open(study / "results.csv") as f:
            return {(r["study"], r["label"], r["run"]): r for r in csv.DictReader(f)}

    a, b = table(local), table(remote)
    assert a.keys() == b.keys() and {study for study, _, _ in b} >= {"lr", "long", "ablation"}
    for key, r in b.items():
        for column in ("status", "distance", "bound", "step", "lr", "method", "error"):
            assert r[column] == a[key][column].replace(str(local), str(remote)), (key, column)
    failed = [r for r in b.values() if r["status"] == "failed"]
    # the stand-in refuses dora, and its parser V8's --etherplus_one_sided (the errors equal the local ones, above)
    assert {r["method"] for r in failed} == {"dora", "etherplus"}
    assert read_progress(remote)["counts"]["failed"] == len({r["run"] for r in failed})
