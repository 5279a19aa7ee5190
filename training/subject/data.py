"""The DreamBooth subject: the embedded example subject (a real cat photo, cropped), the dataset of
instance (+ class) images and its collate.

Each sample's crop is a function of (seed, its position in the whole run) and the batch order a function
of (seed, epoch) (training.common.batches.epoch_batches), so a resumed run sees exactly the batches the
uninterrupted run saw, with no RNG state to carry over.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from skimage import data as skimage_data

from training.common.batches import mix_seed
from training.images.buckets import cover
from training.images.files import resize_short

EXAMPLE_PROMPT = "a photo of sks cat"
EXAMPLE_CLASS_PROMPT = "a photo of cat"
EXAMPLE_NAME = "embedded example subject (scikit-image chelsea, 5 crops/flips)"


def example_subject(resolution: int) -> list[Image.Image]:
    """Five real photos of one cat: crops and a flip of scikit-image's `chelsea` (300x451)."""
    cat = Image.fromarray(skimage_data.chelsea())
    boxes = [(75, 0, 375, 300), (0, 0, 300, 300), (151, 0, 451, 300), (90, 30, 330, 270), (40, 10, 320, 290)]
    crops = [cat.crop(b) for b in boxes]
    crops[2] = ImageOps.mirror(crops[2])
    crops[4] = ImageOps.mirror(crops[4])
    return [resize_short(c, resolution) for c in crops]


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0     # [-1, 1], as diffusers' Normalize([0.5], [0.5])
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Index k is a position in the whole run (epoch * len + i): sample i, cropped by a generator seeded
    from (seed, k). With class images, each item also carries a class image (prior preservation); each item
    names its instance image (`index`), whose caption the loss uses when the data has captions. With
    `caption_dropout` p, each item also says whether its instance image trains with the empty prompt (`drop`):
    a draw from the same generator after the crops, so the crops are those of a run without it.

    With `buckets` (--enable_bucket: training/images/buckets.py), instance image i trains at size buckets[i]
    (width, height) instead of the square: resized to cover it, then cropped; the class image of an item takes its
    instance image's bucket (a batch is one tensor), and `groups` (each item's bucket) keeps batches to one bucket."""

    def __init__(self, instance_images, class_images, size: int, center_crop: bool, seed: int,
                 caption_dropout: float = 0.0, buckets: list[tuple[int, int]] | None = None):
        self.instance, self.cls = list(instance_images), list(class_images or [])
        self.size, self.center_crop, self.seed = size, center_crop, seed
        self.caption_dropout = caption_dropout
        self.buckets = buckets
        self.covers: dict[tuple[int, tuple[int, int]], Image.Image] = {}   # (id of an image, bucket) -> resized

    def __len__(self) -> int:
        return max(len(self.instance), len(self.cls))

    @property
    def groups(self) -> list[tuple[int, int]] | None:
        """Each item's bucket, or None without buckets (training.common.batches.epoch_batches)."""
        return [self.buckets[i % len(self.instance)] for i in range(len(self))] if self.buckets else None

    def crop(self, img: Image.Image, gen: torch.Generator,
             bucket: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The crop as a tensor, and (height, width, top, left): the image's size when cropped and where the crop
        was taken (SDXL's micro-conditioning; images are resized to the resolution before, as diffusers does, or
        to cover their bucket)."""
        width, height = bucket or (self.size, self.size)
        if bucket:   # resized once per image and bucket
            key = (id(img), bucket)
            if key not in self.covers:
                self.covers[key] = cover(img, bucket)
            img = self.covers[key]
        w, h = img.size
        if self.center_crop:
            left, top = (w - width) // 2, (h - height) // 2
        else:
            left = int(torch.randint(0, w - width + 1, (1,), generator=gen))
            top = int(torch.randint(0, h - height + 1, (1,), generator=gen))
        return to_tensor(img.crop((left, top, left + width, top + height))), (h, w, top, left)

    def __getitem__(self, k: int) -> dict:
        i = k % len(self)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, k))
        item = {"index": i % len(self.instance)}
        bucket = self.buckets[item["index"]] if self.buckets else None
        item["instance"], item["instance_crop"] = self.crop(self.instance[item["index"]], gen, bucket)
        if self.cls:
            item["class"], item["class_crop"] = self.crop(self.cls[i % len(self.cls)], gen, bucket)
        if self.caption_dropout:   # off: no draw
            item["drop"] = bool(torch.rand((), generator=gen).item() < self.caption_dropout)
        return item


def collate(items: list[dict]) -> dict:
    """Instance images first, then class images (the loss splits the batch in two halves), the instance images'
    indices (their captions, when the data has them), each image's crop (height, width, top, left) and, with
    caption dropout, which instance images train with the empty prompt."""
    pixels = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    crops = [it["instance_crop"] for it in items] + [it["class_crop"] for it in items if "class" in it]
    batch = {"pixels": torch.stack(pixels), "index": torch.tensor([it["index"] for it in items]),
             "crops": torch.tensor(crops)}
    if "drop" in items[0]:
        batch["drop"] = torch.tensor([it["drop"] for it in items])
    return batch
