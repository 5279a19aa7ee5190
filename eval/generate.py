"""Images from a trained run: its base pipeline with a checkpoint's adapter loaded, the protocol's
prompts x 4 fixed seeds. The pipeline comes from the trainers' loader (training.families), so the
built-in tiny preset loads as in training; diffusers itself is imported inside the functions that need it.

    pipe = load_pipeline(run, device)                           # the run's base model, once
    generate_images(pipe, RUN / "checkpoint-400", prompts, out_dir, ...)   # adapter in, images out
    generate_images(pipe, None, prompts, out_dir, ...)                     # the base model's images

    sampler = Sampler(run, device, gen)                         # the same, the pipeline loaded on first need
    sampler.ensure(adapter_dir, prompts, out_dir, 1, settings)  # made unless out_dir records `settings`
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lowrank
from ground.runfolder import PROMPTS, run_setting
from training import families
from training.common import TrainingError
from training.images.export import load_parts
from training.images.files import load_dataset_images
from training.subject.data import example_subject

from . import EvalError
from .images import load_folder


def load_pipeline(run: dict, device: torch.device, keep_safety_checker: bool = True):
    """The run's base pipeline (no adapter) as its family samples (training.families: DPM-Solver++ for SD and
    SDXL, as the trainer's samples use; the model's own flow-matching scheduler for the FLUX families), on
    `device`. The one place that turns run.json into a pipeline."""
    name = run_setting(run, "pretrained_model_name_or_path")
    revision = run_setting(run, "revision")
    try:   # training's loader also knows the built-in presets ("tiny" also as None, "tiny-sdxl", "tiny-flux")
        family = families.family_of(name)
        # SD 1.x/2.x pipelines carry a safety checker (SDXL has none): skipped unless asked for
        has_checker = "safety_checker" in inspect.signature(family.pipeline_class()).parameters
        extra = {"safety_checker": None, "requires_safety_checker": False} if has_checker and \
            not keep_safety_checker else {}
        pipe = family.sampling_pipeline(family.load(name, revision=revision, **extra))
    except Exception as e:   # training's ModelLoadError, diffusers' OSError/ValueError: one line
        raise EvalError(f"cannot load the run's base model {name!r}: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}") from None
    return pipe.to(device)


def sampling_kwargs(run: dict, pipe) -> dict:
    """What the run's own samples passed to the pipeline beyond prompt, size, steps and guidance (the family's
    call_kwargs under the run's settings: FLUX.1's --max_sequence_length), so images made later from its
    adapters see the conditioning it trained with."""
    settings = argparse.Namespace(**(run.get("args") or {}))
    try:
        return families.family_of_pipeline(pipe).for_run(settings).call_kwargs(pipe)
    except TrainingError as e:   # a run.json edited by hand, or written by another version
        raise EvalError(f"the run's settings do not fit its model: {e}") from None


def run_real_images(run: dict, resolution: int) -> list[tuple]:
    """The subject photos the run was trained on: its instance_data_dir, its --dataset_name (read as the trainer
    reads it), or the trainer's embedded example subject when it had neither."""
    directory = run_setting(run, "instance_data_dir")
    if directory:
        return load_folder(directory, "instance_data_dir (from run.json; --real_dir overrides it)").items
    dataset = run_setting(run, "dataset_name")
    if dataset:
        try:
            images, _ = load_dataset_images(dataset, resolution, run_setting(run, "image_column", "image"), None,
                                            run_setting(run, "dataset_config_name"), run_setting(run, "cache_dir"))
        except TrainingError as e:
            raise EvalError(f"{e} (from run.json; --real_dir overrides it)") from None
        return [(f"dataset-{i}.png", img) for i, img in enumerate(images)]
    return [(f"example-{i}.png", img) for i, img in enumerate(example_subject(resolution))]


