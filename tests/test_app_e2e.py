"""The app end to end through gradio_client, with the real trainer (training/dreambooth.py through
`accelerate launch`) on the tiny preset: upload, train two methods, compare, generate, cancel, bad
input, restart."""
from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import compare
from app import generate as G
from app import runs as R
from app.inputs import check_form
from app.service import Service

from . import test_eval_support as support
from .test_app_support import FAST, running_app, subject_images

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


def start_args(files, methods, **over):
    p = {**FAST, **over}
    return ([handle_file(f) for f in files], methods, "cat", "sks", p["rank"], p["learning_rate"], p["steps"],
            p["checkpoint_every"], p["delora_lambda"], p["model"], p["seed"], p["resolution"], p["sample_steps"],
            p["num_samples"])


def plot_png(value) -> np.ndarray:
    """A gr.Plot output (matplotlib, sent as a base64 PNG) as pixels."""
    assert value["type"] == "matplotlib"
    data = base64.b64decode(value["plot"].split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def has_line_colour(pixels: np.ndarray, hex_colour: str) -> bool:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - rgb).sum(-1) < 40).sum()) > 20


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    with running_app(runs) as (url, service):
        yield url, service, runs


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0], verbose=False)


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return subject_images(tmp_path_factory.mktemp("subject"))


@pytest.fixture(scope="module")
def trained(client, subject):
    """lora + delora, 2 steps each, streamed: every yield of the /start generator is kept."""
    job = client.submit(*start_args(subject, ["lora", "delora"]), api_name="/start")
    while not job.done():
        time.sleep(0.2)
    outputs = job.outputs()
    batch = outputs[-1][4]
    return {"outputs": outputs, "names": [b["name"] for b in batch], "batch": batch}


def test_upload_preview_and_check(client, subject):
    preview, msg = client.predict([handle_file(f) for f in subject], api_name="/check_upload")
    assert len(preview) == 3 and msg == "3 images ready."


def test_train_two_methods_with_live_progress(app, trained):
    _, _, runs = app
    outputs = trained["outputs"]
    bar, status, loss, dist, batch = outputs[-1]
    assert 'data-state="done"' in bar and "All runs done" in status
    assert [(b["method"], b["status"], b["step"]) for b in batch] == [("lora", "finished", 2),
                                                                       ("delora", "finished", 2)]
    # live: it streamed while training, the bar moved and the curves grew
    assert len(outputs) >= 3
    assert any('data-state="running"' in o[0] for o in outputs[:-1])
    pcts = [int(re.search(r'data-pct="(\d+)"', o[0]).group(1)) for o in outputs if "data-pct" in o[0]]
    assert pcts == sorted(pcts) and pcts[-1] == 100
    assert any("running" in o[1] or "waiting, position 1" in o[1] for o in outputs[:-1])
    for fig in (loss, dist):                                   # one line per run, in its own colour
        pixels = plot_png(fig)
        assert has_line_colour(pixels, compare.PALETTE[0]) and has_line_colour(pixels, compare.PALETTE[1])
    assert not has_line_colour(plot_png(outputs[0][3]), compare.PALETTE[1])   # delora had not started
    for name in trained["names"]:                              # what the trainer and the app left in the run
        d = runs / name
        assert sorted(p.name for p in (d / "instance_images").iterdir()) == ["00_my_cat_1.png", "01_cat1.png",
                                                                           "02_cat2.png"]
        assert R.is_adapter_dir(d) and [s for s, _ in R.checkpoints(d)] == [1, 2]
        assert "done: 2 steps" in (d / R.LOG_FILE).read_text()
        assert R.info(d).status == "finished"


