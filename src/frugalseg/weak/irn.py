"""Inter-pixel relations (IRN; Ahn, Cho, Kwak, CVPR 2019): from confident seeds to a boundary map, then a
random walk that spreads the class maps inside the boundaries.

CAM seeds are right about *where* an object is and wrong about its extent. IRN learns, from the seeds' own
confident regions, which neighbouring pixels belong together: two pixels both confidently background, or of
the same confident class, should be linked; two of different confident labels should be separated by a
class boundary. A boundary map B (one channel, stride 4) is trained so that the **affinity** of a pair,
a(i, j) = 1 − max_{k on the segment i→j} B(k) (the path maximum: one boundary pixel anywhere between them
cuts the link), is high for linked pairs and low for separated ones. The class maps are then propagated by
a random walk whose transition probabilities come from a(i, j)^β, so each class spreads up to, and not
across, the boundaries.

This module holds the parts that do not depend on a network (usable on any boundary map, tested on small
hand-made inputs):

- `pair_offsets(radius)`: the pairs (i, i + o), one of each (o, −o), within `radius` (IRN: 10 when
  training at stride 4, 5 for the walk); `segment_points(o)`: the pixels on the path from i to i + o.
- `affinity_labels(label, radius)`: per offset and pixel, whether the pair is a background-background
  link, a same-class foreground link, a separated pair, or ignored (either end void / outside).
- `path_affinity(boundary, radius)`: a(i, i + o) for every offset, by shifted maxima over the segment (no
  (HW)² matrix anywhere).
- `affinity_losses(aff, labels)`: IRN's −log a over background links and over foreground links (each
  averaged on its own, then the two averaged) and −log(1 − a) over separated pairs.
- `displacement_losses(disp, labels, offsets)`: the displacement branch's terms (pixels of one foreground
  segment point to one centre: L1 of the difference of their displaced positions; background points nowhere:
  L1 of its displacement).
- `random_walk(maps, boundary, beta, steps, radius)`: the propagation, as repeated local averaging with the
  self-inclusive transition of the reference (A = a^β on pairs within `radius`, 1 on the diagonal; each step
  x_j ← Σ_i x_i A_ij / Σ_i A_ij), 2^8 = 256 steps by default, the input first damped by (1 − B) as the
  reference does. The transition is a sparse matrix (HW × HW with 2·|offsets| + 1 entries a row, never the
  reference's dense (HW)² one), applied `steps` times: O(steps · HW · |offsets|) time.
- `walk_to_labels(walked, keys, bg_threshold)`: the reference's read-out: maps divided by their global
  maximum, a background plane at the threshold (0.25), argmax.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.errors import ConfigError

__all__ = [
    "IRN_BETA", "IRN_RADIUS_TRAIN", "IRN_RADIUS_WALK", "IRN_SEM_BG_THRESHOLD", "IRN_STEPS", "affinity_labels",
    "affinity_losses", "boundary_map", "displacement_losses", "irn_pseudo_mask", "pair_offsets", "path_affinity",
    "random_walk", "segment_points", "train_irn", "walk_cost", "walk_to_labels",
]

IRN_RADIUS_TRAIN = 10  # pairs for the affinity losses, at stride 4
IRN_RADIUS_WALK = 5  # pairs of the random walk
IRN_BETA = 10.0
IRN_STEPS = 256  # the reference squares its transition matrix 8 times: 2^8 steps
IRN_SEM_BG_THRESHOLD = 0.25
_EPS = 1e-5


@lru_cache(maxsize=8)
def pair_offsets(radius: int) -> np.ndarray:
    """(K, 2) offsets (dy, dx) with 0 < |o| < radius, one of each ±o (dy > 0, or dy = 0 and dx > 0)."""
    if radius < 2:
        raise ConfigError(f"the pair radius must be at least 2, got {radius}.")
    out = [(dy, dx) for dy in range(0, radius) for dx in range(-radius + 1, radius)
           if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius]
    return np.array(out, dtype=np.int64)


@lru_cache(maxsize=1024)
def segment_points(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The pixels on the straight path from (0, 0) to (dy, dx), both ends included, in order."""
    n = max(abs(dy), abs(dx))
    pts = []
    for t in range(n + 1):
        p = (int(round(dy * t / n)), int(round(dx * t / n))) if n else (0, 0)
        if not pts or pts[-1] != p:
            pts.append(p)
    return tuple(pts)


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """y[..., i, j] = x[..., i + dy, j + dx], `fill` where that falls outside."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[..., yd, xd] = x[..., ys, xs]
    return out


def affinity_labels(label: np.ndarray | torch.Tensor, radius: int = IRN_RADIUS_TRAIN) -> dict[str, torch.Tensor]:
    """Pair labels from a (H, W) or (B, H, W) label map (0 = background, k = class, 255 = void).

    Returns boolean (B, K, H, W) masks 'bg' (both background), 'fg' (both the same class k > 0) and 'neg'
    (both labelled, different); every other pair (a void or outside end) is in none of them.
    """
    lab = torch.as_tensor(np.asarray(label) if not torch.is_tensor(label) else label).long()
    if lab.ndim == 2:
        lab = lab[None]
    if lab.ndim != 3:
        raise ConfigError(f"affinity labels need a (H, W) or (B, H, W) label map, got {tuple(lab.shape)}.")
    bg, fg, neg = [], [], []
    for dy, dx in pair_offsets(radius):
        other = _shift(lab, int(dy), int(dx), IGNORE_INDEX)
        valid = (lab != IGNORE_INDEX) & (other != IGNORE_INDEX)
        same = lab == other
        bg.append(valid & same & (lab == 0))
        fg.append(valid & same & (lab != 0))
        neg.append(valid & ~same)
    return {"bg": torch.stack(bg, 1), "fg": torch.stack(fg, 1), "neg": torch.stack(neg, 1)}


def path_affinity(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """a(i, i + o) = 1 − max of the boundary on the segment from i to i + o, for every offset of
    `pair_offsets(radius)`: (B, H, W) or (B, 1, H, W) → (B, K, H, W). Pairs leaving the image get 0."""
    if boundary.ndim == 4:
        boundary = boundary[:, 0]
    if boundary.ndim != 3:
        raise ConfigError(f"a boundary map is (B, H, W) or (B, 1, H, W), got {tuple(boundary.shape)}.")
    out = []
    for dy, dx in pair_offsets(radius):
        pts = segment_points(int(dy), int(dx))
        m = torch.stack([_shift(boundary, py, px, 1.0) for py, px in pts], 0).amax(0)
        out.append(1.0 - m)
    return torch.stack(out, 1)


def affinity_losses(aff: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IRN's affinity terms: 'bg' = mean −log a over background links, 'fg' over same-class foreground links,
    'neg' = mean −log(1 − a) over separated pairs, and 'total' = (bg + fg) / 2 / 2 + neg / 2 as the reference
    ((positive + negative) / 2, positive = (bg + fg) / 2). An empty set contributes 0."""
    def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        n = m.sum()
        return (x * m).sum() / n.clamp_min(1)

    bg = masked_mean(-torch.log(aff + _EPS), labels["bg"])
    fg = masked_mean(-torch.log(aff + _EPS), labels["fg"])
    neg = masked_mean(-torch.log(1.0 + _EPS - aff), labels["neg"])
    return {"bg": bg, "fg": fg, "neg": neg, "total": ((bg + fg) / 2 + neg) / 2}


