"""Peak Response Maps (Zhou, Zhu, Ye, Qiu, Jiao, CVPR 2018): instance masks from image-level tags.

A classifier trained with peak stimulation (`models/peaks.py`) makes one local maximum ("peak") of its class
maps per object instance. Backpropagating from one peak to the image with the excitation-backprop rule
(`peak_backprop`) gives that instance's evidence, its *peak response map* (PRM). A proposal (here:
superpixels and their hierarchical merges, since MCG is not available) is then chosen per peak by the
published score, duplicates are removed by NMS, and the result is a list of `Instance`s that can also be
turned into class maps (`prm_class_maps`) for the same seed evaluation as CAMs.

Pipeline, top to bottom::

    peaks = peak_response_maps(model, image, tags)          # one batched backward per image
    props = superpixel_proposals(image.permute(1, 2, 0).numpy())
    insts = retrieve_instances(peaks, props, model.class_maps(image[None])[0])
    maps  = prm_class_maps(insts, tags, image.shape[1:])

Where this differs from the reference code (ZhouYanzhao/PRM, branch `pytorch`), on purpose:
- all peaks of an image are backpropagated in ONE backward pass (the image is replicated once per peak in a
  batch, one one-hot gradient per batch item). This is exact, not an approximation, because the model runs in
  eval mode (BatchNorm uses its running statistics, so batch items do not interact) and the backward rule's
  offset is taken per batch item; the reference runs one backward per peak (`peak_response_maps_loop` keeps
  that structure for comparison);
- every nn.Conv2d kind timm uses is handled, including "same"-padded convs (`Conv2dSame`), whose padding the
  reference's monkey-patch would have dropped;
- the background term Q reproduces what the reference computes through `scipy.misc.imresize` (which
  byte-scales the map from its minimum before resizing; see `background_masks`);
- proposals are filtered by size before the top `proposal_count` are taken, so the budget is not spent on
  proposals that would be skipped anyway;
- a peak whose backward reaches no positive evidence gets an all-zero PRM instead of a division by zero (NaN).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import felzenszwalb, slic
from torch import nn

from frugalseg.errors import ConfigError, DataError
from frugalseg.models.peaks import peak_list, peak_stimulation
from frugalseg.weak.cam import ClassMaps, check_batch, finish_maps, output_sizes, resize_maps

log = logging.getLogger(__name__)

# Guard of the backward rule's division, as in the reference (values below it count as zero).
_EPS = 1e-10

# The published retrieval parameters (delta, beta, alpha) of the reference demo.
DEFAULT_PARAMS = (0.95, 1e-5, 0.8)


# --------------------------------------------------------------------------------------------------------
# Peak backpropagation (probabilistic winner-take-all / excitation backprop, only at convolutions)
# --------------------------------------------------------------------------------------------------------


def _same_conv_classes() -> tuple[type, ...]:
    """timm's dynamically "same"-padded convs: they pad inside forward, asymmetrically."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a core dependency
        return ()
    classes: list[type] = [Conv2dSame]
    try:
        from timm.layers.conv2d_same import Conv2dSameExport

        classes.append(Conv2dSameExport)
    except ImportError:  # pragma: no cover - older timm
        pass
    return tuple(classes)


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TensorFlow "SAME" total padding along one axis (as timm's `get_same_padding`)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _geometry(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[tuple[int, int, int, int] | None, str, tuple[int, int]]:
    """How `conv` pads an input of spatial `size`: (explicit F.pad amounts or None, F.pad mode, conv padding).

    Plain zero-padded convs keep their symmetric padding inside the conv call; "same"-padded convs (timm's
    dynamic Conv2dSame, or padding="same") and non-zero padding modes are padded explicitly first.
    """
    if isinstance(conv, _same_conv_classes()):
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        ph, pw = _same_pad(size[0], kh, sh, dh), _same_pad(size[1], kw, sw, dw)
        return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), "constant", (0, 0)
    if conv.padding_mode != "zeros":
        return tuple(conv._reversed_padding_repeated_twice), conv.padding_mode, (0, 0)
    if isinstance(conv.padding, str):
        return tuple(conv._reversed_padding_repeated_twice), "constant", (0, 0)
    return None, "constant", tuple(conv.padding)


def _positive_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv(x, weight) with `conv`'s geometry and no bias; padding is applied to x as the module pads its input.

    Used with x = input − offset (≥ 0) and weight = W⁺: the rule's normaliser. Padded positions of a zero-padded
    conv are zeros of x − offset, i.e. they carry no evidence, whichever way the module pads.
    """
    pads, mode, padding = _geometry(conv, x.shape[-2:])
    if pads is not None:
        x = F.pad(x, pads, mode=mode)
    return F.conv2d(x, weight, None, conv.stride, padding, conv.dilation, conv.groups)


def _positive_conv_transpose(conv: nn.Conv2d, ratio: torch.Tensor, weight: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The adjoint of `_positive_conv` w.r.t. its input: ratio (B, C_out, h, w) -> (B, C_in, H, W) of `size`."""
    pads, mode, padding = _geometry(conv, size[-2:])
    padded = list(size)
    if pads is not None:
        padded[-2] += pads[2] + pads[3]
        padded[-1] += pads[0] + pads[1]
    back = torch.nn.grad.conv2d_input(padded, weight, ratio, conv.stride, padding, conv.dilation, conv.groups)
    if pads is None:
        return back
    if mode == "constant":  # zero padding: its adjoint crops
        return back[..., pads[2] : padded[-2] - pads[3], pads[0] : padded[-1] - pads[1]]
    with torch.enable_grad():  # reflect/replicate/circular: let autograd give the (linear) adjoint of F.pad
        z = torch.zeros(size, dtype=ratio.dtype, device=ratio.device, requires_grad=True)
        (back,) = torch.autograd.grad(F.pad(z, pads, mode=mode), z, back)
    return back


