"""eval.report's sample grid for semantic-map runs: the control map the samples were drawn from as the first
column (map | samples per checkpoint), the map of the same prompt and seed as the samples."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from eval import report
from eval.common import run_main

from .test_eval_report import COLOURS, figures, make_run  # noqa: F401

MAP_COLOURS = {"a photo of wall, floor": (255, 255, 0), "a photo of sky": (0, 255, 255)}


def add_maps(run) -> None:
    """What training/semantic_map.py writes: each sample row names its painted control map."""
    for samples in run.glob("checkpoint-*/samples"):
        rows = [json.loads(line) for line in (samples / "prompts.jsonl").read_text().splitlines()]
        for i, row in enumerate(rows):
            Image.new("RGB", (16, 16), MAP_COLOURS[row["prompt"]]).save(samples / f"p{i:02d}-map.png")
            row["map"] = f"p{i:02d}-map.png"
        (samples / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_semantic_grid_is_map_then_samples_per_checkpoint(tmp_path, figures):  # noqa: F811
    a = make_run(tmp_path, "seg-a", "lora", 1e-4, sample_rows=[("a photo of wall, floor", 0, "red")])
    b = make_run(tmp_path, "seg-b", "delora", 1e-3, sample_rows=[("a photo of sky", 0, "green"),
                                                                 ("a photo of wall, floor", 0, "blue")])
    add_maps(a), add_maps(b)
    out = tmp_path / "out"
    assert run_main(report.main, [str(a), str(b), "--out", str(out)]) == 0
    axes = figures["sample_grid.png"].axes
    assert [ax.get_title() for ax in axes[:4]] == ["map", "step 2", "step 4", "step 6"]
    shown = [tuple(np.asarray(ax.get_images()[0].get_array())[0, 0][:3]) for ax in axes]
    yellow = MAP_COLOURS["a photo of wall, floor"]
    # row a: its map, then its red samples; row b: the map of the matching prompt (not sky's), blue samples
    assert shown == [yellow] + [COLOURS["red"]] * 3 + [yellow] + [COLOURS["blue"]] * 3


def test_subject_runs_keep_the_grid_without_a_map_column(tmp_path, figures):  # noqa: F811
    a = make_run(tmp_path, "db", "lora", 1e-4)
    assert run_main(report.main, [str(a), "--out", str(tmp_path / "out")]) == 0
    assert [ax.get_title() for ax in figures["sample_grid.png"].axes] == ["step 2", "step 4", "step 6"]
