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
    assert "python -m eval.robustness" in RB.show(tmp_path, None)[0]
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
