"""Object-Contextual Representations (Yuan, Chen, Wang, ECCV 2020), as the official code runs it.

Reading order follows the method:
1. soft object regions: auxiliary logits M (K classes) from an auxiliary head;
2. pixel representation X: 3x3 conv to 512 channels + BN-ReLU;
3. object region representations f_k = sum_i softmax_i(M_k)_i x_i -- the softmax is over *spatial
   positions*, not over classes (the most asked question about the method);
4. pixel-region relation: query from X, key and value from f_k, 256 key channels, weights
   softmax_k(qk / sqrt(256)) (the scaling is in the code, not in the paper's equations);
5. augmented representation Z = conv1x1(concat[context, X]) -> 512, BN-ReLU, Dropout2d(0.05);
6. classifier 1x1 conv 512 -> K.  Loss = CE(out) + 0.4 CE(aux), done by the training module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AuxHead(nn.Module):
    """Soft object regions: conv (3x3 as in openseg, 1x1 as in HRNet-Seg) + BN-ReLU + Dropout2d(0.05) + 1x1 -> K."""

    def __init__(self, in_channels: int, num_classes: int, mid_channels: int = 512, kernel: int = 3):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(in_channels, mid_channels, kernel), nn.Dropout2d(0.05))
        self.cls = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.body(x))


def spatial_gather(features: torch.Tensor, region_logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Object region representations (B, C, K): features averaged under each class's spatial softmax."""
    b, c, h, w = features.shape
    weights = F.softmax(scale * region_logits.flatten(2), dim=2)  # (B, K, HW), softmax over positions
    return torch.bmm(weights, features.flatten(2).transpose(1, 2)).transpose(1, 2)  # (B, C, K)


class ObjectAttention(nn.Module):
    """Pixel-region relation and object-contextual representation (query/key 2x conv-BN-ReLU, value 1x, up 1x)."""

    def __init__(self, channels: int = 512, key_channels: int = 256):
        super().__init__()
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(conv_bn_relu(channels, key_channels), conv_bn_relu(key_channels, key_channels))
        self.f_object = nn.Sequential(
            _conv1d_bn_relu(channels, key_channels), _conv1d_bn_relu(key_channels, key_channels)
        )
        self.f_down = _conv1d_bn_relu(channels, key_channels)
        self.f_up = conv_bn_relu(key_channels, channels)

    def forward(self, pixels: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, C, H, W), regions (B, C, K) -> context (B, C, H, W) and relation weights (B, HW, K)."""
        b, _, h, w = pixels.shape
        query = self.f_pixel(pixels).flatten(2).transpose(1, 2)  # (B, HW, Ck)
        key = self.f_object(regions)  # (B, Ck, K)
        value = self.f_down(regions).transpose(1, 2)  # (B, K, Ck)
        sim = torch.bmm(query, key) * self.key_channels**-0.5
        relation = F.softmax(sim, dim=-1)  # over the K regions
        context = torch.bmm(relation, value).transpose(1, 2).reshape(b, self.key_channels, h, w)
        return self.f_up(context), relation


def _conv1d_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv + BN + ReLU on region vectors (B, C, K): the official code runs a 2D 1x1 conv on (B, C, K, 1)."""
    return nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class OCRHead(nn.Module):
    """The OCR head on backbone features: returns (logits, aux_logits) at feature resolution.

    `aux_in` feeds the auxiliary (soft region) head: the stage before the last, like the ResNet
    variant's stage-3 `dsn_head`; `main_in` feeds the pixel representation.
    """

    def __init__(
        self,
        main_in: int,
        aux_in: int,
        num_classes: int,
        mid_channels: int = 512,
        key_channels: int = 256,
        aux_kernel: int = 3,
        dropout: float = 0.05,
    ):
        super().__init__()
        self.aux_head = AuxHead(aux_in, num_classes, mid_channels, aux_kernel)
        self.pixel_repr = conv_bn_relu(main_in, mid_channels, 3)
        self.attention = ObjectAttention(mid_channels, key_channels)
        self.fuse = nn.Sequential(conv_bn_relu(2 * mid_channels, mid_channels), nn.Dropout2d(dropout))
        self.cls = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, main: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aux_logits = self.aux_head(aux)
        if aux_logits.shape[-2:] != main.shape[-2:]:
            aux_logits_m = F.interpolate(aux_logits, size=main.shape[-2:], mode="bilinear", align_corners=False)
        else:
            aux_logits_m = aux_logits
        pixels = self.pixel_repr(main)
        regions = spatial_gather(pixels, aux_logits_m)
        context, _ = self.attention(pixels, regions)
        out = self.cls(self.fuse(torch.cat([context, pixels], dim=1)))
        return out, aux_logits
