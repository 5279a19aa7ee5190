"""--cache_latents: the VAE encoding of each distinct training image computed once instead of at every step, with
the same adapter bits as a run without it.

What is cached is the VAE encoder's output per image, the parameters of its latent distribution (mean and log
variance, diffusers' DiagonalGaussianDistribution), in the memory layout the encoder gives a batch of that shape (on
CPU a batch of two or more comes out channels-last, and the layout follows the latents into the denoiser's kernels),
not a latent sample: the sample's noise is still drawn from the step's generator, in the same order and shape, and
the family's own latent path (SD's scaling, FLUX.1's shift and scale, FLUX.2-klein's mode, patchify and batch-norm
statistics) runs unchanged on the rebuilt distribution. So a step that finds every image of its batch cached
computes the very tensors the VAE would have handed it.

The key of an entry is the image's pixels (a 128-bit BLAKE2 digest of the bytes the VAE would read) and the shape of
the batch it is encoded in (its size; with aspect-ratio buckets also its height and width). The pixels: a crop, a
flip or a resize is a different entry by construction, and no bookkeeping of which image or window a batch row holds
can go stale. The batch size: a convolution's kernels may differ with the batch's size (on CPU, an image encoded
alone differs from its row of a two-image batch by ~1e-6), while a row of a batch of a given shape is the same
whatever the other rows hold and wherever it sits (checked on CPU for the tiny and the SD-1.5-sized VAE;
tests/test_cache_latents.py checks the adapter bits end to end). A run has few batch shapes (the full batch and an
epoch's last, shorter, one; instance + class images with prior preservation; the held-out batch of
--validation_loss_images; with --enable_bucket, those of each bucket), so an image is encoded at most once per batch
shape it appears in.

The cache fills as batches come: a batch with an image not yet cached is encoded whole, as a run without the cache
does, and its rows are kept; so the first epoch costs what it costs today and later steps skip the encoder. Entries
live on the VAE's device (SD-1.5 at 512 px: 128 KiB per image).

Exact caching needs each image to have few distinct crops: with random crops (no --center_crop) an image larger
than the resolution in one direction has a window per pixel of slack, a new entry at almost every step; such a run
is refused (`check_crop_windows`), pointing to --center_crop. Square images (the embedded example, generated class
images) have one window.
"""
from __future__ import annotations

import hashlib

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from training.common import TrainingError

# the most crop windows an image may have with --cache_latents and random crops (a window is an entry)
MAX_CROP_WINDOWS = 4


def digest(row: torch.Tensor) -> bytes:
    """A 128-bit digest of a tensor's bytes (its dtype's, on the CPU)."""
    data = row.detach().contiguous().cpu().flatten().view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).digest()


class CachedVAE:
    """A VAE whose `encode(pixels)` serves cached rows when every image of the batch has one (see the module
    docstring); every other attribute is the VAE's own. `encodes` counts the VAE calls, `encoded_images` their rows."""

    def __init__(self, vae):
        self.vae = vae
        self.rows: dict[tuple[tuple[int, ...], bytes], torch.Tensor] = {}   # (batch shape, pixel digest) -> row
        self.strides: dict[tuple[int, ...], tuple[int, ...]] = {}   # per batch shape, the encoder output's layout
        self.encodes = self.encoded_images = 0

    def __getattr__(self, name: str):
        return getattr(self.vae, name)

    def encode(self, pixels: torch.Tensor) -> AutoencoderKLOutput:
        keys = [(tuple(pixels.shape), digest(row)) for row in pixels]
        if all(k in self.rows for k in keys):
            first = self.rows[keys[0]]
            params = torch.empty_strided((len(keys), *first.shape), self.strides[keys[0][0]], dtype=first.dtype,
                                         device=first.device)
            for j, key in enumerate(keys):
                params[j] = self.rows[key]
            return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(params))
        out = self.vae.encode(pixels)   # the whole batch, exactly as without the cache
        self.encodes, self.encoded_images = self.encodes + 1, self.encoded_images + len(pixels)
        params = out.latent_dist.parameters
        self.strides[keys[0][0]] = params.stride()
        for key, row in zip(keys, params):
            self.rows.setdefault(key, row.clone())
        return out


class WithCachedVAE:
    """A pipeline seen with its VAE behind a CachedVAE: what a family's `objective(pipe, ...)` reads (pipe.vae,
    pipe.scheduler), so the family's latent path runs unchanged on cached encodings."""

    def __init__(self, pipe):
        self.pipe, self.vae = pipe, CachedVAE(pipe.vae)

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)


def crop_windows(img, size: int) -> int:
    """The distinct size x size crops a random crop can take of `img` (a PIL image)."""
    w, h = img.size
    return max(w - size + 1, 1) * max(h - size + 1, 1)


def check_crop_windows(images: list, args, what: str) -> None:
    """With --cache_latents and random crops: every image of `images` has at most MAX_CROP_WINDOWS windows."""
    if not args.cache_latents or args.center_crop:   # no cache, or one crop per image
        return
    size = args.resolution
    for i, img in enumerate(images):
        n = crop_windows(img, size)
        if n > MAX_CROP_WINDOWS:
            raise TrainingError(
                f"--cache_latents: {what} {i} is {img.size[0]}x{img.size[1]} at --resolution {size}, {n} random crop "
                f"windows (a new cache entry at almost every step); add --center_crop (one crop per image), or use "
                f"square images")
