"""Proxy tasks that need no labels.

Colourisation (Larsson, Maire, Shakhnarovich, "Colorization as a proxy task for visual understanding", CVPR
2017): the network sees lightness only and predicts, per location, a distribution over 32 hue bins and 32
chroma bins (CIE Lab: hue = atan2(b, a), chroma = |(a, b)|). Hue is meaningless where chroma is ~0, so the hue
loss of each location is weighted by its chroma (their choice too). Predictions are made from a
hypercolumn of the encoder's last two stages at the penultimate one's resolution; targets are pooled to
that grid.

Rotation (Gidaris, Singh, Komodakis, ICLR 2018): each image is shown at 0, 90, 180 and 270 degrees; the
network classifies the rotation from its pooled deepest features. Works for greyscale images (ACDC) where
colourisation cannot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ColorizationHead", "RotationHead", "colorization_loss", "colorization_targets", "lightness_input",
           "rgb_to_lab", "rotation_batch"]

HUE_BINS = 32
CHROMA_BINS = 32
CHROMA_MAX = 100.0  # Lab chroma of sRGB colours rarely exceeds ~130; bins above 100 are merged into the last


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] → (B, 3, H, W) CIE Lab (D65): L in [0, 100], a, b roughly in [-110, 110]."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], device=rgb.device, dtype=rgb.dtype)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    white = torch.tensor([0.95047, 1.0, 1.08883], device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > (6 / 29) ** 3, t.clamp_min(1e-12) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], 1)


def lightness_input(rgb: torch.Tensor) -> torch.Tensor:
    """What the colourisation network sees: Lab lightness in [0, 1], replicated to 3 channels (so the encoder
    keeps its RGB input layer for fine-tuning on colour images)."""
    return (rgb_to_lab(rgb)[:, :1] / 100).expand(-1, 3, -1, -1).contiguous()


def colorization_targets(rgb: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Targets for a batch of RGB images in [0, 1] on the `grid` (h, w) of the predictions (a, b average-pooled):
    {'hue': (B, h, w) bin ids, 'chroma': (B, h, w) bin ids, 'hue_weight': (B, h, w) chroma normalised to
    [0, 1]}."""
    lab = rgb_to_lab(rgb)
    ab = F.adaptive_avg_pool2d(lab[:, 1:], grid)
    hue = torch.atan2(ab[:, 1], ab[:, 0])  # [-pi, pi]
    chroma = ab.norm(dim=1)
    hue_bin = ((hue + math.pi) / (2 * math.pi) * HUE_BINS).long().clamp(0, HUE_BINS - 1)
    chroma_bin = (chroma / CHROMA_MAX * CHROMA_BINS).long().clamp(0, CHROMA_BINS - 1)
    return {"hue": hue_bin, "chroma": chroma_bin,
            "hue_weight": (chroma / CHROMA_MAX).clamp(0, 1)}


class ColorizationHead(nn.Module):
    """Hue and chroma logits from a hypercolumn of the encoder's last two stages, at the penultimate stage's
    resolution: (B, HUE_BINS + CHROMA_BINS, h, w)."""

    def __init__(self, channels: list[int], width: int = 128):
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(channels[-1] + channels[-2], width, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.out = nn.Conv2d(width, HUE_BINS + CHROMA_BINS, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        mid, deep = feats[-2], feats[-1]
        deep = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.mix(torch.cat([mid, deep], 1)))


def colorization_loss(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Chroma cross-entropy + chroma-weighted hue cross-entropy (Larsson et al.), averaged over locations."""
    hue_logits, chroma_logits = logits[:, :HUE_BINS], logits[:, HUE_BINS:]
    chroma = F.cross_entropy(chroma_logits, targets["chroma"])
    hue_each = F.cross_entropy(hue_logits, targets["hue"], reduction="none")
    w = targets["hue_weight"]
    hue = (hue_each * w).sum() / w.sum().clamp_min(1e-6)
    return chroma + hue


def rotation_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (square) image at 0/90/180/270 degrees: (4B, C, H, W) and the rotation ids (4B,)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square crops, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class RotationHead(nn.Module):
    """Rotation logits (B, 4) from the pooled deepest features (a hidden layer, as Gidaris' classifier)."""

    def __init__(self, channels: list[int], width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels[-1], width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.net(feats[-1].mean(dim=(-2, -1)))
