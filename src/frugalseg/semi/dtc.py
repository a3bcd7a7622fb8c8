"""Dual-task consistency (DTC; Luo, Chen, Song, Wang, AAAI 2021, arXiv 2009.04448), 2D and 3D,
binary and multi-class.

One network, two heads (`frugalseg.models.levelset`): segmentation logits and a tanh level-set map per
foreground class. The level-set map is turned back into a soft mask by the differentiable transform
`sigmoid(-k · sdf)` (k = 1500, a near-Heaviside step); the two tasks must agree on every image, so
unlabelled images train the network through that agreement. The loss of one batch, as the official
code (train_la_dtc.py) computes it:

    L = L_seg(labelled) + β · MSE(sdf_pred, sdf_true)(labelled) + λ(t) · MSE(sigmoid(-k·sdf_pred), p_fg)(all)

with β = 0.3 and λ(t) = 1.0 · exp(-5 (1 - (t // 150) / 40)^2) (`frugalseg.semi.ramps`; 2D runs
default to SSL4MIS's 0.1 and 200, see `frugalseg.stages.semi.DTCConfig`). Differences from the reference, each deliberate:

- Multi-class: softmax over K classes; one level-set channel and one consistency term per foreground
  class (the maintainer's one-vs-rest answer, DTC#5/#16). Binary is K = 2 (softmax[1] = sigmoid(b-a),
  the reference's single sigmoid channel).
- L_seg defaults to 0.5·CE + 0.5·soft Dice (`frugalseg.losses`: SSL4MIS's supervised loss, also what
  some DTC forks use); the official LA script uses its squared-denominator Dice alone (`loss="dice"`
  is the closest option: soft Dice over all classes, not squared).
- Void pixels (255) of labelled images are left out of L_seg and of the SDF regression; the
  consistency term covers every pixel of every image, labelled or not, as in the reference. It is not
  detached: its gradient reaches both heads.

Data, schedule, resume and evaluation are the ones every semi-supervised method shares
(`frugalseg.semi.batches`, `frugalseg.stages.semi`, `frugalseg.evaluation`): batches hold `labelled_batch_size` labelled then
`unlabelled_batch_size` unlabelled samples (the reference's TwoStreamBatchSampler), with `labelled`
(B,) bool — **the flag is authoritative**; when a caller passes no flag to `dtc_loss`, a sample counts
as labelled if any of its pixels is not 255 — and `sdf` (B, K-1, *patch), the ground-truth maps of the
augmented masks computed in the data workers (zeros on unlabelled rows). 2D (ACDC, SSL4MIS) trains on
slices resized to the patch (default 256×256) after SSL4MIS's rot90/flip or ±20° rotation and is
validated slice by slice; 3D (LA, UA-MT/DTC) trains on random crops (default 112×112×80, in the array's
axis order) after DTC's RandomRotFlip and is validated by MONAI sliding-window inference over the same
window. The labelled set is the first N patients of the list (the SSL4MIS/DTC protocol), listed ids, or
a seeded random fraction of the patients. The model evaluated is the last one, as the DTC maintainer
does (DTC#14); no model is picked on the validation split.

Read top to bottom: the transform, the loss, the step module (`DTCStep`: a `LevelSetNet` trained
with `dtc_loss`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.losses import LossKind
from frugalseg.semi.ramps import DTC_CONSISTENCY, DTC_RAMPUP, RAMPUP_EVERY, consistency_weight
from frugalseg.semi.sdf import sdf_targets
from frugalseg.semi.step import SemiStep, supervised_loss

__all__ = ["DTCStep", "K_TRANSFORM", "SDF_WEIGHT", "dtc_loss", "infer_labelled", "sdf_to_mask"]

K_TRANSFORM = 1500.0  # k of the transform sigmoid(-k·sdf), same in training and testing (train_la_dtc.py)
SDF_WEIGHT = 0.3  # β, `--beta`


# ---- the transform and the loss -----------------------------------------------------------------
def sdf_to_mask(sdf: torch.Tensor, k: float = K_TRANSFORM) -> torch.Tensor:
    """DTC's differentiable task transform T⁻¹(z) = sigmoid(-k z): level-set map → soft mask."""
    return torch.sigmoid(-k * sdf)


