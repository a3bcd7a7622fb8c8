"""AdvCAM: anti-adversarial climbing (Lee, Kim, Yoon, CVPR 2021), batched over classes and images.

For each tagged class c of an image, starting from the image x0 (in the classifier's normalised input
space, like the reference) and its horizontal flip, T steps of

    L   = y_c - sum_{k != c} y_k  -  lambda * sum( M * |A_t - A_0| )
    x  <- clamp(x + xi * dL/dx / max|dL/dx|)

where y are the scores GAP(ReLU(class maps)) (the reference inserts the ReLU), the sum runs over *all*
classes, A_t is the class map of step t merged over the image and its flip, and M = 1(A_t > tau * max A_t)
is rebuilt at every step (not accumulated). The maps of steps 0..T-1 are summed, then (over scales) the
usual CAM post-processing applies: resize, sum, per-class max normalisation.

Matching the reference where it matters:
- A_t is the reference's Grad-CAM, which at the classifier's input layer is a positively rescaled CAM:
  gcam_b = ReLU(cam_c^b) * N_b / (K+ (N_0 + N_1)), with N_b the positive pixels of cam_c in item b and
  K+ the positive weights of class c (derivation in the reference notes). The factor is a constant of the
  step (no gradient). `gradcam_scale=False` uses raw CAM values instead, which makes lambda ~hw/(2K+)
  times stronger: the scale of A_t is what lambda is calibrated against.
- The gradient's max-normalisation and the clamp act per (image, class) pair, jointly over the image and
  its flip. The clamp range is the original image's [min, max] (`clamp="original"`, what the reference's
  comment intends) or the previous iterate's (`clamp="previous"`, what its code does; the range can only
  shrink).
- At scale 0.5 the reference runs T // 2 steps; its `mul_for_scale` bug weights every scale equally,
  which is what happens here.

Why it is fast: every (image, class) pair of a batch climbs in one tensor; one forward and one backward
(to the input only: parameters are frozen for the duration) per step; Grad-CAM from the forward pass;
BatchNorm folded into the convolutions (running statistics, frozen weights: exact); on CPU, the input
gradient of dilated depthwise convolutions computed as a forward convolution (see `DepthwiseInputGrad`);
channels-last layout; no host synchronisation inside the loop; bf16 autocast on GPU. The reference runs
one class of one image at a time with an extra backward for Grad-CAM and weight gradients it never uses.
"""

from __future__ import annotations

import contextlib
from copy import deepcopy
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.weak.cam import (
    DEFAULT_SCALES,
    ClassMaps,
    HighResMode,
    check_batch,
    finish_maps,
    scaled,
    with_flips,
)


@dataclass
class AdvCAMConfig:
    steps: int = 27
    step_size: float = 0.08  # xi
    restriction: float = 7.0  # lambda (fractional values allowed, unlike the reference's argparse int)
    mask_threshold: float = 0.5  # tau
    scales: tuple[float, ...] = DEFAULT_SCALES
    half_steps_scales: tuple[float, ...] = (0.5,)  # scales that run steps // 2, as the reference does at 0.5
    gradcam_scale: bool = True
    clamp: Literal["original", "previous"] = "original"
    suppress: Literal["all", "tagged"] = "all"  # which other classes' scores are pushed down
    fold_bn: bool = True  # climb on a copy with BatchNorm folded into the convolutions (exact, faster)
    # on CPU, dilated depthwise convolutions get their input gradient from a forward convolution (exact, faster)
    depthwise_input_grad: bool = True
    # bf16 autocast of the network passes: "auto" = on GPU only; "bf16" = also on CPU (1.6x per step on a CPU
    # with avx512_bf16; maps then differ from float32 at the 1e-2 level); "off" = float32 everywhere.
    autocast: Literal["auto", "bf16", "off"] = "auto"
    high_res: HighResMode = "resize"  # the image-size map: stretched, or IRN's stride-16 up-size then crop

    def steps_at(self, scale: float) -> int:
        return self.steps // 2 if scale in self.half_steps_scales else self.steps


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """requires_grad=False on every parameter for the duration (only the input gradient is needed)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def channels_last(model: torch.nn.Module) -> Iterator[None]:
    """Run the climb in channels-last layout (measured 1.5x faster on a 2-core CPU for lite0; the usual
    layout for AMP convolutions on GPU), restoring the model's layout afterwards."""
    try:
        model.to(memory_format=torch.channels_last)
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def gradcam_factor(cam_pairs: torch.Tensor, kplus: torch.Tensor) -> torch.Tensor:
    """The reference Grad-CAM's per-item scale N_b / (K+ (N_0 + N_1)) for (J, 2, h, w) pre-ReLU maps."""
    n = (cam_pairs > 0).flatten(2).sum(2).float()  # (J, 2)
    return n / (kplus[:, None] * n.sum(1, keepdim=True) + 1e-12)


