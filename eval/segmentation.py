"""Semantic-map fidelity: a segmentation model's predictions on the generated images against the label
maps they were generated from, scored as mIoU and pixel accuracy.

Metrics are accumulated in one confusion matrix over the whole set, as mmseg does (eval.miou has the
arithmetic): per class IoU = TP / (TP + FP + FN) over all pixels of all images; pixel accuracy =
correct / valid pixels.

Labels follow ADE20K: label maps store 0 = "other/unlabelled" and 1..150 the classes, while ADE20K
models predict 0..149. reduce_zero_label (on by default) maps 0 -> 255 (ignored) and k -> k-1;
--no-reduce_zero_label takes maps that already hold 0..149. Label values outside the model's classes
(after reduction) are ignored like 255. Predictions are resized (bilinear logits) to each label map.

Segmenter (--segmenter): `transformers` (default), any transformers semantic-segmentation model by hub name
or folder (--model; default UperNet with a ConvNeXt-S backbone trained on ADE20K,
openmmlab/upernet-convnext-small); or `upernet101`, the papers' CSAILVision UperNet-101 (ResNet-101,
eval.upernet101) from its two official checkpoint files in --upernet101_dir. Numbers from different
segmenters are not comparable: compare methods under one segmenter.

    python -m eval.segmentation --generated_dir gen/ --label_dir labels/ --output seg.json
    python -m eval.segmentation --run_dir outputs/semantic-map-delora --checkpoints all   (eval.semantic_run)

The mean of mIoU: --miou_mean present (mmseg's reading, the default with --segmenter transformers) or all
(mit-semseg's, which the papers' UperNet-101 numbers use: the default with --segmenter upernet101); every
result records which.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ground.runfolder import clean_json, write_json

from . import EvalError
from .common import ArgumentParser, logger, run_main
from .embed import load_model, load_processor, resolve_device
from .images import Loaded, check_dir, image_files, open_image, open_label, try_open, warn_skipped
from .miou import IGNORE_INDEX, MIOU_MEANS, confusion_matrix, reduce_zero_label, scores_from_confusion
from .semantic_run import score_run
from .upernet101 import TEST_SCALES, UperNet101Segmenter

SEG_MODEL = "openmmlab/upernet-convnext-small"
SEGMENTERS = ("transformers", "upernet101")


# ----- the model ----------------------------------------------------------------------------------
class Segmenter:
    """A transformers semantic-segmentation model: image -> class-id map at a requested size."""

    flag = "--model"

    def __init__(self, name: str = SEG_MODEL, device="cpu"):
        from transformers import AutoModelForSemanticSegmentation

        self.name, self.device = name, torch.device(device)
        self.config, self.model = load_model(self.flag, name, AutoModelForSemanticSegmentation)
        self.model.to(self.device)
        self.processor = load_processor(self.flag, name)
        self.num_classes = int(self.config.num_labels)
        self.id2label = {int(k): v for k, v in (getattr(self.config, "id2label", None) or {}).items()}

    @torch.inference_mode()
    def predict(self, image, size: tuple[int, int]) -> np.ndarray:
        """(H, W) = size class ids: logits upsampled bilinearly to the label map, then argmax."""
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)
        logits = self.model(pixel_values=pixels).logits
        logits = torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].cpu().numpy()


# ----- folders --------------------------------------------------------------------------------------
def pair_files(generated_dir: Path, label_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(stem, generated image, label PNG) for every stem in both folders; the unpaired, named."""
    gen = {p.stem: p for p in image_files(generated_dir)}
    lab = {p.stem: p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"
           and not p.name.startswith(".")}
    pairs = [(s, gen[s], lab[s]) for s in sorted(gen.keys() & lab.keys())]
    unpaired = ([f"{gen[s].name} (no label map)" for s in sorted(gen.keys() - lab.keys())]
                + [f"{lab[s].name} (no generated image)" for s in sorted(lab.keys() - gen.keys())])
    return pairs, unpaired


def evaluate(generated_dir, label_dir, segmenter: Segmenter, reduce_labels: bool = True,
             miou_mean: str = "present") -> dict:
    gdir, ldir = check_dir(generated_dir, "--generated_dir"), check_dir(label_dir, "--label_dir")
    pairs, unpaired = pair_files(gdir, ldir)
    if not pairs:
        raise EvalError(f"no generated image in {gdir} has a label map of the same name (stem) in {ldir}")
    if unpaired:
        logger.warning("skipped %d unpaired file(s): %s", len(unpaired), ", ".join(unpaired))
    n = segmenter.num_classes
    cm = np.zeros((n, n), dtype=np.int64)
    loaded, labels, ignored_values = Loaded(), Loaded(), 0   # skipped files named under their own folder
    for stem, image_path, label_path in tqdm(pairs, desc="Segmenting", unit="img", disable=len(pairs) < 2):
        label = try_open(label_path, labels, open_label)
        image = try_open(image_path, loaded, open_image) if label is not None else None
        if image is None:
            continue
        if reduce_labels:
            label = reduce_zero_label(label)
        ignored_values += int(((label != IGNORE_INDEX) & ((label < 0) | (label >= n))).sum())
        cm += confusion_matrix(segmenter.predict(image, label.shape), label, n)
        loaded.items.append(stem)
    warn_skipped(loaded, gdir)
    warn_skipped(labels, ldir)
    if not loaded.items:
        raise EvalError(f"none of the {len(pairs)} image/label pairs could be read "
                        f"(skipped {', '.join(loaded.skipped + labels.skipped)})")
    scores = scores_from_confusion(cm, miou_mean)
    per_class = [{"class": c, "name": segmenter.id2label.get(c, str(c)), "iou": scores["iou"][c],
                  "accuracy": scores["accuracy"][c], "label_pixels": int(cm[c].sum()),
                  "predicted_pixels": int(cm[:, c].sum())} for c in range(n)]
    return {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
            "mean_accuracy": scores["mean_accuracy"], "n_images": len(loaded.items),
            "valid_pixels": scores["valid_pixels"], "ignored_out_of_range_pixels": ignored_values,
            "n_skipped": len(loaded.skipped) + len(labels.skipped) + len(unpaired),
            "skipped": loaded.skipped + [f"{ldir.name}/{x}" for x in labels.skipped] + unpaired,
            "model": segmenter.name, "reduce_zero_label": reduce_labels, "miou_mean": miou_mean,
            "classes": per_class}


