"""Model cards: the README.md that diffusers' training scripts write beside their weights, for run and export folders.

    write_model_card(run_dir)                              # a finished run folder (the trainers call it)
    write_model_card(export_dir, run_dir, "kohya", "x.safetensors")   # an export (training.export calls it)

Front matter as diffusers' examples/dreambooth/train_dreambooth_lora.py save_model_card writes it through
diffusers.utils.hub_utils.load_or_create_model_card (ModelCardData: license, library_name, inference,
base_model, instance_prompt) + populate_model_card (tags), with `lowrank` and the method among the tags.
Language runs follow transformers/peft cards: library_name peft and the pipeline tag of the head. The license
is the base model's where it is known (LICENSES, or the license in a local base folder's own README.md) and is
left out otherwise, never guessed. Everything is read back from the run folder (run.json, metrics.jsonl,
results.json, the adapter), so a card can be rewritten at any time; it is written atomically.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

import lowrank
from ground.runfolder import (
    ADAPTER_WEIGHTS,
    CONDITIONING_ENCODER,
    EMA_DIR,
    RESULTS,
    RUN_JSON,
    SAMPLES_GRID,
    atomic_write,
    read_json,
    read_metrics,
    run_setting,
    write_text,
)
from lowrank.analysis import delora_bound
from lowrank.export import DIFFUSERS_WEIGHTS

from .models import TINY
from .task import VAL_LOSS
from .tasks import HEADS, task_of
from .tracking import logger

CARD = "README.md"
# licenses of base models we know (lower-case hub names); anything else: no license line
LICENSES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "compvis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "sentence-transformers/all-minilm-l6-v2": "apache-2.0",
}
ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}   # the GLUE trainer's default model
# the loss and data settings a card lists when a run turned them on (off: 0 or unset)
OPTIONAL_SETTINGS = ("snr_gamma", "noise_offset", "caption_dropout", "proportion_empty_prompts", "aspect_buckets",
                     "cache_latents")
TINY_MODELS = (TINY, "tiny-sdxl", "tiny-bert", "tiny-llama", "tiny-gpt2")   # random test models (families, language)


def parse_front_matter(text: str) -> dict:
    """The YAML between the leading '---' lines of a card ({} when there is none)."""
    m = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


def base_license(base: str | None) -> str | None:
    """The base model's license: a known hub name, or a local folder whose README.md front matter says it."""
    if not base:
        return None
    if base.lower() in LICENSES:
        return LICENSES[base.lower()]
    readme = Path(base).expanduser() / CARD
    try:
        found = parse_front_matter(readme.read_text(encoding="utf-8")).get("license") if readme.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return found if isinstance(found, str) else None


def _facts(run_dir: Path, adapter_dir: Path, base: str | None = None) -> dict:
    """What the card says about a run, read from its folder; the distance and bound of the adapter in
    `adapter_dir` (the run's final one, or a checkpoint-N: the metrics up to step N)."""
    run = read_json(run_dir / RUN_JSON, {}) or {}
    if not run.get("adapter_config") and (adapter_dir / ADAPTER_WEIGHTS).is_file():   # an adapter folder, no run
        run = {**run, "adapter_config": lowrank.read_adapter(adapter_dir)[0].to_dict()}
    cfg = run.get("adapter_config") or {}
    method = cfg.get("method") or "lora"
    base = base or run_setting(run, "model_name_or_path") or run_setting(run, "pretrained_model_name_or_path")
    task = task_of(run)
    if not base and not _is_text(task):
        base = TINY   # the diffusion trainers' default (load_pipeline(None))
    # a checkpoint-N, or its moving average checkpoint-N/ema: the metrics up to step N
    ckpt = re.fullmatch(r"checkpoint-(\d+)", adapter_dir.parent.name if adapter_dir.name == EMA_DIR
                        else adapter_dir.name) if adapter_dir != run_dir else None
    logged = [r for r in read_metrics(run_dir) if not ckpt or r["step"] <= int(ckpt[1])]
    rows = [r for r in logged if "distance_fig3" in r]
    held_out = [(r["step"], r[VAL_LOSS]) for r in logged if isinstance(r.get(VAL_LOSS), (int, float))]
    # distance_max is on full-probe rows: every checkpoint step and the last step are full; a checkpoint a
    # SIGTERM wrote between them may not be, and then the card leaves the largest distance out
    last = rows[-1] if rows else {}
    layer = run.get("fig3_layer")
    bound = None
    if method == "delora" and layer and (adapter_dir / ADAPTER_WEIGHTS).is_file():
        _, state = lowrank.read_adapter(adapter_dir)
        bound = delora_bound(state, layer)
        if bound is None:   # semantic_map names its layers 'unet.<module>' in the metrics
            bound = delora_bound(state, layer.removeprefix("unet."))
    own = {o.name for o in lowrank.METHODS[method].options} if method in lowrank.METHODS else set()
    options = {k: v for k, v in cfg.items() if k in ("rank", "alpha", "target_modules", "dropout")
               or (k in own and v not in (None, False, [], {}))}
    return {"run": run, "task": task, "method": method, "base": ALIASES.get(base, base),
            "options": options, "step": last.get("step"), "distance": last.get("distance_fig3"), "layer": layer,
            "distance_max": last.get("distance_max"), "bound": bound, "val_loss": held_out[-1] if held_out else None,
            "results": read_json(run_dir / RESULTS, {}) or {}}


