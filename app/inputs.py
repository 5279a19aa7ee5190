"""Checks on everything a user sends: subject images (count, size, type, pixel count), the training
form, and uploaded file names. Each check raises InputError with a message meant for the UI.

Uploaded images are decoded and re-encoded as PNG into the run folder under sanitised names: the
trainer never sees the uploaded bytes or names, and nothing is written outside the runs dir.
"""
from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

import lowrank
from training.images.files import to_rgb
from training.subject.args import parse_args as dreambooth_args
from training.subject.data import EXAMPLE_NAME

METHODS = tuple(lowrank.METHODS)      # registry order; lowrank.METHODS is the only list of methods
MIN_IMAGES, MAX_IMAGES = 3, 20
MAX_IMAGE_MB = 20.0
MAX_PIXELS = 40_000_000               # ~ 6300 x 6300; a bigger decode is refused (decompression bombs too)
FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
FORMATS_SHOWN = "PNG, JPEG, WebP, BMP, GIF or TIFF"   # every message and label names the same list
MAX_STEPS = 100_000
HEADLINE_METHOD = "delora"            # the README's first command: `training/dreambooth.py --method delora`
EXAMPLE_SUBJECT = EXAMPLE_NAME        # what the trainer uses when it is given no --instance_data_dir


def cli_defaults() -> dict:
    """The Train tab's defaults: what `training/dreambooth.py --method delora` resolves with no other flag (its
    rank, λ, run length and checkpoint interval), read from the trainer itself so the two cannot differ."""
    spec = dreambooth_args(["--method", HEADLINE_METHOD])
    cfg = spec.adapter
    return {"method": cfg.method, "rank": cfg.rank, "delora_lambda": cfg.delora_lambda,
            "steps": spec.max_train_steps, "checkpoint_every": spec.checkpointing_steps}


class InputError(ValueError):
    """A problem with what the user sent; str(e) is shown in the UI as is."""


def sanitize_filename(name: str, fallback: str = "image") -> str:
    """A safe file stem: the last path component only (either separator), ASCII letters, digits, '.',
    '-', '_'; no leading dots; at most 60 characters. '../../etc/passwd' -> 'passwd'."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    stem = os.path.splitext(base)[0] if "." in base.lstrip(".") else base
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    stem = re.sub(r"\.{2,}", ".", stem)[:60].strip("._-")
    return stem or fallback


def _path_of(f) -> str:
    """gradio gives str paths (NamedString) or objects with .name/.path; accept all."""
    if isinstance(f, (str, os.PathLike)):
        return str(f)
    for attr in ("path", "name"):
        if isinstance(getattr(f, attr, None), str):
            return getattr(f, attr)
    if isinstance(f, dict):
        return str(f.get("path") or f.get("name") or "")
    raise InputError(f"unexpected upload object {type(f).__name__}")


def _display_name(f, path: str) -> str:
    orig = getattr(f, "orig_name", None) or (f.get("orig_name") if isinstance(f, dict) else None)
    return str(orig or os.path.basename(path))


MAX_SAVED_SIDE = 1024                 # saved copies: shorter side at most this (the trainer resizes anyway)


@dataclass
class CheckedImage:
    name: str                         # sanitised stem, unique within the upload
    path: Path                        # the upload (decoded once to check it; re-encoded by save_images)


def check_images(files, max_mb: float = MAX_IMAGE_MB, min_count: int = MIN_IMAGES,
                 max_count: int = MAX_IMAGES) -> list[CheckedImage]:
    """Decode every upload; InputError naming the first problem (count, size, type, pixels)."""
    files = [f for f in (files or []) if f]
    if not files:
        raise InputError(f"Upload {min_count}–{max_count} images of the subject first.")
    if len(files) < min_count:
        raise InputError(f"{len(files)} image(s) uploaded: DreamBooth needs at least {min_count} of the subject.")
    if len(files) > max_count:
        raise InputError(f"{len(files)} images uploaded: at most {max_count} are accepted.")
    out, seen = [], set()
    for f in files:
        path = _path_of(f)
        shown = sanitize_filename(_display_name(f, path))
        try:
            size = os.path.getsize(path)
        except OSError:
            raise InputError(f"{shown}: the upload could not be read; upload it again.") from None
        if size > max_mb * 1024 * 1024:
            raise InputError(f"{shown}: {size / 2**20:.1f} MB is over the {max_mb:g} MB limit per image.")
        try:   # the size comes from the header: checked before anything is decoded
            with Image.open(path) as img:
                fmt = img.format
                w, h = img.size
                if fmt not in FORMATS:
                    raise InputError(f"{shown}: {fmt} images are not accepted (use {FORMATS_SHOWN}).")
                if w * h > MAX_PIXELS:
                    raise InputError(f"{shown}: {w}×{h} pixels is too large "
                                     f"(at most {MAX_PIXELS // 10**6} megapixels).")
                if min(w, h) < 8:
                    raise InputError(f"{shown}: {w}×{h} pixels is too small.")
                img.load()                          # a truncated or corrupt file fails here
        except InputError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            kind = "is not an image" if isinstance(e, UnidentifiedImageError) else \
                "is too large" if isinstance(e, Image.DecompressionBombError) else "could not be decoded"
            raise InputError(f"{shown} {kind} ({FORMATS_SHOWN} expected).") from None
        name, k = shown, 1
        while name.lower() in seen:
            k += 1
            name = f"{shown}_{k}"
        seen.add(name.lower())
        out.append(CheckedImage(name, Path(path)))
    return out


def preview_images(files, limit: int = MAX_IMAGES) -> list[str]:
    """The uploads that look like images (header only), for the preview gallery."""
    out = []
    for f in (files or [])[:limit]:
        try:
            path = _path_of(f)
            with Image.open(path) as img:
                if img.format in FORMATS and img.size[0] * img.size[1] <= MAX_PIXELS:
                    out.append(path)
        except (InputError, OSError, ValueError, Image.DecompressionBombError):
            continue
    return out


def save_images(images: list[CheckedImage], folder: Path) -> list[Path]:
    """Write NN_<name>.png into folder (created); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ci in enumerate(images):
        with Image.open(ci.path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)                       # the trainer's own conversion (alpha over white, 16-bit...)
        short = min(img.size)
        if short > MAX_SAVED_SIDE:
            scale = MAX_SAVED_SIDE / short
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        path = folder / f"{i:02d}_{ci.name}.png"
        img.save(path, format="PNG")
        paths.append(path)
    return paths


