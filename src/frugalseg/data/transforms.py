"""Tensor-level augmentation for 2D segmentation, applied identically to image and mask.

Two policies cover the product's data: `crop` for natural images (random rescale, pad with void, random
crop, flip: the DeepLab/OCR recipe) and `resize` for medical slices (resize to a fixed size, random
rot90/flip as SSL4MIS does). Masks are resampled with nearest neighbour so ids never blend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from frugalseg.data.labels import IGNORE_INDEX


def to_tensor_image(image) -> torch.Tensor:
    """numpy (H, W, 3) uint8 -> (3, H, W) float in [0, 1]; (H, W) float -> (1, H, W) as is."""
    t = torch.from_numpy(image.copy() if not image.flags.writeable else image)
    if t.dtype == torch.uint8:
        return t.permute(2, 0, 1).float().div_(255.0) if t.ndim == 3 else t[None].float().div_(255.0)
    t = t.float()
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def resize_pair(image: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]):
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


@dataclass
class CropTransform:
    """Random scale in `scale`, pad to `crop` with void, random crop, horizontal flip."""

    crop: int = 256
    scale: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    base_size: int | None = None  # rescale the longer side to this before the random scale

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        h, w = image.shape[-2:]
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=gen).item()
        if self.base_size:
            s *= self.base_size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        image, mask = resize_pair(image, mask, (nh, nw))
        ph, pw = max(self.crop - nh, 0), max(self.crop - nw, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
        H, W = image.shape[-2:]
        y = int(torch.randint(0, H - self.crop + 1, (), generator=gen))
        x = int(torch.randint(0, W - self.crop + 1, (), generator=gen))
        image = image[:, y : y + self.crop, x : x + self.crop]
        mask = mask[y : y + self.crop, x : x + self.crop]
        if self.hflip and torch.rand((), generator=gen).item() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


@dataclass
class ResizeTransform:
    """Resize to `size` x `size`; in training also random rot90 + flip (SSL4MIS's RandomGenerator)."""

    size: int = 256
    augment: bool = True

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        image, mask = resize_pair(image, mask, (self.size, self.size))
        if self.augment:
            k = int(torch.randint(0, 4, (), generator=gen))
            image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
            if torch.rand((), generator=gen).item() < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()

