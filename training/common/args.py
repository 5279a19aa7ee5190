"""Command-line flags every trainer shares, named as in diffusers' examples, plus one flag per
AdapterConfig field (generated, so a field added to lowrank shows up here with its help string).

Errors are one line (`error: ...`) through TrainingError, never argparse's usage dump, so that
every trainer reports bad input the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path

from ground import cli
from lowrank import METHODS, AdapterConfig

from . import TrainingError
from .config import CONFIG_FILE, parse_with_config
from .tracking import DEFAULT_DISTANCE_LOGGING_STEPS

# Flags whose AdapterConfig field the trainer fills in itself when the user leaves them unset.
ADAPTER_FLAGS_SPECIAL = {"dyndora_total_steps": "default: --max_train_steps"}

# diffusers' run length when a flag is given: --num_train_epochs 1, a checkpoint every 500 steps
DEFAULT_EPOCHS, DEFAULT_CHECKPOINTING_STEPS = 1, 500
# The image trainers' run length when neither --max_train_steps nor --num_train_epochs is given (one epoch of
# 5 example images would be 5 steps): the trainer's default steps (the environment variable overrides the
# number, e.g. LOWRANK_MAX_STEPS=3 for a quick try; the README test uses it) and, unless --checkpointing_steps
# is given, the trainer's number of checkpoints with samples spread evenly over them.
MAX_STEPS_ENV = "LOWRANK_MAX_STEPS"


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing path among `path` and its parents if it is a file (creating `path` as a
    folder, or a file inside it, would fail there); None when the way is clear."""
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_folder_path(path: Path, flag: str) -> None:
    """A folder the trainer will create or fill: neither it nor any parent may be a file."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise TrainingError(f"{flag} {path}: {blocker} exists and is not a directory; choose another path")


class ArgumentParser(cli.ArgumentParser):
    """A trainer's parser: errors are one TrainingError line; with a --config flag (add_run_args), a config file's
    values under the command line's (training/common/config.py)."""

    error_class = TrainingError

    def parse_known_args(self, args=None, namespace=None):
        return parse_with_config(self, super().parse_known_args, args, namespace)


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _targets(text: str) -> list[str] | str:
    """'to_q,to_k' -> ['to_q', 'to_k'] (name suffixes); 're:<regex>' -> the regex string."""
    if text.startswith("re:"):
        return text[3:]
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. to_q,to_k,to_v,to_out.0")
    return items


def _flag_type(name: str, hint) -> tuple[typing.Callable, dict]:
    """argparse type (and extra add_argument kwargs) for an AdapterConfig field's annotation."""
    if name == "target_modules":
        return _targets, {}
    if name == "modules_to_save":   # 'classifier,pooler' -> ['classifier', 'pooler']; '' -> none
        return (lambda text: [t.strip() for t in text.split(",") if t.strip()]), {}
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else [hint]
    base = args[0] if len(args) == 1 else str
    if base is bool:
        return _bool, {"nargs": "?", "const": True}   # `--flag` alone means true; `--flag false` works
    if base in (int, float, str):
        return base, {}
    return str, {}


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    """--method, --rank, --alpha, --target_modules and every method option, from AdapterConfig."""
    group = parser.add_argument_group("adapter (lowrank.AdapterConfig)")
    hints = typing.get_type_hints(AdapterConfig)
    helps = AdapterConfig.help()
    defaults = AdapterConfig()
    for field in dataclasses.fields(AdapterConfig):
        kind, extra = _flag_type(field.name, hints[field.name])
        default = getattr(defaults, field.name)
        shown = ",".join(default) if isinstance(default, list) else default
        note = ADAPTER_FLAGS_SPECIAL.get(field.name, f"default: {shown}")
        if field.name == "method":
            note += f"; available: {', '.join(sorted(METHODS))}"
        # default None: only flags the user gave reach AdapterConfig, so its own defaults stay the truth
        group.add_argument(f"--{field.name}", type=kind, default=None, help=f"{helps[field.name]} ({note})", **extra)
    group.add_argument("--lambda_learning_rate", type=float, default=None,
                       help="Learning rate of scalar strengths (DeLoRA's boundary λ), a separate AdamW group "
                            "without weight decay (default: --learning_rate).")