# ----- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m eval.segmentation", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated_dir", help="generated images, paired with label maps by file stem")
    p.add_argument("--label_dir", help="label maps (single-channel PNGs of class ids)")
    p.add_argument("--miou_mean", default=None, choices=MIOU_MEANS,
                   help="mean of the per-class IoU: 'present' (mmseg: classes in labels or predictions; default with "
                        "--segmenter transformers) or 'all' (mit-semseg: all classes, absent ones as 0; default with "
                        "--segmenter upernet101); written into every result")
    run = p.add_argument_group("a semantic-map training run (eval.semantic_run)")
    run.add_argument("--run_dir", help="a training/semantic_map.py run: generate from its validation maps at each "
                                       "checkpoint and append mIoU rows to RUN/eval.jsonl")
    run.add_argument("--checkpoints", default="all", help="all, last, or steps such as 200,400 (default all)")
    run.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps (default 50)")
    run.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    run.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per map and seed (default 0)")
    run.add_argument("--max_maps", type=int, default=None, help="score only the first N validation maps")
    run.add_argument("--skip_bounds", action="store_true",
                     help="skip the real-image (upper) and base-model (lower) bounds")
    run.add_argument("--fid_model", help="also FID of the generated vs the real validation images: a local "
                                         "torchvision Inception-v3 state dict file (eval.fid; optional)")
    run.add_argument("--regenerate", action="store_true", help="score the bounds again even if eval.jsonl has them")
    p.add_argument("--segmenter", default="transformers", choices=SEGMENTERS,
                   help="transformers: a transformers model (--model, default); upernet101: the papers' CSAILVision "
                        "UperNet-101 from its official checkpoint files (--upernet101_dir)")
    p.add_argument("--model", default=SEG_MODEL, help=f"--segmenter transformers: semantic-segmentation model, hub "
                                                       f"name or local folder (default {SEG_MODEL})")
    p.add_argument("--upernet101_dir", help="--segmenter upernet101: folder with mit-semseg's "
                                            "ade20k-resnet101-upernet encoder_epoch_50.pth and decoder_epoch_50.pth "
                                            "(read as plain state dicts, no pickled code runs)")
    p.add_argument("--upernet101_scales", type=int, nargs="+", default=None,
                   help="--segmenter upernet101: test short sides, probabilities averaged (default mit-semseg's "
                        "300 375 450 525 600; one size, e.g. 512, is faster and not the papers' protocol)")
    p.add_argument("--reduce_zero_label", action=argparse.BooleanOptionalAction, default=True,
                   help="ADE20K raw maps: 0 = unlabelled (ignored), k -> class k-1 (default on; "
                        "--no-reduce_zero_label for maps already holding 0..N-1 with 255 ignored)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--output", help="write the scores as JSON here (default: print them to stdout)")
    return p


def make_segmenter(args, device):
    """The chosen segmenter; also settles --miou_mean's default (mit-semseg's 'all' with its UperNet-101)."""
    if args.segmenter == "upernet101":
        if not args.upernet101_dir:
            raise EvalError("--segmenter upernet101 needs --upernet101_dir, a folder with mit-semseg's "
                            "encoder_epoch_50.pth and decoder_epoch_50.pth")
        return UperNet101Segmenter(args.upernet101_dir, device, args.upernet101_scales or TEST_SCALES)
    if args.upernet101_dir or args.upernet101_scales:
        raise EvalError("--upernet101_dir/--upernet101_scales need --segmenter upernet101")
    return Segmenter(args.model, device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.miou_mean is None:
        args.miou_mean = "all" if args.segmenter == "upernet101" else "present"
    if args.run_dir:
        if args.generated_dir or args.label_dir:
            raise EvalError("give either --run_dir or --generated_dir with --label_dir, not both")
        if args.num_inference_steps <= 0 or (args.max_maps is not None and args.max_maps <= 0):
            raise EvalError("--num_inference_steps and --max_maps must be positive")
        device = resolve_device(args.device)
        score_run(args, make_segmenter(args, device), device)
        return 0
    if not (args.generated_dir and args.label_dir):
        raise EvalError("give --generated_dir and --label_dir, or --run_dir (see python -m eval.segmentation --help)")
    # folders before the model: a typo fails in milliseconds, not after a model download
    check_dir(args.generated_dir, "--generated_dir")
    check_dir(args.label_dir, "--label_dir")
    segmenter = make_segmenter(args, resolve_device(args.device))
    result = evaluate(args.generated_dir, args.label_dir, segmenter, args.reduce_zero_label, args.miou_mean)
    print(f"mIoU {result['miou']:.4f}  pixel accuracy {result['pixel_accuracy']:.4f}  "
          f"({result['n_images']} images, {result['valid_pixels']} valid pixels)", file=sys.stderr)
    if args.output:
        write_json(args.output, result, parents=True)
    else:
        print(json.dumps(clean_json(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
