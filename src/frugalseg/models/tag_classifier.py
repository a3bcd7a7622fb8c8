"""Multi-label tag classifier whose class maps are the CAMs (IRN-style head).

backbone (timm, output stride 16) -> last feature map f -> 1x1 conv W (no bias) -> class maps M = W * f.
Scores are GAP(M) (= W . GAP(f), the IRN head, since both are linear) or, with peak stimulation, the mean
of M at its peaks (PRM). CAM is ReLU(M): no hooks are needed, the maps come out of the forward pass.

IRN trains this head with BatchNorm statistics frozen (FixedBatchNorm) and the early stages not updated
(`stage2(x).detach()`). Detaching would also stop gradients to the *image*, which AdvCAM needs, so here the
early stages are frozen by `requires_grad=False` instead: the same weights are trained, and the input stays
differentiable.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.errors import ConfigError
from frugalseg.models.backbones import create_backbone
from frugalseg.models.peaks import peak_stimulation


class TagClassifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool | str | Path = True,
        output_stride: int = 16,
        freeze_bn: bool = True,
        frozen_stages: int = 3,
        peak_stimulation: bool = False,
        bias: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        if num_classes < 1:
            raise ConfigError("A tag classifier needs at least one class.")
        bb = create_backbone(backbone, pretrained=pretrained, output_stride=output_stride, in_chans=in_chans)
        if not 0 <= frozen_stages <= len(bb.channels):
            raise ConfigError(f"frozen_stages must be in 0..{len(bb.channels)}, got {frozen_stages}.")
        self.backbone = bb.model
        self.classifier = nn.Conv2d(bb.channels[-1], num_classes, 1, bias=bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        self.freeze_bn = freeze_bn
        self.use_peaks = peak_stimulation
        self.stride = bb.reductions[-1]
        self.register_buffer("mean", torch.tensor(bb.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(bb.std).view(1, -1, 1, 1), persistent=False)
        self._freeze_early_stages(frozen_stages)

    def _freeze_early_stages(self, n: int) -> None:
        """requires_grad=False on every backbone parameter up to and including feature stage n (1-based)."""
        if n == 0:
            return
        last_module = self.backbone.feature_info.module_name(n - 1)
        params = list(self.backbone.named_parameters())
        inside = False
        for name, p in params:
            if name.startswith(last_module + ".") or name.startswith(last_module.replace(".", "_") + "."):
                inside = True
            elif inside:  # first parameter after the last frozen stage
                break
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "TagClassifier":
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the backbone's input statistics (AdvCAM climbs in this space, like the reference)."""
        return (images - self.mean) / self.std

    def maps_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class maps (B, K, h, w), before ReLU, of already normalised inputs."""
        return self.classifier(self.backbone(x)[-1])

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Raw class maps (B, K, h, w) of images in [0, 1]."""
        return self.maps_normalised(self.normalise(images))

    def scores(self, maps: torch.Tensor) -> torch.Tensor:
        return peak_stimulation(maps) if self.use_peaks else maps.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of images in [0, 1]."""
        return self.scores(self.class_maps(images))

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict]:
        """Backbone at lr, the new 1x1 classifier at lr x head_lr_mult (IRN: 10x)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr}, {"params": list(self.classifier.parameters()), "lr": lr * head_lr_mult}]


def tag_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss, as IRN and PRM train."""
    return F.multilabel_soft_margin_loss(logits, targets)
