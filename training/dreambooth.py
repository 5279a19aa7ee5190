#!/usr/bin/env python
"""DreamBooth with lowrank adapters:  accelerate launch training/dreambooth.py --method delora

Follows diffusers' examples/dreambooth/train_dreambooth_lora.py (flag names, accelerate structure,
prior preservation), with lowrank adapters on the UNet's attention projections instead of peft.
With no arguments it trains on the embedded example subject with the built-in tiny SD (random
weights: it shows the machinery, not image quality).

Outputs (output_dir):
    adapter_config.json, adapter.safetensors   the final adapter (lowrank.load_adapter)
    samples/, samples_grid.png                 fixed-seed samples of the final adapter (+ prompts.jsonl)
    checkpoint-N/                              adapter, optimizer/scheduler/RNG state, samples/
    ema/, checkpoint-N/ema/                    with --ema_decay: the adapter's moving average, + samples/
    metrics.jsonl                              per step: loss, lr, ‖W_eff − W0‖_F of every adapted layer; with
                                               --validation_loss_images, val_loss at checkpoints and the last step
    run.json                                   arguments, resolved settings, library versions
    README.md                                  model card (diffusers' front matter, how to load it)
Exit codes (training/common/errors.py): 0 done; 1 diverged (the loss or gradient norm NaN/inf) or a write failed;
2 bad input (one `error:` line on stderr); 143 stopped by SIGTERM (a checkpoint at that step is saved).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/dreambooth.py): make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ground import runfolder
from training.common import TrainingError
from training.common.export import export_diffusers
from training.common.loop import TrainingRun
from training.common.runtime import run_trainer
from training.common.spec import RunSpec
from training.common.task import Task
from training.common.tracking import setup_console
from training.families import Family, expand, family_of, load_family, moved_to, select, stack, text_encoders
from training.images.buckets import assign_buckets, bucket_counts
from training.images.files import load_dataset_images, load_image_dir
from training.images.latent_cache import WithCachedVAE, check_crop_windows
from training.images.samples import (
    count_images,
    generate,
    generate_class_images,
    write_grid,
    write_samples,
)
from training.images.validation import HeldOutImages, held_out_loss, hold_out
from training.subject.args import build_parser, parse_args
from training.subject.data import (
    EXAMPLE_NAME,
    DreamBoothDataset,
    collate,
    example_subject,
)
from training.subject.text_encoder import TrainedParts, adapt_text_encoders, parameter_groups, save_parts

logger = setup_console()

# every trainer script offers build_parser/parse_args/main/train; DreamBooth's command line lives in
# training/subject/args.py, where the app reads its defaults without importing this script
__all__ = ["build_parser", "parse_args", "main", "train"]


def main(argv=None) -> int:
    return run_trainer(parse_args, train, argv)


class DreamBooth(HeldOutImages, Task):
    """DreamBooth's loss (DreamBooth Eq. 1, + Eq. 2 with prior preservation) and its samples."""

    outputs = "samples_grid.png, samples/, pytorch_lora_weights.safetensors (for diffusers)"

    def __init__(self, run: TrainingRun, family: Family, pipe, instance_prompt: str, class_prompt: str | None,
                 args, captions: list[str] | None = None, held_out: tuple[list, list | None] = ([], None)):
        self.run, self.args, self.family = run, args, family
        self.fig3_pattern = family.fig3_pattern
        self.model = family.denoiser(pipe)
        # --cache_latents: the objective's VAE serves each distinct image's encoding from a cache (bit-identical)
        self.objective = family.objective(WithCachedVAE(pipe) if args.cache_latents else pipe, run.weight_dtype,
                                          run.device, args)
        # --train_text_encoder: the denoiser and text encoders train as one module; the prompts are encoded every step
        self.parts = TrainedParts(family, pipe) if args.train_text_encoder else None
        self.pipe, self.prompts = pipe, (instance_prompt, class_prompt, captions)
        # the text encoders are frozen: each prompt is encoded once (the family knows how: SDXL's two encoders)
        self.instance_cond = family.encode(pipe, [instance_prompt], args.resolution)
        self.class_cond = family.encode(pipe, [class_prompt], args.resolution) if class_prompt else None
        # per-image captions (--caption_column): row i for instance image i
        self.caption_conds = stack(*[family.encode(pipe, captions[i:i + 32], args.resolution)
                                     for i in range(0, len(captions), 32)]) if captions else None
        # --caption_dropout: the empty prompt's conditioning, encoded once like the others
        self.empty_cond = family.encode(pipe, [""], args.resolution) if args.caption_dropout else None
        self.val_pipe = family.sampling_pipeline(pipe)
        self.held_out = self.held_out_batch(pipe, instance_prompt, *held_out)
        self.val_prompts = args.validation_prompt or [instance_prompt]
        # --offload: the encoders' work is done until the next samples; their memory goes to the denoiser
        self.offloaded = text_encoders(pipe) if args.offload else []
        for encoder in self.offloaded:
            encoder.to("cpu")

    def loss(self, model, batch: dict, gen: torch.Generator) -> torch.Tensor:
        pixels, prior = batch["pixels"], self.class_cond is not None
        n = pixels.shape[0] // 2 if prior else pixels.shape[0]   # with prior preservation: instance | class
        size = tuple(pixels.shape[-2:]) if self.args.enable_bucket else self.args.resolution   # (height, width)

        def conditioning() -> dict:
            cond, class_cond, empty_cond = self.prompt_conds(batch, n)
            if "drop" in batch:   # --caption_dropout: these instance images train with the empty prompt
                cond = dropped(cond, empty_cond, batch["drop"].to(self.run.device))
            if prior:
                cond = stack(cond, expand(class_cond, n))
            return self.family.image_conditioning(cond, batch["crops"].to(self.run.device), size)

        if self.parts is not None:   # encoded inside the model's forward: one (DDP) forward over both parts
            denoise = lambda noisy, t: model(noisy, t, conditioning)   # noqa: E731
        else:
            cond = conditioning()
            denoise = lambda noisy, t: self.family.denoise(model, noisy, t, cond)   # noqa: E731
        return self.objective.loss(pixels, denoise, gen,
                                   prior_loss_weight=self.args.prior_loss_weight if prior else None)

    def prompt_conds(self, batch: dict, n: int) -> tuple[dict, dict | None, dict | None]:
        """(the n instance images' prompt conditioning, the class prompt's, the empty prompt's): the encodings made
        once, or, when the text encoders train, the batch's prompts encoded now, with gradients."""
        device = self.run.device
        if self.parts is None:
            cond = expand(self.instance_cond, n) if self.caption_conds is None else \
                select(self.caption_conds, batch["index"].to(device))
            return cond, self.class_cond, self.empty_cond
        instance_prompt, class_prompt, captions = self.prompts
        encode = lambda prompts: self.family.encode_with_grad(self.pipe, prompts, self.args.resolution)   # noqa: E731
        cond = expand(encode([instance_prompt]), n) if captions is None else \
            encode([captions[i] for i in batch["index"].tolist()])
        return (cond, encode([class_prompt]) if self.class_cond is not None else None,
                encode([""]) if "drop" in batch else None)

    def held_out_batch(self, pipe, instance_prompt: str, images: list, captions: list[str] | None):
        """(pixels, conditioning) of the held-out images (--validation_loss_images), centre-cropped; None without."""
        if not images:
            return None
        size = self.args.resolution
        centre = DreamBoothDataset(images, None, size, center_crop=True, seed=0)
        pixels, crops = zip(*(centre.crop(img, None) for img in images))
        self.held_out_text = (captions, instance_prompt, len(images), torch.tensor(crops).to(self.run.device))
        return torch.stack(pixels), self.held_out_conditioning(pipe, *self.held_out_text)

    def held_out_conditioning(self, pipe, captions: list[str] | None, instance_prompt: str, n: int, crops) -> dict:
        size = self.args.resolution
        cond = self.family.encode(pipe, captions, size) if captions else \
            expand(self.family.encode(pipe, [instance_prompt], size), n)
        return self.family.image_conditioning(cond, crops, size)

    def validation_loss(self, model) -> float:
        """The held-out images' denoising loss at fixed noise and timesteps (training/images/validation.py)."""
        pixels, cond = self.held_out
        denoiser = model
        if isinstance(model, TrainedParts):   # the text encoders train: the held-out prompts as they encode now
            denoiser, cond = model.denoiser, self.held_out_conditioning(self.pipe, *self.held_out_text)
        return held_out_loss(self.objective, model, lambda noisy, t: self.family.denoise(denoiser, noisy, t, cond),
                             pixels, self.args, self.run.accelerator.autocast)

    def samples(self, step: int, folder: Path, tag: str = "validation") -> list:
        """Fixed-seed samples of every validation prompt, written to `folder` and logged to the trackers."""
        a = self.args
        with moved_to(self.offloaded, self.run.device):
            shots = generate(self.val_pipe, self.val_prompts, a.num_validation_images, a.resolution,
                             a.num_inference_steps, a.guidance_scale, self.run.accelerator.autocast,
                             self.family.call_kwargs(self.val_pipe))
        write_samples(folder, shots)
        self.run.metrics.log_images(step, [img for _, _, img in shots], tag=tag)
        return shots

    def finish(self, output_dir: Path, step: int) -> None:
        if not self.args.skip_final_samples:
            shots = self.samples(step, output_dir / runfolder.SAMPLES, tag="final")
            write_grid(output_dir / runfolder.SAMPLES_GRID, shots, cols=self.args.num_validation_images)
        if self.args.export_diffusers:   # with --train_text_encoder one file of every part (text_encoder.* keys too)
            export_diffusers(dict(self.parts.items()) if self.parts is not None else self.model, output_dir,
                             component=self.family.denoiser_name)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        if isinstance(model, TrainedParts):
            save_parts(model, folder)
        else:
            super().save(model, folder)

    def param_groups(self, model: torch.nn.Module, lr: float, args) -> list[dict]:
        if isinstance(model, TrainedParts):
            return parameter_groups(model, lr, args)
        return super().param_groups(model, lr, args)