def test_compare_shows_both_runs_with_samples_and_curves(app, client, trained):
    lora, delora = trained["names"]
    grid, prompt, dist, loss, table, tradeoff, details, gallery = client.predict(
        trained["names"], "distance_fig3", "dino", api_name="/compare")
    with Image.open(grid) as im:                               # 2 rows (methods) x 2 columns (checkpoints)
        assert im.size == (170 + 2 * 132, 26 + 2 * 132)
        cell = np.asarray(im.convert("RGB"))[26:26 + 128, 170:170 + 128]
        assert cell.std() > 5                                  # a sample was pasted, not a blank cell
    assert prompt == "Prompt: *a photo of sks cat*"
    assert [g["caption"].split(" · ")[:2] for g in gallery] == [
        ["lora r4", "step 1"], ["lora r4", "step 2"], ["delora r4", "step 1"], ["delora r4", "step 2"]]
    assert all(Path(g["image"]).is_file() for g in gallery)
    for fig in (dist, loss):
        pixels = plot_png(fig)
        assert has_line_colour(pixels, compare.PALETTE[0]) and has_line_colour(pixels, compare.PALETTE[1])
    curve = compare.curves(app[1].run_infos(trained["names"]), "distance_fig3")   # the data drawn
    assert set(curve["run"]) >= {f"lora · {lora}", f"delora · {delora}"} and (curve["value"] > 0).all()
    assert [row[:2] + [row[4]] for row in table["data"]] == [[lora, "lora", "finished"],
                                                            [delora, "delora", "finished"]]
    assert details == ""


def test_generate_is_seeded_and_reproducible(client, trained):
    lora = trained["names"][0]
    ckpt, prompt = client.predict(lora, "", api_name="/checkpoints")
    assert prompt == "a photo of sks cat"
    assert ckpt["choices"] == [["step 1", "step 1"], ["step 2", "step 2"], ["final", "final"],
                               [G.BASE, G.BASE]] and ckpt["value"] == "final"

    def gen(seed, merged=False, checkpoint="step 1"):
        images, msg = client.predict(lora, checkpoint, "a photo of sks cat", seed, 1, 2, 7.5, merged,
                                     api_name="/generate")
        assert len(images) == 1, msg
        with Image.open(images[0]["image"]) as im:
            return np.asarray(im.convert("RGB")).astype(int)

    a, b = gen(3), gen(3)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, gen(4))
    assert np.abs(gen(3, merged=True) - a).max() <= 2           # merged = unmerged up to rounding
    assert np.array_equal(gen(3, checkpoint="final"), gen(3, checkpoint="step 2"))   # the same adapter
    _, msg = client.predict(lora, "step 99", "x", 0, 1, 2, 7.5, False, api_name="/generate")
    assert msg.startswith("⚠️") and "No checkpoint" in msg


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_bad_input_gives_a_message_and_writes_nothing(app, client, subject, tmp_path):
    _, _, runs = app
    before_runs, before_cwd, before_base = tree(runs), set(os.listdir()), set(os.listdir(runs.parent))
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (7000, 6000), (10, 20, 30)).save(huge)      # 42 MP, a small file
    cases = [
        (start_args([], ["lora"]), "Upload 3–20 images"),
        (start_args([], ["lora"]), "or tick 'Train on the embedded example subject"),
        (start_args(subject + [str(fake)], ["lora"]), "fake is not an image"),
        (start_args(subject + [str(text)], ["lora"]), "notes is not an image"),
        (start_args(subject + [str(huge)], ["lora"]), "7000×6000 pixels is too large"),
        (start_args(subject, ["lora"], steps=0), "Steps must be between 1"),
        (start_args(subject, ["lora"], model="/no/such/model"), "no such folder"),
        (start_args(subject, ["lora"], model="someone/unknown-model"), "not in the local Hugging Face cache"),
        (start_args(subject, []), "Pick at least one method"),
    ]
    for args, expected in cases:
        bar, status, loss, dist, batch = client.predict(*args, api_name="/start")
        assert status.startswith("⚠️") and expected in status, status
        assert "Traceback" not in status and bar == "" and batch == []
    _, msg = client.predict([handle_file(f) for f in subject + [str(fake)]], api_name="/check_upload")
    assert "fake is not an image" in msg
    assert tree(runs) == before_runs                            # nothing written, not even in the runs dir
    assert set(os.listdir()) == before_cwd and set(os.listdir(runs.parent)) == before_base


