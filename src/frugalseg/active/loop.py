"""The simulated-oracle loop: train on what is annotated, ask, reveal the ground truth there, repeat.

This is how an active-learning strategy is measured without a person: a pool of images with hidden
ground truth is cut into regions (`RegionPool`); a few random regions start it; each round the
segmenter is trained on the **partial masks** (the truth inside annotated regions, 255 = void
everywhere else, exactly what `frugalseg annotate` writes for a real annotator), the strategy picks the
next regions, and the "oracle" reveals their truth. After each round the model is scored on held-out
images, giving a learning curve of Dice / Jaccard against annotated pixels (or voxels) and regions,
and its area (AULC, the mean score over the annotation budget: one number per run that rewards being
good early, which is what a user with a fixed budget wants).

Strategies (`STRATEGIES_2D`, `STRATEGIES_3D`): `random` regions; `entropy` (the classifier's own
entropy, per pixel, averaged per region); `geometry` (the combined feature + geometric criterion of
Konyushkova et al., pixels as instances: `pixel_uncertainty`); `mc_dropout` (mutual information of
MC-dropout samples, averaged per region); `geometry_region` (the combined criterion with regions as
the instances, one mean prediction per superpixel: right where regions are pure, a diagnostic here).
All ranked strategies share the batch rule of `select_regions` (no two adjacent regions in a round),
so the curves compare scores.
In 3D, over one volume: `plane` (planar patches by branch-and-bound on the combined criterion),
`top_supervoxels` (the same criterion, free supervoxels, as many voxels per round) and `random_plane`.

The segmenter is the project's U-Net (`frugalseg.models.medical.unet2d`, with a little dropout so that
MC-dropout has something to sample; every strategy trains the same network). Volumes are trained slice
by slice: EM sections are anisotropic and a 2D network is what a CPU can retrain every round. Between
rounds the network is fine-tuned from its previous weights (not retrained from scratch), as an
annotation tool would, so a round costs a fixed number of steps whatever the labelled set's size.
`run_loop` writes its state after every round (labelled regions, curve, weights) and resumes from it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.active.acquisition import mc_dropout_probabilities, pixel_uncertainty, region_uncertainty
from frugalseg.active.geometry import RegionGraph, region_graph, region_means, superpixels, supervoxels
from frugalseg.active.planes import best_planar_query, random_planar_query
from frugalseg.active.selection import RegionQuery, random_regions, select_regions
from frugalseg.data.io import atomic_path, write_json
from frugalseg.errors import ConfigError, DataError

__all__ = [
    "LoopSettings", "RegionPool", "STRATEGIES_2D", "STRATEGIES_3D", "aulc", "fit_partial", "foreground_scores",
    "predict_probabilities", "run_loop",
]

log = logging.getLogger(__name__)

IGNORE = 255
STRATEGIES_2D = ("random", "entropy", "geometry", "mc_dropout", "geometry_region")
STRATEGIES_3D = ("plane", "top_supervoxels", "random_plane")


@dataclass
class RegionPool:
    """Images (2D sections, or one 3D volume) with hidden truth, cut into regions with their graphs."""

    images: list[np.ndarray]
    truths: list[np.ndarray]
    regions: list[np.ndarray]
    graphs: list[RegionGraph]
    spacing: tuple[float, ...] | None = None

    @classmethod
    def build(cls, images: Sequence[np.ndarray], truths: Sequence[np.ndarray], n_segments: int,
              compactness: float | None = None, spacing: Sequence[float] | None = None) -> "RegionPool":
        """Superpixels for (H, W) images, supervoxels for a (D, H, W) volume (`spacing` per axis)."""
        if len(images) != len(truths) or not images:
            raise DataError(f"a region pool needs as many truths as images (≥ 1), got {len(images)}, {len(truths)}.")
        regions, graphs = [], []
        for k, (im, gt) in enumerate(zip(images, truths)):
            if im.shape != gt.shape:
                raise DataError(f"pool item {k}: image {im.shape} and truth {gt.shape} differ in size.")
            if im.ndim == 3:
                lab = supervoxels(im, n_segments, compactness if compactness is not None else 0.1, spacing)
            else:
                lab = superpixels(im, n_segments, compactness)
            regions.append(lab)
            graphs.append(region_graph(lab, im, spacing=spacing if im.ndim == 3 else None))
        return cls(list(images), [np.asarray(t) for t in truths], regions, graphs,
                   None if spacing is None else tuple(float(s) for s in spacing))

    @property
    def is_volume(self) -> bool:
        return self.images[0].ndim == 3

    def empty(self) -> list[np.ndarray]:
        """No region labelled yet: one boolean per region and image."""
        return [np.zeros(g.n_regions, bool) for g in self.graphs]

    def partial_masks(self, labelled: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The truth inside labelled regions, 255 elsewhere (what an annotator's answers give)."""
        return [np.where(done[reg], gt, IGNORE).astype(np.int64)
                for done, reg, gt in zip(labelled, self.regions, self.truths)]

    def annotated(self, labelled: Sequence[np.ndarray]) -> tuple[int, int]:
        """(annotated pixels or voxels, annotated regions)."""
        pixels = sum(int(g.sizes[done].sum()) for g, done in zip(self.graphs, labelled))
        return pixels, sum(int(done.sum()) for done in labelled)

    @property
    def total_pixels(self) -> int:
        return sum(int(g.sizes.sum()) for g in self.graphs)


