"""Reproducible label budgets: which samples may train with masks, which with tags, which with nothing.

The same (dataset, budget, seed) always gives the same split, so every method in frugalseg is
benchmarked on identical labelled sets. The chosen ids are written to the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from frugalseg.data.samples import SegDataset
from frugalseg.errors import ConfigError


@dataclass(frozen=True)
class LabelBudget:
    """Masks for a fraction, a count, or listed ids; the rest get tags (`rest="tags"`) or nothing.

    `listed` ids win over fraction/count (e.g. the SSL4MIS protocol labels the first N slices).
    """

    mask_fraction: float | None = None
    mask_count: int | None = None
    listed: tuple[str, ...] | None = None
    rest: Literal["tags", "none"] = "tags"
    seed: int = 0

    def describe(self) -> str:
        if self.listed is not None:
            what = f"{len(self.listed)} listed ids"
        elif self.mask_count is not None:
            what = f"{self.mask_count} images"
        else:
            what = f"{self.mask_fraction:.0%} of images"
        return f"masks for {what} (seed {self.seed}), {self.rest} for the rest"


def apply_budget(ds: SegDataset, budget: LabelBudget) -> SegDataset:
    """Set each sample's supervision according to the budget. Ground truth stays for evaluation."""
    with_mask = [s.id for s in ds.samples if s.mask is not None]
    if budget.listed is not None:
        unknown = sorted(set(budget.listed) - {s.id for s in ds.samples})
        if unknown:
            raise ConfigError(f"Label budget lists ids not in {ds.name}: {unknown[:5]}.")
        chosen = set(budget.listed)
    else:
        if budget.mask_count is not None:
            n = budget.mask_count
        elif budget.mask_fraction is not None:
            if not 0.0 <= budget.mask_fraction <= 1.0:
                raise ConfigError(f"mask fraction must be in [0, 1], got {budget.mask_fraction}.")
            n = int(round(budget.mask_fraction * len(with_mask)))
        else:
            n = len(with_mask)
        if n > len(with_mask):
            raise ConfigError(f"Label budget asks for {n} masks but only {len(with_mask)} samples of {ds.name} have one.")
        rng = np.random.default_rng(budget.seed)
        order = rng.permutation(sorted(with_mask))
        chosen = set(order[:n].tolist())
    if not chosen and (budget.mask_fraction or budget.mask_count or budget.listed):
        raise ConfigError(
            f"The label budget ({budget.describe()}) selects no image of {ds.name} ({len(with_mask)} have masks). "
            "Raise the fraction or count."
        )
    samples = []
    for s in ds.samples:
        if s.id in chosen:
            samples.append(replace(s, supervision="mask"))
        elif budget.rest == "tags" and (s.tags is not None or s.mask is not None):
            samples.append(replace(s, supervision="tags"))
        else:
            samples.append(replace(s, supervision="none"))
    return ds.with_samples(samples)


def budget_manifest(ds: SegDataset, budget: LabelBudget) -> dict:
    return {
        "budget": budget.describe(),
        "seed": budget.seed,
        "mask": [s.id for s in ds.samples if s.supervision == "mask"],
        "tags": [s.id for s in ds.samples if s.supervision == "tags"],
        "none": [s.id for s in ds.samples if s.supervision == "none"],
    }


def first_n_ids(ds: SegDataset, n: int) -> tuple[str, ...]:
    """The first n sample ids in dataset order (the SSL4MIS protocol labels the first N slices)."""
    if n <= 0:
        raise ConfigError("The number of labelled samples must be positive.")
    return tuple(s.id for s in ds.samples[:n])


def holdout(ds: SegDataset, fraction: float = 0.2, seed: int = 0) -> tuple[SegDataset, SegDataset]:
    """Split into (train, val) deterministically, for datasets that ship no validation split."""
    if not 0 < fraction < 1:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}.")
    ids = sorted(s.id for s in ds.samples)
    order = np.random.default_rng(seed).permutation(ids).tolist()
    n_val = max(1, int(round(fraction * len(ids))))
    val_ids = set(order[:n_val])
    train = [s for s in ds.samples if s.id not in val_ids]
    val = [s for s in ds.samples if s.id in val_ids]
    return ds.with_samples(train, name=f"{ds.name}:train"), ds.with_samples(val, name=f"{ds.name}:val")

