"""The supervised-only baseline of the semi-supervised methods: same split, same batches, no unlabelled data.

Every gain of DTC, co-training or the mean teacher is measured against this run: the same labelled set
(`SemiConfig`'s labelled_patients / labelled_fraction / labelled_ids), the same labelled blocks of the
shared batches (`semi.batches.SemiBatches` with `unlabelled_batch_size = 0`: the same patches,
augmentation, sampling and schedule), the same network family and the same evaluation
(`semi.stage.evaluate_semi`: Dice, Jaccard, HD95, ASD), 2D and 3D. The loss is the supervised term the
methods share (0.5 CE + 0.5 soft Dice by default). As in SSL4MIS's `train_fully_supervised_2D.py`, the
labelled batch size is the methods' (12 slices / 2 volumes), so the baseline sees as many labelled
samples per step as they do.

`network="levelset"` trains DTC's dual-head network (its level-set head unused), which isolates what
DTC's two extra terms bring; the default `plain` is the U-Net / V-Net the other methods train.
`labelled_fraction=1` gives the fully supervised upper bound on the same schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from frugalseg.data.labels import LabelSpec
from frugalseg.errors import ConfigError
from frugalseg.semi.batches import SemiConfig
from frugalseg.semi.stage import SemiModule, first_output, supervised_loss, train_semi

log = logging.getLogger(__name__)

__all__ = ["SupervisedOnlyConfig", "SupervisedOnlyModule", "train_supervised_only"]


@dataclass
class SupervisedOnlyConfig(SemiConfig):
    """Labelled batches only (`frugalseg train --semi none`). It accepts the other methods' options, so the
    same command line with only `--semi` changed gives the baseline; `unlabelled_batch_size` is set to 0
    (and saved so in config.yaml)."""

    SEMI: ClassVar[str] = "none"
    semi: str = "none"
    out: str = "runs/supervised_only"
    network: Literal["plain", "levelset"] = "plain"

    def resolved(self, dims: int) -> "SupervisedOnlyConfig":
        cfg = super().resolved(dims)
        if cfg.unlabelled_batch_size:
            log.info("supervised-only baseline: labelled batches only (unlabelled_batch_size %d → 0).",
                     cfg.unlabelled_batch_size)
        cfg.unlabelled_batch_size = 0
        return cfg

    def validate(self) -> "SupervisedOnlyConfig":
        if self.network not in ("plain", "levelset"):
            raise ConfigError(f"network must be plain or levelset, got '{self.network}'.")
        super().validate()
        return self


class SupervisedOnlyModule(SemiModule):
    """The supervised loss on the labelled blocks of the shared batches."""

    kind: ClassVar[str] = "supervised"
    uses_unlabelled: ClassVar[bool] = False

    def __init__(self, model: nn.Module, labels: LabelSpec, cfg: SupervisedOnlyConfig, model_spec: dict):
        super().__init__(labels, cfg, model_spec)
        self.model = model

    @classmethod
    def levelset(cls, cfg) -> bool:
        return getattr(cfg, "network", "plain") == "levelset"

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = first_output(self.model(batch["image"]))
        loss = supervised_loss(logits, batch["mask"], self.cfg.loss, self.labels.ignore_index)
        self.log_terms({"loss": loss}, batch["image"].shape[0])
        return loss


def train_supervised_only(cfg: SupervisedOnlyConfig) -> dict:
    """Train the supervised-only baseline in `cfg.out`, export, evaluate (`semi.stage.train_semi`)."""
    return train_semi(cfg, SupervisedOnlyModule)
