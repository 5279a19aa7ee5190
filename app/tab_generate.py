"""The Generate tab: seeded images from any checkpoint of a run (its adapter loaded, or merged into the base
weights), and the checkpoint's adapter exported as a file other tools load (app/generate.py does both).

API names: /checkpoints, /generate, /export.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import generate
from .inputs import InputError
from .service import Service
from .widgets import message


@dataclass
class GenerateTab:
    run: gr.Dropdown        # the run to generate from


def pick_a_run(e: ValueError) -> str:
    """A name that is no run (app.runs.run_path's ValueError) asks for a run; bad input says itself."""
    return message(e if isinstance(e, InputError) else InputError(f"Pick a run first ({e})."))


class GenerateHandlers:
    def __init__(self, service: Service):
        self.service = service

    def checkpoints(self, name, prompt):
        """The run's checkpoints (the last step chosen) and its own prompt, when it has one."""
        try:
            choices, own_prompt = self.service.checkpoints(name)
        except ValueError:
            return gr.update(choices=[], value=None), prompt
        return gr.update(choices=choices, value=generate.default_choice(choices)), own_prompt or prompt

    def generate(self, name, checkpoint, prompt, seed, num_images, steps, guidance, merged):
        try:
            images = self.service.generate_images(name, checkpoint, prompt, int(seed or 0), int(num_images),
                                                  int(steps), float(guidance), bool(merged))
        except ValueError as e:
            return [], pick_a_run(e)
        except Exception as e:
            return [], message(e)
        return images, f"{len(images)} image(s), seed {int(seed or 0)}{', adapter merged' if merged else ''}."

    def export(self, name, checkpoint, label):
        try:
            path = self.service.export_adapter(name, checkpoint, label)
        except ValueError as e:
            return None, pick_a_run(e)
        except Exception as e:
            return None, message(e)
        return str(path), f"Exported {path.name} ({generate.EXPORT_FORMATS.get(label, label)})."


def build_tab(service: Service, demo: gr.Blocks) -> GenerateTab:
    handlers = GenerateHandlers(service)
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column():
                run = gr.Dropdown(service.run_choices(), value=None, label="Run", elem_id="gen-run",
                                  allow_custom_value=True)
                checkpoint = gr.Dropdown([], label="Checkpoint", elem_id="gen-checkpoint", allow_custom_value=True)
                prompt = gr.Textbox("a photo of sks cat", label="Prompt", elem_id="gen-prompt")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="gen-seed")
                    num_images = gr.Slider(1, 4, value=1, step=1, label="Images", elem_id="gen-n")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=25, step=1, label="Denoising steps", elem_id="gen-steps")
                    guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance", elem_id="gen-cfg")
                merged = gr.Checkbox(False, label="Merge the adapter into the base weights", elem_id="gen-merge")
                start = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    export_format = gr.Dropdown(list(generate.EXPORT_FORMATS),
                                                value=next(iter(generate.EXPORT_FORMATS)),
                                                label="Export the checkpoint's adapter as", elem_id="gen-format")
                    export = gr.Button("Export", elem_id="gen-export")
                exported = gr.File(label="Exported adapter (exact: every method as its own LoRA factors)",
                                   elem_id="gen-export-file")
            with gr.Column():
                images = gr.Gallery(label="Images", columns=2, elem_id="gen-images")
                status = gr.Markdown(service.empty_state(), elem_id="gen-msg")

    run.change(handlers.checkpoints, [run, prompt], [checkpoint, prompt], api_name="checkpoints", queue=False)
    # the empty state as of now (runs may have appeared since the app started)
    run.change(lambda name: "" if name else service.empty_state(), run, status, api_name=False, queue=False)
    demo.load(service.empty_state, None, status, api_name=False, queue=False)
    start.click(handlers.generate, [run, checkpoint, prompt, seed, num_images, steps, guidance, merged],
                [images, status], api_name="generate", concurrency_limit=1)
    export.click(handlers.export, [run, checkpoint, export_format], [exported, status], api_name="export",
                 concurrency_limit=1)
    return GenerateTab(run=run)