def _sections(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """2D sections to train on: the images themselves, or a volume's slices along its first axis."""
    return [s for im in images for s in (im if im.ndim == 3 else im[None])]


def balanced_class_weights(masks: Sequence[np.ndarray], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights of the annotated pixels' classes, normalised so that the annotated pixels'
    mean weight is 1 (a class with no annotated pixel gets 1; it contributes nothing anyway)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for m in masks:
        labels = m[m != IGNORE]
        counts += np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.from_numpy(w.astype(np.float32))


def fit_partial(model: nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], iterations: int,
                rng: np.random.Generator, batch_size: int = 8, crop: int = 128, lr: float = 1e-3,
                optimizer: torch.optim.Optimizer | None = None, class_balanced: bool = False) -> float:
    """Fine-tune `model` on partial masks (255 = void) for `iterations` steps; returns the last loss.

    Crops are centred on annotated pixels (a random crop of a sparsely annotated image is mostly void
    and teaches nothing), with random flips; cross-entropy ignores void. Volumes train slice by slice.
    `class_balanced` weighs each class by the inverse of its share of the annotated pixels: where the
    foreground is a few percent of a volume (the left atrium), informative queries reveal mostly
    background, and the unweighted loss drifts to all-background predictions.
    """
    secs, msks = _sections(images), _sections(masks)
    coords = [np.argwhere(m != IGNORE) for m in msks]
    counts = np.array([len(c) for c in coords], dtype=np.float64)
    if counts.sum() == 0:
        raise DataError("nothing is annotated yet: the loop needs at least one labelled region to train on.")
    weights = counts / counts.sum()
    class_weight = None  # with class_balanced: from the annotated pixels, at the first batch's class count
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    half = crop // 2
    loss = torch.zeros(())
    for _ in range(iterations):
        xs, ys = [], []
        for k in rng.choice(len(secs), size=batch_size, p=weights):
            cy, cx = coords[k][rng.integers(len(coords[k]))]
            img = np.pad(secs[k], half, mode="reflect")
            msk = np.pad(msks[k], half, mode="constant", constant_values=IGNORE)
            cy, cx = cy + rng.integers(-half // 2, half // 2 + 1), cx + rng.integers(-half // 2, half // 2 + 1)
            cy = int(np.clip(cy, 0, secs[k].shape[0] - 1))
            cx = int(np.clip(cx, 0, secs[k].shape[1] - 1))
            x, y = img[cy:cy + crop, cx:cx + crop], msk[cy:cy + crop, cx:cx + crop]
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            if rng.random() < 0.5:
                x, y = x[::-1], y[::-1]
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        logits = model(x)
        if class_balanced and class_weight is None:
            class_weight = balanced_class_weights(msks, logits.shape[1])
        loss = F.cross_entropy(logits, y, weight=class_weight, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: Sequence[np.ndarray], mc_passes: int = 0,
                          batch_size: int = 8) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Softmax (C, *S) per image (volumes slice by slice) and, with mc_passes ≥ 2, the MC-dropout mutual
    information (*S) per image."""
    model.eval()
    probs, infos = [], []
    for im in images:
        secs = im if im.ndim == 3 else im[None]
        p_out, i_out = [], []
        for b in range(0, len(secs), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(secs[b:b + batch_size])[:, None].astype(np.float32))
            if mc_passes >= 2:
                mean, info = mc_dropout_probabilities(model, x, passes=mc_passes)
                i_out.append(info.numpy())
                p_out.append(torch.softmax(model(x), 1).numpy())
            else:
                p_out.append(torch.softmax(model(x), 1).numpy())
        p = np.concatenate(p_out).transpose(1, 0, 2, 3)  # (C, D, H, W)
        probs.append(p if im.ndim == 3 else p[:, 0])
        if mc_passes >= 2:
            info = np.concatenate(i_out)
            infos.append(info if im.ndim == 3 else info[0])
    return probs, (infos if mc_passes >= 2 else None)


def foreground_scores(probs: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict[str, float]:
    """Dice and Jaccard pooled over all images, per foreground class (1..C-1) and their mean; 255 ignored."""
    n_classes = probs[0].shape[0]
    tp = np.zeros(n_classes)
    fp = np.zeros(n_classes)
    fn = np.zeros(n_classes)
    for p, gt in zip(probs, truths):
        pred = p.argmax(0)
        valid = gt != IGNORE
        for c in range(1, n_classes):
            a, b = (pred == c) & valid, (gt == c) & valid
            tp[c] += (a & b).sum()
            fp[c] += (a & ~b).sum()
            fn[c] += (~a & b).sum()
    fg = slice(1, n_classes)
    dice = 2 * tp[fg] / np.maximum(2 * tp[fg] + fp[fg] + fn[fg], 1)
    jac = tp[fg] / np.maximum(tp[fg] + fp[fg] + fn[fg], 1)
    return {"dice": float(dice.mean()), "jaccard": float(jac.mean())}


def aulc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under the learning curve over its x range, divided by that range: the mean score over the budget."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x[-1] <= x[0]:
        raise ConfigError("a learning curve needs at least two points with growing annotation.")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


@dataclass
class LoopSettings:
    """One simulated-oracle run. per_round: regions per round in 2D; in 3D the voxels per round."""

    strategy: str
    rounds: int = 10
    initial_regions: int = 20
    per_round: int = 40
    seed: int = 0
    iterations_first: int = 300
    iterations_per_round: int = 150
    batch_size: int = 8
    crop: int = 128
    lr: float = 1e-3
    mc_passes: int = 8
    criterion: str = "entropy"
    plane_r: float = 2.0
    plane_radius: float = 16.0
    plane_candidates: int = 10
    plane_grid: int = 24
    class_balanced: bool = False  # inverse-frequency class weights of the annotated pixels (see fit_partial)
    extra: dict = field(default_factory=dict)

    def check(self, volume: bool) -> None:
        allowed = STRATEGIES_3D if volume else STRATEGIES_2D
        if self.strategy not in allowed:
            raise ConfigError(f"unknown strategy '{self.strategy}' for {'a volume' if volume else 'images'}; "
                              f"choose from {', '.join(allowed)}.")
        if self.rounds < 1 or self.per_round < 1 or self.initial_regions < 1:
            raise ConfigError("rounds, per_round and initial_regions must be at least 1.")


def _region_probs(pool: RegionPool, probs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [region_means(p, reg, g.n_regions) for p, reg, g in zip(probs, pool.regions, pool.graphs)]


def _pixel_scores(pool: RegionPool, probs, source: str, criterion: str) -> list[np.ndarray]:
    """Per-region mean of the per-pixel criterion (pixels as instances; see `pixel_uncertainty`)."""
    return [region_means(pixel_uncertainty(p, im, criterion, source, pool.spacing if im.ndim == 3 else None),
                         reg, g.n_regions)
            for p, im, reg, g in zip(probs, pool.images, pool.regions, pool.graphs)]


def _choose_2d(s: LoopSettings, pool: RegionPool, probs, infos, labelled, rng) -> list[RegionQuery]:
    if s.strategy == "random":
        return random_regions(pool.graphs, s.per_round, rng, labelled)
    if s.strategy == "mc_dropout":
        scores = [region_means(info, reg, g.n_regions) for info, reg, g in zip(infos, pool.regions, pool.graphs)]
    elif s.strategy == "geometry_region":  # the papers' region instances: one mean prediction per superpixel
        scores = [region_uncertainty(rp, g, s.criterion, "combined")
                  for rp, g in zip(_region_probs(pool, probs), pool.graphs)]
    else:
        scores = _pixel_scores(pool, probs, "feature" if s.strategy == "entropy" else "combined", s.criterion)
    return select_regions(scores, pool.graphs, s.per_round, labelled)


def _choose_3d(s: LoopSettings, pool: RegionPool, probs, labelled, rng) -> tuple[list[int], dict]:
    """Supervoxels to reveal this round in the one volume, until at least per_round voxels."""
    g, done = pool.graphs[0], labelled[0]
    u = np.where(done, 0.0, _pixel_scores(pool, probs, "combined", s.criterion)[0])
    taken: list[int] = []
    planes, stats = 0, {"bounds": 0, "exact": 0, "exhaustive": 0}
    mask = done.copy()
    while int(g.sizes[taken].sum()) < s.per_round and not mask.all():
        if s.strategy == "top_supervoxels":
            order = np.flatnonzero(~mask)[np.argsort(-u[~mask], kind="stable")]
            need = s.per_round - int(g.sizes[taken].sum())
            cum = np.cumsum(g.sizes[order])
            new = order[:int(np.searchsorted(cum, need)) + 1].tolist()
        else:
            if s.strategy == "plane":
                q = best_planar_query(g.centroids, np.where(mask, 0.0, u), s.plane_r, s.plane_radius,
                                      s.plane_candidates, s.plane_grid, s.plane_grid, exclude=mask)
                for k in stats:
                    stats[k] += getattr(q.stats, k)
            else:
                q = random_planar_query(g.centroids, s.plane_r, s.plane_radius, rng, exclude=mask)
            planes += 1
            new = [r for r in q.regions if not mask[r]]
        if not new:
            break
        taken += new
        mask[new] = True
    return taken, {"planes": planes, **stats}


def run_loop(pool: RegionPool, test_images: Sequence[np.ndarray], test_truths: Sequence[np.ndarray],
             settings: LoopSettings, model_factory: Callable[[], nn.Module], state_dir: Path | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) one simulated-oracle loop; returns {'settings', 'curve': [per round ...]}.

    Each curve point: round, annotated pixels (voxels), their fraction of the pool, regions, Dice,
    Jaccard, seconds for the round's query and for its training.
    """
    settings.check(pool.is_volume)
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    model = model_factory()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    labelled = pool.empty()
    curve: list[dict] = []
    state_file = None if state_dir is None else Path(state_dir) / "state.pt"
    if state_file is not None and state_file.exists():
        saved = torch.load(state_file, map_location="cpu", weights_only=False)
        if not same_settings(saved["settings"], settings):
            raise ConfigError(f"{state_dir} holds a loop with other settings; use a new folder.")
        if [len(done) for done in saved["labelled"]] != [g.n_regions for g in pool.graphs]:
            raise ConfigError(f"{state_dir} was run on other regions (superpixel counts differ: another "
                              "n_segments, data or scikit-image); use a new folder.")
        curve, labelled = saved["curve"], saved["labelled"]
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
    if not curve:  # round 0: a seeded random start, the same for every strategy of a repeat
        start_rng = np.random.default_rng(10_000 + settings.seed)
        for q in random_regions(pool.graphs, settings.initial_regions, start_rng):
            labelled[q.image][q.region] = True
    while len(curve) <= settings.rounds:
        t0 = time.perf_counter()
        r = len(curve)
        info: dict = {}
        if r > 0:  # query with the previous round's model, reveal, then train
            need_mc = settings.strategy == "mc_dropout"
            probs, infos = predict_probabilities(model, pool.images, settings.mc_passes if need_mc else 0)
            if pool.is_volume:
                new, info = _choose_3d(settings, pool, probs, labelled, rng)
                labelled[0][new] = True
            else:
                for q in _choose_2d(settings, pool, probs, infos, labelled, rng):
                    labelled[q.image][q.region] = True
        t_query = time.perf_counter() - t0
        masks = pool.partial_masks(labelled)
        loss = fit_partial(model, pool.images, masks,
                           settings.iterations_first if r == 0 else settings.iterations_per_round, rng,
                           settings.batch_size, settings.crop, settings.lr, optimizer, settings.class_balanced)
        t_train = time.perf_counter() - t0 - t_query
        test_probs, _ = predict_probabilities(model, test_images)
        scores = foreground_scores(test_probs, test_truths)
        pixels, regions = pool.annotated(labelled)
        curve.append({"round": r, "pixels": pixels, "fraction": pixels / pool.total_pixels, "regions": regions,
                      **scores, "loss": loss, "query_s": round(t_query, 3), "train_s": round(t_train, 3), **info})
        if progress is not None:
            progress(f"{settings.strategy} seed {settings.seed} round {r}: {pixels} px, Dice {scores['dice']:.4f}")
        if state_file is not None:
            _save_state(state_file, settings, curve, labelled, model, optimizer, rng)
    return {"settings": _jsonable_settings(settings), "curve": curve,
            "aulc": aulc([c["fraction"] for c in curve], [c["dice"] for c in curve]),
            "aulc_regions": aulc([c["regions"] for c in curve], [c["dice"] for c in curve])}


def _jsonable_settings(settings: LoopSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


def same_settings(saved: dict, settings: LoopSettings) -> bool:
    """Whether a saved run (state or record) was made with `settings`. A field added to `LoopSettings` after
    the run was saved counts as its default: what every run did before the field existed."""
    defaults = _jsonable_settings(LoopSettings(strategy=settings.strategy))
    return {**defaults, **saved} == _jsonable_settings(settings)


def _save_state(state_file: Path, settings: LoopSettings, curve: list[dict], labelled: list[np.ndarray],
                model: nn.Module, optimizer: torch.optim.Optimizer, rng: np.random.Generator) -> None:
    """Everything a resume needs in one file, replaced atomically (a kill leaves the previous round's), and
    the curve beside it as JSON for people and benchmarks."""
    with atomic_path(state_file) as tmp:
        torch.save({"settings": _jsonable_settings(settings), "curve": curve, "labelled": labelled,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, tmp)
    write_json(state_file.with_name("curve.json"), {"settings": _jsonable_settings(settings), "curve": curve})
