"""Public dataset downloads with known URLs and checksums (`frugalseg datasets download NAME`).

Why this module exists rather than "wget and untar": large academic archives are served by slow,
flaky university hosts, so a download must survive interruption (HTTP Range resume from `<file>.part`),
must prove it is the file the papers used (md5/sha256 from the catalogue), and must never leave a
half-extracted folder that a later run would mistake for a dataset (extraction happens in a temporary
folder beside the destination, which is renamed into place only when complete, with a marker file).

Layout under the data root (`$FRUGALSEG_DATA`, default `~/.cache/frugalseg/datasets`)::

    <root>/.downloads/<filename>          verified downloads (kept, so --force re-extracts offline)
    <root>/.downloads/<filename>.part     an interrupted download, resumed on the next run
    <root>/<folder>/                      the extracted dataset
    <root>/<folder>/.frugalseg-complete.json   written last: the folder is complete

A file that cannot be downloaded (host down, proxy, registration wall) can be fetched by hand and put at
`<root>/.downloads/<filename>`: it is verified and used as if downloaded.

The folders hold the data as published (e.g. `voc2012/VOCdevkit/VOC2012`), not converted to the
layouts of the shared task folders (`msrc21/`, `isbi2012/`): that is why the MSRC and ISBI entries
download to `*-raw` folders, so a raw download never shadows a converted task of the same name.

Only the standard library does the network work (urllib), so downloads add no dependency; tqdm, already a
dependency, draws the progress bar.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import posixpath
import shutil
import socket
import ssl
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal

from frugalseg.data.io import (REFUSED_WRITE_ERRNOS, STALE_AFTER_S, TEMP_SUFFIX, is_stale_temporary, make_folder,
                               output_error, temporary_name)
from frugalseg.errors import ConfigError, DataError, OutputError

log = logging.getLogger(__name__)

Algorithm = Literal["md5", "sha256"]
ArchiveKind = Literal["tar", "tgz", "zip"]

MARKER = ".frugalseg-complete.json"
CACHE_DIR = ".downloads"
CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
TIMEOUT_S = 60.0  # per socket operation, not per file: slow hosts are fine, dead ones fail
USER_AGENT = "frugalseg-downloader (+https://pypi.org/project/frugalseg)"
_HEX_LEN = {"md5": 32, "sha256": 64}


@dataclass(frozen=True)
class FileSource:
    """One file of a dataset: where it is, how to check it, and whether to unpack it.

    `digest` is None when no published or independently found checksum exists; such a file is then
    accepted with a warning and its computed sha256 is recorded in the marker file, so it can be pinned.
    """

    url: str
    filename: str
    algorithm: Algorithm
    digest: str | None
    size: int | None = None  # bytes, if known: lets a complete `.part` skip a request and sizes the bar
    extract: ArchiveKind | None = None  # None: copy the file as is into the dataset folder
    mirrors: tuple[str, ...] = ()  # tried in order after `url` on network errors


@dataclass(frozen=True)
class DatasetSource:
    """A public dataset: its files, the folder it lands in under the data root, and its terms."""

    name: str
    description: str
    files: tuple[FileSource, ...]
    folder: str
    licence: str
    content: str = ""  # where the data proper sits inside `folder` once extracted (informational)
    notes: tuple[str, ...] = ()  # shown to users who hit trouble (e.g. a registration wall)


# Checksum provenance (checked with public code search, not invented):
# - VOC 2012 md5 + size: torchvision `datasets/voc.py` and many independent download scripts agree;
#   the size appears in several wget/keras logs of the same URL.
# - SBD md5: torchvision `datasets/sbd.py` and other loaders agree; size from a torchvision download log.
# - ISBI-2012 md5s: one public source (the `ssTEM` dataset class proposed for torchvision, downloading
#   the same three URLs); not cross-checked against a second source.
# - MSRC v2 md5: one public source (a `vision_data` MSRC catalogue, which fetched the same file name from
#   its former research.microsoft.com address); not cross-checked against a second source.
CATALOGUE: dict[str, DatasetSource] = {
    "voc2012": DatasetSource(
        name="voc2012",
        description="PASCAL VOC 2012 trainval (17k images, 2913 with segmentation masks), 2.0 GB",
        files=(
            FileSource(
                url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                filename="VOCtrainval_11-May-2012.tar",
                algorithm="md5",
                digest="6cd6e144f989b92b3379bac3b3de84fd",
                size=1999639040,
                extract="tar",
                # A widely used copy of the same archive; the md5 guards against any difference.
                mirrors=("https://pjreddie.com/media/files/VOCtrainval_11-May-2012.tar",),
            ),
        ),
        folder="voc2012",
        content="VOCdevkit/VOC2012",
        licence=(
            "Images from Flickr under their owners' terms; annotations for research. Cite Everingham et al., "
            "'The PASCAL Visual Object Classes Challenge: A Retrospective', IJCV 2015."
        ),
    ),
    "sbd": DatasetSource(
        name="sbd",
        description="Semantic Boundaries Dataset (11k VOC 2011 images with masks; the 'trainaug' source), 1.4 GB",
        files=(
            FileSource(
                url="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                filename="benchmark.tgz",
                algorithm="md5",
                digest="82b4d87ceb2ed10f6038a1cba92111cb",
                size=1419539633,
                extract="tgz",
            ),
        ),
        folder="sbd",
        content="benchmark_RELEASE/dataset",
        licence=(
            "Research use. Cite Hariharan et al., 'Semantic contours from inverse detectors', ICCV 2011."
        ),
    ),
    "isbi2012-raw": DatasetSource(
        name="isbi2012-raw",
        description="ISBI 2012 EM membrane segmentation: train volume + labels, test volume (30x512x512 TIFFs)",
        files=tuple(
            FileSource(
                url=f"http://brainiac2.mit.edu/isbi_challenge/sites/default/files/{fname}",
                filename=fname,
                algorithm="md5",
                digest=md5,  # single public source, see the provenance note above
            )
            for fname, md5 in (
                ("train-volume.tif", "465461edbe0254630c4ec5577f1e7764"),
                ("train-labels.tif", "657fe6b728c6dd0152e295c6d800001d"),
                ("test-volume.tif", "9767660d7abe4e0ecbdd0061a16058ad"),
            )
        ),
        folder="isbi2012-raw",
        licence=(
            "Challenge terms: cite Arganda-Carreras et al., 'Crowdsourcing the creation of image segmentation "
            "algorithms for connectomics', Frontiers in Neuroanatomy 2015 (doi:10.3389/fnana.2015.00142)."
        ),
        notes=("The challenge site may require registration or be offline; if so, place the three TIFFs "
               "in <root>/.downloads/ and run again.",),
    ),
    "msrc21-raw": DatasetSource(
        name="msrc21-raw",
        description="MSRC object class recognition database v2 (591 images, 23 classes, raw BMP ground truth)",
        files=(
            FileSource(
                url=(
                    "https://download.microsoft.com/download/3/3/9/339D8A24-47D7-412F-A1E8-1A415BC48A15/"
                    "msrc_objcategimagedatabase_v2.zip"
                ),
                filename="msrc_objcategimagedatabase_v2.zip",
                algorithm="md5",
                digest="8fcd292c7f1e69f91a2ef513746bd52c",  # single public source, see the note above
                size=None,  # not found in a public source
                extract="zip",
            ),
        ),
        folder="msrc21-raw",
        content="MSRC_ObjCategImageDatabase_v2",
        licence=(
            "Microsoft Research licence, non-commercial research use. Cite Shotton et al., 'TextonBoost: "
            "Joint appearance, shape and context modeling for multi-class object recognition and "
            "segmentation', ECCV 2006."
        ),
    ),
}


# --------------------------------------------------------------------------------------------------
# Checksums


def file_digest(path: Path, algorithm: Algorithm) -> str:
    """Hex digest of a file, read in chunks so multi-GB archives do not need multi-GB memory."""
    # usedforsecurity=False: md5 is an integrity check here, and FIPS-mode Pythons refuse it otherwise.
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, source: FileSource, *, delete_bad: bool = True) -> dict[str, str]:
    """Check `path` against the catalogue checksum; return what to record in the marker file.

    A mismatch raises `DataError` naming the file and both digests, and deletes the file (when
    `delete_bad`) so that the next run downloads it again instead of tripping on it forever. A file
    without a catalogue checksum is accepted with a warning and its sha256 is returned for the record.
    """
    path = Path(path)
    if source.digest is None:
        sha = file_digest(path, "sha256")
        log.warning(
            "%s: no published checksum in the catalogue; accepted unverified (sha256 %s recorded).",
            source.filename, sha,
        )
        return {"algorithm": "sha256", "digest": sha, "verified": "no"}
    got = file_digest(path, source.algorithm)
    if got.lower() != source.digest.lower():
        where = f"{path}"
        if delete_bad:
            path.unlink(missing_ok=True)
            action = "The bad file was deleted; run the command again to re-download it."
        else:
            action = f"Delete or replace {where} and run the command again."
        raise DataError(
            f"{source.filename}: {source.algorithm} checksum mismatch for {where}: expected "
            f"{source.digest}, got {got}. The download is corrupt or the file changed upstream. {action}"
        )
    return {"algorithm": source.algorithm, "digest": got, "verified": "yes"}


# --------------------------------------------------------------------------------------------------
# Download


# Errors worth trying the next mirror for. Plain OSError is left out on purpose: a full disk is not a
# network problem and must not be reported as one.
_NETWORK_ERRORS = (
    urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, ssl.SSLError,
)


def _manual_hint(source: FileSource, target: Path) -> str:
    return (
        f"Download {source.url} by hand (a browser works) and place it at {target}, then run the command "
        "again: it is verified and used without a network request."
    )


def _stream(url: str, part: Path, source: FileSource, progress: bool) -> None:
    """Fetch `url` into `part`, resuming from its current length when the server honours Range.

    A server that answers 200 to a Range request sends the whole file, so the partial file is then
    overwritten rather than appended to (appending would silently corrupt it; the checksum would
    catch that, but only after a full wasted download).
    """
    offset = part.stat().st_size if part.exists() else 0
    if source.size is not None and offset > source.size:
        log.info("%s: partial file is larger than the expected size; restarting.", part.name)
        part.unlink()
        offset = 0
    if source.size is not None and offset == source.size:
        log.info("%s: partial file already has the expected size; verifying.", part.name)
        return
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Range not satisfiable: the partial file is at least as long as the file. Let the checksum
            # decide; a mismatch deletes it and the next run starts from scratch.
            log.info("%s: server reports the partial file complete; verifying.", part.name)
            return
        raise
    with resp:
        status = getattr(resp, "status", 200)
        mode = "wb"
        if offset and status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise DataError(f"{url}: server answered Range with unexpected Content-Range {content_range!r}.")
            mode = "ab"
            log.info("%s: resuming at byte %d.", part.name, offset)
        else:
            if offset:
                log.info("%s: server does not support resume; downloading from the start.", part.name)
            offset = 0
        length = resp.headers.get("Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        total = offset + remaining if remaining is not None else source.size
        from tqdm.auto import tqdm

        received = 0
        # a full disk, a read-only or unwritable cache: one OutputError naming the file (network errors pass through)
        with _writing(part.with_name(source.filename)), open(part, mode) as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=source.filename, disable=not progress, leave=False,
        ) as bar:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if remaining is not None and received < remaining:
            # Keep the .part file: the next run resumes from here.
            raise http.client.IncompleteRead(b"", remaining - received)


def fetch_file(source: FileSource, cache: Path, *, progress: bool = True) -> tuple[Path, dict[str, str]]:
    """Return the verified file in `cache` (downloading it if needed) and its checksum record.

    A file already in the cache, downloaded earlier or placed there by hand, is verified and reused:
    with a catalogue checksum it is provably what a fresh download would give, and without one it may
    be the only copy the user could get (a host that is offline), so it is never deleted here.
    """
    cache = Path(cache)
    make_folder(cache, elsewhere="--root")
    target = cache / source.filename
    if target.exists():
        log.info("%s: found in %s; verifying.", source.filename, cache)
        # A file placed by hand is the user's: report a mismatch rather than deleting it.
        return target, verify_file(target, source, delete_bad=False)

    part = target.with_name(target.name + ".part")
    errors: list[str] = []
    for url in (source.url, *source.mirrors):
        log.info("Downloading %s", url)
        try:
            _stream(url, part, source, progress)
        except _NETWORK_ERRORS as exc:
            reason = getattr(exc, "reason", None) or exc
            errors.append(f"{url}: {reason}")
            log.warning("%s failed (%s)", url, reason)
            continue
        record = verify_file(part, source, delete_bad=True)
        with _writing(target):
            os.replace(part, target)
        return target, record
    kept = f" The partial download {part} is kept and resumed next time." if part.exists() else ""
    raise DataError(
        f"{source.filename}: download failed ({'; '.join(errors)}).{kept} " + _manual_hint(source, target)
    )


# --------------------------------------------------------------------------------------------------
# Extraction


def _check_member(name: str, archive: Path) -> None:
    """Refuse member names that would land outside the extraction folder (path traversal)."""
    normalised = name.replace("\\", "/")
    pure = PurePosixPath(normalised)
    drive = len(normalised) > 1 and normalised[1] == ":"  # C:/... from an archive made on Windows
    if pure.is_absolute() or drive or ".." in pure.parts:
        raise DataError(
            f"{archive}: refusing to extract unsafe member {name!r} (absolute path or '..'); "
            "the archive is corrupt or malicious."
        )


def extract_archive(archive: Path, dest: Path, kind: ArchiveKind, target: Path | None = None) -> None:
    """Extract `archive` into the existing folder `dest`, refusing any member that escapes it.

    Every member name is checked before anything is written, so a malicious archive writes nothing.
    Tar links pointing outside, device files and the like are refused by the standard 'data' filter.
    A full disk, a read-only or unwritable folder raise one `OutputError` naming `target` (the folder the user
    asked for, when `dest` is a staging folder; default `dest`), not a "corrupt archive" error.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, archive)
                zf.extractall(dest)
            return
        with tarfile.open(archive, "r:gz" if kind == "tgz" else "r:*") as tf:
            members = tf.getmembers()
            for m in members:
                _check_member(m.name, archive)
                if m.issym() or m.islnk():
                    # Symlink targets are relative to the link's folder, hard-link targets to the root.
                    base = posixpath.dirname(m.name) if m.issym() else ""
                    target = posixpath.normpath(posixpath.join(base, m.linkname))
                    if posixpath.isabs(m.linkname) or target == ".." or target.startswith("../"):
                        raise DataError(
                            f"{archive}: refusing link member {m.name!r} -> {m.linkname!r}, "
                            "which points outside the archive."
                        )
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Pythons before 3.11.4; the name checks above still apply
                tf.extractall(dest, members=members)
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        reading = isinstance(exc, OSError) and exc.filename is not None and Path(os.fsdecode(exc.filename)) == archive
        error = None if reading else _refused_write(exc, target or dest)
        if error is not None:
            raise error from exc
        raise DataError(
            f"{archive}: cannot extract ({exc}). The file may be corrupt; delete it and run again."
        ) from None


