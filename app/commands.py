"""The command lines the app runs: the DreamBooth and semantic-map trainers (the CLI's own code path, through
`accelerate launch`) and eval/'s scorer, plus an up-front check that a base model can be loaded.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache

from lowrank import METHODS
from training.common.models import is_tiny
from training.common.tasks import DREAMBOOTH, SEMANTIC_MAP
from training.families import FAMILIES
from training.images.files import open_image

from .inputs import InputError, TrainForm

LAUNCHERS = ("accelerate", "python")
PRESETS = tuple(f.preset for f in FAMILIES)   # built-in random-weight models, one per family
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model(name: str) -> str:
    """The model string to pass to the trainer, or InputError saying why it cannot be loaded.
    Local folders must hold a saved pipeline (model_index.json); hub names must be cached when
    the hub is offline (HF_HUB_OFFLINE=1). Nothing is downloaded here."""
    name = str(name or "").strip()
    if is_tiny(name):
        return "tiny"
    if name in PRESETS:   # the other families' built-in models
        return name
    path = Path(os.path.expanduser(name))
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or path.exists()
    if looks_like_path:
        if not path.exists():
            raise InputError(f"Base model: no such folder {name!r}. Use 'tiny', a local pipeline folder or a hub "
                             f"name.")
        if not (path.is_dir() and (path / "model_index.json").is_file()):
            raise InputError(f"Base model: {name!r} is not a saved Stable Diffusion pipeline (no model_index.json).")
        return str(path.resolve())
    if not _HUB_ID.match(name):
        raise InputError(f"Base model: {name!r} is neither a hub name (org/model) nor a local folder.")
    if _offline():
        try:
            cached = try_to_load_from_cache(name, "model_index.json")
        except Exception:   # invalid repo ids raise validation errors of several types
            cached = None
        if not isinstance(cached, str):
            raise InputError(f"Base model: {name!r} is not in the local Hugging Face cache and the hub is "
                             f"offline (HF_HUB_OFFLINE=1). Use 'tiny' or a local folder.")
    return name


def trainer_script() -> Path:
    return DREAMBOOTH.script


def launcher_prefix(launcher: str = "accelerate", cpu: bool | None = None) -> list[str]:
    """How the trainer script is started. 'accelerate' is the documented CLI path; 'python' runs the
    script directly (same code, no launcher process)."""
    if launcher == "python":
        return [sys.executable]
    if launcher != "accelerate":
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if cpu is None:
        cpu = not torch.cuda.is_available()
    return [sys.executable, "-m", "accelerate.commands.launch", *(["--cpu"] if cpu else []),
            "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _form_options(form: TrainForm) -> list:
    """The methods' own options (lowrank.METHODS[m].options) that the form has a field for: DeLoRA's λ today."""
    options = {o.name: o for cls in METHODS.values() for o in cls.options if hasattr(form, o.name)}
    return list(options.values())


def method_fields(form: TrainForm, method: str) -> dict:
    """{option: the form's value where `method` owns it, else None} for a run's record: every run of a batch
    records the same keys."""
    return {o.name: getattr(form, o.name) if o in METHODS[method].options else None for o in _form_options(form)}


def _method_flags(form: TrainForm, method: str) -> list[str]:
    """--<option> <value> for each of `method`'s options the form sets (floats as repr: no precision lost)."""
    flags = []
    for o in METHODS[method].options:
        value = getattr(form, o.name, None)
        if value is not None:
            flags += [f"--{o.name}", repr(float(value)) if o.type == "float" else str(value)]
    return flags


def _common_flags(form: TrainForm, method: str, run_dir: Path) -> list[str]:
    """The flags every trainer the app starts takes from the form: method, rank, steps, checkpoints, output,
    seed, learning rate, the method's own options the form has (DeLoRA's λ), the base model and the sampling
    resolution/steps."""
    cmd = ["--method", method, "--rank", str(form.rank), "--max_train_steps", str(form.steps),
           "--checkpointing_steps", str(form.checkpoint_every), "--output_dir", str(run_dir), "--seed", str(form.seed)]
    if form.learning_rate is not None:
        cmd += ["--learning_rate", repr(float(form.learning_rate))]
    cmd += _method_flags(form, method)
    if not is_tiny(form.model):
        cmd += ["--pretrained_model_name_or_path", form.model]
    if form.resolution:
        cmd += ["--resolution", str(form.resolution)]
    if form.sample_steps:
        cmd += ["--num_inference_steps", str(form.sample_steps)]
    return cmd + _advanced_flags(form)


def _advanced_flags(form: TrainForm) -> list[str]:
    """The advanced section's flags, only those that are on (a run without them is the trainer's default run)."""
    cmd = ["--snr_gamma", repr(float(form.snr_gamma))] if form.snr_gamma else []
    cmd += ["--ema_decay", repr(float(form.ema_decay))] if form.ema_decay else []
    return cmd + (["--noise_offset", repr(float(form.noise_offset))] if form.noise_offset else [])


def cache_is_exact(instance_dir: Path | None) -> bool:
    """Whether --cache_latents changes nothing for a DreamBooth run on `instance_dir` (None: the embedded example):
    every image square, so one crop per image (the trainer's random crop of a square image resized to the
    resolution is the image itself) and generated class images are square too. Photos of other shapes have a
    random crop per step, which a cache cannot hold (the trainer refuses them without --center_crop)."""
    if instance_dir is None:
        return True   # the example subject is square at every resolution
    if not Path(instance_dir).is_dir():
        return False   # the trainer says what is wrong with the folder
    files = [p for p in sorted(Path(instance_dir).iterdir()) if p.is_file() and not p.name.startswith(".")]
    return all(len(set(open_image(p).size)) == 1 for p in files)


def _extra_flags(form: TrainForm) -> list[str]:
    return [arg for key, value in (form.extra or {}).items() for arg in (f"--{key}", str(value))]


def train_command(form: TrainForm, method: str, run_dir: Path, instance_dir: Path | None,
                  launcher: str = "accelerate") -> list[str]:
    """training/dreambooth.py on the uploaded subject, or with instance_dir None on its embedded example."""
    subject = [] if instance_dir is None else ["--instance_data_dir", str(instance_dir)]
    cmd = [*launcher_prefix(launcher), str(trainer_script()), *_common_flags(form, method, run_dir), *subject,
           "--instance_prompt", form.instance_prompt, "--class_prompt", form.class_prompt]
    if form.num_samples:
        cmd += ["--num_validation_images", str(form.num_samples)]
    if form.cache_latents and cache_is_exact(instance_dir):   # the same adapter bits, without a VAE pass per step
        cmd += ["--cache_latents"]
    if form.prior_preservation:        # class images are generated into RUN/class_images by the trainer
        cmd += ["--with_prior_preservation"]
        if form.num_class_images:
            cmd += ["--num_class_images", str(form.num_class_images)]
    return cmd + _extra_flags(form)


def semantic_train_command(form: TrainForm, method: str, run_dir: Path, data_dir: Path | None,
                           launcher: str = "accelerate") -> list[str]:
    """training/semantic_map.py on uploaded pairs (data_dir, ADE20K layout) or, with None, its embedded set.
    The DreamBooth-only fields of the form (token, class noun, prior preservation) do not apply."""
    script = SEMANTIC_MAP.script
    cmd = [*launcher_prefix(launcher), str(script), *_common_flags(form, method, run_dir)]
    if data_dir is not None:
        cmd += ["--train_data_dir", str(data_dir)]
    if form.num_samples:
        cmd += ["--num_validation_maps", str(form.num_samples)]
    if form.cache_latents:   # centre-cropped pairs: the cached run is always the uncached one, bit for bit
        cmd += ["--cache_latents"]
    return cmd + _extra_flags(form)


SCORER = [sys.executable, "-m", "eval.subject"]      # + --run_dir RUN: writes RUN/eval.jsonl
REPORTER = [sys.executable, "-m", "eval.report"]    # + RUN... --out DIR: Markdown/CSV table, PNG plots, grid


def module_available(prefix: list[str]) -> bool:
    """False when `prefix` is `python -m some.module` and that module is not in this checkout."""
    if len(prefix) >= 3 and prefix[1] == "-m":
        try:
            return importlib.util.find_spec(prefix[2]) is not None
        except ModuleNotFoundError:
            return False
    return True


# eval.subject's protocol is DreamBooth's 25 prompts x 4 seeds per checkpoint; "quick" is for a look on a CPU.
# Drift (eval/drift.py): eval.subject's default 2 of peft's drift prompts, all 10 in "full"
PROTOCOLS = {"quick (3 prompts × 1 image)": ["--max_prompts", "3", "--images_per_prompt", "1"],
             "full (25 prompts × 4 images, 10 drift prompts)": ["--drift_prompts", "10"]}


def eval_command(run_dir: Path, scorer: list[str] | None = None, extra: list[str] | None = None) -> list[str]:
    return [*(scorer or SCORER), "--run_dir", str(run_dir), *(extra or [])]


def report_command(run_dirs: list[Path], out_dir: Path, reporter: list[str] | None = None) -> list[str]:
    return [*(reporter or REPORTER), *map(str, run_dirs), "--out", str(out_dir)]
