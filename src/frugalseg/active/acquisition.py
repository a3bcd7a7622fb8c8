"""How informative is a region: classifier uncertainty, geometric uncertainty, and their combination.

Konyushkova, Sznitman & Fua (ICCV 2015; CVIU 2019) score each superpixel/supervoxel s by

- **feature uncertainty** U^θ(s) = H(p_θ(y_s)): the classifier's own doubt (entropy of its class
  probabilities, here the network's softmax averaged over the region);
- **geometric uncertainty** U^G(s) = H(p_G(y_s)), where p_G(y_s) = Σ_j T(s, j) p_θ(y_j) propagates the
  neighbours' predictions with the random-walk transition probabilities T of the region graph
  (`frugalseg.active.geometry`): high where a region's neighbourhood is mixed, i.e. on and near
  boundaries the classifier has not settled;
- the **combined** criterion U^{θ,G}(s) = H(p_{θ,G}(y_s)) with p_{θ,G}(y) ∝ p_θ(y) p_G(y) = Σ_j T(s, j)
  p_θ(y_s = y) p_θ(y_j = y), normalised: the probability that the region and a random-walk neighbour
  carry the same label y. It is high where the classifier is unsure, where the neighbourhood is unsure,
  and where the two *disagree* (a confident prediction contradicted by its neighbours: an isolated
  error a smoothness prior says is likely wrong), which neither entropy sees alone.

Multi-class criteria (CVIU §4). Besides the entropy, `margin` (1 − (p₁ − p₂), best vs second best) and
`least_confidence` (1 − p₁), two criteria look at the decision the classifier will actually take:
`selection_entropy`, the binary entropy of "the selected class is right" (best vs rest, H₂(p₁)), and
`conditional_entropy`, the binary entropy between the two most probable classes given that one of them
is right (H₂(p₁ / (p₁ + p₂))). With two classes all of them rank regions alike; with many classes they
differ on regions whose mass is spread over unlikely classes (entropy high, decision safe). Each works
with any of the three probability sources (`region_uncertainty(..., source=...)`).

Pixel-level instances (`pixel_uncertainty`). The papers' instances are "(super)pixels or
(super)voxels" and the region criteria above assume a region carries one label. Thin structures break
that: on ISBI-2012 membranes only 39 % of SLIC superpixels (~440 px) are 90 % one class
(`benchmarks/active.py`), so a region's mean prediction measures its *mix* of membrane and cell, not
the classifier's doubt, and its entropy ranks every boundary region alike. `pixel_uncertainty` applies
the same three criteria with pixels as instances: the random walk runs on the pixel grid (each pixel to
its 2·ndim neighbours, weights falling with the intensity difference and, for anisotropic volumes, the
spacing), p_G(x) = Σ_y T(x, y) p_θ(y), combined as above per pixel; regions (the query unit) are then
scored by the mean over their pixels. Along a dark membrane the walk stays on the membrane, so a gap the
classifier leaves in it (a dark pixel called "cell" between dark pixels called "membrane") is where the
combined criterion peaks.

MC-dropout (`mc_dropout_probabilities`) is the epistemic baseline users know from MONAI Label's
"Epistemic" strategy. MONAI Label scores a whole image by the mean entropy of its MC-averaged
prediction and hands the user the next *image*; here the same passes give a per-pixel mutual information
(BALD: H(mean_t p_t) − mean_t H(p_t), the part of the uncertainty the dropout samples disagree on),
averaged per *region*, and regions are selected across images with the same diversity rule as the
other criteria, so the comparison isolates the score.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from frugalseg.active.geometry import RegionGraph, robust_scale
from frugalseg.errors import ConfigError

__all__ = [
    "CRITERIA", "SOURCES", "combined_probabilities", "conditional_entropy", "dropout_active", "entropy",
    "geometric_probabilities", "least_confidence", "margin", "mc_dropout_probabilities",
    "pixel_geometric_probabilities", "pixel_uncertainty", "region_uncertainty", "selection_entropy",
]

_EPS = 1e-12


def _check(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ConfigError(f"class probabilities must be (regions, classes ≥ 2), got shape {p.shape}.")
    return p


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of (n, C) probabilities."""
    p = _check(p)
    return -(p * np.log(np.clip(p, _EPS, 1.0))).sum(1)


