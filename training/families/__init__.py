"""Model families: for one architecture, every answer the image trainers, exports, eval and the app need.

    family, pipe = load_family(name_or_path)   # a preset ('tiny', 'tiny-sdxl'), a local folder or a hub name
    cond = family.encode(pipe, ["a photo of sks dog"])          # the text conditioning, batch first
    pred = family.denoise(unet, noisy, timesteps, cond)         # the model's prediction
    family.sampling_pipeline(pipe.components)                   # fixed-seed samples, class images

A family is one file (sd15.py, sdxl.py) with one `Family` subclass; FAMILIES lists them, and model_index.json's
`_class_name` (or a preset's name) picks one. The trainers and the diffusion step (training.images.diffusion)
never branch on the family.
"""
from __future__ import annotations

import torch

from training.common import TrainingError

from .base import Family, FamilyError, expand, moved_to, select, stack, text_encoders
from .flux import FLUX
from .flux2_klein import Flux2Klein
from .sd15 import SD15
from .sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SD15(), SDXL(), FLUX(), Flux2Klein())

__all__ = ["FAMILIES", "FLUX", "Family", "FamilyError", "Flux2Klein", "SD15", "SDXL", "default_resolution",
           "denoiser_of", "expand", "family_of", "family_of_pipeline", "load_family",
           "load_pipeline", "moved_to", "select", "stack", "text_encoders"]


def family_of(name_or_path: str | None) -> Family:
    """The family of a preset name, a local pipeline folder or a hub name (its model_index.json)."""
    for family in FAMILIES:
        if family.is_preset(name_or_path):
            return family
    class_name = Family.pipeline_class_of(name_or_path)
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    known = ", ".join(c for f in FAMILIES for c in f.pipeline_classes)
    raise FamilyError(f"{name_or_path!r} is a {class_name} (model_index.json); lowrank trains {known}")


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, by its class."""
    name = type(pipe).__name__
    for family in FAMILIES:
        if name in family.pipeline_classes:
            return family
    raise FamilyError(f"a {name} is not a pipeline of a family lowrank trains")


def denoiser_of(pipe) -> torch.nn.Module:
    """The model adapters go into, of any family's pipeline (app and eval load adapters through this)."""
    return family_of_pipeline(pipe).denoiser(pipe)


def default_resolution(name_or_path: str | None) -> int:
    """A trainer's --resolution when none is given: 64 for the presets, else the family's (SD 512, SDXL 1024);
    512 when the family cannot be read yet (loading the model then says why in one line)."""
    if any(f.is_preset(name_or_path) for f in FAMILIES):
        return 64
    try:
        return family_of(name_or_path).default_resolution
    except TrainingError:
        return SD15.default_resolution


def load_family(name_or_path: str | None, revision: str | None = None, torch_dtype=None, **kwargs):
    """(family, pipeline) of a preset, a local folder or a hub name; ModelLoadError / FamilyError in one line."""
    family = family_of(name_or_path)
    return family, family.load(name_or_path, revision=revision, torch_dtype=torch_dtype, **kwargs)


def load_pipeline(name_or_path: str | None = None, revision: str | None = None, torch_dtype=None, **kwargs):
    """The pipeline of any family (eval, exports and the app load a run's base model through this)."""
    return load_family(name_or_path, revision, torch_dtype, **kwargs)[1]
