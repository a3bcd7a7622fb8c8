"""`frugalseg data validate`: read every file once and report every problem, not just the first.

Catches what costs users days elsewhere: RGB-coloured masks, 0/255 binary masks, masks with no
foreground class at all, out-of-range ids, image/mask size mismatches, corrupt files, samples with neither
mask nor tags, and the structural problems of a folder (orphan masks, tags or split entries for missing
images, unknown tag names, ...), which the loaders collect instead of raising when asked to.

`check_masks_for_training` is the part of this a training stage runs before it starts: masks that would
train a model on nothing are refused with the same message validation prints.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from frugalseg.data.samples import Sample, SegDataset
from frugalseg.errors import DataError


# ---- the messages both checks print ---------------------------------------------------------------
def _mask_folders(samples: list[Sample]) -> str:
    folders = sorted({str(s.mask.parent) for s in samples if s.mask is not None})
    return ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")


def binary_masks_message(ds: SegDataset, samples: list[Sample]) -> str:
    """Every mask holds only 0 and 255: a common export of binary masks, where 255 means void here."""
    void = ds.class_map.source.ignore_index
    return (
        f"{_mask_folders(samples)}: every mask holds only 0 and {void}: they look like 0/255 binary masks, but "
        f"{void} means void (ignored) here, so nothing would be learnt. Store the object as class 1 instead "
        f"(mask[mask == {void}] = 1) and name it on line 2 of classes.txt."
    )


def no_foreground_message(ds: SegDataset, samples: list[Sample]) -> str:
    """No mask holds any class but background and void: a model would learn to predict background only."""
    if ds.labels.num_classes > 1:
        fix = ("Check that the masks hold the class ids named in classes.txt (line k+1 names id k) and that "
               "--background-classes / --ignore-classes leave a class to learn.")
    elif ds.class_map.source.num_classes > 1:
        fix = "--background-classes / --ignore-classes leave no class to learn: keep at least one class."
    else:
        fix = "The class list names no class besides background: add the classes to classes.txt, one a line."
    return (
        f"{_mask_folders(samples)}: no mask of {ds.name} holds a foreground class (only background and void), "
        f"so a model would learn to predict background everywhere. {fix}"
    )


class _MaskTally:
    """What the masks read so far hold: the raw ids (as stored) and whether any real class appeared."""

    def __init__(self, ds: SegDataset):
        self.ds = ds
        lut = ds.class_map.lut
        not_real = {ds.labels.ignore_index} | ({ds.labels.background} if ds.labels.background is not None else set())
        # raw id -> whether it becomes a real (foreground) class after the class map
        self.real = np.array([int(lut[v]) not in not_real for v in range(256)])
        self.raw_ids: set[int] = set()
        self.has_foreground = False

    def add(self, raw: np.ndarray) -> np.ndarray:
        """Count one mask (source ids); returns the raw ids present."""
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        self.raw_ids.update(present.tolist())
        self.has_foreground = self.has_foreground or bool(self.real[present].any())
        return present

    def problem(self, samples: list[Sample]) -> str | None:
        """The message when the masks read give nothing to learn, else None."""
        if self.has_foreground:
            return None
        void = self.ds.class_map.source.ignore_index
        if void in self.raw_ids and self.raw_ids <= {0, void}:
            return binary_masks_message(self.ds, samples)
        return no_foreground_message(self.ds, samples)


# ---- before training ------------------------------------------------------------------------------
def check_masks_for_training(ds: SegDataset, progress: bool = False) -> None:
    """Refuse masks a model cannot learn from, before training starts (DataError, validate's message).

    Looks at the samples whose supervision is a mask. Every one must have a mask file. Masks are then read
    one by one until one holds a real class (a class that is neither background nor void after the run's
    class map): usually the first mask, so this costs one read on good data. Only when no mask holds one are
    all read, and the error then says why: 0/255 binary masks (255 is void here) or masks that hold nothing
    but background. A mask with ids that are no class raises on the way (`LabelSpec.check_mask`); masks
    after the first good one are checked as training reads them, with the same message.
    Datasets without masked samples pass: whether a stage needs masks is the stage's decision.
    """
    from tqdm.auto import tqdm

    masked = [s for s in ds.samples if s.supervision == "mask"]
    absent = [s for s in masked if s.mask is None]
    if absent:
        raise DataError(
            f"{ds.name}: {len(absent)} samples are to be trained on masks but have no mask file, e.g. "
            f"'{absent[0].id}' ({absent[0].image}). Add the masks, or train on samples that have one."
        )
    if not masked:
        return
    tally = _MaskTally(ds)
    for s in tqdm(masked, desc=f"check masks {ds.name}", disable=not progress, leave=False):
        tally.add(ds.read_raw_mask(s))
        if tally.has_foreground:
            return
    raise DataError(tally.problem(masked))


# ---- data validate --------------------------------------------------------------------------------
def validate_dataset(ds: SegDataset, progress: bool = True, structural: list[str] | None = None) -> dict:
    """Problems found and per-class pixel counts; never raises for per-file problems.

    `structural`: problems the loader collected while opening `ds` (see `open_dataset(problems=...)`); they
    come first in the report.
    """
    from tqdm.auto import tqdm

    problems: list[str] = list(structural or [])
    pixels: Counter[int] = Counter()
    images_with_class: Counter[int] = Counter()
    unlabelled = 0
    tally = _MaskTally(ds)
    masked: list[Sample] = []
    for s in tqdm(ds.samples, desc=f"validate {ds.name}", disable=not progress, leave=False):
        try:
            if s.mask is not None:
                image = ds.read_image(s)
                raw = ds.read_raw_mask(s)
                mask = ds.class_map(raw)
                ds.check_sizes(s, image, mask)
                tally.add(raw)
                masked.append(s)
                ids, counts = np.unique(mask, return_counts=True)
                for i, c in zip(ids.tolist(), counts.tolist()):
                    pixels[i] += c
                    images_with_class[i] += 1
            else:
                ds.read_image(s)
                if not s.tags:
                    unlabelled += 1
        except DataError as exc:
            problems.append(str(exc))
    if masked:
        problem = tally.problem(masked)
        if problem:
            problems.insert(len(structural or []), problem)
    names = ds.labels.names
    classes = {
        names[i]: {"pixels": pixels.get(i, 0), "images": images_with_class.get(i, 0)} for i in range(len(names))
    }
    empty = [n for n, v in classes.items() if v["pixels"] == 0 and any(s.mask for s in ds.samples)]
    return {
        "dataset": ds.name,
        "samples": len(ds),
        "with_mask": sum(s.mask is not None for s in ds.samples),
        "with_tags_only": sum(s.mask is None and bool(s.tags) for s in ds.samples),
        "unlabelled": unlabelled,
        "void_pixels": pixels.get(ds.labels.ignore_index, 0),
        "classes": classes,
        "classes_never_seen": empty,
        "problems": problems,
        "ok": not problems,
    }


def validate_source(source: str | Path, split: str = "train", progress: bool = True) -> dict:
    """Open `source` collecting its structural problems, then read every file: the report of `data validate`.

    Raises DataError only when nothing can be opened (no such folder or split, an unknown layout).
    """
    from frugalseg.data import open_dataset

    structural: list[str] = []
    ds = open_dataset(source, split, problems=structural)
    return validate_dataset(ds, progress=progress, structural=structural)
