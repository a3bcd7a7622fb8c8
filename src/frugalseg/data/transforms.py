"""Tensor-level augmentation for 2D segmentation, applied identically to image and mask.

Two policies cover the product's data: `crop` for natural images (random rescale, pad with void, random
crop, flip: the DeepLab/OCR recipe) and `resize` for medical slices (resize to a fixed size, random
rot90/flip as SSL4MIS does). Masks are resampled with nearest neighbour so ids never blend.
`ColourJitter` is photometric only (no mask): the strong view a semi-supervised student sees.
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
    """Random scale in `scale`, pad to `crop` with void, random crop, horizontal flip.

    `pad=False` never pads: the scale is raised where needed so the rescaled image covers the crop. Proxy tasks
    need that: a black band at the bottom/right tells a rotation's angle without looking at the image."""

    crop: int = 256
    scale: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    base_size: int | None = None  # rescale the longer side to this before the random scale
    pad: bool = True

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        h, w = image.shape[-2:]
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=gen).item()
        if self.base_size:
            s *= self.base_size / max(h, w)
        if not self.pad:
            s = max(s, self.crop / min(h, w))
        least = 1 if self.pad else self.crop  # rounding must not leave the covering image a pixel short
        nh, nw = max(least, round(h * s)), max(least, round(w * s))
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



@dataclass
class ColourJitter:
    """Strong photometric augmentation of an image in [0, 1] (no geometry: predictions stay pixel-aligned
    with the unjittered view), the student's view of natural images in semi-supervised training.

    Brightness, contrast and saturation factors drawn in [1 − strength, 1 + strength], a hue shift in
    [−hue, hue] (RGB only), then greyscale with probability `grayscale` (RGB only): SimCLR's / FixMatch's
    colour distortion at strength 0.4 / hue 0.1 / p 0.2. Single-channel images get brightness and contrast.
    """

    strength: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.2

    def __call__(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        def factor(spread: float) -> float:
            return 1.0 + spread * (2.0 * torch.rand((), generator=gen).item() - 1.0)

        x = image.clamp(0.0, 1.0)
        brightness, contrast, saturation, hue = factor(self.strength), factor(self.strength), factor(
            self.strength), self.hue * (2.0 * torch.rand((), generator=gen).item() - 1.0)
        gray = torch.rand((), generator=gen).item() < self.grayscale
        x = TF.adjust_brightness(x, brightness)
        if x.shape[0] == 3:
            x = TF.adjust_contrast(x, contrast)
            x = TF.adjust_saturation(x, saturation)
            if hue:
                x = TF.adjust_hue(x, hue)
            if gray:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
        else:  # greyscale: contrast about the image mean
            mean = x.mean()
            x = ((x - mean) * contrast + mean).clamp(0.0, 1.0)
        return x.contiguous()
