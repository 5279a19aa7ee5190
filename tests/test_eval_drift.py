"""Drift (eval/drift.py, peft's measure): the base model's and each checkpoint's images of unrelated prompts at the
same seeds and settings, (1 − mean DINO cosine) / 2. On the tiny SD preset and on tiny-flux2-klein (2 sampling steps,
32 px, 1-2 drift prompts, one image each) with the tiny random DINO/CLIP models: drift equals the arithmetic done
here on the saved images, an identity adapter has drift 0, a changed one drift > 0, the base images are made once
(per run, and once per study), and the reports (eval.report, the robustness summary, the app's Compare) show it."""
from __future__ import annotations

import json
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lowrank
from app import compare
from app import runs as R
from eval import drift, generate, plots, report, robustness_tables, robustness_tasks, subject
from eval.common import run_main
from eval.embed import DinoEmbedder
from ground.runfolder import read_jsonl
from training.families import denoiser_of, family_of, load_pipeline

from .stderr import one_error_line
from .test_eval_report import figures, make_run  # noqa: F401
from .test_eval_support import one_thread, tiny_models  # noqa: F401

pytestmark = pytest.mark.usefixtures("tiny_cache", "one_thread")


def test_drift_is_peft_definition_on_hand_made_embeddings():
    """(1 − mean cosine of matching rows) / 2: rows need not be unit length; the order of the pairs matters."""
    base = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    adapted = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])   # cosines 1, 0, -1: mean 0
    assert drift.drift_of(base, adapted) == 0.5
    assert drift.drift_of(base, base) == 0.0
    one = drift.drift_of(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))   # 45°: cosine 1/√2
    assert one == pytest.approx((1 - 0.5 ** 0.5) / 2)
    with pytest.raises(ValueError):
        drift.drift_of(base, adapted[:2])


