"""Class activation maps, multi-scale + flip, as IRN's make_cam computes them (and AdvCAM reuses).

Per scale s: the image resized by s and its horizontal flip go through the classifier as one batch; the
map of the flip is flipped back and added. Each scale's map is resized (bilinear, align_corners=False) to
the stride-4 size ("cam", what later stages at feature resolution use) and to the image size ("high_res"),
summed over scales, restricted to the image's tagged classes and divided by its own max (+1e-5) per class.

The image-size map: `high_res="resize"` stretches each scale's map onto the image; `"stride16"` is IRN's
convention, resize to 16·⌈H/16⌉ × 16·⌈W/16⌉ (the size a stride-16 map would cover) then crop to H × W, so
each map cell keeps its 16-pixel footprint; the two differ where H or W is not a multiple of 16 (msrc's
213-pixel side: up to 11 pixels at the far edge).

Everything is batched: images of the same size are processed together at each scale, and all class maps
come from one forward pass (CAM = ReLU of the classifier's class maps; no hooks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

DEFAULT_SCALES: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
HighResMode = Literal["resize", "stride16"]


@dataclass
class ClassMaps:
    """Maps of one image: class ids `keys` (n,), `cam` (n, ceil(H/4), ceil(W/4)), `high_res` (n, H, W), in [0, 1]."""

    keys: torch.Tensor
    cam: torch.Tensor
    high_res: torch.Tensor


def check_batch(images: torch.Tensor, tags: Sequence[Sequence[int]], num_classes: int, method: str) -> None:
    """Clear errors for a batch a map method cannot use: wrong shape, tag lists not matching, bad ids."""
    if images.ndim != 4:
        raise ValueError(f"{method} expects a (B, 3, H, W) batch, got shape {tuple(images.shape)}.")
    if len(tags) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(tags)} tag lists.")
    check_tags(tags, num_classes)


def check_tags(tags: Sequence[Sequence[int]], num_classes: int, ids: Sequence[str] | None = None) -> None:
    """Clear errors for tag lists a map method cannot use."""
    for i, t in enumerate(tags):
        name = ids[i] if ids is not None else f"#{i}"
        bad = [c for c in t if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"image {name}: class ids {bad} are outside the classifier's {num_classes} classes.")
        if len(set(t)) != len(t):
            raise ValueError(f"image {name}: duplicate tags {list(t)}.")


def scaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Images resized by `scale` (bilinear; the reference uses PIL bicubic, a negligible difference)."""
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def with_flips(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (2B, C, H, W) as [x0, flip(x0), x1, flip(x1), ...] (pairs stay adjacent)."""
    return torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)


def merge_flips(maps: torch.Tensor) -> torch.Tensor:
    """(2B, ...) pairs -> (B, ...): map + flipped-back map of the flip."""
    pairs = maps.unflatten(0, (-1, 2))
    return pairs[:, 0] + pairs[:, 1].flip(-1)


def output_sizes(h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The stride-4 map size and the image size."""
    return (math.ceil(h / 4), math.ceil(w / 4)), (h, w)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, h, w) maps."""
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def high_res_map(maps: torch.Tensor, size: tuple[int, int], mode: HighResMode = "resize") -> torch.Tensor:
    """(n, h, w) maps at the image size: stretched onto it, or (`stride16`) resized to the stride-16 up-size and
    cropped to it, as IRN's make_cam."""
    if mode == "resize":
        return resize_maps(maps, size)
    if mode != "stride16":
        raise ValueError(f"high_res must be 'resize' or 'stride16', not {mode!r}")
    up = (16 * math.ceil(size[0] / 16), 16 * math.ceil(size[1] / 16))
    return resize_maps(maps, up)[:, : size[0], : size[1]]


def finish_maps(per_scale: list[torch.Tensor], keys: torch.Tensor, image_size: tuple[int, int],
                high_res: HighResMode = "resize") -> ClassMaps:
    """Sum each scale's (n, h_s, w_s) maps at stride-4 and image size, max-normalise per class."""
    low_size, high_size = output_sizes(*image_size)
    if len(keys) == 0:  # an image without tags: nothing to localise, its seed is all background
        return ClassMaps(keys=keys, cam=torch.zeros(0, *low_size), high_res=torch.zeros(0, *high_size))
    low = sum(resize_maps(m, low_size) for m in per_scale)
    high = sum(high_res_map(m, high_size, high_res) for m in per_scale)
    low = low / (low.flatten(1).amax(1)[:, None, None] + 1e-5)
    high = high / (high.flatten(1).amax(1)[:, None, None] + 1e-5)
    return ClassMaps(keys=keys, cam=low, high_res=high)


@torch.no_grad()
def cam_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    tags: Sequence[Sequence[int]],
    scales: Sequence[float] = DEFAULT_SCALES,
    high_res: HighResMode = "resize",
) -> list[ClassMaps]:
    """CAMs of same-size images (B, 3, H, W) in [0, 1] for their tagged classes.

    `model` is a `TagClassifier` (anything with `class_maps(images) -> (B, K, h, w)` raw maps).
    An image with no tags gets empty maps (its seed is all background).
    """
    check_batch(images, tags, model.classifier.out_channels, "cam_maps")
    per_image: list[list[torch.Tensor]] = [[] for _ in tags]
    for s in scales:
        maps = F.relu(model.class_maps(with_flips(scaled(images, s))).float())
        merged = merge_flips(maps)  # (B, K, h, w)
        for b, t in enumerate(tags):
            per_image[b].append(merged[b, list(t)])
    return [
        finish_maps(per_image[b], torch.as_tensor(list(t), dtype=torch.long), tuple(images.shape[-2:]), high_res)
        for b, t in enumerate(tags)
    ]
