"""Dual-task (segmentation + level-set) networks for DTC, on the MONAI U-Net / V-Net of `medical.py`.

DTC's V-Net (networks/vnet_sdf.py) ends with two 1×1×1 convolutions reading the same last decoder
feature: one gives segmentation logits, the other, through tanh, a level-set (signed distance) map.
`LevelSetNet` does the same for any backbone that returns a feature map:

- segmentation head: 1×1 conv → K logits (softmax over K classes; binary = K 2, equivalent to the
  reference's single sigmoid channel since softmax([a, b])[1] = sigmoid(b - a));
- level-set head: 1×1 conv → tanh, one map per foreground class (K-1 channels), matching
  `frugalseg.semi.sdf.compute_sdf` (negative inside, positive outside).

`forward` returns `(seg_logits, sdf)`, segmentation first, so `frugalseg.inference` (which reads a
multi-output network through its first output) predicts with it unchanged. (The reference returns the
level-set map first.)

How the shared feature is obtained:

- V-Net (`levelset_vnet3d`): MONAI's `VNet` exposes its blocks as attributes, so its output transition
  (5³ conv + BN + act + 1×1 conv to the classes) is replaced by the identity and the heads read the
  last decoder block's 32-channel activated feature (DTC reads its last 16-channel decoder block).
- U-Net (`levelset_unet2d`, `levelset_unet3d`): MONAI's `UNet` is a nested `Sequential` whose decoder
  features are not exposed. The common trick is used instead: the network is built with
  `out_channels = hidden` (default channels[0], 16 like DTC's feature) and followed by BatchNorm + PReLU
  (MONAI's top decoder layer ends with a bare convolution), giving a shared final feature layer that
  both 1×1 heads read.

Inputs of any size work: the backbones are wrapped in `PadToMultiple` (zero padding to a multiple of
2^depth, features cropped back before the heads).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from frugalseg.errors import ConfigError
from frugalseg.models.medical import unet, vnet3d

__all__ = ["LEVELSET_ARCHS", "LevelSetNet", "build_levelset", "levelset_unet2d", "levelset_unet3d", "levelset_vnet3d"]

LEVELSET_ARCHS = ("levelset_unet2d", "levelset_unet3d", "levelset_vnet3d")


class LevelSetNet(nn.Module):
    """features(x) → (segmentation logits (B, K, ...), tanh level-set maps (B, K-1, ...))."""

    def __init__(self, features: nn.Module, feature_channels: int, num_classes: int, spatial_dims: int):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"A level-set network needs at least 2 classes (background + one), got {num_classes}.")
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.features = features
        self.seg_head = conv(feature_channels, num_classes, kernel_size=1)
        self.sdf_head = conv(feature_channels, num_classes - 1, kernel_size=1)
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.seg_head(f), torch.tanh(self.sdf_head(f))


def _feature_layer(hidden: int, spatial_dims: int) -> nn.Sequential:
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    return nn.Sequential(norm(hidden), nn.PReLU())


def levelset_unet(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    hidden: int | None = None,
    dropout: float = 0.0,
) -> LevelSetNet:
    """Dual-task U-Net: `medical.unet` with `hidden` output channels, a shared feature layer, then the heads."""
    hidden = int(hidden or channels[0])
    features = nn.Sequential(unet(spatial_dims, in_channels, hidden, channels, dropout), _feature_layer(hidden, spatial_dims))
    return LevelSetNet(features, hidden, num_classes, spatial_dims)


def levelset_unet2d(in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256),
                    hidden: int | None = None, dropout: float = 0.0) -> LevelSetNet:
    """2D dual-task U-Net."""
    return levelset_unet(2, in_channels, num_classes, channels, hidden, dropout)


def levelset_unet3d(in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256),
                    hidden: int | None = None, dropout: float = 0.0) -> LevelSetNet:
    """3D dual-task U-Net: a lighter alternative to the V-Net."""
    return levelset_unet(3, in_channels, num_classes, channels, hidden, dropout)


def levelset_vnet3d(in_channels: int, num_classes: int, dropout: float = 0.5) -> LevelSetNet:
    """3D dual-task V-Net (MONAI VNet from `medical.vnet3d`; heads on its last 32-channel decoder block)."""
    padded = vnet3d(in_channels, 2, dropout=dropout)
    padded.net.out_tr = nn.Identity()  # VNet.forward ends with `self.out_tr(x)`: now the decoder feature
    return LevelSetNet(padded, 32, num_classes, 3)


def build_levelset(spec: dict) -> LevelSetNet:
    """Rebuild a dual-task network from its spec: arch (one of LEVELSET_ARCHS), num_classes, in_chans,
    and channels / hidden / dropout where they apply."""
    arch = spec["arch"]
    in_chans = int(spec.get("in_chans", 1))
    k = int(spec["num_classes"])
    if arch in ("levelset_unet2d", "levelset_unet3d"):
        return levelset_unet(int(arch[-2]), in_chans, k, tuple(spec.get("channels", (16, 32, 64, 128, 256))),
                             spec.get("hidden"), float(spec.get("dropout", 0.0)))
    if arch == "levelset_vnet3d":
        return levelset_vnet3d(in_chans, k, float(spec.get("dropout", 0.5)))
    raise ConfigError(f"Unknown level-set architecture '{arch}' ({', '.join(LEVELSET_ARCHS)}).")
