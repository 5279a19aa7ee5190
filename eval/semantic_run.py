"""mIoU of a semantic-map run (training/semantic_map.py), checkpoint by checkpoint:

    python -m eval.segmentation --run_dir RUN --checkpoints all

For each chosen checkpoint, the run's base pipeline with that adapter and conditioning encoder (or the
run's frozen ControlNet) draws one image per validation map and seed (DDIM, 50 steps by default; the
prompts are the maps' captions, as in training), the segmenter labels them, and the scores go to
RUN/eval.jsonl (one row per step) and RUN/eval/seg-step-N/ (images + scores.json); with --fid_model each row also
has the FID of its images against the real validation images (eval.fid). Once per run (and
again when the settings change) two bounds are scored the same way: the real validation images (upper
bound, row "kind": "real") and the base model without adapter or conditioning (lower bound, "kind":
"base"); their rows carry step null, before the checkpoint rows.

The validation maps are the run's own, chosen by the trainer's own code (training.segmap.sets,
from the data settings in run.json): the ADE20K validation split of its --train_data_dir, the first
--max_maps pairs of an imagefolder/hub set, or the trainer's embedded set. Maps and images are cropped
and resized exactly as the trainer did (training.segmap.data), at the run's resolution.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import lowrank
from ground.runfolder import EVAL, read_jsonl, read_run, run_setting, write_json
from training.common import TrainingError
from training.segmap.conditioning import ConditionedUNet, conditioning_encoder, load_encoder
from training.segmap.data import to_tensor
from training.segmap.sets import MapData, load_data, validation_items

from . import EvalError, fid
from .common import update_eval_file
from .generate import load_pipeline
from .miou import confusion_matrix, reduce_zero_label, scores_from_confusion
from .subject import choose_checkpoints

BOUND_KINDS = ("real", "base")
# the run.json settings that choose and prepare its validation maps (training.segmap.sets.MapData)
MAP_SETTINGS = ("train_data_dir", "dataset_name", "cache_dir", "image_column", "conditioning_image_column",
                "caption_column", "condition", "resolution")


def validation_set(run: dict, max_maps: int | None) -> list[dict]:
    """[{control, label, prompt, image}] of the run's validation maps, prepared as the trainer does."""
    settings = {k: run_setting(run, k) for k in MAP_SETTINGS}
    data = MapData(**{k: v for k, v in settings.items() if v is not None}, num_validation_maps=max_maps or 10**9)
    try:
        _, val, _ = load_data(data)
        items = validation_items(data, val)
    except TrainingError as e:
        raise EvalError(f"the run's validation maps: {e}") from None
    if data.condition != "seg":
        raise EvalError(f"the run was trained with --condition {data.condition}: mIoU needs label maps (seg)")
    for item, ex in zip(items, val):
        item["stem"] = ex.stem
    return items