# ----- the training form ---------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"^[A-Za-z0-9]{2,20}$")
_NOUN_RE = re.compile(r"^[A-Za-z][A-Za-z -]{0,39}$")


@dataclass
class TrainForm:
    methods: list[str]
    class_noun: str
    token: str
    rank: int
    learning_rate: float | None          # None: the trainer's per-method default
    steps: int
    checkpoint_every: int
    delora_lambda: float
    model: str
    seed: int = 0
    resolution: int | None = None
    sample_steps: int | None = None
    num_samples: int | None = None
    prior_preservation: bool = False      # DreamBooth's class-prior loss (class images from the base model)
    num_class_images: int | None = None
    # the advanced section: the trainer's own flags, off (None / 0) unless set
    snr_gamma: float | None = None        # --snr_gamma: min-SNR-γ loss weighting
    noise_offset: float = 0.0             # --noise_offset
    ema_decay: float | None = None        # --ema_decay: a moving average of the adapter, saved as its own adapter
    cache_latents: bool = True            # --cache_latents where it is exact (DreamBooth: square images)
    extra: dict = field(default_factory=dict)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of {self.class_noun}"


def _int(value, what: str, lo: int, hi: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number.") from None
    if not math.isfinite(f) or f != int(f):
        raise InputError(f"{what} must be a whole number, got {value}.")
    if not lo <= f <= hi:
        raise InputError(f"{what} must be between {lo} and {hi}, got {int(f)}.")
    return int(f)


def _float(value, what: str, positive: bool = True) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(f) or (positive and f <= 0):
        raise InputError(f"{what} must be a positive number, got {value}.")
    return f


def _decay(value) -> float:
    decay = _float(value, "EMA decay")
    if not decay < 1:
        raise InputError(f"EMA decay must be between 0 and 1 (0.99 for a few hundred steps), got {value}.")
    return decay


def check_form(methods, class_noun, token, rank, learning_rate, steps, checkpoint_every, delora_lambda,
               model, seed=0, resolution=None, sample_steps=None, num_samples=None, prior_preservation=False,
               num_class_images=None, snr_gamma=None, noise_offset=None, ema_decay=None,
               cache_latents=True) -> TrainForm:
    methods = [m for m in (methods or []) if m]
    if not methods:
        raise InputError("Pick at least one method.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"Unknown method(s): {', '.join(map(str, unknown))}.")
    noun = " ".join(str(class_noun or "").split())
    if not _NOUN_RE.match(noun):
        raise InputError("Class noun: a word or two of letters describing the subject's class, e.g. 'cat'.")
    tok = str(token or "").strip()
    if not _TOKEN_RE.match(tok):
        raise InputError("Unique token: 2–20 letters or digits, a rare word such as 'sks'.")
    if tok.lower() in noun.lower().split():
        raise InputError("The unique token must differ from the class noun.")
    steps_i = _int(steps, "Steps", 1, MAX_STEPS)
    every = _int(checkpoint_every, "Checkpoint interval", 1, MAX_STEPS)
    lr_text = str(learning_rate).strip() if learning_rate is not None else ""
    lr = None if lr_text in ("", "default", "auto") else _float(lr_text, "Learning rate")
    return TrainForm(
        methods=list(dict.fromkeys(methods)), class_noun=noun, token=tok, rank=_int(rank, "Rank", 1, 1024),
        learning_rate=lr, steps=steps_i, checkpoint_every=every,
        delora_lambda=_float(delora_lambda, "λ (DeLoRA)", positive=False),
        model=str(model or "").strip() or "tiny",
        seed=_int(seed if seed not in (None, "") else 0, "Seed", 0, 2**31 - 1),
        resolution=None if resolution in (None, "", 0) else _int(resolution, "Resolution", 8, 2048),
        sample_steps=None if sample_steps in (None, "", 0) else _int(sample_steps, "Sample steps", 1, 200),
        num_samples=None if num_samples in (None, "", 0) else _int(num_samples, "Samples per checkpoint", 1, 16),
        prior_preservation=bool(prior_preservation),
        num_class_images=None if num_class_images in (None, "", 0) else _int(num_class_images, "Class images", 1,
                                                                               1000),
        snr_gamma=None if snr_gamma in (None, "", 0) else _float(snr_gamma, "Min-SNR γ"),
        noise_offset=0.0 if noise_offset in (None, "", 0) else _float(noise_offset, "Noise offset"),
        ema_decay=None if ema_decay in (None, "", 0) else _decay(ema_decay),
        cache_latents=cache_latents is not False)   # an API client that leaves it out gets the default (on)
