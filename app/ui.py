"""The Gradio Blocks: four tabs (Train, Compare, Generate, Robustness) wired to Service. No logic lives here
beyond turning InputError into a message next to the button that caused it.

API names (for gradio_client): /check_upload, /start, /start_semantic, /follow, /cancel, /runs, /compare, /score,
/report, /checkpoints, /generate.
"""
from __future__ import annotations

import logging
import time

import gradio as gr
from gradio.components.plot import PlotData

from . import commands, compare
from . import generate as G
from . import robustness as RB
from . import runs as R
from .inputs import EXAMPLE_SUBJECT, METHODS, InputError, check_form, cli_defaults, preview_images
from .service import Service

log = logging.getLogger("lowrank.app")
DIST_LABEL = "‖W − W₀‖ (Frobenius)"

CSS = """
.lr-progress {position: relative; height: 26px; border-radius: 6px; background: var(--neutral-200, #e5e7eb);
              overflow: hidden; margin: 4px 0;}
.lr-progress-bar {height: 100%; background: var(--color-accent, #f97316); transition: width .4s;}
.lr-progress-label {position: absolute; inset: 0; text-align: center; line-height: 26px; font-weight: 600;}
"""


def _message(e: Exception) -> str:
    if isinstance(e, InputError):
        return f"⚠️ {e}"
    log.exception("unexpected error in a UI handler")
    return f"⚠️ Something went wrong ({type(e).__name__}); see the server log."


def plot(png_url: str) -> PlotData:
    """A PNG already rendered (and cached) by app.compare: gr.Plot sends a PlotData as it is."""
    return PlotData(type="matplotlib", plot=png_url)


