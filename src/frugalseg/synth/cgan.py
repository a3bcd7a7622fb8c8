"""Losses and sampling of the mask → image conditional GAN (pix2pix's objective, pix2pixHD's options).

Discriminators see the condition concatenated with an image (real or generated), as in pix2pix: they
judge whether the image fits *this* mask, not only whether it looks real.

- Adversarial loss: LSGAN (least squares, pix2pixHD's default: steadier on small sets) or vanilla (BCE,
  pix2pix). The discriminator's loss is halved (pix2pix: D learns more slowly than G).
- L1 to the real image, λ 100 (pix2pix): the low frequencies; the PatchGAN judges texture.
- Feature matching, λ 10 (pix2pixHD): L1 between the discriminator's intermediate activations on the real
  and the generated image, each of the n_layers + 1 layers weighted 4 / (n_layers + 1) and each scale
  1 / num_D, as pix2pixHD weighs them.

Images are in [-1, 1] inside the GAN; `render` returns [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.models.gan import pad_to_multiple
from frugalseg.synth.conditioning import condition

__all__ = ["adversarial_loss", "discriminator_features", "discriminator_loss", "generator_loss", "render", "render_mask"]

GAN_LOSSES = ("lsgan", "vanilla")


def discriminator_features(disc: nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per scale, every layer's output (the last one the logits); one scale for a single PatchGAN."""
    feats = disc.features(x)
    return feats if isinstance(feats[0], list) else [feats]


def adversarial_loss(logits: torch.Tensor, target_real: bool, kind: str) -> torch.Tensor:
    if kind == "lsgan":
        return F.mse_loss(logits, torch.full_like(logits, 1.0 if target_real else 0.0))
    if kind == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if target_real else 0.0))
    raise ValueError(f"unknown GAN loss '{kind}' (choose from {', '.join(GAN_LOSSES)})")


def discriminator_loss(disc: nn.Module, cond: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                       kind: str = "lsgan") -> torch.Tensor:
    """0.5 · (real → 1, generated → 0), averaged over the discriminator's scales; `fake` is detached here."""
    real_out = discriminator_features(disc, torch.cat([cond, real], 1))
    fake_out = discriminator_features(disc, torch.cat([cond, fake.detach()], 1))
    terms = [adversarial_loss(r[-1], True, kind) + adversarial_loss(f[-1], False, kind)
             for r, f in zip(real_out, fake_out)]
    return 0.5 * torch.stack(terms).mean()


def generator_loss(disc: nn.Module, cond: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, kind: str = "lsgan",
                   l1_weight: float = 100.0, fm_weight: float = 10.0) -> dict[str, torch.Tensor]:
    """{'loss', 'adversarial', 'l1', 'feature_matching'}: the generator's objective and its terms."""
    fake_out = discriminator_features(disc, torch.cat([cond, fake], 1))
    adv = torch.stack([adversarial_loss(f[-1], True, kind) for f in fake_out]).mean()
    l1 = F.l1_loss(fake, real)
    fm = fake.new_zeros(())
    if fm_weight > 0:
        with torch.no_grad():
            real_out = discriminator_features(disc, torch.cat([cond, real], 1))
        n_d = len(fake_out)
        for f_scale, r_scale in zip(fake_out, real_out):
            layers = len(f_scale) - 1  # the intermediate layers; the logits are the adversarial term's
            for f, r in zip(f_scale[:-1], r_scale[:-1]):
                fm = fm + (4.0 / layers) / n_d * F.l1_loss(f, r)
    loss = adv + l1_weight * l1 + fm_weight * fm
    return {"loss": loss, "adversarial": adv.detach(), "l1": l1.detach(), "feature_matching": fm.detach()}


@torch.no_grad()
def render(generator: nn.Module, cond: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] for conditions (B, C, H, W) of any size: padded (replicated edges) to the generator's
    multiple and cropped back. Call `generator.sample_mode()` first for dropout noise (a new draw per call)."""
    x, (h, w) = pad_to_multiple(cond, 2 ** generator.depth)
    return (generator(x)[..., :h, :w] + 1) / 2


def render_mask(generator: nn.Module, mask: np.ndarray, num_classes: int, noise_seed: int) -> np.ndarray:
    """One (H, W) class-id mask → an (H, W, 3) uint8 image; `noise_seed` fixes the generator's dropout noise, so
    a pair is reproducible (and a resumed sampling draws what the first one would have)."""
    device = next(generator.parameters()).device
    torch.manual_seed(noise_seed)
    cond = condition(torch.from_numpy(mask.astype(np.int64))[None], num_classes).to(device)
    return render(generator, cond)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
