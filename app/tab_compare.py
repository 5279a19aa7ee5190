"""The Compare tab: the chosen runs' sample grid (rows = methods, columns = checkpoints), their loss and
weight-distance curves, the metrics table, score against distance (with the Pareto front), and the buttons that
queue eval/subject.py (Score) and eval/report.py (Report) over them.

API names: /compare, /score, /report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from . import commands, compare
from .service import Service
from .widgets import DISTANCE_LABEL, line_plot, plot


@dataclass
class CompareTab:
    runs: gr.Dropdown       # the chosen runs
    refresh: gr.Button      # re-reads the runs folder


class CompareHandlers:
    """What the Compare tab shows for the chosen runs, and the scoring and report jobs it queues."""

    def __init__(self, service: Service, poll_s: float):
        self.service, self.poll_s = service, poll_s

    def compare(self, names, distance, metric):
        """(grid, prompt, distance plot, loss plot, table, score-vs-distance plot, details, gallery)."""
        view = self.service.compare(names, distance)
        prompt = f"Prompt: *{view['prompt']}*" if view["prompt"] else ("" if names else self.service.empty_state())
        key = view["distance_key"]
        distance_png = plot(compare.curve_png(view["distance"], key, DISTANCE_LABEL))
        loss_png = plot(compare.curve_png(view["loss"], "loss", "loss"))
        tradeoff_png = plot(compare.tradeoff_png(compare.tradeoff_points(view["infos"], key, metric), key, metric))
        return (view["grid"], prompt, distance_png, loss_png, view["table"], tradeoff_png, view["details"],
                view["gallery"])

    def score(self, names, protocol=None):
        """The queue's word on each scoring job until none is waiting or running."""
        yield self.service.score(names, protocol=protocol)
        while any(self.service.queue.position(f"eval:{n}") is not None for n in names or []):
            time.sleep(self.poll_s)
            yield self.service.score_status(names)
        yield self.service.score_status(names) or "Nothing to score."

    def report(self, names):
        """(text, figures, files): the queued message first, the report once its job has ended."""
        msg, out = self.service.report(names)
        yield msg, [], []
        if out is None:
            return
        while self.service.queue.position(f"report:{out.name}") is not None:
            time.sleep(self.poll_s)
        text, files = self.service.report_result(out)
        yield text, [f for f in files if f.endswith(".png")], files


def build_tab(service: Service, demo: gr.Blocks, poll_s: float) -> CompareTab:
    handlers = CompareHandlers(service, poll_s)
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            runs = gr.Dropdown(service.run_choices(), value=[], multiselect=True, scale=4, label="Runs",
                               elem_id="compare-runs", allow_custom_value=True)
            distance = gr.Dropdown(list(compare.DISTANCE_KEYS), value="distance_fig3", label="Distance", scale=1,
                                   elem_id="distance-key")
            refresh = gr.Button("Refresh", scale=0, elem_id="refresh")
        prompt = gr.Markdown(service.empty_state(), elem_id="grid-prompt")
        grid = gr.Image(label="Samples: rows = methods, columns = checkpoints (same prompt and seed)", type="pil",
                        format="png", interactive=False, elem_id="sample-grid")
        with gr.Row():
            distance_plot = line_plot("Weight distance of the chosen runs", "compare-distance")
            loss_plot = line_plot("Loss of the chosen runs (and held-out val_loss, where logged)", "compare-loss")
        table = gr.Dataframe(label="Metrics (eval/ scores at the last scored checkpoint)", interactive=False,
                             elem_id="metrics-table")
        with gr.Row():
            tradeoff = line_plot("Score vs. weight distance, every scored checkpoint", "tradeoff")
            metric = gr.Radio(list(compare.EVAL_KEYS), value="dino", label="Score", scale=0, elem_id="tradeoff-metric")
        with gr.Row():
            protocol = gr.Radio(list(commands.PROTOCOLS), value=next(iter(commands.PROTOCOLS)),
                                label="Scoring protocol (eval/subject.py)", elem_id="score-protocol")
            score = gr.Button("Score unscored runs", elem_id="score")
            report = gr.Button("Build report (eval/report.py)", elem_id="report")
        score_status = gr.Markdown(elem_id="score-status")
        with gr.Accordion("Report", open=False):
            report_text = gr.Markdown(elem_id="report-text")
            report_figures = gr.Gallery(label="Report figures", columns=3, height=300, elem_id="report-figures")
            report_files = gr.File(label="Report files", file_count="multiple", interactive=False,
                                   elem_id="report-files")
        details = gr.Markdown(elem_id="run-details")
        gallery = gr.Gallery(label="All samples", columns=8, height=300, fit_columns=False, elem_id="sample-gallery")

    inputs = [runs, distance, metric]
    outputs = [grid, prompt, distance_plot, loss_plot, table, tradeoff, details, gallery]
    gr.on([runs.change, distance.change, metric.change, refresh.click], handlers.compare, inputs, outputs,
          api_name="compare", concurrency_limit=4)
    score.click(handlers.score, [runs, protocol], score_status, api_name="score", concurrency_limit=None).then(
        handlers.compare, inputs, outputs, api_name=False)
    report.click(handlers.report, runs, [report_text, report_figures, report_files], api_name="report",
                 concurrency_limit=None)
    # the empty state as of now (runs may have appeared since the app started)
    demo.load(service.empty_state, None, prompt, api_name=False, queue=False)
    return CompareTab(runs=runs, refresh=refresh)
