"""app/runs.py: the run registry read back from files (status, dead processes, logs, metrics)."""
import json
import os
import subprocess
import sys

import pytest

from app import runs as R


def make_run(root, name="20250101-000000-lora-r4", **app):
    d = root / name
    d.mkdir(parents=True)
    R.write_json(d / R.APP_JSON, {"method": "lora", "rank": 4, "max_train_steps": 3, "created": 1.0, **app})
    return d


def finished_process():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_adapter(d):
    d.mkdir(parents=True, exist_ok=True)
    for f in R.ADAPTER_FILES:
        (d / f).write_text("{}")


def test_status_follows_the_files(tmp_path):
    d = make_run(tmp_path, owner=R.owner_record())
    assert R.status(d) == ("queued", "")                      # its owner (this process) is alive

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        R.write_pid(d, sleeper.pid)
        assert R.status(d)[0] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    st, detail = R.status(d)                                  # pid gone, no exit code: died
    assert st == "failed" and "died" in detail

    R.write_exit(d, 0)
    assert R.status(d) == ("finished", "")
    R.write_exit(d, 2)
    assert R.status(d)[0] == "failed"
    R.write_exit(d, -15, cancelled=True)
    assert R.status(d)[0] == "cancelled"


def test_dead_process_shows_failed_with_last_log_lines(tmp_path):
    d = make_run(tmp_path, owner=R.owner_record())
    R.write_pid(d, finished_process())
    (d / R.LOG_FILE).write_text("loading\nSteps: 10%|#\rSteps: 20%|##\nerror: out of memory at step 2\n")
    ri = R.info(d)
    assert ri.status == "failed"
    assert ri.log_tail[-1] == "error: out of memory at step 2"
    assert ri.log_tail[-2] == "Steps: 20%|##"                 # tqdm redraw collapsed to its last state


def test_failed_run_detail_names_the_error_line(tmp_path):
    d = make_run(tmp_path)
    R.write_pid(d, finished_process())
    R.write_exit(d, 2)
    (d / R.LOG_FILE).write_text("\x1b[31merror: --instance_data_dir x is empty\x1b[0m\n")
    ri = R.info(d)
    assert ri.status == "failed" and "error: --instance_data_dir x is empty" in ri.detail


def test_recycled_pid_is_not_our_process(tmp_path):
    d = make_run(tmp_path)
    import os
    R.write_json(d / R.PID_FILE, {"pid": os.getpid(), "start": (R.process_start(os.getpid()) or 0) + 12345})
    assert R.status(d)[0] == "failed"


def test_dead_process_with_final_adapter_counts_as_finished(tmp_path):
    d = make_run(tmp_path)
    R.write_pid(d, finished_process())
    write_adapter(d)
    assert R.status(d)[0] == "finished"


def test_queued_by_a_stopped_app_is_failed(tmp_path):
    d = make_run(tmp_path, owner={"pid": finished_process(), "start": 1})
    st, detail = R.status(d)
    assert st == "failed" and "never started" in detail


def test_cli_run_without_app_files(tmp_path):
    d = tmp_path / "cli-run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"args": {"method": "dora", "rank": 8}, "learning_rate": 6e-4,
                                            "max_train_steps": 5}))
    assert R.info(d).status == "incomplete"
    write_adapter(d)
    ri = R.info(d)
    assert (ri.status, ri.method, ri.rank, ri.learning_rate, ri.total_steps) == ("finished", "dora", 8, 6e-4, 5)

    # a run given neither --method nor --rank: the trainer's resolved adapter config names them
    (d / "run.json").write_text(json.dumps({"args": {"method": None, "rank": None},
                                            "adapter_config": {"method": "delora", "rank": 8}}))
    ri = R.info(d)
    assert (ri.method, ri.rank) == ("delora", 8)


def test_metrics_are_read_incrementally_and_a_torn_line_waits(tmp_path):
    d = make_run(tmp_path)
    path = d / "metrics.jsonl"
    def row(s):
        return {"step": s, "loss": 1.0 / s, "distance_fig3": 0.1 * s, "distance/x.to_q": 9.0}

    path.write_text(json.dumps(row(1)) + "\n" + json.dumps(row(2))[:10])
    rows = R.read_metrics(d)
    assert [r["step"] for r in rows] == [1] and "distance/x.to_q" not in rows[0]
    with open(path, "w") as f:
        f.write(json.dumps(row(1)) + "\n" + json.dumps(row(2)) + "\n" + json.dumps(row(3)) + "\n")
    assert [r["step"] for r in R.read_metrics(d)] == [1, 2, 3]
    assert R.info(d).step == 3 and R.info(d).loss == pytest.approx(1 / 3)


