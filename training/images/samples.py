"""Images from the pipeline: fixed-seed validation samples (+ prompts.jsonl and a grid) and the class
images of prior preservation.

Samples use one torch.Generator per image, seeded 0..N-1, so the same prompt and seed give the same
starting noise at every checkpoint and for every method: differences come from the adapter alone.
Explicit generators also keep sampling from touching the global RNG of the training run.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ground import runfolder
from training.families import denoiser_of

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@torch.no_grad()
def generate(pipe, prompts: list[str], num_images: int, resolution: int, steps: int, guidance_scale: float,
             autocast=None, call_kwargs: dict | None = None) -> list[tuple[str, int, Image.Image]]:
    """[(prompt, seed, image)] for every prompt x seeds 0..num_images-1; `call_kwargs` go to the pipeline's call
    (a family's, e.g. FLUX's max_sequence_length: Family.call_kwargs)."""
    model = denoiser_of(pipe)
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            gens = [torch.Generator().manual_seed(s) for s in range(num_images)]
            with autocast() if autocast else contextlib.nullcontext():
                images = pipe(prompt=[prompt] * num_images, generator=gens, height=resolution, width=resolution,
                              num_inference_steps=steps, guidance_scale=guidance_scale, **(call_kwargs or {})).images
            out += [(prompt, s, img) for s, img in enumerate(images)]
    finally:
        model.train(was_training)
    return out


def grid(images: list[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = -(-len(images) // cols)
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        canvas.paste(img, ((i % cols) * w, (i // cols) * h))
    return canvas


def write_samples(directory: Path, samples: list[tuple[str, int, Image.Image]]) -> Path:
    """directory/{p00-s0.png, ..., prompts.jsonl} written in a temp folder and renamed into place."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prompts = list(dict.fromkeys(p for p, _, _ in samples))
    lines = []
    for prompt, seed, img in samples:
        name = f"p{prompts.index(prompt):02d}-s{seed}.png"
        img.save(tmp / name)
        lines.append(json.dumps({"image": name, "prompt": prompt, "seed": seed}))
    (tmp / runfolder.PROMPTS).write_text("\n".join(lines) + "\n")
    return runfolder.replace_dir(tmp, directory)


def write_grid(path: Path, samples: list[tuple[str, int, Image.Image]], cols: int) -> None:
    runfolder.atomic_write(path, grid([img for _, _, img in samples], cols).save)


def count_images(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(1 for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


@torch.no_grad()
def generate_class_images(pipe, directory: Path, prompt: str, num: int, resolution: int, steps: int,
                          guidance_scale: float, batch_size: int, process_index: int = 0, num_processes: int = 1,
                          show_progress: bool = True, call_kwargs: dict | None = None) -> int:
    """Fill `directory` up to `num` images of `prompt` with the base pipeline (DreamBooth's prior
    preservation). Generated image j is class-{j:05d}.png with seed j; processes split the work
    (j % num_processes == process_index). The plan depends only on the user's own images, never on what another process
    has written so far, so processes agree. Files are written under a temp name and renamed.
    Returns how many this process generated."""
    directory.mkdir(parents=True, exist_ok=True)
    own = count_images(directory) - sum(1 for _ in directory.glob("class-[0-9][0-9][0-9][0-9][0-9].png"))
    todo = [j for j in range(max(0, num - own))
            if j % num_processes == process_index and not (directory / f"class-{j:05d}.png").exists()]
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(todo), desc="Generating class images", disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = pipe(prompt=[prompt] * len(chunk), generator=[torch.Generator().manual_seed(j) for j in chunk],
                      height=resolution, width=resolution, num_inference_steps=steps,
                      guidance_scale=guidance_scale, **(call_kwargs or {})).images
        for j, img in zip(chunk, images):
            runfolder.atomic_write(directory / f"class-{j:05d}.png", img.save)
        bar.update(len(chunk))
    bar.close()
    return len(todo)