class _ExcitationConv(torch.autograd.Function):
    """Forward: the conv's own output, unchanged. Backward: the excitation-backprop rule of the reference.

    grad_in = (x − offset) ⊙ convᵀ(grad_out / conv(x − offset, W⁺), W⁺),   W⁺ = max(W, 0),
    offset = min(x) per batch item (the reference takes the min of its batch, which is one image), and a
    zero normaliser gives zero gradient. The normaliser (its guarded inverse) is computed once in forward, as
    the reference does, and the transposed conv uses the conv's exact geometry: stride, padding (any mode,
    "same" included), dilation, groups. The weights are not inputs of this function: no gradient reaches them.

    `shared=True` is for a batch whose items are all the same image (as `peak_response_maps` builds): the
    conv, its normaliser and the saved tensors are computed for item 0 only and the output repeated, so
    forward costs one image whatever the batch; the backward still runs per item (one seed per item).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: nn.Conv2d, original_forward: Callable, shared: bool) -> torch.Tensor:
        n = x.shape[0] if x.ndim == 4 else 1
        repeat = shared and n > 1
        if repeat:
            if not torch.equal(x[0], x[-1]):
                raise ConfigError("peak_backprop(shared_batch=True) was given a batch whose items differ.")
            x = x[:1]
        weight_pos = conv.weight.detach().clamp(min=0)
        dims = tuple(range(1, x.ndim)) if x.ndim == 4 else tuple(range(x.ndim))
        shifted = x - x.amin(dim=dims, keepdim=True)
        norm = _positive_conv(conv, shifted, weight_pos)
        inv_norm = torch.where(norm < _EPS, torch.zeros_like(norm), 1.0 / (norm + _EPS))  # norm >= 0
        ctx.save_for_backward(shifted, inv_norm, weight_pos)
        ctx.conv = conv
        ctx.input_shape = (n,) + tuple(x.shape[1:]) if x.ndim == 4 else tuple(x.shape)
        out = original_forward(x)  # autograd is off inside Function.forward: no graph, same values
        return out.repeat(n, 1, 1, 1) if repeat else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        shifted, inv_norm, weight_pos = ctx.saved_tensors
        ratio = grad_out * inv_norm
        if ratio.ndim == 3:  # unbatched conv input (C, H, W)
            back = _positive_conv_transpose(ctx.conv, ratio[None], weight_pos, torch.Size((1,) + ctx.input_shape))[0]
        else:
            back = _positive_conv_transpose(ctx.conv, ratio, weight_pos, torch.Size(ctx.input_shape))
        return shifted * back, None, None, None


def _check_conv_supported(conv: nn.Conv2d) -> None:
    """Refuse conv subclasses whose forward we cannot mirror (e.g. weight-standardised convs)."""
    if type(conv).forward is nn.Conv2d.forward or isinstance(conv, _same_conv_classes()):
        return
    raise ConfigError(
        f"peak_backprop: {type(conv).__name__} overrides nn.Conv2d.forward in a way the excitation-backprop "
        "rule does not know (only nn.Conv2d and timm's Conv2dSame are supported)."
    )


@contextlib.contextmanager
def peak_backprop(model: nn.Module, shared_batch: bool = False) -> Iterator[nn.Module]:
    """While active, every nn.Conv2d in `model` backpropagates with the PRM (excitation-backprop) rule.

    Why a context manager: the rule replaces each conv's forward, and a model left patched would silently
    train or explain wrongly afterwards. Each conv's previous `forward` (a class method, or an instance
    attribute someone else set) is restored exactly on exit, also when the body raises. Forward values are
    unchanged; only convolutions change their backward, BatchNorm/activations/pooling/upsampling keep their
    ordinary gradients (as in the reference). Parameters receive no gradient through patched convs.

    `shared_batch=True` declares that every batch item is the same input and the model is in eval mode (so
    every layer's items stay identical): convs then compute one item and repeat it, which makes the forward
    of a replicated batch cost one image. Items that differ raise a ConfigError.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:  # check all before patching any, so a refusal leaves the model untouched
        _check_conv_supported(conv)
    saved: list[tuple[nn.Conv2d, bool, Callable]] = []
    try:
        for conv in convs:
            had_own = "forward" in conv.__dict__
            previous = conv.forward  # bound class method, or the instance attribute

            def patched(x: torch.Tensor, _conv: nn.Conv2d = conv, _previous: Callable = previous) -> torch.Tensor:
                return _ExcitationConv.apply(x, _conv, _previous, shared_batch)

            saved.append((conv, had_own, previous))
            conv.forward = patched
        yield model
    finally:
        for conv, had_own, previous in reversed(saved):
            if had_own:
                conv.forward = previous
            else:
                del conv.forward


# --------------------------------------------------------------------------------------------------------
# Peak response maps
# --------------------------------------------------------------------------------------------------------


@dataclass
class Peak:
    """One class peak and its response map.

    `y`, `x` are in input pixels (the centre of the peak's map cell); `map_y`, `map_x` index the (upsampled)
    class map the peak was found on. `value` is the class map there. `response` (H, W) is the PRM:
    non-negative and summing to 1 (all zeros when the backward reached no positive evidence).
    """

    class_id: int
    y: int
    x: int
    value: float
    response: torch.Tensor
    map_y: int = 0
    map_x: int = 0


@contextlib.contextmanager
def _inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; each module's flag restored exactly.

    Eval mode is what makes the batched backward exact (BatchNorm uses running statistics, dropout is off);
    switching parameters off keeps their ops out of the graph, which the PRM never needs.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _maps_function(model: nn.Module, image: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The function from the backpropagated input to raw class maps, and that input for `image`.

    For a model with `normalise` + `maps_normalised` (TagClassifier) the PRM is taken w.r.t. the normalised
    input, as the reference does (its network reads normalised images, and the rule's offset is the min of
    the first conv's input). Otherwise `model.class_maps(images)` or `model(images)` on images in [0, 1].
    """
    if hasattr(model, "maps_normalised") and hasattr(model, "normalise"):
        with torch.no_grad():
            x = model.normalise(image[None])[0]
        return model.maps_normalised, x
    if hasattr(model, "class_maps"):
        return model.class_maps, image
    return model, image


def _check_image(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise DataError(f"PRM expects the image as a torch tensor (C, H, W) in [0, 1], got {type(image).__name__}.")
    channels = int(model.mean.shape[1]) if isinstance(getattr(model, "mean", None), torch.Tensor) else 3
    if image.ndim != 3 or image.shape[0] != channels:
        raise DataError(
            f"PRM expects one image of shape ({channels}, H, W) in [0, 1], got shape {tuple(image.shape)}"
            + (" (a batch? pass one image at a time)" if image.ndim == 4 else "")
            + "."
        )
    param = next(iter(model.parameters()), None)
    return image.detach().to(device=param.device if param is not None else image.device, dtype=torch.float32)


def _input_pixel(index: int, size_up: int, size_map: int, size_in: int) -> int:
    """Index on the (align_corners=True upsampled) class map -> nearest input pixel of that map position."""
    pos = index * (size_map - 1) / (size_up - 1) if size_up > 1 else 0.0  # in map cells (cell centres)
    return int(min(max(round((pos + 0.5) * size_in / size_map - 0.5), 0), size_in - 1))


def _upsample(maps: torch.Tensor, factor: int) -> torch.Tensor:
    if factor <= 1:
        return maps
    return F.interpolate(maps, scale_factor=factor, mode="bilinear", align_corners=True)


def _select_peaks(
    model: nn.Module,
    image: torch.Tensor,
    classes: Sequence[int] | None,
    peak_threshold: float,
    class_threshold: float,
    max_peaks: int | None,
    upsample: int,
    window: int,
) -> tuple[Callable, torch.Tensor, list[Peak]]:
    """Shared first half of both PRM functions: maps, checks, and the peaks to backpropagate (no responses)."""
    if upsample < 1:
        raise ConfigError(f"upsample must be >= 1, got {upsample}.")
    if max_peaks is not None and max_peaks < 1:
        raise ConfigError(f"max_peaks must be >= 1 or None, got {max_peaks}.")
    maps_fn, x = _maps_function(model, image)
    with torch.no_grad():
        maps = maps_fn(x[None])
    if maps.ndim != 4 or maps.shape[0] != 1:
        raise ConfigError(f"the model must return class maps (B, K, h, w); got shape {tuple(maps.shape)}.")
    num_classes = maps.shape[1]
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DataError(f"class ids {bad} are outside the model's class maps (0..{num_classes - 1}).")
    up = _upsample(maps, upsample)
    score = peak_stimulation(up, window=window)[0]
    keep = [c for c in dict.fromkeys(classes) if float(score[c]) >= class_threshold]
    found = peak_list(up[0], keep, min_value=peak_threshold, window=window)
    if max_peaks is not None and len(found) > max_peaks:
        log.debug("PRM: keeping the %d strongest of %d peaks", max_peaks, len(found))
        found = found[:max_peaks]
    (h, w), (hu, wu), (H, W) = maps.shape[2:], up.shape[2:], image.shape[1:]
    peaks = [
        Peak(k, _input_pixel(i, hu, h, H), _input_pixel(j, wu, w, W), v, torch.empty(0), i, j)
        for k, i, j, v in found
    ]
    return maps_fn, x, peaks


def _normalised_response(grad: torch.Tensor) -> torch.Tensor:
    """Input gradients (B, C, H, W) -> PRMs (B, H, W): summed over channels, clamped >= 0, summing to 1."""
    prm = grad.sum(1).clamp(min=0)
    total = prm.sum(dim=(1, 2), keepdim=True)
    return torch.where(total > 0, prm / total.clamp_min(torch.finfo(prm.dtype).tiny), torch.zeros_like(prm))


def peak_response_maps(
    model: nn.Module,
    image: torch.Tensor,
    classes: Sequence[int] | None = None,
    peak_threshold: float = 0.0,
    class_threshold: float = 0.0,
    max_peaks: int | None = 50,
    upsample: int = 1,
    window: int = 3,
    chunk_size: int | None = None,
) -> list[Peak]:
    """Peaks of `image`'s class maps and their peak response maps, a batch of peaks per backward pass.

    image: (C, H, W) in [0, 1] (C = 3 for RGB models). classes: class indices to look at (the image's tags);
    None means all. A class is used when its peak-stimulation score is >= `class_threshold` (the reference's
    rule; pass -inf to use every listed class) and a peak when its value is > `peak_threshold` (the reference
    demo uses 30 on its own map scale; 0 keeps every positive peak). `max_peaks` keeps the strongest ones;
    `upsample` finds peaks on a bilinearly upsampled map (the reference demo's sub-pixel factor is 8).

    Why batched: one backward per peak (the reference, `peak_response_maps_loop`) serialises small passes;
    replicating the image once per peak and sending one one-hot gradient per batch item gives the same maps
    in one pass. Exact because the model is put in eval mode for the call. The replicated batch is declared
    to `peak_backprop(shared_batch=True)`, so its forward costs one image; only the backward runs per peak.
    `chunk_size` peaks per pass bounds memory. None picks 16 on an accelerator, and on the CPU runs
    `peak_response_maps_loop` instead (same maps): there batching buys no parallelism, large batches fall
    out of cache: on one thread of a loaded 2-core CPU (320x240, lite0, 29-32 peaks) the loop took about
    3.5 s against 4.3-5.2 s for chunks of 4 and 7.3 s for chunks of 16. The model's train/eval flags and
    requires_grad flags are restored afterwards.

    Returns `Peak`s strongest first; their responses live on the model's device.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    image = _check_image(model, image)
    if chunk_size is None:
        if image.device.type == "cpu":
            return peak_response_maps_loop(
                model, image, classes, peak_threshold, class_threshold, max_peaks, upsample, window
            )
        chunk_size = 16
    with _inference_state(model):
        maps_fn, x, peaks = _select_peaks(
            model, image, classes, peak_threshold, class_threshold, max_peaks, upsample, window
        )
        if not peaks:
            return []
        responses = []
        with peak_backprop(model, shared_batch=True):
            for start in range(0, len(peaks), chunk_size):
                chunk = peaks[start : start + chunk_size]
                n = len(chunk)
                xb = x[None].expand(n, -1, -1, -1).requires_grad_(True)  # a view: the image is stored once
                out = _upsample(maps_fn(xb), upsample)
                seed = torch.zeros_like(out)
                index = torch.tensor([[b, p.class_id, p.map_y, p.map_x] for b, p in enumerate(chunk)], device=out.device)
                seed[index[:, 0], index[:, 1], index[:, 2], index[:, 3]] = 1.0
                (grad,) = torch.autograd.grad(out, xb, seed)
                responses.append(_normalised_response(grad))
    for peak, response in zip(peaks, torch.cat(responses)):
        peak.response = response
    return peaks


def peak_response_maps_loop(
    model: nn.Module,
    image: torch.Tensor,
    classes: Sequence[int] | None = None,
    peak_threshold: float = 0.0,
    class_threshold: float = 0.0,
    max_peaks: int | None = 50,
    upsample: int = 1,
    window: int = 3,
) -> list[Peak]:
    """`peak_response_maps` with the reference's structure: one forward, then one backward per peak.

    Kept as the readable statement of the method and to check the batched version against it.
    """
    image = _check_image(model, image)
    with _inference_state(model):
        maps_fn, x, peaks = _select_peaks(
            model, image, classes, peak_threshold, class_threshold, max_peaks, upsample, window
        )
        if not peaks:
            return []
        with peak_backprop(model):
            xg = x[None].clone().requires_grad_(True)
            out = _upsample(maps_fn(xg), upsample)
            for i, peak in enumerate(peaks):
                seed = torch.zeros_like(out)
                seed[0, peak.class_id, peak.map_y, peak.map_x] = 1.0
                (grad,) = torch.autograd.grad(out, xg, seed, retain_graph=i + 1 < len(peaks))
                peak.response = _normalised_response(grad)[0]
    return peaks


# --------------------------------------------------------------------------------------------------------
# Proposals: superpixels and their hierarchical merges (selective-search style), in place of MCG
# --------------------------------------------------------------------------------------------------------


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) image, uint8 or float in [0, 1] -> float (H, W, 3) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        raise DataError("superpixel_proposals expects a numpy (H, W, 3) image; use image.permute(1, 2, 0).cpu().numpy().")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"superpixel_proposals expects an (H, W, 3) or (H, W) image, got shape {image.shape}.")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    if image.size and (image.min() < -1e-3 or image.max() > 1.0 + 1e-3):
        raise DataError(f"a float image must be in [0, 1], got values in [{image.min():.3g}, {image.max():.3g}].")
    return np.clip(image, 0.0, 1.0)


def _hierarchy(labels: np.ndarray, image: np.ndarray, bins: int = 25) -> list[tuple[np.ndarray, int]]:
    """Every region of a greedy hierarchical grouping of `labels`: (boolean set of base labels, area).

    Selective-search similarity (Uijlings et al. 2013) without the texture term: colour-histogram
    intersection + size (merge small regions first) + fill (merge regions whose bounding box they fill).
    Regions are returned in creation order: base superpixels first, the whole image last.
    """
    h, w = labels.shape
    n = int(labels.max()) + 1
    area_img = float(h * w)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n).astype(np.float64)
    # colour histograms (L1-normalised per region, 3 x bins)
    quant = np.minimum((image.reshape(-1, 3) * bins).astype(np.int64), bins - 1)
    hist = np.zeros((n, 3 * bins))
    for c in range(3):
        hist[:, c * bins : (c + 1) * bins] = np.bincount(flat * bins + quant[:, c], minlength=n * bins).reshape(n, bins)
    hist /= hist.sum(1, keepdims=True).clip(min=1)
    # bounding boxes
    ys, xs = np.divmod(np.arange(h * w), w)
    box = np.stack([np.full(n, h), np.full(n, w), np.zeros(n), np.zeros(n)], 1).astype(np.float64)
    np.minimum.at(box[:, 0], flat, ys)
    np.minimum.at(box[:, 1], flat, xs)
    np.maximum.at(box[:, 2], flat, ys)
    np.maximum.at(box[:, 3], flat, xs)
    # adjacency (4-connectivity)
    horizontal = np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1)
    vertical = np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1)
    pairs = np.concatenate([horizontal, vertical])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(np.sort(pairs, 1), axis=0)

    hists = {i: hist[i] for i in range(n)}
    areas = {i: area[i] for i in range(n)}
    boxes = {i: box[i] for i in range(n)}
    members = {i: np.eye(1, n, i, dtype=bool)[0] for i in range(n)}
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in pairs.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)

    def similarity(a: int, b: int) -> float:
        colour = float(np.minimum(hists[a], hists[b]).sum()) / 3.0
        size = 1.0 - (areas[a] + areas[b]) / area_img
        ba, bb = boxes[a], boxes[b]
        bbox = (max(ba[2], bb[2]) - min(ba[0], bb[0]) + 1) * (max(ba[3], bb[3]) - min(ba[1], bb[1]) + 1)
        fill = 1.0 - (bbox - areas[a] - areas[b]) / area_img
        return colour + size + fill

    heap = [(-similarity(a, b), a, b) for a, b in pairs.tolist()]
    heapq.heapify(heap)
    regions = [(members[i], int(areas[i])) for i in range(n)]
    alive = set(range(n))
    nxt = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in alive or b not in alive:
            continue  # lazily deleted: one side was merged already
        t = nxt
        nxt += 1
        sa, sb = areas[a], areas[b]
        hists[t] = (hists[a] * sa + hists[b] * sb) / (sa + sb)
        areas[t] = sa + sb
        boxes[t] = np.concatenate([np.minimum(boxes[a][:2], boxes[b][:2]), np.maximum(boxes[a][2:], boxes[b][2:])])
        members[t] = members[a] | members[b]
        neighbours[t] = (neighbours[a] | neighbours[b]) - {a, b}
        alive -= {a, b}
        alive.add(t)
        for k in (a, b):
            for m in (hists, areas, boxes, members):
                del m[k]
            del neighbours[k]
        for u in neighbours[t]:
            neighbours[u] -= {a, b}
            neighbours[u].add(t)
            heapq.heappush(heap, (-similarity(t, u), u, t))
        regions.append((members[t], int(areas[t])))
    return regions