def climb_scale(
    model: torch.nn.Module,
    x0: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    cfg: AdvCAMConfig,
    tagged_mask: torch.Tensor | None = None,
    trace: list | None = None,
) -> torch.Tensor:
    """Anti-adversarial climbing of J (image, class) pairs at one scale; returns the summed maps (J, h, w).

    x0: (J, 3, H, W) normalised images, one per pair (an image with m tags appears m times);
    targets: (J,) class ids; tagged_mask: (J, K) 1 for the pair's image tags (for suppress="tagged"); `trace`, if a list,
    receives each step's (2J, 3, H, W) input (for tests and inspection).
    """
    weight = model.classifier.weight.flatten(1)  # (K, C)
    bias = model.classifier.bias
    kplus = (weight[targets] > 0).sum(1).float()  # (J,)
    j = x0.shape[0]
    idx = torch.arange(j, device=x0.device)
    x = with_flips(x0).contiguous(memory_format=torch.channels_last)  # (2J, 3, H, W)
    if cfg.clamp == "original":
        lo = x.unflatten(0, (j, 2)).flatten(1).amin(1)
        hi = x.unflatten(0, (j, 2)).flatten(1).amax(1)
    use_amp = cfg.autocast == "bf16" or (cfg.autocast == "auto" and x.device.type == "cuda")
    acc = init = None
    for t in range(steps):
        x = x.detach().requires_grad_(True)
        if trace is not None:
            trace.append(x.detach().clone())
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            maps = model.maps_normalised(x)
        maps = maps.float()  # (2J, K, h, w)
        pairs = maps.unflatten(0, (j, 2))  # (J, 2, K, h, w)
        cam = pairs[idx, :, targets]  # (J, 2, h, w) pre-ReLU target maps
        if bias is not None:
            cam_w = cam - bias[targets].float()[:, None, None, None]  # Grad-CAM sees W.f without the bias
        else:
            cam_w = cam
        if cfg.gradcam_scale:
            gcam = F.relu(cam_w) * gradcam_factor(cam, kplus).detach()[..., None, None]
        else:
            gcam = F.relu(cam_w)
        regions = gcam[:, 0] + gcam[:, 1].flip(-1)  # (J, h, w)
        if t == 0:
            init = regions.detach()
            acc = torch.zeros_like(init)
        acc = acc + regions.detach()
        if t == steps - 1:
            break  # the reference never evaluates the map of x_T, and the last step's update is unused
        scores = F.relu(pairs).mean(dim=(3, 4))  # (J, 2, K)
        if cfg.suppress == "tagged" and tagged_mask is not None:
            others = (scores * tagged_mask[:, None, :]).sum(2)
        else:
            others = scores.sum(2)
        target_score = scores[idx, :, targets]  # (J, 2)
        objective = (2 * target_score - others).sum(1)  # y_c - sum_{k != c} y_k, over image + flip
        peak = regions.detach().flatten(1).amax(1).clamp_min(1e-12)
        mask = (regions.detach() / peak[:, None, None]) > cfg.mask_threshold
        penalty = ((regions - init).abs() * mask).flatten(1).sum(1)
        loss = (objective - cfg.restriction * penalty).sum()
        (grad,) = torch.autograd.grad(loss, x)
        grad = grad.unflatten(0, (j, 2))
        step = cfg.step_size * grad / (grad.abs().flatten(1).amax(1).view(j, 1, 1, 1, 1) + 1e-12)
        xp = x.detach().unflatten(0, (j, 2))
        if cfg.clamp == "previous":
            lo = xp.flatten(1).amin(1)
            hi = xp.flatten(1).amax(1)
        xn = torch.maximum(torch.minimum(xp + step, hi.view(j, 1, 1, 1, 1)), lo.view(j, 1, 1, 1, 1))
        x = xn.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    return acc


