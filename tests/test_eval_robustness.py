"""eval.robustness: the sweep driver against a stand-in trainer (a small script that writes a real run folder
with real lowrank adapters, records how it was called, and fails on demand), then one real DreamBooth run
through the whole study with tiny metric models."""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from eval import robustness, robustness_report
from eval.robustness_progress import STATES, read_progress
from eval.robustness_tasks import TASKS, StudyTask, score_glue
from training.common.tasks import TaskInfo

from .test_eval_support import tiny_models  # noqa: F401

FAKE_TRAINER = textwrap.dedent('''
    import argparse, json, os, sys
    from pathlib import Path
    import torch
    from torch import nn
    import lowrank
    from ground import runfolder

    p = argparse.ArgumentParser()
    for flag in ("--output_dir", "--method", "--learning_rate", "--max_train_steps", "--checkpointing_steps",
                 "--seed", "--lambda_learning_rate", "--resume_from_checkpoint", "--delora_norm", "--num_threads"):
        p.add_argument(flag)
    a = p.parse_args()
    with open(os.environ["LOWRANK_TEST_FAKE_CALLS"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if a.method == "dora":
        print("step 1 ...")
        print("error: the stand-in trainer refuses dora", file=sys.stderr)
        sys.exit(2)
    out, steps, every = Path(a.output_dir), int(a.max_train_steps), int(a.checkpointing_steps)
    lr = float(a.learning_rate)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Module()
    model.to_q = nn.Linear(6, 6)
    lowrank.inject(model, lowrank.AdapterConfig(method=a.method, rank=2, target_modules=["to_q"]))
    runfolder.write_json(out / "run.json", {"args": vars(a), "fig3_layer": "to_q"})
    rows = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for n, t in model.named_parameters():
                if t.requires_grad:
                    t.add_(lr)
        # as the trainers log it: the followed layer every step, every layer at checkpoints and the last step
        d = lowrank.weight_distance(model)["to_q"]
        full = step % every == 0 or step == steps
        rows.append({"step": step, "loss": 1.0, "distance_fig3": d, **({"distance/to_q": d} if full else {})})
        if step % every == 0:
            ck = out / f"checkpoint-{step}"
            lowrank.save_adapter(model, ck)
            (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    runfolder.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\\n" for r in rows))
    metric = 0.5 + lr + 0.01 * int(a.seed)
    runfolder.write_json(out / "results.json", {"train_info": {"metrics": [{"eval_accuracy": metric}]}})
    lowrank.save_adapter(model, out)
''')


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = nn.Linear(6, 6)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("LOWRANK_TEST_FAKE_CALLS", str(calls))   # LOWRANK_*: reaches Ray workers too
    task = TaskInfo("fake", "text", "a fake trainer", "--model_name_or_path", scorer=None, script=script)
    monkeypatch.setitem(TASKS, "fake", StudyTask(task, ("metric",), score_glue, lambda name: Base()))
    return calls