def add_training_args(parser: argparse.ArgumentParser, default_resolution: str = "",
                      default_output: str = "outputs/<task>-<method>", default_steps: int | None = None) -> None:
    """The flags shared by the diffusion trainers (diffusers' names and, where sensible, defaults)."""
    add_model_args(parser)
    add_run_args(parser, batch_help="Batch size per device (the paper's protocol uses 1).",
                 default_output=default_output, default_steps=default_steps)
    add_diffusion_args(parser, default_resolution)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--pretrained_model_name_or_path", default=None,
      help="Hub name or local folder of a diffusers pipeline, its family read from model_index.json: Stable "
           "Diffusion 1.x/2.x, SDXL, FLUX.1, FLUX.2-klein; 'tiny' (the default), 'tiny-sdxl', 'tiny-flux' and "
           "'tiny-flux2-klein' are built-in miniatures with random weights, for trying the machinery offline.")
    p("--revision", default=None, help="Revision (branch, tag or commit) of the pretrained model on the hub.")


def add_run_args(parser: argparse.ArgumentParser, batch_help: str = "Batch size per device.",
                 train_batch_size: int = 1, default_output: str = "outputs/<task>-<method>",
                 default_steps: tuple[int, int] | None = None) -> None:
    """The flags of every trainer on training.common.loop (any task): output, seed, steps, checkpoints,
    resume, optimizer and schedule, precision, trackers. Language trainers use these without the
    diffusion group. `default_steps`: the run length when neither --max_train_steps nor --num_train_epochs
    is given, as (steps, checkpoints), see `resolve_run_length`; None: diffusers' one epoch."""
    p = parser.add_argument
    p("--config", default=None, metavar="FILE",
      help=f"Read flags from a YAML (.yaml/.yml), TOML or JSON file: one key per flag, named without the dashes "
           f"(learning_rate: 1.0e-4; lists as lists; switches true/false); flags on the command line override it. "
           f"Every run writes output_dir/{CONFIG_FILE}, which passed back here reproduces the run.")
    p("--output_dir", default=None, help=f"Where the adapter, checkpoints, samples and metrics go "
                                        f"(default: {default_output}).")
    p("--seed", type=int, default=None, help="Seed for the adapter init, data order and noise (recorded in "
                                            "run.json; a random one is picked when not given).")
    p("--train_batch_size", type=int, default=train_batch_size, help=batch_help)
    if default_steps:
        steps, checkpoints = default_steps
        length = (f"default: {steps} steps when neither --max_train_steps nor --num_train_epochs is given; "
                  f"${MAX_STEPS_ENV} overrides that number")
        every = (f"default: {steps // checkpoints} when neither --max_train_steps nor --num_train_epochs is given "
                 f"({checkpoints} checkpoints; with ${MAX_STEPS_ENV}=N every N/{checkpoints}), else "
                 f"{DEFAULT_CHECKPOINTING_STEPS}")
    else:
        length = f"default: {DEFAULT_EPOCHS}; with neither flag, ${MAX_STEPS_ENV}=N trains N steps"
        every = f"default: {DEFAULT_CHECKPOINTING_STEPS}"
    epochs = length.replace("default: ", "with neither: ") if default_steps else length
    p("--num_train_epochs", type=int, default=None, help=f"Epochs to train when --max_train_steps is not given "
                                                         f"({epochs}).")
    p("--max_train_steps", type=int, default=None,
      help=f"Optimizer steps to train; overrides --num_train_epochs ({length}).")
    p("--checkpointing_steps", type=int, default=None,
      help=f"Write output_dir/checkpoint-N (adapter, optimizer/scheduler/RNG state, samples) every N steps "
           f"({every}).")
    p("--checkpoints_total_limit", type=int, default=None,
      help="Keep at most this many checkpoints (oldest go first).")
    p("--resume_from_checkpoint", default=None,
      help="'latest' (the newest checkpoint in output_dir; starts fresh if there is none) or a checkpoint folder.")
    p("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches accumulated per optimizer step.")
    p("--learning_rate", type=float, default=None,
      help="Learning rate of the adapter matrices (default per method: "
           + ", ".join(f"{m} {cls.default_learning_rate:g}" for m, cls in METHODS.items()) + ").")
    p("--lr_scheduler", default="constant",
      choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
      help="Learning-rate schedule (diffusers.optimization.get_scheduler).")
    p("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning-rate schedule.")
    p("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables clipping).")
    p("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    p("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    p("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay of the adapter matrices.")
    p("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    p("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
      help="Mixed precision (default: accelerate's config / launch flag). Frozen weights are cast to it; "
           "adapter parameters stay fp32.")
    p("--distance_logging_steps", type=int, default=DEFAULT_DISTANCE_LOGGING_STEPS,
      help="Weight-distance logging in metrics.jsonl (and the trackers): every step the followed layer (DeLoRA "
           "Fig. 3's, the first self-attention's out-projection; a language model's first adapted layer) as "
           "distance_fig3 / rel_distance_fig3; every N steps, at every checkpoint step and at the last step "
           "every adapted layer too (distance/<layer>, rel_distance/<layer>, distance_mean/max, "
           "rel_distance_mean/max). 1: every layer every step (costs 1-2 %% of a UNet step for some methods) "
           f"(default: {DEFAULT_DISTANCE_LOGGING_STEPS}).")
    p("--report_to", default=None, choices=["tensorboard", "wandb", "comet_ml", "all", "none"],
      help="Trackers besides output_dir/metrics.jsonl, each given the losses, learning rates, distance curves "
           "(distance/<layer>) and the samples at checkpoints: tensorboard (output_dir/logs), wandb (Weights & "
           "Biases; pip install wandb; WANDB_MODE=offline keeps the run on this machine, in output_dir/logs/wandb "
           "unless $WANDB_DIR is set), comet_ml, all (every one of these that is installed) (default: tensorboard "
           "when installed, else none).")
    p("--dataloader_num_workers", type=int, default=0,
      help="Worker processes for data loading (0: in the main process).")
    p("--ema_decay", type=float, default=None,
      help="Also keep an exponential moving average of the adapter, updated after every optimizer step "
           "(average = d · average + (1 − d) · weights, d this value, in (0, 1); 0.999 is typical, 0.9-0.99 for "
           "short runs) and saved as an adapter of its own in checkpoint-N/ema/ and output_dir/ema/ "
           "(lowrank.load_adapter reads them; python -m training.export RUN/ema exports it), with samples of it "
           "in ema/samples/ beside the normal ones (image trainers). Training itself is unchanged "
           "(default: off).")
    p("--ema_start_step", type=int, default=0,
      help="With --ema_decay: the average equals the weights up to this optimizer step and averages from the "
           "next one on (default: 0, from the first step).")
    add_runtime_args(parser)
    # test-only hooks, hidden from --help
    p("--debug_nan_at_step", type=int, default=None, help=argparse.SUPPRESS)
    p("--debug_step_delay", type=float, default=0.0, help=argparse.SUPPRESS)


def add_dataset_args(group, dataset_help: str, config_help: str | None = None) -> None:
    """The `datasets` library's flags, named as diffusers' examples name them: --dataset_name (what this trainer
    reads from it), --dataset_config_name where the trainer takes one, and --cache_dir."""
    group.add_argument("--dataset_name", default=None, help=dataset_help)
    if config_help:
        group.add_argument("--dataset_config_name", default=None, help=config_help)
    group.add_argument("--cache_dir", default=None, help="Cache folder of the 'datasets' library for --dataset_name.")


def add_diffusion_args(parser: argparse.ArgumentParser, default_resolution: str = "") -> None:
    """Resolution, UNet memory and sampling flags of the image trainers."""
    p = parser.add_argument
    p("--resolution", type=int, default=None, help=f"Training and sample resolution in pixels{default_resolution}.")
    p("--gradient_checkpointing", action="store_true",
      help="Recompute the denoiser's (UNet's or transformer's) activations in backward: less memory, a slower "
           "step. Results do not change.")
    p("--validation_prompt", nargs="+", default=None,
      help="Prompt(s) sampled at every checkpoint and at the end with fixed seeds 0..N-1 "
           "(default: the instance prompt).")
    p("--num_validation_images", type=int, default=4, help="Images per validation prompt (seeds 0..N-1).")
    p("--validation_steps", type=int, default=None,
      help="Also sample every N steps into output_dir/validation/step-N (default: only at checkpoints and the end).")
    p("--skip_final_samples", action="store_true",
      help="Do not sample the final adapter at the end of training (no samples/ or samples_grid.png in "
           "output_dir); checkpoints and --validation_steps still sample. Saves the final sampling time, e.g. "
           "for benchmarks and sweeps.")
    p("--num_inference_steps", type=int, default=25, help="Denoising steps for samples and class images.")
    p("--validation_loss_images", type=int, default=0,
      help="Hold the last N training images (DreamBooth's instance images, the semantic map's pairs) out of "
           "training and log their denoising loss as val_loss in metrics.jsonl at every checkpoint step and the "
           "last step (the base model's in run.json): fixed noise (--validation_loss_seed) at "
           "--validation_loss_timesteps points spread over the noise schedule, model in eval mode, unweighted "
           "MSE; the same noise for every checkpoint and every method (default: 0, off).")
    p("--validation_loss_timesteps", type=int, default=4,
      help="Points of the noise schedule the validation loss averages over: timestep (or sigma) index "
           "(k + 1/2)/K of the training schedule, k = 0..K-1 (default: 4).")
    p("--validation_loss_seed", type=int, default=0,
      help="Seed of the validation loss's latents and noise, apart from --seed (default: 0).")
    p("--snr_gamma", type=float, default=None,
      help="Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' --snr_gamma, 5.0 the usual value): each image's "
           "MSE times min(SNR(t), γ)/SNR(t) for epsilon-prediction models, min(SNR(t), γ)/(SNR(t) + 1) for "
           "v-prediction ones, so the many low-noise steps stop dominating. SD and SDXL (FLUX weights its timesteps "
           "with --weighting_scheme) (default: none, unweighted MSE).")
    p("--noise_offset", type=float, default=0.0,
      help="Offset noise (diffusers' --noise_offset, 0.05-0.1 typical): the training noise plus offset · N(0, 1), "
           "one constant per image and latent channel, so the model learns to make images darker or brighter "
           "overall. SD and SDXL (default: 0, off).")
    p("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance for samples and class images.")
    p("--export_diffusers", type=_bool, nargs="?", const=True, default=True,
      help="At the end, also write output_dir/pytorch_lora_weights.safetensors: the final adapter as the exact "
           "LoRA file diffusers' pipe.load_lora_weights(output_dir) reads (every method but DoRA as plain LoRA "
           "factors; DoRA in diffusers' DoRA layout). --export_diffusers false skips it.")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Reproducibility and multi-process flags every trainer shares (see training/common/runtime.py)."""
    p = parser.add_argument
    p("--deterministic", action="store_true",
      help="Bit-identical reruns on the same machine: deterministic kernels (torch.use_deterministic_algorithms, "
           "cuDNN without autotuning, CUBLAS_WORKSPACE_CONFIG=:4096:8) and a fixed --num_threads. Some GPU ops "
           "get slower; an op with no deterministic kernel stops the run with an error.")
    p("--num_threads", type=int, default=None,
      help="CPU threads for torch's intra-op parallelism (results depend on it; default: torch's own choice, "
           "with --deterministic the cores this process may use).")
    p("--ddp_timeout", type=int, default=1800,
      help="Seconds a process waits for the others in a collective (all-reduce, barrier) before it stops with "
           "an error: bounds the time a multi-process run hangs when one worker dies. Raise it when the main "
           "process does long work alone (e.g. generating many class images).")


def env_max_steps() -> int | None:
    """$LOWRANK_MAX_STEPS as a number of steps (None when unset): every trainer trains that many steps when
    neither --max_train_steps nor --num_train_epochs is given."""
    text = os.environ.get(MAX_STEPS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise TrainingError(f"${MAX_STEPS_ENV} must be a positive number of steps, got {text!r}")
    return int(text)


def resolve_run_length(args: argparse.Namespace, default_steps: tuple[int, int] | None = None) -> None:
    """Fill --num_train_epochs / --max_train_steps / --checkpointing_steps the user left unset: with neither
    a step nor an epoch flag, $LOWRANK_MAX_STEPS steps when it is set, else an image trainer's `default_steps`
    = (steps, checkpoints): that many steps with that many checkpoints; otherwise diffusers' defaults (1 epoch,
    a checkpoint every 500 steps)."""
    if args.max_train_steps is None and args.num_train_epochs is None:
        steps = env_max_steps() or (default_steps[0] if default_steps else None)
        args.max_train_steps = steps
        if default_steps and args.checkpointing_steps is None:
            args.checkpointing_steps = max(1, steps // default_steps[1])
    if args.num_train_epochs is None:
        args.num_train_epochs = DEFAULT_EPOCHS
    if args.checkpointing_steps is None:
        args.checkpointing_steps = DEFAULT_CHECKPOINTING_STEPS


def check_training_args(args: argparse.Namespace) -> None:
    """Cross-flag checks shared by the trainers; one TrainingError per problem (after `resolve_run_length`:
    it fills the run length's defaults)."""
    positive = ["train_batch_size", "num_train_epochs", "checkpointing_steps", "gradient_accumulation_steps",
                "num_validation_images", "num_inference_steps", "ddp_timeout", "distance_logging_steps",
                "validation_loss_timesteps"]
    for name in positive + ["max_train_steps", "checkpoints_total_limit", "validation_steps", "resolution",
                          "num_threads"]:
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise TrainingError(f"--{name} must be positive, got {v}")
    for name in ("learning_rate", "lambda_learning_rate"):
        v = getattr(args, name, None)
        if v is not None and not v > 0:
            raise TrainingError(f"--{name} must be positive, got {v}")
    gamma, offset = getattr(args, "snr_gamma", None), getattr(args, "noise_offset", 0.0)
    if gamma is not None and not 0 < gamma < float("inf"):
        raise TrainingError(f"--snr_gamma must be a positive number (5.0 is the usual value), got {gamma}")
    if not 0 <= offset < float("inf"):
        raise TrainingError(f"--noise_offset must be >= 0 (0.05-0.1 is typical), got {offset}")
    decay = getattr(args, "ema_decay", None)
    if decay is not None and not 0 < decay < 1:
        raise TrainingError(f"--ema_decay must be between 0 and 1, both excluded (0.999 is typical), got {decay}")
    if getattr(args, "ema_start_step", 0) < 0:
        raise TrainingError(f"--ema_start_step must be >= 0, got {args.ema_start_step}")
    if getattr(args, "validation_loss_images", 0) < 0:
        raise TrainingError(f"--validation_loss_images must be >= 0, got {args.validation_loss_images}")
    if args.lr_warmup_steps < 0 or args.max_grad_norm < 0 or args.dataloader_num_workers < 0:
        raise TrainingError("--lr_warmup_steps, --max_grad_norm and --dataloader_num_workers must be >= 0")

