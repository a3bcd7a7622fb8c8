"""PASCAL VOC layout: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt, classes.txt.

The image extension is whatever is on disk (MSRC-21 ships PNGs in JPEGImages/). `classes.txt`, one
name a line, overrides the VOC 2012 class list; a dataset without a background class says so with
`background=None`.

A split of ImageSets/Segmentation lists *segmented* images, so every listed image needs its mask in
SegmentationClass/: a split where only some have one is refused when it is opened (naming the ids and
the expected mask paths), not half-way through training. A split where none has one (VOC's test split)
is an images-only split: its samples have supervision "none", and a warning says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from frugalseg.data.io import RASTER_SUFFIXES, read_text, unreadable
from frugalseg.data.labels import ClassMap, LabelSpec, background_index, merge_into_background
from frugalseg.data.samples import Sample, SegDataset, report_problem
from frugalseg.errors import DataError

log = logging.getLogger(__name__)

VOC2012_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_ANNOUNCED: set[str] = set()


def warn_once(key: str, message: str, logger: logging.Logger = log) -> None:
    """Log a warning about a dataset once per process (stages open the same split several times)."""
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        logger.warning(message)


def is_voc(root: Path) -> bool:
    return (root / "JPEGImages").is_dir() and (root / "ImageSets").is_dir()


def read_lines(path: Path) -> list[tuple[int, str]]:
    """The non-empty lines of a text file, stripped, with their 1-based line numbers.

    A UTF-8 byte-order mark and CRLF endings (Windows editors write both) are dropped: a BOM left in place
    would become part of the first class name or id (and a first class that is not exactly "background"
    silently loses its background role). A file that cannot be read (a folder in its place, permissions) raises
    a `DataError` naming it.
    """
    text = read_text(path)
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def read_class_names(path: Path) -> list[str]:
    """Class names of a classes.txt, one a line, in id order (line k+1 names id k)."""
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path}: no class names found (expected one name per line, background first).")
    first: dict[str, int] = {}
    for n, name in lines:
        if name in first:
            raise DataError(f"{path}:{n}: class '{name}' is named again (first on line {first[name]}); "
                            "each class needs one line, its line giving its id.")
        first[name] = n
    return [name for _, name in lines]


def _index_by_stem(folder: Path, suffixes: set[str], problems: list[str] | None = None) -> dict[str, Path]:
    """Files of `folder` by id (file name without extension), hidden files left out.

    Two files with one id (001.png and 001.jpg) are refused: which one is the image (or the mask) is
    ambiguous, and picking by directory order would differ between machines. When collecting problems the
    first name in sorted order is kept.
    """
    out: dict[str, Path] = {}
    clashes: dict[str, list[str]] = {}
    try:
        files = [p for p in sorted(folder.iterdir())
                 if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()]
    except OSError as exc:  # a file in the folder's place, permissions
        raise unreadable(folder, exc, "a folder") from None
    for p in files:
        if p.stem in out:
            clashes.setdefault(p.stem, [out[p.stem].name]).append(p.name)
        else:
            out[p.stem] = p
    if clashes:
        shown = "; ".join(", ".join(names) for names in list(clashes.values())[:5])
        report_problem(problems, (
            f"{folder}: {len(clashes)} id(s) have several files ({shown}); which one is meant is ambiguous. "
            "Keep one file per id (remove or rename the others)."
        ))
    return out


def split_ids(split_file: Path, problems: list[str] | None = None) -> list[str]:
    """The ids a split file lists (first word of each line), in order; repeated ids are reported."""
    ids: list[str] = []
    first: dict[str, int] = {}
    repeated: list[str] = []
    for n, line in read_lines(split_file):
        i = line.split()[0]
        if i in first:
            repeated.append(f"'{i}' (lines {first[i]} and {n})")
            continue
        first[i] = n
        ids.append(i)
    if repeated:
        report_problem(problems, f"{split_file}: {len(repeated)} id(s) listed twice, e.g. {', '.join(repeated[:3])}; "
                                 "list each image once.")
    if not ids:
        report_problem(problems, f"{split_file}: the split lists no images; write one image id a line.")
    return ids


DISJOINT_SPLITS = ("train", "val", "test")


def check_disjoint(split_file: Path, problems: list[str] | None = None) -> None:
    """Refuse an image listed both in `split_file` and in another of train/val/test beside it.

    Such an image would be scored on after being trained on, and the score reported as a validation (or
    test) figure. Only these three names are compared: a 'trainval' split is a union by design.
    """
    split = split_file.stem
    if split not in DISJOINT_SPLITS:
        return
    ids = {line.split()[0] for _, line in read_lines(split_file)}
    for other in DISJOINT_SPLITS:
        other_file = split_file.with_name(f"{other}.txt")
        if other == split or not other_file.exists():
            continue
        both = sorted(ids & {line.split()[0] for _, line in read_lines(other_file)})
        if both:
            report_problem(problems, (
                f"{split_file}: {len(both)} images are also listed in {other_file.name}, e.g. {both[:5]}: "
                f"{split} and {other} must not share images (a model would be scored on images it may have "
                "trained on). Keep each image in one of the two files."
            ))


def not_found_hint(missing: list[str], known: dict[str, Path]) -> str:
    """A hint when listed ids name files (with extension or folder) rather than ids."""
    stems = [Path(i).stem for i in missing]
    if any(s in known and s != i for s, i in zip(stems, missing)):
        return " Ids are file names without extension (write 'im1', not 'im1.png')."
    return ""


def load_voc(
    root: Path | str, split: str = "train", class_map: ClassMap | None = None, problems: list[str] | None = None,
) -> SegDataset:
    """Load one split of a VOC-layout dataset (see the module notes on missing masks).

    `problems`: collect structural problems there instead of raising the first (see `report_problem`).
    """
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
    ids = split_ids(split_file, problems)
    check_disjoint(split_file, problems)

    classes_txt = root / "classes.txt"
    names = read_class_names(classes_txt) if classes_txt.exists() else list(VOC2012_CLASSES)
    spec = LabelSpec(names=tuple(names), background=background_index(names))

    images = _index_by_stem(root / "JPEGImages", RASTER_SUFFIXES, problems)
    mask_dir = root / "SegmentationClass"
    if mask_dir.exists() and not mask_dir.is_dir():
        report_problem(problems, f"{mask_dir}: is a file, but SegmentationClass/ must be a folder of masks: rename "
                                 "or remove the file.")
    masks = _index_by_stem(mask_dir, {".png"}, problems) if mask_dir.is_dir() else {}
    absent = [i for i in ids if i not in images]
    if absent:
        report_problem(problems, (
            f"{split_file}: {len(absent)} listed images are missing from JPEGImages/, e.g. {absent[:3]}."
            f"{not_found_hint(absent, images)} Add the images or remove these ids from {split_file.name}."
        ))
        ids = [i for i in ids if i in images]
    unmasked = [i for i in ids if i not in masks]
    if unmasked and len(unmasked) < len(ids):
        report_problem(problems, (
            f"{split_file}: {len(unmasked)} of {len(ids)} listed images have no mask, e.g. '{unmasked[0]}' "
            f"(expected {mask_dir / (unmasked[0] + '.png')}). A split of ImageSets/Segmentation lists segmented "
            f"images: add the missing masks, or remove these ids from {split_file.name}."
        ))
    elif unmasked:
        warn_once(f"voc-no-masks:{split_file}", (
            f"{split_file}: no listed image has a mask in {mask_dir.name}/; split '{split}' holds images only "
            "(supervised training and evaluation need masks)."
        ))
    samples = [
        Sample(id=i, image=images[i], mask=masks.get(i), supervision="mask" if i in masks else "none")
        for i in ids
    ]
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