def test_checkpoints_and_samples(tmp_path):
    d = make_run(tmp_path)
    for step in (2, 10):
        write_adapter(d / f"checkpoint-{step}")
        (d / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        (d / f"checkpoint-{step}" / "samples").mkdir()
        (d / f"checkpoint-{step}" / "samples" / "p00-s0.png").write_bytes(b"png")
        (d / f"checkpoint-{step}" / "samples" / "prompts.jsonl").write_text(
            json.dumps({"image": "../../../etc/p00-s0.png", "prompt": "a photo of sks cat"}) + "\n")
    (d / "checkpoint-5.tmp").mkdir()                        # half-written: ignored
    (d / "checkpoint-7").mkdir()                            # no adapter: ignored
    assert [s for s, _ in R.checkpoints(d)] == [2, 10]
    (img, prompt), = R.samples(d / "checkpoint-10")
    assert img == d / "checkpoint-10" / "samples" / "p00-s0.png" and prompt == "a photo of sks cat"


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/etc", "", ".hidden", "x\\..\\y", "missing"])
def test_run_path_refuses_anything_but_an_existing_run_name(tmp_path, name):
    make_run(tmp_path / "runs")
    with pytest.raises(ValueError):
        R.run_path(tmp_path / "runs", name)


def test_run_path_accepts_names_and_labels(tmp_path):
    d = make_run(tmp_path)
    assert R.run_path(tmp_path, d.name) == d
    assert R.run_path(tmp_path, R.info(d).label) == d


def test_runs_persist_and_list_newest_first(tmp_path):
    a = make_run(tmp_path, "a-run", created=1.0)
    b = make_run(tmp_path, "b-run", created=2.0)
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    assert [r.name for r in R.list_runs(tmp_path)] == [b.name, a.name]


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    first = R.new_run_dir(tmp_path, "DeLoRA!", 4, stamp="s")
    second = R.new_run_dir(tmp_path, "delora", 4, stamp="s")
    assert (first.name, second.name) == ("s-delora-r4", "s-delora-r4-1")


def test_a_robustness_studys_runs_are_listed_grouped_by_study(tmp_path):
    """eval.robustness writes OUTPUT_DIR/runs/<run>/: under the app's runs folder they are runs named
    <study>/runs/<run>, after the folder's own runs, one study after another, each study's runs together."""
    from app.service import Service

    own = make_run(tmp_path, "own-run", created=5.0)
    for study, created in (("robustness-dreambooth", 3.0), ("robustness-glue", 4.0)):
        for run in ("lora-lr1", "delora-lr1"):
            d = tmp_path / study / "runs" / run
            d.mkdir(parents=True)
            (d / "run.json").write_text(json.dumps({"args": {"method": run.split("-")[0], "rank": 8}}))
            write_adapter(d)
            os.utime(d, (created, created))
        (tmp_path / study / "runs" / "lora-lr1.log").write_text("log")    # the study's log files: not runs
        (tmp_path / study / "report.md").write_text("# Robustness study")
    names = [r.name for r in R.list_runs(tmp_path)]
    assert names == [own.name, "robustness-glue/runs/delora-lr1", "robustness-glue/runs/lora-lr1",
                     "robustness-dreambooth/runs/delora-lr1", "robustness-dreambooth/runs/lora-lr1"]
    ri = R.find(tmp_path, "robustness-glue/runs/lora-lr1 [finished]")
    assert (ri.name, ri.study, ri.method, ri.rank, ri.status) == (
        "robustness-glue/runs/lora-lr1", "robustness-glue", "lora", 8, "finished")
    assert R.run_path(tmp_path, ri.name) == tmp_path / "robustness-glue" / "runs" / "lora-lr1"
    for bad in ("robustness-glue/lora-lr1", "robustness-glue/runs/..", "../robustness-glue/runs/lora-lr1",
                "robustness-glue/runs/lora-lr1/checkpoint-1", "robustness-glue/runs/x/../lora-lr1"):
        with pytest.raises(ValueError):
            R.run_path(tmp_path, bad)
    labels = dict((name, label) for label, name in Service(tmp_path).run_choices())
    assert labels["robustness-dreambooth/runs/delora-lr1"] == \
        "robustness-dreambooth ▸ delora r8 · delora-lr1 [finished]"
    # Compare and Generate take these names like any other
    infos = Service(tmp_path).run_infos(["robustness-dreambooth/runs/lora-lr1", own.name])
    assert [r.name for r in infos] == ["robustness-dreambooth/runs/lora-lr1", own.name]


def test_compare_and_generate_say_how_to_get_runs_only_when_there_are_none(tmp_path):
    from app.service import Service

    service = Service(tmp_path / "outputs")
    assert service.empty_state().startswith(f"No runs in {tmp_path / 'outputs'} yet")
    assert "--runs_dir" in service.empty_state() and "Train tab" in service.empty_state()
    make_run(tmp_path / "outputs", "a-run")
    assert service.empty_state() == "Choose runs above."


def test_a_multi_seed_runs_seeds_are_listed_as_one_group(tmp_path):
    """glue.py/instruct.py --seeds write OUTPUT_DIR/seed-N/ (one run each) and results_summary.json beside them:
    each seed is a run named <group>/seed-N, listed together after the folder's own runs."""
    from app.service import Service

    own = make_run(tmp_path, "own-run", created=5.0)
    group = tmp_path / "glue-sst2-delora"
    for seed in (43, 42):
        d = group / f"seed-{seed}"
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"args": {"method": "delora", "rank": 8, "seed": seed}}))
        write_adapter(d)
    (group / "results_summary.json").write_text("{}")
    (group / "seed-x").mkdir()                                  # not a seed folder: not listed
    (group / "seed-7").mkdir()                                  # a seed folder without a run in it: not listed
    names = [r.name for r in R.list_runs(tmp_path)]
    assert names == [own.name, "glue-sst2-delora/seed-42", "glue-sst2-delora/seed-43"]
    ri = R.find(tmp_path, "glue-sst2-delora/seed-42 [finished]")
    assert (ri.study, ri.method, ri.rank, ri.status) == ("glue-sst2-delora", "delora", 8, "finished")
    assert R.run_path(tmp_path, ri.name) == group / "seed-42"
    for bad in ("glue-sst2-delora/seed-x", "glue-sst2-delora/other", "glue-sst2-delora/seed-42/checkpoint-1",
                "glue-sst2-delora/x/seed-42", "../glue-sst2-delora/seed-42", "glue-sst2-delora/seed-42/.."):
        with pytest.raises(ValueError):
            R.run_path(tmp_path, bad)
    labels = dict((name, label) for label, name in Service(tmp_path).run_choices())
    assert labels["glue-sst2-delora/seed-43"] == "glue-sst2-delora ▸ delora r8 · seed-43 [finished]"
