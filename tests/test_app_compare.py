"""app/compare.py on synthetic run folders: the sample grid layout, curves, the metrics table and the
score-vs-distance (Pareto) view. No training."""
import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from app import compare
from app import generate as G
from app import runs as R
from app.inputs import InputError
from app.service import Service


def fake_run(root, name, method, steps=(1, 2), final=True, scores=None):
    d = root / name
    d.mkdir(parents=True)
    R.write_json(d / R.APP_JSON, {"method": method, "rank": 4, "max_train_steps": steps[-1], "created": 1.0})
    R.write_exit(d, 0)
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps[-1] + 1):
            row = {"step": s, "loss": 1.0 / s, "distance_fig3": 0.1 * s, "distance_mean": 0.05 * s}
            f.write(json.dumps(row) + "\n")
    folders = [d / f"checkpoint-{s}" for s in steps] + ([d] if final else [])
    for k, folder in enumerate(folders):
        (folder / "samples").mkdir(parents=True)
        for f in (*R.ADAPTER_FILES, "trainer_state.json"):   # what a complete checkpoint holds
            (folder / f).write_text("{}")
        Image.new("RGB", (32, 32), (40 * k, 200, 30)).save(folder / "samples" / "p00-s0.png")
        (folder / "samples" / "prompts.jsonl").write_text(json.dumps({"image": "p00-s0.png", "prompt": "a sks cat"}))
    if scores:
        (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "dino": v, "clip_i": 0.5, "clip_t": 0.2}) + "\n"
                                              for s, v in scores.items()))
    return R.info(d)


def test_grid_rows_are_methods_and_columns_are_checkpoints(tmp_path):
    a = fake_run(tmp_path, "a", "lora", steps=(2, 4))                       # final == step 4: no extra column
    b = fake_run(tmp_path, "b", "delora", steps=(2, 3), final=False)        # no step 4: an empty cell
    grid = compare.sample_grid([a, b])                                      # columns: steps 2, 3, 4
    assert grid.size == (170 + 3 * 132, 26 + 2 * 132)
    px = np.asarray(grid)
    assert px[26 + 60, 170 + 60].tolist() == [0, 200, 30]                  # a, step 2: its first sample
    assert px[26 + 60, 170 + 132 + 60].tolist() == [255, 255, 255]         # a has no step 3
    assert px[26 + 132 + 60, 170 + 132 + 60].tolist() == [40, 200, 30]     # b, step 3
    assert px[26 + 132 + 60, 170 + 264 + 60].tolist() == [255, 255, 255]   # b has no step 4
    assert [c for c, _ in compare.gallery_items([a, b])] == [
        str(tmp_path / "a/checkpoint-2/samples/p00-s0.png"), str(tmp_path / "a/checkpoint-4/samples/p00-s0.png"),
        str(tmp_path / "b/checkpoint-2/samples/p00-s0.png"), str(tmp_path / "b/checkpoint-3/samples/p00-s0.png")]
    assert compare.prompt_of([a]) == "a sks cat"


def test_a_runs_moving_average_is_a_row_under_it(tmp_path):
    """--ema_decay writes checkpoint-N/ema/samples and ema/samples (same prompts and seeds): the grid shows them as
    a `· EMA` row under the run's own row, the gallery labels them so; a run without an average keeps one row."""
    a = fake_run(tmp_path, "a", "lora", steps=(2, 4))
    b = fake_run(tmp_path, "b", "delora", steps=(2, 4))
    for k, folder in enumerate([a.path / "checkpoint-2" / "ema", a.path / "checkpoint-4" / "ema"]):
        (folder / "samples").mkdir(parents=True)
        Image.new("RGB", (32, 32), (10, 20 + 100 * k, 250)).save(folder / "samples" / "p00-s0.png")
        (folder / "samples" / "prompts.jsonl").write_text(json.dumps({"image": "p00-s0.png", "prompt": "a sks cat"}))
    assert [row for _, _, row in compare.columns([a, b])] == ["lora r4", "lora r4 · EMA", "delora r4"]
    grid = compare.sample_grid([a, b])
    assert grid.size == (170 + 2 * 132, 26 + 3 * 132)
    px = np.asarray(grid)
    assert px[26 + 60, 170 + 60].tolist() == [0, 200, 30]                  # a, step 2, trained
    assert px[26 + 132 + 60, 170 + 132 + 60].tolist() == [10, 120, 250]   # a, step 4, its average
    assert px[26 + 264 + 60, 170 + 60].tolist() == [0, 200, 30]           # b, step 2
    captions = [c for _, c in compare.gallery_items([a])]
    assert captions == ["lora r4 · step 2 · a sks cat", "lora r4 · step 4 · a sks cat",
                        "lora r4 · EMA · step 2 · a sks cat", "lora r4 · EMA · step 4 · a sks cat"]


