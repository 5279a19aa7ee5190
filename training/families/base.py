"""What every model family shares: loading through diffusers' own from_pretrained (presets built once into the
cache, then loaded the same way), model_index.json's pipeline class, and the text conditioning as a dict of
batch-first tensors (what the trainers expand, index and concatenate without knowing the family).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch

from training.common import TrainingError
from training.common.models import ModelLoadError, built_once, cache_dir
from training.images.diffusion import DiffusionObjective

Conditioning = dict[str, torch.Tensor]   # e.g. {"encoder_hidden_states": (B, 77, d)}, SDXL + text_embeds


class FamilyError(TrainingError, ValueError):
    """A model of a family lowrank does not train (one line: which it is, which are trained)."""


class Family:
    """One architecture. Subclasses set the class attributes and implement build_preset, encode, denoise."""

    name = ""                                  # run.json's "family"
    pipeline_classes: tuple[str, ...] = ()     # model_index.json's _class_name values of this family
    preset = ""                                # the built-in tiny model's name (random weights)
    preset_version = "v1"                      # bump when build_preset changes, so stale caches are not reused
    tags: tuple[str, ...] = ()                 # the model card's
    default_targets = ("to_q", "to_k", "to_v", "to_out.0")   # --target_modules when none are given
    fig3_pattern = "attn1.to_out.0"            # DeLoRA Fig. 3's layer: out-projection of the first self-attention
    default_resolution = 512
    vae_in_fp32 = False                        # keep the VAE in fp32 under mixed precision (SDXL's NaNs in fp16)
    denoiser_name = "unet"                     # the pipeline part the adapters go into (DiT families: "transformer")
    flow_matching = False                      # trains by rectified flow (no DDPM timesteps: no SNR, no offset noise)
    text_encoder_parts: tuple[str, ...] = ()   # the pipeline parts --train_text_encoder adapts (none: refused)

    # ----- loading -------------------------------------------------------------------------------------
    def is_preset(self, name_or_path: str | None) -> bool:
        return str(name_or_path or "").strip() == self.preset

    def build_preset(self, directory: Path) -> None:
        raise NotImplementedError

    def preset_path(self) -> Path:
        """The preset's folder in the cache, built on first use (training.common.models.built_once)."""
        return built_once(cache_dir() / f"{self.preset}-{self.preset_version}", self.build_preset)

    def local_folder(self, name_or_path: str | None) -> str | None:
        """The folder a pipeline was loaded from (run.json's pretrained_model_path): the preset's, a local one,
        or a hub name's snapshot in the cache (None when it is not cached)."""
        if self.is_preset(name_or_path):
            return str(self.preset_path())
        path = Path(os.path.expanduser(str(name_or_path)))
        if path.is_dir():
            return str(path.resolve())
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(name_or_path), "model_index.json")
        except Exception:   # an invalid repo id raises validation errors of several types
            return None
        return str(Path(cached).parent) if isinstance(cached, str) else None

    def check_folder(self, folder: Path) -> None:
        """Every part model_index.json lists has its subfolder (a missing text_encoder_2/ says so in one line)."""
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        missing = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]
                   and not (folder / k).is_dir()]
        if missing:
            parts, which = ", ".join(m + "/" for m in missing), "it" if len(missing) == 1 else "them"
            raise ModelLoadError(f"{str(folder)!r} lacks {parts} (model_index.json lists {which}); copy the whole "
                                 f"{self.pipeline_classes[0]} folder")

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    @staticmethod
    def pipeline_class_of(name_or_path: str | None) -> str:
        """model_index.json's _class_name of a local folder or a hub name (cached, or fetched when online)."""
        path = os.path.expanduser(str(name_or_path))
        if os.path.isdir(path):
            index = Path(path) / "model_index.json"
            if not index.is_file():
                raise ModelLoadError(f"{path!r} is not a diffusers pipeline folder (no model_index.json); give a "
                                     f"folder saved by save_pretrained, a hub name or a preset")
            try:
                return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name"))
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot read {index}: {e}") from None
        from diffusers import DiffusionPipeline

        try:
            return str(DiffusionPipeline.load_config(path).get("_class_name"))
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelLoadError(unreachable(name_or_path, e)) from None

    def load(self, name_or_path: str | None, revision: str | None = None, torch_dtype=None, **kwargs):
        """The family's pipeline from its preset, a local folder or a hub name, through from_pretrained."""
        if self.is_preset(name_or_path):
            path, revision = str(self.preset_path()), None
        else:
            path = os.path.expanduser(str(name_or_path))
            if os.path.isdir(path):
                self.check_folder(Path(path))
        if torch_dtype is not None:   # newer diffusers renamed torch_dtype to dtype (and warn on the old name)
            from diffusers.pipelines import pipeline_utils

            kwargs["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = torch_dtype
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()   # its "couldn't connect / trying the cache" lines: our error says it
        try:
            return self.pipeline_class().from_pretrained(path, revision=revision, **kwargs)
        except (OSError, ValueError, EnvironmentError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            if os.path.isdir(path):
                raise ModelLoadError(f"cannot load the {self.pipeline_classes[0]} in {path!r} ({first}); expected a "
                                     f"folder saved by save_pretrained (with model_index.json)") from None
            raise ModelLoadError(unreachable(name_or_path, e)) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)

    # ----- training ----------------------------------------------------------------------------------------
    def for_run(self, args) -> Family:
        """This family with a run's own settings (FLUX: --max_sequence_length), checked: what the trainer encodes
        prompts and samples with. A copy; the registered family keeps its defaults. A flow-matching family refuses
        the DDPM-only flags (--snr_gamma, --noise_offset), each in one line."""
        if self.flow_matching and getattr(args, "snr_gamma", None) is not None:
            raise TrainingError(f"--snr_gamma weights DDPM timesteps by their SNR (SD, SDXL); the {self.name} family "
                                f"trains by flow matching: weight its timesteps with --weighting_scheme "
                                f"(logit_normal, mode, sigma_sqrt, cosmap) instead")
        if self.flow_matching and getattr(args, "noise_offset", 0.0):
            raise TrainingError(f"--noise_offset shifts DDPM noise (SD, SDXL); the {self.name} family trains by flow "
                                f"matching, where diffusers' scripts have no offset noise: leave it at 0")
        if getattr(args, "train_text_encoder", False) and not self.text_encoder_parts:
            raise TrainingError(f"--train_text_encoder is not supported for the {self.name} family: it trains the "
                                f"CLIP text encoders of SD-1.5 and SDXL; leave it off to train the "
                                f"{self.denoiser_name} alone")
        return copy.copy(self)

    def call_kwargs(self, pipe) -> dict:
        """What the sampling pipeline's __call__ needs beyond prompt, size, steps and guidance, so samples see the
        conditioning training saw (FLUX: the T5 sequence length)."""
        return {}

    def denoiser(self, pipe) -> torch.nn.Module:
        """The model the adapters train: the UNet, or a DiT family's transformer."""
        return getattr(pipe, self.denoiser_name)

    def objective(self, pipe, weight_dtype: torch.dtype, device: torch.device, args):
        """The training step's objective (training.images.diffusion): DDPM's epsilon/v-prediction here; flow
        matching for the DiT families."""
        return DiffusionObjective(pipe.vae, pipe.scheduler, weight_dtype, device, getattr(args, "snr_gamma", None),
                                  getattr(args, "noise_offset", 0.0))

    def encode(self, pipe, prompts: list[str], size: int) -> Conditioning:
        """The frozen text encoders' conditioning of `prompts` at `size` pixels, batch first."""
        raise NotImplementedError

    def encode_with_grad(self, pipe, prompts: list[str], size: int) -> Conditioning:
        """`encode` with gradients through the text encoders (--train_text_encoder: text_encoder_parts' families)."""
        raise NotImplementedError

    def denoise(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def image_conditioning(self, cond: Conditioning, crops: torch.Tensor, size: int | tuple[int, int]) -> Conditioning:
        """The batch's conditioning with what each image adds (SDXL: its size and crop, (N, 4) rows of
        height, width, top, left, and the training size: square, or an aspect bucket's (height, width)); families
        without image conditioning return `cond` unchanged."""
        return cond

    def sampling_pipeline(self, pipe):
        """The family's pipeline on `pipe`'s training modules, with DPM-Solver++ for few-step samples (as diffusers'
        log_validation)."""
        from diffusers import DPMSolverMultistepScheduler

        return self.new_pipeline(pipe.components, DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))

    def new_pipeline(self, components: dict, scheduler, **config):
        """A pipeline of this family on `components` with `scheduler`, progress bars off."""
        made = self.pipeline_class()(**{**components, "scheduler": scheduler, **config})
        made.set_progress_bar_config(disable=True)
        return made


def unreachable(name_or_path, error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not cached" if offline else first
    return (f"cannot reach model {name_or_path!r}: {why}; pass a local folder (one with model_index.json) or a "
            f"built-in preset with random weights ('tiny', or another that a trainer's --help lists)")


def text_encoders(pipe) -> list[torch.nn.Module]:
    """The pipeline's text encoders (text_encoder, text_encoder_2, ...): frozen, needed only to encode prompts."""
    return [m for k, m in pipe.components.items() if k.startswith("text_encoder") and isinstance(m, torch.nn.Module)]


@contextlib.contextmanager
def moved_to(modules: list[torch.nn.Module], device: torch.device):
    """`modules` on `device` inside the block, back where each was after it (--offload around sampling)."""
    homes = [next(m.parameters()).device for m in modules]
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


# ----- conditioning dicts: the batch operations the trainers need -----------------------------------------
def expand(cond: Conditioning, n: int) -> Conditioning:
    """One prompt's conditioning repeated for a batch of n."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def select(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    """Rows `index` of a per-prompt conditioning (per-image captions)."""
    return {k: v[index] for k, v in cond.items()}


def stack(*conds: Conditioning) -> Conditioning:
    """Batches one after the other (instance images, then class images)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
