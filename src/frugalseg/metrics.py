"""Segmentation metrics from one confusion matrix.

Rules (tested on hand-computed cases):
- pixels whose truth is the ignore index are excluded entirely, whatever was predicted there;
- a prediction outside 0..K-1 (never produced by argmax) is an error, not silently dropped;
- per-class IoU = TP / (TP + FP + FN); a class absent from both prediction and truth over the whole
  evaluation has IoU = NaN and is left out of the mean (it was neither found nor missed);
- a class present in the truth but never predicted has IoU 0 and counts;
- Dice = 2TP / (2TP + FP + FN) with the same NaN rule; `mean_dice(skip_background=True)` is the medical
  convention (mean over foreground classes).
The metric is a `torchmetrics.Metric` so the confusion matrix is summed across processes under DDP.
Surface distances (HD95, ASD) live in `surface_metrics.py`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchmetrics import Metric

from frugalseg.data.labels import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 matrix, rows = truth, columns = prediction, over valid pixels."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"truth holds ids outside 0..{num_classes - 1} (and {ignore_index} = void)")
    if p.numel() and (int(p.max()) >= num_classes or int(p.min()) < 0):
        raise ValueError(f"prediction holds ids outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    cm = cm.double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1) - tp
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))


def dice_per_class(cm: torch.Tensor) -> torch.Tensor:
    cm = cm.double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1)
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))


def nanmean(values: torch.Tensor) -> float:
    v = values[~torch.isnan(values)]
    return float(v.mean()) if v.numel() else float("nan")


class ConfusionMatrix(Metric):
    """Accumulates a confusion matrix over batches of (logits or ids, truth)."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("cm", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.is_floating_point() and pred.ndim == target.ndim + 1:
            pred = pred.argmax(1)
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index).to(self.cm.device)

    def compute(self) -> torch.Tensor:
        return self.cm


def summarise(cm: torch.Tensor, names: Sequence[str], background: int | None = 0) -> dict:
    """The JSON-ready metrics of a confusion matrix: mIoU, per-class IoU/Dice, pixel accuracy."""
    iou = iou_per_class(cm)
    dice = dice_per_class(cm)
    fg = [i for i in range(len(names)) if i != background]
    total = int(cm.sum())

    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(float(x), 6)

    return {
        "miou": clean(nanmean(iou)),
        "mean_dice": clean(nanmean(dice)),
        "mean_dice_foreground": clean(nanmean(dice[fg])) if fg else None,
        "pixel_accuracy": clean(float(cm.diag().sum()) / total) if total else None,
        "pixels": total,
        "per_class": {
            n: {"iou": clean(float(iou[i])), "dice": clean(float(dice[i])), "pixels": int(cm[i].sum())}
            for i, n in enumerate(names)
        },
        "rules": "ignore pixels excluded; classes absent from truth and prediction are null and left out of means",
    }