def calls_of(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def study(out, *extra):
    return robustness.cli(["--task", "fake", "--methods", "lora,delora,dora", "--lr_factors", "1",
                           "--max_train_steps", "4", "--checkpointing_steps", "2", "--long_steps", "4",
                           "--studies", "lr,long,norms", "--output_dir", str(out), *extra])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_finished_runs_are_reused_failed_runs_reported_and_bounds_measured(tmp_path, fake, monkeypatch):
    out = tmp_path / "study"
    drawn = []   # the prolonged runs' Fig. 3 curves, as drawn
    draw = robustness_report.long_figures
    monkeypatch.setattr(robustness_report, "long_figures", lambda rows, *a: drawn.extend(rows) or draw(rows, *a))
    assert study(out, "--ablation") == 1          # the report is written, and the exit status says runs failed
    # every step of the followed layer (distance_fig3 between the full rows at checkpoints 2 and 4)
    curves = {r["method"]: r["curve"] for r in drawn if r["study"] == "long" and r["status"] != "failed"}
    assert set(curves) == {"lora", "delora"}
    for method, curve in curves.items():
        logged = [json.loads(line) for line in (out / "runs" / next(
            r["run"] for r in drawn if r["study"] == "long" and r["method"] == method) / "metrics.jsonl").open()]
        assert curve == [(m["step"], m["distance_fig3"]) for m in logged] and len(curve) == 4
    first = calls_of(fake)
    # 3 methods (the long runs have the sweep's settings: the same folders, not trained twice) and the five
    # ablation rows that are not already among them (V1 = lora, V3 = delora), less V8, which the stand-in's
    # argument parser refuses before it records the call
    assert len(first) == 3 + 4
    rows = read_csv(out / "results.csv")
    failed = [r for r in rows if r["method"] == "dora"]
    assert failed and all(r["status"] == "failed" and "refuses dora" in r["error"] for r in failed)
    progress = read_progress(out)   # what the app's Robustness tab followed while it ran
    assert progress["finished"] and progress["launcher"] == "local" and progress["total"] == len(progress["runs"])
    states = {name: run["state"] for name, run in progress["runs"].items()}
    assert states == {r["run"]: r["status"] for r in rows}
    assert progress["counts"] == {s: list(states.values()).count(s) for s in STATES}
    assert all("refuses dora" in progress["runs"][r["run"]]["error"] for r in failed)
    report = (out / "report.md").read_text()
    assert "run(s) failed" in report and "error: the stand-in trainer refuses dora" in report
    for name in ("fig2_lr_sweep.png", "fig3_distance_over_steps.png", "fig4_weight_norms.png", "commands.txt"):
        assert (out / name).is_file(), name

    # the numbers are what the run folders hold: final distance, the task metric, DeLoRA's proven radius
    from lowrank import read_adapter

    for r in rows:
        if r["status"] == "failed":
            continue
        folder = out / "runs" / r["run"]
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        step = int(r["step"])
        assert float(r["distance"]) == pytest.approx(next(m for m in metrics if m["step"] == step)["distance/to_q"])
        assert float(r["metric"]) == pytest.approx(0.5 + float(r["lr"]) + 0.01 * int(r["seed"]))
        if r["method"] == "delora":
            ck = folder if step == 4 else folder / f"checkpoint-{step}"
            _, s = read_adapter(ck)
            radius = (s["to_q.delora_lambda"].abs() + s["to_q.delora_lambda0"].abs()).item() * \
                s["to_q.delora_w_norm"].max().item()
            assert float(r["bound"]) == pytest.approx(radius, rel=1e-6)
            assert float(r["distance"]) <= float(r["bound"])
        elif not r["method"].startswith("mult_"):
            assert r["bound"] == ""
    long_steps = sorted(int(r["step"]) for r in rows if r["study"] == "long" and r["method"] == "delora")
    assert long_steps == [2, 4]   # one row per checkpoint of the prolonged run

    # Table 1 in the paper's order, with parameter counts
    abl = [r for r in rows if r["study"] == "ablation"]
    assert [r["label"].split()[0] for r in abl] == ["V1", "V2", "V3", "V5", "V6", "V7", "V8"]
    # the stand-in only knows --delora_norm: the ETHER+ row (--etherplus_one_sided) fails, and says so
    assert abl[-1]["status"] == "failed" and "unrecognized arguments" in abl[-1]["error"]
    counts = {r["method"]: int(r["trainable_params"]) for r in abl if r["status"] != "failed"}
    # one 6x6 layer at rank 2: LoRA 2·2·6; DeLoRA + λ; V5 4·(r/2)·out + λ; V6 r·out + λ; V7 2·out + λ
    assert counts == {"lora": 24, "delora": 25, "mult_relaxed": 25, "mult_highrank": 13, "mult_bounded": 13}
    for r in abl:
        if r["method"].startswith("mult_"):   # |λ|·σ_max(W̄) of the base model's layer
            _, s = read_adapter(out / "runs" / r["run"])
            sigma = torch.linalg.matrix_norm(Base().to_q.weight.detach().double(), ord=2).item()
            assert float(r["bound"]) == pytest.approx(abs(s["to_q.mult_lambda"].item()) * sigma, rel=1e-6)
    assert "## Ablation (DeLoRA Table 1, paper order)" in report

    # again: the finished runs are reused (no new training), only the failed one is tried again
    assert study(out) == 1
    again = calls_of(fake)[len(first):]
    assert [c[c.index("--method") + 1] for c in again] == ["dora"]
    rows = read_csv(out / "results.csv")
    assert {r["status"] for r in rows if r["method"] != "dora"} == {"reused"}

    # an interrupted run (a checkpoint, no final adapter) resumes from it instead of starting over
    victim = out / "runs" / "lora-lr0.0006-n4-s0"
    for f in ("adapter.safetensors", "adapter_config.json"):
        (victim / f).unlink()
    assert study(out) == 1
    resumed = [c for c in calls_of(fake) if "lora" in c and "--resume_from_checkpoint" in c]
    assert len(resumed) == 1 and resumed[0][resumed[0].index("--resume_from_checkpoint") + 1] == "latest"


def test_figure_layer_from_the_first_row_that_names_the_layers(tmp_path):
    """A run.json without fig3_layer, metrics whose first rows have only the followed layer's distance_fig3
    (--distance_logging_steps): the layer comes from the first full-probe row."""
    (tmp_path / "run.json").write_text(json.dumps({"args": {}}))
    rows = [{"step": 1, "distance_fig3": 0.1}, {"step": 2, "distance_fig3": 0.2},
            {"step": 3, "distance_fig3": 0.3, "distance/blocks.0.to_q": 0.3, "distance/blocks.1.to_q": 0.5}]
    assert robustness_report.figure_layer(tmp_path, rows, None) == "blocks.0.to_q"
    assert robustness_report.figure_layer(tmp_path, rows, "blocks.1.to_q") == "blocks.1.to_q"
    assert robustness_report.figure_layer(tmp_path, rows[:2], None) is None
    (tmp_path / "run.json").write_text(json.dumps({"args": {}, "fig3_layer": "blocks.1.to_q"}))
    assert robustness_report.figure_layer(tmp_path, rows, None) == "blocks.1.to_q"


def test_bad_input_is_one_error_line(tmp_path, fake, monkeypatch, capsys):
    missing = TaskInfo("missing", "text", "no trainer", "--model_name_or_path", scorer=None,
                       script=tmp_path / "training" / "nope.py")
    monkeypatch.setitem(TASKS, "missing", StudyTask(missing, ("metric",), score_glue, lambda name: Base()))
    for argv in (["--task", "missing"], ["--methods", "lora,nope"], ["--lr_factors", "1,-2"],
                 ["--task", "fake", "--learning_rate", "1e-3"], ["--studies", "lr,figs"],
                 ["--task", "fake", "--methods", "lora", "--rank", "4", "8"], ["--seeds", "1", "1"],
                 ["--base_lrs", "lora:1e-3"], ["--jobs", "0"]):
        assert robustness.cli([*argv, "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert not (tmp_path / "o").exists()


def test_seeds_are_averaged_and_runs_go_side_by_side(tmp_path, fake):
    out = tmp_path / "seeds"
    assert robustness.cli(["--task", "fake", "--methods", "lora", "delora", "--lr_factors", "1", "2", "--seeds", "0",
                           "1", "2", "--max_train_steps", "2", "--checkpointing_steps", "2", "--studies", "lr",
                           "--jobs", "2", "--base_lrs", "lora=1e-3", "--output_dir", str(out)]) == 0
    calls = calls_of(fake)
    assert len(calls) == 2 * 2 * 3
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert all(c[c.index("--num_threads") + 1] == threads for c in calls)
    lora_rates = sorted({c[c.index("--learning_rate") + 1] for c in calls if "lora" in c})
    assert lora_rates == ["0.001", "0.002"]   # --base_lrs × factors
    rows, summary = read_csv(out / "results.csv"), read_csv(out / "summary.csv")
    assert len(rows) == 12 and len(summary) == 4 and {r["n"] for r in summary} == {"3"}
    for s in summary:
        per = [float(r["metric"]) for r in rows if (r["method"], r["factor"]) == (s["method"], s["factor"])]
        dist = [float(r["distance"]) for r in rows if (r["method"], r["factor"]) == (s["method"], s["factor"])]
        assert len(per) == 3
        assert float(s["metric"]) == pytest.approx(statistics.fmean(per))
        assert float(s["metric_std"]) == pytest.approx(0.01)        # the stand-in's seeds differ by 0.01
        assert float(s["distance"]) == pytest.approx(statistics.fmean(dist))
    report = (out / "report.md").read_text()
    assert "seeds 0 1 2" in report and " ± 1.0 |" in report   # the metric in percent, its ± to the same decimal
    # the robustness summary of the sweep: metric = 0.5 + lr + 0.01·seed, so lora means 0.511 (1×), 0.512 (2×):
    # area ((0.511 + 0.512) / 2) / 0.512 = 0.999, both within a point of the best
    assert "| lora | 51.2 (2×) | 51.1 (1×) | 0.999 | 1 (1×–2×) |" in report
    assert "| delora | 52.2 (2×) | 51.6 (1×) | 0.994 | 1 (1×–2×) |" in report
    assert [r["method"] for r in read_csv(out / "robustness_summary.csv")] == ["lora", "delora"]
    machine = json.loads((out / "machine.json").read_text())
    assert machine["runs_trained"] == 12 and machine["wall_time_s"] > 0

    # the report rewritten by a command that reuses every run keeps the record of the one that trained them
    assert robustness.cli(["--task", "fake", "--methods", "lora", "delora", "--lr_factors", "1", "2", "--seeds", "0",
                           "1", "2", "--max_train_steps", "2", "--checkpointing_steps", "2", "--studies", "lr",
                           "--jobs", "2", "--base_lrs", "lora=1e-3", "--output_dir", str(out)]) == 0
    assert len(calls_of(fake)) == 12
    again = json.loads((out / "machine.json").read_text())
    assert again["wall_time_s"] == machine["wall_time_s"] and again["report_rewritten_by_a_later_command"]


@pytest.mark.slow   # ~25 s on an idle 2-core machine: a real trainer and a real eval.subject subprocess
def test_real_dreambooth_study_end_to_end(tmp_path, tiny_models):  # noqa: F811
    """One real run of the embedded DreamBooth (2 steps, 32 px), scored by eval.subject with tiny metric
    models: the report shows the scores and says they mean nothing on the random tiny SD."""
    out = tmp_path / "db"
    assert robustness.cli(["--methods", "delora", "--lr_factors", "1", "--max_train_steps", "2",
                           "--checkpointing_steps", "2", "--long_steps", "2", "--studies", "lr,long,norms",
                           "--max_prompts", "1", "--images_per_prompt", "1", "--dino_model", str(tiny_models["dino"]),
                           "--clip_model", str(tiny_models["clip"]), "--output_dir", str(out), "--resolution", "32",
                           "--num_validation_images", "1", "--num_inference_steps", "1", "--rank", "4"]) == 0
    rows = read_csv(out / "results.csv")
    assert {r["status"] for r in rows} == {"trained"}, rows
    run = out / "runs" / rows[0]["run"]
    scored = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert float(rows[0]["dino"]) == pytest.approx(scored[-1]["dino"])
    # drift too, against the base model's images made once for the study (OUTPUT_DIR/drift-base)
    assert float(rows[0]["drift"]) == pytest.approx(scored[-1]["drift"])
    assert Path(scored[-1]["drift_base"]) == (out / "drift-base").resolve()
    assert (out / "drift-base" / "p01-s0.png").is_file()
    assert float(rows[0]["distance"]) <= float(rows[0]["bound"])
    report = (out / "report.md").read_text()
    assert "random weights" in report and "Weight norms (Fig. 4)" in report
    for name in ("fig2_lr_sweep.png", "fig3_distance_over_steps.png", "fig3_samples.png", "fig4_weight_norms.png"):
        assert (out / name).is_file(), name
    # the trainer's interpreter, written as it reads from the checkout's root when it lives inside it (.venv)
    python = sys.executable.replace(str(robustness_report.ROOT) + os.sep, "")
    assert python + " " in (out / "commands.txt").read_text()


def test_glue_study_on_real_tweets_offline(tmp_path):
    """The GLUE study end to end on MiniLM (the 'minilm' preset loads offline: weight norms, the bound and the
    per-epoch curve of the prolonged run are in the report), tiny sizes."""
    out = tmp_path / "glue"
    assert robustness.cli(["--task", "glue", "--task_name", "tweet_polarity", "--methods", "delora",
                           "--lr_factors", "1", "--long_epochs", "2", "--num_train_epochs", "1", "--studies",
                           "lr", "long", "norms", "--output_dir", str(out), "--max_train_samples", "32",
                           "--max_eval_samples", "16", "--train_batch_size", "16", "--num_threads", "1"]) == 0
    rows = read_csv(out / "results.csv")
    assert {r["status"] for r in rows} == {"trained"}, rows
    sweep = next(r for r in rows if r["study"] == "lr")
    assert sweep["accuracy"] and sweep["f1"] and sweep["tune_score"]
    assert 0 < float(sweep["distance"]) <= float(sweep["bound"])
    assert sweep["lr"] == "0.002"    # the tweet tasks' tuned base rate, not the DreamBooth default
    long = [r for r in rows if r["study"] == "long"]
    assert [r["epoch"] for r in long if r["epoch"]] == ["1", "2"] and all(r["accuracy"] for r in long)
    report = (out / "report.md").read_text()
    assert "did not load" not in report and "Weight norms (Fig. 4)" in report
    for name in ("fig2_lr_sweep.png", "fig3_distance_over_steps.png", "fig4_weight_norms.png", "machine.json"):
        assert (out / name).is_file(), name


def test_the_report_states_the_checkpoint_interval_each_study_really_had(tmp_path, fake):
    """Sweep runs of 3 steps are told min(5, 3) = 3, the 10-step long runs 5: the report says both, per study,
    as the runs recorded them (run.json), not the flag's default or one number for all."""
    out = tmp_path / "study"
    assert robustness.cli(["--task", "fake", "--methods", "lora", "--lr_factors", "1", "--max_train_steps", "3",
                           "--checkpointing_steps", "5", "--long_steps", "10", "--studies", "lr,long",
                           "--output_dir", str(out)]) == 0
    recorded = {p.parent.name: json.loads((p).read_text())["args"]["checkpointing_steps"]
                for p in (out / "runs").glob("*/run.json")}
    assert sorted(recorded.values()) == ["3", "5"]
    assert "checkpoints every 3 steps (lr), 5 steps (long);" in (out / "report.md").read_text()
