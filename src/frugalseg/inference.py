"""Inference: 2D images, volumes slice by slice (2D networks) or by sliding window (3D networks).

Every function runs under `torch.no_grad()` on an explicit `device` (the stages resolve it once from the
run's `devices` option with `frugalseg.stages.options.device_of`; `None` means wherever the model already
is) and returns class probabilities on the CPU, because callers (evaluation, prediction export) go on to
argmax, metrics and files that live there; returning CPU tensors also bounds GPU memory to one batch of
slices or windows. The model is moved to `device` (in place, as `nn.Module.to` does); its train/eval mode
is left as the caller set it (evaluation calls `.eval()`; MC-dropout uncertainty wants `.train()`).
Networks that return several outputs (e.g. DTC's segmentation + signed-distance heads) are read
through their first output (`frugalseg.models.first_output`).

- `predict_images`: a batch of 2D images, optionally resized to the network's input size and back;
- `predict_volume_slices` / `predict_volume_sliding`: one volume through a 2D / 3D network;
- `predict_case`: one case as `frugalseg.data.torchdata.case_input` gives it, whichever the network;
- `keep_largest_component`: post-processing of a predicted case (DTC's `nms=1`).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from frugalseg.errors import ConfigError, require
from frugalseg.models import first_output

__all__ = ["keep_largest_component", "model_device", "predict_case", "predict_images", "predict_volume_sliding",
           "predict_volume_slices"]

Size = int | Sequence[int] | None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _placed(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """Put the model on `device` (None: leave it where it is); the device inputs go to."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    model.to(device)
    return device


def _hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    sizes = [int(s) for s in size]
    return (sizes[0], sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def _autocast(device: torch.device, amp: bool):
    """bf16 (fp16 where bf16 is missing) autocast on CUDA when `amp`; nothing otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_images(model: nn.Module, images: torch.Tensor, input_size: Size = None, *,
                   device: torch.device | str | None = None, amp: bool = True) -> torch.Tensor:
    """Class probabilities (B, K, H, W) on the CPU of a batch of 2D images (B, C, H, W).

    With `input_size` (one size or (h, w)) the images are resized (bilinear) to it before the network, as
    in training with the resize policy, and the logits back to the image size before the softmax. `amp`:
    bf16 autocast on CUDA (supervised inference; ignored on the CPU)."""
    device = _placed(model, device)
    h, w = images.shape[-2:]
    target = _hw(input_size)
    x = images.to(device=device, dtype=torch.float32)
    if target is not None:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    with _autocast(device, amp):
        logits = first_output(model(x)).float()
    if target is not None:
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.softmax(1).cpu()


@torch.no_grad()
def predict_volume_slices(
    model: nn.Module,
    volume_zyx: torch.Tensor,
    batch: int = 16,
    size: Size = None,
    *,
    device: torch.device | str | None = None,
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
    device = _placed(model, device)
    h, w = volume_zyx.shape[-2:]
    target = _hw(size)
    out = []
    for start in range(0, volume_zyx.shape[0], batch):
        x = volume_zyx[start:start + batch].to(device=device, dtype=torch.float32)
        if target is not None and tuple(target) != (h, w):
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        logits = first_output(model(x)).float()
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
    *,
    device: torch.device | str | None = None,
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
    device = _placed(model, device)
    logits = inferers.sliding_window_inference(
        volume.to(device=device, dtype=torch.float32),
        roi_size=tuple(int(s) for s in patch_size),
        sw_batch_size=sw_batch_size,
        predictor=lambda x: first_output(model(x)),
        overlap=overlap,
        mode=mode,
    )
    return first_output(logits)[0].float().softmax(0).cpu()


def predict_case(model: nn.Module, case: torch.Tensor, dims: int, size: Size, overlap: float = 0.5, *,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Class probabilities (K, D, H, W) on the CPU of one case as `data.torchdata.case_input` gives it:
    2D networks slice by slice (resized to `size`: one size, (h, w), or None for as they are), 3D networks
    by sliding window of `size` (3 sizes) with `overlap`. A 2D image is one slice (D = 1)."""
    if dims == 2:
        return predict_volume_slices(model, case, size=size, device=device).movedim(1, 0)
    return predict_volume_sliding(model, case, size, overlap=overlap, device=device)


def keep_largest_component(pred: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep each class's largest connected component (the reference's `nms=1`); the rest → class 0."""
    out = pred.copy()
    for c in classes:
        comp, n = ndimage.label(pred == c)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[(comp > 0) & (comp != sizes.argmax())] = 0
    return out
