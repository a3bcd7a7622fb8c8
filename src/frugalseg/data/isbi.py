"""ISBI-2012 EM membranes: train/image/<k>.png + train/label/<k>.png, test/(image/)<k>.png.

Labels store 0 = membrane and 255 = cell interior. Read as-is, 255 would mean "void" everywhere in
frugalseg, so a class map turns them into ids: 255 → 0 'background' (the cell interior, the large
uninteresting region) and 0 → 1 'membrane' (the structure to segment, reported as the foreground
class by Dice/HD95 and queried by active learning). The sections are consecutive, so `read_stack`
also gives them as one (D, H, W) volume for 3D active learning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.data.wbc import value_map
from frugalseg.errors import DataError

__all__ = ["ISBI_CLASSES", "load_isbi", "read_stack"]

ISBI_CLASSES = ("background", "membrane")
ISBI_VALUES = {255: 0, 0: 1}


def _numbered_pngs(folder: Path) -> dict[str, Path]:
    """PNGs by stem, in section order (numeric stems sorted as numbers: 2 before 10)."""
    files = [p for p in folder.glob("*.png") if not p.name.startswith(".")]
    files.sort(key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))
    return {p.stem: p for p in files}


def load_isbi(root: Path | str, split: str = "train") -> SegDataset:
    """'train': 30 labelled sections; 'test': 30 sections without labels (supervision 'none')."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(
            f"{root}: ISBI-2012 has splits 'train' and 'test', not '{split}'. "
            "Carve a validation set from 'train' with frugalseg.data.holdout."
        )
    base = root / split
    image_dir = base / "image" if (base / "image").is_dir() else base
    if not image_dir.is_dir():
        raise DataError(f"{root}: no {split}/ folder (expected {split}/image/<k>.png).")
    images = _numbered_pngs(image_dir)
    if not images:
        raise DataError(f"{image_dir}: no PNG sections found.")
    masks = _numbered_pngs(base / "label") if (base / "label").is_dir() else {}
    if split == "train" and not masks:
        raise DataError(f"{base}: no label/ folder with membrane masks for the training sections.")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{base / 'label'}: labels without a matching section image: {orphans[:5]}.")
    samples = [
        Sample(id=k, image=p, mask=masks.get(k), supervision="mask" if k in masks else "none")
        for k, p in images.items()
    ]
    target = LabelSpec(names=ISBI_CLASSES, background=0)
    return SegDataset(name=f"{root.name}:{split}", samples=samples, labels=target,
                      class_map=value_map(ISBI_VALUES, target))


def read_stack(ds: SegDataset) -> tuple[np.ndarray, np.ndarray | None]:
    """All sections as one greyscale (D, H, W) uint8 volume, with (D, H, W) ids if every one has a mask."""
    images = []
    for s in ds.samples:
        img = ds.read_image(s)
        images.append(img[..., 0] if img.ndim == 3 else img)  # greyscale expanded to RGB on read
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"{ds.name}: sections differ in size {sorted(shapes)}; cannot stack them.")
    volume = np.stack(images)
    if not all(s.mask is not None for s in ds.samples):
        return volume, None
    return volume, np.stack([ds.read_mask(s) for s in ds.samples])