def load_conditioned(run_dir: Path, run: dict, device: torch.device, num_inference_steps: int):
    """(pipeline with DDIM, ConditionedUNet) for the run's base model; nothing loaded into it yet."""
    from diffusers import DDIMScheduler

    pipe = load_pipeline(run, device, keep_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    controlnet = None
    name = run_setting(run, "controlnet_model_name_or_path")
    if name:
        from diffusers import ControlNetModel
        controlnet = ControlNetModel.from_pretrained(name).to(device)
    encoder = None if controlnet else conditioning_encoder(pipe.unet, pipe.vae_scale_factor).to(device)
    return pipe, ConditionedUNet(pipe.unet, encoder, controlnet)


def load_checkpoint(model, adapter_dir: Path | None) -> None:
    """The checkpoint's adapter + encoder into the model; None: the base model (no adapter, zero encoder)."""
    if lowrank.adapter_layers(model.unet):
        lowrank.eject(model.unet)
    if adapter_dir is None:   # the base model: no adapter, and generate(use_control=False) adds no control
        return
    try:
        lowrank.load_adapter(model.unet, adapter_dir)
        if model.conditioning_embedding is not None:
            load_encoder(model.conditioning_embedding, adapter_dir)
    except (lowrank.AdapterError, TrainingError) as e:
        raise EvalError(f"cannot load {adapter_dir}: {e}") from None
    model.to(model.unet.device).eval()


@torch.no_grad()
def generate(pipe, model, items: list[dict], seeds: list[int], settings: dict, out_dir: Path,
             use_control: bool = True) -> list[tuple]:
    """[(image, label)] for every map x seed, also written to out_dir/{stem}-s{seed}.png."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pairs = []
    for item in tqdm(items, desc=f"Generating {out_dir.name}", unit="map"):
        control = to_tensor(item["control"])[None].to(pipe.device)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with model.conditioned(control) if use_control else contextlib.nullcontext():
            images = pipe(prompt=[item["prompt"]] * len(seeds), generator=gens, height=settings["resolution"],
                          width=settings["resolution"], num_inference_steps=settings["num_inference_steps"],
                          guidance_scale=settings["guidance_scale"]).images
        for s, img in zip(seeds, images):
            img.save(tmp / f"{item['stem']}-s{s}.png")
            pairs.append((img, item["label"]))
    write_json(tmp / "generation.json", settings)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return pairs


def score_pairs(pairs: list[tuple], segmenter, miou_mean: str) -> dict:
    """One confusion matrix over all (image, raw label) pairs, raw label 0 ignored."""
    n = segmenter.num_classes
    cm = np.zeros((n, n), dtype=np.int64)
    for img, label in tqdm(pairs, desc="Segmenting", unit="img", disable=len(pairs) < 2):
        lab = reduce_zero_label(label)
        cm += confusion_matrix(segmenter.predict(img, lab.shape), lab, n)
    s = scores_from_confusion(cm, miou_mean)
    return {k: s[k] for k in ("miou", "pixel_accuracy", "mean_accuracy", "valid_pixels")} | {
        "iou": s["iou"], "n_images": len(pairs)}


class FidScorer:
    """FID of generated images against the run's real validation images (eval.fid), when --fid_model is
    given: the real features once, then {"fid", "fid_images"} per generated set; {} without a model."""

    def __init__(self, fid_model, device, items: list[dict]):
        self.extractor, self.real = None, None
        if fid_model:
            if len(items) < 2:
                raise EvalError("--fid_model needs at least 2 validation maps (a covariance per set)")
            self.extractor = fid.InceptionFeatures(fid_model, device)
            self.real = self.extractor([it["image"] for it in items])

    def __call__(self, pairs: list[tuple]) -> dict:
        if self.extractor is None:
            return {}
        generated = self.extractor([img for img, _ in pairs])
        return {"fid": fid.fid_from_features(self.real, generated), "fid_images": [len(self.real), len(generated)]}


def score_run(args, segmenter, device: torch.device) -> list[dict]:
    """Score the bounds (once per settings) and every chosen checkpoint; rows go to RUN/eval.jsonl."""
    run_dir = Path(args.run_dir).expanduser()
    run = read_run(run_dir)
    chosen = choose_checkpoints(run_dir, run, args.checkpoints)
    items = validation_set(run, args.max_maps)
    if not items:
        raise EvalError(f"{run_dir}: the run has no validation maps")
    settings = {"scheduler": "DDIMScheduler", "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale, "seeds": args.seeds, "maps": len(items),
                "resolution": int(run_setting(run, "resolution", 512)), "seg_model": segmenter.name,
                "miou_mean": args.miou_mean, "metric": "segmentation"}
    fid_score = FidScorer(getattr(args, "fid_model", None), device, items)
    if fid_score.extractor:
        settings |= {"fid_model": fid_score.extractor.name}
    pipe, model = load_conditioned(run_dir, run, device, args.num_inference_steps)
    existing = read_jsonl(run_dir / EVAL, strict=False) if (run_dir / EVAL).is_file() else []
    results = []

    def record(row: dict, label: str) -> None:
        row = {**row, **settings}
        update_eval_file(run_dir, {k: v for k, v in row.items() if k != "iou"}, ("step", "kind", "metric",
                                                                               "seg_model", "miou_mean"))
        fid_text = f"  FID {row['fid']:.2f}" if row.get("fid") is not None else ""
        print(f"{label}: mIoU ({args.miou_mean}) {row['miou']:.4f}  aAcc {row['pixel_accuracy']:.4f}  "
              f"mAcc {row['mean_accuracy']:.4f}{fid_text}  ({row['n_images']} images)", file=sys.stderr)
        results.append(row)

    if not args.skip_bounds:
        for kind in BOUND_KINDS:
            if not args.regenerate and any(r.get("kind") == kind and all(r.get(k) == v for k, v in settings.items())
                                           for r in existing):
                continue   # once per run: these do not change with the checkpoints
            if kind == "real":
                pairs = [(it["image"], it["label"]) for it in items]
            else:
                load_checkpoint(model, None)
                pairs = generate(pipe, model, items, args.seeds, settings, run_dir / "eval" / "seg-base",
                                 use_control=False)
            result = score_pairs(pairs, segmenter, args.miou_mean) | (fid_score(pairs) if kind == "base" else {})
            record({**result, "step": None, "kind": kind}, f"{kind} images")
    for step, adapter_dir in chosen:
        load_checkpoint(model, adapter_dir)
        out = run_dir / "eval" / f"seg-step-{step}"
        pairs = generate(pipe, model, items, args.seeds, {**settings, "step": step}, out)
        result = {**score_pairs(pairs, segmenter, args.miou_mean), **fid_score(pairs), "step": step,
                  "kind": "checkpoint", "checkpoint": adapter_dir.name if adapter_dir != run_dir else "final",
                  "images": str(out)}
        write_json(out / "scores.json", {**result, **settings})
        record(result, f"step {step}")
    return results
