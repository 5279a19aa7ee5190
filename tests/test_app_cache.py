"""app/cache.py: what Compare and the run list keep between clicks is found again while the files are
unchanged and recomputed as soon as a file is added, replaced or appended to. No timing: file times are
set explicitly (os.utime) so which entries count as settled is deterministic."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from app import cache, compare
from app import runs as R

from .test_app_compare import fake_run

PAST = 1_600_000_000 * 10**9          # 2020: long settled


def settle(folder, ns=PAST):
    """Every file and folder under `folder` (and itself) gets mtime `ns`: stamps older than FRESH_S."""
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, ns=(ns, ns))


@pytest.fixture(autouse=True)
def empty_caches():
    cache.clear()
    yield
    cache.clear()


def test_lru_keeps_the_most_recently_used_entries():
    lru = cache.LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1                # a is now the most recent
    lru.put("c", 3)                         # evicts b
    assert (lru.get("b"), lru.get("a"), lru.get("c"), len(lru)) == (None, 1, 3, 2)


def test_run_info_is_cached_until_a_file_changes(tmp_path):
    run = fake_run(tmp_path, "a", "lora", steps=(1, 2)).path
    settle(run)
    first = R.info(run)
    hits = cache.RUN_INFO.hits
    again = R.info(run)
    assert cache.RUN_INFO.hits == hits + 1 and again == first and again is not first   # a copy from the cache
    again.checkpoints.append(99)                                       # a caller's change stays its own
    assert R.info(run).checkpoints == [1, 2]

    with open(run / "metrics.jsonl", "a") as f:                        # an appended step
        f.write(json.dumps({"step": 3, "loss": 0.3, "distance_fig3": 0.3}) + "\n")
    settle(run, PAST + 10**9)                                          # settled again, with new stamps
    assert R.info(run).step == 3

    ck = run / "checkpoint-3"                                          # a new checkpoint (a new folder in the run)
    ck.mkdir()
    for f in (*R.ADAPTER_FILES, "trainer_state.json"):
        (ck / f).write_text("{}")
    settle(run, PAST + 2 * 10**9)
    assert R.info(run).checkpoints == [1, 2, 3]


def test_fresh_stamps_are_not_trusted(tmp_path):
    run = fake_run(tmp_path, "a", "lora", steps=(1, 2)).path
    settle(run)
    assert R.info(run).step == 2
    size = len(cache.RUN_INFO)
    with open(run / "metrics.jsonl", "a") as f:                        # just written: mtime is now
        f.write(json.dumps({"step": 3, "loss": 0.3}) + "\n")
    assert R.info(run).step == 3 and len(cache.RUN_INFO) == size       # computed, not stored


def test_a_running_run_is_never_cached(tmp_path):
    run = fake_run(tmp_path, "a", "lora", steps=(1, 2)).path
    (run / R.EXIT_FILE).unlink()
    R.write_pid(run, os.getpid())                                      # this process: alive
    settle(run)
    assert R.info(run).status == "running" and len(cache.RUN_INFO) == 0


def test_metrics_reader_follows_appends_and_replacements(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')              # a half-written last line
    assert [r["step"] for r in R.read_metrics(tmp_path)] == [1]
    with open(path, "a") as f:
        f.write('ss": 0.5}\n')
    assert [r["step"] for r in R.read_metrics(tmp_path)] == [1, 2]
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 7, "loss": 0.1}\n')
    os.replace(tmp, path)                                                      # replaced (a new inode)
    assert [r["step"] for r in R.read_metrics(tmp_path)] == [7]


def test_sample_grid_shows_a_rewritten_sample(tmp_path):
    info = fake_run(tmp_path, "a", "lora", steps=(1,), final=False)
    settle(info.path)
    sample = info.path / "checkpoint-1" / "samples" / "p00-s0.png"
    cell = (26 + 60, 170 + 60)
    assert np.asarray(compare.sample_grid([info]))[cell].tolist() == [0, 200, 30]
    assert np.asarray(compare.sample_grid([info]))[cell].tolist() == [0, 200, 30]   # from the tile cache
    assert cache.TILES.hits == 1
    Image.new("RGB", (32, 32), (250, 10, 10)).save(sample)                   # same name and size, new pixels
    settle(info.path, PAST + 10**9)
    assert np.asarray(compare.sample_grid([info]))[cell].tolist() == [250, 10, 10]


def test_plots_are_rendered_once_per_distinct_data(tmp_path):
    info = fake_run(tmp_path, "a", "lora", steps=(1, 2))
    frame = compare.curves([info], "loss")
    png = compare.curve_png(frame, "loss", "loss")
    assert compare.curve_png(compare.curves([info], "loss"), "loss", "loss") is png    # same data: cached
    assert compare.curve_png(frame, "loss", "another label") is not png
    with open(info.path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.2}) + "\n")
    grown = compare.curves([R.info(info.path)], "loss")
    assert len(grown) == 3 and compare.curve_png(grown, "loss", "loss") != png
    assert png.startswith("data:image/png;base64,")
