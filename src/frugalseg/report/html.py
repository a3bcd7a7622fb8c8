"""A self-contained HTML report of one run directory.

`write_report(run_dir)` reads what other stages wrote (metrics JSON, budget, CSV log, prediction PNGs,
resolved config) and writes `run_dir/report.html` plus JPEG thumbnails in `run_dir/report_assets/`,
referenced by relative paths so the page stays small and the folder can be copied or zipped as a
whole. No JavaScript and no external assets: plain CSS, inline SVG curves, native tooltips.

The report never recomputes a reported metric: headline and per-class numbers come from
`metrics/<split>.json`. The only numbers computed here are per-image IoUs for ordering the gallery
worst-first, from the two masks the gallery loads anyway; the page says so.

Every part is optional: no metrics JSON, no CSV log, no dataset (so no gallery) each leave their
section out with a note instead of failing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import math
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import yaml
from PIL import Image

from frugalseg.data.io import atomic_path, read_label_png, safe_name, sample_file
from frugalseg.data.labels import LabelSpec
from frugalseg.errors import DataError
from frugalseg.report.overlays import (
    colour_table,
    error_map,
    overlay,
    resize_image,
    resize_mask,
    thumbnail_size,
)

if TYPE_CHECKING:  # only for annotations: keeps `import frugalseg.report` light
    from frugalseg.data.samples import SegDataset

log = logging.getLogger(__name__)

ASSETS_DIR = "report_assets"
THUMB_MAX_SIDE = 224
NULL_TIP = "absent from truth and prediction"
SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#7f7f7f", "#bcbd22")


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


# ---- number formatting ---------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    """A finite float or None (JSON null, NaN, inf, strings all become None)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _raw(v: Any) -> str:
    """The value as it is written in the JSON (json.dumps of a float is its repr)."""
    return json.dumps(v)


def _na(tip: str = NULL_TIP) -> str:
    return f'<span class="na" title="{_e(tip)}">—</span>'


def _pct(v: Any, digits: int = 1, tip: str = NULL_TIP) -> str:
    f = _num(v)
    if f is None:
        return _na(tip)
    return f'<span title="{_e(_raw(v))}">{100 * f:.{digits}f}</span>'


def _dist(v: Any, tip: str = "undefined") -> str:
    f = _num(v)
    if f is None:
        return _na(tip)
    return f'<span title="{_e(_raw(v))}">{f:.2f}</span>'


def _colour_css(rgb: Sequence[int]) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in rgb[:3])


# ---- inputs --------------------------------------------------------------------------------------
def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name}: could not be read ({exc}); its section is left out.")
        return None


def _config_names(config_text: str | None) -> dict[str, str]:
    """dataset/model names from the resolved config (a stage config saved flat: `data`, `arch`, ...), used
    only when the metrics JSON lacks them."""
    if not config_text:
        return {}
    try:
        cfg = yaml.safe_load(config_text)
    except yaml.YAMLError:  # a malformed config is shown verbatim anyway
        return {}
    out = {}
    if isinstance(cfg, dict):
        for key, field in (("dataset", "data"), ("model", "arch")):
            v = cfg.get(field)
            if isinstance(v, (str, int, float)) and v != "":
                out[key] = str(v)
    return out


