"""Networks of the mask → image conditional GAN (pix2pix / pix2pixHD family, written for this project).

- `UNetGenerator`: pix2pix's U-Net (4×4 stride-2 convolutions down, transposed convolutions up, skip
  connections by concatenation). Its dropout is the generator's only noise source (pix2pix found a noise
  vector ignored), so it stays on when sampling: `sample_mode()` keeps dropout active and normalisation
  as in evaluation. InstanceNorm rather than pix2pix's BatchNorm: with a batch of a few crops of a few
  dozen images, batch statistics are noise, and instance statistics do not change between a 128 px
  training crop and a full-size sample.
- `PatchDiscriminator`: the 70×70 PatchGAN (`n_layers=3`: three stride-2 4×4 convolutions, one stride-1,
  one to a logit map; each logit sees a 70×70 window of the (condition, image) pair). `features` returns
  every layer's activations for pix2pixHD's feature-matching loss.
- `MultiScaleDiscriminator`: pix2pixHD's `num_D` PatchGANs on the pair downsampled by 2 each time (the
  coarser one judges larger structures: a whole cell rather than its texture).

The generator's input size must be a multiple of 2**depth; `pad_to_multiple` / sampling do that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleDiscriminator", "PatchDiscriminator", "UNetGenerator", "pad_to_multiple", "receptive_field"]


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm)
        self.norm = nn.InstanceNorm2d(cout, affine=True) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(F.leaky_relu(x, 0.2)))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
        self.norm = nn.InstanceNorm2d(cout, affine=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.conv(F.relu(x))))


class UNetGenerator(nn.Module):
    """Condition (B, in_ch, H, W) → image (B, out_ch, H, W) in [-1, 1]; H, W multiples of 2**depth.

    Channels double from `ngf` per level up to 8·ngf (pix2pix). The innermost `dropout_levels` decoder
    levels get dropout 0.5 (pix2pix: the three innermost), the generator's noise.
    """

    def __init__(self, in_ch: int, out_ch: int = 3, ngf: int = 32, depth: int = 6, dropout: float = 0.5,
                 dropout_levels: int = 3):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        self.depth = depth
        widths = [min(ngf * 2**i, ngf * 8) for i in range(depth)]
        self.first = nn.Conv2d(in_ch, widths[0], 4, 2, 1)
        # the innermost level has no norm (a 1×1 map at 2**depth inputs: instance statistics of one value)
        self.downs = nn.ModuleList(_Down(widths[i - 1], widths[i], norm=i < depth - 1) for i in range(1, depth))
        ups = []
        for i in range(depth - 1, 0, -1):  # decoder level i maps to encoder level i-1's resolution
            cin = widths[i] if i == depth - 1 else widths[i] * 2
            ups.append(_Up(cin, widths[i - 1], dropout if (depth - 1 - i) < dropout_levels else 0.0))
        self.ups = nn.ModuleList(ups)
        self.last = nn.ConvTranspose2d(widths[0] * 2, out_ch, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2**self.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"generator input {tuple(x.shape[-2:])} must be a multiple of {m} (pad_to_multiple)")
        skips = [self.first(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = torch.cat([up(y), skips.pop()], 1)
        return torch.tanh(self.last(F.relu(y)))

    def sample_mode(self) -> "UNetGenerator":
        """Evaluation mode with dropout on: each call draws another image for the same mask."""
        self.eval()
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.train()
        return self


class PatchDiscriminator(nn.Module):
    """(condition ⊕ image) → a map of real/fake logits, each over a `receptive_field(n_layers)` window."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2))]
        width = ndf
        for i in range(1, n_layers + 1):
            nxt = min(ndf * 2**i, ndf * 8)
            stride = 2 if i < n_layers else 1
            layers.append(nn.Sequential(nn.Conv2d(width, nxt, 4, stride, 1, bias=False),
                                        nn.InstanceNorm2d(nxt, affine=True), nn.LeakyReLU(0.2)))
            width = nxt
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.ModuleList(layers)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output; the last is the logit map."""
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[-1]


class MultiScaleDiscriminator(nn.Module):
    """`num_d` PatchGANs, the k-th on the input average-pooled k times (pix2pixHD). `features` returns one
    list of layer outputs per scale."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3, num_d: int = 2):
        super().__init__()
        self.discs = nn.ModuleList(PatchDiscriminator(in_ch, ndf, n_layers) for _ in range(num_d))

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for k, d in enumerate(self.discs):
            if k:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d.features(x))
        return out


def receptive_field(n_layers: int = 3) -> int:
    """Receptive field of one PatchGAN logit: 70 for n_layers 3 (pix2pix's 70×70 PatchGAN)."""
    rf = 1
    # walk back from the logit: the final 4×4 stride 1, the stride-1 layer, then n_layers stride-2 layers
    for stride in [1, 1] + [2] * n_layers:
        rf = (rf - 1) * stride + 4
    return rf


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) at the bottom/right to multiples of `multiple` (edges replicated: no new boundary in the
    condition); returns the padded tensor and (H, W) to crop back to."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)
