"""Readers of volume files (HDF5, NIfTI) as arrays, and the suffix -> reader table `SegDataset` uses.

Kept apart from the dataset layouts (`hdf5.py`, `nifti.py`), which build samples: those import
`samples`, and `samples` imports these readers, so neither imports the other back. h5py and nibabel are
imported when a file is read, so `import frugalseg.data` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from frugalseg.data.io import suffix_of
from frugalseg.errors import DataError, require

IMAGE_KEY = "image"
LABEL_KEY = "label"


# ---- HDF5 (SSL4MIS layout: datasets `image` and `label`) ---------------------------------------
def _h5py():
    # h5py is a core dependency, but importing it lazily keeps `import frugalseg.data` light.
    import h5py

    return h5py


def _read_dataset(path: Path, key: str) -> np.ndarray:
    """One dataset of an HDF5 file, with errors that name the file and the keys it does hold."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found.")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            node = f.get(key)
            if not isinstance(node, h5py.Dataset):
                raise DataError(
                    f"{path}: no dataset '{key}' in this HDF5 file (found keys {keys}). SSL4MIS-layout files "
                    f"hold '{IMAGE_KEY}' (float image) and '{LABEL_KEY}' (uint8 class ids)."
                )
            return np.asarray(node[()])
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: cannot read HDF5 file ({exc}). The file may be corrupt or truncated.") from None


def read_h5_image(path: Path) -> np.ndarray:
    """The `image` dataset as float32 (H, W) or (D, H, W)."""
    return _read_dataset(path, IMAGE_KEY).astype(np.float32, copy=False)


def to_class_ids(raw: np.ndarray, where: str) -> np.ndarray:
    """Integer-valued labels of any dtype as uint8 ids, refusing values a uint8 mask cannot hold."""
    if raw.dtype == np.uint8:
        return raw
    if raw.dtype.kind == "b":
        return raw.astype(np.uint8)
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise DataError(f"{where}: label values range {raw.min()}..{raw.max()}; class ids must be in 0..255.")
    if raw.dtype.kind == "f" and raw.size and not np.array_equal(raw, np.round(raw)):
        raise DataError(f"{where}: label holds non-integer values (dtype {raw.dtype}); expected class ids.")
    return np.round(raw).astype(np.uint8) if raw.dtype.kind == "f" else raw.astype(np.uint8)


def read_h5_mask(path: Path) -> np.ndarray:
    """The `label` dataset as uint8 class ids (values must be integers in 0..255)."""
    return to_class_ids(_read_dataset(path, LABEL_KEY), str(path))




# ---- NIfTI ----------------------------------------------------------------------------------------
def _nib():
    return require("nibabel", "medical", "NIfTI input")


def _load(path: Path):
    nib = _nib()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found.")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several unrelated types (ImageFileError, EOFError, OSError...)
        raise DataError(f"{path}: cannot read NIfTI file ({exc}). The file may be corrupt or truncated.") from None


def _spatial_shape(img, path: Path) -> tuple[int, ...]:
    """The spatial shape, refusing multi-channel 4D data (a trailing axis of size 1 is dropped)."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise DataError(
            f"{path}: {len(shape)}D image of shape {shape}; multi-modal (4D) NIfTI input is not supported yet. "
            "Split the modalities into separate datasets or pick one channel."
        )
    if len(shape) < 2:
        raise DataError(f"{path}: image of shape {shape} is not 2D or 3D.")
    return shape


def _array(path: Path) -> np.ndarray:
    img = _load(path)
    shape = _spatial_shape(img, Path(path))
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip streams fail only when the data is read
        raise DataError(f"{path}: cannot read NIfTI data ({exc}). The file may be corrupt or truncated.") from None
    return np.ascontiguousarray(data.reshape(shape).transpose())  # (x, y, z) -> (z, y, x)


def read_nifti_image(path: Path) -> np.ndarray:
    """Image as float32 in (z, y, x) order (2D files: (y, x)); header scaling is applied."""
    return _array(path).astype(np.float32, copy=False)


def read_nifti_mask(path: Path) -> np.ndarray:
    """Label volume as uint8 class ids in (z, y, x) order."""
    return to_class_ids(_array(path), str(path))


def read_nifti_spacing(path: Path) -> tuple[float, ...]:
    """Voxel size from the header zooms, in (z, y, x) order like the arrays."""
    return _spacing(_load(path), Path(path))


def _spacing(img, path: Path) -> tuple[float, ...]:
    n = len(_spatial_shape(img, path))
    return tuple(float(z) for z in img.header.get_zooms()[:n])[::-1]




# suffix -> (read image, read mask as class ids)
VolumeReader = tuple[Callable[[Path], np.ndarray], Callable[[Path], np.ndarray]]
VOLUME_READERS: dict[str, VolumeReader] = {
    ".h5": (read_h5_image, read_h5_mask),
    ".hdf5": (read_h5_image, read_h5_mask),
    ".nii": (read_nifti_image, read_nifti_mask),
    ".nii.gz": (read_nifti_image, read_nifti_mask),
}


def volume_reader(path: Path) -> VolumeReader:
    """(read image, read mask) for a volume file, by suffix; a clear error for anything else."""
    suffix = suffix_of(Path(path))
    try:
        return VOLUME_READERS[suffix]
    except KeyError:
        raise DataError(f"{path}: unsupported file type '{suffix}'.") from None