def superpixel_proposals(
    image: np.ndarray,
    proposal_count: int = 100,
    felzenszwalb_scales: Sequence[float] = (100, 300),
    slic_segments: Sequence[int] = (100,),
    sigma: float = 0.8,
    min_size: int = 50,
    size_limit: tuple[float, float] = (2e-5, 0.85),
    seed: int = 0,
) -> np.ndarray:
    """Segment proposals (N, H, W) bool, N <= proposal_count: superpixels and hierarchical merges of them.

    Why: the reference retrieves instances from MCG proposals, which have no maintained Python
    implementation. Selective search (Uijlings et al. 2013) is the closest cheap substitute: over-segment the
    image (Felzenszwalb at each of `felzenszwalb_scales`, SLIC at each of `slic_segments`), then merge the
    most similar adjacent regions one pair at a time (colour + size + fill), keeping every region of every
    hierarchy. Proposals are ranked as selective search does (hierarchy level x a seeded random number, so
    large merged regions tend to come first while the strategies interleave), exact duplicates are removed,
    and only proposals with area in [size_limit[0], size_limit[1]) x image area are kept (the reference's
    limits, applied before the top `proposal_count` are taken).

    image: (H, W, 3) or (H, W), uint8 or float in [0, 1].
    """
    if proposal_count < 1:
        raise ConfigError(f"proposal_count must be >= 1, got {proposal_count}.")
    lo, hi = size_limit
    if not 0 <= lo < hi:
        raise ConfigError(f"size_limit must be (low, high) fractions with 0 <= low < high, got {size_limit}.")
    rgb = _as_float_rgb(image)
    h, w = rgb.shape[:2]
    area = h * w
    segmentations = [felzenszwalb(rgb, scale=s, sigma=sigma, min_size=min_size) for s in felzenszwalb_scales]
    segmentations += [slic(rgb, n_segments=n, compactness=10, start_label=0) for n in slic_segments]
    if not segmentations:
        raise ConfigError("superpixel_proposals needs at least one Felzenszwalb scale or SLIC segment count.")

    rng = np.random.default_rng(seed)
    candidates: list[tuple[float, int, np.ndarray]] = []  # (priority, strategy, member set)
    for s, labels in enumerate(segmentations):
        _, labels = np.unique(labels, return_inverse=True)  # consecutive ids
        labels = labels.reshape(h, w)
        regions = _hierarchy(labels, rgb)
        for rank, (members, size) in enumerate(reversed(regions), start=1):  # rank 1 = the last merge
            if lo * area <= size < hi * area:
                candidates.append((rank * rng.random(), s, members))
        segmentations[s] = labels
    candidates.sort(key=lambda c: c[0])

    masks: list[np.ndarray] = []
    seen: set[bytes] = set()
    for _, s, members in candidates:
        mask = members[segmentations[s]]
        key = np.packbits(mask).tobytes()
        if key in seen:
            continue
        seen.add(key)
        masks.append(mask)
        if len(masks) == proposal_count:
            break
    return np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)