def test_a_run_on_the_embedded_subject(client, app):
    """No upload, the embedded subject ticked: the run trains on the CLI's example cat and finishes."""
    _, service, runs = app
    bar, status, loss, dist, batch = client.predict(*start_args([], ["delora"]), False, None, True,
                                                    api_name="/start")
    assert [b["status"] for b in batch] == ["finished"], status
    run = runs / batch[0]["name"]
    assert not (run / "instance_images").exists()
    args = R.read_json(run / "run.json")["args"]
    assert args["instance_data_dir"] is None and args["instance_prompt"] == "a photo of sks cat"
    assert R.read_json(run / R.APP_JSON)["subject"] == "embedded" and R.checkpoints(run)


def test_cancel_keeps_the_last_checkpoint_and_the_queue_shows_positions(app, subject, tmp_path):
    _, service, runs = app
    form = check_form(["lora", "dora"], "cat", "sks", 4, "", 40, 1, 15, "tiny", 0, 32, 1, 1)
    form.extra = {"debug_step_delay": 0.5}                     # the trainer's test hook: slow steps
    names = service.submit(subject, form)
    lora_dir, dora_dir = runs / names[0], runs / names[1]
    deadline = time.monotonic() + 90
    while not R.checkpoints(lora_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    text = service.progress(names).markdown()
    assert "running, step" in text and "waiting, position 1 in the queue (1 job(s) ahead)" in text
    pid = R.read_json(lora_dir / R.PID_FILE)["pid"]
    assert service.cancel(names).startswith("Cancelling 2 run(s)")
    assert service.queue.wait(names, timeout=30)
    lora, dora = R.info(lora_dir), R.info(dora_dir)
    assert lora.status == "cancelled" and len(lora.checkpoints) >= 1 and lora.step < 40
    assert dora.status == "cancelled" and R.PID_FILE not in os.listdir(dora_dir)
    assert R.process_start(pid) is None
    with pytest.raises(ProcessLookupError):                    # the whole process group is gone
        os.killpg(pid, 0)
    # the kept checkpoint is complete: it loads and generates
    images = service.generator.generate(lora_dir, f"step {lora.checkpoints[-1]}", "a photo of sks cat", 0, 1, 1)
    assert images[0].size == (32, 32)
    assert service.compare([lora_dir.name])["grid"] is not None


def test_runs_reappear_after_a_restart_and_dead_runs_show_failed(app, client, trained):
    _, _, runs = app
    dead = runs / "20250101-000000-dora-r4"
    dead.mkdir()
    R.write_json(dead / R.APP_JSON, {"method": "dora", "rank": 4, "max_train_steps": 9, "created": 1.0})
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    R.write_pid(dead, p.pid)
    (dead / R.LOG_FILE).write_text("training dora\nRuntimeError: CUDA out of memory\n")

    restarted = Service(runs)                                   # a new app process on the same runs dir
    try:
        status = {r.name: r.status for r in restarted.runs()}
        assert all(status[n] == "finished" for n in trained["names"]) and status[dead.name] == "failed"
    finally:
        restarted.close()
    chosen, _ = client.predict(api_name="/runs")
    labels = {value: label for label, value in chosen["choices"]}
    assert labels[dead.name].endswith("[failed]") and labels[trained["names"][0]].endswith("[finished]")
    *_, table, _, details, _ = client.predict([dead.name], "distance_fig3", "dino", api_name="/compare")
    assert table["data"][0][4] == "failed"
    assert "died" in details and "CUDA out of memory" in details


def test_cancel_when_idle(client):
    assert client.predict(api_name="/cancel") == "Nothing to cancel."


FAKE_SCORER = """
import argparse, json, pathlib
p = argparse.ArgumentParser(); p.add_argument("--run_dir"); p.add_argument("--max_prompts")
a, rest = p.parse_known_args()
assert a.max_prompts == "3", "the app's default protocol is the quick one"
run = pathlib.Path(a.run_dir)
steps = sorted(int(c.name.split("-")[1]) for c in run.glob("checkpoint-*"))
with open(run / "eval.jsonl", "w") as f:
    for s in steps:
        f.write(json.dumps({"step": s, "dino": 0.5 + s / 100, "clip_i": 0.7, "clip_t": 0.25}) + "\\n")
print("scored", len(steps))
"""
FAKE_REPORTER = """
import argparse, pathlib
from PIL import Image
p = argparse.ArgumentParser(); p.add_argument("runs", nargs="+"); p.add_argument("--out"); a = p.parse_args()
out = pathlib.Path(a.out)
(out / "report.md").write_text("| run |\\n|---|\\n" + "".join(f"| {pathlib.Path(r).name} |\\n" for r in a.runs))
Image.new("RGB", (20, 10), "red").save(out / "distance.png")
"""


@pytest.fixture
def stand_in_eval(app, tmp_path):
    """eval/subject.py and eval/report.py stand-ins with the contract's outputs, for the app's plumbing
    (queue, status, table, files). The real eval/ is exercised by test_score_with_the_real_eval."""
    service = app[1]
    (tmp_path / "scorer.py").write_text(FAKE_SCORER)
    (tmp_path / "reporter.py").write_text(FAKE_REPORTER)
    saved = service.scorer, service.reporter
    service.scorer = [sys.executable, str(tmp_path / "scorer.py")]
    service.reporter = [sys.executable, str(tmp_path / "reporter.py")]
    yield service
    service.scorer, service.reporter = saved
    for name in ("eval.jsonl", "eval.log"):
        for run in app[2].glob(f"*/{name}"):
            run.unlink()


def test_score_button_fills_the_metrics_table(client, trained, stand_in_eval):
    names = trained["names"]
    msg = client.predict(names, api_name="/score")
    assert all(f"`{n}`: scoring finished" in msg for n in names), msg
    *_, table, tradeoff, _, _ = client.predict(names, "distance_fig3", "dino", api_name="/compare")
    cols = table["headers"]
    for row in table["data"]:
        assert row[cols.index("scored step")] == 2 and row[cols.index("dino")] == pytest.approx(0.52)
        assert row[cols.index("clip_t")] == pytest.approx(0.25)
    pixels = plot_png(tradeoff)                                 # both runs' scored checkpoints are plotted
    assert has_line_colour(pixels, compare.PALETTE[0]) and has_line_colour(pixels, compare.PALETTE[1])
    again = stand_in_eval.score(names)
    assert again.startswith("Nothing to score.") and "already scored" in again


def test_report_button_shows_the_report(app, client, trained, stand_in_eval):
    text, figures, files = client.predict(trained["names"], api_name="/report")
    assert all(n in text for n in trained["names"])
    assert [Path(f["image"]).suffix for f in figures] == [".png"]
    assert sorted(Path(f).name for f in files) == ["distance.png", "report.md"]
    assert len(list((app[2] / "_reports").iterdir())) == 1            # inside the runs dir
    assert all(r.name != "_reports" for r in stand_in_eval.runs())    # and not listed as a run


def test_score_and_report_with_the_real_eval(app, client, trained, tmp_path):
    """eval/subject.py and eval/report.py themselves, with tiny random DINO/CLIP models saved locally
    (the eval tests' builders): the offline stand-ins for facebook/dino-vits16 and openai/clip."""
    service = app[1]
    dino, clip = support.build_dino(tmp_path / "dino"), support.build_clip(tmp_path / "clip")
    saved = service.eval_args
    service.eval_args = ["--dino_model", str(dino), "--clip_model", str(clip), "--num_inference_steps", "2",
                         "--checkpoints", "last"]
    lora = trained["names"][0]
    try:
        msg = client.predict([lora], "quick (3 prompts × 1 image)", api_name="/score")
    finally:
        service.eval_args = saved
    assert f"`{lora}`: scoring finished" in msg, msg
    rows = R.read_eval(app[2] / lora)
    assert [r["step"] for r in rows] == [2] and {"dino", "clip_i", "clip_t"} <= set(rows[0])
    *_, table, tradeoff, _, _ = client.predict([lora], "distance_fig3", "clip_t", api_name="/compare")
    assert table["data"][0][table["headers"].index("scored step")] == 2
    assert has_line_colour(plot_png(tradeoff), compare.PALETTE[0])
    text, figures, files = client.predict(trained["names"], api_name="/report")
    assert "report.md" in {Path(f).name for f in files} and figures, text
    (app[2] / lora / "eval.jsonl").unlink()                     # leave the run as the other tests expect
