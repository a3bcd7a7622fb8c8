"""The network a proxy task pretrains, seen as an encoder: input images → a list of feature maps.

- timm backbones (the `ocr` / `fcn` segmenters' feature extractor): the features_only model itself, inputs
  normalised with its mean / std. Saved as its own state dict, which `create_backbone(name,
  pretrained=PATH)` loads (`train --pretrained PATH`).
- The medical U-Net (`unet2d`, MONAI's UNet inside `PadToMultiple`): its down path. MONAI nests each level
  as Sequential(down block, SkipConnection(next level), up block); the encoder runs the down blocks in order
  and returns each level's output, the last being the bottleneck. They are the U-Net's own modules, so the
  whole U-Net's state dict is saved (its decoder untouched by the proxy) and loads one-to-one into the
  segmenter (`train --arch unet2d --pretrained PATH`, `train --semi ... --pretrained PATH`).
"""

from __future__ import annotations

import torch
from torch import nn

from frugalseg.errors import ConfigError

__all__ = ["Encoder", "make_encoder", "unet_down_blocks"]


def unet_down_blocks(unet: nn.Module) -> list[nn.Module]:
    """The down blocks of a MONAI UNet (or a `PadToMultiple` around one), first level first, bottleneck last."""
    net = getattr(unet, "net", unet)
    seq = getattr(net, "model", None)
    blocks: list[nn.Module] = []
    while isinstance(seq, nn.Sequential) and len(seq) == 3 and hasattr(seq[1], "submodule"):
        blocks.append(seq[0])
        seq = seq[1].submodule
    if not blocks:
        raise ConfigError("not a MONAI U-Net: no Sequential(down, SkipConnection, up) levels found")
    blocks.append(seq)  # the bottom block
    return blocks


class Encoder(nn.Module):
    """`forward(images)` → feature maps, shallow to deep; `channels` their widths; `network` what is saved;
    `embedding(images)` the patch embedding of mix-and-match."""

    def __init__(self, network: nn.Module, kind: str, channels: list[int], mean=None, std=None):
        super().__init__()
        self.network = network
        self.kind = kind
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) if mean is not None else torch.zeros(1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) if std is not None else torch.ones(1))
        self._blocks = unet_down_blocks(network) if kind == "unet" else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "timm":
            return list(self.network((x - self.mean) / self.std))
        feats = []
        for block in self._blocks:
            x = block(x)
            feats.append(x)
        return feats

    def embedding(self, x: torch.Tensor, grid: int = 4) -> torch.Tensor:
        """M&M's patch embedding: the deepest feature map average-pooled to at most grid × grid cells and
        flattened, (B, C·cells). The official code embeds AlexNet's pool5, which keeps its 6×6 layout; a global
        average would not do here either: the medical U-Net's blocks end in InstanceNorm, after which every
        patch's spatial mean is nearly the same (squared distances 0.013 of 4 between ACDC patches, 0.61 with
        the 4×4 grid), and the triplet loss cannot move."""
        f = self(x)[-1]
        cells = (min(grid, f.shape[-2]), min(grid, f.shape[-1]))
        return torch.nn.functional.adaptive_avg_pool2d(f, cells).flatten(1)

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}


def make_encoder(arch: str, in_chans: int, backbone: str = "tf_efficientnet_lite0",
                 channels: tuple[int, ...] = (8, 16, 32, 64, 128), num_classes: int = 2) -> Encoder:
    """A fresh, randomly initialised encoder (proxy tasks learn without ImageNet): arch 'timm' (a `backbone`
    name) or 'unet2d' (the medical U-Net of `channels`; `num_classes` only sizes its unused output layer)."""
    if arch == "timm":
        from frugalseg.models.backbones import create_backbone

        bb = create_backbone(backbone, pretrained=False, output_stride=32, in_chans=in_chans)
        return Encoder(bb.model, "timm", list(bb.channels), bb.mean, bb.std)
    if arch == "unet2d":
        from frugalseg.models import build_model

        net = build_model({"arch": "unet2d", "in_chans": in_chans, "num_classes": num_classes,
                           "channels": list(channels)})
        return Encoder(net, "unet", list(channels))
    raise ConfigError(f"unknown encoder arch '{arch}' (timm, unet2d)")
