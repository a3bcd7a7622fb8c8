"""Class activation maps on disk: one compressed `.npz` per image.

The layout follows IRN's `make_cam` (`keys`, `cam`, `high_res`), which AdvCAM and most WSSS code reuse,
so maps from any of those methods read the same way:

- `keys`     int32 (n,): the class ids the maps belong to (indices into the dataset's `LabelSpec`; for a
  dataset with a background class these are the image's foreground tags, never the background);
- `cam`      float16 (n, h, w): the maps at feature resolution (stride 4 or 16), for random-walk refinement;
- `high_res` float16 (n, H, W): the maps at image size, for seeds and evaluation;
- `meta`     a JSON string (method, scales, stride, ...), plus `format`, the layout version.

Values are in [0, 1] (each class map divided by its own maximum). float16 keeps about three decimal
digits there (step 2^-11 near 1), plenty for thresholds given to two decimals, at half the size of float32.
Unlike IRN's pickled `.npy` dicts, nothing is pickled: a map file cannot run code when it is opened.

Writes go to a temporary name next to the target and are renamed into place, so a killed run never
leaves a half-written map that a resumed run would mistake for a finished one.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from frugalseg.data.io import atomic_path, sample_file
from frugalseg.errors import DataError

FORMAT_VERSION = 1
ARRAYS = ("keys", "cam", "high_res")
# Values a little outside [0, 1] (interpolation overshoot, rounding) are clipped; anything further out is a
# map that was never normalised, which is a bug upstream and must not be stored silently.
_RANGE_TOLERANCE = 1e-3


@dataclass
class CamMaps:
    """The maps of one image, as float32 arrays.

    `keys[i]` is the class id of `cam[i]` and `high_res[i]`. `meta` is what the writer recorded
    (method, scales, ...); `path` the file it came from, when it came from one.
    """

    keys: np.ndarray
    cam: np.ndarray
    high_res: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the high-resolution maps."""
        return int(self.high_res.shape[1]), int(self.high_res.shape[2])

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def map_of(self, class_id: int) -> np.ndarray:
        """The high-resolution map (H, W) of one class; KeyError if the image has no map for it."""
        where = np.flatnonzero(self.keys == class_id)
        if where.size == 0:
            raise KeyError(f"no map for class id {class_id} (this image has maps for {self.keys.tolist()})")
        return self.high_res[int(where[0])]


def maps_path(run_dir: Path | str, sample_id: str) -> Path:
    """Where the maps of `sample_id` live in a run directory: `run_dir/maps/<safe id>.npz`."""
    return sample_file(Path(run_dir) / "maps", sample_id, ".npz")


def _as_unit_maps(name: str, maps: Any, n: int) -> np.ndarray:
    a = np.asarray(maps, dtype=np.float32)
    if a.ndim != 3 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape (n={n}, height, width), got {a.shape}.")
    if a.size:
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds NaN or infinite values.")
        lo, hi = float(a.min()), float(a.max())
        if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"{name} values span {lo:.4g}..{hi:.4g}; maps must be normalised to [0, 1] "
                "(divide each class map by its maximum) before saving."
            )
    return np.clip(a, 0.0, 1.0).astype(np.float16)


def save_maps(path: Path | str, keys: Sequence[int] | np.ndarray, cam: Any, high_res: Any, **meta: Any) -> Path:
    """Write one image's maps to `path` (compressed npz, float16), atomically; returns the path.

    `keys` (n,) class ids; `cam` (n, h, w) feature-resolution maps; `high_res` (n, H, W) image-size maps,
    both in [0, 1]. Torch tensors are accepted (moved to the CPU). `meta` holds JSON-serialisable extras
    (method name, scales, ...). The file is written exactly at `path`, whatever its suffix.
    An image with no tags has n = 0 and is stored like any other (its seed is all background).
    """
    path = Path(path)
    keys = np.asarray(_numpy(keys))
    if keys.ndim != 1 or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise ValueError(f"keys must be a 1-D array of integer class ids, got {keys.dtype} {keys.shape}.")
    if len(set(keys.tolist())) != keys.size:
        raise ValueError(f"keys hold duplicate class ids: {keys.tolist()}.")
    n = int(keys.size)
    cam16 = _as_unit_maps("cam", _numpy(cam), n)
    high16 = _as_unit_maps("high_res", _numpy(high_res), n)
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"map metadata must be JSON-serialisable: {exc}") from None
    with atomic_path(path) as tmp:
        # Through a file object: given a *name* without ".npz", numpy would append the suffix and the
        # temporary file we rename would stay empty.
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                keys=keys.astype(np.int32),
                cam=cam16,
                high_res=high16,
                meta=np.array(meta_json),
                format=np.array(FORMAT_VERSION),
            )
    return path