def _binary_entropy(q: np.ndarray) -> np.ndarray:
    q = np.clip(q, _EPS, 1 - _EPS)
    return -(q * np.log(q) + (1 - q) * np.log(1 - q))


def _top2(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    part = np.partition(p, -2, axis=1)
    return part[:, -1], part[:, -2]


def least_confidence(p: np.ndarray) -> np.ndarray:
    """1 − the probability of the predicted class."""
    return 1.0 - _check(p).max(1)


def margin(p: np.ndarray) -> np.ndarray:
    """1 − (p₁ − p₂): best vs second best (1 when the two top classes tie)."""
    p1, p2 = _top2(_check(p))
    return 1.0 - (p1 - p2)


def selection_entropy(p: np.ndarray) -> np.ndarray:
    """H₂(p₁): uncertainty of "the selected class is the right one" (best vs rest)."""
    p1, _ = _top2(_check(p))
    return _binary_entropy(p1)


def conditional_entropy(p: np.ndarray) -> np.ndarray:
    """H₂(p₁ / (p₁ + p₂)): uncertainty between the two most probable classes, given one of them is right."""
    p1, p2 = _top2(_check(p))
    return _binary_entropy(p1 / np.maximum(p1 + p2, _EPS))


CRITERIA: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": entropy, "margin": margin, "least_confidence": least_confidence,
    "selection_entropy": selection_entropy, "conditional_entropy": conditional_entropy,
}
SOURCES = ("feature", "geometry", "combined")


def geometric_probabilities(p: np.ndarray, graph: RegionGraph, steps: int = 1) -> np.ndarray:
    """p_G = T^steps p_θ: the neighbours' predictions carried by `steps` random-walk steps (1 in the paper)."""
    p = _check(p)
    if p.shape[0] != graph.n_regions:
        raise ConfigError(f"{p.shape[0]} region probabilities for a graph of {graph.n_regions} regions.")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}.")
    t = graph.transition()
    q = p
    for _ in range(steps):
        q = t @ q
    return np.asarray(q)


def combined_probabilities(p_feature: np.ndarray, p_geometry: np.ndarray) -> np.ndarray:
    """p_{θ,G} ∝ p_θ · p_G per region: the region and a random-walk neighbour carry the same label."""
    joint = _check(p_feature) * _check(p_geometry)
    total = joint.sum(1, keepdims=True)
    uniform = np.full_like(joint, 1.0 / joint.shape[1])
    return np.where(total > _EPS, joint / np.maximum(total, _EPS), uniform)


