"""Image folders in: the real subject photos, the generated images named by prompts.jsonl, and
label maps. Images decode as the trainers decode them (training.images.files.open_image). Unreadable
files are skipped, named in one warning and counted; a folder with nothing usable is an error."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ground.runfolder import PROMPTS, read_jsonl
from training.common import TrainingError
from training.images.files import (
    check_image_folder,
    open_image,  # the trainers' decoding: EXIF rotation, alpha over white, 16-bit
)

from . import EvalError
from .common import logger

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class Loaded:
    """Images that decoded (name, image[, prompt]) and the files that did not ("name (why)")."""
    items: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def try_open(path: Path, loaded: Loaded, opener=open_image):
    """opener(path), or None with the reason recorded in loaded.skipped."""
    try:
        return opener(path)
    except UnidentifiedImageError:
        loaded.skipped.append(f"{path.name} (not an image)")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:80]
        loaded.skipped.append(f"{path.name} (unreadable: {why})")
    return None


def warn_skipped(loaded: Loaded, where: Path) -> None:
    if loaded.skipped:
        logger.warning("skipped %d file(s) in %s: %s", len(loaded.skipped), where, ", ".join(loaded.skipped))


def check_dir(directory: str | Path, flag: str) -> Path:
    """The folder a flag names (training.images.files's check), with eval's error type."""
    try:
        return check_image_folder(directory, flag)
    except TrainingError as e:
        raise EvalError(str(e)) from None


def image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(directory: str | Path, flag: str = "--real_dir") -> Loaded:
    """Every readable image of a folder (sorted by name) as (name, RGB image)."""
    d = check_dir(directory, flag)
    files = image_files(d)
    if not files:
        raise EvalError(f"{flag} {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    loaded = Loaded()
    loaded.skipped += [f"{p.name} (not an image file)" for p in sorted(d.iterdir())   # named, not silently passed over
                       if p.is_file() and not p.name.startswith(".") and p not in files]
    for path in files:
        img = try_open(path, loaded)
        if img is not None:
            loaded.items.append((path.name, img))
    warn_skipped(loaded, d)
    if not loaded.items:
        raise EvalError(f"{flag} {d} has no readable images (skipped {', '.join(loaded.skipped)})")
    return loaded


def read_prompts(directory: Path, flag: str = "--generated_dir") -> list[dict]:
    """prompts.jsonl rows {"image": file, "prompt": text, ...}; every named file must exist."""
    path = directory / PROMPTS
    if not path.is_file():
        raise EvalError(f"{flag} {directory} has no {PROMPTS}; write one line "
                        f'{{"image": "<file>", "prompt": "<text>"}} per generated image')
    rows = read_jsonl(path, valid=lambda r: isinstance(r.get("image"), str) and isinstance(r.get("prompt"), str),
                      expected='{"image": <file>, "prompt": <text>}')
    if not rows:
        raise EvalError(f"{path} is empty: nothing to score")
    missing = [r["image"] for r in rows if not (directory / r["image"]).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EvalError(f"{path} names {len(missing)} missing file(s): {', '.join(missing[:3])}{more}")
    return rows


def load_generated(directory: str | Path, flag: str = "--generated_dir") -> Loaded:
    """The images prompts.jsonl names, in its order, as (name, RGB image, prompt)."""
    d = check_dir(directory, flag)
    loaded = Loaded()
    for row in read_prompts(d, flag):
        img = try_open(d / row["image"], loaded)
        if img is not None:
            loaded.items.append((row["image"], img, row["prompt"]))
    warn_skipped(loaded, d)
    if not loaded.items:
        raise EvalError(f"{flag} {d}: none of the images in {PROMPTS} is readable "
                        f"(skipped {', '.join(loaded.skipped)})")
    return loaded


def open_label(path: Path) -> np.ndarray:
    """A label map as class indices (H, W). Palette PNGs give their indices; colour-coded RGB maps
    are refused, because their colours are not class ids."""
    with Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(f"mode {img.mode}: a label map must be one channel of class indices")
        return np.asarray(img).astype(np.int64)


def image_key(img: Image.Image) -> str:
    """Content hash: the same picture gets the same cached embedding whatever file it came from."""
    h = hashlib.sha1(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


# ----- a run's samples folder (samples/prompts.jsonl), for the report's grid --------------------------------
def first_sample(samples_dir: Path, want: tuple | None):
    """(image, (prompt, seed)) of the row matching `want`, else the first row of prompts.jsonl."""
    rows = read_jsonl(samples_dir / PROMPTS, strict=False)
    row = next((r for r in rows if want and (r.get("prompt"), r.get("seed")) == want), rows[0] if rows else None)
    if row is None or not isinstance(row.get("image"), str):
        return None, None
    try:
        return open_image(samples_dir / row["image"]), (row.get("prompt"), row.get("seed"))
    except (OSError, ValueError, SyntaxError):
        logger.warning("skipped unreadable sample %s", samples_dir / row["image"])
        return None, None


def sample_map(samples_dir: Path, want: tuple | None):
    """The control map of the sample row matching `want` (semantic-map runs write "map"), else None."""
    rows = read_jsonl(samples_dir / PROMPTS, strict=False)
    row = next((r for r in rows if want and (r.get("prompt"), r.get("seed")) == want), None)
    if row is None or not isinstance(row.get("map"), str):
        return None
    try:
        return open_image(samples_dir / row["map"])
    except (OSError, ValueError, SyntaxError):
        return None
