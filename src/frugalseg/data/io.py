"""Reading images and label files with clear errors, and writing them atomically.

Label PNGs are read with Pillow so palette indices survive (mode "P"); OpenCV would silently turn
VOC palette labels into colours. Every unreadable or inconsistent file raises `DataError` naming it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from frugalseg.errors import DataError, FrugalsegError, OutputError, first_line

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


# ---- atomic writes ------------------------------------------------------------------------------------
# The one writer of every artefact (exports, checkpoints, masks, maps, reports, JSON): a temporary file in the
# target's folder, renamed onto the target when the block succeeds, removed on any failure. Its name,
# `.<name>.<pid>-<host>-<random>.frugalseg.tmp`, says which process wrote it, so a later run can delete what a
# killed process left (`remove_stale_temporaries`) without touching a file in flight or a user's own file.
TEMP_SUFFIX = ".frugalseg.tmp"
STALE_AFTER_S = 3600.0  # a temporary from another machine untouched this long belongs to no live writer
LOW_SPACE_BYTES = 16 * 2**20  # free space under this after a failed write: the disk was full


def _host_identity() -> str:
    """Six hex digits naming this process's "host" for temporary names: the hostname, plus, where Linux tells
    them, the PID namespace and the boot. Two containers that share a hostname (and a volume) but not a PID
    namespace then get different tags, so neither takes the other's live temporaries for a dead process's."""
    parts = [socket.gethostname()]
    try:
        parts.append(f"pidns:{os.stat('/proc/self/ns/pid').st_ino}")
    except OSError:
        pass
    try:
        parts.append(f"boot:{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}")
    except OSError:
        pass
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:6]


_HOST = _host_identity()
# an optional inner extension: writers that pick their format from the name (nibabel) write `<temp>.nii.gz`
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}\.frugalseg\.tmp(\.[A-Za-z0-9]+){0,2}$")
_WRITE_FAILED = re.compile(r"file write failed|unexpected pos|failed writing|write failed|error while serializ", re.I)
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os error (\d+)")
_SPACE = "(free some space, or choose another {elsewhere})"
_CAUSES = {  # {elsewhere}: the option that picks another place (`--out`; `--root` for dataset downloads)
    errno.ENOSPC: "no space left on the device holding {folder} " + _SPACE,
    getattr(errno, "EDQUOT", -1): "disk quota exceeded on the device holding {folder} " + _SPACE,
    errno.EROFS: "the folder {folder} is read-only (choose another {elsewhere})",
    errno.EACCES: "permission denied: {folder} is not writable by this user (choose another {elsewhere}, or change its permissions)",
    errno.EPERM: "permission denied: {folder} is not writable by this user (choose another {elsewhere}, or change its permissions)",
}
#: The errors of a write the file system refused (full, quota, read-only, permission): what `output_error` explains.
REFUSED_WRITE_ERRNOS = frozenset(_CAUSES)


def _known_errno(exc: BaseException) -> int | None:
    """The file-system cause of `exc` (or of the exception it was raised `from`), from its errno or from its text
    (safetensors reports `... (os error 28)`)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return e.errno
        m = _ERRNO_IN_TEXT.search(str(e))
        if m and int(m.group(1) or m.group(2)) in _CAUSES:
            return int(m.group(1) or m.group(2))
        e = e.__cause__  # an explicit `raise ... from`: an exception merely being handled is not the cause
    return None


def _concerns(exc: OSError, folder: Path) -> bool:
    """Whether an OSError is about `folder` or a file in it (not about some other file read in the block)."""
    if not isinstance(exc.filename, (str, bytes, os.PathLike)):
        return True
    failed = Path(os.fsdecode(exc.filename))
    return failed == folder or failed.parent == folder


def output_error(exc: BaseException, target: Path | str, elsewhere: str = "--out") -> OutputError | None:
    """The `OutputError` for a failure to write `target`, or None when `exc` is not a file-system failure
    (a bug, an interrupt, an unreadable input): then the caller re-raises `exc` itself.

    Disk full, quota, read-only and permission errors are recognised from the errno (also in an exception it was
    raised `from`, or in the text, as safetensors reports it); torch.save reports a full disk only as "file write
    failed" / "unexpected pos", so for such a write failure without an errno the free space of the folder decides
    (never for any other exception: a bug raised while the disk happens to be nearly full stays that bug). Call it
    before deleting the temporary file, whose size would otherwise count as free. `elsewhere`: the option the
    message suggests for writing somewhere else."""
    if not isinstance(exc, Exception) or isinstance(exc, FrugalsegError):  # interrupts; errors already explained
        return None
    target = Path(target)
    folder = target.parent
    if isinstance(exc, OSError) and not _concerns(exc, folder):
        return None
    code = _known_errno(exc)
    write_failed = _WRITE_FAILED.search(str(exc)) is not None
    if code is None and write_failed and not isinstance(exc, OSError):
        try:
            if shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
                code = errno.ENOSPC
        except OSError:
            pass
    if code is not None:
        return OutputError(f"cannot write {target}: {_CAUSES[code].format(folder=folder, elsewhere=elsewhere)}.")
    if isinstance(exc, OSError) or write_failed:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        return OutputError(f"cannot write {target}: the write failed ({reason}); check the device holding {folder}.")
    return None