@torch.no_grad()
def generate_images(pipe, adapter_dir: Path | None, prompts: list[str], out_dir: Path, *, images_per_prompt: int = 4,
                    seed: int = 0, batch_size: int = 8, num_inference_steps: int = 25,
                    guidance_scale: float = 7.5, resolution: int = 512, settings: dict | None = None,
                    call_kwargs: dict | None = None) -> int:
    """Load the adapter in `adapter_dir` into pipe.unet (replacing any loaded before; None: no adapter, the
    base model), and the text encoders' of a run trained with --train_text_encoder (adapter_dir/text_encoder/ ...),
    and write out_dir/{p00-s0.png, ..., prompts.jsonl, generation.json}: image j of every prompt
    uses seed seed + j, so checkpoints and methods start from the same noise. Written in a temp folder and
    renamed into place. Returns how many images the safety checker blacked out."""
    unet = families.denoiser_of(pipe)   # the UNet, or a DiT family's transformer
    for module in (unet, *families.text_encoders(pipe)):
        if lowrank.adapter_layers(module):
            lowrank.eject(module)   # a fresh injection per checkpoint: exact, and safe if ranks differ
    if adapter_dir is not None:
        try:
            load_parts(families.family_of_pipeline(pipe), pipe, adapter_dir)
        except lowrank.AdapterError as e:
            raise EvalError(f"cannot load the adapter in {adapter_dir}: {e}") from None
    unet.to(pipe.device).eval()

    jobs = [(i, prompt, seed + j) for i, prompt in enumerate(prompts) for j in range(images_per_prompt)]
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows, blacked = [], 0
    bar = tqdm(total=len(jobs), desc=f"Generating {out_dir.name}", unit="img")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        out = pipe(prompt=[p for _, p, _ in chunk], generator=[torch.Generator().manual_seed(s) for *_, s in chunk],
                   height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, **(call_kwargs or {}))
        blacked += sum(bool(x) for x in (getattr(out, "nsfw_content_detected", None) or []))
        for (i, prompt, s), img in zip(chunk, out.images):
            name = f"p{i:02d}-s{s}.png"
            img.save(tmp / name)
            rows.append({"image": name, "prompt": prompt, "seed": s})
        bar.update(len(chunk))
    bar.close()
    (tmp / PROMPTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the scheduler as used (the family chose it), beside the settings that decide whether images are reused
    record = {**(settings or {}), "scheduler": type(pipe.scheduler).__name__, "blacked_out": blacked}
    (tmp / "generation.json").write_text(json.dumps(record, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return blacked


def recorded(images_dir: Path, settings: dict) -> bool:
    """Whether images_dir/generation.json records `settings` (every key equal): its images can be reused."""
    try:
        done = json.loads((images_dir / "generation.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and all(done.get(k) == v for k, v in settings.items())


class Sampler:
    """A run's images under the settings of eval.subject's `gen` (seed, steps, guidance, resolution): its base
    pipeline (load_pipeline) and call settings (sampling_kwargs) loaded on first need, so a rescore whose images
    are all there loads no model."""

    def __init__(self, run: dict, device: torch.device, gen: dict, batch_size: int = 8,
                 keep_safety_checker: bool = True):
        self.run, self.device, self.gen = run, device, gen
        self.batch_size, self.keep_safety_checker = batch_size, keep_safety_checker
        self.pipe, self.call_kwargs = None, {}

    def make(self, adapter_dir: Path | None, prompts: list[str], out_dir: Path, images_per_prompt: int,
             settings: dict) -> int:
        """generate_images with the run's pipeline; returns how many images the safety checker blacked out."""
        if self.pipe is None:
            self.pipe = load_pipeline(self.run, self.device, keep_safety_checker=self.keep_safety_checker)
            self.call_kwargs = sampling_kwargs(self.run, self.pipe)
        gen = self.gen
        return generate_images(self.pipe, adapter_dir, prompts, out_dir, images_per_prompt=images_per_prompt,
                               seed=gen["seed"], batch_size=self.batch_size,
                               num_inference_steps=gen["num_inference_steps"], guidance_scale=gen["guidance_scale"],
                               resolution=gen["resolution"], settings=settings, call_kwargs=self.call_kwargs)

    def ensure(self, adapter_dir: Path | None, prompts: list[str], out_dir: Path, images_per_prompt: int,
               settings: dict, regenerate: bool = False) -> int | None:
        """make(...) unless out_dir already holds images of `settings` (recorded); None when they are reused."""
        if not regenerate and recorded(out_dir, settings):
            return None
        return self.make(adapter_dir, prompts, out_dir, images_per_prompt, settings)
