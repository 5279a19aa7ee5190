"""eval.report on hand-made run folders: the table (values looked up in metrics.jsonl/eval.jsonl),
the Fig. 3 distance key choice, the figures' contents, titles, labels and legends, the learning-rate
sweep, the sample grid (same prompt and seed in every cell), and bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import plots, report
from eval.common import run_main

BLOCK0 = "distance/down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
BLOCK1 = "distance/down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_out.0"   # listed first, not block 0
OTHER = "distance/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def distance(key: str, step: int, scale: float) -> float:
    return scale * step * {BLOCK0: 1.0, BLOCK1: 3.0, OTHER: 5.0, "distance_mean": 0.5}[key]


def make_run(root: Path, name: str, method: str, lr: float, steps: int = 6, fig3: bool = True,
             evals: dict | None = None, sample_rows=None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"args": {"method": method, "learning_rate": None, "rank": None},
                                              "learning_rate": lr, "max_train_steps": steps,
                                              "adapter_config": {"method": method, "rank": 4}}))
    keys = [OTHER, BLOCK1, BLOCK0] if fig3 else [OTHER]
    scale = lr * 1000
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            row = {"step": s, "loss": 1 / s, **{k: distance(k, s, scale) for k in keys},
                   "distance_mean": distance("distance_mean", s, scale)}
            f.write(json.dumps(row) + "\n")
    if evals:
        (run / "eval.jsonl").write_text("".join(json.dumps({"step": s, **v}) + "\n" for s, v in evals.items()))
    for s in (2, 4, 6):
        samples = run / f"checkpoint-{s}" / "samples"
        samples.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter.safetensors", "trainer_state.json"):
            (run / f"checkpoint-{s}" / f).write_text("{}")
        rows = sample_rows or [("a photo of sks cat", 0, "red")]
        for i, (prompt, seed, colour) in enumerate(rows):
            Image.new("RGB", (16, 16), COLOURS[colour]).save(samples / f"{i}.png")
        (samples / "prompts.jsonl").write_text("".join(
            json.dumps({"image": f"{i}.png", "prompt": p, "seed": sd}) + "\n" for i, (p, sd, _) in enumerate(rows)))
    return run


def scores(step: int, base: float) -> dict:
    return {"dino": base + step / 100, "clip_i": base / 2 + step / 200, "clip_t": 0.2 + step / 1000}


@pytest.fixture
def runs(tmp_path):
    a = make_run(tmp_path, "lora-a", "lora", 1e-4, evals={6: scores(6, 0.5), 2: scores(2, 0.5), 4: scores(4, 0.5)})
    b = make_run(tmp_path, "lora-b", "lora", 4e-4, evals={2: scores(2, 0.3), 6: scores(6, 0.3)},
                 sample_rows=[("another prompt", 0, "green"), ("a photo of sks cat", 0, "blue")])
    c = make_run(tmp_path, "delora-c", "delora", 1e-3, fig3=False)
    return a, b, c


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report saves, by file name (still written to disk)."""
    seen = {}
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (seen.__setitem__(Path(path).name, fig), save(fig, path)))
    return seen


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_table_rows_values_and_markdown(runs, tmp_path):
    a, b, c = runs
    out = tmp_path / "out"
    assert run_main(report.main, [str(a), str(b), str(c), "--out", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    assert list(rows[0]) == report.CSV_COLUMNS and {r["task"] for r in rows} == {""}   # run.json names none
    assert [(r["run"], r["step"]) for r in rows] == [("lora-a", "2"), ("lora-a", "4"), ("lora-a", "6"),
                                                     ("lora-b", "2"), ("lora-b", "6"), ("delora-c", "6")]
    for r in rows:
        lr = {"lora-a": 1e-4, "lora-b": 4e-4, "delora-c": 1e-3}[r["run"]]
        step = int(r["step"])
        assert (r["method"], r["rank"], float(r["lr"])) == (("delora" if r["run"] == "delora-c" else "lora"), "4", lr)
        # the Fig. 3 layer where logged (block 0, not the block-1 key listed before it), else distance_mean
        key = "distance_mean" if r["run"] == "delora-c" else BLOCK0
        assert float(r["distance"]) == pytest.approx(distance(key, step, lr * 1000))
        if r["run"] == "delora-c":
            assert r["dino"] == r["clip_i"] == r["clip_t"] == ""          # never scored
        else:
            want = scores(step, 0.5 if r["run"] == "lora-a" else 0.3)
            assert {k: float(r[k]) for k in want} == pytest.approx(want)
    md = (out / "report.md").read_text()
    assert "| run | task | method | rank | lr | step | dino (%) | clip_i (%) | clip_t (%) | drift (%) | distance |" \
        in md
    # one precision: scores in percent with one decimal (dino 0.5 + 6/100), the distance to three digits (0.1·6);
    # no drift in these rows: a blank cell
    assert "| lora-a |  | lora | 4 | 0.0001 | 6 | 56.0 | 28.0 | 20.6 |  | 0.600 |" in md
    # each run's best checkpoint by its tuning score (DINO here), or none where nothing scored it
    assert "| lora-a | DINO | 6 | 56.0 | checkpoint-6 |" in md and "| lora-b | DINO | 6 | 36.0 | checkpoint-6 |" in md
    assert "| delora-c | none |  |  |  |" in md and md.count("| lora-a |") == 4
    # lora at 1e-4 and 4e-4 is a sweep (factors 1, 4): its robustness summary of the last DINO, 0.56 and 0.36:
    # area = 2·(0.56 + 0.36)/2 / (0.56 · log2 4) = 0.821
    assert "| lora | 56.0 (1×) | 36.0 (4×) | 0.821 | 0 (1×) | 1.0 (1 point) |" in md
    for png in ("distance_vs_step.png", "scores_vs_step.png", "lr_sweep.png", "sample_grid.png"):
        with Image.open(out / png) as im:
            assert f"]({png})" in md and im.size[0] > 100


def test_distance_key_choice(runs, tmp_path):
    metrics = report.read_metrics(runs[0])
    assert report.pick_distance_key(metrics) == BLOCK0
    assert report.pick_distance_key(metrics[:1] and [{k: v for k, v in metrics[0].items() if k != BLOCK0}]) == BLOCK1
    assert report.pick_distance_key(report.read_metrics(runs[2])) == "distance_mean"
    assert report.pick_distance_key(metrics, OTHER) == OTHER and report.pick_distance_key(metrics, "nope") is None
    out = tmp_path / "flag"
    assert run_main(report.main, [str(runs[0]), "--out", str(out), "--distance_key", OTHER]) == 0
    assert [float(r["distance"]) for r in read_csv(out / "report.csv")] == pytest.approx(
        [distance(OTHER, s, 0.1) for s in (2, 4, 6)])


def test_rows_between_full_probes(tmp_path, figures):
    """metrics.jsonl as the trainers write it with --distance_logging_steps 3 (a run still going at step 5):
    the followed layer as distance_fig3 every step, every layer and distance_mean at step 3 only. The key is
    still found, the Fig. 3 curve has every step (distance_fig3 under the layer's name), distance_mean its
    one full row."""
    run = make_run(tmp_path, "lora-run", "lora", 1e-4, steps=5)
    layer = BLOCK0[len("distance/"):]
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "fig3_layer": layer}))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{**r, "distance_fig3": r[BLOCK0]} if r["step"] == 3 else
            {"step": r["step"], "loss": r["loss"], "distance_fig3": r[BLOCK0]} for r in logged]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.pick_distance_key(rows) == BLOCK0           # neither the first nor the last row names it
    assert report.pick_distance_key(rows[:2]) is None         # no full row yet: nothing to name
    loaded = report.load_run(run, "auto")
    assert loaded.distance_key == BLOCK0
    assert report.series(loaded.metrics, BLOCK0) == ([1, 2, 3, 4, 5], [distance(BLOCK0, s, 0.1) for s in range(1, 6)])
    assert report.series(loaded.metrics, OTHER) == ([3], [distance(OTHER, 3, 0.1)])
    assert report.value_at(loaded.metrics, BLOCK0, 4) == distance(BLOCK0, 4, 0.1)
    assert run_main(report.main, [str(run), "--out", str(tmp_path / "out")]) == 0
    [line] = figures["distance_vs_step.png"].axes[0].get_lines()
    np.testing.assert_allclose(line.get_ydata(), [distance(BLOCK0, s, 0.1) for s in range(1, 6)])


