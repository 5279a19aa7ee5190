"""--report_to wandb / all, offline (WANDB_MODE=offline): the run's scalars, its distance curves and the samples
at checkpoints reach Weights & Biases' own run file, read back record by record; `all` writes TensorBoard too."""
import json
import time
from pathlib import Path

import pytest

from training import dreambooth
from training.common.tracking import resolve_report_to

wandb = pytest.importorskip("wandb")
pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one tiny-SD cache for the session

FAST = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--seed", "0", "--resolution", "32",
        "--num_inference_steps", "1", "--num_validation_images", "1", "--rank", "4", "--method", "delora",
        "--export_diffusers", "false"]


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB's log
    format: 32 KiB blocks of chunks, each a 7-byte header (crc32, little-endian length, type: 1 full,
    2 first, 3 middle, 4 last) and its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7 or data[pos + 6] == 0:   # padding to the block's end
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):   # a chunk still being written
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def finished_records(run_file: Path, timeout: float = 60.0) -> list:
    """The run file's records once it holds the run's `exit` record: wandb's writer (a service process) may
    still be flushing the last steps when wandb.finish returns to the trainer."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(run_file: Path) -> dict[int, dict]:
    """{step: {key: value}} of every history record (wandb merges what one step logs into one row)."""
    rows: dict[int, dict] = {}
    for r in finished_records(run_file):
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(r.history.step.num, {}).update(items)
    return rows


def test_report_to_wandb_offline_logs_scalars_distance_curves_and_checkpoint_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    out = tmp_path / "run"
    # 3 steps, a checkpoint at 2: the distance of every layer at 2 and 3 (the last step), the followed layer at 1
    assert dreambooth.main(["--output_dir", str(out), "--report_to", "wandb", *FAST, "--max_train_steps", "3",
                            "--checkpointing_steps", "2"]) == 0
    [run_dir] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    logged = history(next(run_dir.glob("run-*.wandb")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:   # every number metrics.jsonl holds, the same in wandb (JSON both ways: exact)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        full = row["step"] in (2, 3)
        assert any(k.startswith("distance/") for k in numbers) == full and "distance_fig3" in numbers
        assert any(k.startswith("distance/") for k in logged[row["step"]]) == full
        assert {k: logged[row["step"]][k] for k in numbers} == numbers
    # the samples of the checkpoint (tag validation) and the final ones, as PNGs in the run's media
    for step, tag in ((2, "validation"), (3, "final")):
        files = logged[step][f"{tag}/filenames"]
        assert len(files) == 1 and (run_dir / "files" / files[0]).is_file()
    assert json.loads((out / "run.json").read_text())["report_to"] == "wandb"


def test_report_to_all_writes_tensorboard_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)   # then the wandb run lives in the run folder
    assert {"tensorboard", "wandb"} <= set(resolve_report_to("all"))
    out = tmp_path / "run"
    assert dreambooth.main(["--output_dir", str(out), "--report_to", "all", *FAST, "--max_train_steps", "1"]) == 0
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    [run_file] = (out / "logs" / "wandb").rglob("run-*.wandb")
    assert history(run_file)[1]["loss"] == json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
