"""The page the tab modules assemble (app/ui.py), read from the Blocks without a server."""
from __future__ import annotations

import gradio as gr

from app.service import Service
from app.ui import build


def test_the_page_is_four_tabs_in_order_and_nothing_else_under_the_tabs(tmp_path):
    """The browser labels the tabs by position: any other component directly under gr.Tabs (a State, say)
    shifts the labels (Compare shown as Train)."""
    demo = build(Service(tmp_path))
    (tabs,) = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert [(type(c).__name__, getattr(c, "label", None), getattr(c, "id", None)) for c in tabs.children] == [
        ("Tab", "Train", "train"), ("Tab", "Compare", "compare"), ("Tab", "Generate", "generate"),
        ("Tab", "Robustness", "robustness")]


def test_every_api_name_of_the_docstring_is_served_and_no_other(tmp_path):
    import app.ui

    demo = build(Service(tmp_path))
    served = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    documented = {word.strip(",;.()/") for line in app.ui.__doc__.split("API names", 1)[1].splitlines()
                  for word in line.split() if word.startswith("/")}
    assert served == documented, (served, documented)
