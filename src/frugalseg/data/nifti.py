"""NIfTI volumes and the Medical Segmentation Decathlon (MSD) layout.

Axis convention: nibabel returns voxel arrays indexed (i, j, k), which for ordinary scans is (x, y, z)
with z the slice axis. Every array this module returns is transposed to **(z, y, x)** (2D files:
(y, x)), the same (D, H, W) order as the HDF5 volumes, so slice-wise 2D networks, `torch` and the
metrics see the slice axis first whatever the source format. `Sample.spacing` is the header's voxel
size (zooms) in the same (z, y, x) order. Volumes are *not* reoriented to a canonical frame: arrays
keep the stored voxel order (only the axes are reversed), so a prediction written back with
`write_nifti(..., reference=image_path)` lands exactly on the input's grid.

MSD layout: `dataset.json` with `labels` ({"0": "background", "1": ...}; the nnU-Net v2 form
{"background": 0, ...} is accepted too), `training` [{"image": "./imagesTr/x.nii.gz", "label":
"./labelsTr/x.nii.gz"}, ...] and optionally `test` (image paths) and `validation` (as `training`).
Split 'train' is every training case; MSD ships no validation list, so 'val' exists only when
dataset.json has a `validation` list; otherwise carve one with `frugalseg.data.holdout`.

Multi-modal 4D images (e.g. BraTS: FLAIR, T1w, T1gd, T2w) are not supported yet and raise DataError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from frugalseg.data.io import atomic_path, suffix_of
from frugalseg.data.labels import LabelSpec, background_index
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.data.volume_io import _load, _nib, _spacing, _spatial_shape, read_nifti_image, read_nifti_mask, read_nifti_spacing  # noqa: F401
from frugalseg.errors import DataError

__all__ = ["load_msd", "read_nifti_image", "read_nifti_mask", "read_nifti_spacing", "write_nifti"]




def write_nifti(
    path: Path | str,
    array_zyx: np.ndarray,
    spacing: Sequence[float] | None,
    reference: Path | str | Any | None = None,
) -> None:
    """Write a (z, y, x) array as NIfTI, atomically (a killed run leaves no half file).

    With `reference` (a NIfTI path or nibabel image, usually the input volume) its affine is reused,
    so the output overlays the input in any viewer; otherwise the affine is diag(spacing) with
    `spacing` in (z, y, x) order (None = 1 mm). Booleans are stored as uint8, float64 as float32.
    """
    nib = _nib()
    path = Path(path)
    arr = np.asarray(array_zyx)
    if arr.ndim not in (2, 3):
        raise DataError(f"{path}: write_nifti expects a 2D or 3D array, got shape {arr.shape}.")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    data = np.ascontiguousarray(arr.transpose())  # (z, y, x) -> (x, y, z)
    if reference is not None:
        ref = _load(Path(reference)) if isinstance(reference, (str, Path)) else reference
        affine = np.asarray(ref.affine, dtype=np.float64)
    else:
        if spacing is None:
            spacing = (1.0,) * arr.ndim
        if len(spacing) != arr.ndim:
            raise DataError(f"{path}: spacing {tuple(spacing)} does not match a {arr.ndim}D array.")
        affine = np.eye(4)
        for axis, s in enumerate(reversed(tuple(float(v) for v in spacing))):
            affine[axis, axis] = s
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    # nibabel picks the format (and gzip) from the file name, so the temporary file must end in
    # .nii.gz / .nii; it is renamed onto atomic_path's temporary name, which atomic_path renames last.
    ext = ".nii.gz" if suffix_of(path) == ".nii.gz" else ".nii"
    with atomic_path(path) as tmp:
        nii_tmp = tmp.with_name(tmp.name + ext)
        try:
            nib.save(img, str(nii_tmp))
            os.replace(nii_tmp, tmp)
        finally:
            if nii_tmp.exists():
                nii_tmp.unlink()


# ---- MSD layout -------------------------------------------------------------------------------
def _label_names(labels: Any, where: Path) -> tuple[str, ...]:
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: 'labels' must be a non-empty mapping such as {{\"0\": \"background\", \"1\": \"tumour\"}}.")
    if all(str(k).strip().isdigit() for k in labels):  # MSD: {"0": "background"}
        by_id = {int(k): str(v) for k, v in labels.items()}
    elif all(isinstance(v, int) for v in labels.values()):  # nnU-Net v2: {"background": 0}
        by_id = {int(v): str(k) for k, v in labels.items()}
    else:
        raise DataError(f"{where}: cannot read 'labels' {labels}; expected {{\"0\": \"background\", ...}}.")
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(f"{where}: label ids {sorted(by_id)} are not consecutive from 0.")
    return tuple(by_id[i] for i in range(len(by_id)))


def _case_id(path: Path) -> str:
    name = path.name
    return name[: -len(suffix_of(path))] if suffix_of(path) in (".nii", ".nii.gz") else path.stem


def load_msd(root: Path | str, split: str = "train") -> SegDataset:
    """Load one split of a Medical Segmentation Decathlon dataset (see the module notes on splits)."""
    _nib()  # fail early with the install hint
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise DataError(f"{root}: no dataset.json; an MSD-layout dataset needs dataset.json, imagesTr/ and labelsTr/.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path}: invalid JSON ({exc}).") from None
    names = _label_names(meta.get("labels"), meta_path)
    key = {"train": "training", "val": "validation", "test": "test"}.get(split, split)
    entries = meta.get(key)
    if not entries:
        have = [s for s, k in (("train", "training"), ("val", "validation"), ("test", "test")) if meta.get(k)]
        hint = " MSD ships no validation list: use frugalseg.data.holdout on 'train'." if split == "val" else ""
        raise DataError(f"{meta_path}: no '{key}' list for split '{split}'; available splits: {have}.{hint}")

    samples = []
    ndims = set()
    for n, entry in enumerate(entries):
        if isinstance(entry, str):
            image_rel, label_rel = entry, None
        elif isinstance(entry, dict) and "image" in entry:
            image_rel, label_rel = entry["image"], entry.get("label")
        else:
            raise DataError(f"{meta_path}: entry {n} of '{key}' is {entry!r}; expected {{\"image\": ..., \"label\": ...}}.")
        if isinstance(image_rel, list):
            raise DataError(f"{meta_path}: entry {n} lists several image files; multi-modal input is not supported yet.")
        image = (root / image_rel).resolve()
        mask = (root / label_rel).resolve() if label_rel else None
        for p in (image, mask):
            if p is not None and not p.exists():
                raise DataError(f"{meta_path}: entry {n} names {p}, which does not exist.")
        img = _load(image)
        ndims.add(len(_spatial_shape(img, image)))
        samples.append(Sample(
            id=_case_id(image), image=image, mask=mask, supervision="mask" if mask else "none",
            spacing=_spacing(img, image),
        ))
    if len(ndims) > 1:
        raise DataError(f"{meta_path}: split '{split}' mixes 2D and 3D images.")
    spec = LabelSpec(names=names, background=background_index(names))
    return SegDataset(name=f"{root.name}:{split}", samples=samples, labels=spec, ndim=ndims.pop())
