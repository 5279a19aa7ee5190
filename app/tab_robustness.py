"""The Robustness tab: the report folders `python -m eval.robustness` wrote under the runs folder, and the
studies committed under results/, each shown as its text and figures (app/robustness.py reads them).

API name: /robustness.
"""
from __future__ import annotations

import gradio as gr

from . import robustness
from .service import Service


def build_tab(service: Service, demo: gr.Blocks) -> None:
    with gr.Tab("Robustness", id="robustness"):
        with gr.Row():
            reports, first, text, figures = robustness.refresh(service.runs_dir, None)
            folder = gr.Dropdown(reports, value=first, label="Report folder", elem_id="robustness-report",
                                 allow_custom_value=True)
            refresh = gr.Button("Refresh", elem_id="robustness-refresh")
        # contain, not cover: a figure is shown whole (its axes labels and legend are the point)
        gallery = gr.Gallery(figures, label="Figures", columns=2, height="auto", object_fit="contain",
                             elem_id="robustness-figures")
        markdown = gr.Markdown(text, elem_id="robustness-text")

    def show(name):
        text, figures = robustness.show(service.runs_dir, name)
        return figures, text

    def refreshed(current):
        choices, value, text, figures = robustness.refresh(service.runs_dir, current)
        return gr.update(choices=choices, value=value), figures, text

    folder.change(show, folder, [gallery, markdown], api_name="robustness", queue=False)
    for event in (refresh.click, demo.load):     # a page opened later sees the reports written since
        event(refreshed, folder, [folder, gallery, markdown], api_name=False, queue=False)
