"""`frugalseg annotate`: a local page where a person answers the queries of `frugalseg query`.

The server listens on 127.0.0.1 only (the images are the user's data; nothing is exposed to the network).
For each query the page shows the region's neighbourhood, the region outlined and pre-painted with the
model's prediction (correcting is faster than painting from nothing); the person paints or fills the
region with the dataset's classes (or "void" for "cannot tell") and saves. Each answer is merged into
the image's **partial mask** in the answers folder (the one queries.json names, or `--masks`): the
answered region's pixels get the painted ids, every other pixel keeps what it had (255 = void for an
image without a mask). For a folders dataset that folder is the dataset's own masks/, so the next
`frugalseg train` or `train --semi` reads the answered images as labelled data. Answers are also logged
in `answers.json` beside queries.json (query, time, mask file, pixels per class); a query answered again
replaces its region's pixels. `labelled_ids.txt` lists every image that now has a mask there, for the
semi-supervised methods (`frugalseg train --semi meanteacher ... --labelled-ids @<queries>/labelled_ids.txt`:
those images labelled, the rest of the split unlabelled).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from frugalseg.data.io import (
    read_json, read_label_png, read_rgb, sample_file, write_json, write_label_png, write_text,
)
from frugalseg.data.labels import LabelSpec
from frugalseg.errors import DataError
from frugalseg.report.annotate_page import annotate_page

log = logging.getLogger(__name__)

__all__ = ["AnnotationSession", "make_server", "read_volume_mask", "serve"]

MARGIN = 24  # pixels of context around a queried region


def read_volume_mask(path: Path) -> np.ndarray:
    """A partial volume mask written by `annotate` (uint8 ids, 255 = void), in (z, y, x) order."""
    from frugalseg.data.volume_io import _array

    return np.asarray(_array(path)).astype(np.uint8)


def _write_mask(path: Path, mask: np.ndarray, labels: LabelSpec) -> None:
    """A palette mask in the format its name says (PNG, or the TIFF / BMP an existing mask already is)."""
    if path.suffix.lower() == ".png":
        write_label_png(path, mask, labels.palette_bytes())
        return
    from frugalseg.data.io import atomic_path

    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(labels.palette_bytes())
    fmt = {".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot write a mask as '{path.suffix}'; use PNG, TIFF or BMP masks.")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)


class AnnotationSession:
    """The queries of one folder, the answers folder, and the merge of answers into partial masks."""

    def __init__(self, queries_dir: Path, masks: str | Path | None = None):
        self.dir = Path(queries_dir)
        path = self.dir / "queries.json"
        if not path.exists():
            raise DataError(f"{self.dir}: no queries.json; run `frugalseg query RUN` first.")
        self.doc = read_json(path)
        if self.doc.get("format") != 1 or "queries" not in self.doc:
            raise DataError(f"{path}: not a frugalseg queries file (format 1).")
        self.labels = LabelSpec(names=tuple(self.doc["classes"]),
                                palette=tuple(tuple(c) for c in self.doc["palette"]),
                                ignore_index=int(self.doc.get("ignore_index", 255)))
        self.masks = Path(masks) if masks else Path(self.doc["masks"])
        self.by_id = {q["id"]: q for q in self.doc["queries"]}
        self.log_path = self.dir / "answers.json"
        self.answers: dict = read_json(self.log_path) if self.log_path.exists() else {}
        self._lock = threading.Lock()

    # ---- what the page reads ---------------------------------------------------------------------
    def query(self, qid: str) -> dict:
        if qid not in self.by_id:
            raise KeyError(qid)
        return self.by_id[qid]

    def crop_box(self, q: dict, shape: tuple[int, int]) -> tuple[int, int, int, int]:
        y0, x0, y1, x1 = q["bbox"]
        return max(0, y0 - MARGIN), max(0, x0 - MARGIN), min(shape[0], y1 + MARGIN), min(shape[1], x1 + MARGIN)

    def _region(self, q: dict) -> np.ndarray:
        with np.load(self.dir / q["regions_file"]) as z:
            return z["regions"] == q["region"]

    def _slice(self, q: dict) -> dict:
        with np.load(self.dir / q["slice_file"]) as z:
            return {k: z[k] for k in z.files}

    def crop_png(self, qid: str) -> bytes:
        q = self.query(qid)
        buf = io.BytesIO()
        if q.get("kind") == "plane":  # the plane resampled as a 2D slice, in [0, 1]
            grey = (255 * np.clip(self._slice(q)["image"], 0, 1)).astype(np.uint8)
            Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(buf, format="PNG")
            return buf.getvalue()
        image = read_rgb(Path(q["image"]))
        y0, x0, y1, x1 = self.crop_box(q, image.shape[:2])
        Image.fromarray(image[y0:y1, x0:x1]).save(buf, format="PNG")
        return buf.getvalue()

    def task(self, qid: str) -> dict:
        """The crop's size, the region (0/1 per pixel), and the labels to start painting from: the saved
        answer where the mask has one, else the model's prediction."""
        q = self.query(qid)
        if q.get("kind") == "plane":
            sl = self._slice(q)
            start = sl["prediction"].copy()
            path = self.mask_path(q)
            if path.exists():
                saved = self._voxels(q, sl, read_volume_mask(path))
                start = np.where(sl["patch"] & (saved != self.labels.ignore_index), saved, start)
            h, w = start.shape
            return {"id": qid, "width": w, "height": h, "box": [0, 0, h, w],
                    "region": sl["patch"].astype(np.uint8).ravel().tolist(), "start": start.ravel().tolist(),
                    "answered": qid in self.answers}
        region = self._region(q)
        y0, x0, y1, x1 = self.crop_box(q, region.shape)
        start = np.array(Image.open(self.dir / q["prediction_file"]), dtype=np.uint8)
        mask_path = self.mask_path(q)
        if mask_path.exists():
            saved = read_label_png(mask_path)
            if saved.shape == start.shape:
                start = np.where(region & (saved != self.labels.ignore_index), saved, start)
        return {"id": qid, "width": x1 - x0, "height": y1 - y0, "box": [y0, x0, y1, x1],
                "region": region[y0:y1, x0:x1].astype(np.uint8).ravel().tolist(),
                "start": start[y0:y1, x0:x1].ravel().tolist(), "answered": qid in self.answers}

    def mask_path(self, q: dict) -> Path:
        """The partial mask of the query's image: answers/<image stem>.png (a folders dataset pairs images
        and masks by stem); for a volume, answers/<sample id>.nii.gz."""
        if q.get("kind") == "plane":
            return sample_file(self.masks, q["sample"], ".nii.gz")
        existing = q.get("mask_file")
        if existing and Path(existing).parent.resolve() == self.masks.resolve():
            return Path(existing)  # the image's own mask (.png, .tif, .bmp): merged into, never duplicated
        return self.masks / f"{Path(q['image']).stem}.png"

    @staticmethod
    def _nearest(q: dict, sl: dict) -> tuple[np.ndarray, ...]:
        """Voxel indices (z, y, x) nearest to each slice pixel, clipped into the volume."""
        shape = q["volume_shape"]
        # halves round up, as map_coordinates' order-0 sampling that drew the slice
        return tuple(np.clip(np.floor(sl["coords"][a] + 0.5), 0, shape[a] - 1).astype(np.int64) for a in range(3))

    def _voxels(self, q: dict, sl: dict, volume: np.ndarray) -> np.ndarray:
        return volume[self._nearest(q, sl)]

    def _answer_plane(self, qid: str, q: dict, painted: np.ndarray) -> dict:
        """Write a painted slice into the volume's partial mask: each patch pixel's nearest voxel."""
        from frugalseg.data.nifti import write_nifti

        sl = self._slice(q)
        if painted.size != sl["patch"].size:
            raise DataError(f"answer for {qid}: {painted.size} labels for a {sl['patch'].shape} slice.")
        painted = painted.reshape(sl["patch"].shape)
        path = self.mask_path(q)
        shape = tuple(q["volume_shape"])
        volume = read_volume_mask(path) if path.exists() else np.full(shape, self.labels.ignore_index, np.uint8)
        if volume.shape != shape:
            raise DataError(f"{path}: mask size {volume.shape} differs from the volume's {shape}.")
        idx = tuple(a[sl["patch"]] for a in self._nearest(q, sl))
        volume[idx] = painted[sl["patch"]].astype(np.uint8)
        write_nifti(path, volume, q.get("spacing"))
        return {"mask": str(path), "values": painted[sl["patch"]], "voxels": int(len(set(zip(*idx))))}

    # ---- what the page writes --------------------------------------------------------------------
    def answer(self, qid: str, labels: list[int]) -> dict:
        """Merge a painted crop into the image's partial mask; only the queried region's pixels change."""
        q = self.query(qid)
        if q.get("kind") == "plane":
            region, (y0, x0, y1, x1) = None, (0, 0, 0, 0)
        else:
            region = self._region(q)
            y0, x0, y1, x1 = self.crop_box(q, region.shape)
        painted = np.asarray(labels, dtype=np.int64)
        self._check_ids(qid, painted)
        if q.get("kind") == "plane":
            with self._lock:
                done = self._answer_plane(qid, q, painted)
                return self._log(qid, q, done["mask"], done["values"], voxels=done["voxels"])
        if painted.size != (y1 - y0) * (x1 - x0):
            raise DataError(f"answer for {qid}: {painted.size} labels for a {y1 - y0}×{x1 - x0} crop.")
        painted = painted.reshape(y1 - y0, x1 - x0)
        with self._lock:
            path = self.mask_path(q)
            if path.exists():
                mask = read_label_png(path)
                if mask.shape != region.shape:
                    raise DataError(f"{path}: mask size {mask.shape} differs from the image's {region.shape}.")
            else:
                mask = np.full(region.shape, self.labels.ignore_index, dtype=np.uint8)
            sub = region[y0:y1, x0:x1]
            mask[y0:y1, x0:x1][sub] = painted[sub].astype(np.uint8)
            _write_mask(path, mask, self.labels)
            classes_txt = self.masks.parent / "classes.txt"
            if self.masks.name == "masks" and (self.masks.parent / "images").is_dir() and not classes_txt.exists():
                write_text(classes_txt, "\n".join(self.labels.names) + "\n")  # masks need named ids
            self._write_labelled_ids()
            return self._log(qid, q, str(path), painted[sub])

    def _write_labelled_ids(self) -> None:
        """labelled_ids.txt beside queries.json: every image with a mask in the answers folder (answered
        now or before), for `frugalseg train --semi ... --labelled-ids @<queries>/labelled_ids.txt`."""
        stems = sorted(p.name[:-4] for p in self.masks.glob("*.png") if not p.name.startswith("."))
        write_text(self.dir / "labelled_ids.txt", "".join(f"{s}\n" for s in stems))

    def _check_ids(self, qid: str, painted: np.ndarray) -> None:
        valid = (painted >= 0) & (painted < self.labels.num_classes) | (painted == self.labels.ignore_index)
        if not valid.all():
            bad = sorted(set(painted[~valid].tolist()))[:5]
            raise DataError(f"answer for {qid}: unknown class ids {bad} (classes 0..{self.labels.num_classes - 1},"
                            f" {self.labels.ignore_index} = void).")

    def _log(self, qid: str, q: dict, mask: str, values: np.ndarray, **extra) -> dict:
        counts = np.bincount(np.asarray(values, np.int64).ravel(), minlength=256)
        entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "sample": q["sample"], "mask": mask,
                 "pixels": {self.labels.names[k] if k < self.labels.num_classes else "void": int(c)
                            for k, c in enumerate(counts) if c}, **extra}
        self.answers[qid] = entry
        write_json(self.log_path, self.answers)
        return {"ok": True, **entry}