def region_uncertainty(p: np.ndarray, graph: RegionGraph | None = None, criterion: str = "entropy",
                       source: str = "combined", steps: int = 1) -> np.ndarray:
    """Score per region (higher = ask first) from (n, C) region probabilities.

    source: 'feature' (the classifier alone), 'geometry' (the neighbours' propagated prediction) or
    'combined' (both; the paper's criterion). The last two need the region graph.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion '{criterion}'; choose from {', '.join(CRITERIA)}.")
    if source not in SOURCES:
        raise ConfigError(f"unknown source '{source}'; choose from {', '.join(SOURCES)}.")
    p = _check(p)
    if source == "feature":
        return CRITERIA[criterion](p)
    if graph is None:
        raise ConfigError(f"source '{source}' needs the region graph.")
    p_geo = geometric_probabilities(p, graph, steps)
    return CRITERIA[criterion](p_geo if source == "geometry" else combined_probabilities(p, p_geo))


def pixel_geometric_probabilities(probs: np.ndarray, image: np.ndarray, spacing: Sequence[float] | None = None,
                                  sigma_appearance: float | None = None) -> np.ndarray:
    """p_G on the pixel grid: each pixel's 2·ndim neighbours' predictions, one random-walk step.

    probs: (C, *S) softmax; image: (*S) greyscale. Weight to a neighbour along axis a:
    exp(-ΔI² / 2σ_a²) · exp(-(spacing_a / min spacing − 1)²), so a thick-section neighbour counts less;
    σ_a defaults to the median |ΔI| over all neighbour pairs (the image's own contrast scale; `robust_scale`
    when that is 0). A pixel whose every weight underflows keeps its own prediction.
    """
    probs = np.asarray(probs, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    if probs.shape[1:] != image.shape:
        raise ConfigError(f"probabilities {probs.shape} do not match the image {image.shape}.")
    nd = image.ndim
    spacing = np.ones(nd) if spacing is None else np.asarray(spacing, float)
    diffs = [np.abs(np.diff(image.astype(np.float64), axis=a)) for a in range(nd)]
    if sigma_appearance is None:
        sigma_appearance = robust_scale(np.concatenate([d.ravel() for d in diffs]) if image.size > 1 else np.zeros(0))
    sigma = max(sigma_appearance, 1e-6)
    acc = np.zeros(probs.shape, np.float64)
    total = np.zeros(image.shape, np.float64)
    for a, d in enumerate(diffs):
        w = np.exp(-(d * d) / (2 * sigma * sigma)) * np.exp(-(spacing[a] / spacing.min() - 1) ** 2)
        lo = [slice(None)] * nd
        hi = [slice(None)] * nd
        lo[a], hi[a] = slice(None, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        # pixel at lo receives its neighbour at hi and vice versa, with the same symmetric weight
        acc[(slice(None),) + lo] += w * probs[(slice(None),) + hi]
        acc[(slice(None),) + hi] += w * probs[(slice(None),) + lo]
        total[lo] += w
        total[hi] += w
    # a pixel unlike all its neighbours (every weight underflowed) keeps its own prediction: no neighbour
    # evidence is not evidence of disagreement
    cut_off = total <= 1e-12
    out = acc / np.maximum(total, 1e-12)
    if cut_off.any():
        out[:, cut_off] = probs[:, cut_off]
    return out.astype(np.float32)



def pixel_uncertainty(probs: np.ndarray, image: np.ndarray | None = None, criterion: str = "entropy",
                      source: str = "combined", spacing: Sequence[float] | None = None,
                      sigma_appearance: float | None = None) -> np.ndarray:
    """Per-pixel score (*S) with pixels as instances (see the module doc); average it per region to rank them."""
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion '{criterion}'; choose from {', '.join(CRITERIA)}.")
    if source not in SOURCES:
        raise ConfigError(f"unknown source '{source}'; choose from {', '.join(SOURCES)}.")
    probs = np.asarray(probs, dtype=np.float32)
    flat = lambda p: p.reshape(p.shape[0], -1).T  # noqa: E731  (C, *S) → (N, C)
    if source == "feature":
        return CRITERIA[criterion](flat(probs)).reshape(probs.shape[1:])
    if image is None:
        raise ConfigError(f"source '{source}' needs the image (its graph's weights).")
    p_geo = pixel_geometric_probabilities(probs, image, spacing, sigma_appearance)
    q = p_geo if source == "geometry" else combined_probabilities(flat(probs), flat(p_geo)).T.reshape(probs.shape)
    return CRITERIA[criterion](flat(q)).reshape(probs.shape[1:])


@contextmanager
def dropout_active(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode except dropout layers, restored on exit (MC-dropout sampling)."""
    was_training = model.training
    model.eval()
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not drops:
        model.train(was_training)
        raise ConfigError("MC-dropout needs a model with dropout layers (e.g. unet(..., dropout=0.1)).")
    try:
        for m in drops:
            m.train()
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def mc_dropout_probabilities(model: nn.Module, images: torch.Tensor, passes: int = 8
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean softmax over `passes` dropout samples, per-pixel mutual information (BALD)), both on the input's device.

    images: (B, C, *S) → mean (B, K, *S), mutual information (B, *S) in nats.
    """
    if passes < 2:
        raise ConfigError(f"MC-dropout needs at least 2 passes, got {passes}.")
    total = None
    mean_entropy = None
    with dropout_active(model):
        for _ in range(passes):
            p = torch.softmax(model(images).float(), 1)
            h = -(p * p.clamp_min(_EPS).log()).sum(1)
            total = p if total is None else total + p
            mean_entropy = h if mean_entropy is None else mean_entropy + h
    mean = total / passes
    entropy_of_mean = -(mean * mean.clamp_min(_EPS).log()).sum(1)
    return mean, (entropy_of_mean - mean_entropy / passes).clamp_min(0)
