"""A real browser (Playwright driving Debian's headless Chromium) through the whole Train -> Compare
flow. Screenshots go to test-artifacts/ (git-ignored). Needs /usr/bin/chromium:
    apt-get install -y chromium
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from eval.robustness_progress import Progress
from eval.robustness_runs import RunResult, RunSpec

from .test_app_support import running_app, subject_images

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def wait_idle(page):
    """Until no component shows Gradio's loading overlay (an event may re-render after a tab switch)."""
    page.wait_for_timeout(300)
    page.wait_for_function("[...document.querySelectorAll('[data-testid=status-tracker]')]"
                           ".every(e => e.classList.contains('hide') || e.offsetParent === null)", timeout=60_000)


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(30_000)
            yield pg
        finally:
            browser.close()


def test_upload_train_and_compare_in_a_browser(page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    files = subject_images(tmp_path / "subject")
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the gradio_client tests cover `accelerate launch`; here the same trainer runs without the launcher
    with running_app(tmp_path / "runs", launcher="python") as (url, service):
        page.goto(url)
        page.wait_for_selector("#start")
        page.set_input_files("#subject-files input[type=file]", files)
        page.wait_for_selector("#upload-msg :text('3 images ready.')")
        assert page.locator("#subject-preview img").count() == 3
        page.fill("#steps input", "2")
        page.fill("#checkpoint-every input", "1")
        page.get_by_text("More options").click()
        page.fill("#resolution input", "32")
        page.fill("#sample-steps input", "2")
        page.fill("#num-samples input", "1")

        t0 = time.monotonic()
        page.click("#start")
        page.wait_for_selector("#train-progress .lr-progress[data-state=running]")
        page.wait_for_selector("#train-progress .lr-progress[data-state=done]", timeout=240_000)
        page.wait_for_function("document.querySelectorAll('#train-loss img, #train-distance img').length == 2")
        status = page.inner_text("#train-status")
        assert status.count("finished") == 1 and "All runs done" in status, status
        wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / "app-train.png"), full_page=True)

        page.get_by_role("tab", name="Compare").click()
        page.wait_for_selector("#sample-grid img")
        wait_idle(page)
        try:
            page.wait_for_function("(() => { const i = document.querySelector('#sample-grid img');"
                                   " return i && i.complete && i.naturalWidth > 0; })()")
        except sync_api.TimeoutError:   # say what the browser had: a broken image and a stalled one differ
            state = page.evaluate("(() => { const i = document.querySelector('#sample-grid img');"
                                  " return i && {src: i.src, complete: i.complete, width: i.naturalWidth,"
                                  " pending: performance.getEntriesByType('resource').filter("
                                  "e => e.responseEnd === 0).map(e => e.name)}; })()")
            pytest.fail(f"the sample grid never loaded: {state}")
        size = page.evaluate("(() => { const i = document.querySelector('#sample-grid img');"
                             " return [i.naturalWidth, i.naturalHeight]; })()")
        assert size == [170 + 2 * 132, 26 + 132]                # 1 method x 2 checkpoints
        page.wait_for_function("document.querySelectorAll('#sample-gallery img').length >= 2")
        page.wait_for_function("document.querySelectorAll('#compare-distance img').length == 1")
        table = page.inner_text("#metrics-table")
        assert "lora" in table and table.count("finished") == 1
        page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)

        page.get_by_role("tab", name="Generate").click()         # the first new run is preselected
        page.wait_for_function("document.querySelector('#gen-checkpoint input').value == 'final'")
        assert page.input_value("#gen-run input").startswith("delora r8")     # the CLI's defaults
        page.fill("#gen-steps input[type=number]", "2")
        page.click("#generate")
        page.wait_for_selector("#gen-images img")
        page.wait_for_selector("#gen-msg :text('1 image(s), seed 0.')")
        wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / "app-generate.png"), full_page=True)
        assert time.monotonic() - t0 < 240
    assert not errors, errors
    assert (ARTIFACTS / "app-compare.png").stat().st_size > 10_000


def test_the_robustness_tab_shows_the_report_as_written(page, tmp_path):
    """The report's formulas are text (no italics), its title names the study's task (a language study is not
    DreamBooth), its figures are shown whole at a readable size, and the tab opens on the newest report, not on
    "no report yet" beside a dropdown that offers one."""
    from PIL import Image

    study = tmp_path / "runs" / "robustness-glue"
    study.mkdir(parents=True)
    (study / "report.md").write_text("# Robustness study: glue\n\nDistance: ‖W_merged − W_pre‖_F of the "
                                     "layer; bound of the mult_* |λ|·σ_max(W̄) rows.\n\n## Learning-rate sweep "
                                     "(Fig. 2)\n\n| method | accuracy (%) |\n|---|---|\n| lora | 84.4 ± 2.2 |\n")
    (study / "commands.txt").write_text("# this study\npython -m eval.robustness --task glue --task_name "
                                        "tweet_polarity\n")
    Image.new("RGB", (1200, 300), (200, 30, 30)).save(study / "fig2_lr_sweep.png")   # wide, as the figures are
    with running_app(tmp_path / "runs") as (url, service):
        page.goto(url)
        page.get_by_role("tab", name="Robustness").click()
        page.wait_for_selector("#robustness-text :text('Robustness study: glue (tweet_polarity)')")
        text = page.inner_text("#robustness-text")
        assert "Task: GLUE-style classification and the tweet tasks." in text, text
        assert "‖W_merged − W_pre‖_F" in text and "mult_* |λ|·σ_max(W̄)" in text, text
        assert page.locator("#robustness-text em").count() == 0
        assert "84.4 ± 2.2" in page.inner_text("#robustness-tables")
        assert "DreamBooth" not in page.inner_text("body")
        assert page.input_value("#robustness-report input") == "robustness-glue"
        page.wait_for_selector("#robustness-figures img")
        wait_idle(page)
        # the figure fills the page's width at its own aspect ratio: no empty frame around a small picture
        box = page.locator("#robustness-figures img").first.bounding_box()
        column = page.locator("#robustness-figures").bounding_box()
        assert box["width"] >= 0.9 * column["width"] and column["width"] > 1000, (box, column)
        assert abs(box["height"] - box["width"] / 4) <= 0.05 * box["width"] / 4, box
        page.screenshot(path=str(ARTIFACTS / "app-robustness.png"), full_page=True)


def test_a_running_study_is_followed_until_its_report(page, tmp_path):
    """A study whose command is running (its progress.json) is the tab's first choice; the page re-reads it on
    its own (no Refresh) and shows the report once the study has ended."""
    study = tmp_path / "runs" / "robustness-dreambooth"
    study.mkdir(parents=True)
    spec = RunSpec("lr", "lora", "lora", 1.0, 1e-3, 50)
    progress = Progress({spec.name: spec.length}, study, "local")
    progress.start(spec.name)
    with running_app(tmp_path / "runs") as (url, service):
        page.goto(url)
        page.get_by_role("tab", name="Robustness").click()
        page.wait_for_selector("#robustness-text :text('0 of 1 runs ended')")
        assert "Running" in page.inner_text("#robustness-text")
        assert page.input_value("#robustness-report input") == "robustness-dreambooth"
        progress.ended(RunResult(spec, study / "runs" / spec.name, "trained"))
        (study / "report.md").write_text("# Robustness study: dreambooth\n\nthe finished study\n")
        progress.close()
        page.wait_for_selector("#robustness-text :text('the finished study')", timeout=20_000)
        assert "Running" not in page.inner_text("#robustness-text")
