"""eval.best: a run's best checkpoint by its tuning score (GLUE's dev score, DINO, mIoU, else the lowest validation
loss), on hand-written run folders, and the adapter folder kept at that step."""
from __future__ import annotations

import json
from pathlib import Path

from eval.best import best_checkpoint

ADAPTER = ("adapter_config.json", "adapter.safetensors")


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER:
        (folder / name).write_text("{}")
    return folder


def run(tmp_path: Path, metrics: list[dict], evals: list[dict] | None = None, checkpoints=(), final=True) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"args": {"max_train_steps": 6}}))
    write_rows(folder / "metrics.jsonl", metrics)
    if evals is not None:
        write_rows(folder / "eval.jsonl", evals)
    for step in checkpoints:   # complete as trainers leave them: the adapter and trainer_state.json
        (adapter(folder / f"checkpoint-{step}") / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if final:
        adapter(folder)
    return folder


def test_glue_the_dev_score_picks_the_epoch_and_its_best_folder(tmp_path):
    """tune/score per epoch (GLUE): the highest, the earliest of equal ones; its adapter is best/ when no
    checkpoint was saved at that step, as training/glue.py keeps it."""
    metrics = [{"step": s, "loss": 1.0} for s in range(1, 7)]
    metrics[1].update({"eval_epoch": 0, "tune/score": 0.75, "test/accuracy": 0.5})
    metrics[3].update({"eval_epoch": 1, "tune/score": 0.875, "test/accuracy": 0.25})
    metrics[5].update({"eval_epoch": 2, "tune/score": 0.875, "test/accuracy": 1.0})   # a tie: the earlier wins
    folder = run(tmp_path, metrics, checkpoints=(3, 6))
    adapter(folder / "best")
    (folder / "best" / "epoch.json").write_text(json.dumps({"epoch": 1, "step": 4}))
    best = best_checkpoint(folder)
    assert (best.step, best.criterion, best.key, best.value, best.folder) == (4, "tuning score", "tune/score", 0.875,
                                                                            folder / "best")
    assert best.describe() == "step 4 (tuning score 0.875)"


def test_image_runs_dino_then_miou_and_the_adapter_of_that_step(tmp_path):
    metrics = [{"step": s, "loss": 1.0} for s in range(1, 7)]
    evals = [{"step": 2, "dino": 0.5}, {"step": 4, "dino": 0.625}, {"step": 6, "dino": 0.5625}]
    folder = run(tmp_path, metrics, evals, checkpoints=(2, 4))
    best = best_checkpoint(folder)
    assert (best.step, best.criterion, best.value, best.folder) == (4, "DINO", 0.625, folder / "checkpoint-4")
    # semantic map: the real/base bound rows have no step; the last step's adapter is the final one
    write_rows(folder / "eval.jsonl", [{"images": "real", "miou": 0.9}, {"step": 2, "miou": 0.25},
                                       {"step": 6, "miou": 0.375}])
    best = best_checkpoint(folder)
    assert (best.step, best.criterion, best.value, best.folder) == (6, "mIoU", 0.375, folder)


def test_validation_loss_is_the_lowest_and_a_step_without_an_adapter_is_still_named(tmp_path):
    metrics = [{"step": 1, "loss": 1.0, "val_loss": 0.5}, {"step": 2, "loss": 1.0, "val_loss": 0.25},
               {"step": 3, "loss": 1.0, "val_loss": 0.375}]
    folder = run(tmp_path, metrics, checkpoints=(1,), final=False)
    best = best_checkpoint(folder)
    assert (best.step, best.criterion, best.value, best.folder) == (2, "validation loss", 0.25, None)
    assert best.describe() == "step 2 (validation loss 0.25; no adapter kept at that step)"
    # a scorer's value, where there is one, comes first: DINO over the validation loss
    write_rows(folder / "eval.jsonl", [{"step": 1, "dino": 0.5}])
    assert (best_checkpoint(folder).step, best_checkpoint(folder).criterion) == (1, "DINO")


def test_nothing_to_choose_by(tmp_path):
    """Instruction tuning logs a test score per epoch (mc/*) but no tuning score: none, said as such."""
    folder = run(tmp_path, [{"step": 1, "loss": 1.0, "mc/arc": 0.5}])
    best = best_checkpoint(folder)
    assert (best.step, best.criterion, best.folder) == (None, "none", None)
    assert best.describe().startswith("none (no tuning score, DINO, mIoU or validation loss")
    assert best_checkpoint(tmp_path / "missing").criterion == "none"