def _is_text(task) -> bool:
    return task is not None and task.kind == "text"


def front_matter(f: dict) -> dict:
    task, method = f["task"], f["method"]
    meta: dict = {}
    license_ = base_license(f["base"])
    if license_:
        meta["license"] = license_
    if _is_text(task):
        tag = HEADS[task.head][0]
        detail = run_setting(f["run"], task.output_flag) if task.output_flag else None   # glue: its GLUE task
        meta.update(library_name="peft", pipeline_tag=tag, base_model=f["base"])
        meta["tags"] = ["lowrank", method, "peft", "lora", tag, task.slug, *filter(None, [detail])]
        return meta
    meta.update(library_name="diffusers", inference=True, base_model=f["base"])
    prompt = run_setting(f["run"], "instance_prompt")
    if prompt:
        meta["instance_prompt"] = prompt
    # the model family's tags as the trainer recorded them (run.json before families: SD 1.x/2.x)
    family = f["run"].get("family_tags") or ["stable-diffusion", "stable-diffusion-diffusers"]
    meta["tags"] = ["lowrank", method, "text-to-image", "diffusers", "lora", "diffusers-training", *family,
                    *([task.slug] if task else [])]
    return meta


def _numbers(f: dict) -> list[str]:
    lines = [f"- **Method**: `{f['method']}`, " + ", ".join(f"`{k}={v}`" for k, v in f["options"].items())]
    run = f["run"]
    text = run.get("text_encoder")   # DreamBooth's --train_text_encoder
    if text:
        parts = ", ".join(f"`{p}`" for p in text["parts"])
        lines.append(f"- **Text encoder trained** (--train_text_encoder): {parts} with the same method, "
                     f"`rank={text['rank']}`, `alpha={text['alpha']}`, "
                     f"`learning_rate={text['learning_rate']}` on `{', '.join(text['target_modules'])}`; its adapter "
                     f"is in {', '.join(f'`{p}/`' for p in text['parts'])} and in the exported files")
    train = {k: run_setting(run, k) for k in ("learning_rate", "max_train_steps", "train_batch_size", "seed",
                                              "resolution") if run_setting(run, k) is not None}
    train.update({k: run_setting(run, k) for k in OPTIONAL_SETTINGS if run_setting(run, k)})   # only when on
    if train:
        lines.append("- **Training**: " + ", ".join(f"`{k}={v}`" for k, v in train.items()))
    if f["distance"] is not None:
        line = f"- **Distance reached** at step {f['step']}: ‖W_eff − W0‖_F = {f['distance']:.4g} on `{f['layer']}`"
        if f["distance_max"] is not None:
            line += f" (largest over layers {f['distance_max']:.4g})"
        if f["bound"] is not None:
            line += f"; DeLoRA's bound on that layer (|λ| + |λ0|)·‖W̄‖ = {f['bound']:.4g}"
        lines.append(line)
    if run_setting(run, "ema_decay"):
        lines.append(f"- **EMA**: a moving average of the adapter, decay `{run_setting(run, 'ema_decay')}`, averaging "
                     f"after step {run_setting(run, 'ema_start_step', 0)}, is an adapter of its own in `{EMA_DIR}/` "
                     f"(and `checkpoint-N/{EMA_DIR}/`): `lowrank.load_adapter(model, '{EMA_DIR}')`, or "
                     f"`python -m training.export RUN/{EMA_DIR}` for the files below")
    if f["val_loss"]:
        held = run.get("validation_loss") or {}   # the image trainers' settings; GLUE's is its tuning part
        where = (f"{held.get('held_out_images')} held-out image(s), noise seed {held.get('seed')}, timesteps "
                 + ", ".join(f"{t:g}" for t in held.get("timesteps") or []) + (f"; base model {held['base_model']:.4g}"
                                               if isinstance(held.get("base_model"), float) else "")) if held \
            else "the held-out part"
        lines.append(f"- **Validation loss** at step {f['val_loss'][0]}: {f['val_loss'][1]:.4g} ({where})")
    info = f["results"].get("train_info") or {}
    if info.get("final"):
        scores = ", ".join(f"{k} {v:.4f}" for k, v in info["final"].items() if isinstance(v, (int, float)))
        before = ", ".join(f"{k} {v:.4f}" for k, v in (info.get("initial") or {}).items()
                           if isinstance(v, (int, float)))
        lines.append(f"- **Scores** ({info.get('selection', 'after training')}): {scores} (before training: "
                     f"{before or 'n/a'})")
    return lines


