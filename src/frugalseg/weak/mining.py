"""MCOF's bottom-up step: mine common object features over superpixels and expand object regions.

MCOF (Wang, You, Li & Ma, "Weakly-Supervised Semantic Segmentation by Iteratively Mining Common Object
Features", CVPR 2018) alternates a bottom-up and a top-down step. No code was published; this module
implements the bottom-up half from the paper's description, as plain functions a pipeline calls once per
round (and that read well in a notebook):

1. `superpixels`: over-segment each image (graph-based segmentation of Felzenszwalb & Huttenlocher, as in
   the paper; SLIC as an alternative).
2. `region_features`: one feature vector per superpixel, mean-pooled from a frozen ImageNet backbone's
   feature map over the superpixel's pixels (Fast-R-CNN-style pooling over arbitrary regions), optionally
   with its mean Lab colour and small per-channel Lab histograms. `backbone_features` computes the maps.
3. `label_superpixels`: a superpixel takes the majority seed label when that label covers at least
   `min_coverage` of it, else it stays unlabelled (-1).
4. `train_region_classifier` ("RegionNet"): one small classifier trained on the labelled superpixels of
   *all* images together, which is what makes the mined features *common* to a class across the dataset
   rather than particular to one image. `expand_regions` then relabels every superpixel of an image,
   choosing only among that image's tags and background.
5. Saliency-guided refinement (first round only in the paper): `frugalseg.weak.saliency.bayes_merge`.

`mine_round` ties these together. The top-down half is a segmentation network trained on the mined regions
(the `round` stage of `frugalseg.stages.pipeline`); here are the two rules that turn its output into the next
round's seeds: `restrict_to_tags` (its predictions, restricted to each image's tags) and `agreement` (only
where those agree with the round's mined regions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import felzenszwalb, slic
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.errors import DataError
from frugalseg.inference import model_device
from frugalseg.models.backbones import Backbone, create_backbone
from frugalseg.weak.saliency import _lab, _quantise, bayes_merge, manifold_ranking_saliency

log = logging.getLogger(__name__)

__all__ = [
    "superpixels",
    "backbone_features",
    "region_features",
    "pooling_matrix",
    "colour_features",
    "label_superpixels",
    "RegionClassifier",
    "train_region_classifier",
    "expand_regions",
    "mine_round",
]

SUPERPIXEL_METHODS = ("felzenszwalb", "slic")


# ---- 1. superpixels ------------------------------------------------------------------------------
def superpixels(
    image: np.ndarray,
    method: str = "felzenszwalb",
    *,
    scale: float = 50.0,
    sigma: float = 0.8,
    min_size: int | None = None,
    n_segments: int = 200,
    compactness: float = 10.0,
) -> np.ndarray:
    """A superpixel label map (H, W) int32 with labels 0..R-1 (every label used) of an RGB image.

    "felzenszwalb" (default, the graph-based segmentation MCOF uses): `scale` (higher = larger regions),
    `sigma` (pre-smoothing), `min_size` (smallest region in pixels; None = H*W / 1500, about 45 pixels at
    320x213). On MSRC-21 images (about 320x213) the defaults give roughly 90-320 regions, depending on how
    textured the image is. "slic": `n_segments` (a target, SLIC returns roughly that many) and `compactness`.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {image.shape}.")
    if method == "felzenszwalb":
        if min_size is None:
            min_size = max(10, round(image.shape[0] * image.shape[1] / 1500))
        seg = felzenszwalb(image, scale=scale, sigma=sigma, min_size=int(min_size))
    elif method == "slic":
        seg = slic(image, n_segments=n_segments, compactness=compactness, start_label=0)
    else:
        raise ValueError(f"unknown superpixel method '{method}'; choose one of {', '.join(SUPERPIXEL_METHODS)}.")
    _, seg = np.unique(seg, return_inverse=True)  # contiguous labels, whatever the method returned
    return seg.reshape(image.shape[:2]).astype(np.int32)


