"""White-blood-cell smear images (Zheng et al., Micron 2018): images/ + masks/ + classes.csv.

Masks store grey levels, not class ids: 0 background (red cells included), 128 cytoplasm, 255
nucleus. A class map turns them into ids 0/1/2 when a mask is read, so every later stage (losses,
metrics, palettes) sees ordinary ids and 255 never reaches anything as "void". `classes.csv` gives
each image's white-cell type (neutrophil ... basophil). That is a property of the whole cell, not a
segmentation class, so it is exposed as metadata (`read_cell_types`) and not as image tags.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping

import numpy as np

from frugalseg.data.io import RASTER_SUFFIXES
from frugalseg.data.labels import IGNORE_INDEX, ClassMap, LabelSpec
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.data.voc import _index_by_stem
from frugalseg.errors import DataError

__all__ = ["CELL_TYPES", "WBC_CLASSES", "load_wbc", "read_cell_types", "value_map"]

WBC_CLASSES = ("background", "cytoplasm", "nucleus")
WBC_VALUES = {0: 0, 128: 1, 255: 2}
CELL_TYPES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}

# Raw masks may hold any byte value. The source spec of a value map therefore names values 0..253
# (254 is the most a LabelSpec allows below the void value 255), so `check_mask` accepts every
# stored value and the lookup table decides: listed values become classes, all others void.
_RAW_SPEC = LabelSpec(names=tuple(f"value_{v}" for v in range(IGNORE_INDEX - 1)), background=None)


def value_map(values: Mapping[int, int], target: LabelSpec) -> ClassMap:
    """A class map from stored mask values (e.g. 0/128/255) to the ids of `target`.

    Values not listed become void (255), so a stray anti-aliased grey level shows up as void pixels
    in `frugalseg data validate` instead of as a wrong class.
    """
    lut = np.full(256, target.ignore_index, dtype=np.uint8)
    for raw, cls in values.items():
        if not (0 <= int(raw) <= 255 and int(raw) != IGNORE_INDEX - 1):
            raise DataError(f"Stored mask value {raw} cannot be mapped (use 0..253 or 255).")
        if not 0 <= int(cls) < target.num_classes:
            raise DataError(f"Class id {cls} for stored value {raw} is outside 0..{target.num_classes - 1}.")
        lut[int(raw)] = int(cls)
    return ClassMap(_RAW_SPEC, target, lut)


def read_cell_types(root: Path | str) -> dict[str, str]:
    """Sample id → white-cell type name, from `classes.csv` (ids there are unpadded numbers)."""
    root = Path(root)
    path = root / "classes.csv"
    if not path.exists():
        raise DataError(f"{root}: no classes.csv giving the white-cell type of each image.")
    stems = _index_by_stem(root / "images", RASTER_SUFFIXES) if (root / "images").is_dir() else {}
    by_number = {int(s): s for s in stems if s.isdigit()}
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    for n, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        try:
            number, kind = int(row[0]), int(row[1])
        except (ValueError, IndexError):
            raise DataError(f"{path}:{n}: expected 'image id,class label' as two integers, got {row}.") from None
        if kind not in CELL_TYPES:
            raise DataError(f"{path}:{n}: cell type {kind} is not one of {sorted(CELL_TYPES)}.")
        out[by_number.get(number, str(number))] = CELL_TYPES[kind]
    return out


def load_wbc(root: Path | str, split: str | None = None) -> SegDataset:
    """Load one WBC dataset folder (`dataset1` or `dataset2`).

    The dataset ships no train/val split: `split` None or 'train' gives every image; another name
    needs `splits/<split>.txt` (one id a line), else carve one with `frugalseg.data.holdout`.
    """
    root = Path(root)
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
            raise DataError(f"{root}: expected images/ and masks/ folders (WBC layout); found {found}.")
    images = _index_by_stem(root / "images", RASTER_SUFFIXES)
    masks = _index_by_stem(root / "masks", {".png", ".bmp", ".tif", ".tiff"})
    if not images:
        raise DataError(f"{root / 'images'}: no images found.")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{root / 'masks'}: masks without a matching image: {orphans[:5]}.")
    ids = sorted(images)
    if split not in (None, "train", "all"):
        split_file = root / "splits" / f"{split}.txt"
        if not split_file.exists():
            raise DataError(
                f"{root}: no split '{split}' ({split_file.relative_to(root)} does not exist). The WBC data "
                "ships no split: use split None/'train' for all images and frugalseg.data.holdout for a val set."
            )
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        unknown = [i for i in ids if i not in images]
        if unknown:
            raise DataError(f"{split_file}: lists images that are not in images/: {unknown[:5]}.")
    target = LabelSpec(names=WBC_CLASSES, background=0)
    samples = [
        Sample(id=i, image=images[i], mask=masks.get(i), supervision="mask" if i in masks else "none")
        for i in ids
    ]
    name = f"wbc-{root.name}" + (f":{split}" if split else "")
    return SegDataset(name=name, samples=samples, labels=target, class_map=value_map(WBC_VALUES, target))
