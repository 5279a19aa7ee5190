"""What the tabs share: a line-plot component and the PNG it shows, and an error turned into the message shown
next to the button that caused it."""
from __future__ import annotations

import logging

import gradio as gr
from gradio.components.plot import PlotData

from .inputs import InputError

log = logging.getLogger("lowrank.app")
DISTANCE_LABEL = "‖W − W₀‖ (Frobenius)"


def message(e: Exception) -> str:
    """Bad input as its own words; anything else as its type (the traceback goes to the server log)."""
    if isinstance(e, InputError):
        return f"⚠️ {e}"
    log.exception("unexpected error in a UI handler")
    return f"⚠️ Something went wrong ({type(e).__name__}); see the server log."


def plot(png_url: str) -> PlotData:
    """A PNG already rendered (and cached) by app.compare: gr.Plot sends a PlotData as it is."""
    return PlotData(type="matplotlib", plot=png_url)


def line_plot(label: str, elem_id: str) -> gr.Plot:
    return gr.Plot(label=label, format="png", elem_id=elem_id)