def _numpy(x: Any) -> Any:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    return x


def load_maps(
    path: Path | str,
    image_size: tuple[int, int] | None = None,
    num_classes: int | None = None,
) -> CamMaps:
    """Read one image's maps as float32 and check them.

    With `image_size` (H, W) the high-resolution maps must have exactly that size; with `num_classes`
    every class id must be in 0..num_classes-1. Raises `DataError` naming the file for a missing,
    unreadable or corrupt file, missing arrays, a keys/maps count mismatch, a size mismatch,
    out-of-range or duplicate class ids, and NaN/infinite values.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"map file {path} not found. Run the CAM stage for this image first.")
    try:
        with np.load(path, allow_pickle=False) as z:
            present = set(z.files)
            missing = [a for a in ARRAYS if a not in present]
            if missing:
                raise DataError(
                    f"map file {path} lacks the array(s) {missing} (it holds {sorted(present)}); "
                    f"expected {list(ARRAYS)} as written by frugalseg's save_maps."
                )
            keys = np.asarray(z["keys"])
            cam = np.asarray(z["cam"], dtype=np.float32)
            high_res = np.asarray(z["high_res"], dtype=np.float32)
            meta_raw = str(z["meta"][()]) if "meta" in present else "{}"
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"map file {path} cannot be read ({type(exc).__name__}: {exc}). It may be corrupt or truncated; "
            "delete it and run the CAM stage for this image again."
        ) from None

    if keys.ndim != 1 or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise DataError(f"map file {path}: 'keys' must be a 1-D array of integer class ids, got {keys.dtype} {keys.shape}.")
    for name, a in (("cam", cam), ("high_res", high_res)):
        if a.ndim != 3:
            raise DataError(f"map file {path}: '{name}' must have shape (n, height, width), got {a.shape}.")
        if a.shape[0] != keys.shape[0]:
            raise DataError(
                f"map file {path} holds {keys.shape[0]} class id(s) {keys.tolist()} but {a.shape[0]} "
                f"'{name}' map(s); each class id needs exactly one map."
            )
    if image_size is not None:
        expected = (int(image_size[0]), int(image_size[1]))
        if tuple(high_res.shape[1:]) != expected:
            raise DataError(
                f"map file {path} has shape {tuple(high_res.shape)}, the image is {expected[0]}×{expected[1]}: "
                "the maps were made for a different image (or a resized one); run the CAM stage again."
            )
    if num_classes is not None and keys.size:
        bad = sorted({int(k) for k in keys if k < 0 or k >= num_classes})
        if bad:
            raise DataError(
                f"map file {path} holds class id(s) {bad} outside 0..{num_classes - 1} "
                f"(the label spec has {num_classes} classes): were the maps made with another label spec?"
            )
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"map file {path} holds duplicate class id(s) {uniq[counts > 1].tolist()} in 'keys'.")
    if not (np.isfinite(cam).all() and np.isfinite(high_res).all()):
        raise DataError(f"map file {path} holds NaN or infinite values; run the CAM stage for this image again.")
    try:
        meta = json.loads(meta_raw)
    except ValueError:
        raise DataError(f"map file {path}: its 'meta' entry is not valid JSON.") from None
    return CamMaps(keys=keys.astype(np.int64), cam=cam, high_res=high_res,
                   meta=meta if isinstance(meta, dict) else {"meta": meta}, path=path)
