"""A self-contained HTML gallery of class activation maps: what each tagged class lights up, and the seed.

`write_cam_gallery(out_html, rows, labels, title)` writes `out_html` and JPEG thumbnails in
`<out_html stem>_assets/` next to it, referenced by relative paths, so the folder can be copied or zipped;
`write_maps_gallery(maps_dir, ds, samples)` is the gallery of a maps folder (what `frugalseg cams` writes).
One row per image: the image, one heat map per tagged class (captioned with the class name and the map's
peak), the seed and the ground truth as overlays in the label spec's palette. No JavaScript, CSS inline
(the run report's stylesheet, so both pages look alike).

Heat maps use viridis, a perceptually uniform colour map (equal steps in value look like equal steps in
colour, and it survives greyscale printing and colour blindness, unlike jet), drawn from a 17-stop table
so matplotlib is not needed. They are blended over a greyscale copy of the image so the map's colours are
not confused with the image's own.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from frugalseg.data.io import atomic_path, sample_file
from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.report.html import write_page
from frugalseg.report.overlays import colour_table, overlay, resize_image, resize_mask, thumbnail_size, to_rgb
from frugalseg.weak.maps_io import CamMaps, load_maps, maps_path
from frugalseg.weak.seeds import IRN_THRESHOLD, seed_from_maps

log = logging.getLogger(__name__)

THUMB_MAX_SIDE = 224
HEAT_ALPHA = 0.55

# viridis sampled at 0, 1/16, ..., 1 (matplotlib's table, rounded to 8 bits); linear interpolation between
# stops stays within 6/255 of the full 256-entry map.
VIRIDIS_STOPS = np.array(
    [[68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141], [44, 114, 142],
     [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115], [94, 201, 98],
     [132, 212, 75], [173, 220, 48], [216, 226, 25], [253, 231, 37]],
    dtype=np.float32,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB uint8 (..., 3) through viridis; values outside are clipped."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    pos = v * (len(VIRIDIS_STOPS) - 1)
    lo = np.minimum(pos.astype(np.int64), len(VIRIDIS_STOPS) - 2)
    frac = (pos - lo)[..., None]
    rgb = VIRIDIS_STOPS[lo] * (1.0 - frac) + VIRIDIS_STOPS[lo + 1] * frac
    return (rgb + 0.5).astype(np.uint8)


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized to (height, width), bilinear."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape == tuple(size):
        return m
    return np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.BILINEAR))


def heat_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """A class map (H, W) in [0, 1] drawn in viridis over a greyscale copy of `image`; RGB uint8."""
    rgb = to_rgb(image)
    if cam.shape != rgb.shape[:2]:
        raise ValueError(f"image size {rgb.shape[:2]} does not match map size {cam.shape}.")
    grey = rgb.astype(np.float32).mean(axis=2, keepdims=True)
    out = (1.0 - alpha) * grey + alpha * colormap(cam).astype(np.float32)
    return (out + 0.5).astype(np.uint8)


@dataclass
class CamRow:
    """One image of the gallery: its id, the image (RGB or greyscale, uint8 or float), its maps, and
    optionally the ground-truth mask and the seed (both class ids at image size, 255 = void)."""

    sample_id: str
    image: np.ndarray
    maps: CamMaps
    truth: np.ndarray | None = None
    seed: np.ndarray | None = None


def _as_row(r: Any) -> CamRow:
    if isinstance(r, CamRow):
        return r
    if isinstance(r, (tuple, list)) and 3 <= len(r) <= 5:
        return CamRow(*r)
    raise TypeError("gallery rows are CamRow or (sample_id, image, maps[, truth[, seed]]) tuples.")


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _css_colour(rgb: Sequence[int]) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in rgb[:3])


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=88, subsampling=0)


def _chip(i: int, labels: LabelSpec, lut: np.ndarray) -> str:
    name = labels.names[i] if 0 <= i < labels.num_classes else f"id {i}"
    return f'<span class="chip"><span class="sw" style="background:{_css_colour(lut[i])}"></span>{_e(name)}</span>'


GALLERY_CSS = """
.cambar{display:inline-block;width:160px;height:10px;border-radius:2px;vertical-align:middle;margin:0 6px;
border:1px solid rgba(0,0,0,.2)}
table.gallery figure{margin:0}table.gallery figcaption{font-size:12px;color:var(--muted);margin-top:2px;white-space:nowrap}
table.gallery td{vertical-align:top}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}
"""


def write_cam_gallery(
    out_html: Path | str,
    rows: Iterable[CamRow | tuple],
    labels: LabelSpec,
    title: str = "Class activation maps",
    *,
    max_images: int = 24,
    threshold: float | None = None,
    summary: str | None = None,
    max_side: int = THUMB_MAX_SIDE,
) -> Path:
    """Write the gallery page `out_html` and its thumbnails (atomically); returns the page's path.

    `rows` yields `CamRow`s (or (sample_id, image, maps[, truth[, seed]]) tuples); only the first
    `max_images` are read, so a lazy generator that loads images costs only what is shown. Where a row
    has no seed and `threshold` is given, the seed is computed with `seed_from_maps` (IRN's rule).
    `summary` adds a line under the title (e.g. the seed mIoU from the evaluation JSON: the gallery
    never computes metrics). Thumbnails of earlier runs that the new page no longer shows are removed.
    """
    out_html = Path(out_html)
    assets_name = f"{out_html.stem}_assets"
    assets = out_html.parent / assets_name
    lut = colour_table(labels)
    written: set[str] = set()
    body: list[str] = []
    shown_classes: set[int] = set()
    for r in itertools.islice(rows, max(0, max_images)):
        row = _as_row(r)
        image = to_rgb(row.image)
        maps = row.maps
        shape = image.shape[:2]
        if maps.high_res.shape[1:] != shape:
            raise ValueError(
                f"{row.sample_id}: maps are {maps.high_res.shape[1]}×{maps.high_res.shape[2]}, "
                f"the image is {shape[0]}×{shape[1]}."
            )
        size = thumbnail_size(shape, max_side)
        img_t = resize_image(image, size)
        seed = row.seed
        if seed is None and threshold is not None:
            seed = seed_from_maps(maps.high_res, maps.keys, threshold, labels.background)
        pictures: list[tuple[str, str, np.ndarray]] = [("image", "image", img_t)]
        for k, cam in zip(maps.keys.tolist(), maps.high_res):
            name = labels.names[k] if 0 <= k < labels.num_classes else f"id {k}"
            pictures.append((f"cam-{k}", f"{name} (peak {float(cam.max()):.2f})", heat_overlay(img_t, resize_map(cam, size))))
            shown_classes.add(int(k))
        for col, mask in (("seed", seed), ("truth", row.truth)):
            if mask is None:
                continue
            m = np.asarray(mask)
            if m.shape != shape:
                raise ValueError(f"{row.sample_id}: {col} is {m.shape}, the image is {shape}.")
            if col == "truth":
                caption = "ground truth"
            elif row.seed is None and labels.background is not None:
                caption = f"seed (threshold {threshold:g})"
            else:
                caption = "seed"
            pictures.append((col, caption, overlay(img_t, resize_mask(m, size), labels)))
            shown_classes.update(int(v) for v in np.unique(m) if v < labels.num_classes)
        figs = []
        for col, caption, rgb in pictures:
            fname = sample_file(assets, row.sample_id, f"-{col}.jpg").name
            _save_jpeg(assets / fname, rgb)
            written.add(fname)
            figs.append(f'<figure><img src="{_e(assets_name)}/{_e(fname)}" width="{rgb.shape[1]}" height="{rgb.shape[0]}" '
                        f'loading="lazy" alt="{_e(row.sample_id)} {_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>')
        tags = "".join(_chip(int(k), labels, lut) for k in maps.keys.tolist()) or '<span class="muted">no tags</span>'
        body.append(f'<tr><td class="info"><div class="sid">{_e(row.sample_id)}</div><div class="small">tags: {tags}</div></td>'
                    f'<td><div class="thumbs">{"".join(figs)}</div></td></tr>')

    n = len(body)
    stops = ", ".join(f"{_css_colour(c)} {100 * i / (len(VIRIDIS_STOPS) - 1):.0f}%" for i, c in enumerate(VIRIDIS_STOPS))
    key = "".join(_chip(i, labels, lut) for i in sorted(shown_classes))
    void = (f'<span class="chip"><span class="sw" style="background:{_css_colour(lut[labels.ignore_index])}"></span>'
            "void (not tinted)</span>")
    heat_key = (f'<span class="small">map value 0<span class="cambar" style="background:linear-gradient(to right, {stops})">'
                '</span>1 (each class map divided by its maximum; viridis over a grey copy of the image)</span>')
    seed_rule = ""
    if threshold is not None and labels.background is not None:
        seed_rule = (f" Computed seeds are background where no tagged map exceeds {threshold:g}, else the strongest "
                     "tagged class (IRN's rule).")
    intro = f"{n} image(s), one row each: the image, one heat map per tagged class, then the seed and the ground truth where given.{seed_rule}"
    body_html = (
        f"<header><h1>{_e(title)}</h1>"
        + (f'<div class="meta"><span>{_e(summary)}</span></div>' if summary else "")
        + "</header>"
        f'<section id="gallery"><h2>Gallery</h2><p>{_e(intro)}</p>'
        f'<div class="gallery-top"><div class="keyline">{key}{void}</div>{heat_key}</div>'
        + (f'<div class="scroll"><table class="gallery"><tbody>{"".join(body)}</tbody></table></div>' if body
           else '<p class="muted">No images to show.</p>')
        + "</section>"
    )
    write_page(out_html, f"{title} — frugalseg", body_html, css=GALLERY_CSS)
    if assets.is_dir():  # thumbnails of an earlier gallery at this path that this page no longer shows
        for p in assets.glob("*.jpg"):
            if p.name not in written:
                p.unlink(missing_ok=True)
    log.info("wrote %s (%d thumbnails)", out_html, len(written))
    return out_html


def write_maps_gallery(maps_dir: Path | str, ds: SegDataset, samples: Sequence[Sample], *, method: str,
                       max_images: int = 24, threshold: float | None = IRN_THRESHOLD) -> Path:
    """`maps_dir/gallery.html`: the maps of `samples` (read from `maps_dir/maps/`), their seeds at
    `threshold` and their ground truth where they have a mask."""
    maps_dir = Path(maps_dir)

    def rows() -> Iterable[CamRow]:
        for s in samples:
            truth = ds.read_mask(s) if s.mask is not None else None
            yield CamRow(s.id, ds.read_image(s), load_maps(maps_path(maps_dir, s.id)), truth)

    return write_cam_gallery(maps_dir / "gallery.html", rows(), ds.labels, title=f"{method.upper()} maps — {ds.name}",
                             max_images=max_images, threshold=threshold)