def test_figures_show_the_data_with_titles_labels_and_legends(runs, tmp_path, figures):
    a, b, c = runs
    assert run_main(report.main, [str(a), str(b), str(c), "--out", str(tmp_path / "out")]) == 0
    assert set(figures) == {"distance_vs_step.png", "scores_vs_step.png", "lr_sweep.png", "sample_grid.png"}
    for name in ("distance_vs_step.png", "scores_vs_step.png", "lr_sweep.png"):
        for ax in figures[name].axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), name
            assert ax.get_legend() is not None and ax.get_legend().get_texts(), name
    ax = figures["distance_vs_step.png"].axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(lines) == {"lora r=4 lr=0.0001", "lora r=4 lr=0.0004", "delora r=4 lr=0.001"}
    np.testing.assert_allclose(lines["lora r=4 lr=0.0004"].get_ydata(),
                               [distance(BLOCK0, s, 0.4) for s in range(1, 7)])
    np.testing.assert_allclose(lines["delora r=4 lr=0.001"].get_ydata(), [distance("distance_mean", s, 1.0)
                                                                          for s in range(1, 7)])
    dino = figures["scores_vs_step.png"].axes[0]
    assert "DINO" in dino.get_title()
    for line in dino.get_lines():                             # a run keeps its colour from figure to figure
        assert line.get_color() == lines[line.get_label()].get_color()
    assert {tuple(l.get_xdata()) for l in dino.get_lines()} == {(2, 4, 6), (2, 6)}
    sweep = figures["lr_sweep.png"].axes                      # lora only: delora ran at one lr
    assert [l.get_label().split(" ")[0] for ax in sweep for l in ax.get_lines()] == ["lora"] * len(sweep)
    dist_panel = sweep[-1]
    assert list(dist_panel.get_lines()[0].get_xdata()) == [1.0, 4.0]
    np.testing.assert_allclose(dist_panel.get_lines()[0].get_ydata(),
                               [distance(BLOCK0, 6, 0.1), distance(BLOCK0, 6, 0.4)])
    grid = figures["sample_grid.png"].axes
    assert [ax.get_title() for ax in grid[:3]] == ["step 2", "step 4", "step 6"]
    assert [ax.get_ylabel() for ax in grid[::3]] == ["lora r=4 lr=0.0001", "lora r=4 lr=0.0004", "delora r=4 lr=0.001"]