def _loading(f: dict, name: str, export_format: str | None, file: str | None, has_diffusers: bool) -> list[str]:
    base, cli = f["base"], f"python -m training.export {f['source']}"
    tiny = [f"(`{base}` is lowrank's built-in random test model: `training.families.load_pipeline` / "
            f"`training.text.language.load_language_model` build it.)"] if base in TINY_MODELS else []
    if _is_text(f["task"]):
        labels = f["task"].head == "classification"
        head = (HEADS[f["task"].head][1], ", num_labels=N" if labels else "")
        here = name if export_format == "peft" else "PEFT_DIR"
        lines = ["```python", f"from transformers import {head[0]}", "from peft import PeftModel",
                 f"model = PeftModel.from_pretrained({head[0]}.from_pretrained({base!r}{head[1]}), {here!r})", "```"]
        if labels:
            lines.append("N: the task's number of labels (the trained head is in the adapter).")
        if here == "PEFT_DIR":
            lines.append(f"PEFT_DIR: `{cli} --format peft --output PEFT_DIR`.")
        return lines + tiny
    kohya = "diff" if f["method"] == "dora" else "kohya"
    ui = f"`{file}`" if export_format in ("kohya", "diff") and file else \
        f"the file of `{cli} --format {kohya} --output DIR`"
    load = {None: f"{name!r}" if has_diffusers else "'DIR'", "diffusers": f"{name!r}",
            "kohya": f"{name!r}, weight_name={file!r}"}.get(export_format, "'DIR'")
    peft_dir = name if export_format == "peft" else "PEFT_DIR"
    cls = f["run"].get("pipeline_class") or "StableDiffusionPipeline"   # recorded by the trainer (its family)
    part = f["run"].get("denoiser") or "unet"                           # the part the adapter is in
    lines = ["**diffusers**:", "```python", f"from diffusers import {cls}", f"pipe = {cls}.from_pretrained({base!r})"]
    if export_format == "pipeline":
        lines[-1] = f"pipe = {cls}.from_pretrained({name!r})   # the adapter is merged in"
    else:
        lines.append(f"pipe.load_lora_weights({load})")
    lines += ["```"]
    if load == "'DIR'":
        lines.append(f"DIR: `{cli} --format diffusers --output DIR`.")
    lines += ["", f"**ComfyUI / AUTOMATIC1111**: copy {ui} into `ComfyUI/models/loras/` (LoraLoader node) or "
              f"`stable-diffusion-webui/models/Lora/` (`<lora:NAME:1>`)" +
              (" (DoRA goes as the full-weight `diff` format, which both apply exactly)." if kohya == "diff" else "."),
              "", "**peft**:", "```python", "from peft import PeftModel",
              f"{part} = PeftModel.from_pretrained(pipe.{part}, {peft_dir!r})",
              *(f"{te} = PeftModel.from_pretrained(pipe.{te}, {peft_dir + '/' + te!r})"   # --train_text_encoder's
                for te in (f["run"].get("text_encoder") or {}).get("parts", [])), "```"]
    if peft_dir == "PEFT_DIR":
        lines.append(f"PEFT_DIR: `{cli} --format peft --output PEFT_DIR`.")
    return lines + tiny


