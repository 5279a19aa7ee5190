"""eval.fid: the Fréchet distance against hand-computed values (a 1-d feature extractor on constant-colour
images), against scipy's sqrtm on non-commuting covariances, zero for identical rank-deficient sets; the
Inception-v3 loader through a saved torchvision state dict; eval.semantic_run's per-set FID rows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from eval import EvalError, semantic_run
from eval import fid as F

from .test_eval_support import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def grey_level(images) -> np.ndarray:
    """A 1-d feature extractor: each image's mean grey level."""
    return np.array([[np.asarray(im.convert("L"), np.float64).mean()] for im in images])


def constant(level: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (level, level, level))


def test_one_dimensional_fid_by_hand():
    real = [constant(0), constant(2)]                    # mean 1, variance (ddof 1) 2
    generated = [constant(3), constant(5), constant(7)]  # mean 5, variance 4
    expected = (1 - 5) ** 2 + 2 + 4 - 2 * math.sqrt(2 * 4)   # = (1-5)^2 + (sqrt 2 - 2)^2 = 22 - 4 sqrt 2
    got = F.fid_from_features(grey_level(real), grey_level(generated))
    assert got == pytest.approx(22 - 4 * math.sqrt(2), abs=1e-12) and got == pytest.approx(expected, abs=1e-12)


def test_matches_scipy_sqrtm_on_non_commuting_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) + 1.5
    (m1, s1), (m2, s2) = F.gaussian_stats(a), F.gaussian_stats(b)
    assert not np.allclose(s1 @ s2, s2 @ s1)             # the case where sqrt(S1) sqrt(S2) would be wrong
    reference = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert F.frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-9)
    assert F.frechet_distance(m1, s1, m2, s2) == pytest.approx(F.frechet_distance(m2, s2, m1, s1), rel=1e-9)


def test_identical_sets_are_zero_even_when_rank_deficient():
    feats = np.random.default_rng(1).normal(size=(4, 16))   # 4 images, 16 dims: covariance rank 3
    assert abs(F.fid_from_features(feats, feats)) < 1e-9
    with pytest.raises(EvalError, match="at least 2 images"):
        F.fid_from_features(feats[:1], feats)


def test_inception_features_from_a_saved_torchvision_state_dict(tmp_path):
    from torchvision.models import Inception3

    torch.manual_seed(0)
    model = Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False).eval()
    path = tmp_path / "inception.pth"
    torch.save(model.state_dict(), path)
    extractor = F.InceptionFeatures(path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    feats = extractor(images)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = model(extractor.pixels(images)).numpy()
    assert feats.shape == (2, 2048) and np.array_equal(feats, expected.astype(np.float64))
    pixels = extractor.pixels(images)
    assert pixels.shape == (2, 3, 299, 299) and pixels.min() >= -1 and pixels.max() <= 1
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(EvalError) as excinfo:
        F.InceptionFeatures(tmp_path / "bad.pth")
    assert "Mixed_7c.branch_pool.conv.weight" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_semantic_run_rows_get_fid_against_the_real_images(monkeypatch):
    class GreyInception:
        name = "grey"

        def __init__(self, path, device):
            pass

        __call__ = staticmethod(grey_level)

    monkeypatch.setattr(F, "InceptionFeatures", GreyInception)
    items = [{"image": constant(0)}, {"image": constant(2)}]
    scorer = semantic_run.FidScorer("any.pth", "cpu", items)
    row = scorer([(constant(3), None), (constant(5), None), (constant(7), None)])
    assert row == {"fid": pytest.approx(22 - 4 * math.sqrt(2), abs=1e-12), "fid_images": [2, 3]}
    assert semantic_run.FidScorer(None, "cpu", items)([(constant(3), None)]) == {}
