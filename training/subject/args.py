"""DreamBooth's flags and their checks: `training/dreambooth.py`'s command line, here so that the app can read the
trainer's defaults (its Train tab starts from them) without importing the trainer script."""
from __future__ import annotations

from pathlib import Path

from training.common import TrainingError
from training.common.args import (
    ArgumentParser,
    add_adapter_args,
    add_dataset_args,
    add_training_args,
    check_folder_path,
)
from training.common.spec import RunSpec, resolve_run
from training.common.tasks import DREAMBOOTH
from training.common.tracking import setup_console
from training.families import default_resolution
from training.images.diffusion import WEIGHTING_SCHEMES
from training.images.files import check_image_folder
from training.subject.data import EXAMPLE_CLASS_PROMPT, EXAMPLE_PROMPT

logger = setup_console()

DESCRIPTION = "DreamBooth with lowrank adapters:  accelerate launch training/dreambooth.py --method delora"

# With no step or epoch flag: 300 steps, a checkpoint with samples every 100 (what `make demo` shows: the
# distance curve over steps and samples along the way), not diffusers' one epoch (5 steps on the example).
DEFAULT_STEPS = (300, 3)   # (steps, checkpoints)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=DESCRIPTION)
    add_training_args(parser, default_resolution=" (default: 512, 1024 for SDXL; 64 with the tiny presets)",
                      default_output=DREAMBOOTH.output_help(), default_steps=DEFAULT_STEPS)
    g = parser.add_argument_group("DreamBooth")
    g.add_argument("--instance_data_dir", default=None,
                   help="Folder with 3-5 photos of the subject (default: the embedded example cat).")
    add_dataset_args(g, "Instead of --instance_data_dir: a dataset of subject photos read by the 'datasets' library: "
                     "a local folder (save_to_disk output, parquet/JSON/CSV files, an imagefolder with "
                     "metadata.jsonl), a parquet/JSON/CSV file, or a hub name. Its 'train' split (or only split).",
                     config_help="Config of the --dataset_name dataset, if it has several.")
    g.add_argument("--image_column", default="image",
                   help="--dataset_name's image column: Image cells or paths relative to the dataset's folder "
                        "(default: image; an imagefolder's file_name column is read as 'image').")
    g.add_argument("--caption_column", default=None,
                   help="--dataset_name's per-image prompt column; each image trains with its own caption (default: "
                        "none, every image uses --instance_prompt).")
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="Probability that an instance image trains with the empty prompt \"\" instead of its caption "
                        "or --instance_prompt (kohya's caption_dropout_rate, diffusers' --proportion_empty_prompts): "
                        "drawn per image and step from --seed, so reruns and resumed runs drop the same ones; class "
                        "images keep --class_prompt (default: 0, off).")
    g.add_argument("--instance_prompt", default=None,
                   help=f"Prompt with the identifier of the subject (default with the example: {EXAMPLE_PROMPT!r}; "
                        f"required with --instance_data_dir and --dataset_name, samples use it).")
    g.add_argument("--class_data_dir", default=None,
                   help="Class images for prior preservation; missing ones are generated "
                        "(default: output_dir/class_images).")
    g.add_argument("--class_prompt", default=None,
                   help=f"Prompt of the subject's class (default with the example: {EXAMPLE_CLASS_PROMPT!r}).")
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="Add the class-prior loss (DreamBooth Eq. 2).")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    g.add_argument("--num_class_images", type=int, default=100, help="Class images to use (generated when missing).")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    g.add_argument("--center_crop", action="store_true", help="Center-crop images (default: random crops).")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode each distinct training image (instance, class, held-out) with the VAE once and reuse "
                        "its latent distribution instead of encoding at every step (diffusers' --cache_latents); the "
                        "latent sample is still drawn at every step, so the adapter is bit-identical to a run "
                        "without it. With random crops each image needs a fixed crop: square images, or "
                        "--center_crop (default: off).")
    g.add_argument("--enable_bucket", action="store_true",
                   help="Aspect-ratio buckets (kohya's flag): each instance image trains at the bucket (width, "
                        "height) nearest its aspect ratio, area at most --resolution², resized to cover it and "
                        "cropped by the pixels left over, instead of a --resolution square crop; batches hold one "
                        "bucket; a class image takes its instance image's bucket (default: off, square crops).")
    g.add_argument("--bucket_reso_steps", type=int, default=None,
                   help="Bucket sides are multiples of this many pixels (default with --enable_bucket: 64).")
    g.add_argument("--min_bucket_reso", type=int, default=None,
                   help="Shortest bucket side in pixels (default with --enable_bucket: --resolution / 2).")
    g.add_argument("--max_bucket_reso", type=int, default=None,
                   help="Longest bucket side in pixels (default with --enable_bucket: 2 x --resolution).")
    f = parser.add_argument_group("flow matching (FLUX.1, FLUX.2-klein; diffusers' flags and defaults)")
    f.add_argument("--weighting_scheme", default="none", choices=WEIGHTING_SCHEMES,
                   help="Timestep density and loss weight: logit_normal (σ = sigmoid(N(--logit_mean, --logit_std))), "
                        "mode (--mode_scale), sigma_sqrt (weight σ⁻²), cosmap, none (uniform, weight 1) "
                        "(default: none).")
    f.add_argument("--logit_mean", type=float, default=0.0, help="Mean of logit_normal (default: 0.0).")
    f.add_argument("--logit_std", type=float, default=1.0, help="Std of logit_normal (default: 1.0).")
    f.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme (default: 1.29).")
    f.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens of the DiT families' prompt encoder (default: the family's, 512).")
    g.add_argument("--offload", action="store_true",
                   help="Keep the text encoder(s) on the CPU once the prompts are encoded, on the accelerator only "
                        "while checkpoint samples are made (diffusers' --offload): frees their memory for the "
                        "denoiser. Results do not change.")
    t = parser.add_argument_group("text encoder (SD-1.5, SDXL; diffusers' --train_text_encoder)")
    t.add_argument("--train_text_encoder", action="store_true",
                   help="Train the text encoder(s) with the denoiser: the same --method and options injected into "
                        "CLIPAttention's q_proj, k_proj, v_proj, out_proj of text_encoder (SDXL: and text_encoder_2); "
                        "prompts are encoded every step. Saved in text_encoder/ (text_encoder_2/) beside the "
                        "adapter and exported with it. Not for FLUX.1 / FLUX.2-klein (default: off).")
    t.add_argument("--text_encoder_rank", type=int, default=None,
                   help="Rank of the text encoders' adapter with --train_text_encoder (default: --rank).")
    t.add_argument("--text_encoder_lr", type=float, default=None,
                   help="Learning rate of the text encoders' adapter with --train_text_encoder, its own AdamW group "
                        "(default: the denoiser's learning rate).")
    add_adapter_args(parser)
    return parser


