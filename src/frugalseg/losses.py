"""Losses for supervised segmentation with void pixels.

`segmentation_loss` is cross-entropy (ignore = 255) optionally plus soft Dice over the classes present
(SSL4MIS trains its U-Nets with 0.5 CE + 0.5 Dice), or the locally adaptive learning loss
(`LocallyAdaptiveLoss`, Guo et al. 2018); auxiliary outputs (OCR/FCN soft-region heads) add 0.4 x the same
loss, as in the OCR code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from frugalseg.data.labels import IGNORE_INDEX


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean over classes of soft Dice, void pixels masked out; works for 2D and 3D logits."""
    k = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(0, k - 1), k).movedim(-1, 1).float() * valid
    dims = tuple(d for d in range(probs.ndim) if d != 1)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: LossKind = "ce",
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`kind`: "ce", "dice_ce", or a `LocallyAdaptiveLoss` (its options travel with it)."""
    if not (target != ignore_index).any():  # a crop of pure void: no signal, but keep the graph
        return logits.sum() * 0.0
    if isinstance(kind, LocallyAdaptiveLoss):
        return kind(logits, target, ignore_index)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    if kind == "ce":
        return ce
    if kind == "dice_ce":
        return 0.5 * ce + 0.5 * soft_dice_loss(logits, target, ignore_index)
    raise ValueError(f"unknown loss '{kind}' (ce, dice_ce, or a LocallyAdaptiveLoss)")


# ---- locally adaptive learning loss -----------------------------------------------------------------------
def chessboard_gaussian(window: int, sigma: float, dims: int) -> torch.Tensor:
    """(window,)*dims weights exp(-d² / 2σ²) with d the chessboard (L∞) distance to the window centre."""
    r = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    grids = torch.meshgrid(*([r.abs()] * dims), indexing="ij")
    d = torch.stack(grids).amax(0)
    return torch.exp(-(d**2) / (2 * sigma**2))


#: Below this merged probability a window's cost continues as a straight line, -log(floor) + (floor - p̄) / floor,
#: instead of being clamped: a clamped cost has no gradient, yet with k = 5 it would dominate the pooled loss and
#: divide every other window's gradient by its size, so the hardest windows would push nothing.
LAL_FLOOR = 1e-8


def lal_window_costs(logits: torch.Tensor, target: torch.Tensor, window: int = 9, stride: int = 4,
                     sigma: float | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The cost -log p̄_c[c] of every (window, present class) of the batch, flattened (see `lal_loss`)."""
    dims = logits.ndim - 2
    if dims not in (2, 3):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W) logits, got shape {tuple(logits.shape)}")
    if window < 1 or window % 2 == 0 or stride < 1:
        raise ValueError(f"window must be odd (centred on a pixel) and stride >= 1; got {window}, {stride}")
    sigma = float(sigma) if sigma is not None else max(window / 3.0, 0.5)
    probs = torch.softmax(logits.float(), 1)
    valid = target != ignore_index
    classes = torch.unique(target[valid])  # only classes in the batch can have a window: fewer channels
    if classes.numel() == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    n = int(classes.numel())
    onehot = (target.unsqueeze(1) == classes.view(1, n, *([1] * dims))).float()
    true_prob = probs.index_select(1, classes) * onehot
    kernel = chessboard_gaussian(window, sigma, dims).to(logits.device)
    weight = kernel.expand(2 * n, 1, *kernel.shape).contiguous()
    conv = F.conv2d if dims == 2 else F.conv3d
    both = conv(torch.cat([true_prob, onehot], 1), weight, stride=stride, padding=window // 2,
                groups=2 * n)  # one depthwise pass: numerators, then denominators
    num, den = both[:, :n], both[:, n:]
    present = den > 1e-6 * float(kernel.min())
    merged = num[present] / den[present]
    # rounding must not make a cost negative (clamp at 1); below the floor the cost goes on as a line (LAL_FLOOR)
    return torch.where(merged > LAL_FLOOR, -torch.log(merged.clamp(LAL_FLOOR, 1.0)),
                       -math.log(LAL_FLOOR) + (LAL_FLOOR - merged) / LAL_FLOOR)


def lal_loss(logits: torch.Tensor, target: torch.Tensor, window: int = 9, stride: int = 4, sigma: float | None = None,
             k: float = 5.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Locally adaptive learning loss (Guo et al., arXiv 1802.08290), 2D (B, C, H, W) or 3D (B, C, D, H, W).

    An odd `window`-sided window, centred on every `stride`-th pixel, slides over the predicted probabilities.
    Inside each window, the probability vectors of the pixels of each class c present are merged with Gaussian
    weights on their chessboard distance to the window centre, p̄_c = Σ_{y_i=c} w_i p_i / Σ_{y_i=c} w_i, and
    the window costs -log p̄_c[c]. All window costs of the batch are Minkowski-pooled, (mean ℓ^k)^(1/k): k = 1 is their mean,
    larger k weighs hard windows more (k = 5 was best on VOC 2012). A pixel no longer pays alone: a window is
    cheap when its pixels of a class are right on average, so the loss adapts to local context; small objects
    get their own windows and are not drowned by the background's pixel count.

    Only p̄_c[c] is needed, so each class is two channels of one depthwise convolution with the Gaussian
    kernel: of 1[y=c]·p[c] and of 1[y=c] (no loop over windows). Windows are zero-padded by window // 2 at the borders;
    void pixels belong to no class. window 1, stride 1 and k 1 give pixel-wise cross-entropy.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0; got {k}")
    cost = lal_window_costs(logits, target, window, stride, sigma, ignore_index)
    if cost.numel() == 0:
        return logits.sum() * 0.0
    # the tiny offset keeps the root's gradient finite when every window is perfect (all costs 0)
    return (cost.pow(k).mean() + 1e-12).pow(1.0 / k)


@dataclass(frozen=True)
class LocallyAdaptiveLoss:
    """`lal_loss` with its options, passed where a loss kind goes (`segmentation_loss(..., kind=...)`)."""

    window: int = 9
    stride: int = 4
    sigma: float | None = None
    k: float = 5.0

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        return lal_loss(logits, target, self.window, self.stride, self.sigma, self.k, ignore_index)


#: What `segmentation_loss` takes as its kind: a loss name ("ce", "dice_ce", "dice"), or the LAL with its options.
LossKind = str | LocallyAdaptiveLoss
