"""Uploaded image + label-map pairs for a semantic-map run (training/semantic_map.py), staged in the ADE20K
layout the trainer reads: RUN/seg_data/images/training/<stem>.png + annotations/training/<stem>.png.

Pairs match by file stem. Images are decoded and re-encoded as RGB PNG under sanitised names; a map is
a PNG re-written as it came (one channel of raw ADE20K ids, 0 = other, 1..150, or RGB painted with the ADE
palette), so its values are not touched. Then the trainer's own checks run on the staged folder
(training.segmap.data: pairing, label range, map size = image size), so the app refuses exactly what the
trainer would, before anything is queued; on any refusal the staged folder is removed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageOps

from training.common import TrainingError
from training.images.files import to_rgb
from training.segmap import data as segdata

from .inputs import InputError, _display_name, _path_of, check_images, sanitize_filename

MAX_PAIRS = 200


def _by_stem(files, what: str) -> dict[str, Path]:
    out = {}
    for f in files:
        path = _path_of(f)
        stem = sanitize_filename(_display_name(f, path))
        if stem.lower() in {s.lower() for s in out}:
            raise InputError(f"Two {what} are named {stem!r}: each image and its map must share one unique name.")
        out[stem] = Path(path)
    return out


def stage_pairs(image_files, map_files, folder: Path, max_mb: float) -> int:
    """Check the uploads and write them into `folder` (ADE20K layout, training split); the pair count.
    InputError names the first problem; nothing is left behind then."""
    image_files, map_files = [f for f in (image_files or []) if f], [f for f in (map_files or []) if f]
    if not image_files and not map_files:
        raise InputError("Upload images and their label maps (same file names), or use the embedded set.")
    n = max(len(image_files), len(map_files))
    checked = {ci.path: ci for ci in check_images(image_files + map_files, max_mb=max_mb, min_count=1,
                                                  max_count=2 * MAX_PAIRS)}
    images, maps = _by_stem(image_files, "images"), _by_stem(map_files, "label maps")
    for stem in sorted(images.keys() - maps.keys()):
        raise InputError(f"Image {stem!r} has no label map of the same name; upload its map or remove it.")
    for stem in sorted(maps.keys() - images.keys()):
        raise InputError(f"Label map {stem!r} has no image of the same name; upload its image or remove it.")
    if n > MAX_PAIRS:
        raise InputError(f"{n} pairs uploaded: at most {MAX_PAIRS} (use the trainer's --train_data_dir for more).")
    img_dir, ann_dir = folder / "images" / "training", folder / "annotations" / "training"
    try:
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for stem, path in images.items():
            with Image.open(checked[path].path) as img:
                img.load()
                to_rgb(ImageOps.exif_transpose(img)).save(img_dir / f"{stem}.png", format="PNG")
        for stem, path in maps.items():
            with Image.open(checked[path].path) as m:
                m.load()
                if m.format != "PNG":          # a JPEG map has lost its exact ids/colours already
                    raise InputError(f"Label map {stem!r} is {m.format}: maps must be PNG (lossless) with class "
                                     f"ids (0 = other, 1..150) or ADE palette colours.")
                m.save(ann_dir / f"{stem}.png", format="PNG")   # as it came: the trainer reads ids or colours
        segdata.check_pairs(segdata.ade_split(folder, "training"), "the upload")
    except TrainingError as e:          # the trainer's words, with our staging paths made into names
        shutil.rmtree(folder, ignore_errors=True)
        raise InputError(str(e).replace(str(img_dir) + "/", "image ").replace(str(ann_dir) + "/", "map ")) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return len(images)