def displacement_losses(disp: torch.Tensor, labels: dict[str, torch.Tensor], radius: int = IRN_RADIUS_TRAIN
                        ) -> dict[str, torch.Tensor]:
    """The displacement branch (instance centres): disp (B, 2, H, W) in pixels of the stride-4 grid.

    Foreground pairs of one class should land on one point: L1 of (o + D(i + o) − D(i)) over 'fg' pairs;
    background should not move: L1 of D over pixels in any 'bg' pair. 'total' = (fg + bg) / 2."""
    terms_fg = []
    for k, (dy, dx) in enumerate(pair_offsets(radius)):
        moved = _shift(disp, int(dy), int(dx), 0.0) - disp
        diff = (moved[:, 0] + float(dy)).abs() + (moved[:, 1] + float(dx)).abs()
        terms_fg.append(diff)
    diff = torch.stack(terms_fg, 1)
    m = labels["fg"]
    fg = (diff * m).sum() / m.sum().clamp_min(1)
    bg_pixels = labels["bg"].any(1)
    bg = (disp.abs().sum(1) * bg_pixels).sum() / bg_pixels.sum().clamp_min(1)
    return {"fg": fg, "bg": bg, "total": (fg + bg) / 2}


def random_walk(maps: torch.Tensor, boundary: torch.Tensor, beta: float = IRN_BETA, steps: int = IRN_STEPS,
                radius: int = IRN_RADIUS_WALK) -> torch.Tensor:
    """Propagate (C, H, W) class maps inside the boundaries of a (H, W) boundary map (same grid).

    Transition as the reference: A_ij = a(i, j)^β for pairs within `radius` (both directions), A_ii = 1,
    column-normalised; x ← x · T, `steps` times (x first multiplied by 1 − B). Each step is a weighted average
    over the pixel's neighbourhood, so values never exceed the input's maximum.
    """
    if maps.ndim != 3 or boundary.shape != maps.shape[-2:]:
        raise ConfigError(f"random_walk needs (C, H, W) maps and an (H, W) boundary on the same grid, got "
                          f"{tuple(maps.shape)} and {tuple(boundary.shape)}.")
    if steps < 0 or beta <= 0:
        raise ConfigError(f"random_walk needs steps ≥ 0 and beta > 0, got {steps}, {beta}.")
    h, w = boundary.shape
    offs = pair_offsets(radius)
    aff = path_affinity(boundary[None].float(), radius)[0].clamp_min(0) ** beta  # (K, H, W): a(i, i + o)
    # the sparse matrix M = Tᵀ (M_ji = A_ij / Σ_i A_ij), so a step is x ← M x with x as (HW, C)
    idx = torch.arange(h * w).view(h, w)
    rows, cols, vals = [idx.reshape(-1)], [idx.reshape(-1)], [torch.ones(h * w)]
    for k, (dy, dx) in enumerate(offs):
        dy, dx = int(dy), int(dx)
        partner = _shift(idx.float(), dy, dx, -1.0).long()
        ok = partner >= 0
        a, i, j = aff[k][ok], idx[ok], partner[ok]
        rows += [i, j]
        cols += [j, i]
        vals += [a, a]
    rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    col_sum = torch.zeros(h * w).index_add_(0, cols, vals)  # Σ_i A_ij for each j, self term included
    # M[j, i] = A_ij / col_sum_j: the entry (row=i, col=j) of A becomes (row=j, col=i) of M
    m = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals / col_sum[cols], (h * w, h * w),
                                check_invariants=False).coalesce()
    with warnings.catch_warnings():  # CSR is "beta" in torch; its mat-vec is 14× faster than COO's here
        warnings.simplefilter("ignore", UserWarning)
        m = m.to_sparse_csr()
    x = (maps.float() * (1.0 - boundary.float())[None]).reshape(maps.shape[0], -1).T.contiguous()
    for _ in range(steps):
        x = m @ x
    return x.T.reshape(maps.shape)