def advcam_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    tags: Sequence[Sequence[int]],
    cfg: AdvCAMConfig | None = None,
    max_pairs: int | None = None,
) -> list[ClassMaps]:
    """AdvCAM maps of same-size images (B, 3, H, W) in [0, 1] for their tagged classes.

    `model` is a `TagClassifier` in eval mode. `max_pairs` bounds how many (image, class) pairs climb in
    one tensor (memory); by default all of the batch do.
    """
    cfg = cfg or AdvCAMConfig()
    num_classes = model.classifier.out_channels
    check_batch(images, tags, num_classes, "advcam_maps")
    pair_image = torch.as_tensor([b for b, t in enumerate(tags) for _ in t], dtype=torch.long)
    pair_class = torch.as_tensor([int(c) for t in tags for c in t], dtype=torch.long)
    no_keys = torch.zeros(0, dtype=torch.long)
    out_empty = [finish_maps([], no_keys, tuple(images.shape[-2:])) for _ in tags]
    if len(pair_class) == 0:
        return out_empty
    device = images.device
    tagged = torch.zeros(len(tags), num_classes, device=device)
    for b, t in enumerate(tags):
        tagged[b, list(t)] = 1.0
    per_pair: list[list[torch.Tensor]] = [[] for _ in pair_class]
    chunk = max_pairs or len(pair_class)
    model.eval()
    if cfg.fold_bn:
        model = fold_batchnorm(model)
    if cfg.depthwise_input_grad and device.type == "cpu":
        model = with_depthwise_input_grad(model, copy=not cfg.fold_bn)
    with frozen_parameters(model), channels_last(model):
        for s in cfg.scales:
            xs = model.normalise(scaled(images, s))
            for start in range(0, len(pair_class), chunk):
                sl = slice(start, start + chunk)
                pi, pc = pair_image[sl].to(device), pair_class[sl].to(device)
                acc = climb_scale(model, xs[pi], pc, cfg.steps_at(s), cfg, tagged[pi])
                for k in range(acc.shape[0]):
                    per_pair[start + k].append(acc[k])
    out: list[ClassMaps] = []
    k = 0
    for b, t in enumerate(tags):
        if not t:
            out.append(out_empty[b])
            continue
        scale_maps = [torch.stack([per_pair[k + i][si] for i in range(len(t))]) for si in range(len(cfg.scales))]
        out.append(finish_maps(scale_maps, torch.as_tensor(list(t), dtype=torch.long), tuple(images.shape[-2:]),
                               cfg.high_res))
        k += len(t)
    return out


