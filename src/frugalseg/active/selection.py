"""Which regions to ask about in one round: the top scores, kept apart.

Asking for a batch of regions per round (an annotator answers many at once; the network is retrained
between rounds, not between regions) has a known failure: the top-k scores cluster, because a
classifier unsure about one superpixel is unsure about its neighbours, and k adjacent superpixels along
one boundary teach little more than one. The diversity rule here is the simplest that removes that:
greedily take regions in score order across all images, skipping any region adjacent to one already
taken in this round (and regions already labelled). Only if that leaves fewer than k candidates are
adjacent ones admitted, in score order, so a round always returns k regions while any are left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from frugalseg.active.geometry import RegionGraph
from frugalseg.errors import ConfigError

__all__ = ["RegionQuery", "random_regions", "select_regions"]


@dataclass(frozen=True)
class RegionQuery:
    """One region to annotate: image index (in the order given), region id, its score."""

    image: int
    region: int
    score: float


def _available(graphs: Sequence[RegionGraph], labelled: Sequence[np.ndarray] | None) -> list[np.ndarray]:
    if labelled is None:
        return [np.ones(g.n_regions, bool) for g in graphs]
    if len(labelled) != len(graphs):
        raise ConfigError(f"{len(labelled)} labelled-region masks for {len(graphs)} images.")
    out = []
    for g, done in zip(graphs, labelled):
        done = np.asarray(done, bool)
        if done.shape != (g.n_regions,):
            raise ConfigError(f"labelled mask of shape {done.shape} for {g.n_regions} regions.")
        out.append(~done)
    return out


def select_regions(scores: Sequence[np.ndarray], graphs: Sequence[RegionGraph], k: int,
                   labelled: Sequence[np.ndarray] | None = None, diversity: str = "non_adjacent"
                   ) -> list[RegionQuery]:
    """The k best unlabelled regions over all images, no two adjacent in one round (`diversity`).

    scores: per image, one score per region (higher = ask first); labelled: per image, a boolean per
    region already annotated; diversity: 'non_adjacent' or 'none'.
    """
    if diversity not in ("non_adjacent", "none"):
        raise ConfigError(f"diversity must be 'non_adjacent' or 'none', got '{diversity}'.")
    if len(scores) != len(graphs):
        raise ConfigError(f"{len(scores)} score arrays for {len(graphs)} images.")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}.")
    free = _available(graphs, labelled)
    cand_img, cand_reg, cand_score = [], [], []
    for i, (s, g, f) in enumerate(zip(scores, graphs, free)):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (g.n_regions,):
            raise ConfigError(f"image {i}: {s.shape[0] if s.ndim else 0} scores for {g.n_regions} regions.")
        idx = np.flatnonzero(f)
        cand_img.append(np.full(idx.size, i))
        cand_reg.append(idx)
        cand_score.append(s[idx])
    img, reg, sc = (np.concatenate(a) for a in (cand_img, cand_reg, cand_score))
    order = np.lexsort((reg, img, -sc))  # score descending; ties by image then region (deterministic)
    if diversity == "none":
        return [RegionQuery(int(img[o]), int(reg[o]), float(sc[o])) for o in order[:k]]
    neighbours = [g.neighbours() for g in graphs]
    blocked = [np.zeros(g.n_regions, bool) for g in graphs]
    chosen: list[RegionQuery] = []
    skipped: list[int] = []
    for o in order:
        i, r = int(img[o]), int(reg[o])
        if blocked[i][r]:
            skipped.append(o)
            continue
        chosen.append(RegionQuery(i, r, float(sc[o])))
        blocked[i][r] = True
        blocked[i][neighbours[i][r]] = True
        if len(chosen) == k:
            return chosen
    for o in skipped[:k - len(chosen)]:  # fewer non-adjacent regions than k: admit adjacent ones
        chosen.append(RegionQuery(int(img[o]), int(reg[o]), float(sc[o])))
    return chosen


def random_regions(graphs: Sequence[RegionGraph], k: int, rng: np.random.Generator,
                   labelled: Sequence[np.ndarray] | None = None) -> list[RegionQuery]:
    """k unlabelled regions drawn uniformly over all images' regions (the random baseline; score 0)."""
    free = _available(graphs, labelled)
    pool = [(i, int(r)) for i, f in enumerate(free) for r in np.flatnonzero(f)]
    take = rng.choice(len(pool), size=min(k, len(pool)), replace=False) if pool else []
    return [RegionQuery(pool[t][0], pool[t][1], 0.0) for t in sorted(take)]
