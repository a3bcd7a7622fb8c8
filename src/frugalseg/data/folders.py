"""Plain folders: images/ + masks/ (same stems), optional tags.csv, classes.txt and splits/<split>.txt.

`tags.csv` has a header and rows `image_id,tag1;tag2` (class names separated by ';' or '|' or spaces).
Images without a mask and without tags are unlabelled. Without `classes.txt` the classes are
"background" followed by the tag names in order of first appearance.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from frugalseg.data.io import RASTER_SUFFIXES
from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.data.voc import _index_by_stem, read_class_names
from frugalseg.errors import DataError


def is_folders(root: Path) -> bool:
    return (root / "images").is_dir()


def read_tags_csv(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path}: empty tags file; expected a header and rows 'image_id,tags'.")
    for n, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        names = [t for t in re.split(r"[;|\s]+", ",".join(row[1:]).strip()) if t]
        if not names:
            raise DataError(f"{path}:{n}: image '{row[0]}' has an empty tag list. Remove the row to mark it unlabelled.")
        out[row[0].strip()] = names
    return out


def load_folders(root: Path | str, split: str | None = None) -> SegDataset:
    root = Path(root)
    if not (root / "images").is_dir():
        found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
        raise DataError(
            f"{root}: expected an images/ folder (with masks/ and/or tags.csv beside it); found {found}."
        )
    images = _index_by_stem(root / "images", RASTER_SUFFIXES)
    if not images:
        raise DataError(f"{root / 'images'}: no images found (looked for {sorted(RASTER_SUFFIXES)}).")
    masks = _index_by_stem(root / "masks", {".png", ".tif", ".tiff", ".bmp"}) if (root / "masks").is_dir() else {}
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{root / 'masks'}: masks without a matching image in images/: {orphans[:5]}.")
    tags_by_id = read_tags_csv(root / "tags.csv") if (root / "tags.csv").exists() else {}
    unknown_ids = sorted(set(tags_by_id) - set(images))
    if unknown_ids:
        raise DataError(f"{root / 'tags.csv'}: tags for images that do not exist: {unknown_ids[:5]}.")

    if (root / "classes.txt").exists():
        names = read_class_names(root / "classes.txt")
    else:
        names = ["background"]
        for tag_list in tags_by_id.values():
            names += [t for t in tag_list if t not in names]
        if len(names) == 1 and masks:
            raise DataError(f"{root}: masks are given but no classes.txt names their classes (one name a line).")
    background = 0 if names[0].lower() in ("background", "bg") else None
    spec = LabelSpec(names=tuple(names), background=background)

    ids = sorted(images)
    if split is not None:
        split_file = root / "splits" / f"{split}.txt"
        if not split_file.exists():
            raise DataError(f"{root}: no split file {split_file.relative_to(root)}.")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        missing = [i for i in ids if i not in images]
        if missing:
            raise DataError(f"{split_file}: lists images that are not in images/: {missing[:5]}.")
    samples = []
    for i in ids:
        tags = None
        if i in tags_by_id:
            tags = frozenset(spec.index(t) for t in tags_by_id[i])
        mask = masks.get(i)
        supervision = "mask" if mask else ("tags" if tags else "none")
        samples.append(Sample(id=i, image=images[i], mask=mask, tags=tags, supervision=supervision))
    return SegDataset(name=f"{root.name}" + (f":{split}" if split else ""), samples=samples, labels=spec)