def count_passes(tags_per_image: Sequence[int], cfg: AdvCAMConfig) -> dict[str, float]:
    """Forward/backward passes per image: the reference loop vs this batched climb.

    Reference: per class and scale, T steps of one forward + two backwards (Grad-CAM, then the loss).
    Batched: per scale, T steps of one forward and one input-only backward for all classes at once (the
    last step needs the forward only). The floor is one forward+backward per step and scale: the climb is
    sequential in t, so no batching removes it, and the batched climb sits on it; what is left to gain is
    cheaper passes (fewer FLOPs or better kernels), not fewer.
    """
    steps = sum(cfg.steps_at(s) for s in cfg.scales)
    mean_tags = sum(tags_per_image) / max(1, len(tags_per_image))
    return {
        "reference_forward_per_image": mean_tags * steps,
        "reference_backward_per_image": mean_tags * steps * 2,
        "batched_forward_per_image": steps,
        "batched_backward_per_image": steps - len(cfg.scales),
        "floor_forward_per_image": steps,
        "floor_backward_per_image": steps - len(cfg.scales),
        "mean_tags_per_image": mean_tags,
    }


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every eval-mode BatchNorm that directly follows a convolution folded into it.

    The climb never updates parameters and runs BN on running statistics, so conv -> BN is one affine
    convolution: folding it is exact up to float rounding and removes the BN passes from every forward and
    backward of the climb (about 15 % of a CPU step for tf_efficientnet_lite0). timm's BatchNormAct2d keeps
    its activation. Pairs are found by definition order of siblings (conv, then its BN), which is how timm
    and torchvision CNNs are written; a BN without a conv right before it is left as it is.
    """
    fused = deepcopy(model).eval()
    for parent in fused.modules():
        names = list(parent._modules)
        for prev, name in zip(names, names[1:]):
            conv, bn = parent._modules[prev], parent._modules[name]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_var is not None and bn.num_features == conv.out_channels):
                continue
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
            with torch.no_grad():
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = shift if conv.bias is None else conv.bias.detach() * scale + shift
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            rest = [m for key, m in bn.named_children()]  # BatchNormAct2d: drop, act
            parent._modules[name] = nn.Sequential(*rest) if rest else nn.Identity()
    return fused


class _DepthwiseInputGradFn(torch.autograd.Function):
    """Stride-1 depthwise convolution with a frozen kernel whose backward gives the input gradient only,
    as the forward convolution of the output gradient with the flipped kernel (padding d(k-1)-p)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.padding, ctx.dilation = padding, dilation
        return F.conv2d(x, weight, bias, 1, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        k, d, p = weight.shape[-2:], ctx.dilation, ctx.padding
        back_pad = tuple(d[i] * (k[i] - 1) - p[i] for i in range(2))
        flipped = weight.flip(-1, -2).to(grad.dtype).contiguous(memory_format=torch.channels_last)
        return F.conv2d(grad, flipped, None, 1, back_pad, d, weight.shape[0]), None, None, None, None


class DepthwiseInputGrad(torch.nn.Module):
    """A dilated depthwise `nn.Conv2d` for climbing: same forward, a much cheaper input gradient on CPU.

    Why: with output stride 16 the last backbone stages use dilated depthwise 3x3/5x5 convolutions, and
    oneDNN's backward-data kernel for those is an order of magnitude slower than its forward kernel on
    CPU (benchmarks/attribution.py reports the climb with and without this).
    Mathematically the input gradient of a stride-1 convolution is the convolution of the output
    gradient with the spatially flipped kernel, so it is computed that way: exact up to float rounding.
    Only for frozen kernels (no weight gradient is produced).
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if not x.requires_grad or c.weight.requires_grad:  # a trainable kernel needs autograd's own backward
            return c(x)
        return _DepthwiseInputGradFn.apply(x, c.weight, c.bias, c.padding, c.dilation)

    @staticmethod
    def applies_to(m: torch.nn.Module) -> bool:
        """Plain (not subclassed: timm's Conv2dSame pads in forward) stride-1 dilated depthwise convs with
        numeric zero padding that fits inside the dilated kernel."""
        return (type(m) is torch.nn.Conv2d and m.groups == m.in_channels == m.out_channels > 1
                and m.stride == (1, 1) and max(m.dilation) > 1 and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)
                and all(0 <= m.padding[i] <= m.dilation[i] * (m.kernel_size[i] - 1) for i in range(2)))


def with_depthwise_input_grad(model: torch.nn.Module, copy: bool = True) -> torch.nn.Module:
    """`model` (a copy unless copy=False) with its dilated depthwise convolutions wrapped in
    `DepthwiseInputGrad`; parameters are shared with the wrapped convolutions."""
    out = deepcopy(model) if copy else model
    for parent in list(out.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and DepthwiseInputGrad.applies_to(child):
                parent._modules[name] = DepthwiseInputGrad(child)
    return out
