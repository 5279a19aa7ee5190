"""Fréchet Inception Distance between generated and real images (optional; needs Inception-v3 weights on disk).

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))        (Heusel et al. 2017)

mu and S are the mean and covariance (ddof 1, as pytorch-fid's np.cov) of the 2048-d pool features.
(S_r S_g)^(1/2) is not formed (scipy's sqrtm of that non-symmetric product can turn complex): its trace is
the nuclear norm of S_r^(1/2) S_g^(1/2), from two symmetric eigen-decompositions and one SVD in float64.
With fewer images than feature dimensions the covariances are rank-deficient; the formula still holds, but
FID on a few hundred images is biased upwards: compare runs on the same image count only (every result records it).

Features: torchvision's Inception-v3 (`torchvision.models.inception_v3`) with the state dict given by
--fid_model (a local file, e.g. torchvision's inception_v3_google-0cc3c7bd.pth, read with weights_only=True),
the classifier removed: the 2048-d average-pooled features. Images are resized to 299 x 299 (bilinear) and
scaled to [-1, 1], the input range of these Google-trained weights. pytorch-fid uses a TF-ported variant
(different pooling in some blocks), so absolute values differ from its numbers; differences between
methods under one model are what this is for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import EvalError

FEATURE_SIZE = 299


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of an (n, d) feature matrix; n >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvalError(f"FID needs at least 2 images per set, got features of shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root through eigh (round-off negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) for two Gaussians."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; covariances {s1.shape}, {s2.shape}")
    # Tr((S1 S2)^(1/2)) = sum of the singular values of S1^(1/2) S2^(1/2) (their squares are the eigenvalues
    # of S2^(1/2) S1 S2^(1/2), similar to S1 S2). An SVD keeps null directions at round-off level, where the
    # square root of round-off eigenvalues (eig of S1 S2, then sqrt) would add ~sqrt(eps) per null direction.
    trace_sqrt = np.linalg.svd(sqrt_psd(s1) @ sqrt_psd(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def fid_from_features(real, generated) -> float:
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(generated))


class InceptionFeatures:
    """images -> (n, 2048) pool features of torchvision's Inception-v3 with weights from a local file."""

    def __init__(self, path, device="cpu", batch_size: int = 16):
        from torchvision.models import Inception3

        path = Path(path).expanduser()
        if not path.is_file():
            raise EvalError(f"--fid_model {path} does not exist (a torchvision Inception-v3 state dict, e.g. "
                            f"inception_v3_google-0cc3c7bd.pth)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # code in the pickle, or a damaged file
            raise EvalError(f"--fid_model {path} is not a plain state-dict file "
                            f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]})") from None
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise EvalError(f"--fid_model {path} is not a torchvision Inception-v3 state dict (no fc.weight)")
        model = Inception3(num_classes=state["fc.weight"].shape[0], aux_logits="AuxLogits.fc.weight" in state,
                           transform_input=False, init_weights=False)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:   # missing/unexpected keys or shapes: first line of torch's report
            first = " ".join(str(e).split())[:200]
            raise EvalError(f"--fid_model {path} does not fit torchvision's Inception-v3: {first}") from None
        model.fc = torch.nn.Identity()                 # the 2048-d pool features, not the class logits
        self.model, self.device, self.batch_size = model.eval().to(device), torch.device(device), batch_size
        self.name = f"inception_v3 ({path.name})"

    def pixels(self, images) -> torch.Tensor:
        arrays = [np.asarray(im.convert("RGB").resize((FEATURE_SIZE, FEATURE_SIZE), Image.BILINEAR), np.float32)
                  for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        return (x - 0.5) / 0.5                          # [-1, 1]: the Google weights' input range

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        out = [self.model(self.pixels(images[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).numpy().astype(np.float64)