def write_run(folder: Path, preset: str, seed: int, targets: list[str], guidance: float = 7.5) -> Path:
    """A run folder as the trainer leaves it: checkpoint-1 the fresh LoRA (B = 0: the base model exactly),
    checkpoint-2 random factors (a changed model)."""
    pipe = load_pipeline(preset)
    denoiser = denoiser_of(pipe)
    torch.manual_seed(seed)
    lowrank.inject(denoiser, lowrank.AdapterConfig(method="lora", rank=2, target_modules=targets))
    for step in (1, 2):
        if step == 2:
            with torch.no_grad():
                for p in denoiser.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.5)
        lowrank.save_adapter(denoiser, folder / f"checkpoint-{step}")
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "run.json").write_text(json.dumps({
        "args": {"pretrained_model_name_or_path": preset, "instance_data_dir": None, "resolution": 32,
                 "instance_prompt": "a photo of sks cat", "class_prompt": "a photo of cat", "num_inference_steps": 2,
                 "guidance_scale": guidance, "method": "lora", "learning_rate": None},
        "learning_rate": 6e-4, "adapter_config": {"method": "lora", "rank": 2}, "max_train_steps": 2}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    return folder


@pytest.fixture(scope="module")
def sd_runs(tmp_path_factory, tiny_cache):
    """Two runs of the tiny SD preset (different adapters, one base model), copied fresh by each test."""
    root = tmp_path_factory.mktemp("drift-runs")
    return [write_run(root / f"run-{s}", "tiny", s, ["to_q", "to_v"]) for s in (0, 1)]


def fresh(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def cli(tiny_models, run, *extra):  # noqa: F811
    return ["--run_dir", str(run), "--dino_model", str(tiny_models["dino"]), "--clip_model", str(tiny_models["clip"]),
            "--device", "cpu", "--max_prompts", "1", "--images_per_prompt", "1", *extra]


@pytest.fixture
def made(monkeypatch):
    """The folders generate_images writes, in order (the real function still runs)."""
    calls = []
    real = generate.generate_images

    def counting(pipe, adapter_dir, prompts, out_dir, **kw):
        calls.append(Path(out_dir).name)
        return real(pipe, adapter_dir, prompts, out_dir, **kw)
    monkeypatch.setattr(generate, "generate_images", counting)
    return calls


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def hand_drift(base_dir: Path, adapted_dir: Path, dino: DinoEmbedder) -> float:
    """(1 − mean cosine) / 2 over the files of the same name, from the PNGs on disk."""
    names = sorted(p.name for p in base_dir.glob("*.png"))
    assert names == sorted(p.name for p in adapted_dir.glob("*.png"))
    cosines = []
    for name in names:
        with Image.open(base_dir / name) as b, Image.open(adapted_dir / name) as a:
            eb, ea = dino.images([b.convert("RGB")])[0], dino.images([a.convert("RGB")])[0]
        cosines.append(float(eb @ ea / (eb.norm() * ea.norm())))
    return (1 - sum(cosines) / len(cosines)) / 2


def test_drift_per_checkpoint_equals_the_hand_computation(sd_runs, tiny_models, tmp_path, made):  # noqa: F811
    run = fresh(sd_runs[0], tmp_path)
    assert run_main(subject.main, cli(tiny_models, run, "--drift_prompts", "2")) == 0
    # the base model's images once, for both checkpoints
    assert made == ["step-1", "drift-base", "drift-step-1", "step-2", "drift-step-2"]
    rows = read_jsonl(run / "eval.jsonl")
    assert [(r["step"], r["drift_prompts"], r["n_drift"]) for r in rows] == [(1, 2, 2), (2, 2, 2)]
    base = run / "eval" / "drift-base"
    listed = read_jsonl(base / "prompts.jsonl")
    assert [(r["prompt"], r["seed"]) for r in listed] == [("a photo of cat", 0), ("a color drawing of cat", 0)]
    settings = json.loads((base / "generation.json").read_text())
    assert (settings["resolution"], settings["num_inference_steps"], settings["guidance_scale"]) == (32, 2, 7.5)
    assert settings["scheduler"] == json.loads((run / "eval" / "step-2" / "generation.json").read_text())["scheduler"]
    # checkpoint-1 is the fresh LoRA (B = 0): the base model's own images, drift 0
    step1 = run / "eval" / "drift-step-1"
    for r in listed:
        assert np.array_equal(pixels(base / r["image"]), pixels(step1 / r["image"]))
    assert rows[0]["drift"] == pytest.approx(0.0, abs=1e-12)
    # checkpoint-2 changed the model: drift > 0, and it is the arithmetic on the saved images
    dino = DinoEmbedder(str(tiny_models["dino"]))
    want = hand_drift(base, run / "eval" / "drift-step-2", dino)
    assert rows[1]["drift"] == pytest.approx(want, abs=1e-9) and want > 1e-4
    assert json.loads((run / "eval" / "step-2" / "scores.json").read_text())["drift"] == rows[1]["drift"]


def test_base_images_are_reused_and_made_again_when_the_settings_change(sd_runs, tiny_models, tmp_path,  # noqa: F811
                                                                         monkeypatch, made):
    run = fresh(sd_runs[0], tmp_path)
    assert run_main(subject.main, cli(tiny_models, run, "--drift_prompts", "1")) == 0
    stamp = (run / "eval" / "drift-base" / "p00-s0.png").stat().st_mtime_ns
    first = read_jsonl(run / "eval.jsonl")
    # a rescore with the same adapters and settings: every image is there, no pipeline loads
    with monkeypatch.context() as m:
        m.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("images should be reused"))
        assert run_main(subject.main, cli(tiny_models, run, "--drift_prompts", "1")) == 0
    assert (run / "eval" / "drift-base" / "p00-s0.png").stat().st_mtime_ns == stamp
    assert [r["drift"] for r in read_jsonl(run / "eval.jsonl")] == [r["drift"] for r in first]
    # another seed is another setting: the base images are made again (generation.json records it)
    made.clear()
    assert run_main(subject.main, cli(tiny_models, run, "--drift_prompts", "1", "--seed", "7",
                                      "--checkpoints", "2")) == 0
    assert made == ["step-2", "drift-base", "drift-step-2"]
    redone = json.loads((run / "eval" / "drift-base" / "generation.json").read_text())
    assert redone["seed"] == 7 and [p.name for p in (run / "eval" / "drift-base").glob("*.png")] == ["p00-s7.png"]


def test_drift_off_and_bad_input(sd_runs, tiny_models, tmp_path, capsys):  # noqa: F811
    run = fresh(sd_runs[0], tmp_path)
    assert run_main(subject.main, cli(tiny_models, run, "--drift_prompts", "0", "--checkpoints", "2")) == 0
    assert "drift" not in read_jsonl(run / "eval.jsonl")[0] and not (run / "eval" / "drift-base").exists()
    capsys.readouterr()
    assert run_main(subject.main, cli(tiny_models, run, "--drift_prompts", "11")) == 2
    assert "--drift_prompts 11: give 0 (no drift) to 10" in one_error_line(capsys)
    (tmp_path / "a-file").write_text("x")
    assert run_main(subject.main, cli(tiny_models, run, "--drift_base_dir", str(tmp_path / "a-file" / "d"))) == 2
    assert "a-file is a file" in one_error_line(capsys)


def test_a_study_makes_the_base_images_once_and_summarises_drift_lower_is_better(sd_runs, tiny_models,  # noqa: F811
                                                                                  tmp_path, monkeypatch, made):
    """eval.robustness scores each run through eval.subject (run here in this process, as the subprocess would)
    with --drift_base_dir OUTPUT_DIR/drift-base: two runs of one base model, the base images made for the first
    only; the study's tables summarise drift with its best = the lowest."""
    def in_process(cmd, **kw):
        assert cmd[1:3] == ["-m", "eval.subject"]
        return subprocess.CompletedProcess(cmd, run_main(subject.main, cmd[3:] + ["--device", "cpu"]), "", "")
    monkeypatch.setattr(robustness_tasks, "subprocess", types.SimpleNamespace(run=in_process))
    study = tmp_path / "study"
    args = types.SimpleNamespace(dino_model=str(tiny_models["dino"]), clip_model=str(tiny_models["clip"]),
                                 max_prompts=1, images_per_prompt=1, drift_prompts=1, output_dir=study)
    runs = [fresh(r, tmp_path) for r in sd_runs]
    scores = [robustness_tasks.score_subject(r, args, 2) for r in runs]
    assert all(note == "" and set(s) == {"dino", "clip_i", "drift"} for s, note in scores)
    assert made == ["step-2", "drift-base", "drift-step-2", "step-2", "drift-step-2"]
    assert (study / "drift-base" / "generation.json").is_file() and not (runs[0] / "eval" / "drift-base").exists()
    assert [read_jsonl(r / "eval.jsonl")[0]["drift_base"] for r in runs] == [str(study / "drift-base")] * 2
    assert scores[0][0]["drift"] != scores[1][0]["drift"] and min(s["drift"] for s, _ in scores) > 0
    assert "drift" in robustness_tasks.TASKS["dreambooth"].score_names
    assert robustness_tables.LOWER_IS_BETTER == {"drift"} and "drift" in robustness_tables.SCORES

    # the two runs as one method's sweep (factors 1 and 2): the lower drift is the best
    rows = [{"study": "lr", "method": "lora", "factor": f, "lr": 1e-3 * f, "status": "trained", "n": 1, "step": 2,
             **s} for f, (s, _) in zip((1.0, 2.0), scores)]
    tables, summaries = robustness_tables.study_tables(rows, rows, ["dino", "clip_i", "drift"])
    low, high = sorted(s["drift"] for s, _ in scores)
    [summary] = [s for s in summaries if s["score"] == "drift"]
    assert (summary["best"], summary["worst"]) == (low, high)
    assert summary["area"] == pytest.approx((low + high) / 2 / low)   # one doubling: the trapezoid / (best × 1)
    text = "\n".join(tables)
    assert "**drift** (lower is better" in text and "| drift (%) |" in text


def test_report_draws_drift_vs_step_and_drift_vs_rate(tmp_path, figures):  # noqa: F811
    def rows(base: float) -> dict:
        return {s: {"dino": 0.5, "clip_i": 0.4, "clip_t": 0.2, "drift": base + s / 100} for s in (2, 4, 6)}
    a = make_run(tmp_path, "lora-a", "lora", 1e-4, evals=rows(0.1))
    b = make_run(tmp_path, "lora-b", "lora", 4e-4, evals=rows(0.3))
    out = tmp_path / "out"
    assert run_main(report.main, [str(a), str(b), "--out", str(out)]) == 0
    ax = figures["drift_vs_step.png"].axes[0]
    assert "Drift" in ax.get_title() and "lower is better" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["lora r=4 lr=0.0004"].get_ydata(), [0.32, 0.34, 0.36])
    assert list(lines["lora r=4 lr=0.0001"].get_xdata()) == [2, 4, 6]
    [panel] = [ax for ax in figures["lr_sweep.png"].axes if "Drift" in ax.get_title()]
    assert list(panel.get_lines()[0].get_xdata()) == [1.0, 4.0]
    np.testing.assert_allclose(panel.get_lines()[0].get_ydata(), [0.16, 0.36])   # each run's last scored step
    md = (out / "report.md").read_text()
    assert "](drift_vs_step.png)" in md and "**drift** (lower is better" in md
    # the sweep's drift summary: best = the lowest (16.0 at 1×), worst 36.0 at 4×
    assert "| lora | 16.0 (1×) | 36.0 (4×) |" in md
    csv_rows = (out / "report.csv").read_text().splitlines()
    assert "drift" in csv_rows[0].split(",") and len(csv_rows) == 7
    assert plots.DRIFT_NAMES == {"drift": "Drift"}


def test_compare_shows_drift_where_it_shows_dino(tmp_path):
    """The app's Compare: the metrics table has the last scored checkpoint's drift beside its DINO, and the
    score-vs-distance view of drift keeps the points no other beats with less distance and less drift."""
    d = tmp_path / "run"
    d.mkdir()
    R.write_json(d / R.APP_JSON, {"method": "lora", "rank": 4, "max_train_steps": 3, "created": 1.0})
    R.write_exit(d, 0)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "distance_fig3": 0.1 * s}) + "\n"
                                             for s in (1, 2, 3)))
    evals = {1: 0.30, 2: 0.10, 3: 0.20}
    (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "dino": 0.5, "drift": v}) + "\n"
                                          for s, v in evals.items()))
    info = R.info(d)
    table = compare.metrics_table([info])
    assert list(table.columns).index("drift") == list(table.columns).index("dino") + 3
    assert table["drift"].tolist() == [0.2]
    points = compare.tradeoff_points([info], "distance_fig3", "drift")
    front = compare.pareto_front(points, "drift" not in compare.LOWER_IS_BETTER)
    assert front["step"].tolist() == [1, 2]          # step 3: farther than step 2 and more drift
    fig = compare.tradeoff_figure(points, "distance_fig3", "drift")
    assert "lower = better" in fig.axes[0].get_ylabel()