def _check_superpixels(sp: Any, name: str = "superpixels") -> np.ndarray:
    sp = np.asarray(sp.cpu() if isinstance(sp, torch.Tensor) else sp)
    if sp.ndim != 2:
        raise ValueError(f"{name} must be a label map (H, W), got shape {sp.shape}.")
    if not np.issubdtype(sp.dtype, np.integer):
        raise ValueError(f"{name} must hold integer region ids, got dtype {sp.dtype}.")
    if sp.size and sp.min() < 0:
        raise ValueError(f"{name} must hold region ids 0..R-1, found {int(sp.min())}.")
    return sp.astype(np.int64, copy=False)


def _num_regions(sp: np.ndarray) -> int:
    return int(sp.max()) + 1 if sp.size else 0


# ---- 2. features ---------------------------------------------------------------------------------
@torch.no_grad()
def backbone_features(
    images: Sequence[np.ndarray],
    backbone: Any = "tf_efficientnet_lite0",
    *,
    stages: Sequence[int] = (3, 4),
    output_stride: int = 16,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    pretrained: Any = True,
) -> list[torch.Tensor]:
    """Frozen ImageNet feature maps, one float32 CPU tensor (C, h, w) per RGB uint8 image, in order.

    `backbone`: a timm name (built with `create_backbone`, offline weights for tf_efficientnet_lite0..2)
    or a ready `frugalseg.models.backbones.Backbone`, whose outputs are then all used. `stages` picks the
    feature stages of a named backbone (lite0: 3 = 112 channels, 4 = 320 channels, both at stride 16 with
    the default `output_stride`); several stages are resized to the finest and concatenated. Images of the
    same size are batched together (`batch_size`); none is padded, so a map never sees padding. `device`:
    where the backbone runs (None: where its weights already are, the CPU for a new one).
    """
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, pretrained=pretrained, output_stride=output_stride,
                                   out_indices=tuple(int(s) for s in stages))
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a timm model name or a Backbone, got {type(backbone).__name__}.")
    dev = torch.device(device) if device is not None else model_device(backbone.model)
    model = backbone.model.to(dev).eval()
    mean = torch.tensor(backbone.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(backbone.std, device=dev).view(1, -1, 1, 1)
    arrays = [np.asarray(im) for im in images]
    for k, im in enumerate(arrays):
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"image {k} must be RGB (H, W, 3), got shape {im.shape}.")
    out: list[torch.Tensor | None] = [None] * len(arrays)
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, im in enumerate(arrays):
        by_size.setdefault(im.shape[:2], []).append(k)
    for idx in by_size.values():
        for start in range(0, len(idx), max(1, batch_size)):
            chunk = idx[start:start + max(1, batch_size)]
            x = torch.from_numpy(np.stack([arrays[k] for k in chunk])).to(dev)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            feats = model((x - mean) / std)
            size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])  # the finest stage
            feats = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                     for f in feats]
            fmap = torch.cat(feats, 1).float().cpu()
            for j, k in enumerate(chunk):
                out[k] = fmap[j].contiguous()
    return out  # type: ignore[return-value]