def make_server(session: AnnotationSession, port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:`port` (0 = any free port) serving the page and its API."""
    page = annotate_page(session.doc, session.labels).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args) -> None:  # quiet: the CLI prints what matters
            log.debug("annotate: " + fmt, *args)

        def _send(self, body: bytes, ctype: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, data, status: int = 200) -> None:
            self._send(json.dumps(data).encode(), "application/json", status)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            try:
                if self.path in ("/", "/index.html"):
                    return self._send(page, "text/html; charset=utf-8")
                if self.path == "/api/queries":
                    return self._json([{**q, "answered": q["id"] in session.answers} for q in session.doc["queries"]])
                if self.path.startswith("/api/image/") and self.path.endswith(".png"):
                    return self._send(session.crop_png(self.path[len("/api/image/"):-4]), "image/png")
                if self.path.startswith("/api/task/"):
                    return self._json(session.task(self.path[len("/api/task/"):]))
                self._json({"error": f"no such page {self.path}"}, HTTPStatus.NOT_FOUND)
            except KeyError as exc:
                self._json({"error": f"no query {exc}"}, HTTPStatus.NOT_FOUND)
            except DataError as exc:
                self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)

        def _same_origin(self) -> bool:
            """Only this page may write: the Host is this server (no DNS rebinding), an Origin (sent by
            browsers with cross-site requests) is this server, and the body is JSON (a plain HTML form
            from another site cannot send that without a CORS preflight, which this server never grants)."""
            port = self.server.server_address[1]
            here = {f"127.0.0.1:{port}", f"localhost:{port}"}
            origin = self.headers.get("Origin")
            return (self.headers.get("Host") in here and (origin is None or origin in {f"http://{h}" for h in here})
                    and self.headers.get("Content-Type", "").split(";")[0].strip() == "application/json")

        def do_POST(self) -> None:  # noqa: N802
            try:
                if not self._same_origin():
                    return self._json({"error": "answers are accepted from this page only"}, HTTPStatus.FORBIDDEN)
                if not self.path.startswith("/api/answer/"):
                    return self._json({"error": f"no such endpoint {self.path}"}, HTTPStatus.NOT_FOUND)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                self._json(session.answer(self.path[len("/api/answer/"):], body.get("labels", [])))
            except KeyError as exc:
                self._json({"error": f"no query {exc}"}, HTTPStatus.NOT_FOUND)
            except (DataError, ValueError) as exc:
                self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve(queries_dir: Path, port: int = 8765, masks: str | None = None, open_browser: bool = False,
          echo: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C."""
    session = AnnotationSession(queries_dir, masks)
    try:
        server = make_server(session, port)
    except OSError as exc:
        raise DataError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); "
                        "try --port 0 for any free port.") from None
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    echo(f"annotate: {len(session.doc['queries'])} queries at {url} (answers to {session.masks}); Ctrl-C to stop")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("annotate: stopped")
    finally:
        server.server_close()