def test_a_scored_moving_average_is_a_row_of_the_table(tmp_path):
    """`eval.subject --average` writes RUN/ema/eval.jsonl: the table shows its last scored step under the run's own
    row (no loss or distance: those are the trained weights')."""
    a = fake_run(tmp_path, "a", "lora", steps=(2, 4), scores={2: 0.3, 4: 0.4})
    (a.path / "ema").mkdir()
    (a.path / "ema" / "eval.jsonl").write_text("".join(json.dumps({"step": s, "dino": v, "clip_i": 0.6,
                                                                   "clip_t": 0.25, "average": "ema"}) + "\n"
                                                       for s, v in {2: 0.35, 4: 0.45}.items()))
    table = compare.metrics_table([a])
    assert table["run"].tolist() == ["a", "a · EMA"]
    assert table["dino"].tolist() == [0.4, 0.45] and table["scored step"].tolist() == [4, 4]
    assert table["loss"].tolist()[0] == 0.25 and pd.isna(table["loss"].tolist()[1])


def test_final_column_when_the_last_step_has_no_checkpoint(tmp_path):
    a = fake_run(tmp_path, "a", "lora", steps=(2,))
    R.write_json(a.path / R.APP_JSON, {"method": "lora", "rank": 4, "max_train_steps": 5})
    labels = [label for label in compare.columns([R.info(a.path)])[0][1]]
    assert labels == ["step 2", "final"]


def test_curves_and_table(tmp_path):
    a = fake_run(tmp_path, "a", "lora", steps=(1, 3), scores={1: 0.3, 3: 0.4})
    b = fake_run(tmp_path, "b", "dora", steps=(1, 2))
    frame = compare.curves([a, b], "distance_fig3")
    assert frame.groupby("run").size().to_dict() == {"lora · a": 3, "dora · b": 2}
    assert compare.curves([a, b], "no_such_key").empty and compare.curves([], "loss").dtypes["step"] == "int64"
    table = compare.metrics_table([a, b])
    assert table["scored step"].tolist()[0] == 3 and table["dino"].tolist()[0] == 0.4
    assert pd.isna(table["dino"].tolist()[1]) and table["step"].tolist() == ["3/3", "2/2"]
    assert compare.distance_key([a], "distance_max") == "distance_fig3"   # falls back to a logged key
    assert table["best step"].tolist() == ["3 (DINO)", ""]               # b was never scored: no best


def test_the_best_checkpoint_is_offered_and_loads(tmp_path):
    """Generate's checkpoint list names the step the run's DINO picks (step 1 here, not the last one), it is the
    one chosen by default, and 'best' loads that checkpoint's adapter; a run with no score offers no best."""

    a = fake_run(tmp_path, "a", "lora", steps=(1, 3), scores={1: 0.5, 3: 0.25})
    choices = G.checkpoint_choices(a.path)
    assert choices == ["step 1", "step 3", "final", "best: step 1 (DINO 0.5)", G.BASE]
    assert choices[-2].startswith("best")                    # tab_generate preselects the one before the base
    assert G.adapter_dir(a.path, choices[-2]) == G.adapter_dir(a.path, "best") == a.path / "checkpoint-1"
    b = fake_run(tmp_path, "b", "dora", steps=(1, 2))
    assert G.checkpoint_choices(b.path) == ["step 1", "step 2", "final", G.BASE]
    with pytest.raises(InputError, match=r"no best checkpoint to load: none \(no tuning score"):
        G.adapter_dir(b.path, "best")


