"""eval.segmentation: the confusion-matrix arithmetic exactly on synthetic label maps (known IoUs,
NaN for absent classes, ignore index, ADE20K's reduce_zero_label, whole-set accumulation), and a tiny
random UperNet end to end through from_pretrained."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import segmentation as seg
from eval.common import run_main

from .test_eval_support import one_thread, random_image, tiny_upernet  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_scores(pairs, num_classes, ignore=255):
    """Set arithmetic per class over all pixels of all images: the definition, no confusion matrix."""
    pred = np.concatenate([p.ravel() for p, _ in pairs])
    label = np.concatenate([g.ravel() for _, g in pairs])
    keep = (label != ignore) & (label < num_classes)
    pred, label = pred[keep], label[keep]
    ious = []
    for c in range(num_classes):
        inter, union = np.sum((pred == c) & (label == c)), np.sum((pred == c) | (label == c))
        ious.append(inter / union if union else np.nan)
    return {"iou": ious, "miou": np.nanmean(ious), "pixel_accuracy": np.mean(pred == label)}


def test_known_ious_from_shifted_halves():
    h, w, k = 6, 10, 2                      # labels: left half class 0, right half class 1
    label = np.zeros((h, w), int)
    label[:, w // 2:] = 1
    pred = np.zeros((h, w), int)            # prediction: the boundary moved k columns left
    pred[:, w // 2 - k:] = 1
    got = seg.scores_from_confusion(seg.confusion_matrix(pred, label, num_classes=4))
    half = w // 2
    assert got["iou"][0] == pytest.approx((half - k) / half)          # TP = (half-k)h, union = half*h
    assert got["iou"][1] == pytest.approx(half / (half + k))          # TP = half*h, union = (half+k)h
    assert np.isnan(got["iou"][2]) and np.isnan(got["iou"][3])        # in neither map: left out of the mean
    assert got["miou"] == pytest.approx(((half - k) / half + half / (half + k)) / 2)
    assert got["pixel_accuracy"] == pytest.approx((h * w - k * h) / (h * w))
    assert got["valid_pixels"] == h * w


def test_false_positive_class_counts_as_zero_and_ignored_pixels_do_not_count():
    label = np.array([[0, 0, 255, 255],
                      [1, 1, 1, 1]])
    pred = np.array([[0, 2, 2, 2],          # class 2 is predicted but never labelled: IoU 0, in the mean
                     [1, 1, 1, 1]])         # the two 255 pixels are ignored whatever is predicted there
    got = seg.scores_from_confusion(seg.confusion_matrix(pred, label, num_classes=3))
    assert got["iou"][:3] == pytest.approx([1 / 2, 1.0, 0.0])
    assert got["miou"] == pytest.approx(0.5)
    assert got["pixel_accuracy"] == pytest.approx(5 / 6) and got["valid_pixels"] == 6


def test_the_whole_set_is_accumulated_not_averaged_per_image():
    # image A: class 0 perfect on 1 pixel; image B: class 0 half right on 100 pixels
    a_label, a_pred = np.zeros((1, 1), int), np.zeros((1, 1), int)
    b_label = np.zeros((10, 10), int)
    b_pred = np.zeros((10, 10), int)
    b_pred[:5] = 1
    cm = seg.confusion_matrix(a_pred, a_label, 2) + seg.confusion_matrix(b_pred, b_label, 2)
    got = seg.scores_from_confusion(cm)
    assert got["iou"][0] == pytest.approx(51 / 101)           # pooled TP / pooled union
    assert got["iou"][1] == 0.0
    per_image = (1.0 + 50 / 100) / 2                          # what a per-image mean would give instead
    assert got["iou"][0] != pytest.approx(per_image)


def test_random_maps_match_the_set_definition():
    rng = np.random.default_rng(0)
    n = 7
    pairs = []
    for shape in [(13, 9), (5, 21), (8, 8)]:
        label = rng.integers(0, n - 1, shape)               # class n-1 never labelled
        label[rng.random(shape) < 0.2] = 255
        label[0, 0] = n + 3                                 # out of range: ignored like 255
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, n, shape)) % n
        pairs.append((pred, label))
    cm = sum(seg.confusion_matrix(p, g, n) for p, g in pairs)
    got, ref = seg.scores_from_confusion(cm), naive_scores(pairs, n)
    np.testing.assert_allclose(got["iou"], ref["iou"], equal_nan=True)
    assert got["miou"] == pytest.approx(ref["miou"]) and got["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"])


def test_reduce_zero_label_is_ades():
    raw = np.array([[0, 1, 2], [150, 255, 37]])
    assert seg.reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 255, 36]]


def model_predictions(model_dir, image, size):
    """The model's class map computed here: processor, forward, bilinear resize of logits, argmax."""
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    model = UperNetForSemanticSegmentation.from_pretrained(model_dir).eval()
    proc = AutoImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(**proc(images=[image], return_tensors="pt")).logits
    up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return up.argmax(1)[0].numpy()