# ---- training curves (inline SVG) -----------------------------------------------------------------
def read_metrics_csv(path: Path) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """Series from a Lightning CSVLogger file: (x axis name, {column: [(x, y), ...]}).

    Rows are sparse (a column is empty or NaN where it was not logged); those cells are skipped. The x
    axis is `step` when present, else `epoch`, else the row number.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "step", {}
    columns = list(rows[0].keys())
    xname = "step" if "step" in columns else ("epoch" if "epoch" in columns else "row")
    series: dict[str, list[tuple[float, float]]] = {}
    for n, row in enumerate(rows):
        x = _num(row.get(xname)) if xname != "row" else float(n)
        if x is None:
            x = float(n)
        for col in columns:
            if col in ("step", "epoch") or col is None:
                continue
            y = _num(row.get(col))
            if y is not None:
                series.setdefault(col, []).append((x, y))
    return xname, series


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-6:
        if t >= lo - step * 1e-6:
            ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def _downsample(points: list[tuple[float, float]], limit: int = 500) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    a = np.asarray(points, dtype=np.float64)
    chunks = np.array_split(a, limit)
    return [(float(c[:, 0].mean()), float(c[:, 1].mean())) for c in chunks]


def _ema(points: list[tuple[float, float]], span: int) -> list[tuple[float, float]]:
    k = 2.0 / (span + 1)
    out, m = [], None
    for x, y in points:
        m = y if m is None else (1 - k) * m + k * y
        out.append((x, m))
    return out


def _lower_is_better(name: str) -> bool | None:
    n = name.lower()
    if re.search(r"(^|[/_-])(lr|learning_rate)($|[/_-])", n) or n.startswith("lr"):
        return None  # a schedule, not a score
    return any(k in n for k in ("loss", "hd95", "asd", "error", "err"))


def _svg_chart(title: str, series: dict[str, list[tuple[float, float]]], xname: str,
               unit_range: bool = False) -> str:
    W, H, L, R, T, B = 560, 250, 56, 14, 12, 34
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if unit_range:
        y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))
    else:
        pad = (max(ys) - min(ys)) * 0.05 or abs(max(ys)) * 0.1 or 1.0
        y0, y1 = min(ys) - pad, max(ys) + pad
        if min(ys) >= 0 and y0 < 0:
            y0 = 0.0
    yt = _nice_ticks(y0, y1)
    y0, y1 = min(y0, yt[0]), max(y1, yt[-1])
    xt = _nice_ticks(x0, x1, 6)

    def px(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def py(y: float) -> float:
        return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B)

    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{_e(title)}">']
    for t in yt:
        parts.append(f'<line x1="{L}" x2="{W - R}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>')
        parts.append(f'<text x="{L - 6}" y="{py(t) + 4:.1f}" class="tick" text-anchor="end">{_tick_label(t)}</text>')
    for t in xt:
        if x0 <= t <= x1:
            parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{H - B}" y2="{H - B + 4}" class="axis"/>')
            parts.append(f'<text x="{px(t):.1f}" y="{H - B + 16}" class="tick" text-anchor="middle">{_tick_label(t)}</text>')
    parts.append(f'<line x1="{L}" x2="{W - R}" y1="{H - B}" y2="{H - B}" class="axis"/>')
    parts.append(f'<line x1="{L}" x2="{L}" y1="{T}" y2="{H - B}" class="axis"/>')
    parts.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 3}" class="tick" text-anchor="middle">{_e(xname)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        pts = sorted(pts)
        noisy = len(pts) >= 60
        draw = _downsample(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in draw)
        if len(draw) > 1:
            opacity = ' stroke-opacity="0.28"' if noisy else ""
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.4"{opacity}/>')
        if noisy:
            smooth = _downsample(_ema(pts, max(5, len(pts) // 30)))
            spath = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in smooth)
            parts.append(f'<polyline points="{spath}" fill="none" stroke="{colour}" stroke-width="2"/>')
        else:
            for x, y in draw:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}">'
                    f'<title>{_e(name)} = {y:.4g} at {_e(xname)} {x:g}</title></circle>'
                )
    parts.append("</svg>")
    return "".join(parts)


def _series_note(name: str, pts: list[tuple[float, float]], xname: str) -> str:
    lower = _lower_is_better(name)
    last_x, last_y = max(pts)
    if lower is None:
        return f"last {last_y:.3g}"
    bx, by = (min(pts, key=lambda p: (p[1], p[0])) if lower else max(pts, key=lambda p: (p[1], -p[0])))
    word = "lowest" if lower else "best"
    return f"{word} {by:.4g} at {xname} {bx:g} · last {last_y:.4g}"


def curves_html(path: Path) -> str:
    """Charts for a metrics.csv: losses, scores in 0..1, and anything else (e.g. learning rate)."""
    xname, series = read_metrics_csv(path)
    if not series:
        return ""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {"Losses": {}, "Validation and training scores": {}, "Other": {}}
    for name, pts in series.items():
        ys = [y for _, y in pts]
        if "loss" in name.lower():
            groups["Losses"][name] = pts
        elif _lower_is_better(name) is not None and min(ys) >= 0 and max(ys) <= 1:
            groups["Validation and training scores"][name] = pts
        else:
            groups["Other"][name] = pts
    out = []
    for title, group in groups.items():
        if not group:
            continue
        legend = "".join(
            f'<li><span class="sw" style="background:{SERIES_COLOURS[k % len(SERIES_COLOURS)]}"></span>'
            f'<b>{_e(name)}</b> <span class="muted">{_e(_series_note(name, pts, xname))}</span></li>'
            for k, (name, pts) in enumerate(group.items())
        )
        chart = _svg_chart(title, group, xname, unit_range=title.startswith("Validation"))
        out.append(f'<figure class="curve"><figcaption>{_e(title)}</figcaption>{chart}<ul class="keys">{legend}</ul></figure>')
    return f'<div class="curves">{"".join(out)}</div>'


# ---- gallery ------------------------------------------------------------------------------------
def image_iou(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int) -> float:
    """Mean IoU over the classes present in this image's truth or prediction, void excluded.

    For ordering the gallery only; NaN when the image has no valid pixel.
    """
    valid = truth != ignore_index
    t = truth[valid].astype(np.int64)
    p = np.minimum(pred[valid].astype(np.int64), num_classes)  # out-of-range predictions count as wrong
    k = num_classes + 1
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)[:num_classes]
    tp = np.diag(cm[:, :num_classes]).astype(np.float64)
    union = cm.sum(1) + cm[:, :num_classes].sum(0) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


@dataclass
class _Row:
    id: str
    iou: float
    truth_ids: list[int] = field(default_factory=list)
    pred_ids: list[int] = field(default_factory=list)
    thumbs: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # column -> (rel path, w, h)


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=88, subsampling=0, optimize=True)


def _ids_in(mask: np.ndarray, labels: LabelSpec) -> list[int]:
    return [int(v) for v in np.unique(mask) if v != labels.ignore_index]


def _build_gallery(run_dir: Path, ds: "SegDataset", split: str, max_images: int, notes: list[str],
                   written: set[str]) -> tuple[list[_Row], int, list[float]]:
    """Score every sample that has a prediction, then render thumbnails for the worst `max_images`."""
    labels = ds.labels
    pred_dir = run_dir / "predictions" / split
    if ds.ndim != 2:
        notes.append("The gallery shows 2D datasets; this dataset is volumetric.")
        return [], 0, []
    if not pred_dir.is_dir():
        notes.append(f"No predictions/{split}/ folder: no gallery.")
        return [], 0, []
    scored: list[tuple[float, str, Any]] = []
    problems: list[str] = []
    for s in ds.samples:
        p = sample_file(pred_dir, s.id, ".png")
        if not p.exists():
            continue
        try:
            pred = read_label_png(p)
            iou = float("nan")
            if s.mask is not None:
                truth = ds.read_mask(s)
                if truth.shape != pred.shape:
                    pred = resize_mask(pred, truth.shape)
                iou = image_iou(truth, pred, labels.num_classes, labels.ignore_index)
        except DataError as exc:
            problems.append(str(exc))
            continue
        scored.append((iou, s.id, s))
    if problems:
        notes.append(f"{len(problems)} prediction(s) could not be shown, e.g. {problems[0]}")
    if not scored:
        notes.append(f"None of the {len(ds)} samples of {ds.name} has a prediction in predictions/{split}/.")
        return [], 0, []
    # worst first; images without ground truth (NaN) go last, ties by id for a stable page
    scored.sort(key=lambda r: (math.isnan(r[0]), r[0] if not math.isnan(r[0]) else 0.0, r[1]))
    all_ious = [r[0] for r in scored if not math.isnan(r[0])]
    assets = run_dir / ASSETS_DIR
    rows = []
    for iou, sid, s in scored[: max(0, max_images)]:
        try:
            image = ds.read_image(s)
            pred = read_label_png(sample_file(pred_dir, sid, ".png"))
            truth = ds.read_mask(s) if s.mask is not None else None
        except DataError as exc:
            notes.append(str(exc))
            continue
        if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
            image = image[image.shape[0] // 2]  # a stray volume: show its middle slice
        shape = image.shape[:2]
        size = thumbnail_size(shape, THUMB_MAX_SIDE)
        img_t = resize_image(image, size)
        pred_t = resize_mask(resize_mask(pred, shape) if pred.shape != shape else pred, size)
        pictures = {"image": img_t, "prediction": overlay(img_t, pred_t, labels)}
        row = _Row(id=sid, iou=iou, pred_ids=_ids_in(pred, labels))
        if truth is not None:
            truth_full = truth if truth.shape == shape else resize_mask(truth, shape)
            truth_t = resize_mask(truth_full, size)
            pictures["truth"] = overlay(img_t, truth_t, labels)
            pictures["errors"] = error_map(img_t, truth_t, pred_t, labels)
            row.truth_ids = _ids_in(truth, labels)
        for col, rgb in pictures.items():
            thumb = sample_file(assets, sid, f"-{split}-{col}.jpg")
            _save_jpeg(thumb, rgb)
            written.add(thumb.name)
            row.thumbs[col] = (f"{ASSETS_DIR}/{thumb.name}", rgb.shape[1], rgb.shape[0])
        rows.append(row)
    return rows, len(scored), all_ious


def _class_chips(ids: Iterable[int], labels: LabelSpec, lut: np.ndarray, cls: str = "") -> str:
    chips = []
    for i in ids:
        name = labels.names[i] if i < labels.num_classes else f"id {i}"
        chips.append(f'<span class="chip {cls}"><span class="sw" style="background:{_colour_css(lut[i])}"></span>{_e(name)}</span>')
    return "".join(chips)


def _histogram_svg(values: list[float], bins: int = 10) -> str:
    if not values:
        return ""
    counts, _ = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0, 1))
    W, H, pad = 220, 54, 2
    top = counts.max() or 1
    bw = W / bins
    bars = "".join(
        f'<rect x="{i * bw + pad / 2:.1f}" y="{H - 14 - c / top * (H - 18):.1f}" width="{bw - pad:.1f}" '
        f'height="{c / top * (H - 18):.1f}"><title>IoU {i / bins:.1f}–{(i + 1) / bins:.1f}: {c} image(s)</title></rect>'
        for i, c in enumerate(counts)
    )
    return (f'<figure class="hist"><figcaption>per-image IoU, {len(values)} image(s)</figcaption><svg viewBox="0 0 {W} {H}" role="img" aria-label="per-image IoU histogram">{bars}'
            f'<text x="0" y="{H - 2}" class="tick">0</text><text x="{W}" y="{H - 2}" class="tick" text-anchor="end">1</text></svg></figure>')


def _gallery_html(rows: list[_Row], total: int, ious: list[float], labels: LabelSpec, split: str) -> str:
    lut = colour_table(labels)
    shown = {i for r in rows for i in (*r.truth_ids, *r.pred_ids)}
    key = _class_chips(sorted(shown), labels, lut)
    void = f'<span class="chip"><span class="sw" style="background:{_colour_css(lut[labels.ignore_index])}"></span>void (not tinted, not judged)</span>'
    stats = ""
    if ious:
        stats = (f"Per-image IoU over {len(ious)} image(s): median {np.median(ious):.3f}, "
                 f"min {min(ious):.3f}, max {max(ious):.3f}.")
    intro = (
        f'<p>The {len(rows)} image(s) with the lowest per-image IoU of the {total} with a prediction in '
        f'<code>predictions/{_e(split)}/</code>, worst first. Per-image IoU is the mean over the classes present in '
        f"that image's truth or prediction, void excluded; it orders this gallery only — the reported metrics above "
        f'come from <code>metrics/{_e(split)}.json</code>. {stats}</p>'
    )
    cols = [("image", "Image"), ("truth", "Ground truth"), ("prediction", "Prediction"), ("errors", "Errors (red)")]
    head = "".join(f"<th>{title}</th>" for _, title in cols)
    body = []
    for rank, r in enumerate(rows, start=1):
        cells = []
        for col, _ in cols:
            if col in r.thumbs:
                src, w, h = r.thumbs[col]
                cells.append(f'<td><img src="{_e(src)}" width="{w}" height="{h}" loading="lazy" alt="{_e(r.id)} {col}"></td>')
            else:
                cells.append('<td class="muted">no ground truth</td>')
        missed = [i for i in r.truth_ids if i not in r.pred_ids and i != labels.background]
        extra = [i for i in r.pred_ids if i not in r.truth_ids and i != labels.background]
        info = [f'<div class="sid">#{rank} {_e(r.id)}</div>',
                f'<div class="iou {_grade(r.iou)}">{"—" if math.isnan(r.iou) else f"{r.iou:.3f}"}</div>'
                '<div class="muted small">per-image IoU</div>']
        if r.truth_ids:
            info.append(f'<div class="small">truth: {_class_chips(r.truth_ids, labels, lut)}</div>')
        info.append(f'<div class="small">predicted: {_class_chips(r.pred_ids, labels, lut)}</div>')
        if missed:
            info.append(f'<div class="small warn">missed: {_class_chips(missed, labels, lut, "bad")}</div>')
        if extra:
            info.append(f'<div class="small warn">not in truth: {_class_chips(extra, labels, lut, "bad")}</div>')
        body.append(f'<tr id="g-{_e(safe_name(r.id))}">{"".join(cells)}<td class="info">{"".join(info)}</td></tr>')
    return (f'{intro}<div class="gallery-top"><div class="keyline">{key}{void}</div>{_histogram_svg(ious)}</div>'
            f'<div class="scroll"><table class="gallery"><thead><tr>{head}<th>Per-image IoU</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _grade(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return "bad" if v < 0.5 else ("mid" if v < 0.75 else "good")


# ---- metrics sections ----------------------------------------------------------------------------
def _card(label: str, value_html: str, sub: str = "", cls: str = "", tip: str = "") -> str:
    t = f' title="{_e(tip)}"' if tip else ""
    return (f'<div class="card {cls}"{t}><div class="label">{_e(label)}</div><div class="value">{value_html}</div>'
            f'<div class="sub">{sub}</div></div>')


def _raw_sub(v: Any) -> str:
    return f'<code>{_e(_raw(v))}</code>' if v is not None else ""


def _surface_summary(metrics: dict) -> dict[str, Any]:
    """Mean HD95/ASD over classes, their units, and how many empty predictions were flagged."""
    surface = metrics.get("surface") or {}
    per_case = metrics.get("per_case") or []
    hd = [_num(v.get("hd95")) for v in surface.values() if isinstance(v, dict)]
    asd = [_num(v.get("asd")) for v in surface.values() if isinstance(v, dict)]
    units = sorted({str(v.get("units")) for v in surface.values() if isinstance(v, dict) and v.get("units")})
    if not surface and per_case:  # fall back to per-case values
        hd = [_num(x) for c in per_case for x in (c.get("hd95") or {}).values()]
        asd = [_num(x) for c in per_case for x in (c.get("asd") or {}).values()]
    if surface and any(isinstance(v, dict) and "empty_pred_cases" in v for v in surface.values()):
        empty = sum(int(v.get("empty_pred_cases") or 0) for v in surface.values() if isinstance(v, dict))
    else:
        empty = sum(bool(f) for c in per_case for f in (c.get("empty_pred") or {}).values())
    hd = [v for v in hd if v is not None]
    asd = [v for v in asd if v is not None]
    return {
        "hd95": sum(hd) / len(hd) if hd else None,
        "asd": sum(asd) / len(asd) if asd else None,
        "units": " / ".join(units) if units else "",
        "empty": empty,
    }


def _headline_html(metrics: dict) -> str:
    kind = metrics.get("kind", "2d")
    cards = []
    if kind == "volume":
        s = _surface_summary(metrics)
        cards.append(_card("Mean foreground Dice (%)", _pct(metrics.get("mean_dice_foreground"), 2, "not defined"),
                           _raw_sub(metrics.get("mean_dice_foreground"))))
        unit = f" ({s['units']})" if s["units"] else ""
        dist_tip = "mean over classes; cases with an empty prediction are excluded (distance undefined)"
        cards.append(_card(f"HD95{unit}", _dist(s["hd95"]), "mean over classes", tip=dist_tip))
        cards.append(_card(f"ASD{unit}", _dist(s["asd"]), "mean over classes", tip=dist_tip))
        n = s["empty"]
        cards.append(_card(
            "Empty predictions", f"{n}" if n else "none",
            "class × case pairs with nothing predicted; excluded from HD95/ASD" if n else "every class was predicted in every case",
            cls="warn" if n else "", tip="an empty prediction has no surface: its HD95/ASD is undefined, never 0",
        ))
        cards.append(_card("mIoU (%)", _pct(metrics.get("miou"), 2, "not defined"), _raw_sub(metrics.get("miou"))))
    else:
        cards.append(_card("mIoU (%)", _pct(metrics.get("miou"), 2, "not defined"), _raw_sub(metrics.get("miou")), cls="main"))
        cards.append(_card("Mean Dice (%)", _pct(metrics.get("mean_dice"), 2, "not defined"), _raw_sub(metrics.get("mean_dice"))))
        cards.append(_card("Pixel accuracy (%)", _pct(metrics.get("pixel_accuracy"), 2, "not defined"),
                           _raw_sub(metrics.get("pixel_accuracy"))))
        if metrics.get("mean_dice_foreground") is not None:
            cards.append(_card("Foreground Dice (%)", _pct(metrics.get("mean_dice_foreground"), 2, "not defined"),
                               _raw_sub(metrics.get("mean_dice_foreground"))))
    if metrics.get("pixels") is not None:
        cards.append(_card("Pixels evaluated", f"{int(metrics['pixels']):,}", "void excluded"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _per_class_html(metrics: dict, labels: LabelSpec | None) -> str:
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return ""
    names = list(per_class)
    spec = labels if labels is not None and list(labels.names) == names else None
    lut = colour_table(spec or LabelSpec(names=tuple(names)))
    background = spec.background if spec else (0 if names[0].lower() in ("background", "bg") else None)
    surface = metrics.get("surface") or {}
    total = sum(int(v.get("pixels") or 0) for v in per_class.values()) or 1
    head = "<th>Class</th><th>IoU (%)</th><th></th><th>Dice (%)</th><th>Truth pixels</th>"
    if surface:
        head += "<th>HD95</th><th>ASD</th><th>Empty preds</th>"
    rows = []
    for i, name in enumerate(names):
        v = per_class[name] or {}
        iou = _num(v.get("iou"))
        bar = f'<div class="bar"><i class="{_grade(iou)}" style="width:{100 * iou:.1f}%"></i></div>' if iou is not None else ""
        tag = ' <span class="muted">(background)</span>' if i == background else ""
        px = int(v.get("pixels") or 0)
        cells = (f'<td><span class="sw" style="background:{_colour_css(lut[i])}"></span>{_e(name)}{tag}</td>'
                 f'<td class="n">{_pct(v.get("iou"))}</td><td class="barcell">{bar}</td>'
                 f'<td class="n">{_pct(v.get("dice"))}</td>'
                 f'<td class="n">{px:,} <span class="muted">({100 * px / total:.1f}%)</span></td>')
        if surface:
            sv = surface.get(name) or {}
            units = f' {_e(sv["units"])}' if sv.get("units") else ""
            empty = int(sv.get("empty_pred_cases") or 0)
            no_surface = ("undefined: every case had an empty prediction for this class" if empty
                          else "no surface distance for this class (background, or no case had it)")
            cells += (f'<td class="n">{_dist(sv.get("hd95"), no_surface)}{units if _num(sv.get("hd95")) is not None else ""}</td>'
                      f'<td class="n">{_dist(sv.get("asd"), no_surface)}{units if _num(sv.get("asd")) is not None else ""}</td>'
                      f'<td class="n">{f"<span class=flag>{empty}</span>" if empty else ""}</td>')
        rows.append(f"<tr>{cells}</tr>")
    note = (f'<p class="muted small">— = {NULL_TIP}: neither found nor missed, so left out of the means. '
            "Hover a number for the exact value in the metrics file.</p>")
    return f'<div class="scroll"><table class="classes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>{note}'


def _per_case_html(metrics: dict) -> str:
    cases = metrics.get("per_case") or []
    if not cases:
        return ""
    classes = list(dict.fromkeys(c for case in cases for c in (case.get("dice") or {})))

    def mean_dice(case: dict) -> float:
        vals = [_num(v) for v in (case.get("dice") or {}).values()]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("inf")

    cases = sorted(cases, key=lambda c: (mean_dice(c), str(c.get("id"))))
    head = "<th>Case</th>" + "".join(f"<th>Dice {_e(c)}</th>" for c in classes)
    head += "".join(f"<th>HD95 {_e(c)}</th>" for c in classes) + "".join(f"<th>ASD {_e(c)}</th>" for c in classes)
    flag = '<span class="flag" title="empty prediction: nothing predicted for this class, surface distance undefined">empty</span>'
    rows = []
    for case in cases:
        empty = case.get("empty_pred") or {}
        cells = [f'<td>{_e(case.get("id", "?"))}</td>']
        cells += [f'<td class="n">{_pct((case.get("dice") or {}).get(c), 1, "class absent from this case")}</td>' for c in classes]
        for key in ("hd95", "asd"):
            vals = case.get(key) or {}
            cells += [f'<td class="n">{flag if empty.get(c) else _dist(vals.get(c), "undefined for this case")}</td>' for c in classes]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<p class="muted small">{len(cases)} case(s), worst mean Dice first. Empty predictions are flagged, '
            'never given a distance of 0.</p>'
            f'<div class="scroll tall"><table class="cases"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _splits_html(run_dir: Path, split: str, notes: list[str]) -> str:
    files = sorted((run_dir / "metrics").glob("*.json")) if (run_dir / "metrics").is_dir() else []
    if len(files) < 2:
        return ""
    rows = []
    for f in files:
        m = _read_json(f, notes)
        if not isinstance(m, dict):
            continue
        cls = ' class="current"' if f.stem == split else ""
        rows.append(f'<tr{cls}><td>{_e(f.stem)}</td><td class="n">{_pct(m.get("miou"), 2, "not defined")}</td>'
                    f'<td class="n">{_pct(m.get("mean_dice"), 2, "not defined")}</td>'
                    f'<td class="n">{_pct(m.get("mean_dice_foreground"), 2, "not defined")}</td>'
                    f'<td class="n">{_pct(m.get("pixel_accuracy"), 2, "not defined")}</td></tr>')
    return ('<table class="splits"><thead><tr><th>Split</th><th>mIoU (%)</th><th>Mean Dice (%)</th>'
            f'<th>FG Dice (%)</th><th>Pixel acc. (%)</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _budget_text(budget: Any) -> str:
    if not isinstance(budget, dict):
        return ""
    parts = []
    if budget.get("budget") is not None:
        parts.append(str(budget["budget"]))
    counts = [(k, len(budget.get(k) or [])) for k in ("mask", "tags", "none") if k in budget]
    words = {"mask": "with masks", "tags": "with tags only", "none": "unlabelled"}
    if counts:
        parts.append(", ".join(f"{n:,} {words[k]}" for k, n in counts))
    return " — ".join(parts)


# ---- page ---------------------------------------------------------------------------------------
CSS = """
:root{--fg:#1d2430;--muted:#677083;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;--accent:#2b6cb0;
--good:#2f9e62;--mid:#d49a1b;--bad:#d64545}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:20px 24px 48px}
header h1{margin:0 0 4px;font-size:24px}
.meta{color:var(--muted);display:flex;flex-wrap:wrap;gap:4px 18px}
.meta b{color:var(--fg);font-weight:600}
nav{margin:12px 0 4px;display:flex;flex-wrap:wrap;gap:6px}
nav a{color:var(--accent);text-decoration:none;border:1px solid var(--line);background:var(--card);border-radius:14px;padding:2px 10px;font-size:13px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}
.notes{background:#fff8e6;border-color:#f0d48a}
.notes li{margin:2px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:150px;background:#fbfcfd}
.card.main{border-color:var(--accent);box-shadow:inset 3px 0 0 var(--accent)}
.card.warn{background:#fff4f2;border-color:#f1b5ad}
.card .label{color:var(--muted);font-size:12.5px;font-weight:600}
.card .value{font-size:28px;font-weight:650;font-variant-numeric:tabular-nums}
.card .sub{color:var(--muted);font-size:12px;min-height:1em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:middle}
th{font-size:12px;color:var(--muted);font-weight:600;background:#fafbfc;position:sticky;top:0}
td.n{text-align:right;white-space:nowrap}
tr.current td{font-weight:650}
.na{color:var(--muted);cursor:help;border-bottom:1px dotted var(--muted)}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px;border:1px solid rgba(0,0,0,.25)}
.barcell{width:160px}
.bar{height:8px;background:#eef0f3;border-radius:4px;overflow:hidden;width:150px}
.bar i{display:block;height:100%;background:var(--good)}
.bar i.mid{background:var(--mid)}.bar i.bad{background:var(--bad)}
.muted{color:var(--muted)}.small{font-size:12px}
.flag{background:#fde2df;color:#a1281b;border-radius:3px;padding:0 5px;font-size:12px;cursor:help}
.scroll{overflow-x:auto}.scroll.tall{max-height:480px;overflow-y:auto}
.curves{display:flex;flex-wrap:wrap;gap:18px}
.curve{margin:0;flex:1 1 520px;max-width:560px}
.curve figcaption{font-weight:600;margin-bottom:4px}
svg.chart{width:100%;height:auto;display:block}
svg .grid{stroke:#eceef2}svg .axis{stroke:#9aa1ad}
svg .tick{font-size:11px;fill:var(--muted)}
.keys{list-style:none;padding:0;margin:4px 0 0;font-size:12px}
.keys li{margin:1px 0}
.gallery-top{display:flex;flex-wrap:wrap;justify-content:space-between;align-items:flex-end;gap:10px;margin-bottom:8px}
figure.hist{margin:0;font-size:11px;color:var(--muted)}.hist svg{width:220px;height:54px;display:block}.hist rect{fill:#8aa4c8}
.keyline{display:flex;flex-wrap:wrap;gap:6px}
.chip{display:inline-flex;align-items:center;border:1px solid var(--line);border-radius:10px;padding:0 7px 0 5px;margin:1px 3px 1px 0;font-size:12px;background:#fff;white-space:nowrap}
.chip .sw{width:10px;height:10px;margin-right:4px}
.chip.bad{border-color:#f1b5ad;background:#fff4f2}
table.gallery td{padding:6px;border-bottom:1px solid var(--line)}
table.gallery img{display:block;max-width:100%;height:auto;border-radius:3px;image-rendering:auto}
td.info{min-width:190px;vertical-align:top}
.sid{font-weight:600;word-break:break-all}
.iou{font-size:22px;font-weight:650;font-variant-numeric:tabular-nums}
.iou.bad{color:var(--bad)}.iou.mid{color:var(--mid)}.iou.good{color:var(--good)}
.warn{color:#a1281b}
details summary{cursor:pointer;font-weight:600}
pre{background:#f3f4f7;border:1px solid var(--line);border-radius:6px;padding:10px 12px;overflow:auto;font-size:12.5px;max-height:600px}
code{font-size:12px;background:#f1f2f5;border-radius:3px;padding:0 3px}
footer{color:var(--muted);font-size:12px;margin-top:20px}
"""


def html_page(title: str, body: str, *, css: str = "", footer: str = ".") -> str:
    """The one page shell of every frugalseg page (run report, map gallery, tags-to-model report): head,
    the shared stylesheet `CSS` (plus a page's own `css`), `<main>` around `body`, and a footer
    "Generated by frugalseg on <date>" followed by `footer` (an HTML fragment, e.g. " from <code>run/</code>.").
    No JavaScript, no external assets: a page and its assets folder can be copied or zipped as they are."""
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}{css}</style></head><body><main>"
        f"{body}<footer>Generated by frugalseg on {_e(now)}{footer}</footer></main></body></html>\n"
    )


def write_page(path: Path | str, title: str, body: str, *, css: str = "", footer: str = ".") -> Path:
    """`html_page` written atomically to `path`; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(html_page(title, body, css=css, footer=footer), encoding="utf-8")
    return path


def _section(sid: str, title: str, body: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<section id="{sid}"{c}><h2>{_e(title)}</h2>{body}</section>'


def write_report(
    run_dir: Path | str,
    *,
    ds: "SegDataset | None" = None,
    split: str = "val",
    max_images: int = 24,
    title: str | None = None,
) -> Path:
    """Write `run_dir/report.html` (atomically) and its thumbnails under `run_dir/report_assets/`.

    Reads `metrics/<split>.json`, `budget.json`, `logs/metrics.csv`, `config.yaml` and, when `ds` is
    given, `predictions/<split>/<id>.png` for a worst-first gallery of up to `max_images` samples.
    Missing parts leave their section out. Returns the path of the report.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found.")
    notes: list[str] = []
    metrics = _read_json(run_dir / "metrics" / f"{split}.json", notes)
    if metrics is not None and not isinstance(metrics, dict):
        notes.append(f"metrics/{split}.json does not hold an object; left out.")
        metrics = None
    if metrics is None and not (run_dir / "metrics" / f"{split}.json").exists():
        notes.append(f"No metrics/{split}.json: this run has not been evaluated on '{split}' yet.")
    budget = _read_json(run_dir / "budget.json", notes)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(errors="replace") if config_path.exists() else None
    from_config = _config_names(config_text)

    csv_path = run_dir / "logs" / "metrics.csv"
    curves = ""
    if csv_path.exists():
        try:
            curves = curves_html(csv_path)
        except (OSError, csv.Error, ValueError) as exc:
            notes.append(f"logs/metrics.csv could not be read ({exc}).")

    written: set[str] = set()
    gallery = ""
    if ds is not None:
        rows, total, ious = _build_gallery(run_dir, ds, split, max_images, notes, written)
        if rows:
            gallery = _gallery_html(rows, total, ious, ds.labels, split)

    m = metrics or {}
    dataset = m.get("dataset") or from_config.get("dataset") or (ds.name if ds is not None else None)
    model = m.get("model") or from_config.get("model")
    page_title = title or run_dir.name
    meta = [("dataset", dataset), ("model", model), ("split", m.get("split") or split),
            ("kind", m.get("kind")), ("label budget", _budget_text(budget))]
    meta_html = "".join(f"<span>{_e(k)}: <b>{_e(v)}</b></span>" for k, v in meta if v)

    sections: list[tuple[str, str, str]] = []
    if metrics:
        sections.append(("metrics", "Headline metrics", _headline_html(metrics)))
        per_class = _per_class_html(metrics, ds.labels if ds is not None else None)
        if per_class:
            sections.append(("classes", "Per class", per_class))
        per_case = _per_case_html(metrics)
        if per_case:
            sections.append(("cases", "Per case", per_case))
    splits = _splits_html(run_dir, split, notes)
    if splits:
        sections.append(("splits", "All evaluated splits", splits))
    if curves:
        sections.append(("curves", "Training curves", curves + '<p class="muted small">From <code>logs/metrics.csv</code>; '
                         "noisy series are drawn faint with an exponential moving average on top.</p>"))
    if gallery:
        sections.append(("gallery", "Gallery: failures first", gallery))
    if config_text is not None:
        sections.append(("config", "Configuration",
                         f"<details><summary>Resolved config (config.yaml, {len(config_text.splitlines())} lines)</summary>"
                         f"<pre>{_e(config_text)}</pre></details>"))

    nav = "".join(f'<a href="#{sid}">{_e(t.split(":")[0])}</a>' for sid, t, _ in sections)
    notes_html = ""
    if notes:
        notes_html = _section("notes", "Notes", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>", "notes")
    rules = m.get("rules")
    out = write_page(
        run_dir / "report.html", f"{page_title} — frugalseg report",
        f'<header><h1>{_e(page_title)}</h1><div class="meta">{meta_html}</div><nav>{nav}</nav></header>'
        f"{notes_html}{''.join(_section(*s) for s in sections)}",
        footer=f" from <code>{_e(run_dir.name)}/</code>.{' Metric rules: ' + _e(rules) + '.' if rules else ''}",
    )
    _prune_assets(run_dir / ASSETS_DIR, written)
    log.info("wrote %s (%d thumbnails)", out, len(written))
    return out


def _prune_assets(assets: Path, keep: set[str]) -> None:
    """Remove thumbnails of earlier reports that the new page no longer references."""
    if not assets.is_dir():
        return
    for p in assets.glob("*.jpg"):
        if p.name not in keep:
            p.unlink(missing_ok=True)