# --------------------------------------------------------------------------------------------------------
# Instance retrieval
# --------------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One retrieved instance: `mask` (H, W) bool numpy, its retrieval `score`, and the peak that chose it.

    `response` is the instance's PRM after NMS: its own plus those of the instances it suppressed (the
    reference's merge); `merged` lists those suppressed peaks.
    """

    class_id: int
    mask: np.ndarray
    score: float
    peak: Peak
    response: torch.Tensor
    merged: list[Peak] = field(default_factory=list)


def background_masks(class_maps: torch.Tensor, size: tuple[int, int], delta: float | torch.Tensor) -> torch.Tensor:
    """Q per class (K, H, W) bool: where the bicubic-upsampled class map is below delta x its mean.

    The reference resizes with `scipy.misc.imresize`, which first byte-scales the map from its minimum
    ((M − min M) x 255 / range, clipped to 0..255) and then thresholds the resized bytes at delta x their mean.
    That is (M↑ − min M)⁺ < delta · mean((M↑ − min M)⁺); we compute exactly that (without the 8-bit
    rounding). It equals the literal "M↑ < delta · mean M↑" for maps whose minimum is 0, and unlike it
    stays meaningful for raw maps with negative values. `delta` may be one value per class (K,).
    """
    up = F.interpolate(class_maps[None].float(), size=size, mode="bicubic", align_corners=False)[0]
    shifted = (up - class_maps.flatten(1).amin(1)[:, None, None].float()).clamp(min=0)
    delta = torch.as_tensor(delta, dtype=shifted.dtype, device=shifted.device).reshape(-1, 1, 1)
    return shifted < delta * shifted.mean(dim=(1, 2), keepdim=True)


def proposal_contours(masks: torch.Tensor, width: int = 5) -> torch.Tensor:
    """Morphological gradient (dilation − erosion, square `width` kernel) of masks (N, H, W) -> bool (N, H, W).

    Borders behave as OpenCV's morphologyEx (the reference): the image edge neither dilates nor erodes, so a
    proposal touching the edge has no contour along it.
    """
    if width < 1 or width % 2 == 0:
        raise ConfigError(f"contour width must be an odd positive size, got {width}.")
    m = masks[:, None].float()
    dilated = F.max_pool2d(m, width, stride=1, padding=width // 2)
    eroded = -F.max_pool2d(-m, width, stride=1, padding=width // 2)
    return (dilated - eroded)[:, 0] > 0


def retrieval_scores(
    responses: torch.Tensor,
    masks: torch.Tensor,
    contours: torch.Tensor,
    background: torch.Tensor,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
) -> torch.Tensor:
    """Scores (P, N) of N proposals for P peaks: alpha·Σ_mask PRM + Σ_contour PRM − beta·Σ_mask Q.

    responses (P, H, W), masks/contours (N, H, W), background Q (P, H, W) (the peak's class), alpha/beta
    scalars or (P,). All sums are matrix products over flattened pixels, so all proposals of all peaks are
    scored at once.
    """
    r = responses.flatten(1).float()
    m = masks.flatten(1).to(r)
    c = contours.flatten(1).to(r)
    q = background.flatten(1).to(r)
    alpha = torch.as_tensor(alpha, dtype=r.dtype, device=r.device).reshape(-1, 1)
    beta = torch.as_tensor(beta, dtype=r.dtype, device=r.device).reshape(-1, 1)
    return alpha * (r @ m.T) + r @ c.T - beta * (q @ m.T)


def _mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (M, M) of masks (M, H, W), as the reference: inter / (union + 1e-10)."""
    m = masks.flatten(1).float()
    inter = m @ m.T
    area = m.sum(1)
    return inter / (area[:, None] + area[None, :] - inter + 1e-10)


def instance_nms(
    instances: list[Instance], iou: float = 0.3, merge_responses: bool = True, class_agnostic: bool = True
) -> list[Instance]:
    """Greedy NMS over instances, strongest first; suppressed instances' PRMs are added to the keeper's.

    The reference suppresses any instance whose mask overlaps a kept one with IoU >= `iou`, whatever the
    classes (`class_agnostic=True`); `class_agnostic=False` suppresses only within a class.
    """
    order = sorted(instances, key=lambda inst: -inst.score)
    if not order:
        return []
    ious = _mask_iou(torch.from_numpy(np.stack([inst.mask for inst in order])))
    removed = [False] * len(order)
    kept: list[Instance] = []
    for i, inst in enumerate(order):
        if removed[i]:
            continue
        kept.append(inst)
        for j in range(i + 1, len(order)):
            if removed[j] or float(ious[i, j]) < iou:
                continue
            if not class_agnostic and order[j].class_id != inst.class_id:
                continue
            removed[j] = True
            if merge_responses:
                inst.response = inst.response + order[j].response
                inst.merged.append(order[j].peak)
    return kept


def retrieve_instances(
    peaks: Sequence[Peak],
    proposals: np.ndarray,
    class_maps: torch.Tensor,
    delta: float = DEFAULT_PARAMS[0],
    beta: float = DEFAULT_PARAMS[1],
    alpha: float = DEFAULT_PARAMS[2],
    class_params: Mapping[int, tuple[float, float, float]] | None = None,
    contour_width: int = 5,
    proposal_count: int = 100,
    size_limit: tuple[float, float] = (2e-5, 0.85),
    nms_iou: float | None = 0.3,
    merge_responses: bool = True,
    class_agnostic_nms: bool = True,
) -> list[Instance]:
    """Instances of one image: for each peak the proposal with the best PRM score, then NMS.

    score = alpha·Σ_mask PRM + Σ_contour PRM − beta·Σ_mask Q (Zhou et al. 2018), with the contour the
    `contour_width`-square morphological gradient of the proposal and Q the class's background
    (`background_masks`). Defaults (delta, beta, alpha) = (0.95, 1e-5, 0.8) are the reference demo's;
    `class_params` overrides them per class id as (delta, beta, alpha) tuples, as the reference allows.
    As in the reference: the first `proposal_count` proposals are used, those with area outside
    [size_limit[0], size_limit[1]) x image area are skipped, ties go to the earlier proposal, a peak with no
    usable proposal yields no instance, and NMS at `nms_iou` (None: no NMS) merges suppressed PRMs.

    proposals: (N, H, W) bool numpy, H, W the image size; class_maps: the raw class maps (K, h, w) of the
    image (e.g. `model.class_maps(image[None])[0]`). Returns instances strongest first.
    """
    if len(peaks) == 0:
        return []
    proposals = np.asarray(proposals)
    if proposals.dtype != bool and np.issubdtype(proposals.dtype, np.integer) and np.isin(proposals, (0, 1)).all():
        proposals = proposals.astype(bool)  # 0/1 masks, e.g. decoded RLE
    if proposals.ndim != 3 or proposals.dtype != bool:
        raise DataError(f"proposals must be a bool (or 0/1) array (N, H, W), got {proposals.dtype} {proposals.shape}.")
    shape = tuple(peaks[0].response.shape)
    if proposals.shape[1:] != shape:
        raise DataError(f"proposals are {proposals.shape[1:]} but the peak response maps are {shape}; they must match.")
    if class_maps.ndim != 3:
        raise DataError(f"class_maps must be one image's maps (K, h, w), got shape {tuple(class_maps.shape)}.")
    num_classes = class_maps.shape[0]
    if any(not 0 <= p.class_id < num_classes for p in peaks):
        classes = sorted({p.class_id for p in peaks})
        raise DataError(f"peak classes {classes} do not fit class maps with {num_classes} classes.")
    device = peaks[0].response.device
    responses = torch.stack([p.response for p in peaks]).to(device)

    params = [(class_params or {}).get(k, (delta, beta, alpha)) for k in range(num_classes)]
    q = background_masks(class_maps.detach().to(device), shape, [d for d, _, _ in params])
    cls = torch.tensor([p.class_id for p in peaks], device=device)
    betas = torch.tensor([params[p.class_id][1] for p in peaks], device=device)
    alphas = torch.tensor([params[p.class_id][2] for p in peaks], device=device)

    masks = torch.from_numpy(proposals[:proposal_count]).to(device)
    if masks.shape[0] == 0:
        return []
    area = masks.flatten(1).sum(1)
    total = shape[0] * shape[1]
    usable = (area >= size_limit[0] * total) & (area < size_limit[1] * total)
    scores = retrieval_scores(responses, masks, proposal_contours(masks, contour_width), q[cls], alphas, betas)
    scores[:, ~usable] = -torch.inf
    best = scores.argmax(1)  # first maximum, as the reference's strict ">"
    instances = []
    for i, peak in enumerate(peaks):
        j = int(best[i])
        if not bool(usable[j]):
            continue
        mask = proposals[j].copy()
        instances.append(Instance(peak.class_id, mask, float(scores[i, j]), peak, peak.response.clone()))
    instances.sort(key=lambda inst: -inst.score)
    if nms_iou is not None:
        instances = instance_nms(instances, nms_iou, merge_responses, class_agnostic_nms)
    return instances


def prm_instances(
    model: nn.Module,
    image: torch.Tensor,
    classes: Sequence[int] | None = None,
    proposals: np.ndarray | None = None,
    peak_kwargs: Mapping | None = None,
    proposal_kwargs: Mapping | None = None,
    **retrieval_kwargs,
) -> list[Instance]:
    """The whole PRM instance pipeline for one image: peaks + PRMs, proposals (superpixels if not given), retrieval."""
    peaks = peak_response_maps(model, image, classes, **(peak_kwargs or {}))
    if not peaks:
        return []
    if proposals is None:
        proposals = superpixel_proposals(image.detach().permute(1, 2, 0).cpu().numpy().clip(0, 1), **(proposal_kwargs or {}))
    with _inference_state(model), torch.no_grad():
        maps_fn, x = _maps_function(model, _check_image(model, image))
        maps = maps_fn(x[None])[0]
    return retrieve_instances(peaks, proposals, maps, **retrieval_kwargs)


def prm_class_maps(instances: Sequence[Instance], keys: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Class maps (len(keys), H, W) float32 in [0, 1] from instances, for the same seed evaluation as CAMs.

    Per class: the max over that class's instances of mask x score / (the image's largest positive score).
    Instances with a score <= 0 contribute nothing; instances of classes not in `keys` are ignored.
    """
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((len(keys), h, w), dtype=np.float32)
    index = {int(k): i for i, k in enumerate(keys)}
    positive = [inst.score for inst in instances if inst.score > 0]
    if not positive:
        return out
    top = max(positive)
    for inst in instances:
        if inst.mask.shape != (h, w):
            raise DataError(f"instance mask is {inst.mask.shape}, expected {(h, w)}.")
        i = index.get(int(inst.class_id))
        if i is None or inst.score <= 0:
            continue
        np.maximum(out[i], inst.mask.astype(np.float32) * np.float32(inst.score / top), out=out[i])
    return out


def prm_maps(
    model: nn.Module,
    images: torch.Tensor,
    tags: Sequence[Sequence[int]],
    peak_threshold: float = 0.0,
    proposal_count: int = 100,
) -> list[ClassMaps]:
    """PRM class maps of a batch (B, 3, H, W) in [0, 1] for each image's tagged classes, in the layout of
    `cam_maps`: `prm_class_maps` of each image's instances at image size, resized to the stride-4 size.
    Images run one at a time (peaks and proposals are per image); an image without tags gets empty maps.
    """
    num_classes = getattr(getattr(model, "classifier", None), "out_channels", None)  # a TagClassifier's head
    if num_classes is not None:
        check_batch(images, tags, num_classes, "prm_maps")
    out = []
    for img, t in zip(images, tags):
        h, w = img.shape[-2:]
        keys = torch.as_tensor(list(t), dtype=torch.long)
        if not t:
            out.append(finish_maps([], keys, (h, w)))
            continue
        inst = prm_instances(model, img, classes=list(t), peak_kwargs={"peak_threshold": peak_threshold},
                             proposal_kwargs={"proposal_count": proposal_count})
        high = torch.from_numpy(prm_class_maps(inst, list(t), (h, w)))
        out.append(ClassMaps(keys=keys, cam=resize_maps(high, output_sizes(h, w)[0]).clamp(0, 1), high_res=high))
    return out


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


def peak_precision(
    peaks: Sequence[Peak], gt_mask: np.ndarray, label_of: Sequence[int] | None = None, void: int = 255
) -> float:
    """Fraction of peaks that fall inside a ground-truth region of their own class (NaN when no peaks).

    `label_of[k]` is the ground-truth id of model class k (identity when None). A peak on a void pixel
    (`void`, 255 in VOC, mostly object boundaries) counts as NOT inside: a peak should sit on the object,
    and counting void as a hit would reward peaks on boundaries.
    """
    gt = np.asarray(gt_mask)
    if gt.ndim != 2:
        raise DataError(f"peak_precision expects a (H, W) ground-truth mask, got shape {gt.shape}.")
    if len(peaks) == 0:
        return float("nan")
    hits = 0
    for p in peaks:
        if not (0 <= p.y < gt.shape[0] and 0 <= p.x < gt.shape[1]):
            raise DataError(f"peak at ({p.y}, {p.x}) is outside the {gt.shape} mask; masks must have the image's size.")
        label = p.class_id if label_of is None else label_of[p.class_id]
        value = int(gt[p.y, p.x])
        hits += value != void and value == label
    return hits / len(peaks)


def _voc_ap(tp: np.ndarray, num_gt: int) -> float:
    """VOC 2010+ AP: area under the precision envelope (all-point interpolation)."""
    fp = 1 - tp
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    recall = tp_c / num_gt
    precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def instance_ap(
    pred_instances_per_image: Sequence[Sequence[Instance]],
    gt_masks: Sequence[np.ndarray],
    iou: float = 0.5,
    classes: Sequence[int] | None = None,
    label_of: Sequence[int] | None = None,
    background: int | None = 0,
    void: int = 255,
) -> dict:
    """Per-class mask AP (VOC-style, all-point interpolation) and mAP at an IoU threshold (mAP^r@iou).

    APPROXIMATION: the ground-truth instances are the connected components (8-connectivity) of each class
    in the semantic masks, because only semantic masks are available here. Touching objects of one class
    merge into one instance, except where void boundaries separate them (as VOC's 255 borders often do);
    numbers are therefore not comparable one-to-one with SBD/VOC instance-annotation results. The returned
    dict says so under "gt_instances".

    Matching as the VOC detection protocol: predictions of a class over all images, by score descending;
    each is a true positive if its best-IoU ground-truth instance in its image is >= `iou` and not taken
    yet. IoU ignores void pixels. `classes` are ground-truth ids to evaluate (default: every id in the
    masks except `background` and `void`); `label_of[k]` maps an instance's class k to its ground-truth id.
    AP is None for a class without ground-truth instances; mAP averages the classes that have some.
    """
    if len(pred_instances_per_image) != len(gt_masks):
        raise DataError(f"{len(pred_instances_per_image)} prediction lists but {len(gt_masks)} ground-truth masks.")
    if not 0 < iou <= 1:
        raise ConfigError(f"iou must be in (0, 1], got {iou}.")
    gts = [np.asarray(g) for g in gt_masks]
    for i, g in enumerate(gts):
        if g.ndim != 2:
            raise DataError(f"ground-truth mask {i} has shape {g.shape}; expected (H, W) class ids.")
    if classes is None:
        present = set().union(*(np.unique(g).tolist() for g in gts)) if gts else set()
        classes = sorted(c for c in present if c != void and c != background)
    classes = [int(c) for c in classes]

    def gt_label(inst: Instance) -> int:
        return int(inst.class_id if label_of is None else label_of[inst.class_id])

    structure = np.ones((3, 3), dtype=bool)
    ap: dict[int, float | None] = {}
    num_gt: dict[int, int] = {}
    num_pred: dict[int, int] = {}
    for c in classes:
        components = []
        total = 0
        for g in gts:
            comp, n = ndimage.label(g == c, structure=structure)
            components.append((comp, n, np.bincount(comp.ravel(), minlength=n + 1)))
            total += n
        preds = [
            (inst.score, i, inst)
            for i, insts in enumerate(pred_instances_per_image)
            for inst in insts
            if gt_label(inst) == c
        ]
        preds.sort(key=lambda t: -t[0])
        num_gt[c], num_pred[c] = total, len(preds)
        if total == 0:
            ap[c] = None
            continue
        taken = [np.zeros(n + 1, dtype=bool) for _, n, _ in components]
        tp = np.zeros(len(preds))
        for r, (_, i, inst) in enumerate(preds):
            comp, n, sizes = components[i]
            mask = np.asarray(inst.mask, dtype=bool)
            if mask.shape != comp.shape:
                raise DataError(f"instance mask {mask.shape} does not match ground-truth mask {i} {comp.shape}.")
            if n == 0:
                continue
            valid = mask & (gts[i] != void)
            inter = np.bincount(comp[valid], minlength=n + 1)[1:]
            union = valid.sum() + sizes[1:] - inter
            ious = inter / np.maximum(union, 1)
            best = int(np.argmax(ious))
            if ious[best] >= iou and not taken[i][best + 1]:
                taken[i][best + 1] = True
                tp[r] = 1
        ap[c] = _voc_ap(tp, total)
    scored = [v for v in ap.values() if v is not None]
    return {
        "ap": ap,
        "mAP": float(np.mean(scored)) if scored else None,
        "iou": iou,
        "num_gt": num_gt,
        "num_pred": num_pred,
        "gt_instances": "connected components of the semantic masks",
    }