def test_flux2_klein_drift_uses_the_runs_pipeline_and_settings(tiny_models, tmp_path, made):  # noqa: F811
    """A DiT family: tiny-flux2-klein's flow-matching pipeline. The drift image of a prompt is the very image the
    checkpoint's score images hold for that prompt and seed (--prompts_file names the drift prompt): one pipeline,
    one set of settings and call arguments for both; an identity adapter has drift 0, a changed one drift > 0."""
    # the family's own targets (attention and the single blocks' fused projections): to_q/to_v alone barely move
    # the tiny transformer's images
    run = write_run(tmp_path / "klein", "tiny-flux2-klein", 0, list(family_of("tiny-flux2-klein").default_targets),
                    guidance=4.0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(drift.DRIFT_PROMPTS[0] + "\n")
    assert run_main(subject.main, cli(tiny_models, run, "--drift_prompts", "1", "--prompts_file", str(prompts))) == 0
    assert made.count("drift-base") == 1
    rows = read_jsonl(run / "eval.jsonl")
    assert rows[0]["drift"] == pytest.approx(0.0, abs=1e-12) and rows[1]["drift"] > 1e-4
    for step in (1, 2):
        assert np.array_equal(pixels(run / "eval" / f"step-{step}" / "p00-s0.png"),
                              pixels(run / "eval" / f"drift-step-{step}" / "p00-s0.png"))
    base = run / "eval" / "drift-base"
    assert json.loads((base / "generation.json").read_text())["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    dino = DinoEmbedder(str(tiny_models["dino"]))
    assert rows[1]["drift"] == pytest.approx(hand_drift(base, run / "eval" / "drift-step-2", dino), abs=1e-9)
