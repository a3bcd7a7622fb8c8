"""The IRN network (Ahn, Cho, Kwak, CVPR 2019): a class-boundary branch and a displacement branch on a frozen
ImageNet backbone, both at stride 4.

As in the reference, the backbone is the ImageNet one (not the tag classifier's) and is never trained: IRN
learns relations between pixels from the seeds' confident labels, and a frozen backbone keeps the few
thousand confident pairs of a small dataset from overfitting it. Every backbone stage feeds each branch
through a 1×1 convolution, GroupNorm and ReLU, resized to stride 4 and concatenated:

- boundary: 32 channels a stage → 1×1 → one channel, sigmoid (the class-boundary map B);
- displacement: 64 channels a stage → 1×1 (256) → GroupNorm, ReLU → 1×1 → two channels (dy, dx in stride-4
  pixels, pointing to an instance centre).

The reference's ResNet-50 stages are at strides 4, 8, 16, 16 (OS16) after a stride-4 stem; a timm backbone
built with `output_stride=16` gives stages at 2, 4, 8, 16, 16: the stride-2 stage is pooled to stride 4, so
both branches see every stage at the stride they predict at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.models.backbones import Backbone, create_backbone

__all__ = ["InterPixelNet"]


def _branch(in_ch: int, out_ch: int) -> nn.Sequential:
    groups = 4 if out_ch % 4 == 0 else 1
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.GroupNorm(groups, out_ch), nn.ReLU(inplace=True))


class InterPixelNet(nn.Module):
    """Frozen backbone + boundary and displacement branches; `forward` returns (boundary (B, 1, h, w) in [0, 1],
    displacement (B, 2, h, w)) at stride 4 of the input."""

    def __init__(self, backbone: Backbone | str = "tf_efficientnet_lite0", pretrained: bool | str = True,
                 edge_channels: int = 32, disp_channels: int = 64):
        super().__init__()
        if isinstance(backbone, str):
            backbone = create_backbone(backbone, pretrained=pretrained, output_stride=16)
        self.backbone = backbone.model
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, -1, 1, 1), persistent=False)
        self.reductions = list(backbone.reductions)
        self.edge = nn.ModuleList(_branch(c, edge_channels) for c in backbone.channels)
        self.edge_out = nn.Conv2d(edge_channels * len(backbone.channels), 1, 1)
        self.disp = nn.ModuleList(_branch(c, disp_channels) for c in backbone.channels)
        self.disp_mid = _branch(disp_channels * len(backbone.channels), 256)
        self.disp_out = nn.Conv2d(256, 2, 1)

    def train(self, mode: bool = True) -> "InterPixelNet":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its ImageNet statistics, as the reference's
        return self

    def heads_parameters(self) -> list[nn.Parameter]:
        """What trains (the backbone never does)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] (normalised here, as the backbone's weights expect)."""
        h, w = images.shape[-2:]
        size = ((h + 3) // 4, (w + 3) // 4)
        with torch.no_grad():
            feats = self.backbone((images - self.mean) / self.std)
        feats = [f.detach() for f in feats]

        def at_stride4(branches: nn.ModuleList) -> torch.Tensor:
            outs = []
            for f, branch in zip(feats, branches):
                y = branch(f)
                if y.shape[-2:] != size:
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                outs.append(y)
            return torch.cat(outs, 1)

        boundary = torch.sigmoid(self.edge_out(at_stride4(self.edge)))
        displacement = self.disp_out(self.disp_mid(at_stride4(self.disp)))
        return boundary, displacement
