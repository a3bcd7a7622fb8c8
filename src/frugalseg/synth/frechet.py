"""Fréchet distance between two image sets in a pretrained network's feature space (FID's formula).

FID uses Inception-v3 pool features; here the offline ImageNet EfficientNet-Lite0 (its last feature stage,
globally average-pooled, 320-d) so the figure is computable without a download. Absolute values are
therefore not comparable with published FIDs; compare a synthetic-vs-real distance with the real-vs-real
floor (two halves of the real set) at the same sample sizes: the estimate is biased upwards by small sets.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

__all__ = ["frechet_distance", "pooled_features"]


@torch.no_grad()
def pooled_features(backbone, images: list[torch.Tensor] | torch.Tensor, size: int = 224,
                    batch_size: int = 16) -> np.ndarray:
    """(N, C) features: each (3, H, W) image in [0, 1] resized to size², normalised with the backbone's mean and
    std, the last feature stage average-pooled. `backbone` is a `frugalseg.models.backbones.Backbone`."""
    model = backbone.model.eval()
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = [torch.nn.functional.interpolate(im[None].float(), size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)
                 for im in images[i:i + batch_size]]
        x = (torch.cat(chunk) - mean) / std
        out.append(model(x)[-1].mean((2, 3)).double().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½) of two (N, C) feature sets (N may be below C: the covariances
    are then singular; where the matrix square root of their product is not finite, it is taken again with a
    small ridge on both)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, C) with the same C, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each set needs at least 2 images")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(cov_a))
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
