"""Peak stimulation (PRM, Zhou et al. CVPR 2018): class scores from the local maxima of class response maps.

A peak is a local maximum in a 3x3 window that is also >= its class map's median (`filter_type="median"` of
the reference). The class score is the mean of the response at the peaks; the backward pass sends gradient to
peak locations only, which is the point of the layer: training learns to make instances' peaks, not blobs.

Two details follow the official code (`peak_stimulation.py`) rather than its description:
- **ties**: the reference finds peaks with max-pool *indices* (a position is a peak when its own window's
  argmax is itself); max-pool returns the first maximum in scan order, so a plateau of equal values yields
  one peak per window (its first position), not every tied position. `ties="all"` keeps every tied one.
- **gradient**: its forward is the mean over the N peaks, but its backward returns the peak mask times the
  incoming gradient, without the 1/N: each peak gets the full class gradient. `official_backward=True` (the
  default) does the same; False gives the exact gradient of the mean (1/N per peak).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def find_peaks(maps: torch.Tensor, window: int = 3, ties: str = "first") -> torch.Tensor:
    """Boolean peak mask (B, K, H, W) of class maps (B, K, H, W).

    A position is a peak when it is the maximum of its `window` x `window` neighbourhood (borders padded
    with -inf, so the border never wins by padding) and is >= the median of its class map. `ties="first"`
    (the reference): the window's argmax must be the position itself, the first maximum in scan order
    winning ties; `ties="all"`: every position equal to its window's maximum.
    """
    if maps.ndim != 4:
        raise ValueError(f"find_peaks expects (B, K, H, W) maps, got shape {tuple(maps.shape)}.")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd positive size, got {window}.")
    if ties not in ("first", "all"):
        raise ValueError(f"ties must be 'first' or 'all', got '{ties}'.")
    median = maps.flatten(2).median(dim=2).values[..., None, None]
    if ties == "all":
        pooled = F.max_pool2d(maps, window, stride=1, padding=window // 2)
        return (maps == pooled) & (maps >= median)
    _, idx = F.max_pool2d(maps, window, stride=1, padding=window // 2, return_indices=True)
    own = torch.arange(maps.shape[-2] * maps.shape[-1], device=maps.device).view(1, 1, *maps.shape[-2:])
    return (idx == own) & (maps >= median)


class _PeakMean(torch.autograd.Function):
    """Mean over the peaks forward; backward = the peak mask times the incoming gradient (the reference's,
    no 1/N)."""

    @staticmethod
    def forward(ctx, maps: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(peaks)
        return (maps * peaks).flatten(2).sum(2) / peaks.flatten(2).sum(2).clamp_min(1.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (peaks,) = ctx.saved_tensors
        return peaks * grad_out[..., None, None], None


def peak_stimulation(maps: torch.Tensor, window: int = 3, upsample: int = 1, ties: str = "first",
                     official_backward: bool = True) -> torch.Tensor:
    """Class scores (B, K): mean response at each class map's peaks.

    `upsample` > 1 finds peaks on a bilinearly upsampled map (the reference demo's sub-pixel factor 8,
    align_corners=True), which gives finer peak positions at a memory cost. `ties`, `official_backward`:
    see the module docstring.
    """
    if upsample > 1:
        maps = F.interpolate(maps, scale_factor=upsample, mode="bilinear", align_corners=True)
    peaks = find_peaks(maps.detach(), window, ties).to(maps.dtype)
    if official_backward:
        return _PeakMean.apply(maps, peaks)
    return (maps * peaks).flatten(2).sum(2) / peaks.flatten(2).sum(2).clamp_min(1.0)


def peak_list(maps: torch.Tensor, classes: list[int] | None = None, min_value: float = float("-inf"),
              window: int = 3) -> list[tuple[int, int, int, float]]:
    """Peaks of one image's maps (K, H, W) as (class, y, x, value), strongest first.

    `classes` restricts to those class indices (the image's tags); `min_value` drops weak peaks (the
    reference's `peak_threshold`).
    """
    if maps.ndim != 3:
        raise ValueError(f"peak_list expects (K, H, W) maps of one image, got shape {tuple(maps.shape)}.")
    mask = find_peaks(maps[None].detach(), window)[0] & (maps.detach() > min_value)
    keep = range(maps.shape[0]) if classes is None else classes
    out: list[tuple[int, int, int, float]] = []
    for k in keep:
        ys, xs = torch.nonzero(mask[k], as_tuple=True)
        vals = maps[k, ys, xs].detach()
        out += [(int(k), int(y), int(x), float(v)) for y, x, v in zip(ys.tolist(), xs.tolist(), vals.tolist())]
    return sorted(out, key=lambda p: -p[3])
