"""The app's Robustness tab: report folders under the runs folder, their Markdown and figures; the tab is in
the built UI with its API endpoint."""
import json

from app import robustness as RB
from app import tab_robustness as T
from eval.robustness_progress import Progress
from eval.robustness_runs import RunResult, RunSpec


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
    """A fresh clone: no runs yet, and the Robustness tab still opens on the committed real-weights study, its
    title naming the language task it is (not DreamBooth)."""
    assert "results/tweets-minilm" in RB.report_folders(tmp_path)
    text, figures = RB.show(tmp_path, "results/tweets-minilm")
    assert text.startswith("# Robustness study: glue (tweet\\_polarity)\n\n"
                           "Task: GLUE-style classification and the tweet tasks.\n")
    assert "DreamBooth" not in text
    assert any(f.endswith("fig2_lr_sweep.png") for f in figures)


def test_the_title_names_the_task_from_the_study_command(tmp_path):
    """Older reports say only `# Robustness study: glue`: the study command in commands.txt names the task and
    its data; a folder without one keeps its title."""
    study = tmp_path / "robustness-glue"
    study.mkdir()
    (study / "report.md").write_text("# Robustness study: glue\n\nBase model: `minilm`.\n\n## Learning-rate sweep "
                                     "(Fig. 2)\n\n| a |\n")
    (study / "commands.txt").write_text("# this study\npython -m eval.robustness --task glue --task_name sst2 "
                                        "--methods lora\n")
    text, _ = RB.show(tmp_path, "robustness-glue")
    assert text.splitlines()[:4] == ["# Robustness study: glue (sst2)", "",
                                     "Task: GLUE-style classification and the tweet tasks.", ""]
    assert RB.split_report(text) == (
        "# Robustness study: glue (sst2)\n\nTask: GLUE-style classification and the tweet tasks.\n\n"
        "Base model: `minilm`.", "## Learning-rate sweep (Fig. 2)\n\n| a |")
    (study / "commands.txt").write_text("# this study\npython -m eval.robustness --methods lora\n")
    assert RB.show(tmp_path, "robustness-glue")[0].startswith("# Robustness study: dreambooth\n\n"
                                                              "Task: DreamBooth: a subject from 3-5 photos.")
    (study / "commands.txt").unlink()
    assert RB.show(tmp_path, "robustness-glue")[0].startswith("# Robustness study: glue\n\nBase model")


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


def test_figures_are_shown_whole_between_the_title_and_the_tables(tmp_path):
    """Each figure in its own image at the page's width (not a square gallery thumbnail), as many slots shown as
    the report has figures, the title above them and the tables below."""

    figures = [str(tmp_path / f"fig{i}.png") for i in range(T.MAX_FIGURES + 2)]
    head, tables, *slots = T.parts("# Robustness study: glue\n\ntext\n## Sweep\n\n| a |", figures[:2])
    assert (head, tables) == ("# Robustness study: glue\n\ntext", "## Sweep\n\n| a |")
    assert [(u["value"], u["visible"]) for u in slots] == [(figures[0], True), (figures[1], True)] + \
        [(None, False)] * (T.MAX_FIGURES - 2)
    head, _, *slots = T.parts("# t\n", figures)
    assert all(u["visible"] for u in slots) and head.endswith(f"2 more figure(s) in the report folder: "
                                                              f"{figures[-2]}, {figures[-1]}")


def test_a_study_still_running_is_listed_and_followed(tmp_path, monkeypatch):
    """The study command's progress.json (written by eval.robustness's launchers as runs start and end) makes a
    study the tab lists before it has a report: counts, each run's state, a running run's last logged step, its
    failed run's error; an earlier command's report stays below it; once finished, the tab stops re-reading it.
    A study whose command is gone (this host, no such process) says so instead of 'Running'."""
    monkeypatch.setattr(RB, "RESULTS_DIR", tmp_path / "no-results")
    study = tmp_path / "robustness-dreambooth"
    study.mkdir()
    a, b, c = (RunSpec("lr", m, m, 1.0, 1e-3, 50) for m in ("lora", "delora", "dora"))
    progress = Progress({s.name: s.length for s in (a, b, c)}, study, "ray")
    progress.start(a.name)
    (study / "runs" / a.name).mkdir(parents=True)
    (study / "runs" / a.name / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    progress.ended(RunResult(c, study / "runs" / c.name, "failed", "exit 2: error: bad | --max_train_steps"))
    assert RB.report_folders(tmp_path) == ["robustness-dreambooth"] and RB.is_running(tmp_path, study.name)
    text, figures = RB.show(tmp_path, study.name)
    assert figures == [] and text.startswith("# Robustness study: robustness-dreambooth\n\n**Running** (`--launcher "
                                             "ray` on ")
    assert "1 of 3 runs ended (0 trained, 0 reused, 1 failed); 1 running, 1 queued." in text
    assert f"| `{a.name}` | running | 50 steps | 2 |" in text and f"| `{b.name}` | queued | 50 steps |  |" in text
    assert f"| `{c.name}` | failed (exit 2: error: bad \\| --max\\_train\\_steps) | 50 steps |  |" in text

    (study / "report.md").write_text("# Robustness study: dreambooth\n\nthe earlier command's\n")
    text, _ = RB.show(tmp_path, study.name)
    assert text.startswith("# Robustness study: dreambooth\n\n**Running**") and text.endswith("the earlier command's")

    data = json.loads((study / "progress.json").read_text())
    (study / "progress.json").write_text(json.dumps({**data, "pid": 2**22 + 12345}))   # beyond Linux's pid_max
    assert "**Stopped**: its command (`--launcher ray` on" in RB.show(tmp_path, study.name)[0]
    (study / "progress.json").write_text(json.dumps(data))

    progress.ended(RunResult(a, study / "runs" / a.name, "trained"))
    progress.ended(RunResult(b, study / "runs" / b.name, "reused"))
    progress.close()
    assert not RB.is_running(tmp_path, study.name)
    assert RB.show(tmp_path, study.name)[0] == "# Robustness study: dreambooth\n\nthe earlier command's"
