"""Mix-and-Match tuning (Zhan, Liu, Luo, Tang, Loy, AAAI 2018), between proxy pretraining and fine-tuning.

The proxy task taught generic features; M&M pulls them towards the target classes with the few pixel labels
there are, before the segmentation head exists:

- **Mix**: from every image of a batch, patches around seed pixels (side uniform in [64, 256], even, around
  the seed; resized to 128), about 10 % of the seeds on background and the rest on objects; a patch's label
  is its seed pixel's class. The patches of all images are pooled into one set, so one class's patches come
  from many images and scales (the official RandomSamplingLayer: 40 images x 10 patches).
- **Match**: the class-wise graph of the official GraphToTripletLayer. Patches are visited in random order;
  each new node is linked to a random node of its class and a random node of another class among those
  already in the graph (falling back to any such node of the set, or itself for the positive). Each link
  pair is a triplet (anchor, positive, negative).
- Triplet loss on L2-normalised embeddings (the deepest feature map pooled to a 4×4 grid and flattened, as
  the official pool5 keeps its spatial layout) with squared Euclidean distances and margin 2.1:
  L = 1/(2N) Σ max(0, α + ||a − p||² − ||a − n||²).

Not reproduced: the official de-duplication of overlapping patches (> 0.6 overlap) and its 5x oversampling of
candidate seeds; seeds here are drawn uniformly among the pixels of each kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from frugalseg.data.labels import IGNORE_INDEX

__all__ = ["class_graph_triplets", "sample_patches", "triplet_loss"]


def sample_patches(images: torch.Tensor, masks: torch.Tensor, per_image: int = 10, sides: tuple[int, int] = (64, 256),
                   out_size: int = 128, bg_ratio: float = 0.1, background: int | None = 0,
                   ignore_index: int = IGNORE_INDEX, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches (N, C, out, out), labels (N,)) from images (B, C, H, W) and masks (B, H, W).

    Per image: round(per_image * bg_ratio) seeds on background pixels and the rest on other labelled pixels
    (all of one kind where the image has no pixel of the other; images without labelled pixels give none).
    Patches reaching outside the image are zero-padded. `background` None: every class counts as an object."""
    lo, hi = sides
    if not 2 <= lo <= hi:
        raise ValueError(f"patch sides must satisfy 2 <= min <= max, got {sides}")
    g = generator
    half = hi // 2 + 1
    padded = F.pad(images, (half, half, half, half))
    patches, labels = [], []
    for b in range(images.shape[0]):
        m = masks[b]
        valid = m != ignore_index
        is_bg = valid & (m == background) if background is not None else torch.zeros_like(valid)
        kinds = [torch.nonzero(valid & ~is_bg), torch.nonzero(is_bg)]
        n_bg = int(round(per_image * bg_ratio))
        counts = [per_image - n_bg, n_bg]
        if len(kinds[0]) == 0:
            counts = [0, per_image]
        if len(kinds[1]) == 0:
            counts = [per_image, 0] if len(kinds[0]) else [0, 0]
        for pixels, count in zip(kinds, counts):
            for _ in range(count):
                y, x = pixels[int(torch.randint(len(pixels), (1,), generator=g))].tolist()
                side = 2 * int(torch.randint(lo // 2, hi // 2 + 1, (1,), generator=g))
                r = side // 2
                crop = padded[b:b + 1, :, y + half - r:y + half + r, x + half - r:x + half + r]
                patches.append(F.interpolate(crop, size=(out_size, out_size), mode="bilinear", align_corners=False,
                                             antialias=side > out_size))
                labels.append(int(m[y, x]))
    if not patches:
        return images.new_zeros(0, images.shape[1], out_size, out_size), torch.zeros(0, dtype=torch.long)
    return torch.cat(patches), torch.tensor(labels, dtype=torch.long, device=images.device)


def class_graph_triplets(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(T, 3) triplets (anchor, positive, negative) of the official class-wise graph (see the module docstring);
    nodes whose class is the only one in the set get no triplet."""
    lab = labels.tolist()
    n = len(lab)
    order = torch.randperm(n, generator=generator).tolist()

    def pick(options: list[int]) -> int:
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    graph: list[int] = []
    out = []
    for i in order:
        same = [j for j in graph if lab[j] == lab[i]] or [j for j in range(n) if lab[j] == lab[i] and j != i] or [i]
        other = [j for j in graph if lab[j] != lab[i]] or [j for j in range(n) if lab[j] != lab[i]]
        if other:
            out.append((i, pick(same), pick(other)))
        graph.append(i)
    return torch.tensor(out, dtype=torch.long).view(-1, 3)


def triplet_loss(embeddings: torch.Tensor, triplets: torch.Tensor, margin: float = 2.1) -> torch.Tensor:
    """1/(2N) Σ max(0, margin + ||a − p||² − ||a − n||²) over the triplets, on L2-normalised embeddings (so squared
    distances lie in [0, 4] and the margin 2.1 asks negatives to be nearly opposite to positives)."""
    if len(triplets) == 0:
        return embeddings.sum() * 0.0
    e = F.normalize(embeddings, dim=1)
    a, p, n = e[triplets[:, 0]], e[triplets[:, 1]], e[triplets[:, 2]]
    d_ap = (a - p).pow(2).sum(1)
    d_an = (a - n).pow(2).sum(1)
    return F.relu(margin + d_ap - d_an).sum() / (2 * len(triplets))
