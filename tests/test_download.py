"""Dataset downloads against a local HTTP server: verify, extract, resume, refuse, fail clearly.

Everything is served from 127.0.0.1; no test touches the internet.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import frugalseg.data.download as download
import frugalseg.data.io as fio
from frugalseg.data.download import (
    CACHE_DIR,
    CATALOGUE,
    MARKER,
    DatasetSource,
    FileSource,
    download_dataset,
)
from frugalseg.data.io import TEMP_SUFFIX, is_temporary, temporary_name
from frugalseg.errors import ConfigError, DataError, OutputError

# --------------------------------------------------------------------------------------------------
# A tiny file server with HTTP Range support and a request log


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not srv.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            chunk = body[start:]
        else:
            self.send_response(200)
            chunk = body
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    requests: list[dict]
    ignore_range: bool


@pytest.fixture()
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.ignore_range = {}, [], False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# Archives and catalogue entries


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TGZ_MEMBERS = {"toy/images/a.txt": b"alpha\n", "toy/masks/a.txt": b"mask-a\n"}
ZIP_MEMBERS = {"toy/extra/b.txt": b"bravo\n" * 1000}


def _serve_toy(server, digest_tgz: str | None = None) -> dict[str, DatasetSource]:
    tgz, zp = _tgz(TGZ_MEMBERS), _zip(ZIP_MEMBERS)
    server.files["/toy.tgz"] = tgz
    server.files["/toy.zip"] = zp
    src = DatasetSource(
        name="toy",
        description="test archive",
        files=(
            FileSource(f"{server.base}/toy.tgz", "toy.tgz", "md5", digest_tgz or _md5(tgz), len(tgz), "tgz"),
            FileSource(f"{server.base}/toy.zip", "toy.zip", "sha256", _sha256(zp), None, "zip"),
        ),
        folder="toy",
        licence="test only",
    )
    return {"toy": src}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".partial", ".old")))


# --------------------------------------------------------------------------------------------------
# Tests


def test_download_verify_extract(server, tmp_path):
    cat = _serve_toy(server)
    dest = download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    assert dest == tmp_path / "toy"
    for name, data in {**TGZ_MEMBERS, **ZIP_MEMBERS}.items():
        assert (dest / name).read_bytes() == data
    marker = json.loads((dest / MARKER).read_text())
    assert marker["files"]["toy.tgz"]["digest"] == cat["toy"].files[0].digest
    assert marker["files"]["toy.zip"]["algorithm"] == "sha256"
    assert (tmp_path / CACHE_DIR / "toy.tgz").exists()
    assert not list((tmp_path / CACHE_DIR).glob("*.part"))
    assert _leftovers(tmp_path) == []


def test_second_call_makes_no_request(server, tmp_path):
    cat = _serve_toy(server)
    download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    n = len(server.requests)
    assert n == 2
    assert download_dataset("toy", tmp_path, progress=False, catalogue=cat) == tmp_path / "toy"
    assert len(server.requests) == n


def test_force_reextracts_from_verified_cache(server, tmp_path):
    cat = _serve_toy(server)
    dest = download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    (dest / "toy" / "images" / "a.txt").write_text("tampered")
    n = len(server.requests)
    download_dataset("toy", tmp_path, progress=False, force=True, catalogue=cat)
    assert (dest / "toy" / "images" / "a.txt").read_bytes() == TGZ_MEMBERS["toy/images/a.txt"]
    assert len(server.requests) == n  # checksummed cache files are reused, not fetched again
    assert _leftovers(tmp_path) == []


def test_checksum_mismatch(server, tmp_path):
    cat = _serve_toy(server, digest_tgz="0" * 32)
    with pytest.raises(DataError) as exc:
        download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    msg = str(exc.value)
    assert "checksum" in msg and "toy.tgz" in msg and "0" * 32 in msg
    assert _md5(server.files["/toy.tgz"]) in msg
    assert not (tmp_path / "toy").exists()
    cache = tmp_path / CACHE_DIR
    assert not (cache / "toy.tgz").exists() and not (cache / "toy.tgz.part").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("ignore_range", [False, True], ids=["206-resume", "200-restart"])
def test_resume_from_partial(server, tmp_path, ignore_range):
    cat = _serve_toy(server)
    server.ignore_range = ignore_range
    full = server.files["/toy.tgz"]
    cache = tmp_path / CACHE_DIR
    cache.mkdir()
    half = len(full) // 2
    # With a 200 answer the stale prefix must be overwritten, not appended to: make it wrong on purpose.
    (cache / "toy.tgz.part").write_bytes(full[:half] if not ignore_range else b"x" * half)
    dest = download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    tgz_requests = [r for r in server.requests if r["path"] == "/toy.tgz"]
    assert tgz_requests == [{"path": "/toy.tgz", "range": f"bytes={half}-"}]
    assert (cache / "toy.tgz").read_bytes() == full
    assert (dest / "toy" / "images" / "a.txt").read_bytes() == TGZ_MEMBERS["toy/images/a.txt"]


def test_preplaced_file_is_used_without_network(server, tmp_path):
    cat = _serve_toy(server)
    cache = tmp_path / CACHE_DIR
    cache.mkdir()
    (cache / "toy.tgz").write_bytes(server.files["/toy.tgz"])
    (cache / "toy.zip").write_bytes(server.files["/toy.zip"])
    download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    assert server.requests == []
    assert (tmp_path / "toy" / "toy" / "extra" / "b.txt").exists()


def test_bad_preplaced_file_is_reported_not_deleted(server, tmp_path):
    cat = _serve_toy(server)
    cache = tmp_path / CACHE_DIR
    cache.mkdir()
    (cache / "toy.tgz").write_bytes(b"not the archive")
    with pytest.raises(DataError, match="checksum"):
        download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    assert (cache / "toy.tgz").exists()  # the user's file: reported, not deleted
    assert not (tmp_path / "toy").exists()


def test_unknown_checksum_warns_and_records_sha256(server, tmp_path, caplog):
    data = b"raw volume bytes"
    server.files["/vol.tif"] = data
    src = DatasetSource(
        name="raw", description="no checksum", folder="raw", licence="test",
        files=(FileSource(f"{server.base}/vol.tif", "vol.tif", "md5", None),),
    )
    with caplog.at_level(logging.WARNING, logger="frugalseg.data.download"):
        dest = download_dataset("raw", tmp_path, progress=False, catalogue={"raw": src})
    assert (dest / "vol.tif").read_bytes() == data
    assert _sha256(data) in caplog.text
    rec = json.loads((dest / MARKER).read_text())["files"]["vol.tif"]
    assert rec == {"algorithm": "sha256", "digest": _sha256(data), "verified": "no"}


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_path_traversal_is_refused(server, tmp_path, kind):
    members = {"toy/ok.txt": b"ok", "../evil": b"pwned"}
    data = _tgz(members) if kind == "tgz" else _zip(members)
    server.files[f"/evil.{kind}"] = data
    src = DatasetSource(
        name="evil", description="traversal", folder="evil", licence="test",
        files=(FileSource(f"{server.base}/evil.{kind}", f"evil.{kind}", "md5", _md5(data), None, kind),),
    )
    root = tmp_path / "root"
    with pytest.raises(DataError, match="unsafe member"):
        download_dataset("evil", root, progress=False, catalogue={"evil": src})
    assert not (root / "evil").exists()
    assert not (tmp_path / "evil").exists() and not (root / "evil.partial").exists()
    assert _leftovers(root) == []


def test_unknown_name_lists_known(tmp_path):
    with pytest.raises(ConfigError) as exc:
        download_dataset("nope", tmp_path, progress=False)
    for name in CATALOGUE:
        assert name in str(exc.value)


def test_unreachable_url(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/toy.tgz"
    src = DatasetSource(
        name="down", description="unreachable", folder="down", licence="test",
        files=(FileSource(url, "toy.tgz", "md5", "0" * 32, None, "tgz"),),
    )
    with pytest.raises(DataError) as exc:
        download_dataset("down", tmp_path, progress=False, catalogue={"down": src})
    msg = str(exc.value)
    assert url in msg
    assert str(tmp_path / CACHE_DIR / "toy.tgz") in msg  # where to put a hand-downloaded copy
    assert not (tmp_path / "down").exists()


def test_foreign_folder_is_not_replaced(server, tmp_path):
    cat = _serve_toy(server)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not created by"):
        download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    assert (tmp_path / "toy" / "mine.txt").exists()
    assert server.requests == []


def test_catalogue_entries_are_well_formed():
    assert {"voc2012", "sbd", "isbi2012-raw", "msrc21-raw"} <= set(CATALOGUE)
    for key, src in CATALOGUE.items():
        assert src.name == key and src.folder and src.licence and src.files
        assert "/" not in src.folder and not src.folder.startswith(".")
        for f in src.files:
            for url in (f.url, *f.mirrors):
                assert re.match(r"https?://[^/\s]+/\S+$", url), url
            assert f.filename and "/" not in f.filename
            assert f.algorithm in ("md5", "sha256")
            if f.digest is not None:
                n = 32 if f.algorithm == "md5" else 64
                assert re.fullmatch(rf"[0-9a-f]{{{n}}}", f.digest), (key, f.filename)
            assert f.size is None or f.size > 0
            assert f.extract in (None, "tar", "tgz", "zip")
    assert CATALOGUE["voc2012"].files[0].digest == "6cd6e144f989b92b3379bac3b3de84fd"
    assert CATALOGUE["sbd"].files[0].digest == "82b4d87ceb2ed10f6038a1cba92111cb"
    isbi = {f.filename for f in CATALOGUE["isbi2012-raw"].files}
    assert isbi == {"train-volume.tif", "train-labels.tif", "test-volume.tif"}


def test_mirror_is_tried_after_failed_url(server, tmp_path):
    cat = _serve_toy(server)
    first = cat["toy"].files[0]
    broken = replace(first, url=f"{server.base}/missing.tgz", mirrors=(first.url,))
    src = replace(cat["toy"], files=(broken, cat["toy"].files[1]))
    dest = download_dataset("toy", tmp_path, progress=True, catalogue={"toy": src})
    assert [r["path"] for r in server.requests][:2] == ["/missing.tgz", "/toy.tgz"]
    assert (dest / "toy" / "images" / "a.txt").exists()


def _tar_with_link(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"ok"
        info = tarfile.TarInfo("toy/file.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.SYMTYPE, target
        tf.addfile(link)
    return buf.getvalue()


@pytest.mark.parametrize("target,ok", [("file.txt", True), ("../../outside", False), ("/etc/passwd", False)])
def test_tar_symlinks(server, tmp_path, target, ok):
    data = _tar_with_link("toy/link", target)
    server.files["/links.tgz"] = data
    src = DatasetSource(
        name="links", description="symlinks", folder="links", licence="test",
        files=(FileSource(f"{server.base}/links.tgz", "links.tgz", "md5", _md5(data), None, "tgz"),),
    )
    if ok:
        dest = download_dataset("links", tmp_path, progress=False, catalogue={"links": src})
        assert (dest / "toy" / "link").read_bytes() == b"ok"
    else:
        with pytest.raises(DataError, match="outside the archive"):
            download_dataset("links", tmp_path, progress=False, catalogue={"links": src})
        assert not (tmp_path / "links").exists()


# --------------------------------------------------------------------------------------------------
# A full, read-only or unwritable disk: one OutputError naming what the user asked for


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on the device holding {d} (free some space, or choose another --root)"),
    (errno.EROFS, "the folder {d} is read-only (choose another --root)"),
    (errno.EACCES, "permission denied: {d} is not writable by this user (choose another --root"),
])
def test_disk_full_while_downloading_names_the_file(server, tmp_path, monkeypatch, code, words):
    cat = _serve_toy(server)

    class FullDisk:  # the .part file: the first write fails
        def __init__(self, path, mode):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(download, "open", FullDisk, raising=False)
    with pytest.raises(OutputError) as info:
        download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    cache = tmp_path / CACHE_DIR
    msg = str(info.value)
    assert msg.startswith(f"cannot write {cache / 'toy.tgz'}: {words.format(d=cache)}")
    assert ".part" not in msg and "\n" not in msg
    assert not (tmp_path / "toy").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_disk_full_while_extracting_names_the_dataset_and_keeps_the_download(server, tmp_path, monkeypatch, kind):
    cat = _serve_toy(server)
    broken = "extractall"

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "toy" / "images" / "a.txt"))

    monkeypatch.setattr(tarfile.TarFile if kind == "tgz" else zipfile.ZipFile, broken, full)
    with pytest.raises(OutputError) as info:
        download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    assert str(info.value) == (f"cannot write {tmp_path / 'toy'}: no space left on the device holding {tmp_path} "
                               "(free some space, or choose another --root).")
    assert not (tmp_path / "toy").exists() and _leftovers(tmp_path) == []
    # the verified downloads are not called corrupt, nor deleted: the next run extracts them offline
    assert (tmp_path / CACHE_DIR / "toy.tgz").exists() and (tmp_path / CACHE_DIR / "toy.zip").exists()
    monkeypatch.undo()
    n = len(server.requests)
    assert (download_dataset("toy", tmp_path, progress=False, catalogue=cat) / "toy" / "images" / "a.txt").exists()
    assert len(server.requests) == n


@pytest.mark.parametrize("which", [".part", ".partial"])
def test_a_refused_rename_names_the_target_and_keeps_the_previous_dataset(server, tmp_path, monkeypatch, which):
    cat = _serve_toy(server)
    if which == ".partial":
        download_dataset("toy", tmp_path, progress=False, catalogue=cat)  # a previous, complete dataset
    real_replace = os.replace

    def refuse(src, dst):
        if str(src).endswith(which):
            raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(download.os, "replace", refuse)
    with pytest.raises(OutputError) as info:
        download_dataset("toy", tmp_path, progress=False, force=True, catalogue=cat)
    target = tmp_path / CACHE_DIR / "toy.tgz" if which == ".part" else tmp_path / "toy"
    assert str(info.value).startswith(f"cannot write {target}: permission denied: {target.parent} is not writable")
    assert TEMP_SUFFIX not in str(info.value) and _leftovers(tmp_path) == []
    if which == ".partial":  # the dataset moved aside is put back
        assert (tmp_path / "toy" / MARKER).exists()
        assert (tmp_path / "toy" / "toy" / "images" / "a.txt").read_bytes() == TGZ_MEMBERS["toy/images/a.txt"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_removed_but_not_a_live_download(server, tmp_path, monkeypatch):
    """A staging folder is named with its process and host: a killed run's (and its `.old` folder) is removed by
    the next run, a download running now in another process keeps its staging folder."""
    cat = _serve_toy(server)
    dead, host = _dead_pid(), fio._HOST
    live = temporary_name(tmp_path / "toy", ".partial")  # this process: alive
    stale = [
        tmp_path / f".toy.{dead}-{host}-0123abcd{TEMP_SUFFIX}.partial",
        tmp_path / f".toy.{dead}-{host}-89abcdef{TEMP_SUFFIX}.old",
        tmp_path / ".toy.k3j2_x9.partial",  # an earlier version's name, two hours old
    ]
    kept = [live, tmp_path / f".toy.123-{'0' * 6 if host != '000000' else '1' * 6}-00000000{TEMP_SUFFIX}.partial",
            tmp_path / ".toy.q8w7_e6.old"]  # another host's, and an earlier version's, both just written
    for folder in stale + kept:
        (folder / "previous").mkdir(parents=True)
        (folder / "previous" / "big.bin").write_bytes(b"x" * 100)
    old = time.time() - 2 * fio.STALE_AFTER_S
    os.utime(stale[2], (old, old))
    seen = []
    real_extract = download.extract_archive

    def spy(archive, dest, kind, target=None):
        seen.append(Path(dest))
        return real_extract(archive, dest, kind, target)

    monkeypatch.setattr(download, "extract_archive", spy)
    download_dataset("toy", tmp_path, progress=False, catalogue=cat)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    staging = seen[0]
    assert staging.parent == tmp_path and is_temporary(staging) and f".{os.getpid()}-{host}-" in staging.name
    assert not staging.exists()
