"""Drift: how far an adapter moved the model on prompts that have nothing to do with its subject, as peft's
image-generation benchmark measures it (huggingface/peft, method_comparison/image-gen, run.py::measure_drift).
The base model (no adapter) and the adapted model draw the same unrelated prompts from the same seeds with the
same settings, and

    drift = (1 − mean_i cos(DINO(base_i), DINO(adapted_i))) / 2        in [0, 1]; 0 = the same images, lower is better

with the DINO embedding eval.subject scores with (the CLS token, unit rows). The prompts are peft's 10
drift_image_prompts (DRIFT_PROMPTS); eval.subject --drift_prompts N takes the first N, one image each from --seed
(default 2, peft's protocol 10; 0 turns drift off). The base model's images do not depend on the checkpoint: they
are made once into RUN/eval/drift-base/ (or --drift_base_dir, which the runs of one base model and settings can
share: eval.robustness passes OUTPUT_DIR/drift-base), with their settings in its generation.json, and made again
only when those change; each checkpoint's images go to RUN/eval/drift-step-N/, reused while its adapter and the
settings are unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ground.runfolder import run_setting
from training.common.args import file_in_the_way

from . import EvalError
from .common import logger
from .embed import DinoEmbedder
from .images import Loaded, load_generated

# peft's drift_image_prompts (method_comparison/image-gen/default_training_params.json), in its order
DRIFT_PROMPTS = (
    "a photo of cat", "a color drawing of cat", "cat sitting in a bathtub", "cat looks into a mirror",
    "a photo of cat next to a tree", "the Mona Lisa but she looks angry", "a dog holding a sign that says hello world",
    "a photo of the Eiffel tower at night", "an astronaut riding a horse",
    "3d design concept of a chair that looks like an avocado",
)
DEFAULT_DRIFT_PROMPTS = 2   # a CPU-sized default; peft's protocol: all 10
BASE_FOLDER = "drift-base"


def drift_of(base: torch.Tensor, adapted: torch.Tensor) -> float:
    """(1 − mean row-wise cosine) / 2 of two (n, d) embedding sets whose row i is the same prompt and seed."""
    if base.ndim != 2 or base.shape != adapted.shape or not len(base):
        raise ValueError(f"drift needs two (n, d) embedding sets of one shape, got {tuple(base.shape)} and "
                         f"{tuple(adapted.shape)}")
    b = torch.nn.functional.normalize(base.double(), dim=-1)
    a = torch.nn.functional.normalize(adapted.double(), dim=-1)
    return float((1 - (b * a).sum(-1).mean()) / 2)


def paired(base: Loaded, adapted: Loaded) -> tuple[list, list]:
    """(base images, adapted images) of the files both folders have: one name = one prompt and seed."""
    by_name = {name: img for name, img, _ in base.items}
    pairs = [(by_name[name], img) for name, img, _ in adapted.items if name in by_name]
    if not pairs:
        raise EvalError("the base model's drift images and a checkpoint's share no prompt and seed")
    return [b for b, _ in pairs], [a for _, a in pairs]


def drift_score(base: Loaded, adapted: Loaded, dino: DinoEmbedder) -> dict:
    """{"drift", "n_drift"} of two folders' images (load_generated), paired by file name."""
    base_imgs, adapted_imgs = paired(base, adapted)
    value = drift_of(dino.images(base_imgs, "DINO base (drift)"), dino.images(adapted_imgs, "DINO drift"))
    return {"drift": value, "n_drift": len(base_imgs)}


def check_count(n: int | None) -> int:
    if n is None:
        return DEFAULT_DRIFT_PROMPTS
    if not 0 <= n <= len(DRIFT_PROMPTS):
        raise EvalError(f"--drift_prompts {n}: give 0 (no drift) to {len(DRIFT_PROMPTS)} (peft's drift prompts)")
    return n


def plan(args, run_dir: Path, run: dict, gen: dict) -> dict | None:
    """What the drift of a run's checkpoints needs, checked before any model loads: the settings the base
    model's images depend on and the folder they are kept in; None with --drift_prompts 0."""
    n = check_count(getattr(args, "drift_prompts", None))
    if n == 0:
        return None
    base_dir = Path(args.drift_base_dir).expanduser() if getattr(args, "drift_base_dir", None) else \
        run_dir / "eval" / BASE_FOLDER
    bad = file_in_the_way(base_dir)
    if bad is not None:
        raise EvalError(f"--drift_base_dir {base_dir}: {bad} is a file; name a folder")
    settings = {"metric": "drift", "prompts": list(DRIFT_PROMPTS[:n]), "images_per_prompt": 1,
                "seed": gen["seed"], "num_inference_steps": gen["num_inference_steps"],
                "guidance_scale": gen["guidance_scale"], "resolution": gen["resolution"],
                "base_model": gen["base_model"], "revision": run_setting(run, "revision"),
                "max_sequence_length": run_setting(run, "max_sequence_length"),
                "safety_checker": gen["safety_checker"]}
    return {"settings": settings, "base_dir": base_dir, "n": n}


class Drift:
    """The drift of each checkpoint of one run: base images made (or found) once, a checkpoint's on demand.
    sampler: eval.generate.Sampler of the run (the same pipeline, settings and call kwargs as its scores)."""

    def __init__(self, drift_plan: dict, run_dir: Path, sampler, dino: DinoEmbedder, regenerate: bool = False):
        self.settings, self.base_dir, self.n = drift_plan["settings"], drift_plan["base_dir"], drift_plan["n"]
        self.run_dir, self.sampler, self.dino, self.regenerate = run_dir, sampler, dino, regenerate
        self._base: Loaded | None = None

    def make(self, adapter_dir: Path | None, out_dir: Path, settings: dict, what: str) -> Loaded:
        blacked = self.sampler.ensure(adapter_dir, self.settings["prompts"], out_dir, 1, settings, self.regenerate)
        if blacked:
            logger.warning("%s: the safety checker blacked out %d drift image(s); they count as they are "
                           "(--disable_safety_checker to keep them)", what, blacked)
        return load_generated(out_dir, f"drift images of {what}")

    def base(self) -> Loaded:
        if self._base is None:   # once per process, whatever --regenerate says
            self._base = self.make(None, self.base_dir, self.settings, "the base model")
        return self._base

    def __call__(self, step: int, adapter_dir: Path, adapter_sha1: str) -> dict:
        """{"drift", "n_drift", "drift_prompts", "drift_images"} of one checkpoint."""
        base = self.base()
        out = self.run_dir / "eval" / f"drift-step-{step}"
        adapted = self.make(adapter_dir, out, {**self.settings, "step": step, "adapter": str(adapter_dir),
                                               "adapter_sha1": adapter_sha1}, f"step {step}")
        return {**drift_score(base, adapted, self.dino), "drift_prompts": self.n, "drift_images": str(out),
                "drift_base": str(self.base_dir)}
