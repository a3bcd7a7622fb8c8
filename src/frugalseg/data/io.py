"""Reading images and label files with clear errors, and writing them atomically.

Label PNGs are read with Pillow so palette indices survive (mode "P"); OpenCV would silently turn
VOC palette labels into colours. Every unreadable or inconsistent file raises `DataError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from frugalseg.errors import DataError

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise DataError(f"{path}: file not found.")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}). The file may be corrupt or truncated.") from None
    return img


def read_rgb(path: Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3); greyscale and palette images are expanded to RGB."""
    img = _open(Path(path))
    if img.mode == "I;16" or img.mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_label_png(path: Path, palette: list[tuple[int, int, int]] | None = None) -> np.ndarray:
    """Class ids (H, W) uint8 from a palette, greyscale or colour PNG.

    Palette ("P") and greyscale ("L") images give their stored values. A colour (RGB) mask is mapped
    back to ids through `palette` when every colour in it belongs to the palette (a mask saved with
    colours by a tool that dropped the palette); otherwise it is rejected with an explanation.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "L"):
        return np.array(img, dtype=np.uint8)
    if img.mode in ("I", "I;16", "I;16B"):
        arr = np.asarray(img)
        if arr.max() > 255:
            raise DataError(f"{path}: 16-bit mask holds values up to {arr.max()}; class ids must be < 256.")
        return arr.astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].copy()
        if palette is not None:
            lut = {tuple(c): i for i, c in enumerate(palette)}
            lut[(255, 255, 255)] = 255
            lut[(224, 224, 192)] = 255  # VOC void colour
            colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
            ids = [lut.get(tuple(int(v) for v in c)) for c in colours]
            if all(i is not None for i in ids):
                return np.asarray(ids, dtype=np.uint8)[inverse.reshape(-1)].reshape(rgb.shape[:2])
            unknown = [tuple(int(v) for v in c) for c, i in zip(colours, ids) if i is None][:5]
            raise DataError(
                f"{path}: RGB-coloured mask with colours {unknown} that are not in the class palette. "
                "Save masks as palette (mode P) or greyscale PNGs holding class ids."
            )
        raise DataError(
            f"{path}: RGB-coloured mask. Save masks as palette (mode P) or greyscale PNGs holding class ids."
        )
    raise DataError(f"{path}: unsupported mask mode {img.mode}.")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename onto `path` only if the block succeeds.

    A killed or failing run therefore never leaves a half-written artefact under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_label_png(path: Path, mask: np.ndarray, palette_bytes: list[int]) -> None:
    """Write class ids as a palette PNG (255 = void), atomically."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(palette_bytes)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(tmp, format=fmt)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---- one naming scheme for per-sample files --------------------------------------------------------
def safe_name(sample_id: str) -> str:
    """A file name for a sample id: the id itself when it is already a plain name, else a cleaned id + hash.

    Plain ids (letters, digits, `.`, `_`, `-`, not starting with a dot), which is what VOC and most folder
    datasets use, stay readable (`2007_000032`); ids with slashes, spaces or other characters are cleaned
    and given a short hash of the original so two different ids never share a file.
    """
    sample_id = str(sample_id)
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,119}", sample_id):
        return sample_id
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._")[:60] or "sample"
    return f"{stem}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


def sample_file(folder: Path | str, sample_id: str, suffix: str) -> Path:
    """`folder/<safe id><suffix>`: the one place a per-sample artefact (mask, maps, prediction, report tile)
    gets its file name, so every stage finds every other stage's files."""
    return Path(folder) / f"{safe_name(sample_id)}{suffix}"


# ---- JSON artefacts ----------------------------------------------------------------------------------
def jsonable(x: Any) -> Any:
    """Plain JSON types from dataclasses, paths, tuples, NaN (-> null) and numpy / torch scalars."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return jsonable(x.item())
    return x


def write_json(path: Path | str, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text(Path(path), json.dumps(jsonable(data), indent=2) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())
