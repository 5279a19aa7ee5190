#!/usr/bin/env python
"""Semantic map to image with lowrank adapters:  accelerate launch training/semantic_map.py --method delora

The DeLoRA paper's Table 2 setting (ETHER/OFT's semantic-map protocol): Stable Diffusion learns to draw
an image that follows an ADE20K segmentation map. Two parts train:
- an adapter in the UNet (default targets: q, k, v, out of every attention and ff.net.0.proj, OFT's set);
- a light conditioning encoder, ControlNet's hint block (diffusers' ControlNetConditioningEmbedding):
  8 convs, 3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> C (C = the UNet's first block width, 320 for
  SD-1.5), 3x3, SiLU between, stride 2 at convs 3, 5 and 7, the last conv zero-initialised. Its output is
  added once to the output of the UNet's conv_in (as peft's boft_controlnet and OFT do), so at step 0 the
  model is exactly the base UNet. At SD-1.5 it has 1,086,480 parameters; OFT's "3.1M" also counts a
  2.05M time-embedding MLP its encoder never uses, which is not built here. Models whose VAE downsamples
  less than 8x (the tiny preset: 2x) get one stride-2 stage per halving: block widths (16, 32, 96, 256)
  cut to log2(vae factor) + 1 entries. It trains at --conditioning_learning_rate (default: the adapter's,
  capped at 1e-4 as the ETHER protocol does) and is saved as conditioning_encoder.safetensors beside the
  adapter in every adapter folder.
- or, with --controlnet_model_name_or_path, a pretrained diffusers ControlNet, frozen, supplies the
  down/mid residuals instead (the paper's "pretrained ControlNet encoder" reading); only the adapter trains.

Data (checked before the model loads): ADE20K as distributed (--train_data_dir .../ADEChallengeData2016),
diffusers' imagefolder with metadata.jsonl, or --dataset_name; with no data flag the embedded example set
(training/segmap/data.py says how its maps are made). Captions come from the data when it has them,
else from the map's largest classes ("a photo of wall, floor, bed"); run.json's caption_source says which.
--condition canny|shuffle trains on controlnet-aux's weight-free detectors applied to the target image.

Outputs (output_dir), DreamBooth's layout:
    adapter_config.json, adapter.safetensors, conditioning_encoder.safetensors   the final model
    samples/  per validation map i: p{i}-map.png (control), p{i}-label.png (ids), p{i}-s{seed}.png; grid.png
    checkpoint-N/    adapter + encoder, optimizer/scheduler/RNG state, samples/
    metrics.jsonl    per step: loss, lr (lr_conditioning too), distance_fig3; distance/unet.<layer> of every
                     adapted layer every --distance_logging_steps steps, at checkpoints and the last step;
                     val_loss there too with --validation_loss_images N (the last N training pairs held out)
    run.json         arguments, resolved settings (condition, caption_source, encoder parameters, ...)
Score it with  python -m eval.segmentation --run_dir OUTPUT_DIR --checkpoints all
Exit codes (training/common/errors.py): 0 done; 1 diverged (the loss or gradient norm NaN/inf) or a write failed;
2 bad input (one `error:` line on stderr); 143 stopped by SIGTERM (a checkpoint at that step is saved).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/semantic_map.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from PIL import Image

import lowrank
from ground import runfolder
from training.common import TrainingError
from training.common.args import ArgumentParser, add_adapter_args, add_dataset_args, add_training_args
from training.common.batches import mix_seed
from training.common.loop import TrainingRun
from training.common.models import is_tiny
from training.common.runtime import run_trainer
from training.common.spec import RunSpec, resolve_run
from training.common.task import Task
from training.common.tasks import SEMANTIC_MAP
from training.common.tracking import setup_console
from training.families import SD15, load_family
from training.images.diffusion import DiffusionObjective
from training.images.latent_cache import CachedVAE
from training.images.samples import grid
from training.images.validation import HeldOutImages, held_out_loss, hold_out
from training.segmap import data as sd
from training.segmap.conditioning import (
    ENCODER_FILE,
    ConditionedUNet,
    conditioning_encoder,
    load_encoder,
    save_encoder,
)
from training.segmap.sets import MapData, load_data, validation_items

logger = setup_console()

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]
MAX_CONDITIONING_LR = 1e-4
# With no step or epoch flag: 200 steps, a checkpoint with samples every 100 (what `make demo-seg` shows), not
# diffusers' one epoch (5 steps on the embedded set).
DEFAULT_STEPS = (200, 2)   # (steps, checkpoints)


# ----- flags --------------------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_args(parser, default_resolution=" (default: 512; 64 with the tiny preset)",
                      default_output=SEMANTIC_MAP.output_help(), default_steps=DEFAULT_STEPS)
    g = parser.add_argument_group("semantic map")
    g.add_argument("--train_data_dir", default=None,
                   help="ADE20K root (images/{training,validation}/*.jpg + annotations/{training,validation}/*.png, "
                        "raw ids 0 = other, 1..150) or an imagefolder with metadata.jsonl (default: the embedded "
                        "example set).")
    add_dataset_args(g, "A dataset with image / conditioning image / caption columns, read by the 'datasets' library: "
                     "a local folder (save_to_disk output, parquet/JSON/CSV files, an imagefolder with "
                     "metadata.jsonl), a parquet/JSON/CSV file, or a hub name. Its 'train' split (or only split).")
    g.add_argument("--image_column", default=None, help="Image column (metadata.jsonl default: file_name; "
                                                        "--dataset_name default: the first column).")
    g.add_argument("--conditioning_image_column", default=None,
                   help="Conditioning image column: a label map (ids or ADE palette colours) or, with --condition "
                        "canny/shuffle, a control image; Image cells or paths relative to the dataset's folder "
                        "(default: conditioning_image; --dataset_name: the second column).")
    g.add_argument("--caption_column", default=None,
                   help="Caption column (default: text; --dataset_name: the third column). Without captions, they "
                        "are made from the map.")
    g.add_argument("--condition", default="seg", help="seg (the painted map, default), canny or shuffle "
                                                      "(controlnet-aux's weight-free detectors on the image).")
    g.add_argument("--proportion_empty_prompts", "--caption_dropout", type=float, default=0.0,
                   help="Share of training captions replaced by the empty prompt (0..1), drawn per pair from --seed; "
                        "--caption_dropout is the same flag under DreamBooth's name (default: 0).")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode each distinct training image (and held-out image) with the VAE once and reuse its "
                        "latent distribution instead of encoding at every step (diffusers' --cache_latents); images "
                        "are centre-cropped, so the adapter is bit-identical to a run without it (default: off).")
    g.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training pairs.")
    g.add_argument("--validation_image", nargs="+", default=None,
                   help="Control images or label maps sampled at checkpoints (default: the validation split's first "
                        "--num_validation_maps maps). Paired with --validation_prompt N:N, 1:N or N:1.")
    g.add_argument("--num_validation_maps", type=int, default=4, help="Validation maps sampled at checkpoints.")
    g.add_argument("--conditioning_learning_rate", type=float, default=None,
                   help=f"Learning rate of the conditioning encoder (default: the adapter's, capped at "
                        f"{MAX_CONDITIONING_LR:g}).")
    g.add_argument("--controlnet_model_name_or_path", default=None,
                   help="A pretrained diffusers ControlNet, frozen, supplies the control residuals instead of "
                        "the trained encoder.")
    add_adapter_args(parser)
    return parser


def parse_args(argv=None) -> RunSpec:
    """The resolved run (training.common.spec) of this command line; TrainingError on bad input."""
    args = build_parser().parse_args(argv)
    spec = resolve_run(args, SEMANTIC_MAP, DEFAULT_STEPS, target_modules=TARGET_MODULES)
    if args.condition not in sd.CONDITIONS:
        raise TrainingError(f"--condition {args.condition!r} is unknown; use one of {', '.join(sd.CONDITIONS)} "
                            f"(detectors that need hub weights are not offered)")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise TrainingError("--proportion_empty_prompts must be between 0 and 1")
    for name in ("max_train_samples", "num_validation_maps", "conditioning_learning_rate"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise TrainingError(f"--{name} must be positive, got {v}")
    if args.train_data_dir and args.dataset_name:
        raise TrainingError("give --train_data_dir or --dataset_name, not both")
    vi, vp = args.validation_image or [], args.validation_prompt or []
    if vi and vp and len(vi) != len(vp) and 1 not in (len(vi), len(vp)):
        raise TrainingError(f"{len(vi)} --validation_image and {len(vp)} --validation_prompt: give as many of "
                            f"each, or one of either")
    if args.resolution is None:
        args.resolution = 64 if is_tiny(args.pretrained_model_name_or_path) else 512
    return spec


def main(argv=None) -> int:
    return run_trainer(parse_args, train, argv)


# ----- the task -----------------------------------------------------------------------------------------
class SemanticMap(HeldOutImages, Task):
    """Diffusion loss with the control added to the UNet (ControlNet's objective), samples per map."""

    outputs = f"{ENCODER_FILE}, samples/ (map | samples in samples/grid.png)"

    def __init__(self, run: TrainingRun, pipe, model: ConditionedUNet, validation: list[dict], args,
                 held_out: list | None = None):
        self.run, self.args, self.model = run, args, model
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        # --cache_latents: each distinct image's encoding served from a cache (bit-identical: a fixed crop per pair)
        vae = CachedVAE(pipe.vae) if args.cache_latents else pipe.vae
        self.objective = DiffusionObjective(vae, pipe.scheduler, run.weight_dtype, run.device, args.snr_gamma,
                                            args.noise_offset)
        # the encoder's rate, resolved once (param_groups and run.json read it)
        self.encoder_lr = args.conditioning_learning_rate or min(run.spec.learning_rate, MAX_CONDITIONING_LR)
        self.val_pipe = SD15().sampling_pipeline(pipe)
        self.validation = validation
        self._prompt_cache: dict[str, torch.Tensor] = {}
        if held_out:   # --validation_loss_images: the held-out pairs, each at its fixed crop
            pairs = sd.SemanticMapDataset(held_out, args.resolution, args.condition, seed=0)
            self.held_out = sd.collate([pairs[i] for i in range(len(held_out))])

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:   # frozen text encoder: each caption once
        missing = [c for c in dict.fromkeys(captions) if c not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.run.device)
            for c, e in zip(missing, self.text_encoder(ids)[0]):
                self._prompt_cache[c] = e
        return torch.stack([self._prompt_cache[c] for c in captions])

    def loss(self, model, batch: dict, gen: torch.Generator) -> torch.Tensor:
        control = batch["conditioning_pixel_values"].to(self.run.device)
        emb = self.encode(batch["captions"])
        return self.objective.loss(batch["pixel_values"], lambda noisy, t: model(noisy, t, emb, control), gen)

    def validation_loss(self, model) -> float:
        """The held-out pairs' denoising loss at fixed noise and timesteps (training/images/validation.py)."""
        control = self.held_out["conditioning_pixel_values"].to(self.run.device)
        emb = self.encode(self.held_out["captions"])
        return held_out_loss(self.objective, model, lambda noisy, t: model(noisy, t, emb, control),
                             self.held_out["pixel_values"], self.args, self.run.accelerator.autocast)

    def param_groups(self, model, lr: float, args) -> list[dict]:
        groups = super().param_groups(model, lr, args)
        if model.conditioning_embedding is not None:
            groups.append({"params": list(model.conditioning_embedding.parameters()), "lr": self.encoder_lr,
                           "weight_decay": args.adam_weight_decay, "name": "conditioning"})
        return groups

    def save(self, model, folder: Path) -> None:
        lowrank.save_adapter(self.model.unet, folder)
        if self.model.conditioning_embedding is not None:
            save_encoder(self.model.conditioning_embedding, folder)

    def load(self, model, folder: Path) -> list[str]:
        names = lowrank.load_adapter(self.model.unet, folder)
        if self.model.conditioning_embedding is not None:
            load_encoder(self.model.conditioning_embedding, folder)
        return names

    @torch.no_grad()
    def samples(self, step: int, folder: Path, tag: str = "validation") -> None:
        """Fixed seeds 0..N-1 per validation map; written with its control map (and ids) beside it."""
        a, pipe = self.args, self.val_pipe
        was_training = self.model.training
        self.model.eval()
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rows, tiles, logged = [], [], []
        try:
            for i, item in enumerate(self.validation):
                control = sd.to_tensor(item["control"])[None].to(self.run.device)
                gens = [torch.Generator().manual_seed(s) for s in range(a.num_validation_images)]
                with self.model.conditioned(control), self.run.accelerator.autocast():
                    images = pipe(prompt=[item["prompt"]] * a.num_validation_images, generator=gens,
                                  height=a.resolution, width=a.resolution, num_inference_steps=a.num_inference_steps,
                                  guidance_scale=a.guidance_scale).images
                item["control"].save(tmp / f"p{i:02d}-map.png")
                if item["label"] is not None:
                    runfolder.atomic_write(tmp / f"p{i:02d}-label.png", Image.fromarray(item["label"]).save)
                for s, img in enumerate(images):
                    img.save(tmp / f"p{i:02d}-s{s}.png")
                    rows.append({"image": f"p{i:02d}-s{s}.png", "prompt": item["prompt"], "seed": s,
                                 "map": f"p{i:02d}-map.png",
                                 "label": f"p{i:02d}-label.png" if item["label"] is not None else None})
                tiles += [item["control"], *images]
                logged += images
        finally:
            self.model.train(was_training)
        (tmp / runfolder.PROMPTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        grid(tiles, cols=1 + a.num_validation_images).save(tmp / "grid.png")
        runfolder.replace_dir(tmp, folder)
        self.run.metrics.log_images(step, logged, tag=tag)

    def finish(self, output_dir: Path, step: int) -> None:
        if self.args.skip_final_samples:
            return
        self.samples(step, output_dir / runfolder.SAMPLES, tag="final")
        runfolder.atomic_write(output_dir / runfolder.SAMPLES_GRID,
                               lambda p: shutil.copyfile(output_dir / runfolder.SAMPLES / "grid.png", p))


def check_controlnet(controlnet, pipe, path: str) -> None:
    """A ControlNet must fit the UNet it feeds: the same text width and block widths (its residuals are added
    block by block), and a hint block that downsamples the control image as much as the VAE does the image."""
    flag = f"--controlnet_model_name_or_path {path}"
    c, u = controlnet.config, pipe.unet.config
    if c.cross_attention_dim != u.cross_attention_dim or list(c.block_out_channels) != list(u.block_out_channels):
        raise TrainingError(f"{flag} was made for another UNet (blocks {list(c.block_out_channels)}, text width "
                            f"{c.cross_attention_dim}; this one: {list(u.block_out_channels)}, "
                            f"{u.cross_attention_dim}); use a ControlNet of this base model")
    factor = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    if factor != pipe.vae_scale_factor:
        raise TrainingError(f"{flag} downsamples the control image {factor}x but this model's VAE "
                            f"{pipe.vae_scale_factor}x; use a ControlNet of this base model")


def train(spec: RunSpec) -> None:
    args = spec.args
    data = MapData.from_args(args)
    train_set, val_set, source = load_data(data)   # bad input fails in seconds, before anything is written
    train_set, held_out = hold_out(train_set, args.validation_loss_images, "training pairs")
    run = TrainingRun(spec)
    logger.info("training pairs: %d from %s; validation maps: %d", len(train_set), source, len(val_set))
    validation = validation_items(data, val_set)
    captions = {ex.caption is not None for ex in train_set}
    caption_source = "data" if captions == {True} else "map" if captions == {False} else "data, else map"

    with run.accelerator.main_process_first():
        family, pipe = load_family(args.pretrained_model_name_or_path, revision=args.revision,
                                   torch_dtype=None if run.weight_dtype == torch.float32 else run.weight_dtype)
    if not isinstance(family, SD15):   # the conditioning encoder and ControlNet residuals are SD-1.x/2.x UNet's
        raise TrainingError(f"{args.pretrained_model_name_or_path!r} is a {family.pipeline_classes[0]}; the "
                            f"semantic-map trainer trains Stable Diffusion 1.x/2.x pipelines ('tiny' offline)")
    if args.resolution % (pipe.vae_scale_factor * 2):
        raise TrainingError(f"--resolution {args.resolution} must be a multiple of {pipe.vae_scale_factor * 2} "
                            f"for this model")
    for module in [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]:
        module.requires_grad_(False)
        module.to(run.device)

    encoder = controlnet = None
    if args.controlnet_model_name_or_path:
        from diffusers import ControlNetModel

        try:
            controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path,
                                                         torch_dtype=run.weight_dtype)
        except (OSError, ValueError, EnvironmentError) as e:
            raise TrainingError(f"cannot load --controlnet_model_name_or_path {args.controlnet_model_name_or_path}: "
                                f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
        check_controlnet(controlnet, pipe, args.controlnet_model_name_or_path)
        controlnet.requires_grad_(False).to(run.device)
    else:
        with torch.random.fork_rng(devices=[]):   # its own seed: the same encoder with or without resume
            torch.manual_seed(mix_seed(run.seed, 1))
            encoder = conditioning_encoder(pipe.unet, pipe.vae_scale_factor).to(run.device)
    model = ConditionedUNet(pipe.unet, encoder, controlnet)
    task = SemanticMap(run, pipe, model, validation, args, held_out)
    info = {"validation_loss": task.base_validation(model)}   # the base model's, before the adapter exists

    dataset = sd.SemanticMapDataset(train_set, args.resolution, args.condition, run.seed,
                                    args.proportion_empty_prompts)
    max_train_steps = run.total_steps(len(dataset))
    run.adapt(pipe.unet, max_train_steps, task, target_modules=TARGET_MODULES)
    if encoder is not None:
        encoder.requires_grad_(True)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    enc_params = sum(p.numel() for p in encoder.parameters()) if encoder is not None else 0
    run.fit(model, task, dataset, sd.collate, num_train_steps=max_train_steps,
            info={"data": source, "train_pairs": len(train_set), "validation_maps": len(validation),
                  "condition": args.condition, "caption_source": caption_source,
                  "conditioning": "controlnet" if controlnet is not None else "encoder",
                  "conditioning_encoder_parameters": enc_params,
                  "conditioning_learning_rate": task.encoder_lr if encoder is not None else None, **info})


if __name__ == "__main__":
    sys.exit(main())
