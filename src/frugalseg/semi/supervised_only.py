"""The supervised-only baseline of the semi-supervised methods: same split, same batches, no unlabelled data.

Every gain of DTC, co-training or the mean teacher is measured against this run: the same labelled set
(`SemiConfig`'s labelled_patients / labelled_fraction / labelled_ids), the same labelled blocks of the
shared batches (`semi.batches.SemiBatches` with `unlabelled_batch_size = 0`: the same patches,
augmentation, sampling and schedule), the same network family and the same evaluation
(`frugalseg.evaluation.evaluate`: Dice, Jaccard, HD95, ASD), 2D and 3D. The loss is the supervised term the
methods share (0.5 CE + 0.5 soft Dice by default). As in SSL4MIS's `train_fully_supervised_2D.py`, the
labelled batch size is the methods' (12 slices / 2 volumes), so the baseline sees as many labelled
samples per step as they do.

Its configuration (`SupervisedOnlyConfig`, `frugalseg train --semi none`) is in `frugalseg.stages.semi`.
`network="levelset"` trains DTC's dual-head network (its level-set head unused), which isolates what
DTC's two extra terms bring; the default `plain` is the U-Net / V-Net the other methods train.
`labelled_fraction=1` gives the fully supervised upper bound on the same schedule.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.losses import LossKind
from frugalseg.semi.step import SemiStep, segment, supervised_with_aux

__all__ = ["SupervisedOnlyStep"]


class SupervisedOnlyStep(SemiStep):
    """The supervised loss on the labelled blocks of the shared batches (no unlabelled samples in them).
    `model` may be DTC's dual-head network: its first output (segmentation) is trained."""

    kind: ClassVar[str] = "supervised"
    uses_unlabelled: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, loss: LossKind = "dice_ce", ignore_index: int = IGNORE_INDEX,
                 aux_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.loss, self.ignore_index, self.aux_weight = loss, ignore_index, aux_weight

    def terms(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        logits, aux = segment(self.model, batch["image"], self.aux_weight > 0)
        return {"loss": supervised_with_aux(logits, aux, batch["mask"], self.loss, self.aux_weight, self.ignore_index)}
