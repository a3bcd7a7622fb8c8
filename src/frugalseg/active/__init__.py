"""Active learning: what to annotate next (Konyushkova, Sznitman, Fua: geometry in active learning).

Plain functions over numpy arrays (and a torch model for MC-dropout), usable from a notebook:

- `geometry`: SLIC superpixels / supervoxels and their adjacency graph (`region_graph`), edge weights
  falling with distance and appearance difference, random-walk transitions.
- `acquisition`: per-region uncertainty: entropy, margin, least confidence and the multi-class
  `selection_entropy` / `conditional_entropy`, from the classifier (`feature`), the neighbours
  (`geometry`) or both (`combined`); MC-dropout mutual information as the epistemic baseline.
- `selection`: a round's batch of regions, no two adjacent (`select_regions`), and the random baseline.
- `planes`: 3D queries on one planar patch, found by branch-and-bound over orientations, and the patch
  resampled as a 2D slice for the annotator.
"""

from frugalseg.active.acquisition import CRITERIA, mc_dropout_probabilities, region_uncertainty
from frugalseg.active.geometry import RegionGraph, region_graph, region_means, superpixels, supervoxels
from frugalseg.active.planes import PlaneQuery, best_planar_query, branch_and_bound_plane, exhaustive_plane
from frugalseg.active.selection import RegionQuery, random_regions, select_regions

__all__ = [
    "CRITERIA", "PlaneQuery", "RegionGraph", "RegionQuery", "best_planar_query", "branch_and_bound_plane",
    "exhaustive_plane", "mc_dropout_probabilities", "random_regions", "region_graph", "region_means",
    "region_uncertainty", "select_regions", "superpixels", "supervoxels",
]
