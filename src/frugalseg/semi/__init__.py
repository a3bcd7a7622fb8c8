"""Semi-supervised segmentation: labelled + unlabelled images, one data module, one step module per method.

Plain PyTorch, usable from a notebook; the stage that trains them (configuration, Lightning, run
directory, exact resume, evaluation) is `frugalseg.stages.semi` (`frugalseg train --semi NAME`).

- `batches`: the shared data module: the labelled-set selection (`select_labelled`), `SemiBatches`
  (labelled + unlabelled batches, 2D slices or 3D patches, optional SDF targets), `split_batch`.
- `step`: the interface of a method's step module (`SemiStep`: `terms(batch, step)`, `after_step`,
  `predictor`, `trainable_parameters`, export) and the supervised loss the methods share.
- the methods, each a loss and a step module: `dtc` (dual-task consistency, `DTCStep`), `cotrain` (deep
  co-training, K models, `CoTrainStep`), `meanteacher` (`MeanTeacherStep`), `supervised_only` (the
  baseline on the same split and batches, `SupervisedOnlyStep`).
- `adversarial`: FGSM and VAT inputs (co-training's diversity term).
- `sdf`: normalised signed distance maps (DTC's level-set targets), 2D/3D, per foreground class.
- `ramps`: the Gaussian consistency ramp-up shared by UA-MT, DTC and SSL4MIS.
"""

from frugalseg.semi.ramps import consistency_weight, sigmoid_rampup
from frugalseg.semi.sdf import compute_sdf, sdf_targets, signed_distance_map

__all__ = ["compute_sdf", "consistency_weight", "sdf_targets", "sigmoid_rampup", "signed_distance_map"]