def build(service: Service, poll_s: float = 1.0) -> gr.Blocks:

    def line_plot(label, elem_id):
        return gr.Plot(label=label, format="png", elem_id=elem_id)

    cli = cli_defaults()          # the Train tab starts where `training/dreambooth.py --method delora` does
    with gr.Blocks(title="lowrank: DreamBooth with low-rank adapters") as demo:   # CSS goes to launch()
        gr.Markdown("## lowrank · DreamBooth with bounded and unbounded low-rank adapters")
        jobs = gr.State([])
        with gr.Tabs():
            # ------------------------------------------------------------------ Train
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=1):
                        files = gr.File(label=f"Subject images: 3–20 PNG/JPEG/WebP/BMP/GIF/TIFF, "
                                              f"≤ {service.max_image_mb:g} MB each", file_count="multiple",
                                        elem_id="subject-files")
                        preview = gr.Gallery(label="Preview", columns=5, height=220, interactive=False,
                                             elem_id="subject-preview")
                        upload_msg = gr.Markdown(elem_id="upload-msg")
                        embedded = gr.Checkbox(False, elem_id="subject-embedded",
                                               label=f"Train on the {EXAMPLE_SUBJECT} instead (as the CLI does "
                                                     f"without --instance_data_dir; uploads are not used)")
                    with gr.Column(scale=1):
                        with gr.Row():
                            noun = gr.Textbox("cat", label="Class noun", elem_id="class-noun")
                            token = gr.Textbox("sks", label="Unique token", elem_id="unique-token")
                        methods = gr.CheckboxGroup(list(METHODS), value=[cli["method"]], elem_id="methods",
                                                   label="Methods (trained one after another)")
                        with gr.Row():
                            rank = gr.Number(cli["rank"], precision=0, label="Rank", elem_id="rank")
                            lr = gr.Textbox("", label="Learning rate", placeholder="per-method default", elem_id="lr")
                            lam = gr.Number(cli["delora_lambda"], label="λ (DeLoRA)", elem_id="delora-lambda")
                        with gr.Row():
                            steps = gr.Number(cli["steps"], precision=0, label="Steps", elem_id="steps")
                            every = gr.Number(cli["checkpoint_every"], precision=0, label="Checkpoint every",
                                              elem_id="checkpoint-every")
                        model = gr.Textbox("tiny", label="Base model", elem_id="base-model",
                                           info="'tiny' (built-in, random weights: machinery only), a hub name "
                                                "or a local pipeline folder")
                        with gr.Accordion("More options", open=False):
                            with gr.Row():
                                seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                                res = gr.Number(None, precision=0, label="Resolution (blank: trainer default)",
                                                elem_id="resolution")
                            with gr.Row():
                                sample_steps = gr.Number(None, precision=0, label="Sample denoising steps",
                                                         elem_id="sample-steps")
                                n_samples = gr.Number(None, precision=0, label="Samples per checkpoint",
                                                      elem_id="num-samples")
                            with gr.Row():
                                prior = gr.Checkbox(False, label="Prior preservation (class images generated by the "
                                                                 "base model first: slow on a CPU)", elem_id="prior")
                                n_class = gr.Number(50, precision=0, label="Class images", elem_id="num-class-images")
                        with gr.Row():
                            start = gr.Button("Start training", variant="primary", elem_id="start")
                            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                        with gr.Accordion("Semantic map → image (training/semantic_map.py)", open=False,
                                          elem_id="seg-section"):
                            gr.Markdown("Trains the methods, rank, steps and options above to draw images that "
                                        "follow ADE20K label maps. Upload images and their maps under the same "
                                        "file names (maps: PNG, class ids 0 = other, 1..150, or ADE palette "
                                        "colours), or use the embedded example set. Subject images, token and "
                                        "class noun are not used.")
                            seg_embedded = gr.Checkbox(True, label="Use the embedded example set",
                                                       elem_id="seg-embedded")
                            with gr.Row():
                                seg_images = gr.File(label="Images", file_count="multiple", elem_id="seg-images")
                                seg_maps = gr.File(label="Label maps (PNG)", file_count="multiple",
                                                   elem_id="seg-maps")
                            seg_start = gr.Button("Start semantic-map training", elem_id="seg-start")
                progress = gr.HTML("", elem_id="train-progress")
                status = gr.Markdown("No training running.", elem_id="train-status")
                batch = gr.JSON(visible=False, label="Runs of this batch")      # for API clients
                with gr.Row():
                    loss_plot = line_plot("Loss", "train-loss")
                    dist_plot = line_plot("Weight distance ‖W − W₀‖", "train-distance")

            # ------------------------------------------------------------------ Compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    chosen = gr.Dropdown(service.run_choices(), value=[], multiselect=True, scale=4,
                                         label="Runs", elem_id="compare-runs", allow_custom_value=True)
                    dist_key = gr.Dropdown(list(compare.DISTANCE_KEYS), value="distance_fig3",
                                           label="Distance", scale=1, elem_id="distance-key")
                    refresh = gr.Button("Refresh", scale=0, elem_id="refresh")
                prompt_md = gr.Markdown(service.empty_state(), elem_id="grid-prompt")
                grid = gr.Image(label="Samples: rows = methods, columns = checkpoints (same prompt and seed)",
                                type="pil", format="png", interactive=False, elem_id="sample-grid")
                with gr.Row():
                    cmp_dist = line_plot("Weight distance of the chosen runs", "compare-distance")
                    cmp_loss = line_plot("Loss of the chosen runs", "compare-loss")
                table = gr.Dataframe(label="Metrics (eval/ scores at the last scored checkpoint)", interactive=False,
                                     elem_id="metrics-table")
                with gr.Row():
                    tradeoff = line_plot("Score vs. weight distance, every scored checkpoint", "tradeoff")
                    metric = gr.Radio(list(compare.EVAL_KEYS), value="dino", label="Score", scale=0,
                                      elem_id="tradeoff-metric")
                with gr.Row():
                    protocol = gr.Radio(list(commands.PROTOCOLS), value=next(iter(commands.PROTOCOLS)),
                                        label="Scoring protocol (eval/subject.py)", elem_id="score-protocol")
                    score_btn = gr.Button("Score unscored runs", elem_id="score")
                    report_btn = gr.Button("Build report (eval/report.py)", elem_id="report")
                score_md = gr.Markdown(elem_id="score-status")
                with gr.Accordion("Report", open=False):
                    report_md = gr.Markdown(elem_id="report-text")
                    report_imgs = gr.Gallery(label="Report figures", columns=3, height=300,
                                             elem_id="report-figures")
                    report_files = gr.File(label="Report files", file_count="multiple", interactive=False,
                                           elem_id="report-files")
                details = gr.Markdown(elem_id="run-details")
                gallery = gr.Gallery(label="All samples", columns=8, height=300, fit_columns=False,
                                     elem_id="sample-gallery")

            # ------------------------------------------------------------------ Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        g_run = gr.Dropdown(service.run_choices(), value=None, label="Run", elem_id="gen-run",
                                            allow_custom_value=True)
                        g_ckpt = gr.Dropdown([], label="Checkpoint", elem_id="gen-checkpoint",
                                             allow_custom_value=True)
                        g_prompt = gr.Textbox("a photo of sks cat", label="Prompt", elem_id="gen-prompt")
                        with gr.Row():
                            g_seed = gr.Number(0, precision=0, label="Seed", elem_id="gen-seed")
                            g_n = gr.Slider(1, 4, value=1, step=1, label="Images", elem_id="gen-n")
                        with gr.Row():
                            g_steps = gr.Slider(1, 100, value=25, step=1, label="Denoising steps",
                                                elem_id="gen-steps")
                            g_cfg = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance", elem_id="gen-cfg")
                        g_merge = gr.Checkbox(False, label="Merge the adapter into the base weights",
                                              elem_id="gen-merge")
                        g_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                        with gr.Row():
                            g_fmt = gr.Dropdown(list(G.EXPORT_FORMATS), value=next(iter(G.EXPORT_FORMATS)),
                                                label="Export the checkpoint's adapter as", elem_id="gen-format")
                            g_export = gr.Button("Export", elem_id="gen-export")
                        g_file = gr.File(label="Exported adapter (exact: every method as its own LoRA factors)",
                                         elem_id="gen-export-file")
                    with gr.Column():
                        g_out = gr.Gallery(label="Images", columns=2, elem_id="gen-images")
                        g_msg = gr.Markdown(service.empty_state(), elem_id="gen-msg")

            # ------------------------------------------------------------------ Robustness (eval.robustness)
            with gr.Tab("Robustness", id="robustness"):
                with gr.Row():
                    reports, first, rb_text0, rb_figs0 = RB.refresh(service.runs_dir, None)
                    rb_pick = gr.Dropdown(reports, value=first, label="Report folder",
                                          elem_id="robustness-report", allow_custom_value=True)
                    rb_refresh = gr.Button("Refresh", elem_id="robustness-refresh")
                # contain, not cover: a figure is shown whole (its axes labels and legend are the point)
                rb_figs = gr.Gallery(rb_figs0, label="Figures", columns=2, height="auto", object_fit="contain",
                                     elem_id="robustness-figures")
                rb_text = gr.Markdown(rb_text0, elem_id="robustness-text")

            def rb_refresh_fn(current):
                choices, value, text, figures = RB.refresh(service.runs_dir, current)
                return gr.update(choices=choices, value=value), figures, text

            rb_pick.change(lambda n: RB.show(service.runs_dir, n)[::-1], rb_pick, [rb_figs, rb_text],
                           api_name="robustness", queue=False)
            for ev in (rb_refresh.click, demo.load):     # a page opened later sees the reports written since
                ev(rb_refresh_fn, rb_pick, [rb_pick, rb_figs, rb_text], api_name=False, queue=False)

        # ------------------------------------------------------------------ handlers
        def check_upload(paths):
            try:
                msg = service.check_upload(paths) if paths else ""
            except Exception as e:
                msg = _message(e)
            return preview_images(paths), msg

        def run_lists(selected=None):
            choices = service.run_choices()
            names = {c[1] for c in choices}
            keep = [n for n in (selected or []) if n in names]
            return gr.update(choices=choices, value=keep), gr.update(choices=choices)

        def after_train(names):
            choices = service.run_choices()
            if not names:                                  # nothing was started: keep the user's choices
                return gr.update(choices=choices), gr.update(choices=choices)
            return gr.update(choices=choices, value=list(names)), gr.update(choices=choices, value=names[0])

        def score_fn(names, protocol_=None):
            yield service.score(names, protocol=protocol_)
            while any(service.queue.position(f"eval:{n}") is not None for n in names or []):
                time.sleep(poll_s)
                yield service.score_status(names)
            yield service.score_status(names) or "Nothing to score."

        def report_fn(names):
            msg, out = service.report(names)
            yield msg, [], []
            if out is None:
                return
            while service.queue.position(f"report:{out.name}") is not None:
                time.sleep(poll_s)
            text, files = service.report_result(out)
            yield text, [f for f in files if f.endswith(".png")], files

        def curves(infos, key):
            return (plot(compare.curve_png(compare.curves(infos, "loss"), "loss", "loss")),
                    plot(compare.curve_png(compare.curves(infos, key), key, DIST_LABEL)))

        def stream(names):
            for p in service.follow(names, poll_s=poll_s):
                yield (p.bar_html(), p.markdown(), *curves(p.runs, compare.distance_key(p.runs)), names, p.summary())

        def start_fn(paths, meths, noun_, token_, rank_, lr_, steps_, every_, lam_, model_, seed_, res_,
                     sample_steps_, n_samples_, prior_=False, n_class_=None, embedded_=False):
            try:
                form = check_form(meths, noun_, token_, rank_, lr_, steps_, every_, lam_, model_, seed_, res_,
                                  sample_steps_, n_samples_, prior_, n_class_)
                names = service.submit(paths, form, embedded=bool(embedded_))
            except Exception as e:
                yield ("", _message(e), None, None, [], [])
                return
            yield from stream(names)

        def seg_start_fn(img_paths, map_paths, embedded, meths, noun_, token_, rank_, lr_, steps_, every_, lam_,
                         model_, seed_, res_, sample_steps_, n_samples_):
            try:
                form = check_form(meths, noun_ or "cat", token_ or "sks", rank_, lr_, steps_, every_, lam_, model_,
                                  seed_, res_, sample_steps_, n_samples_)
                names = service.submit_semantic(img_paths, map_paths, form, embedded=bool(embedded))
            except Exception as e:
                yield ("", _message(e), None, None, [], [])
                return
            yield from stream(names)

        def follow_fn():
            names = service.active_train_jobs()
            if not names:
                yield ("", "No training running.", None, None, [], [])
                return
            yield from stream(names)

        def compare_fn(names, key, metric_):
            v = service.compare(names, key)
            prompt = f"Prompt: *{v['prompt']}*" if v["prompt"] else ("" if names else service.empty_state())
            dist = plot(compare.curve_png(v["distance"], v["distance_key"], DIST_LABEL))
            loss = plot(compare.curve_png(v["loss"], "loss", "loss"))
            points = compare.tradeoff_points(v["infos"], v["distance_key"], metric_)
            pareto = plot(compare.tradeoff_png(points, v["distance_key"], metric_))
            return v["grid"], prompt, dist, loss, v["table"], pareto, v["details"], v["gallery"]

        def gen_ckpts(name, prompt):
            try:
                run_dir = R.run_path(service.runs_dir, name)
            except ValueError:
                return gr.update(choices=[], value=None), prompt
            choices = G.checkpoint_choices(run_dir)
            app_json = R.read_json(run_dir / R.APP_JSON, {}) or {}
            return (gr.update(choices=choices, value=choices[-2] if len(choices) > 1 else choices[0]),
                    app_json.get("instance_prompt") or prompt)

        def gen_fn(name, ckpt, prompt, seed_, n, steps_, cfg, merged):
            try:
                run_dir = R.run_path(service.runs_dir, name)
                images = service.generator.generate(run_dir, ckpt, prompt, int(seed_ or 0), int(n), int(steps_),
                                                    float(cfg), bool(merged))
            except ValueError as e:
                return [], _message(e if isinstance(e, InputError) else InputError(f"Pick a run first ({e})."))
            except Exception as e:
                return [], _message(e)
            return images, f"{len(images)} image(s), seed {int(seed_ or 0)}{', adapter merged' if merged else ''}."

        def export_fn(name, ckpt, label):
            try:
                run_dir = R.run_path(service.runs_dir, name)
                path = G.export(run_dir, ckpt, label)
            except ValueError as e:
                return None, _message(e if isinstance(e, InputError) else InputError(f"Pick a run first ({e})."))
            except Exception as e:
                return None, _message(e)
            return str(path), f"Exported {path.name} ({G.EXPORT_FORMATS.get(label, label)})."

        train_inputs = [files, methods, noun, token, rank, lr, steps, every, lam, model, seed, res, sample_steps,
                        n_samples, prior, n_class, embedded]
        train_outputs = [progress, status, loss_plot, dist_plot, jobs, batch]
        files.change(check_upload, files, [preview, upload_msg], api_name="check_upload")
        load_ev = demo.load(follow_fn, None, train_outputs, api_name="follow", show_progress="hidden")
        # one batch per page at a time (trigger_mode="once"); other pages queue behind it and see their position
        start_ev = start.click(start_fn, train_inputs, train_outputs, api_name="start", concurrency_limit=None,
                               show_progress="hidden", cancels=[load_ev], trigger_mode="once")
        start_ev.then(after_train, jobs, [chosen, g_run], api_name=False)
        seg_inputs = [seg_images, seg_maps, seg_embedded] + train_inputs[1:-3]   # no subject files, no prior
        seg_ev = seg_start.click(seg_start_fn, seg_inputs, train_outputs, api_name="start_semantic",
                                 concurrency_limit=None, show_progress="hidden", cancels=[load_ev],
                                 trigger_mode="once")
        seg_ev.then(after_train, jobs, [chosen, g_run], api_name=False)
        cancel.click(lambda names: service.cancel(names), jobs, status, api_name="cancel", queue=False)
        refresh.click(run_lists, chosen, [chosen, g_run], api_name="runs", queue=False)
        demo.load(run_lists, chosen, [chosen, g_run], api_name=False, queue=False)
        compare_inputs = [chosen, dist_key, metric]
        compare_outputs = [grid, prompt_md, cmp_dist, cmp_loss, table, tradeoff, details, gallery]
        gr.on([chosen.change, dist_key.change, metric.change, refresh.click], compare_fn, compare_inputs,
              compare_outputs, api_name="compare", concurrency_limit=4)
        score_btn.click(score_fn, [chosen, protocol], score_md, api_name="score", concurrency_limit=None).then(
            compare_fn, compare_inputs, compare_outputs, api_name=False)
        report_btn.click(report_fn, chosen, [report_md, report_imgs, report_files], api_name="report",
                         concurrency_limit=None)
        g_run.change(gen_ckpts, [g_run, g_prompt], [g_ckpt, g_prompt], api_name="checkpoints", queue=False)
        # the empty states as of now (runs may have appeared since the app started)
        g_run.change(lambda n: "" if n else service.empty_state(), g_run, g_msg, api_name=False, queue=False)
        demo.load(lambda: (service.empty_state(),) * 2, None, [prompt_md, g_msg], api_name=False, queue=False)
        g_btn.click(gen_fn, [g_run, g_ckpt, g_prompt, g_seed, g_n, g_steps, g_cfg, g_merge], [g_out, g_msg],
                    api_name="generate", concurrency_limit=1)
        g_export.click(export_fn, [g_run, g_ckpt, g_fmt], [g_file, g_msg], api_name="export", concurrency_limit=1)
    return demo
