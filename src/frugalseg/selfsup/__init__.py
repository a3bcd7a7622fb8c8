"""Self-supervision: proxy-task pretraining without ImageNet, then mix-and-match tuning.

- `encoders`: the network being pretrained, as a list of feature maps (a timm backbone, or the encoder path of
  the project's medical U-Net), and how its weights are saved for `train --pretrained PATH`.
- `proxies`: colourisation (hue and chroma histograms from lightness, Larsson et al. 2017) and rotation
  prediction (Gidaris et al. 2018).
- `mixmatch`: Mix-and-Match tuning (Zhan et al. 2018): patches around seed pixels mixed across the batch,
  the class-wise graph of the official code, triplet loss on L2-normalised pooled features.

Plain modules and functions; the training loop and run directory are in `frugalseg.stages.pretrain`.
"""

from frugalseg.selfsup.encoders import Encoder, make_encoder
from frugalseg.selfsup.mixmatch import class_graph_triplets, sample_patches, triplet_loss
from frugalseg.selfsup.proxies import ColorizationHead, RotationHead, colorization_targets, rgb_to_lab

__all__ = ["ColorizationHead", "Encoder", "RotationHead", "class_graph_triplets", "colorization_targets",
           "make_encoder", "rgb_to_lab", "sample_patches", "triplet_loss"]
