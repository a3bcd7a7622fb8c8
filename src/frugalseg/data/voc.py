"""PASCAL VOC layout: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt, classes.txt.

The image extension is whatever is on disk (MSRC-21 ships PNGs in JPEGImages/). `classes.txt`, one
name a line, overrides the VOC 2012 class list; a dataset without a background class says so with
`background=None`.
"""

from __future__ import annotations

import json
from pathlib import Path

from frugalseg.data.io import RASTER_SUFFIXES
from frugalseg.data.labels import ClassMap, LabelSpec, merge_into_background
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.errors import DataError

VOC2012_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def is_voc(root: Path) -> bool:
    return (root / "JPEGImages").is_dir() and (root / "ImageSets").is_dir()


def read_class_names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names found (expected one name per line).")
    return names


def _index_by_stem(folder: Path, suffixes: set[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() in suffixes and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def load_voc(root: Path | str, split: str = "train", class_map: ClassMap | None = None) -> SegDataset:
    """Load one split of a VOC-layout dataset (masks where SegmentationClass has them)."""
    root = Path(root)
    missing = [d for d in ("JPEGImages", "ImageSets/Segmentation") if not (root / d).is_dir()]
    if missing:
        raise DataError(
            f"{root}: not a PASCAL VOC layout, missing folder(s) {missing}. Expected JPEGImages/, "
            "SegmentationClass/ and ImageSets/Segmentation/<split>.txt."
        )
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.exists():
        available = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))
        raise DataError(f"{root}: no split '{split}' (no {split_file.name}); available splits: {available}.")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{split_file}: the split lists no images.")

    classes_txt = root / "classes.txt"
    if classes_txt.exists():
        names = read_class_names(classes_txt)
        background = 0 if names[0].lower() in ("background", "bg", "_background_") else None
    else:
        names, background = list(VOC2012_CLASSES), 0
    spec = LabelSpec(names=tuple(names), background=background)

    images = _index_by_stem(root / "JPEGImages", RASTER_SUFFIXES)
    mask_dir = root / "SegmentationClass"
    masks = _index_by_stem(mask_dir, {".png"}) if mask_dir.is_dir() else {}
    samples = []
    absent = [i for i in ids if i not in images]
    if absent:
        raise DataError(f"{split_file}: {len(absent)} listed images are missing from JPEGImages/, e.g. {absent[:3]}.")
    for i in ids:
        samples.append(Sample(id=i, image=images[i], mask=masks.get(i)))
    ds = SegDataset(name=f"{root.name}:{split}", samples=samples, labels=spec)
    if class_map is not None:
        ds = remap(ds, class_map)
    return ds


def remap(ds: SegDataset, class_map: ClassMap) -> SegDataset:
    """The same samples seen through a class map (e.g. stuff classes merged into background)."""
    if class_map.source.names != ds.labels.names:
        raise DataError(f"{ds.name}: class map was built for other classes ({class_map.source.names[:3]}...).")
    # Masks on disk hold the original ids: compose with the map already applied (void stays void).
    previous = ds.class_map
    lut = class_map.lut[previous.lut]
    lut[previous.lut == previous.target.ignore_index] = class_map.target.ignore_index
    composed = ClassMap(previous.source, class_map.target, lut)
    samples = [
        Sample(id=s.id, image=s.image, mask=s.mask, tags=None if s.tags is None else class_map.tags(s.tags),
               supervision=s.supervision, spacing=s.spacing)
        for s in ds.samples
    ]
    return SegDataset(name=ds.name, samples=samples, labels=class_map.target, class_map=composed, ndim=ds.ndim)


def objects_map(root: Path, spec: LabelSpec) -> ClassMap:
    """The class map in `objects.json` ({"background": [...], "ignore": [...]}): MSRC-21 → msrc-objects."""
    path = root / "objects.json"
    if not path.exists():
        raise DataError(f"{root}: no objects.json describing which classes merge into background.")
    spec_json = json.loads(path.read_text())
    return merge_into_background(spec, spec_json.get("background", []), spec_json.get("ignore", []))
