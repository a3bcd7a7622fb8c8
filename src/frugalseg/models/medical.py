"""Medical networks: a 2D U-Net for slice-wise segmentation and a 3D V-Net for volumes.

Both are MONAI's implementations (use, don't rewrite), imported lazily so the natural-image parts of
frugalseg work without the `medical` extra. MONAI's U-Net and V-Net need every spatial size to be a
multiple of 2^depth (16 here); real slices are not (ACDC slices are e.g. 256×232 or 224×154). Each
factory therefore wraps the network in `PadToMultiple`, which zero-pads the input and crops the logits
back, so any input size works at training and inference time.

- `unet2d`: MONAI `UNet` (strided-conv encoder, transposed-conv decoder, 2 residual units per level,
  MONAI's default instance norm), channels (16, 32, 64, 128, 256) like the SSL4MIS U-Net.
- `vnet3d`: MONAI `VNet` (Milletari et al. 2016), the network family of the UA-MT/DTC LA protocol;
  `dropout` (default 0.5, as DTC's `has_dropout=True`) acts in the deepest down/up transitions.
  MONAI follows the original paper (5×5×5 convolutions, about 45.6M parameters for one input channel
  and two classes); the UA-MT/DTC code uses a lighter 3×3×3 variant, so results follow their protocol
  but not their exact architecture. A DTC-style second (signed-distance) head belongs to the method.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.errors import ConfigError, require

__all__ = ["PadToMultiple", "unet2d", "vnet3d"]


class PadToMultiple(nn.Module):
    """Run `net` on an input zero-padded to a multiple of `multiple` per spatial axis, crop the output."""

    def __init__(self, net: nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = int(multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        extra = [(-s) % self.multiple for s in size]
        if not any(extra):
            return self.net(x)
        pad: list[int] = []
        for e in reversed(extra):  # F.pad takes the last axis first
            pad += [e // 2, e - e // 2]
        out = self.net(F.pad(x, pad))
        index = [slice(None), slice(None)] + [slice(e // 2, e // 2 + s) for e, s in zip(extra, size)]
        return out[tuple(index)]


def unet(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    dropout: float = 0.0,
) -> nn.Module:
    """A MONAI U-Net (2D or 3D, residual units, stride-2 levels) returning logits for any spatial size."""
    name = f"unet{spatial_dims}d"
    nets = require("monai.networks.nets", "medical", f"The {name} model")
    if len(channels) < 2:
        raise ConfigError(f"{name} needs at least two levels of channels, got {tuple(channels)}.")
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(f"{name} needs at least one input channel and one class.")
    net = nets.UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
        dropout=dropout,
    )
    return PadToMultiple(net, 2 ** (len(channels) - 1))


def unet2d(in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256), dropout: float = 0.0) -> nn.Module:
    """A 2D U-Net returning logits (B, num_classes, H, W) for any H, W."""
    return unet(2, in_channels, num_classes, channels, dropout)


def unet3d(in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256), dropout: float = 0.0) -> nn.Module:
    """A 3D U-Net (the settings of `unet2d` in 3D) for any D, H, W: a lighter alternative to the V-Net."""
    return unet(3, in_channels, num_classes, channels, dropout)


def vnet3d(in_channels: int, num_classes: int, dropout: float = 0.5) -> nn.Module:
    """A 3D V-Net returning logits (B, num_classes, D, H, W) for any D, H, W (16 input channels max)."""
    nets = require("monai.networks.nets", "medical", "The vnet3d model")
    if in_channels < 1 or 16 % in_channels:
        raise ConfigError(f"vnet3d needs in_channels dividing 16 (1, 2, 4, 8 or 16), got {in_channels}.")
    if num_classes < 1:
        raise ConfigError("vnet3d needs at least one class.")
    net = nets.VNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_classes,
        dropout_prob_down=dropout,
        dropout_prob_up=(dropout, dropout),
    )
    return PadToMultiple(net, 16)