def dropped(cond: dict, empty: dict, drop: torch.Tensor) -> dict:
    """`cond` with the rows where `drop` is true replaced by the empty prompt's conditioning `empty` (one row)."""
    return {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty[k].to(v.dtype).expand_as(v), v)
            for k, v in cond.items()}


def train(spec: RunSpec) -> None:
    args = spec.args
    # Data before the run folder and the model: bad input fails in seconds, with nothing written.
    captions = None
    if args.instance_data_dir:
        instance_images = load_image_dir(args.instance_data_dir, args.resolution)
        source = f"{len(instance_images)} from {args.instance_data_dir}"
    elif args.dataset_name:
        instance_images, captions = load_dataset_images(args.dataset_name, args.resolution, args.image_column,
                                                        args.caption_column, args.dataset_config_name, args.cache_dir)
        source = f"{len(instance_images)} from --dataset_name {args.dataset_name}" + (
            f", captions from column {args.caption_column!r}" if captions else "")
    else:
        instance_images = example_subject(args.resolution)
        source = EXAMPLE_NAME
    # --validation_loss_images: the last N images (and their captions) never train
    instance_images, held_out = hold_out(instance_images, args.validation_loss_images, "instance images")
    held_captions, captions = (captions[len(instance_images):], captions[:len(instance_images)]) if captions \
        else (None, None)
    check_crop_windows(instance_images, args, "instance image")   # --cache_latents: few crops per image, else misses
    buckets = assign_buckets(instance_images, args)   # --enable_bucket: each image's (width, height); else None
    # the family's own checks of the run's settings (FLUX's --max_sequence_length), also before anything is written
    family_of(args.pretrained_model_name_or_path).for_run(args)
    run = TrainingRun(spec)   # the run folder: only after the data is known to be good
    logger.info("instance images: %s%s; prompt %r", source, f" ({len(held_out)} held out for the validation loss)"
                if held_out else "", args.instance_prompt)

    # Frozen weights in the mixed-precision dtype; the adapter is injected afterwards, in fp32.
    with run.accelerator.main_process_first():   # one process builds the tiny preset / fills the hub cache
        family, pipe = load_family(args.pretrained_model_name_or_path, revision=args.revision,
                                   torch_dtype=None if run.weight_dtype == torch.float32 else run.weight_dtype)
    family = family.for_run(args)
    for flag in ("resolution", "bucket_reso_steps") if buckets else ("resolution",):
        if getattr(args, flag) % (pipe.vae_scale_factor * 2):
            raise TrainingError(f"--{flag} {getattr(args, flag)} must be a multiple of {pipe.vae_scale_factor * 2} "
                                f"for this model")
    for module in [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]:   # + safety checker
        module.requires_grad_(False)
        module.to(run.device)
    if family.vae_in_fp32:
        pipe.vae.to(torch.float32)

    class_images = None
    if args.with_prior_preservation:   # class images come from the base model, before any adapter
        class_dir = Path(args.class_data_dir).expanduser()
        if count_images(class_dir) < args.num_class_images:
            generate_class_images(family.sampling_pipeline(pipe), class_dir, args.class_prompt,
                                  args.num_class_images, args.resolution, args.num_inference_steps,
                                  args.guidance_scale, args.sample_batch_size, run.process_index,
                                  run.num_processes, show_progress=run.is_main, call_kwargs=family.call_kwargs(pipe))
        run.accelerator.wait_for_everyone()
        class_images = load_image_dir(class_dir, args.resolution, flag="--class_data_dir")[: args.num_class_images]
        if len(class_images) < args.num_class_images:
            raise TrainingError(f"--class_data_dir {class_dir} has {len(class_images)} readable images, fewer than "
                                f"--num_class_images {args.num_class_images}; remove the unreadable ones")
        check_crop_windows(class_images, args, "class image")

    dataset = DreamBoothDataset(instance_images, class_images, args.resolution, args.center_crop, run.seed,
                                args.caption_dropout, buckets)
    max_train_steps = run.total_steps(len(dataset), dataset.groups)
    model = family.denoiser(pipe)   # the UNet, or a DiT family's transformer
    task = DreamBooth(run, family, pipe, args.instance_prompt, args.class_prompt if class_images else None, args,
                      captions, (held_out, held_captions))
    # the base model's validation loss, before any adapter exists: the same for every method
    validation = task.base_validation(model)
    run.adapt(model, max_train_steps, target_modules=list(family.default_targets))
    text_encoder = adapt_text_encoders(run, task.parts, family)   # --train_text_encoder's (None without it)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    run.fit(task.parts if task.parts is not None else model, task, dataset, collate, num_train_steps=max_train_steps,
            info={"instance_images": len(instance_images), "class_images": len(class_images or []),
                  "caption_source": "data" if captions else "instance_prompt", "family": family.name,
                  "aspect_buckets": bucket_counts(buckets) if buckets else None,
                  "pipeline_class": family.pipeline_classes[0], "family_tags": list(family.tags),
                  "denoiser": family.denoiser_name, "validation_loss": validation,
                  "pretrained_model_path": family.local_folder(args.pretrained_model_name_or_path),
                  **({"text_encoder": text_encoder} if text_encoder else {})})


if __name__ == "__main__":
    sys.exit(main())