def _axis_weights(out_size: int, in_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source cells (out, 2) and weights (out, 2) along one axis.

    "bilinear" reproduces `F.interpolate(..., mode="bilinear", align_corners=False)` exactly (PyTorch's
    source index (dst + 0.5) * in / out - 0.5, clamped at 0); "area" gives each output position the one
    cell it falls in, floor(dst * in / out), with weight 1.
    """
    dst = np.arange(out_size, dtype=np.float64)
    if mode == "area":
        i0 = np.minimum((dst * in_size / out_size).astype(np.int64), in_size - 1)
        return np.stack([i0, i0], 1), np.stack([np.ones(out_size), np.zeros(out_size)], 1)
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = src - i0
    return np.stack([i0, i1], 1), np.stack([1.0 - l1, l1], 1)


def pooling_matrix(sp: np.ndarray, feature_size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Sparse (R, h*w) float32 matrix P with P @ f.reshape(C, -1).T = the per-region *sums* of f upsampled.

    Each pixel contributes its interpolation weights on the feature grid to its region's row, all pixels at
    once (one sparse COO build, duplicates summed): pooling over arbitrary regions without a loop over
    regions and without materialising the upsampled (C, H, W) map.
    """
    H, W = sp.shape
    h, w = feature_size
    ry, wy = _axis_weights(H, h, mode)
    rx, wx = _axis_weights(W, w, mode)
    R = _num_regions(sp)
    rows, cols, vals = [], [], []
    for a in range(2):
        for b in range(2):
            weight = wy[:, a, None] * wx[None, :, b]  # (H, W)
            keep = weight > 0
            rows.append(sp[keep])
            cols.append(np.broadcast_to(ry[:, a, None] * w + rx[None, :, b], (H, W))[keep])
            vals.append(weight[keep])
    idx = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
    vals_t = torch.from_numpy(np.concatenate(vals)).float()
    # the indices are valid by construction; saying so explicitly also keeps torch from warning
    return torch.sparse_coo_tensor(idx, vals_t, (R, h * w), check_invariants=False).coalesce()


def colour_features(image: np.ndarray, sp: np.ndarray, bins: int = 8) -> np.ndarray:
    """Per region (R, 3 + 3*bins) float32: mean Lab (L/100, a/100, b/100), then one `bins`-bin histogram per
    Lab channel (L over 0..100, a and b over -100..100, each summing to 1)."""
    sp = _check_superpixels(sp)
    image = np.asarray(image)
    if image.shape[:2] != sp.shape or image.ndim != 3:
        raise ValueError(f"image is {image.shape} but superpixels are {sp.shape}; they must be the same size (H, W).")
    R = _num_regions(sp)
    flat = sp.ravel()
    counts = np.maximum(np.bincount(flat, minlength=R), 1).astype(np.float64)
    lab = _lab(image).reshape(-1, 3)
    mean = np.stack([np.bincount(flat, lab[:, c], minlength=R) for c in range(3)], 1) / counts[:, None] / 100.0
    parts = [mean]
    if bins > 0:
        q = _quantise(lab, bins)
        for c in range(3):
            hist = np.bincount(flat * bins + q[:, c], minlength=R * bins).reshape(R, bins)
            parts.append(hist / counts[:, None])
    return np.concatenate(parts, 1).astype(np.float32)


def region_features(
    feature_map: torch.Tensor,
    superpixels: Any,
    *,
    image: np.ndarray | None = None,
    colour_bins: int = 8,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Mean feature per superpixel: (R, C), or (R, C + 3 + 3*colour_bins) with `image` given.

    `feature_map` (C, h, w) is pooled over each region of `superpixels` (H, W, ids 0..R-1) at image
    resolution. `mode="bilinear"` equals upsampling the map with `F.interpolate(bilinear,
    align_corners=False)` and averaging each region's pixels; `mode="area"` averages, over the region's
    pixels, the feature cell each pixel falls in. Either way a tiny region still gets a vector (an id with
    no pixel gets zeros). With `image` (RGB, H x W) the mean Lab colour and per-channel Lab histograms of
    `colour_features` are appended. The result is float32 on the feature map's device.
    """
    if not isinstance(feature_map, torch.Tensor):
        feature_map = torch.as_tensor(np.asarray(feature_map))
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be (C, h, w), got shape {tuple(feature_map.shape)}.")
    if mode not in ("bilinear", "area"):
        raise ValueError(f"mode must be 'bilinear' or 'area', got '{mode}'.")
    sp = _check_superpixels(superpixels)
    C, h, w = feature_map.shape
    R = _num_regions(sp)
    pool = pooling_matrix(sp, (h, w), mode).to(feature_map.device)
    flat = feature_map.detach().float().reshape(C, h * w).T  # (h*w, C)
    sums = torch.sparse.mm(pool, flat)  # (R, C)
    counts = torch.from_numpy(np.bincount(sp.ravel(), minlength=R)).to(sums)
    feats = sums / counts.clamp(min=1).unsqueeze(1)
    if image is not None:
        extra = torch.from_numpy(colour_features(image, sp, colour_bins)).to(feats)
        feats = torch.cat([feats, extra], 1)
    return feats


# ---- 3. labelled superpixels ---------------------------------------------------------------------
def label_superpixels(
    seed: np.ndarray,
    superpixels: Any,
    min_coverage: float = 0.5,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Per-region label (R,) int64, -1 = unlabelled, from a seed map (H, W) where `ignore_index` = unknown.

    A region takes the most frequent label among its seed pixels (ties: the smaller id) when that label's
    pixels are at least `min_coverage` of the region's *all* pixels (unknown ones included), so a region
    half covered by an unknown band needs a clear majority of known pixels to be labelled.
    """
    sp = _check_superpixels(superpixels)
    seed = np.asarray(seed)
    if seed.shape != sp.shape:
        raise ValueError(f"seed is {seed.shape} but superpixels are {sp.shape}; they must be the same size.")
    if not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}.")
    R = _num_regions(sp)
    s = seed.astype(np.int64).ravel()
    known = s != ignore_index
    if known.any() and (s[known].min() < 0 or s[known].max() > 255):
        raise ValueError(f"seed labels must be in 0..255, got {int(s[known].min())}..{int(s[known].max())}.")
    flat = sp.ravel()
    size = np.bincount(flat, minlength=R)
    table = np.bincount(flat[known] * 256 + s[known], minlength=R * 256).reshape(R, 256)
    best = table.argmax(1)
    best_count = table[np.arange(R), best]
    labelled = (best_count > 0) & (best_count >= min_coverage * size)
    return np.where(labelled, best, -1).astype(np.int64)


# ---- 4. RegionNet --------------------------------------------------------------------------------
class RegionClassifier(nn.Module):
    """Standardise the features (training mean/std), then a linear layer or a one-hidden-layer MLP."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(in_dim, num_classes)
        self.num_classes = num_classes
        self.in_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, allowed: Iterable[int] | None = None) -> torch.Tensor:
        """Class probabilities (N, K); with `allowed`, renormalised over those classes (others exactly 0)."""
        was = self.training
        self.eval()
        logits = self(x.to(self.mean))
        self.train(was)
        if allowed is not None:
            keep = torch.zeros(self.num_classes, dtype=torch.bool, device=logits.device)
            ids = sorted({int(c) for c in allowed})
            if ids:
                keep[ids] = True
            logits = logits.masked_fill(~keep, float("-inf"))
            if not ids:
                return torch.zeros_like(logits)
        return logits.softmax(1)


@dataclass
class TrainStats:
    regions: int
    per_class: dict[int, int]
    final_loss: float
    train_accuracy: float


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu()
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def train_region_classifier(
    features: Sequence[Any],
    labels: Sequence[Any],
    num_classes: int,
    *,
    hidden: int = 256,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    dropout: float = 0.0,
    class_balanced: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> RegionClassifier:
    """RegionNet: a classifier over the labelled superpixels of all images together.

    `features[i]` (R_i, D) and `labels[i]` (R_i,) per image, -1 = unlabelled (skipped). Adam for `steps`
    steps on random mini-batches of `batch_size` regions; with `class_balanced` the cross-entropy weighs
    each class by the inverse of its region count, so a few object superpixels are not drowned by hundreds
    of background ones. `hidden=0` gives a linear classifier. The same inputs and `seed` give the same
    classifier (its own generator; the global RNG state is left as it was). The training statistics are in
    `classifier.stats` (a `TrainStats`). Returns the classifier in eval mode on `device` (default CPU).
    """
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature arrays but {len(labels)} label arrays; give one of each per image.")
    if not features:
        raise ValueError("no images: give at least one image's region features and labels.")
    xs, ys = [], []
    dim = None
    for k, (f, y) in enumerate(zip(features, labels)):
        f = _as_tensor(f)
        y = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y), dtype=torch.long).reshape(-1)
        if f.ndim != 2:
            raise ValueError(f"features[{k}] must be (regions, dim), got shape {tuple(f.shape)}.")
        if f.shape[0] != y.shape[0]:
            raise ValueError(f"image {k}: {f.shape[0]} region features but {y.shape[0]} region labels.")
        if dim is None:
            dim = f.shape[1]
        elif f.shape[1] != dim:
            raise ValueError(f"image {k}: features have {f.shape[1]} dimensions, earlier images {dim}.")
        if (y >= num_classes).any() or (y < -1).any():
            bad = sorted({int(v) for v in y[(y >= num_classes) | (y < -1)].tolist()})[:5]
            raise ValueError(f"image {k}: region labels {bad} outside 0..{num_classes - 1} (and -1 = unlabelled).")
        keep = y >= 0
        xs.append(f[keep])
        ys.append(y[keep])
    x = torch.cat(xs)
    y = torch.cat(ys)
    if x.shape[0] == 0:
        raise ValueError("no labelled superpixel in any image: nothing to train the region classifier on "
                         "(lower min_coverage, or check that the seeds are not all unknown).")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    counts = torch.bincount(y, minlength=num_classes).float()
    if class_balanced:
        # inverse frequency, scaled so that the weights average 1 over the classes present; absent classes 0
        present = counts > 0
        weight = torch.where(present, counts.sum() / (counts.clamp(min=1) * present.sum()), torch.zeros_like(counts))
    else:
        weight = torch.ones(num_classes)

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = RegionClassifier(int(dim), num_classes, hidden=hidden, dropout=dropout)
        model.mean.copy_(x.mean(0))
        model.std.copy_(x.std(0, unbiased=False).clamp(min=1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1]))
        model.to(dev).train()
        xd, yd, wd = x.to(dev), y.to(dev), weight.to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        n = x.shape[0]
        loss = torch.zeros(())
        for _ in range(max(0, steps)):
            idx = torch.randint(n, (min(batch_size, n),), generator=gen).to(dev) if n > batch_size else slice(None)
            loss = F.cross_entropy(model(xd[idx]), yd[idx], weight=wd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xd).argmax(1) == yd).float().mean())
    model.stats = TrainStats(  # type: ignore[attr-defined]
        regions=int(n), per_class={int(c): int(v) for c, v in enumerate(counts.tolist()) if v > 0},
        final_loss=float(loss.detach()), train_accuracy=acc,
    )
    return model


def expand_regions(
    classifier: RegionClassifier,
    features: Any,
    superpixels: Any,
    tags: Iterable[int],
    *,
    background_index: int | None = 0,
    min_confidence: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Relabel every superpixel of one image: (label map (H, W) uint8, confidence (H, W) float32).

    Each region gets the classifier's most probable class among the image's `tags` plus `background_index`
    (probabilities renormalised over those allowed classes, so a class absent from the tags can never be
    chosen). Its pixels get that class and the renormalised probability as confidence; a region below
    `min_confidence` gets `ignore_index`. A tag whose class had no labelled region in training has only
    been pushed down as a negative, so it is rarely chosen: seeds should give every tagged class some
    labelled superpixels somewhere in the dataset. An image with no allowed class at all (no tags, no background)
    is all `ignore_index` with confidence 0.
    """
    sp = _check_superpixels(superpixels)
    feats = _as_tensor(features)
    R = _num_regions(sp)
    if feats.ndim != 2 or feats.shape[0] != R:
        raise ValueError(f"features are {tuple(feats.shape)} but the superpixel map has {R} regions; "
                         "give one feature row per region (R, dim).")
    allowed = {int(t) for t in tags}
    if background_index is not None:
        allowed.add(int(background_index))
    bad = sorted(c for c in allowed if not 0 <= c < classifier.num_classes)
    if bad:
        raise ValueError(f"class ids {bad} are outside the classifier's 0..{classifier.num_classes - 1}.")
    if not allowed:
        return np.full(sp.shape, ignore_index, np.uint8), np.zeros(sp.shape, np.float32)
    probs = classifier.probabilities(feats, allowed).cpu()
    conf, label = probs.max(1)
    label = label.numpy().astype(np.uint8)
    conf = conf.numpy().astype(np.float32)
    label[conf < min_confidence] = ignore_index
    return label[sp], conf[sp]


# ---- the round -----------------------------------------------------------------------------------
def _seed_coverage(maps: Sequence[np.ndarray], ignore_index: int) -> float:
    total = sum(m.size for m in maps)
    return float(sum(int((m != ignore_index).sum()) for m in maps) / total) if total else 0.0


def mine_round(
    images: Sequence[np.ndarray],
    seeds: Sequence[np.ndarray],
    tags: Sequence[Iterable[int]],
    feature_maps: Sequence[torch.Tensor],
    *,
    num_classes: int,
    background_index: int | None = 0,
    use_saliency: bool = False,
    superpixel_maps: Sequence[np.ndarray] | None = None,
    saliency_maps: Sequence[np.ndarray] | None = None,
    superpixel_method: str = "felzenszwalb",
    min_coverage: float = 0.5,
    min_confidence: float = 0.0,
    colour_bins: int = 8,
    use_colour: bool = True,
    classifier_options: dict[str, Any] | None = None,
    merge_options: dict[str, Any] | None = None,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    keep_seeds: bool = False,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """One bottom-up MCOF round over a set of images: seeds in, expanded object regions out.

    Per image: superpixels (or the given `superpixel_maps`, which a pipeline computes once and reuses
    every round), region features pooled from `feature_maps[i]` (C, h, w) plus colour when `use_colour`,
    and region labels from `seeds[i]` (H, W; `ignore_index` = unknown) by `label_superpixels`. One
    `RegionClassifier` is trained on the labelled regions of all images (`classifier_options` go to
    `train_region_classifier`), and `expand_regions` relabels every region within the image's `tags` +
    background. With `use_saliency` (MCOF: first round only) each map is then refined by `bayes_merge`
    with `saliency_maps[i]` or, when not given, `manifold_ranking_saliency` of the image
    (`merge_options` go to `bayes_merge`); it needs a background class.

    With `keep_seeds` the round only *expands*: pixels the seed labels keep that label and the region
    classifier fills the unknown (`ignore_index`) pixels, those below `min_confidence` staying unknown
    (MCOF: common object features "expand object regions"). Without it every superpixel is relabelled.

    Returns (one uint8 label map (H, W) per image, stats): the stats dict is JSON-ready (seed and output
    coverage, regions per image, labelled regions per class, classifier loss/accuracy, fraction of pixels
    changed by the saliency step).
    """
    n = len(images)
    for name, seq in (("seeds", seeds), ("tags", tags), ("feature_maps", feature_maps)):
        if len(seq) != n:
            raise ValueError(f"{n} images but {len(seq)} {name}; give one per image.")
    if superpixel_maps is not None and len(superpixel_maps) != n:
        raise ValueError(f"{n} images but {len(superpixel_maps)} superpixel maps.")
    if saliency_maps is not None and len(saliency_maps) != n:
        raise ValueError(f"{n} images but {len(saliency_maps)} saliency maps.")
    if use_saliency and background_index is None:
        raise ValueError("use_saliency needs a background class (saliency separates objects from background).")
    if n == 0:
        return [], {"images": 0}

    sps, feats, region_labels = [], [], []
    for k in range(n):
        image = np.asarray(images[k])
        seed_k = np.asarray(seeds[k])
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {k} must be RGB (H, W, 3), got shape {image.shape}.")
        if seed_k.shape != image.shape[:2]:
            raise ValueError(f"image {k}: the seed is {seed_k.shape} but the image is {image.shape[:2]}; "
                             "they must be the same size.")
        if superpixel_maps is None:
            sp = superpixels(image, superpixel_method)
        else:
            sp = _check_superpixels(superpixel_maps[k])
        if sp.shape != image.shape[:2]:
            raise ValueError(f"image {k}: superpixels are {sp.shape} but the image is {image.shape[:2]}.")
        sps.append(sp)
        feats.append(region_features(feature_maps[k], sp, image=image if use_colour else None,
                                     colour_bins=colour_bins).cpu())
        region_labels.append(label_superpixels(seed_k, sp, min_coverage, ignore_index=ignore_index))

    options = dict(classifier_options or {})
    options.setdefault("seed", seed)
    clf = train_region_classifier(feats, region_labels, num_classes, **options)

    outputs: list[np.ndarray] = []
    changed = []
    for k in range(n):
        label_map, _ = expand_regions(clf, feats[k], sps[k], tags[k], background_index=background_index,
                                      min_confidence=min_confidence, ignore_index=ignore_index)
        if keep_seeds:
            seed_k = np.asarray(seeds[k])
            label_map = np.where(seed_k != ignore_index, seed_k, label_map).astype(np.uint8)
        if use_saliency:
            image = np.asarray(images[k])
            sal = manifold_ranking_saliency(image) if saliency_maps is None else np.asarray(saliency_maps[k])
            merged = bayes_merge(sal, label_map, image, background_index=background_index,
                                 ignore_index=ignore_index, **(merge_options or {}))
            changed.append(float((merged != label_map).mean()))
            label_map = merged
        outputs.append(label_map)

    st = clf.stats  # type: ignore[attr-defined]
    stats: dict[str, Any] = {
        "images": n,
        "use_saliency": bool(use_saliency),
        "superpixels_per_image": float(np.mean([_num_regions(s) for s in sps])),
        "labelled_regions": st.regions,
        "labelled_fraction_of_regions": float(st.regions / max(1, sum(_num_regions(s) for s in sps))),
        "labelled_regions_per_class": {str(c): v for c, v in st.per_class.items()},
        "classifier": {"final_loss": round(st.final_loss, 6), "train_accuracy": round(st.train_accuracy, 6),
                       "feature_dim": int(feats[0].shape[1])},
        "seed_coverage": _seed_coverage([np.asarray(s) for s in seeds], ignore_index),
        "output_coverage": _seed_coverage(outputs, ignore_index),
        "changed_by_saliency": float(np.mean(changed)) if changed else None,
    }
    log.info("mining round: %d images, %d labelled regions, classifier accuracy %.3f",
             n, st.regions, st.train_accuracy)
    return outputs, stats


# ---- top-down -> next round's seeds ---------------------------------------------------------------
def restrict_to_tags(probs: torch.Tensor, tags: Iterable[int], background_index: int | None,
                     min_confidence: float = 0.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels (H, W) uint8 from a segmenter's class probabilities (K, H, W), with classes outside the image's
    `tags` (and background) forbidden: MCOF's "predictions restricted to image labels". Pixels whose
    probability, renormalised over the allowed classes, is below `min_confidence` become `ignore_index`."""
    allowed = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    allowed[list(tags)] = True
    if background_index is not None:
        allowed[background_index] = True
    probs = probs.masked_fill(~allowed[:, None, None], 0)
    conf, label = (probs / probs.sum(0, keepdim=True).clamp_min(1e-8)).max(0)
    label[conf < min_confidence] = ignore_index
    return label.to(torch.uint8)


def agreement(predictions: dict[str, np.ndarray], regions: dict[str, np.ndarray],
              ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """Top-down meets bottom-up: a pixel keeps its label where the segmenter's prediction and the mined region
    say the same class, and is unknown (255) where they disagree, for the next region classifier to decide."""
    out = {}
    for sid, pred in predictions.items():
        if sid not in regions:
            raise DataError(f"no mined region mask for {sid} to compare its prediction with.")
        out[sid] = np.where(pred == regions[sid], pred, ignore_index).astype(np.uint8)
    return out
