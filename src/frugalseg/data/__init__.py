"""Datasets: formats, samples, label specs, budgets.

`open_dataset(source, split)` takes a folder (layout detected) or a task name resolved under the data
root (`$FRUGALSEG_DATA`, default `~/.cache/frugalseg/datasets`, where `frugalseg datasets download` puts
data). Task names: msrc21, msrc-objects, acdc, la2018, isbi2012, wbc1, wbc2, plus any downloaded set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from frugalseg.data.budget import LabelBudget, apply_budget, holdout
from frugalseg.data.labels import ClassMap, LabelSpec, merge_into_background
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.errors import ConfigError, DataError

__all__ = [
    "ClassMap", "LabelBudget", "LabelSpec", "Sample", "SegDataset", "apply_budget", "data_root",
    "holdout", "merge_into_background", "open_dataset", "open_split", "open_splits",
]


def data_root() -> Path:
    env = os.environ.get("FRUGALSEG_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "frugalseg" / "datasets"


def _open_msrc_objects(split: str, problems: list[str] | None = None) -> SegDataset:
    from frugalseg.data.voc import load_voc, objects_map, remap

    root = data_root() / "msrc21"
    ds = load_voc(root, split, problems=problems)
    return remap(ds, objects_map(root, ds.labels))


def _named(name: str, split: str, problems: list[str] | None = None) -> SegDataset | None:
    """Task names with their class conventions; None if `name` is not one."""
    root = data_root()
    if name == "msrc-objects":
        return _open_msrc_objects(split, problems)
    if name in ("acdc", "la2018"):
        from frugalseg.data.hdf5 import load_hdf5

        return load_hdf5(root / name, split)
    if name in ("wbc1", "wbc2"):
        from frugalseg.data.wbc import load_wbc

        return load_wbc(root / "wbc" / f"dataset{name[-1]}", split)
    if name == "isbi2012":
        from frugalseg.data.isbi import load_isbi

        return load_isbi(root / name, split)
    return None


HOLDOUT_FRACTION = 0.2
HOLDOUT_PARTS = ("fit", "holdout")


def open_dataset(source: str | Path, split: str = "train", problems: list[str] | None = None) -> SegDataset:
    """Open a dataset by folder path or task name, detecting its layout.

    `split` may name a part of a split carved by `holdout` (20 %, seed 0): "train:fit" and "train:holdout"
    are disjoint and together make "train". This is how hyperparameters are chosen without touching the
    split that is reported (msrc-objects, for one, ships no test split: its val split is the one reported).

    `problems`: a list to collect structural problems in (orphan masks, tags for missing images, unknown tag
    names, missing split entries, ...) instead of raising the first; what they make unusable is left out.
    Only `frugalseg data validate` uses it (folders and VOC layouts collect; the others raise): every other
    caller must fail fast. Problems that leave nothing to open (no such folder or split) always raise.
    """
    base, sep, part = split.partition(":")
    if sep:
        if part not in HOLDOUT_PARTS:
            raise ConfigError(f"Unknown split part '{part}' in '{split}'; use '{base}:fit' or '{base}:holdout'.")
        fit, held = holdout(_open_dataset(source, base, problems), fraction=HOLDOUT_FRACTION, seed=0)
        return fit if part == "fit" else held
    return _open_dataset(source, split, problems)


def open_split(
    source: str | Path,
    split: str = "train",
    *,
    background_classes: Sequence[str] | None = None,
    ignore_classes: Sequence[str] | None = None,
    limit: int | None = None,
) -> SegDataset:
    """A split with the run's class remapping applied: the one way every stage opens its data.

    `background_classes` are merged into the background class, `ignore_classes` become void (255);
    `limit` keeps the first N samples (a fixed, stated subset for CPU runs).
    """
    ds = open_dataset(source, split)
    if background_classes or ignore_classes:
        from frugalseg.data.voc import remap

        ds = remap(ds, merge_into_background(ds.labels, list(background_classes or []), list(ignore_classes or [])))
    if limit is not None:
        ds = ds.with_samples(ds.samples[:limit])
    return ds


def open_splits(
    source: str | Path,
    splits: str,
    *,
    background_classes: Sequence[str] | None = None,
    ignore_classes: Sequence[str] | None = None,
) -> SegDataset:
    """One dataset over '+'-joined split names ("train+val"), each opened with `open_split`; a sample in
    several of them appears once. Weakly supervised stages map the very images they train on, so they
    join splits where a supervised stage would keep them apart."""
    parts = [open_split(source, s, background_classes=background_classes, ignore_classes=ignore_classes)
             for s in splits.split("+") if s]
    if not parts:
        raise ConfigError(f"No split named in '{splits}'.")
    samples, seen = [], set()
    for p in parts:
        if p.labels.names != parts[0].labels.names:
            raise DataError(f"{source}: splits {splits} have different classes.")
        samples += [s for s in p.samples if s.id not in seen]
        seen |= {s.id for s in p.samples}
    return parts[0].with_samples(samples, name=f"{parts[0].name.split(':')[0]}:{splits}")


def _open_dataset(source: str | Path, split: str, problems: list[str] | None = None) -> SegDataset:
    named = _named(str(source), split, problems) if not Path(source).exists() else None
    if named is not None:
        return named
    root = Path(source)
    if not root.exists():
        alt = data_root() / str(source)
        if alt.exists():
            root = alt
        else:
            raise DataError(
                f"'{source}' is neither a folder nor a known dataset under {data_root()} "
                "(set FRUGALSEG_DATA, or run `frugalseg datasets download NAME`)."
            )
    from frugalseg.data.folders import is_folders, load_folders
    from frugalseg.data.voc import is_voc, load_voc

    if is_voc(root):
        return load_voc(root, split, problems=problems)
    if (root / "train_slices.list").exists() or (root / "train.list").exists():
        from frugalseg.data.hdf5 import load_hdf5

        return load_hdf5(root, split)
    if (root / "dataset.json").exists() and (root / "imagesTr").is_dir():
        from frugalseg.data.nifti import load_msd

        return load_msd(root, split)
    if is_folders(root):
        return load_folders(root, split, problems)
    found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
    raise DataError(
        f"{root}: unrecognised layout (found {found}). Expected one of: PASCAL VOC (JPEGImages/, "
        "SegmentationClass/, ImageSets/Segmentation/), folders (images/ + masks/ and/or tags.csv), "
        "SSL4MIS HDF5 (train.list / train_slices.list + .h5 files), or MSD NIfTI (dataset.json, imagesTr/, labelsTr/)."
    )