def check_text_encoder_args(args) -> None:
    """--train_text_encoder's flags (the family's own check, FLUX's refusal, is Family.for_run)."""
    if args.text_encoder_rank is not None and args.text_encoder_rank <= 0:
        raise TrainingError(f"--text_encoder_rank must be a positive integer, got {args.text_encoder_rank}")
    if args.text_encoder_lr is not None and not args.text_encoder_lr > 0:
        raise TrainingError(f"--text_encoder_lr must be positive, got {args.text_encoder_lr}")
    if args.train_text_encoder and args.offload:
        raise TrainingError("--offload keeps the text encoders on the CPU, --train_text_encoder trains them; "
                            "give one of the two")
    given = [f for f in ("text_encoder_rank", "text_encoder_lr") if getattr(args, f) is not None]
    if given and not args.train_text_encoder:
        logger.warning("--%s is ignored without --train_text_encoder", given[0])


def parse_args(argv=None) -> RunSpec:
    """The resolved run (training.common.spec) of DreamBooth's command line; TrainingError on bad input."""
    args = build_parser().parse_args(argv)
    if args.instance_data_dir is not None and args.dataset_name is not None:
        raise TrainingError("give --instance_data_dir or --dataset_name, not both")
    if args.instance_data_dir is not None:   # the most useful error first: a missing folder, then its prompt
        check_image_folder(args.instance_data_dir, "--instance_data_dir")
    data_flag = "--instance_data_dir" if args.instance_data_dir else "--dataset_name" if args.dataset_name else None
    if data_flag is None:
        args.instance_prompt = args.instance_prompt or EXAMPLE_PROMPT
        args.class_prompt = args.class_prompt or EXAMPLE_CLASS_PROMPT
    elif not args.instance_prompt:
        raise TrainingError(f"--instance_prompt is required with {data_flag} (e.g. 'a photo of sks dog')")
    if not 0 <= args.caption_dropout <= 1:
        raise TrainingError(f"--caption_dropout is a probability: give 0 to 1, got {args.caption_dropout}")
    check_text_encoder_args(args)
    if args.caption_column and not args.dataset_name:
        raise TrainingError("--caption_column reads captions from --dataset_name; give --dataset_name too")
    spec = resolve_run(args, DREAMBOOTH, DEFAULT_STEPS)   # a bad method/option fails now, before any model
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise TrainingError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')")
        args.class_data_dir = args.class_data_dir or str(spec.output_dir / "class_images")
        check_folder_path(Path(args.class_data_dir).expanduser(), "--class_data_dir")
        if args.num_class_images <= 0 or args.sample_batch_size <= 0:
            raise TrainingError("--num_class_images and --sample_batch_size must be positive")
    elif args.class_data_dir and data_flag:
        logger.warning("--class_data_dir is ignored without --with_prior_preservation")
    if args.resolution is None:   # the presets' 64 px; a model's own (SDXL 1024) when its folder says which
        args.resolution = default_resolution(args.pretrained_model_name_or_path)
    check_buckets(args)
    return spec


def check_buckets(args) -> None:
    """--enable_bucket's sizes, their defaults filled in (run.json records them) and checked."""
    given = [f"--{f}" for f in ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso") if getattr(args, f)
             is not None]
    if not args.enable_bucket:
        if given:
            raise TrainingError(f"{given[0]} sets the aspect-ratio buckets of --enable_bucket; add --enable_bucket")
        return
    if args.cache_latents and not args.center_crop:
        raise TrainingError("--cache_latents with --enable_bucket needs --center_crop: a random crop of an image "
                            "resized to cover its bucket moves by the pixels left over, a new cache entry most steps")
    res = args.resolution
    for flag, default in (("bucket_reso_steps", 64), ("min_bucket_reso", res // 2), ("max_bucket_reso", 2 * res)):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.bucket_reso_steps <= 0 or args.min_bucket_reso <= 0:
        raise TrainingError(f"--bucket_reso_steps and --min_bucket_reso must be positive, got "
                            f"{args.bucket_reso_steps} and {args.min_bucket_reso}")
    if not args.min_bucket_reso <= res <= args.max_bucket_reso or res < args.bucket_reso_steps:
        raise TrainingError(f"--enable_bucket: give --min_bucket_reso <= --resolution <= --max_bucket_reso and "
                            f"--bucket_reso_steps <= --resolution (got {args.min_bucket_reso}, {res}, "
                            f"{args.max_bucket_reso}, {args.bucket_reso_steps})")
