"""The interface every semi-supervised method's step module shares, and the supervised term they share.

A method is a small `nn.Module` ("step") that holds its networks and computes the loss terms of one
mixed batch (`semi.batches.SemiBatches`: labelled samples first, then unlabelled ones):

- `terms(batch, step) -> {"loss": tensor, ...}`: the loss to minimise and every term worth logging
  (tensors or floats); `step` is the training iteration (0-based), which drives ramps and seeds;
- `after_step(step)`: called after optimiser step `step` (0-based), e.g. the mean teacher's EMA update;
- `predictor`: the network validated, evaluated and exported as `model/` (co-training: the ensemble);
- `trainable_parameters()`: what the optimiser updates (the mean teacher's teacher is not);
- `export(folder, spec, labels)` / `load_predictor(folder)`: the exported network(s) in a run folder;
- `checkpoint_extra()`: method facts stored beside the weights in each checkpoint;
- class attributes: `kind` (the checkpoint's kind), `needs_sdf` (batches carry signed distance maps),
  `uses_unlabelled` (False: labelled batches only).

Steps are plain PyTorch: usable from a notebook with any optimiser. `frugalseg.stages.semi` drives them
with Lightning (one module for every method: schedule, checkpoints, exact resume, validation); it
registers the step's networks under the step's own attribute names, so checkpoints hold `model.*`
(and `teacher.*`, `models.<k>.*`) whatever drives them.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.export import load_export, save_export
from frugalseg.losses import LossKind, segmentation_loss, soft_dice_loss
from frugalseg.models import first_output

__all__ = ["SemiStep", "segment", "supervised_loss", "supervised_with_aux"]


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, kind: LossKind = "dice_ce",
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """ce | dice_ce (0.5 CE + 0.5 soft Dice, SSL4MIS) | dice (soft Dice over all classes, closest to DTC's)."""
    if kind == "dice":
        return soft_dice_loss(logits, labels, ignore_index)
    return segmentation_loss(logits, labels, kind, ignore_index)


def segment(model: nn.Module, x: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, auxiliary logits or None) of a training forward pass. With `aux`, networks that have an
    auxiliary head (`models.segmenter.Segmenter.forward_train`: OCR's soft object regions, FCN's deep
    supervision) return both; every other network returns its first output and None."""
    if aux and hasattr(model, "forward_train"):
        return model.forward_train(x)
    return first_output(model(x)), None


def supervised_with_aux(logits: torch.Tensor, aux: torch.Tensor | None, labels: torch.Tensor, kind: LossKind,
                        aux_weight: float, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The supervised term with the auxiliary head's loss added at `aux_weight` (OCR: 0.4), as `frugalseg
    train` trains ocr / fcn."""
    loss = supervised_loss(logits, labels, kind, ignore_index)
    if aux is not None and aux_weight > 0:
        loss = loss + aux_weight * supervised_loss(aux, labels, kind, ignore_index)
    return loss


class SemiStep(nn.Module):
    """Base of the methods' step modules: one network `model`, exported as `model/` (see the module docstring)."""

    kind: ClassVar[str] = "semi"
    needs_sdf: ClassVar[bool] = False
    uses_unlabelled: ClassVar[bool] = True

    model: nn.Module

    def terms(self, batch: dict, step: int) -> dict[str, torch.Tensor | float]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after optimiser step `step` (0-based)."""

    @property
    def predictor(self) -> nn.Module:
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def export(self, folder: Path, spec: dict, labels: LabelSpec) -> None:
        save_export(self.predictor, spec, labels, Path(folder) / "model")

    @staticmethod
    def load_predictor(folder: Path) -> nn.Module:
        return load_export(Path(folder) / "model")[0]

    def checkpoint_extra(self) -> dict:
        return {}