def walk_to_labels(walked: torch.Tensor, keys: np.ndarray | list[int], image_size: tuple[int, int],
                   bg_threshold: float = IRN_SEM_BG_THRESHOLD, background: int = 0) -> np.ndarray:
    """(C, h, w) walked maps at stride 4 → (H, W) class ids: upsample ×4 (bilinear), crop to the image, divide
    by the global maximum, put a background plane at `bg_threshold` first, argmax, map to (`background`, *keys)."""
    h, w = image_size
    up = F.interpolate(walked[None].float(), scale_factor=4, mode="bilinear", align_corners=False)[0]
    if up.shape[-2] < h or up.shape[-1] < w:
        up = F.interpolate(walked[None].float(), size=(max(h, up.shape[-2]), max(w, up.shape[-1])),
                           mode="bilinear", align_corners=False)[0]
    up = up[:, :h, :w]
    up = up / up.max().clamp_min(1e-5)
    planes = torch.cat([torch.full((1, h, w), float(bg_threshold)), up], 0)
    idx = planes.argmax(0).numpy()
    lut = np.concatenate([[background], np.asarray(keys, dtype=np.int64)])
    return lut[idx].astype(np.uint8)


def walk_cost(height: int, width: int, steps: int = IRN_STEPS, radius: int = IRN_RADIUS_WALK) -> float:
    """Multiply-adds per class channel of one walk (for sizing: steps × pixels × (2·offsets + 1))."""
    return float(steps) * height * width * (2 * len(pair_offsets(radius)) + 1)