def make_folder(path: Path | str, elsewhere: str = "--out") -> Path:
    """`mkdir -p path`, failing with one clear `OutputError` naming the folder (permission denied, read-only,
    disk full, a file in the way); `elsewhere`: the option the message suggests for another place."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        failed = Path(os.fsdecode(exc.filename)) if exc.filename is not None else path
        code = _known_errno(exc)
        if code is not None:
            cause = _CAUSES[code].format(folder=failed.parent, elsewhere=elsewhere)
        elif isinstance(exc, (FileExistsError, NotADirectoryError)):
            blocker = next((p for p in (failed, *failed.parents) if p.exists() and not p.is_dir()), failed)
            cause = f"{blocker} is a file, not a folder (remove it, or choose another {elsewhere})"
        else:
            cause = exc.strerror or first_line(exc)
        raise OutputError(f"cannot create the folder {path}: {cause}.") from exc
    return path


def temporary_name(path: Path | str, extension: str = "") -> Path:
    """A fresh temporary name next to `path`, tagged with this process and host (`is_stale_temporary` reads them
    back); `extension` (`.partial`, `.nii.gz`) is appended after the temporary suffix. Nothing is created."""
    path = Path(path)
    return path.with_name(f".{path.name[:120]}.{os.getpid()}-{_HOST}-{secrets.token_hex(4)}{TEMP_SUFFIX}{extension}")


def _temp_for(path: Path) -> Path:
    """A new empty temporary file next to `path` (created exclusively, with the umask's permissions)."""
    for _ in range(8):
        tmp = temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            error = output_error(exc, path)
            if error is None:
                raise
            raise error from exc
    raise FileExistsError(f"{path.parent}: cannot find a free temporary name")  # pragma: no cover


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename onto `path` only if the block succeeds.

    A killed or failing run therefore never leaves a half-written artefact under the final name, and on any
    failure (an exception, Ctrl-C) the temporary file is removed. File-system failures (disk full, quota,
    read-only, permission) become one `OutputError` naming `path`, never the temporary name.
    """
    path = Path(path)
    make_folder(path.parent)
    tmp = _temp_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        error = output_error(exc, path)  # before removing tmp: its size would count as free space
        _remove(tmp)
        if error is not None:
            raise error from exc
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def is_temporary(path: Path | str) -> bool:
    """Whether `path` is named like an `atomic_path` temporary (of this or any process)."""
    return _TEMP_NAME.match(Path(path).name) is not None


def is_stale_temporary(path: Path | str, now: float | None = None) -> bool:
    """Whether `path` is an `atomic_path` temporary no live writer will rename: its process (on this host: same
    hostname, PID namespace and boot, see `_host_identity`) has ended, or, written on another host (a machine, a
    container), it has been untouched for `STALE_AFTER_S`."""
    path = Path(path)
    m = _TEMP_NAME.match(path.name)
    if m is None:
        return False
    pid = int(m.group("pid"))
    if m.group("host") == _HOST and pid > 0 and os.name != "nt":  # os.kill(pid, 0) would end a process on Windows
        return not _pid_alive(pid)
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def _files_of(folder: Path | str, recursive: bool) -> Iterator[tuple[str, str]]:
    """(folder, name) of the files under `folder` (or only in it); unreadable folders are skipped."""
    if recursive:
        for root, _dirs, files in os.walk(folder):  # symlinked folders are not followed
            yield from ((root, name) for name in files)
        return
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return
    yield from ((os.fspath(folder), name) for name in names)


def remove_stale_temporaries(folder: Path | str, recursive: bool = True) -> int:
    """Delete the temporary files that killed processes left under `folder` (recursively, symlinks not
    followed; with `recursive=False` only those directly in it, e.g. a user's output folder); return how many.
    Only names of `atomic_path`'s pattern whose writer is gone are touched, so a user's file or a write in flight
    is never deleted. Best effort: an unreadable or read-only folder is skipped."""
    removed = 0
    for root, name in _files_of(folder, recursive):
        if name.endswith(TEMP_SUFFIX) or TEMP_SUFFIX + "." in name:
            path = Path(root) / name
            if is_stale_temporary(path):
                try:
                    path.unlink()
                    removed += 1
                except OSError:
                    pass
    return removed


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


def read_text(path: Path | str, encoding: str = "utf-8-sig") -> str:
    """A text file's contents (a UTF-8 byte-order mark dropped); a `DataError` naming the file when it is
    missing, a folder, unreadable (permissions, I/O) or not UTF-8 text."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise unreadable(path, exc) from None


def unreadable(path: Path | str, exc: OSError, expected: str = "a file") -> DataError:
    """The `DataError` for an input that cannot be read: missing, a folder where a file is expected (or a file
    where a folder is), permission denied, an I/O error."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: file not found.")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{path}: is a folder, but {expected} is expected here (rename or remove the folder).")
    if isinstance(exc, NotADirectoryError):
        if os.path.isfile(path):  # (os.path: False, not an error, for a path it cannot stat)
            return DataError(f"{path}: is a file, but {expected} is expected here (rename or remove the file).")
        return DataError(f"{path}: a folder on this path is a file (rename or remove that file).")
    if isinstance(exc, PermissionError):
        return DataError(f"{path}: permission denied (make it readable by this user).")
    return DataError(f"{path}: cannot read ({exc.strerror or first_line(exc)}).")


def read_json(path: Path | str) -> Any:
    """A JSON artefact; a `DataError` naming the file when it is missing, unreadable or does not parse (a file
    damaged outside frugalseg: our own writes are atomic)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise unreadable(path, exc, "a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); the file is damaged: restore it, or delete it (and the "
                        "stage marker that lists it) so the stage that writes it runs again.") from None
