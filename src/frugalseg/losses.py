"""Losses for supervised segmentation with void pixels.

`segmentation_loss` is cross-entropy (ignore = 255) optionally plus soft Dice over the classes present
(SSL4MIS trains its U-Nets with 0.5 CE + 0.5 Dice); auxiliary outputs (OCR/FCN soft-region heads) add
0.4 x the same loss, as in the OCR code.
"""

from __future__ import annotations

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


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    if not (target != ignore_index).any():  # a crop of pure void: no signal, but keep the graph
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    if kind == "ce":
        return ce
    if kind == "dice_ce":
        return 0.5 * ce + 0.5 * soft_dice_loss(logits, target, ignore_index)
    raise ValueError(f"unknown loss '{kind}' (ce, dice_ce)")
