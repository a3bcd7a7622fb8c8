"""AdvCAM the way the reference code runs it: one image, one scale, one class at a time.

This is the oracle the batched `advcam_maps` is tested against (maps must agree to 1e-4) and the baseline
its speed is measured against. It keeps the reference's structure on purpose: Grad-CAM from a second
backward pass (gradients at the classifier's input features, weights = spatial sum / count of positive
gradient entries, `gap2d_pos`), parameters left trainable (weight gradients computed and discarded),
`model.zero_grad()` every step, and the step/clamp of `adv_climb` on the [image, flip] pair.
Do not use it for real work.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from frugalseg.weak.advcam import AdvCAMConfig
from frugalseg.weak.cam import ClassMaps, finish_maps, scaled, with_flips


def _gradcam(model: torch.nn.Module, feats: torch.Tensor, outputs: torch.Tensor, c: int) -> torch.Tensor:
    """Grad-CAM per batch item (2, h, w) as the reference computes it (hook gradients are constants)."""
    target = F.relu(outputs).sum(dim=(2, 3))[:, c].sum()
    (grads,) = torch.autograd.grad(target, feats, retain_graph=True)
    weights = grads.sum(dim=(2, 3)) / (torch.sum(grads > 0) + 1e-12)  # gap2d_pos
    return F.relu((weights[:, :, None, None] * feats).sum(1))


def _adv_climb(x: torch.Tensor, step_size: float, grad: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    step = step_size * grad / (grad.abs().max() + 1e-12)
    return torch.clamp(x + step, lo, hi)


def advcam_reference(model: torch.nn.Module, image: torch.Tensor, tags: Sequence[int], cfg: AdvCAMConfig | None = None) -> ClassMaps:
    """AdvCAM maps of one image (3, H, W) in [0, 1] for `tags`, by the reference's plain loops."""
    cfg = cfg or AdvCAMConfig()
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:  # the reference leaves every parameter trainable during the climb
            p.requires_grad_(True)
        return _advcam_reference(model, image, tags, cfg)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _advcam_reference(model: torch.nn.Module, image: torch.Tensor, tags: Sequence[int], cfg: AdvCAMConfig) -> ClassMaps:
    per_class: dict[int, list[torch.Tensor]] = {int(c): [] for c in tags}
    weight = model.classifier.weight
    bias = model.classifier.bias
    for s in cfg.scales:
        x0 = with_flips(model.normalise(scaled(image[None], s)))
        for c in tags:
            c = int(c)
            x = x0.clone()
            lo, hi = x0.min(), x0.max()
            acc = init = None
            for it in range(cfg.steps_at(s)):
                x = x.detach().requires_grad_(True)
                feats = model.backbone(x)[-1]
                outputs = F.conv2d(feats, weight, bias)
                if cfg.gradcam_scale:
                    gcam = _gradcam(model, feats, outputs, c)
                else:
                    gcam = F.relu(F.conv2d(feats, weight[c : c + 1]))[:, 0]
                regions = gcam[0] + gcam[1].flip(-1)
                if it == 0:
                    init = regions.detach()
                    acc = torch.zeros_like(init)
                acc = acc + regions.detach()
                logit = F.relu(outputs).mean(dim=(2, 3))
                if cfg.suppress == "tagged":
                    keep = torch.zeros(logit.shape[1], dtype=torch.bool)
                    keep[list(tags)] = True
                    logit_loss = -2 * logit[:, c].sum() + logit[:, keep].sum()
                else:
                    logit_loss = -2 * logit[:, c].sum() + logit.sum()
                expanded_mask = torch.zeros_like(regions)
                expanded_mask[regions / regions.max().clamp_min(1e-12) > cfg.mask_threshold] = 1
                l_ad = torch.sum(torch.abs(regions - init) * expanded_mask)
                loss = -logit_loss - cfg.restriction * l_ad
                model.zero_grad()
                loss.backward()
                if cfg.clamp == "previous":
                    lo, hi = x.detach().min(), x.detach().max()
                x = _adv_climb(x.detach(), cfg.step_size, x.grad, lo, hi)
            per_class[c].append(acc)
    keys = torch.as_tensor([int(c) for c in tags], dtype=torch.long)
    scale_maps = [torch.stack([per_class[int(c)][si] for c in tags]) for si in range(len(cfg.scales))]
    return finish_maps(scale_maps, keys, tuple(image.shape[-2:]), cfg.high_res)