def test_a_runs_moving_average_is_a_run_under_it(runs, tmp_path, figures):
    """lora-a trained with --ema_decay: checkpoint-N/ema/samples and RUN/ema/eval.jsonl (eval.subject --average)
    make it a `· EMA` row of the table, grid and score curves, with no distance, not a point of lora's sweep and not a
    run of the best-checkpoint table."""
    a, b, _ = runs
    for s in (2, 4, 6):
        samples = a / f"checkpoint-{s}" / "ema" / "samples"
        samples.mkdir(parents=True)
        Image.new("RGB", (16, 16), COLOURS["green"]).save(samples / "0.png")
        (samples / "prompts.jsonl").write_text(json.dumps({"image": "0.png", "prompt": "a photo of sks cat",
                                                           "seed": 0}) + "\n")
    (a / "ema").mkdir()
    (a / "ema" / "eval.jsonl").write_text("".join(json.dumps({"step": s, **scores(s, 0.6), "average": "ema"}) + "\n"
                                                  for s in (2, 6)))
    out = tmp_path / "out"
    assert run_main(report.main, [str(a), str(b), "--out", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    average = [r for r in rows if r["run"] == "lora-a/ema"]
    assert [(r["step"], r["distance"]) for r in average] == [("2", ""), ("6", "")]
    assert float(average[-1]["dino"]) == pytest.approx(scores(6, 0.6)["dino"])
    md = (out / "report.md").read_text()
    assert "2 run(s) and 1 moving average(s)" in md and "- `lora-a/ema`: lora r=4 lr=0.0001 · EMA" in md
    assert "| lora | 56.0 (1×) | 36.0 (4×) | 0.821 |" in md        # the sweep of the two trained runs only
    assert "| lora-a/ema |" not in md.split("Best checkpoints")[1].split("Runs")[0]
    grid = figures["sample_grid.png"].axes
    assert [ax.get_ylabel() for ax in grid[::3]] == ["lora r=4 lr=0.0001", "lora r=4 lr=0.0001 · EMA",
                                                     "lora r=4 lr=0.0004"]
    dino = {l.get_label(): list(l.get_ydata()) for l in figures["scores_vs_step.png"].axes[0].get_lines()}
    assert dino["lora r=4 lr=0.0001 · EMA"] == pytest.approx([scores(s, 0.6)["dino"] for s in (2, 6)])
    distances = {line.get_label() for line in figures["distance_vs_step.png"].axes[0].get_lines()}
    assert "lora r=4 lr=0.0001 · EMA" not in distances and "lora r=4 lr=0.0001" in distances


def test_sample_grid_uses_the_same_prompt_and_seed(runs, tmp_path):
    a, b, _ = runs                 # b lists another prompt first (green); its matching sample is blue
    out = tmp_path / "out"
    assert run_main(report.main, [str(a), str(b), "--out", str(out)]) == 0
    with Image.open(out / "sample_grid.png") as im:
        px = np.asarray(im.convert("RGB")).astype(int)
    count = lambda rgb: int((np.abs(px - np.array(rgb)).sum(-1) < 30).sum())  # noqa: E731
    assert count(COLOURS["red"]) > 500 and count(COLOURS["blue"]) > 500 and count(COLOURS["green"]) == 0


def test_no_sweep_no_sweep_plot_and_columns_are_spread(runs, tmp_path):
    a, _, c = runs
    out = tmp_path / "out"
    assert run_main(report.main, [str(a), str(c), "--out", str(out), "--max_grid_columns", "2"]) == 0
    assert not (out / "lr_sweep.png").exists() and (out / "distance_vs_step.png").exists()
    assert report.spread([2, 4, 6, 8, 10], 3) == [2, 6, 10] and report.spread([2, 4], 5) == [2, 4]


def test_bad_input(runs, tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    out = tmp_path / "out"
    assert run_main(report.main, [str(runs[0]), str(not_a_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no run.json" in err[0]
    assert not out.exists()                                   # nothing half-written
    (tmp_path / "file").write_text("x")
    assert run_main(report.main, [str(runs[0]), "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli(runs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval.report", str(runs[0]), "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
        "distance_vs_step.png", "report.csv", "report.md", "sample_grid.png", "scores_vs_step.png"]


def title_boxes(fig):
    """(text, window extent) of every axes title and the figure's suptitle, as drawn (on a fresh Agg canvas:
    saving closed the figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for ax in fig.axes for t in (ax.title, ax._left_title, ax._right_title)]
    texts += [fig._suptitle] if fig._suptitle is not None else []
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]


def test_titles_are_not_cut(runs, tmp_path, figures):
    """Every title lies inside its figure, even the distance plot's, which names a long layer key per run."""
    a, b, c = runs
    assert run_main(report.main, [str(a), str(b), str(c), "--out", str(tmp_path / "out")]) == 0
    assert "per-run key" in figures["distance_vs_step.png"].axes[0].get_title()    # two long keys in it
    for name, fig in figures.items():
        boxes = title_boxes(fig)
        width, height = fig.canvas.get_width_height()
        for text, box in boxes:
            assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height, (name, text, box)


def glue_run(root: Path, name: str, lr: float) -> Path:
    """A GLUE run folder as training/glue.py writes it: --task_name recorded, distance_mean logged."""
    run = root / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"args": {"method": "lora", "learning_rate": lr, "task_name": "sst2"},
                                              "adapter_config": {"method": "lora", "rank": 8}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "distance_mean": 7.0 * s}) + "\n"
                                               for s in (1, 2, 3)))
    return run


def test_runs_of_different_tasks_are_kept_apart(tmp_path, figures):
    """A DreamBooth LoRA and a GLUE LoRA at another learning rate: never one line on the sweep plot, never one
    distance column or table; each task its own section and figures."""
    sd, sd2 = make_run(tmp_path, "dog-lora", "lora", 1e-4), make_run(tmp_path, "dog-lora-x4", "lora", 4e-4)
    for run in (sd, sd2):                                        # as training/dreambooth.py records it
        info = json.loads((run / "run.json").read_text())
        info["args"]["instance_prompt"] = "a photo of sks dog"
        (run / "run.json").write_text(json.dumps(info))
    glue = glue_run(tmp_path, "glue-sst2-lora", 2e-3)
    out = tmp_path / "out"
    assert run_main(report.main, [str(sd), str(glue), str(sd2), "--out", str(out)]) == 0
    assert set(figures) == {"distance_vs_step-dreambooth.png", "lr_sweep-dreambooth.png",
                            "sample_grid-dreambooth.png", "distance_vs_step-glue-sst2.png"}
    sweep = figures["lr_sweep-dreambooth.png"].axes[-1]             # the distance panel: the DreamBooth runs only
    (line,) = sweep.get_lines()
    assert list(line.get_xdata()) == [1.0, 4.0]
    assert {l.get_label() for l in figures["distance_vs_step-glue-sst2.png"].axes[0].get_lines()} == \
        {"lora r=8 lr=0.002"}
    rows = read_csv(out / "report.csv")
    assert {(r["run"], r["task"], r["distance_key"]) for r in rows} == {
        ("dog-lora", "dreambooth", BLOCK0), ("dog-lora-x4", "dreambooth", BLOCK0),
        ("glue-sst2-lora", "glue-sst2", "distance_mean")}
    md = (out / "report.md").read_text()
    sd_part, glue_part = md.split("## Task: dreambooth")[1].split("## Task: glue-sst2")
    assert "dog-lora" in sd_part and "glue-sst2-lora" not in sd_part and f"`{BLOCK0}`" in sd_part
    assert "glue-sst2-lora" in glue_part and "dog-lora" not in glue_part and "`distance_mean`" in glue_part
    assert "](lr_sweep-dreambooth.png)" in sd_part and "](distance_vs_step-glue-sst2.png)" in glue_part
