"""Whole-volume inference: a 2D network slice by slice, or a 3D network by sliding window.

Both run under `torch.no_grad()` on the model's device and return class probabilities on the CPU,
because callers (evaluation, prediction export) go on to argmax, metrics and files that live there;
returning CPU tensors also bounds GPU memory to one batch of slices or windows. The model's train/eval
mode is left as the caller set it (evaluation calls `.eval()`; MC-dropout uncertainty wants `.train()`).
Networks that return several outputs (e.g. DTC's segmentation + signed-distance heads) are read
through their first output.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.errors import ConfigError, require

__all__ = ["model_device", "predict_volume_sliding", "predict_volume_slices"]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def predict_volume_slices(
    model: nn.Module,
    volume_zyx: torch.Tensor,
    batch: int = 16,
    size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Class probabilities (D, K, H, W) of a 2D network applied to each slice of a volume.

    `volume_zyx` is (D, H, W) (single channel) or (D, C, H, W). With `size`, each slice is resized
    (bilinear) to size×size (or the given (h, w)) before the network, as in training with the resize
    policy, and the logits are resized back (bilinear) before the softmax, so the output always
    matches the input grid.
    """
    if volume_zyx.ndim == 3:
        volume_zyx = volume_zyx[:, None]
    if volume_zyx.ndim != 4:
        raise ConfigError(f"expected a (D, H, W) or (D, C, H, W) volume, got shape {tuple(volume_zyx.shape)}.")
    if batch < 1:
        raise ConfigError(f"batch must be positive, got {batch}.")
    device = model_device(model)
    h, w = volume_zyx.shape[-2:]
    target = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    out = []
    for start in range(0, volume_zyx.shape[0], batch):
        x = volume_zyx[start:start + batch].to(device=device, dtype=torch.float32)
        if target is not None and tuple(target) != (h, w):
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        logits = _first(model(x)).float()
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        out.append(logits.softmax(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def predict_volume_sliding(
    model: nn.Module,
    volume: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    mode: str = "constant",
) -> torch.Tensor:
    """Class probabilities (K, D, H, W) of a 3D network by MONAI sliding-window inference.

    `volume` is (D, H, W), (C, D, H, W) or (1, C, D, H, W). Windows of `patch_size` overlap by
    `overlap`; overlapping logits are averaged (`mode="constant"`, as the UA-MT/DTC evaluation does)
    or Gaussian-weighted (`mode="gaussian"`) before the softmax. Volumes smaller than a window are
    padded by MONAI and cropped back.
    """
    inferers = require("monai.inferers", "medical", "Sliding-window inference")
    if volume.ndim == 3:
        volume = volume[None, None]
    elif volume.ndim == 4:
        volume = volume[None]
    if volume.ndim != 5 or volume.shape[0] != 1:
        raise ConfigError(f"expected one (D, H, W) or (C, D, H, W) volume, got shape {tuple(volume.shape)}.")
    if len(patch_size) != 3:
        raise ConfigError(f"patch_size must give 3 sizes (D, H, W), got {tuple(patch_size)}.")
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}.")
    device = model_device(model)
    logits = inferers.sliding_window_inference(
        volume.to(device=device, dtype=torch.float32),
        roi_size=tuple(int(s) for s in patch_size),
        sw_batch_size=sw_batch_size,
        predictor=lambda x: _first(model(x)),
        overlap=overlap,
        mode=mode,
    )
    return _first(logits)[0].float().softmax(0).cpu()
