"""Adversarial inputs for segmentation networks: FGSM (labelled) and VAT (unlabelled).

Both take a batch `x` of shape (B, C, *spatial) (2D or 3D), run the model on it and return a perturbed
copy, detached. They are what deep co-training feeds to the *other* models (Peng et al. 2020, after
Qiao et al. 2018), and usable on their own.

- `fgsm(model, x, y, eps)`: x + eps · sign(∇_x CE(model(x), y)) (Goodfellow et al. 2015). The sign is
  taken per element, so the perturbation has L∞ norm `eps` in every sample. CE ignores `ignore_index`
  pixels and is summed (not averaged) so an all-void batch gives a zero gradient (no perturbation)
  instead of NaN; the sign does not depend on the scale.
- `vat(model, x, xi, eps)`: virtual adversarial perturbation (Miyato et al. 2018). With p = softmax of
  the clean prediction, start from a random direction d, take `power_iterations` steps of
  d ← normalise(∇_r KL(p ‖ p(x + r)) at r = xi·d), and return x + eps · d. `normalise` is per sample
  over all of (C, *spatial) (L2 norm 1), so `xi` and `eps` are L2 norms of a whole sample's perturbation.

What they guarantee:
- no parameter gradient: the input gradient comes from `torch.autograd.grad(..., inputs=x)`, which
  neither writes `.grad` of any parameter nor computes weight gradients;
- the model's training state is restored: by default the attack runs in eval mode (as the reference
  FSGMGenerator/VATGenerator do: no dropout, BatchNorm on running statistics, nothing updated) and every
  submodule's `training` flag is put back afterwards. `eval_mode=False` keeps the caller's mode but
  freezes BatchNorm running statistics (batch statistics are still used), so an attack never changes
  the model's state either way;
- `clamp=(lo, hi)` clips the result to the valid intensity range; the reference clips to [0, 1]
  (ACDC slices are in [0, 1]). None = no clipping.

On `xi`: the reference co-training code uses xi = 1e-6 (Miyato's value). In float32 that probe is
below the rounding of the intensities it is added to (on a 256×256 slice it is 4e-9 per pixel), so the
finite difference measures rounding noise: on ACDC slices with the frugalseg U-Net the resulting
direction has a cosine of only 0.15–0.25 with the float64 power-iteration direction (0.9997 with
xi = 1e-3). Callers should use xi ≈ 1e-3 (the co-training config's default); VAT also runs with
autocast disabled for the same reason (a bf16 finite difference is noise).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.models import first_output

__all__ = ["attack_mode", "batchnorm_statistics_frozen", "fgsm", "kl_divergence", "l2_normalize", "vat"]


@contextlib.contextmanager
def batchnorm_statistics_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Forward passes in training mode that normalise with their batch's statistics but leave the running
    statistics (what eval mode uses) untouched, restored after.

    Why: inputs that are not data (adversarial examples) would otherwise move the running means and variances
    that every evaluation normalises with."""
    frozen = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    try:
        for m in frozen:
            m.track_running_stats = False
        yield model
    finally:
        for m in frozen:
            m.track_running_stats = True


@contextlib.contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run an attack without changing the model: eval mode (or frozen BatchNorm statistics), restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        if eval_mode:
            model.eval()
            yield model
        else:
            with batchnorm_statistics_frozen(model):
                yield model
    finally:
        for m, training in modes.items():
            m.training = training


def l2_normalize(d: torch.Tensor, eps: float = 1e-16) -> torch.Tensor:
    """Each sample of (B, ...) scaled to L2 norm 1 over all its elements (all-zero samples stay zero)."""
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.ndim - 1)))
    return d / (norm + eps)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(softmax(p) ‖ softmax(q)) over the class axis 1: shape (B, *spatial)."""
    log_p = F.log_softmax(p_logits.float(), dim=1)
    log_q = F.log_softmax(q_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def _clamp(x: torch.Tensor, clamp: Sequence[float] | None) -> torch.Tensor:
    return x if clamp is None else x.clamp(float(clamp[0]), float(clamp[1]))


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    ignore_index: int = IGNORE_INDEX,
    *,
    clamp: Sequence[float] | None = None,
    eval_mode: bool = True,
) -> torch.Tensor:
    """x + eps · sign(∇_x CE(model(x), y)), detached; `y` is (B, *spatial) class ids (void = ignore_index)."""
    if y.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"fgsm: target shape {tuple(y.shape)} does not match input {tuple(x.shape)} (B, *spatial).")
    with attack_mode(model, eval_mode), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        logits = first_output(model(x_in))
        loss = F.cross_entropy(logits.float(), y.long(), ignore_index=ignore_index, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_in)
    return _clamp(x.detach() + eps * grad.sign(), clamp).detach()


def vat(
    model: nn.Module,
    x: torch.Tensor,
    xi: float,
    eps: float,
    power_iterations: int = 1,
    *,
    clamp: Sequence[float] | None = None,
    eval_mode: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x + eps · (the per-sample unit direction that most increases KL(p(x) ‖ p(x + r))), detached."""
    if power_iterations < 1:
        raise ValueError(f"vat: power_iterations must be >= 1, got {power_iterations}.")
    x = x.detach()
    device_type = x.device.type
    with attack_mode(model, eval_mode), torch.autocast(device_type, enabled=False), torch.enable_grad():
        xf = x.float()
        with torch.no_grad():
            clean = first_output(model(xf)).float()
        d = torch.randn(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
        d = l2_normalize(d.to(xf))
        for _ in range(power_iterations):
            r = (xi * d).requires_grad_(True)
            distance = kl_divergence(clean, first_output(model(xf + r))).mean()
            (grad,) = torch.autograd.grad(distance, r)
            d = l2_normalize(grad.detach())
    return _clamp(x + (eps * d).to(x.dtype), clamp).detach()
