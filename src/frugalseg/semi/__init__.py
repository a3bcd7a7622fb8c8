"""Semi-supervised segmentation: labelled + unlabelled images.

- `sdf`: normalised signed distance maps (DTC's level-set targets), 2D/3D, per foreground class.
- `ramps`: the Gaussian consistency ramp-up shared by UA-MT, DTC and SSL4MIS.
- `dtc`: dual-task consistency (loss, labelled+unlabelled batches, Lightning module, `train_dtc`);
  import it as `frugalseg.semi.dtc` (it loads Lightning, so it is not imported here).
"""

from frugalseg.semi.ramps import consistency_weight, sigmoid_rampup
from frugalseg.semi.sdf import compute_sdf, sdf_targets, signed_distance_map

__all__ = ["compute_sdf", "consistency_weight", "sdf_targets", "sigmoid_rampup", "signed_distance_map"]
