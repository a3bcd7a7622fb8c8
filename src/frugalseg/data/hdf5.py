"""SSL4MIS / UA-MT HDF5 layout: `.list` files naming cases, one `.h5` file per slice or volume.

Each `.h5` file holds two datasets, `image` (float32, already normalised by the preprocessing) and
`label` (uint8 class ids), so a sample's image and mask are the same file. Two layouts exist:

- ACDC-like (SSL4MIS 2D): `train_slices.list` names 2D slices stored as `data/slices/<id>.h5`; they
  form the 'train' split (ndim 2). `val.list` / `test.list` name whole volumes `data/<id>.h5` (ndim 3),
  because the protocol trains on slices but evaluates per volume (Dice/HD95 over the 3D case).
- LA-like (UA-MT/DTC 3D): `train.list` / `test.list` name case folders holding `<case>/mri_norm2.h5`.

List order is kept exactly: the SSL4MIS protocol labels the *first* N slices of `train_slices.list`
(the first 3 or 7 patients: 68 or 136 slices), so sorting would silently change the labelled set.
These files store no voxel spacing, so `Sample.spacing` is None and surface metrics are in voxels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from frugalseg.data.labels import LabelSpec, background_index
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.data.voc import read_class_names
from frugalseg.data.volume_io import read_h5_image, read_h5_mask, to_class_ids
from frugalseg.errors import DataError

__all__ = ["DATASET_CLASSES", "first_patients_ids", "load_hdf5", "patient_of", "read_h5_image", "read_h5_mask",
           "to_class_ids"]


# Class names of the known SSL4MIS datasets, keyed by the dataset folder name (lower case).
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "acdc": ("background", "RV", "Myo", "LV"),
    "la2018": ("background", "left_atrium"),
    "la": ("background", "left_atrium"),
}


# ---- loading ----------------------------------------------------------------------------------
def _read_list(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        # Tolerate lists that name the file rather than the case.
        for suffix in (".h5", ".hdf5"):
            if line.endswith(suffix):
                line = line[: -len(suffix)]
        ids.append(line)
    if not ids:
        raise DataError(f"{path}: the list names no cases.")
    return ids


def _available_splits(root: Path) -> list[str]:
    splits = sorted(p.stem for p in root.glob("*.list") if p.stem != "train_slices")
    if (root / "train_slices.list").exists() and "train" not in splits:
        splits.insert(0, "train")
    return splits


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _class_names(root: Path, first_file: Path, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """Explicit names, else the known dataset's, else classes.txt, else inferred from the first label."""
    if class_names is not None:
        return tuple(class_names)
    known = DATASET_CLASSES.get(root.name.lower())
    if known is not None:
        return known
    if (root / "classes.txt").exists():
        return tuple(read_class_names(root / "classes.txt"))
    top = int(read_h5_mask(first_file).max())
    return ("background", *(f"class_{k}" for k in range(1, max(top, 1) + 1)))


def load_hdf5(root: Path | str, split: str = "train", class_names: Sequence[str] | None = None) -> SegDataset:
    """Load one split of an SSL4MIS-layout HDF5 dataset (ACDC-like slices or LA-like volumes).

    'train' with a `train_slices.list` gives 2D slices in list order; any other split `<split>.list`
    gives volumes, found as `data/<id>.h5` (ACDC), `<id>/mri_norm2.h5` (LA) or `<id>.h5`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found.")
    slices_list = root / "train_slices.list"
    if split == "train" and slices_list.exists():
        list_file, ndim = slices_list, 2
        ids = _read_list(list_file)

        def candidates(i: str) -> list[Path]:
            return [root / "data" / "slices" / f"{i}.h5", root / "data" / f"{i}.h5"]
    else:
        list_file, ndim = root / f"{split}.list", 3
        if not list_file.exists():
            raise DataError(
                f"{root}: no split '{split}' (no {list_file.name}); available splits: {_available_splits(root)}. "
                "An SSL4MIS-layout dataset needs train_slices.list or train.list, and val.list/test.list."
            )
        ids = _read_list(list_file)

        def candidates(i: str) -> list[Path]:
            return [root / "data" / f"{i}.h5", root / i / "mri_norm2.h5", root / f"{i}.h5", root / i / f"{i}.h5"]

    paths: list[Path] = []
    missing: list[str] = []
    for i in ids:
        p = _first_existing(candidates(i))
        if p is None:
            missing.append(i)
        else:
            paths.append(p)
    if missing:
        tried = ", ".join(str(c.relative_to(root)) for c in candidates(missing[0]))
        raise DataError(
            f"{list_file}: {len(missing)} of {len(ids)} listed cases have no .h5 file, e.g. '{missing[0]}' "
            f"(looked for {tried})."
        )
    names = _class_names(root, paths[0], class_names)
    spec = LabelSpec(names=names, background=background_index(names))
    samples = [Sample(id=i, image=p, mask=p, spacing=None) for i, p in zip(ids, paths)]
    return SegDataset(name=f"{root.name}:{split}", samples=samples, labels=spec, ndim=ndim)


# ---- SSL4MIS protocol helpers -------------------------------------------------------------------
_PATIENT = re.compile(r"^(.+?)_frame\d+")


def patient_of(sample_id: str) -> str:
    """The patient of an ACDC slice or volume id ('patient004_frame01_slice_1' → 'patient004'); any other id
    (an LA volume, an image) is its own patient. Labelled sets drawn by patient (`first_patients_ids`,
    `semi.batches.select_labelled`) and co-training's views group samples with it."""
    m = _PATIENT.match(sample_id)
    return m.group(1) if m else sample_id


def first_patients_ids(ds: SegDataset, n_patients: int) -> tuple[str, ...]:
    """Ids of every sample of the first `n_patients` patients, in list order.

    This is how SSL4MIS picks its labelled set on ACDC (3 patients = 68 slices, 7 = 136): by patient,
    so no patient has both labelled and unlabelled slices.
    """
    if n_patients <= 0:
        raise DataError("The number of labelled patients must be positive.")
    order: list[str] = []
    for s in ds.samples:
        p = patient_of(s.id)
        if p not in order:
            order.append(p)
    if n_patients > len(order):
        raise DataError(f"{ds.name}: asked for {n_patients} patients but the list has only {len(order)}.")
    chosen = set(order[:n_patients])
    return tuple(s.id for s in ds.samples if patient_of(s.id) in chosen)