def test_a_running_run_whose_last_row_is_not_a_full_probe(tmp_path):
    """--distance_logging_steps 3 at step 4 of a running run: distance_mean/max only on the full row of step 3.
    The table shows each distance as last logged; the mean is still offered as the key to plot."""
    a = fake_run(tmp_path, "a", "lora", steps=(3,), final=False)
    rows = [{"step": s, "loss": 1.0 / s, "distance_fig3": 0.1 * s,
             **({"distance_mean": 0.05 * s, "distance_max": 0.2 * s} if s == 3 else {})} for s in range(1, 5)]
    (a.path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (a.path / "new.jsonl").replace(a.path / "metrics.jsonl")   # a new file, as the app's reader expects of a rewrite
    a = R.info(a.path)
    table = compare.metrics_table([a])
    assert table["distance_fig3"].tolist() == [0.4] and table["distance_mean"].tolist() == [0.15]
    assert table["distance_max"].tolist() == [0.6] and pd.isna(table["rel_distance_max"].tolist()[0])
    assert compare.distance_key([a], "distance_max") == "distance_max"
    assert compare.distance_key([a], "rel_distance_max") == "distance_fig3"   # never logged: a logged key
    assert compare.curves([a], "distance_mean")["step"].tolist() == [3]


def test_pareto_front_and_tradeoff_points(tmp_path):
    a = fake_run(tmp_path, "a", "lora", steps=(1, 2, 3), scores={1: 0.30, 2: 0.50, 3: 0.45})
    points = compare.tradeoff_points([a], "distance_fig3", "dino")
    assert points[["step", "distance", "score"]].values.round(3).tolist() == [[1, 0.1, 0.3], [2, 0.2, 0.5],
                                                                               [3, 0.3, 0.45]]
    assert compare.pareto_front(points)["step"].tolist() == [1, 2]        # step 3: farther and worse than 2
    fig = compare.tradeoff_figure(points, "distance_fig3", "dino")
    assert len(fig.axes[0].lines) == 2                                      # the run and the front
    empty = compare.tradeoff_figure(compare.tradeoff_points([], "distance_fig3", "dino"), "distance_fig3", "dino")
    assert "no scored checkpoints" in empty.axes[0].texts[0].get_text()


EMA_SCORER = """
import json, pathlib, sys
run = pathlib.Path(sys.argv[sys.argv.index("--run_dir") + 1])
out = run / "ema" if "--average" in sys.argv else run
(out / "eval.jsonl").write_text(json.dumps({"step": 4, "dino": 0.6 if out != run else 0.5}) + "\\n")
"""


def test_score_queues_the_moving_average_too(tmp_path):
    """A run trained with --ema_decay (RUN/ema/ holds an adapter) gets a second scoring job, eval.subject --average,
    whose rows land in RUN/ema/eval.jsonl and show as the table's EMA row; scored runs are skipped next time."""
    (tmp_path / "scorer.py").write_text(EMA_SCORER)
    service = Service(tmp_path / "runs", scorer=[sys.executable, str(tmp_path / "scorer.py")])
    try:
        with_ema, plain = (fake_run(service.runs_dir, name, "lora", steps=(2, 4)) for name in ("a", "b"))
        (with_ema.path / "ema").mkdir()
        for f in R.ADAPTER_FILES:
            (with_ema.path / "ema" / f).write_text("{}")
        msg = service.score(["a", "b"])
        assert msg == "Scoring 3 run(s): a, a (EMA), b.", msg
        assert service.queue.wait(timeout=60)
        status = service.score_status(["a", "b"])
        assert "`a`: scoring finished" in status and "`a (EMA)`: scoring finished" in status
        assert "`b (EMA)`" not in status
        table = compare.metrics_table([R.info(with_ema.path), R.info(plain.path)])
        assert table["run"].tolist() == ["a", "a · EMA", "b"] and table["dino"].tolist() == [0.5, 0.6, 0.5]
        assert service.score(["a"]) == "Nothing to score. Skipped: a (already scored)."
    finally:
        service.close()
