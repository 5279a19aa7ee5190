"""The app's Robustness tab: report folders under the runs folder, their Markdown and figures; the tab is in
the built UI with its API endpoint."""
from app import robustness as RB


def test_report_folders_and_show(tmp_path):
    report = tmp_path / "robustness-dreambooth"
    (report / "runs" / "lora-lr0.0006-n50").mkdir(parents=True)
    (report / "report.md").write_text("# Robustness study\n\n![fig2_lr_sweep.png](fig2_lr_sweep.png)\n| a |\n")
    (report / "fig2_lr_sweep.png").write_bytes(b"png")
    (tmp_path / "some-run").mkdir()
    found = RB.report_folders(tmp_path)
    assert found[0] == "robustness-dreambooth" and all(f.startswith("results/") for f in found[1:])
    text, figures = RB.show(tmp_path, "robustness-dreambooth")
    assert text.startswith("# Robustness study") and "![" not in text and "| a |" in text
    assert figures == [str(report / "fig2_lr_sweep.png")]
    assert "not a robustness report" in RB.show(tmp_path, "../..")[0]          # nothing outside the runs folder
    assert RB.show(tmp_path, None)[0].startswith("Choose a report folder above")   # the dropdown offers some
    assert "not a robustness report" in RB.show(tmp_path, "results/../../..")[0]   # nor outside results/


def test_the_committed_study_is_offered_on_a_fresh_runs_folder(tmp_path):
    """A fresh clone: no runs yet, and the Robustness tab still opens on the committed real-weights study."""
    assert "results/tweets-minilm" in RB.report_folders(tmp_path)
    text, figures = RB.show(tmp_path, "results/tweets-minilm")
    assert text.startswith("# Robustness study") and "tweet_polarity" in text
    assert any(f.endswith("fig2_lr_sweep.png") for f in figures)


def test_ui_has_the_robustness_tab(tmp_path):
    from app.service import Service
    from app.ui import build

    demo = build(Service(tmp_path))
    assert any(getattr(fn, "api_name", None) == "robustness" for fn in demo.fns.values())


def test_the_empty_state_tells_the_truth(tmp_path, monkeypatch):
    """"No report yet" only when the dropdown offers none; otherwise the tab opens on the newest report, and a
    report written after the page was built is offered (and shown) on refresh."""
    monkeypatch.setattr(RB, "RESULTS_DIR", tmp_path / "no-results")
    choices, value, text, figures = RB.refresh(tmp_path, None)
    assert (choices, value, figures) == ([], None, []) and text.startswith("No robustness report yet")
    (tmp_path / "robustness-glue").mkdir()
    (tmp_path / "robustness-glue" / "report.md").write_text("# Robustness study: glue\n")
    choices, value, text, _ = RB.refresh(tmp_path, None)
    assert choices == ["robustness-glue"] and value == "robustness-glue" and text == "# Robustness study: glue"
    assert RB.show(tmp_path, None)[0] == "Choose a report folder above (1 found)."
    assert RB.refresh(tmp_path, "gone-meanwhile")[1] == "robustness-glue"


def test_formulas_are_shown_as_written():
    """The report's ‖W_merged − W_pre‖_F and mult_* |λ| outside code: escaped so that Markdown draws no italics;
    code spans, fenced blocks and the ** of bold stay as they are."""
    md = ("Distance ‖W_merged − W_pre‖_F; bound `(|λ| + |λ0|)·N`, mult_* |λ|·σ_max(W̄). **2 run(s) failed**\n"
          "```\npython -m eval.robustness --lr_factors 1 2 --output_dir out_dir\n```")
    assert RB.literal_markdown(md) == (
        "Distance ‖W\\_merged − W\\_pre‖\\_F; bound `(|λ| + |λ0|)·N`, mult\\_\\* |λ|·σ\\_max(W̄). **2 run(s) failed**\n"
        "```\npython -m eval.robustness --lr_factors 1 2 --output_dir out_dir\n```")
    # rendered by a CommonMark renderer (the emphasis rules the browser and GitHub follow): the characters as written
    from markdown_it import MarkdownIt

    html = MarkdownIt().render(RB.literal_markdown(md))
    assert "<em>" not in html and "‖W_merged − W_pre‖_F" in html and "mult_* |λ|·σ_max" in html
    assert "<em>" in MarkdownIt().render(md)          # what the tab showed before


def test_figures_are_shown_whole(tmp_path):
    from app.service import Service
    from app.ui import build

    demo = build(Service(tmp_path))
    gallery = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "robustness-figures")
    assert gallery.object_fit == "contain"          # not "cover", which crops a figure to the thumbnail