# --------------------------------------------------------------------------------------------------
# Whole datasets


def _is_complete(dest: Path, src: DatasetSource) -> bool:
    """True when `dest` holds a finished extraction of the catalogue's current files."""
    marker = dest / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text()).get("files", {})
    except (OSError, ValueError):
        return False
    for f in src.files:
        rec = recorded.get(f.filename)
        if rec is None:
            return False
        # A catalogue digest that changed (a corrected entry) means the folder is stale.
        if f.digest is not None and (
            rec.get("algorithm") != f.algorithm or rec.get("digest", "").lower() != f.digest.lower()
        ):
            return False
    return True


def _is_stale_work_folder(path: Path) -> bool:
    """Whether a staging (`.partial`) or set-aside (`.old`) folder belongs to no live download.

    Their names are `data.io` temporary names (`.<folder>.<pid>-<host>-<random>.frugalseg.tmp.partial`), so the
    rule is `data.io.is_stale_temporary`'s: the process that made it has ended (same host), or, made on another
    host sharing this data root, it has been untouched for an hour. Names of earlier versions (`.<folder>.<random>
    .partial`) say nothing of their process: the age rule alone."""
    if is_stale_temporary(path):
        return True
    if TEMP_SUFFIX + "." in path.name:  # this version's name, and its writer may be alive
        return False
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _remove_stale_staging(root: Path, folder: str) -> None:
    """Delete staging and set-aside folders that killed runs left (they can hold gigabytes), never those of a
    download running now in another process (see `_is_stale_work_folder`)."""
    for stale in sorted(root.glob(f".{folder}.*")):
        if stale.name.endswith((".partial", ".old")) and stale.is_dir() and _is_stale_work_folder(stale):
            log.info("Removing leftover %s from an interrupted run.", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _refused_write(exc: BaseException, target: Path) -> OutputError | None:
    """`data.io.output_error` for a write the file system refused, naming `target` (what the user asked for),
    never the `.part` file or staging folder the OS names; None for any other error (a network failure passes)."""
    if not isinstance(exc, OSError) or exc.errno not in REFUSED_WRITE_ERRNOS:
        return None
    return output_error(OSError(exc.errno, exc.strerror), target, elsewhere="--root")


@contextmanager
def _writing(target: Path) -> Iterator[None]:
    """Report the file system refusing a write inside the block as one `OutputError` naming `target`."""
    try:
        yield
    except OSError as exc:
        error = _refused_write(exc, target)
        if error is None:
            raise
        raise error from exc


def download_dataset(
    name: str,
    root: Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    catalogue: dict[str, DatasetSource] = CATALOGUE,
) -> Path:
    """Download, verify and extract a catalogue dataset; return its folder under the data root.

    Idempotent: a folder with a completion marker matching the catalogue is returned at once, with no
    network request. `force` extracts again (replacing a folder made by an earlier run, or a foreign
    folder of the same name); verified files in `<root>/.downloads/` are reused, so delete a file there
    to fetch it again. Those files stay after extraction so a re-extraction needs no network; delete
    them to save space.
    """
    if name not in catalogue:
        known = ", ".join(sorted(catalogue)) or "(none)"
        raise ConfigError(f"Unknown dataset '{name}'. Known datasets: {known}.")
    src = catalogue[name]
    if root is None:
        from frugalseg.data import data_root

        root = data_root()
    root = Path(root).expanduser()
    dest = root / src.folder
    if not force and _is_complete(dest, src):
        log.info("%s: already present at %s.", name, dest)
        return dest
    if dest.exists() and not force and not (dest / MARKER).exists():
        # Not made by us (a crashed run never leaves the final name behind): never delete user data.
        raise DataError(
            f"{dest} exists but was not created by `frugalseg datasets download` (no {MARKER}). "
            "Move it away, or pass --force to replace it."
        )

    make_folder(root, elsewhere="--root")
    cache = root / CACHE_DIR
    records: dict[str, dict[str, str]] = {}
    paths: list[tuple[FileSource, Path]] = []
    for f in src.files:
        path, records[f.filename] = fetch_file(f, cache, progress=progress)
        paths.append((f, path))

    _remove_stale_staging(root, src.folder)
    # Staging and set-aside folders carry this process's pid and host (data.io temporary names), so a later run
    # deletes them only once this process has ended, never while it is still extracting.
    staging = temporary_name(dest, ".partial")
    with _writing(dest):
        staging.mkdir()
    try:
        for f, path in paths:
            if f.extract is None:
                with _writing(dest):
                    shutil.copy2(path, staging / f.filename)
            else:
                log.info("Extracting %s", path.name)
                extract_archive(path, staging, f.extract, target=dest)
        marker = {
            "name": src.name,
            "files": records,
            "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "licence": src.licence,
        }
        with _writing(dest):
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            # os.replace cannot replace a non-empty folder: move the old one aside first, then delete it,
            # so the final name never points at a mixture of old and new files.
            old = None
            if dest.exists():
                old = temporary_name(dest, ".old")
                old.mkdir()
                os.replace(dest, old / "previous")
            try:
                os.replace(staging, dest)
            except OSError:
                if old is not None:  # put the previous dataset back rather than leave no folder at all
                    os.replace(old / "previous", dest)
                    shutil.rmtree(old, ignore_errors=True)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # if this fails, the next run removes it (its process is gone)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    where = dest / src.content if src.content else dest
    log.info("%s: ready at %s. Terms: %s", name, where, src.licence)
    return dest
