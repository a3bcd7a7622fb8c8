"""`frugalseg data validate`: read every file once and report every problem, not just the first.

Catches what costs users days elsewhere: RGB-coloured masks, 0/255 binary masks, out-of-range ids,
image/mask size mismatches, corrupt files, samples with neither mask nor tags.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from frugalseg.data.samples import SegDataset
from frugalseg.errors import DataError


def validate_dataset(ds: SegDataset, progress: bool = True) -> dict:
    """Problems found and per-class pixel counts; never raises for per-file problems."""
    from tqdm.auto import tqdm

    problems: list[str] = []
    pixels: Counter[int] = Counter()
    images_with_class: Counter[int] = Counter()
    unlabelled = 0
    binary_like = 0
    masks_read = 0
    for s in tqdm(ds.samples, desc=f"validate {ds.name}", disable=not progress, leave=False):
        try:
            if s.mask is not None:
                _, mask = ds.read_pair(s)
                ids, counts = np.unique(mask, return_counts=True)
                masks_read += 1
                if set(ids.tolist()) == {0, ds.labels.ignore_index}:
                    binary_like += 1
                for i, c in zip(ids.tolist(), counts.tolist()):
                    pixels[i] += c
                    images_with_class[i] += 1
            else:
                ds.read_image(s)
                if not s.tags:
                    unlabelled += 1
        except DataError as exc:
            problems.append(str(exc))
    if masks_read and binary_like == masks_read:
        problems.insert(0, (
            f"every mask holds only 0 and {ds.labels.ignore_index}: they look like 0/255 binary masks, but "
            f"{ds.labels.ignore_index} means void (ignored) here. Store the object as class 1 instead."
        ))
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