def model_card(folder: Path, run_dir: Path, export_format: str | None = None, file: str | None = None,
               adapter_dir: Path | None = None, name: str | None = None, base: str | None = None) -> str:
    f = _facts(run_dir, adapter_dir or run_dir, base)
    name = name or folder.name
    inside = adapter_dir not in (None, run_dir) and adapter_dir.is_relative_to(run_dir)   # e.g. checkpoint-N/ema
    source = f["source"] = run_dir.name if adapter_dir in (None, run_dir) else \
        f"{run_dir.name}/{adapter_dir.relative_to(run_dir).as_posix() if inside else adapter_dir.name}"
    what = f"a `{export_format}` export of the lowrank run `{source}`" if export_format else \
        "a lowrank training run (`lowrank.load_adapter(model, folder)` reads this folder itself)"
    body = [f"# {name}", "", f"{f['method']} adapter for `{f['base']}`, {what}.", "", *_numbers(f), ""]
    if not _is_text(f["task"]) and (folder / SAMPLES_GRID).is_file():
        body += ["## Samples", "", f"![samples]({SAMPLES_GRID})", ""]
    has_diffusers = (folder / DIFFUSERS_WEIGHTS).is_file()
    body += ["## How to use", ""]
    if (run_dir / CONDITIONING_ENCODER).is_file():
        body += [f"The map conditioning (`{CONDITIONING_ENCODER}`) is lowrank's own module: the files below carry the "
                 f"UNet adapter only; generating from maps takes the run folder (lowrank's app or eval).", ""]
    body += [*_loading(f, name, export_format, file, has_diffusers), ""]
    meta = yaml.safe_dump(front_matter(f), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n" + "\n".join(body)


def write_model_card(folder, run_dir=None, export_format: str | None = None, file: str | None = None,
                     adapter_dir=None, name: str | None = None, base: str | None = None) -> Path:
    """Write folder/README.md for the run in `run_dir` (default: `folder` itself), atomically; `adapter_dir` is the
    exported adapter when it is not the run's final one (a checkpoint-N); `name` the folder's final name when
    `folder` is a temporary one; `base` the base model when it is not the run's. For an export, the run's sample
    grid is copied beside the card so its image link works wherever the folder is shared."""
    folder = Path(folder)
    run_dir = Path(run_dir) if run_dir is not None else folder
    grid = run_dir / SAMPLES_GRID
    if folder != run_dir and grid.is_file() and not (folder / SAMPLES_GRID).exists():
        data = grid.read_bytes()
        atomic_write(folder / SAMPLES_GRID, lambda p: p.write_bytes(data))
    card = model_card(folder, run_dir, export_format, file, Path(adapter_dir) if adapter_dir else None, name, base)
    return write_text(folder / CARD, card)


def write_run_card(run_dir) -> Path | None:
    """The trainers' hook: write_model_card(run_dir), where a failure is a warning, not a failed run (the adapter
    and every other output are saved before it; `python -m training.export` writes cards too)."""
    try:
        return write_model_card(run_dir)
    except Exception as e:   # noqa: BLE001 - the card is a convenience; the run itself is done
        logger.warning("no model card written in %s: %s", run_dir, e)
        return None