def infer_labelled(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B,) bool: a sample is labelled if any pixel of its mask is not void."""
    return (labels != ignore_index).flatten(1).any(1)


def dtc_loss(
    seg_logits: torch.Tensor,
    sdf_pred: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor | None = None,
    step: int = 0,
    *,
    sdf_target: torch.Tensor | None = None,
    k: float = K_TRANSFORM,
    beta: float = SDF_WEIGHT,
    consistency: float = DTC_CONSISTENCY,
    rampup: float = DTC_RAMPUP,
    rampup_every: int = RAMPUP_EVERY,
    seg_loss: LossKind = "dice_ce",
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """DTC loss terms of one mixed batch.

    seg_logits (B, K, *S); sdf_pred (B, K-1, *S), already tanh'ed; labels (B, *S) int with 255 = void;
    labelled_mask (B,) bool (None: inferred from the labels); step = training iteration (for λ);
    sdf_target (B, K-1, *S) ground-truth maps (rows of unlabelled samples are ignored; None: computed
    here on the CPU with `compute_sdf`).

    Returns `loss` (the total), `loss_seg`, `loss_sdf` (both 0 without labelled samples),
    `loss_consistency` and `consistency_weight` (λ(step)), all tensors.
    """
    b, kc = seg_logits.shape[:2]
    spatial = tuple(seg_logits.shape[2:])
    if kc < 2:
        raise ValueError(f"DTC needs at least 2 segmentation channels (softmax over K classes), got {kc}.")
    if tuple(sdf_pred.shape) != (b, kc - 1, *spatial):
        raise ValueError(f"sdf_pred shape {tuple(sdf_pred.shape)} should be {(b, kc - 1, *spatial)} "
                         "(one map per foreground class).")
    if tuple(labels.shape) != (b, *spatial):
        raise ValueError(f"labels shape {tuple(labels.shape)} should be {(b, *spatial)}.")
    seg_logits = seg_logits.float()
    sdf_pred = sdf_pred.float()
    labelled = infer_labelled(labels, ignore_index) if labelled_mask is None else labelled_mask.bool()
    labelled = labelled.to(seg_logits.device)
    zero = seg_logits.sum() * 0.0 + sdf_pred.sum() * 0.0  # keeps the graph when a term is absent

    if labelled.any():
        lab_logits, lab_labels = seg_logits[labelled], labels[labelled].long()
        if not (lab_labels != ignore_index).any():
            loss_seg = zero
        else:
            loss_seg = supervised_loss(lab_logits, lab_labels, seg_loss, ignore_index)
        if sdf_target is None:
            target = sdf_targets(lab_labels, kc, ignore_index)
        else:
            target = sdf_target.to(sdf_pred.device)[labelled]
        valid = (lab_labels != ignore_index).unsqueeze(1).expand_as(target)
        diff = (sdf_pred[labelled] - target.float()) ** 2
        loss_sdf = diff[valid].mean() if valid.any() else zero
    else:
        loss_seg = loss_sdf = zero

    # Consistency on every image: the transformed level set against the foreground probabilities.
    probs_fg = seg_logits.softmax(1)[:, 1:]
    loss_cons = ((sdf_to_mask(sdf_pred, k) - probs_fg) ** 2).mean()
    lam = consistency_weight(step, consistency, rampup, rampup_every)
    loss = loss_seg + beta * loss_sdf + lam * loss_cons
    return {
        "loss": loss,
        "loss_seg": loss_seg,
        "loss_sdf": loss_sdf,
        "loss_consistency": loss_cons,
        "consistency_weight": torch.tensor(lam, device=loss.device),
    }


# ---- the step module -------------------------------------------------------------------------------------
class DTCStep(SemiStep):
    """Trains a `LevelSetNet` (segmentation + level-set heads) with `dtc_loss` on the shared batches, which
    carry the ground-truth signed distance maps (`needs_sdf`). Class 0 must be the background."""

    kind: ClassVar[str] = "dtc"
    needs_sdf: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, k: float = K_TRANSFORM, beta: float = SDF_WEIGHT,
                 consistency: float = DTC_CONSISTENCY, rampup: float = DTC_RAMPUP, rampup_every: int = RAMPUP_EVERY,
                 seg_loss: LossKind = "dice_ce", ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.model = model
        self.k, self.beta, self.seg_loss, self.ignore_index = k, beta, seg_loss, ignore_index
        self.consistency, self.rampup, self.rampup_every = consistency, rampup, rampup_every

    def terms(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        seg, sdf = self.model(batch["image"])
        return dtc_loss(
            seg, sdf, batch["mask"], batch.get("labelled"), step, sdf_target=batch.get("sdf"), k=self.k,
            beta=self.beta, consistency=self.consistency, rampup=self.rampup, rampup_every=self.rampup_every,
            seg_loss=self.seg_loss, ignore_index=self.ignore_index,
        )
