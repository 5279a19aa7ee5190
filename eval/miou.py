"""The segmentation arithmetic: ADE20K's label reduction, one confusion matrix, mIoU and pixel accuracy.

Metrics are accumulated in one confusion matrix over the whole set, as mmseg does: per class
IoU = TP / (TP + FP + FN) over all pixels of all images; a class absent from both the labels and
the predictions has no IoU (NaN, left out of the mean); pixel accuracy = correct / valid pixels.
Shared by eval.segmentation (folders of images) and eval.semantic_run (a training run's checkpoints).
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
MIOU_MEANS = ("present", "all")


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's raw maps -> training ids: 0 (unlabelled) -> 255, k -> k-1, 255 stays ignored."""
    label = np.asarray(label, dtype=np.int64)
    out = label - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(num_classes, num_classes) pixel counts, rows = label, columns = prediction. Pixels labelled
    ignore_index or outside 0..num_classes-1 are not counted."""
    pred, label = np.asarray(pred, dtype=np.int64), np.asarray(label, dtype=np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    idx = label[valid] * num_classes + np.clip(pred[valid], 0, num_classes - 1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(cm: np.ndarray, miou_mean: str = "present") -> dict:
    """mIoU, pixel accuracy (aAcc), mean class accuracy, and per-class IoU/accuracy (NaN: absent).

    miou_mean "present" (mmseg): the mean over classes in the labels or the predictions; "all"
    (mit-semseg, whose UperNet-101 the DeLoRA/ETHER papers used): over every class, absent ones as 0
    (IoU and accuracy alike). On a small set the two differ by a large factor: always say which."""
    if miou_mean not in MIOU_MEANS:
        raise ValueError(f"miou_mean must be one of {MIOU_MEANS}, got {miou_mean!r}")
    cm = np.asarray(cm, dtype=np.float64)
    tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pred - tp)          # 0/0 = NaN: the class is in neither labels nor predictions
        acc = tp / gt
    total = cm.sum()

    def mean(values: np.ndarray) -> float:
        if miou_mean == "all":
            return float(np.nan_to_num(values, nan=0.0).mean())
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    return {"miou": mean(iou), "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_accuracy": mean(acc), "miou_mean": miou_mean,
            "iou": iou.tolist(), "accuracy": acc.tolist(), "valid_pixels": int(total)}
