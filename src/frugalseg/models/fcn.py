"""FCN baseline head: the dilated-FCN baseline the OCR paper compares against.

It has the same 512-channel 3x3 pixel representation and the same auxiliary head (weight 0.4) as
`OCRHead`, so an FCN-vs-OCR comparison isolates the object-contextual module itself.
"""

from __future__ import annotations

import torch
from torch import nn

from frugalseg.models.ocr import AuxHead, conv_bn_relu


class FCNHead(nn.Module):
    def __init__(self, main_in: int, aux_in: int, num_classes: int, mid_channels: int = 512, dropout: float = 0.05):
        super().__init__()
        self.aux_head = AuxHead(aux_in, num_classes, mid_channels)
        self.body = nn.Sequential(conv_bn_relu(main_in, mid_channels, 3), nn.Dropout2d(dropout))
        self.cls = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, main: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls(self.body(main)), self.aux_head(aux)
