"""The Train tab: subject images with a preview, the trainer's settings (the defaults of
`training/dreambooth.py --method delora`), Start / Cancel, the semantic-map section, and the live progress
bar, status and curves of the batch that is training.

API names: /check_upload, /start, /start_semantic, /follow, /cancel.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import commands, compare
from .inputs import EXAMPLE_SUBJECT, METHODS, check_form, cli_defaults, preview_images
from .service import Service
from .widgets import DISTANCE_LABEL, line_plot, message, plot

NOTHING_RUNNING = "No training running."


@dataclass
class TrainTab:
    jobs: gr.State      # the run names of the batch last started
    started: list       # the Start events (subject and semantic map): the run lists of other tabs follow them


class TrainHandlers:
    """Start a batch (subject or semantic map), follow it, cancel it: Service calls, errors as the status."""

    def __init__(self, service: Service, poll_s: float):
        self.service, self.poll_s = service, poll_s

    def check_upload(self, paths):
        try:
            msg = self.service.check_upload(paths) if paths else ""
        except Exception as e:
            msg = message(e)
        return preview_images(paths), msg

    def start(self, paths, methods, noun, token, rank, lr, steps, every, delora_lambda, model, seed, resolution,
              sample_steps, num_samples, prior=False, num_class_images=None, embedded=False, *advanced):
        try:
            form = check_form(methods, noun, token, rank, lr, steps, every, delora_lambda, model, seed, resolution,
                              sample_steps, num_samples, prior, num_class_images, *advanced)
            names = self.service.submit(paths, form, embedded=bool(embedded))
        except Exception as e:
            yield ("", message(e), None, None, [], [])
            return
        yield from self.stream(names)

    def start_semantic(self, image_paths, map_paths, embedded, methods, noun, token, rank, lr, steps, every,
                       delora_lambda, model, seed, resolution, sample_steps, num_samples, *advanced):
        try:
            form = check_form(methods, noun or "cat", token or "sks", rank, lr, steps, every, delora_lambda, model,
                              seed, resolution, sample_steps, num_samples, False, None, *advanced)
            names = self.service.submit_semantic(image_paths, map_paths, form, embedded=bool(embedded))
        except Exception as e:
            yield ("", message(e), None, None, [], [])
            return
        yield from self.stream(names)

    def follow(self):
        """A page opened while a batch trains follows it."""
        names = self.service.active_train_jobs()
        if not names:
            yield ("", NOTHING_RUNNING, None, None, [], [])
            return
        yield from self.stream(names)

    def stream(self, names):
        """(bar, status, loss plot, distance plot, names, summary) every poll until the batch is done."""
        for p in self.service.follow(names, poll_s=self.poll_s):
            key = compare.distance_key(p.runs)
            loss = plot(compare.curve_png(compare.curves(p.runs, "loss"), "loss", "loss"))
            distance = plot(compare.curve_png(compare.curves(p.runs, key), key, DISTANCE_LABEL))
            yield (p.bar_html(), p.markdown(), loss, distance, names, p.summary())


def subject_inputs(service: Service) -> tuple[gr.File, gr.Gallery, gr.Markdown, gr.Checkbox]:
    files = gr.File(label=f"Subject images: 3–20 PNG/JPEG/WebP/BMP/GIF/TIFF, ≤ {service.max_image_mb:g} MB each",
                    file_count="multiple", elem_id="subject-files")
    preview = gr.Gallery(label="Preview", columns=5, height=220, interactive=False, elem_id="subject-preview")
    upload_msg = gr.Markdown(elem_id="upload-msg")
    embedded = gr.Checkbox(False, elem_id="subject-embedded",
                           label=f"Train on the {EXAMPLE_SUBJECT} instead (as the CLI does without "
                                 f"--instance_data_dir; uploads are not used)")
    return files, preview, upload_msg, embedded


def settings_inputs() -> tuple[list, list]:
    """([methods, noun, token, rank, lr, steps, every, λ, model, seed, resolution, sample steps, samples]: the
    settings both trainers take, in check_form's order; [prior, class images]: DreamBooth's own)."""
    cli = cli_defaults()          # the tab starts where `training/dreambooth.py --method delora` does
    with gr.Row():
        noun = gr.Textbox("cat", label="Class noun", elem_id="class-noun")
        token = gr.Textbox("sks", label="Unique token", elem_id="unique-token")
    methods = gr.CheckboxGroup(list(METHODS), value=[cli["method"]], elem_id="methods",
                               label="Methods (trained one after another)")
    with gr.Row():
        rank = gr.Number(cli["rank"], precision=0, label="Rank", elem_id="rank")
        lr = gr.Textbox("", label="Learning rate", placeholder="per-method default", elem_id="lr")
        delora_lambda = gr.Number(cli["delora_lambda"], label="λ (DeLoRA)", elem_id="delora-lambda")
    with gr.Row():
        steps = gr.Number(cli["steps"], precision=0, label="Steps", elem_id="steps")
        every = gr.Number(cli["checkpoint_every"], precision=0, label="Checkpoint every", elem_id="checkpoint-every")
    model = gr.Dropdown(list(commands.PRESETS), value="tiny", allow_custom_value=True, label="Base model",
                        elem_id="base-model",
                        info=f"{', '.join(commands.PRESETS)}: built-in, random weights, machinery only; or type a "
                             f"hub name or a local pipeline folder")
    with gr.Accordion("More options", open=False):
        with gr.Row():
            seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
            resolution = gr.Number(None, precision=0, label="Resolution (blank: trainer default)",
                                   elem_id="resolution")
        with gr.Row():
            sample_steps = gr.Number(None, precision=0, label="Sample denoising steps", elem_id="sample-steps")
            num_samples = gr.Number(None, precision=0, label="Samples per checkpoint", elem_id="num-samples")
        with gr.Row():
            prior = gr.Checkbox(False, label="Prior preservation (class images generated by the base model first: "
                                             "slow on a CPU)", elem_id="prior")
            num_class_images = gr.Number(50, precision=0, label="Class images", elem_id="num-class-images")
    settings = [methods, noun, token, rank, lr, steps, every, delora_lambda, model, seed, resolution, sample_steps,
                num_samples]
    return settings, [prior, num_class_images]


def advanced_inputs() -> list:
    """[min-SNR γ, noise offset, EMA decay, cache latents]: check_form's advanced arguments, in its order; 0 or
    blank is off (the trainer's default run). Both trainers take them all; caching is on where it is exact. Each
    number starts at 0 (off), not blank: an API client may leave it out."""
    with gr.Accordion("Advanced training", open=False, elem_id="advanced"):
        with gr.Row():
            snr_gamma = gr.Number(0, label="Min-SNR γ (0: off; 5 is usual)", elem_id="snr-gamma",
                                  info="--snr_gamma: each image's loss weighted by min(SNR(t), γ)/SNR(t)")
            noise_offset = gr.Number(0, label="Noise offset (0: off; 0.05–0.1 typical)",
                                     elem_id="noise-offset",
                                     info="--noise_offset: helps very dark / very bright images (SD, SDXL)")
        with gr.Row():
            ema_decay = gr.Number(0, label="EMA decay (0: off; 0.99 for a few hundred steps)", elem_id="ema-decay",
                                  info="--ema_decay: also keeps a moving average of the adapter, offered in Generate "
                                       "as 'step N (EMA)'")
            cache_latents = gr.Checkbox(True, label="Cache latents where exact", elem_id="cache-latents",
                                        info="--cache_latents where the adapter stays the same bits (semantic "
                                             "maps; DreamBooth when every subject image is square): no VAE "
                                             "encoding per step")
    return [snr_gamma, noise_offset, ema_decay, cache_latents]


def semantic_inputs() -> tuple[list, gr.Button]:
    """([images, maps, embedded], start button) of the semantic-map section."""
    with gr.Accordion("Semantic map → image (training/semantic_map.py)", open=False, elem_id="seg-section"):
        gr.Markdown("Trains the methods, rank, steps and options above to draw images that follow ADE20K label "
                    "maps. Upload images and their maps under the same file names (maps: PNG, class ids 0 = other, "
                    "1..150, or ADE palette colours), or use the embedded example set. Subject images, token and "
                    "class noun are not used.")
        embedded = gr.Checkbox(True, label="Use the embedded example set", elem_id="seg-embedded")
        with gr.Row():
            images = gr.File(label="Images", file_count="multiple", elem_id="seg-images")
            maps = gr.File(label="Label maps (PNG)", file_count="multiple", elem_id="seg-maps")
        start = gr.Button("Start semantic-map training", elem_id="seg-start")
    return [images, maps, embedded], start


def build_tab(service: Service, demo: gr.Blocks, poll_s: float) -> TrainTab:
    handlers = TrainHandlers(service, poll_s)
    with gr.Tab("Train", id="train"):
        jobs = gr.State([])      # in the tab: one directly under gr.Tabs shifts the tab labels in the browser
        with gr.Row():
            with gr.Column(scale=1):
                files, preview, upload_msg, embedded = subject_inputs(service)
            with gr.Column(scale=1):
                settings, prior_inputs = settings_inputs()
                advanced = advanced_inputs()
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                semantic, semantic_start = semantic_inputs()
        progress = gr.HTML("", elem_id="train-progress")
        status = gr.Markdown(NOTHING_RUNNING, elem_id="train-status")
        batch = gr.JSON(visible=False, label="Runs of this batch")      # for API clients
        with gr.Row():
            loss_plot = line_plot("Loss", "train-loss")
            distance_plot = line_plot("Weight distance ‖W − W₀‖", "train-distance")

    outputs = [progress, status, loss_plot, distance_plot, jobs, batch]
    files.change(handlers.check_upload, files, [preview, upload_msg], api_name="check_upload")
    load = demo.load(handlers.follow, None, outputs, api_name="follow", show_progress="hidden")
    # one batch per page at a time (trigger_mode="once"); other pages queue behind it and see their position
    started = [start.click(handlers.start, [files, *settings, *prior_inputs, embedded, *advanced], outputs,
                           api_name="start",
                           concurrency_limit=None, show_progress="hidden", cancels=[load], trigger_mode="once"),
               semantic_start.click(handlers.start_semantic, semantic + settings + advanced, outputs,
                                    api_name="start_semantic",
                                    concurrency_limit=None, show_progress="hidden", cancels=[load],
                                    trigger_mode="once")]
    cancel.click(lambda names: service.cancel(names), jobs, status, api_name="cancel", queue=False)
    return TrainTab(jobs=jobs, started=started)
