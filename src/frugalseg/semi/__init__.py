"""Semi-supervised segmentation: labelled + unlabelled images, one data module, one step module per method.

- `batches`: the shared data module: `SemiConfig` (fields every method shares), the labelled-set
  selection, `SemiBatches` (labelled + unlabelled batches, 2D slices or 3D patches, optional SDF
  targets), validation cases.
- `stage`: the shared Lightning module (`SemiModule`: validation, optimiser, resume) and the stage
  `train_semi(cfg, Method)`: fit, export, evaluate (`evaluate_semi`: Dice, Jaccard, HD95, ASD).
- the methods, each a config and a step module: `dtc` (dual-task consistency), `cotrain` (deep
  co-training, K models), `meanteacher`, `supervised_only` (the baseline on the same split and batches).
- `sdf`: normalised signed distance maps (DTC's level-set targets), 2D/3D, per foreground class.
- `ramps`: the Gaussian consistency ramp-up shared by UA-MT, DTC and SSL4MIS.

The method modules load Lightning, so they are not imported here; `methods()` maps the names of
`frugalseg train --semi` to (config class, train function).
"""

from frugalseg.semi.ramps import consistency_weight, sigmoid_rampup
from frugalseg.semi.sdf import compute_sdf, sdf_targets, signed_distance_map

__all__ = ["compute_sdf", "consistency_weight", "methods", "sdf_targets", "sigmoid_rampup", "signed_distance_map"]


def methods() -> dict:
    """{name: (config class, train function)} for `frugalseg train --semi NAME` (imports Lightning)."""
    from frugalseg.semi.cotrain import CoTrainConfig, train_cotrain
    from frugalseg.semi.dtc import DTCConfig, train_dtc
    from frugalseg.semi.meanteacher import MeanTeacherConfig, train_meanteacher
    from frugalseg.semi.supervised_only import SupervisedOnlyConfig, train_supervised_only

    return {
        "dtc": (DTCConfig, train_dtc),
        "cotrain": (CoTrainConfig, train_cotrain),
        "meanteacher": (MeanTeacherConfig, train_meanteacher),
        "none": (SupervisedOnlyConfig, train_supervised_only),
    }
