"""Aspect-ratio buckets (--enable_bucket, kohya's flag names): images of any shape train without their sides cropped
away. The buckets are the (width, height) pairs of multiples of --bucket_reso_steps between --min_bucket_reso and
--max_bucket_reso whose area is at most --resolution² (kohya's make_bucket_resolutions: for each width the tallest
height that fits, and its transpose, plus the square); each image goes to the bucket whose aspect ratio is nearest
its own (in log ratio, so a portrait and its landscape transpose are equally near their buckets), is resized to
cover it and cropped by the few pixels left over (centred with --center_crop, else at a position drawn from the run
seed as the square crops are). Batches hold one bucket's images (training.common.batches.group_batches).
"""
from __future__ import annotations

import math

from PIL import Image


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """Every bucket (width, height), sorted: multiples of `step` in [min_side, max_side], area <= resolution²."""
    area, low = resolution * resolution, math.ceil(min_side / step) * step
    sizes = {(resolution // step * step,) * 2}
    for width in range(low, max_side + 1, step):
        height = min(max_side // step * step, area // width // step * step)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of an image of `size` (width, height): the nearest aspect ratio, then the larger area."""
    w, h = size
    return min(buckets, key=lambda b: (abs(math.log(b[0] * h / (b[1] * w))), -b[0] * b[1], b))


def cover(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """`img` resized (bilinear) to the smallest size that covers `bucket` (width, height) with its aspect kept."""
    w, h = img.size
    scale = max(bucket[0] / w, bucket[1] / h)
    new = (max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.BILINEAR)


def bucket_counts(buckets: list[tuple[int, int]]) -> dict[str, int]:
    """{"WxH": number of images} of the buckets in use (run.json, the model card, the log)."""
    counts: dict[str, int] = {}
    for w, h in sorted(buckets):
        counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
    return counts


def assign_buckets(images: list[Image.Image], args) -> list[tuple[int, int]] | None:
    """Each image's bucket under the run's --enable_bucket flags (checked in training/subject/args.py); None off."""
    if not args.enable_bucket:
        return None
    sizes = bucket_sizes(args.resolution, args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso)
    return [nearest_bucket(img.size, sizes) for img in images]
