"""Image files in, RGB images out, shared by the image tasks (and eval, and the app): decoding with EXIF
rotation, transparency over white and 16-bit rescaling; folder loading with validation; --dataset_name
images and captions.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from training.common import TrainingError, hfdata

logger = logging.getLogger("lowrank.training")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit grayscale rescaled, transparency over white, CMYK/P/L converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        if img.mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255:                    # 16-bit data: 65535 -> 255
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def open_image(path: Path) -> Image.Image:
    """Decode fully (so truncated files fail here, not mid-training), honour EXIF rotation, make RGB."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def resize_short(img: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    """Shorter side -> size (bilinear by default, as diffusers' transforms.Resize; NEAREST for label maps)."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, resample)


def check_image_folder(directory: str | Path, flag: str = "--instance_data_dir") -> Path:
    """The folder a flag names, which must exist and be a folder (checked before any other flag's problem)."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise TrainingError(f"{flag} {d} does not exist")
    if not d.is_dir():
        raise TrainingError(f"{flag} {d} is not a directory")
    return d


def load_image_dir(directory: str | Path, resolution: int, flag: str = "--instance_data_dir",
                   allow_empty: bool = False) -> list[Image.Image]:
    """Every readable image in `directory` (sorted by name), RGB, shorter side = resolution.
    Unreadable files are skipped with a warning naming them; nothing readable is an error."""
    d = check_image_folder(directory, flag)
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    images, skipped, small = [], [], []
    for path in files:
        try:
            img = open_image(path)
        except UnidentifiedImageError:
            skipped.append(f"{path.name} (not an image)")
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append(f"{path.name} (unreadable: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
            continue
        if min(img.size) < resolution:
            small.append(f"{path.name} ({img.size[0]}x{img.size[1]})")
        images.append(resize_short(img, resolution))
    if skipped:
        logger.warning("%s: skipping %d file(s): %s", flag, len(skipped), ", ".join(skipped))
    if small:
        logger.warning("%s: upscaling %d image(s) smaller than --resolution %d: %s", flag, len(small),
                       resolution, ", ".join(small))
    if not images and not allow_empty:
        if not files:
            raise TrainingError(f"{flag} {d} is empty; put 3-5 photos of the subject in it")
        raise TrainingError(f"{flag} {d} has no readable images (skipped {', '.join(skipped)})")
    return images


def load_dataset_images(name: str, resolution: int, image_column: str = "image", caption_column: str | None = None,
                        config: str | None = None, cache_dir: str | None = None) -> tuple[list, list[str] | None]:
    """--dataset_name: (RGB images with shorter side = resolution, per-image captions or None) from the 'train'
    split of a hub dataset or a local `datasets` source (save_to_disk folder, parquet files, imagefolder with
    metadata.jsonl; training/common/hfdata.py). Image cells may be Image features or paths relative to the
    dataset's folder."""
    what = f"--dataset_name {name}"
    table = hfdata.pick_split(hfdata.load_splits(name, "--dataset_name", config, cache_dir), "train", what)
    hfdata.require_columns(table, {image_column: "--image_column",
                                   **({caption_column: "--caption_column"} if caption_column else {})}, what)
    local = Path(name).expanduser()
    base = local if local.is_dir() else local.parent if local.is_file() else None
    images = [resize_short(to_rgb(ImageOps.exif_transpose(hfdata.open_cell(v, base, f"{what} row {i}"))), resolution)
              for i, v in enumerate(table[image_column])]
    captions = None
    if caption_column:
        captions = ["" if c is None else str(c) for c in table[caption_column]]
    return images, captions
