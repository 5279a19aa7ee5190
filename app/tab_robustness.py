"""The Robustness tab: the report folders `python -m eval.robustness` wrote under the runs folder, and the
studies committed under results/, each shown as its text (its title naming the study's task) and its figures,
one under the other at the width of the page (app/robustness.py reads them). A study still running is shown with
its runs' states and re-read every RUNNING_POLL_S seconds until it ends.

API name: /robustness.
"""
from __future__ import annotations

import gradio as gr

from . import robustness
from .service import Service

RUNNING_POLL_S = 5.0   # how often a study that is still running is re-read
MAX_FIGURES = 8   # eval.robustness writes at most 5 (Figs. 2, 3, 3's samples, 4 and 6)


def parts(text: str, figures: list[str]) -> list:
    """[the report's title and first paragraphs, its tables, one update per figure slot]: a figure slot shows its
    figure or is hidden; figures past the slots are named under the title."""
    head, tables = robustness.split_report(text)
    extra = figures[MAX_FIGURES:]
    head += f"\n\n{len(extra)} more figure(s) in the report folder: {', '.join(extra)}" if extra else ""
    shown = [gr.update(value=f, visible=True) for f in figures[:MAX_FIGURES]]
    return [head, tables, *shown, *[gr.update(value=None, visible=False)] * (MAX_FIGURES - len(shown))]


def build_tab(service: Service, demo: gr.Blocks) -> None:
    with gr.Tab("Robustness", id="robustness"):
        with gr.Row():
            reports, first, text, figures = robustness.refresh(service.runs_dir, None)
            folder = gr.Dropdown(reports, value=first, label="Report folder", elem_id="robustness-report",
                                 allow_custom_value=True)
            refresh = gr.Button("Refresh", elem_id="robustness-refresh")
        head, tables, *shown = parts(text, figures)
        markdown = gr.Markdown(head, elem_id="robustness-text")
        # each figure whole at the page's width (its axes labels and legend are the point): a gallery's square
        # thumbnails showed a wide figure small in a large empty frame
        with gr.Column(elem_id="robustness-figures"):
            slots = [gr.Image(u["value"], visible=u["visible"], type="filepath", interactive=False, show_label=False,
                              elem_id=f"robustness-figure-{i}") for i, u in enumerate(shown)]
        tables_md = gr.Markdown(tables, elem_id="robustness-tables")
        # in the tab: a component directly under gr.Tabs shifts the tab labels in the browser
        was_running, timer = gr.State(False), gr.Timer(RUNNING_POLL_S)
    outputs = [markdown, tables_md, *slots]

    # was_running: whether the study shown was running when last shown, so the timer shows it once more at its end
    def show(name):
        return [*parts(*robustness.show(service.runs_dir, name)), robustness.is_running(service.runs_dir, name)]

    def refreshed(current):
        choices, value, text, figures = robustness.refresh(service.runs_dir, current)
        return [gr.update(choices=choices, value=value), *parts(text, figures),
                robustness.is_running(service.runs_dir, value)]

    def follow(name, was_running):
        """A running study is re-read, and once more when it has just ended (its report); else left as it is."""
        return show(name) if was_running or robustness.is_running(service.runs_dir, name) else \
            [gr.skip()] * (len(outputs) + 1)

    folder.change(show, folder, [*outputs, was_running], api_name="robustness", queue=False)
    timer.tick(follow, [folder, was_running], [*outputs, was_running], api_name=False, queue=False,
               show_progress="hidden")
    for event in (refresh.click, demo.load):     # a page opened later sees the reports written since
        event(refreshed, folder, [folder, *outputs, was_running], api_name=False, queue=False)
