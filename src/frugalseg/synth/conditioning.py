"""The generator's input: one channel per class (one-hot) plus a boundary map of the instances.

A one-hot map alone cannot say where two touching objects of one class meet (their masks merge), so
pix2pixHD adds a map of instance boundaries; the generator then draws the edge between them. Instances
here are the connected components of each class, unless a dataset gives its own instance ids; class
boundaries are instance boundaries too. Void pixels (255) get an all-zero one-hot vector.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from frugalseg.data.labels import IGNORE_INDEX

__all__ = ["boundary_map", "condition", "condition_channels", "instance_map"]


def instance_map(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) int32 instance ids from 1: the 8-connected components of each class, void (255) treated as one
    more class (its components get ids too)."""
    out = np.zeros(mask.shape, dtype=np.int32)
    next_id = 1
    for cls in np.unique(mask):
        comp, n = ndimage.label(mask == cls, structure=np.ones((3, 3), dtype=bool))
        out[comp > 0] = comp[comp > 0] + next_id - 1
        next_id += n
    return out


def boundary_map(instances: torch.Tensor) -> torch.Tensor:
    """(..., H, W) float map, 1 where a pixel's 4-neighbour belongs to another instance (both sides)."""
    edge = torch.zeros(instances.shape, dtype=torch.bool, device=instances.device)
    dv = instances[..., 1:, :] != instances[..., :-1, :]
    dh = instances[..., :, 1:] != instances[..., :, :-1]
    edge[..., 1:, :] |= dv
    edge[..., :-1, :] |= dv
    edge[..., :, 1:] |= dh
    edge[..., :, :-1] |= dh
    return edge.float()


def condition_channels(num_classes: int) -> int:
    return num_classes + 1


def condition(mask: torch.Tensor, num_classes: int, instances: torch.Tensor | None = None,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, H, W) class ids (+ optional instance ids) → (B, num_classes + 1, H, W): one-hot, then boundaries.

    Without `instances` the mask's connected components are used (computed on the CPU)."""
    if mask.ndim != 3:
        raise ValueError(f"expected (B, H, W) class ids, got shape {tuple(mask.shape)}")
    valid = mask != ignore_index
    if bool(((mask >= num_classes) & valid).any()):
        bad = sorted(set(mask[valid & (mask >= num_classes)].unique().tolist()))
        raise ValueError(f"class ids {bad} outside 0..{num_classes - 1}")
    onehot = torch.zeros(mask.shape[0], num_classes, *mask.shape[1:], device=mask.device)
    onehot.scatter_(1, torch.where(valid, mask, 0).long()[:, None], 1.0)
    onehot *= valid[:, None]
    if instances is None:
        instances = torch.from_numpy(np.stack([instance_map(m) for m in mask.cpu().numpy()])).to(mask.device)
    return torch.cat([onehot, boundary_map(instances)[:, None]], 1)