# ---- training and inference with the network (frugalseg.models.irn.InterPixelNet) --------------------------
def _crop_pair(image: np.ndarray, label: np.ndarray, crop: int, scale: tuple[float, float],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale (bilinear image, nearest label), random crop (image padded 0, label 255), random flip."""
    from PIL import Image

    s = float(rng.uniform(*scale))
    h, w = label.shape
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    out_i = np.zeros((crop, crop, 3), np.uint8)
    out_l = np.full((crop, crop), IGNORE_INDEX, np.uint8)
    y0 = int(rng.integers(0, max(nh - crop, 0) + 1))
    x0 = int(rng.integers(0, max(nw - crop, 0) + 1))
    ch, cw = min(crop, nh), min(crop, nw)
    out_i[:ch, :cw] = image[y0:y0 + ch, x0:x0 + cw]
    out_l[:ch, :cw] = label[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        out_i, out_l = out_i[:, ::-1], out_l[:, ::-1]
    return np.ascontiguousarray(out_i), np.ascontiguousarray(out_l)


def train_irn(net: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]], epochs: int = 3,
              batch_size: int = 8, crop: int = 256, scale: tuple[float, float] = (0.5, 1.5), lr: float = 0.1,
              disp_lr_mult: float = 10.0, weight_decay: float = 1e-4, momentum: float = 0.0,
              radius: int = IRN_RADIUS_TRAIN, seed: int = 0, device: str | torch.device = "cpu",
              progress=None, checkpoint: str | Path | None = None) -> list[float]:
    """Train the branches of `net` on (RGB uint8 image, IR label) pairs; returns the loss of every step.

    IR labels are the confident pseudo-masks of the CRF stage (0 = background, k = class, 255 = the
    unsure band), read at stride 4 (nearest) as the reference's `pil_rescale(label, 0.25, 0)`. Loss:
    the affinity terms plus the displacement terms, halved each (the reference's total). SGD with poly
    decay, the displacement branch at `disp_lr_mult` × lr, as the reference; `momentum=0` reproduces the
    reference's optimiser as it runs (its 0.9 never reaches SGD: psa#28), the default here.
    `checkpoint`: a file the state is saved to after every epoch (atomically) and resumed from, so a killed
    training continues at its last finished epoch with the same crops and learning rates; removed at the end.
    """
    if not pairs:
        raise ConfigError("IRN needs at least one image with a confident pseudo-mask to train on.")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = net.to(device).train()
    disp_params = [p for n, p in net.named_parameters() if n.startswith("disp") and p.requires_grad]
    edge_params = [p for n, p in net.named_parameters() if n.startswith("edge") and p.requires_grad]
    opt = torch.optim.SGD([{"params": edge_params, "lr": lr}, {"params": disp_params, "lr": lr * disp_lr_mult}],
                          lr=lr, momentum=momentum, weight_decay=weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = max(1, len(pairs) // batch_size)
    total = steps_per_epoch * epochs
    losses: list[float] = []
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["total"] != total or state["batch_size"] != batch_size:
            raise ConfigError(f"{ckpt}: an IRN training with other settings; remove it to start again.")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, losses, order = state["step"], state["losses"], state["order"]
    for step in range(start, total):
        if step % steps_per_epoch == 0:
            if ckpt is not None and step > start:
                _save_irn_state(ckpt, step=step, total=total, batch_size=batch_size, net=net.state_dict(),
                                opt=opt.state_dict(), rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                                losses=losses, order=order)
            order = rng.permutation(len(pairs))
        picks = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        crops = [_crop_pair(*pairs[k], crop, scale, rng) for k in picks]
        x = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2).float().div(255).to(device)
        lab = torch.from_numpy(np.stack([c[1][::4, ::4] for c in crops]).astype(np.int64)).to(device)
        boundary, disp = net(x)
        labels = affinity_labels(lab, radius)
        loss = (affinity_losses(path_affinity(boundary, radius), labels)["total"]
                + displacement_losses(disp, labels, radius)["total"]) / 2
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * (1 - step / total) ** 0.9
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, total, losses[-1])
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return losses


def _save_irn_state(path: Path, **state) -> None:
    """Write a training state under a temporary name, then rename it (never half a checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


@torch.no_grad()
def boundary_map(net: torch.nn.Module, image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """The (h, w) boundary at stride 4 of an RGB uint8 image: the mean of the image's and its mirror's
    (the reference's scale 1.0 plus flip)."""
    net = net.to(device).eval()
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)[None].to(device)
    b1, _ = net(x)
    b2, _ = net(torch.flip(x, dims=[-1]))
    return ((b1 + torch.flip(b2, dims=[-1])) / 2)[0, 0].cpu()


def irn_pseudo_mask(boundary: torch.Tensor, high_res: np.ndarray, keys: np.ndarray | list[int],
                    background: int | None = 0, bg_threshold: float = IRN_SEM_BG_THRESHOLD, beta: float = IRN_BETA,
                    steps: int = IRN_STEPS, radius: int = IRN_RADIUS_WALK) -> np.ndarray:
    """An image's pseudo-mask (H, W) in class ids from its maps (n, H, W) and boundary (stride 4): the maps
    at stride 4, walked, read out with a background plane (none when the label set has no background)."""
    keys = np.asarray(keys, dtype=np.int64)
    h, w = high_res.shape[-2:]
    if keys.size == 0:
        return np.full((h, w), background if background is not None else IGNORE_INDEX, np.uint8)
    maps = torch.from_numpy(np.asarray(high_res, np.float32))[None]
    small = F.interpolate(maps, size=tuple(boundary.shape), mode="bilinear", align_corners=False)[0]
    walked = random_walk(small, boundary, beta, steps, radius)
    if background is None:
        up = F.interpolate(walked[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return keys[up.argmax(0).numpy()].astype(np.uint8)
    return walk_to_labels(walked, keys, (h, w), bg_threshold, background)
