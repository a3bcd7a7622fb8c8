"""Plain folders: images/ + masks/ (same stems), optional tags.csv, classes.txt and splits/<split>.txt.

`tags.csv` has a header and rows `image_id,tag1;tag2` (class names separated by ';', '|', ',' or spaces).
Images without a mask and without tags are unlabelled.

Rules that keep a bad folder from giving a silently wrong result:

- Masks hold class ids, so a folder with masks needs `classes.txt` (one name a line, background first):
  without it the ids have no names and the folder is refused.
- A tags-only folder without `classes.txt` gets "background" followed by the tag names *sorted*: the order
  of the rows cannot swap two classes, and the inferred list is logged once so the user can pin it down.
- Without `splits/` the only split is 'train' (all images). Any other split name is refused: opening all
  images for 'val' would validate on the training images and report that as a validation score.
- Every tag row, split line and file must point at something that exists, exactly once.

Every check reports through `report_problem`, so `frugalseg data validate` lists all of them in one run.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

from frugalseg.data.io import RASTER_SUFFIXES, read_text, unreadable
from frugalseg.data.labels import BACKGROUND_NAMES, LabelSpec, background_index
from frugalseg.data.samples import Sample, SegDataset, report_problem
from frugalseg.data.voc import (
    _index_by_stem, check_disjoint, not_found_hint, read_class_names, split_ids, warn_once,
)
from frugalseg.errors import DataError

log = logging.getLogger(__name__)

MASK_SUFFIXES = {".png", ".tif", ".tiff", ".bmp"}
LOSSY_SUFFIXES = {".jpg", ".jpeg", ".webp"}  # never class ids: refused rather than silently skipped
_TAG_SEPARATORS = re.compile(r"[;|,\s]+")


def is_folders(root: Path) -> bool:
    # an images *file* counts too: `load_folders` then says that it is a file, rather than "unrecognised layout"
    return (root / "images").exists()


def read_tags_csv(
    path: Path, image_ids: set[str] | None = None, problems: list[str] | None = None,
) -> dict[str, tuple[int, list[str]]]:
    """Tags by image id, each with the line it came from: {id: (line, [names])}.

    The first line is a header. With `image_ids`, a first line whose first cell is an image id is refused
    (a file without a header would otherwise lose its first row silently). An image named on two rows with
    different tags is refused (which row is right is ambiguous); identical repeats are harmless.
    """
    text = read_text(path)  # a DataError naming the file: not UTF-8, a folder in its place, permissions
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise DataError(f"{path}: empty tags file; expected a header line 'image_id,tags' and rows 'image_id,tag1;tag2'.")
    start = 1
    if image_ids is not None and rows[0] and rows[0][0].strip() in image_ids:
        report_problem(problems, (
            f"{path}:1: the first line ('{','.join(rows[0])}') names an image, but the first line is the header "
            "and is skipped. Add a header line 'image_id,tags' at the top."
        ))
        start = 0
    out: dict[str, tuple[int, list[str]]] = {}
    for n, row in enumerate(rows[start:], start=start + 1):
        if not row or not row[0].strip():
            continue
        image_id = row[0].strip()
        names = [t for t in _TAG_SEPARATORS.split(",".join(row[1:]).strip()) if t]
        if not names:
            report_problem(problems, f"{path}:{n}: image '{image_id}' has an empty tag list. Remove the row to mark "
                                     "it unlabelled.")
            continue
        if image_id in out:
            first, before = out[image_id]
            if sorted(set(before)) != sorted(set(names)):
                report_problem(problems, (
                    f"{path}:{n}: image '{image_id}' is tagged again (first on line {first}) with other tags. Put all "
                    f"its tags on one row: {image_id},{';'.join(sorted(set(before) | set(names)))}"
                ))
            continue
        out[image_id] = (n, names)
    return out


def _is_background_name(name: str) -> bool:
    return name.strip().lower() in BACKGROUND_NAMES


def _split_ids(root: Path, split: str | None, images: dict[str, Path], problems: list[str] | None) -> list[str]:
    """The ids of `split`: all images for None, or for 'train' when there is no splits/ folder."""
    if split is None:
        return sorted(images)
    splits_dir = root / "splits"
    if not splits_dir.is_dir():
        if split == "train":
            return sorted(images)
        raise DataError(
            f"{root}: there is no splits/ folder, so no '{split}' split (without splits/ the only split is "
            f"'train', all images). Add splits/train.txt and splits/{split}.txt (one image id a line), or "
            "validate on a held-out part with `--train-split train:fit --val-split train:holdout`, or give "
            "`--val-split ''` (`classify`: `--eval-split ''`) for no validation."
        )
    split_file = splits_dir / f"{split}.txt"
    if not split_file.exists():
        available = sorted(p.stem for p in splits_dir.glob("*.txt"))
        raise DataError(f"{root}: no split '{split}' (no {split_file.relative_to(root)}); available splits: "
                        f"{available}. Add {split_file.relative_to(root)} (one image id a line).")
    ids = split_ids(split_file, problems)
    check_disjoint(split_file, problems)
    missing = [i for i in ids if i not in images]
    if missing:
        report_problem(problems, (
            f"{split_file}: {len(missing)} listed images are not in images/, e.g. {missing[:5]}."
            f"{not_found_hint(missing, images)} Add the images or remove these ids from {split_file.name}."
        ))
        ids = [i for i in ids if i in images]
    return ids


def _class_names(root: Path, tag_rows: dict[str, tuple[int, list[str]]], has_masks: bool,
                 problems: list[str] | None) -> tuple[list[str], bool]:
    """The class names, and whether masks can be read with them (False: no classes.txt names their ids)."""
    if (root / "classes.txt").exists():
        return read_class_names(root / "classes.txt"), True
    tag_names = sorted({t for _, names in tag_rows.values() for t in names if not _is_background_name(t)})
    names = ["background", *tag_names]
    if has_masks:
        report_problem(problems, (
            f"{root}: masks/ holds masks but there is no classes.txt. Masks hold class ids and classes.txt must "
            "name them: write classes.txt with one class name a line, background first (line 1 names id 0, "
            "line 2 id 1, ...)."
        ))
        return names, False
    if tag_names:
        warn_once(f"folders-inferred-classes:{root.resolve()}", (
            f"{root}: no classes.txt; classes inferred from tags.csv: {', '.join(names)} "
            "(write classes.txt to fix the order)"
        ), logger=log)
    return names, True


def _tags(path: Path, tag_rows: dict[str, tuple[int, list[str]]], spec: LabelSpec,
          problems: list[str] | None) -> dict[str, frozenset[int]]:
    """Tag names to class ids; a name that is no class is reported with its line, image and the known names."""
    unknown: dict[str, list[tuple[int, str]]] = {}
    out: dict[str, frozenset[int]] = {}
    for image_id, (n, names) in tag_rows.items():
        ids = set()
        for name in names:
            if spec.background is not None and _is_background_name(name) and name not in spec.names:
                ids.add(spec.background)  # "bg" for a class list that says "background"
            elif name in spec.names:
                ids.add(spec.names.index(name))
            else:
                unknown.setdefault(name, []).append((n, image_id))
        out[image_id] = frozenset(ids)
    for name, where in unknown.items():
        n, image_id = where[0]
        more = f" ({len(where)} rows in all: lines {', '.join(str(w[0]) for w in where[:5])}...)" if len(where) > 1 else ""
        report_problem(problems, (
            f"{path}:{n}: Unknown class name '{name}' for image '{image_id}'{more}. Known classes: "
            f"{', '.join(spec.names)}. Fix the tag, or add the class to classes.txt."
        ))
    return out


def load_folders(root: Path | str, split: str | None = None, problems: list[str] | None = None) -> SegDataset:
    """One split of a folders-layout dataset (see the module notes for the rules).

    `split` None means every image (a programmatic shortcut); `problems` collects structural problems instead
    of raising the first (see `report_problem`): what they make unusable is left out.
    """
    root = Path(root)
    if (root / "images").exists() and not (root / "images").is_dir():
        raise DataError(f"{root / 'images'}: is a file, but images/ must be a folder of images (with masks/ and/or "
                        "tags.csv beside it): rename or remove the file.")
    if not (root / "images").is_dir():
        try:
            found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
        except OSError as exc:
            raise unreadable(root, exc, "a dataset folder") from None
        raise DataError(
            f"{root}: expected an images/ folder (with masks/ and/or tags.csv beside it); found {found}."
        )
    images = _index_by_stem(root / "images", RASTER_SUFFIXES, problems)
    if not images:
        raise DataError(f"{root / 'images'}: no images found (looked for {sorted(RASTER_SUFFIXES)}).")
    ids = _split_ids(root, split, images, problems)
    if (root / "masks").exists() and not (root / "masks").is_dir():
        report_problem(problems, f"{root / 'masks'}: is a file, but masks/ must be a folder of masks: rename or "
                                 "remove the file.")
    masks = _index_by_stem(root / "masks", MASK_SUFFIXES, problems) if (root / "masks").is_dir() else {}
    lossy = sorted(p.name for p in (root / "masks").glob("*") if p.suffix.lower() in LOSSY_SUFFIXES) \
        if (root / "masks").is_dir() else []
    if lossy:
        report_problem(problems, (
            f"{root / 'masks'}: {len(lossy)} masks are JPEG/WebP files, e.g. {lossy[:3]}: lossy compression changes "
            "class ids along edges, and they are not read. Save masks as PNG (palette or greyscale class ids)."
        ))
    orphans = sorted(set(masks) - set(images))
    if orphans:
        report_problem(problems, (
            f"{root / 'masks'}: {len(orphans)} masks without a matching image in images/: {orphans[:5]}. "
            "A mask is named like its image (images/001.jpg, masks/001.png): rename or remove them."
        ))
    tags_path = root / "tags.csv"
    tag_rows = read_tags_csv(tags_path, set(images), problems) if tags_path.exists() else {}
    unknown_ids = sorted(set(tag_rows) - set(images))
    if unknown_ids:
        report_problem(problems, (
            f"{tags_path}: tags for {len(unknown_ids)} images that do not exist in images/: {unknown_ids[:5]}."
            f"{not_found_hint(unknown_ids, images)} Fix the ids or remove these rows."
        ))

    names, masks_usable = _class_names(root, tag_rows, bool(masks), problems)
    if not masks_usable:
        masks = {}  # only when collecting problems: masks without class names cannot be checked
    spec = LabelSpec(names=tuple(names), background=background_index(names))
    tags_by_id = _tags(tags_path, tag_rows, spec, problems)

    samples = []
    for i in ids:
        tags = tags_by_id.get(i)
        mask = masks.get(i)
        supervision = "mask" if mask else ("tags" if tags else "none")
        samples.append(Sample(id=i, image=images[i], mask=mask, tags=tags, supervision=supervision))
    return SegDataset(name=f"{root.name}" + (f":{split}" if split else ""), samples=samples, labels=spec)