@pytest.fixture
def seg_folders(tmp_path, tiny_upernet):  # noqa: F811
    gen, labels = tmp_path / "gen", tmp_path / "labels"
    gen.mkdir()
    labels.mkdir()
    preds = {}
    for i, (w, h) in enumerate([(48, 40), (40, 40)]):
        img = random_image(50 + i, size=(w, h))
        img.save(gen / f"img{i}.png")
        preds[f"img{i}"] = model_predictions(tiny_upernet, img, (h + 8, w))   # label maps at another size
    return gen, labels, preds


def write_label(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(path)


def test_upernet_end_to_end_against_its_own_predictions(seg_folders, tiny_upernet, tmp_path, capsys):  # noqa: F811
    gen, labels, preds = seg_folders
    # raw ADE20K maps that agree with the model everywhere they are labelled (k+1), with an unlabelled band
    for stem, pred in preds.items():
        raw = pred + 1
        raw[:3] = 0
        write_label(labels / f"{stem}.png", raw)
    random_image(9).save(gen / "extra.png")                 # no label map: named and counted
    out = tmp_path / "seg.json"
    assert run_main(seg.main, ["--generated_dir", str(gen), "--label_dir", str(labels), "--model", str(tiny_upernet),
                               "--output", str(out), "--device", "cpu"]) == 0
    got = json.loads(out.read_text())
    assert got["pixel_accuracy"] == 1.0 and got["miou"] == 1.0
    assert got["n_images"] == 2 and got["n_skipped"] == 1 and "extra.png (no label map)" in got["skipped"]
    assert got["valid_pixels"] == sum(p[3:].size for p in preds.values())     # the 0 band is ignored
    present = {c for p in preds.values() for c in np.unique(p[3:])}
    assert {c["class"] for c in got["classes"] if c["iou"] is not None} == present   # absent: null, not 0
    assert "warning:" in capsys.readouterr().err


def test_upernet_end_to_end_against_the_set_definition(seg_folders, tiny_upernet, tmp_path):  # noqa: F811
    gen, labels, preds = seg_folders
    rng = np.random.default_rng(1)
    pairs = []
    for stem, pred in preds.items():
        reduced = np.where(rng.random(pred.shape) < 0.5, pred, rng.integers(0, 150, pred.shape))
        reduced[rng.random(pred.shape) < 0.1] = 255
        write_label(labels / f"{stem}.png", reduced)              # already 0..149: no reduction
        pairs.append((pred, reduced))
    out = tmp_path / "seg.json"
    assert run_main(seg.main, ["--generated_dir", str(gen), "--label_dir", str(labels), "--model", str(tiny_upernet),
                               "--no-reduce_zero_label", "--output", str(out), "--device", "cpu"]) == 0
    got, ref = json.loads(out.read_text()), naive_scores(pairs, 150)
    assert got["miou"] == pytest.approx(ref["miou"]) and got["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"])
    assert 0 < got["pixel_accuracy"] < 1


@pytest.mark.parametrize("case", ["missing_labels", "no_pairs", "rgb_labels", "not_a_model"])
def test_bad_input_is_one_error_line(case, seg_folders, tiny_upernet, tmp_path, capsys):  # noqa: F811
    gen, labels, preds = seg_folders
    model = str(tiny_upernet)
    if case == "missing_labels":
        labels = tmp_path / "nope"
    elif case == "rgb_labels":                 # colour-coded maps are not class ids: skipped, then nothing left
        for stem in preds:
            Image.new("RGB", (8, 8), "red").save(labels / f"{stem}.png")
    elif case == "not_a_model":
        write_label(labels / "img0.png", np.ones((4, 4)))
        model = str(gen)
    out = tmp_path / "out.json"
    assert run_main(seg.main, ["--generated_dir", str(gen), "--label_dir", str(labels), "--model", model,
                               "--output", str(out)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and not out.exists()
    assert {"missing_labels": "does not exist", "no_pairs": "no generated image", "rgb_labels": "one channel",
            "not_a_model": "not a transformers model"}[case] in err[0]
