"""The Gradio page: four tabs (Train, Compare, Generate, Robustness), each built with its components and
handlers by its own module (app/tab_*.py); this module only assembles them and keeps the run lists of Compare
and Generate current. A new tab: one module with a `build_tab`, one line in `build`.

API names (for gradio_client): /check_upload, /start, /start_semantic, /follow, /cancel (Train); /runs,
/compare, /score, /report (Compare); /checkpoints, /generate, /export (Generate); /robustness (Robustness).
"""
from __future__ import annotations

import gradio as gr

from . import tab_compare, tab_generate, tab_robustness, tab_train
from .service import Service

# the Train tab's progress bar (Progress.bar_html); passed to launch(), which takes the page's CSS
CSS = """
.lr-progress {position: relative; height: 26px; border-radius: 6px; background: var(--neutral-200, #e5e7eb);
              overflow: hidden; margin: 4px 0;}
.lr-progress-bar {height: 100%; background: var(--color-accent, #f97316); transition: width .4s;}
.lr-progress-label {position: absolute; inset: 0; text-align: center; line-height: 26px; font-weight: 600;}
"""


def build(service: Service, poll_s: float = 1.0) -> gr.Blocks:
    # the page is not DreamBooth's alone: Train also runs semantic maps, and Robustness shows language studies
    with gr.Blocks(title="lowrank: fine-tuning with low-rank adapters") as demo:
        gr.Markdown("## lowrank · fine-tuning with bounded and unbounded low-rank adapters")
        with gr.Tabs():
            train = tab_train.build_tab(service, demo, poll_s)
            compare = tab_compare.build_tab(service, demo, poll_s)
            generate = tab_generate.build_tab(service, demo)
            tab_robustness.build_tab(service, demo)
        link_run_lists(service, demo, train, compare, generate)
    return demo


def link_run_lists(service: Service, demo: gr.Blocks, train: tab_train.TrainTab, compare: tab_compare.CompareTab,
                   generate: tab_generate.GenerateTab) -> None:
    """Compare's and Generate's run lists are re-read on page load and by Compare's Refresh (/runs), and show
    the batch the Train tab has just started."""
    lists = [compare.runs, generate.run]

    def reread(selected=None):
        choices = service.run_choices()
        names = {name for _, name in choices}
        keep = [n for n in (selected or []) if n in names]
        return gr.update(choices=choices, value=keep), gr.update(choices=choices)

    def show_batch(names):
        choices = service.run_choices()
        if not names:                                  # nothing was started: keep the user's choices
            return gr.update(choices=choices), gr.update(choices=choices)
        return gr.update(choices=choices, value=list(names)), gr.update(choices=choices, value=names[0])

    for started in train.started:
        started.then(show_batch, train.jobs, lists, api_name=False)
    compare.refresh.click(reread, compare.runs, lists, api_name="runs", queue=False)
    demo.load(reread, compare.runs, lists, api_name=False, queue=False)
