"""Pictures of masks: colour maps, overlays on images, class contours, side-by-side panels, legends.

Every function takes and returns plain numpy arrays (RGB uint8, (H, W, 3)), so they work in a notebook
as well as in the HTML report. Colours come from the dataset's `LabelSpec`, the same palette the
prediction PNGs are written with, so a class looks the same in every picture a user sees.

Conventions:
- void (`labels.ignore_index`) is the neutral VOC void colour (pale grey-beige) in `colourise` and left untouched (transparent) in
  `overlay`: it is "not judged", not a class;
- in `overlay` the background class is not tinted by default (tinting it black would only darken the
  picture); foreground classes are blended and outlined, so small objects stay visible;
- a float greyscale slice (CT/MR) is windowed to its 1st..99th percentiles before display, so a few
  extreme voxels do not wash out the anatomy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from frugalseg.data.labels import LabelSpec, voc_palette

VOID_COLOUR = (224, 224, 192)  # the VOC void colour: neutral, and in no class palette slot
INVALID_COLOUR = (255, 0, 255)  # ids outside the label spec: loud on purpose
ERROR_COLOUR = (230, 25, 45)


def _font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's default font; the scalable version where the installed Pillow has it (>= 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: bitmap font only
        return ImageFont.load_default()


# ---- images -----------------------------------------------------------------------------------
def window(image: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Map a greyscale array of any dtype to uint8 using its `lo_pct`..`hi_pct` percentiles."""
    a = np.asarray(image, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    if hi <= lo:  # flat image, or a percentile window that collapsed on a dominant value
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.nan_to_num(a, nan=lo) - lo) / (hi - lo)
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any 2D image as displayable RGB uint8 (H, W, 3).

    RGB/RGBA uint8 pass through (alpha dropped); greyscale uint8 is repeated to three channels; any
    other greyscale (float CT/MR slices, 16-bit microscopy) is windowed with `window`; float RGB in
    0..1 is scaled to 0..255.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        grey = a if a.dtype == np.uint8 else window(a)
        return np.repeat(grey[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3]
        if a.dtype == np.uint8:
            return np.ascontiguousarray(a)
        f = a.astype(np.float32)
        if np.nanmax(f) <= 1.0 and np.nanmin(f) >= 0.0:
            f = f * 255.0
        return np.clip(np.nan_to_num(f) + 0.5, 0, 255).astype(np.uint8)
    raise ValueError(
        f"Cannot display an image of shape {a.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). "
        "Pass one slice of a volume."
    )


# ---- masks ------------------------------------------------------------------------------------
def colour_table(labels: LabelSpec, void: tuple[int, int, int] = VOID_COLOUR) -> np.ndarray:
    """A (256, 3) uint8 lookup table: class id -> palette colour, void -> `void`, unknown ids -> magenta."""
    lut = np.empty((256, 3), dtype=np.uint8)
    lut[:] = INVALID_COLOUR
    palette = list(labels.palette) or voc_palette(labels.num_classes)
    lut[: labels.num_classes] = np.asarray(palette[: labels.num_classes], dtype=np.uint8)
    lut[labels.ignore_index] = void
    return lut


def colourise(mask: np.ndarray, labels: LabelSpec, void: tuple[int, int, int] = VOID_COLOUR) -> np.ndarray:
    """Class ids (H, W) -> RGB uint8 (H, W, 3) in the label spec's palette; void drawn neutral pale grey."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"colourise expects a 2D mask of class ids, got shape {m.shape}.")
    if m.dtype != np.uint8:
        if m.size and (m.min() < 0 or m.max() > 255):
            raise ValueError(f"mask holds values outside 0..255 ({m.min()}..{m.max()}); expected class ids.")
        m = m.astype(np.uint8)
    return colour_table(labels, void)[m]


def boundary(mask: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels with a 4-neighbour of a different label (the inner edge of every region).

    Image borders do not count as edges, so a region touching the border is not outlined along it.
    """
    m = np.asarray(mask)
    edge = np.zeros(m.shape, dtype=bool)
    dv = m[1:, :] != m[:-1, :]
    dh = m[:, 1:] != m[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    return edge


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    labels: LabelSpec,
    alpha: float = 0.5,
    *,
    tint_background: bool = False,
    contours: bool = True,
) -> np.ndarray:
    """Blend class colours over `image` and outline each region; returns RGB uint8 (H, W, 3).

    `image` is RGB uint8 (H, W, 3) or a greyscale slice (H, W) of any dtype (windowed to its
    1st/99th percentiles). Void pixels are left as they are; the background class too unless
    `tint_background`. Contours are drawn at full opacity in the class colour.
    """
    rgb = to_rgb(image)
    m = np.asarray(mask)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"image size {rgb.shape[:2]} does not match mask size {m.shape}.")
    colours = colourise(m, labels)
    paint = m != labels.ignore_index
    if labels.background is not None and not tint_background:
        paint &= m != labels.background
    out = rgb.astype(np.float32)
    out[paint] = (1.0 - alpha) * out[paint] + alpha * colours[paint].astype(np.float32)
    out = (out + 0.5).astype(np.uint8)
    if contours:
        edge = boundary(m) & paint
        out[edge] = colours[edge]
    return out


def error_map(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, labels: LabelSpec) -> np.ndarray:
    """The image dimmed to grey with wrongly predicted pixels in red; void pixels are not judged."""
    grey = to_rgb(image).astype(np.float32).mean(axis=2, keepdims=True)
    out = np.repeat(grey * 0.45 + 255 * 0.35, 3, axis=2)
    wrong = (np.asarray(truth) != np.asarray(pred)) & (np.asarray(truth) != labels.ignore_index)
    out[wrong] = ERROR_COLOUR
    return (out + 0.5).astype(np.uint8)


# ---- composition ------------------------------------------------------------------------------
def _fit_height(img: np.ndarray, height: int) -> np.ndarray:
    if img.shape[0] == height:
        return img
    w = max(1, round(img.shape[1] * height / img.shape[0]))
    return np.asarray(Image.fromarray(img).resize((w, height), Image.BILINEAR))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def panel(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    *,
    pad: int = 6,
    background: tuple[int, int, int] = (255, 255, 255),
    font_size: int = 13,
) -> np.ndarray:
    """Images side by side (scaled to a common height) with a title above each; RGB uint8.

    Accepts anything `to_rgb` accepts, so a greyscale slice, an overlay and a colourised mask can be
    composed directly. Titles longer than their image are shortened with an ellipsis.
    """
    if not images:
        raise ValueError("panel needs at least one image.")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles.")
    rgbs = [to_rgb(im) for im in images]
    height = max(im.shape[0] for im in rgbs)
    rgbs = [_fit_height(im, height) for im in rgbs]
    font = _font(font_size)
    title_h = (font_size + 8) if titles else 0
    width = sum(im.shape[1] for im in rgbs) + pad * (len(rgbs) + 1)
    canvas = Image.new("RGB", (width, height + title_h + 2 * pad), background)
    draw = ImageDraw.Draw(canvas)
    x = pad
    for i, im in enumerate(rgbs):
        canvas.paste(Image.fromarray(im), (x, pad + title_h))
        if titles:
            text = _fit_text(draw, str(titles[i]), font, im.shape[1])
            draw.text((x, pad), text, fill=(20, 20, 20), font=font)
        x += im.shape[1] + pad
    return np.asarray(canvas)


def legend(
    labels: LabelSpec,
    present_ids: Sequence[int] | None = None,
    *,
    swatch: int = 14,
    font_size: int = 13,
    include_void: bool = False,
) -> np.ndarray:
    """A vertical colour key: one swatch and name per class in `present_ids` (all classes if None)."""
    ids = list(range(labels.num_classes)) if present_ids is None else [int(i) for i in present_ids]
    ids = [i for i in dict.fromkeys(ids) if i < labels.num_classes or i == labels.ignore_index]
    if include_void and labels.ignore_index not in ids:
        ids.append(labels.ignore_index)
    lut = colour_table(labels)
    names = [labels.names[i] if i < labels.num_classes else "void (ignored)" for i in ids]
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max([probe.textlength(n, font=font) for n in names] or [0])
    row = max(swatch, font_size) + 6
    width = int(8 + swatch + 8 + text_w + 8)
    canvas = Image.new("RGB", (max(width, 40), max(row * len(ids) + 8, 16)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (i, name) in enumerate(zip(ids, names)):
        y = 4 + k * row
        colour = tuple(int(c) for c in lut[i])
        draw.rectangle([8, y + 1, 8 + swatch, y + 1 + swatch], fill=colour, outline=(90, 90, 90))
        draw.text((8 + swatch + 8, y), name, fill=(20, 20, 20), font=font)
    return np.asarray(canvas)


def thumbnail_size(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(height, width) scaled down so the longer side is at most `max_side` (never scaled up)."""
    h, w = shape
    s = min(1.0, max_side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Displayable RGB resized to (height, width) with antialiasing."""
    rgb = to_rgb(image)
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.LANCZOS))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Class ids resized to (height, width) by nearest neighbour (ids are never blended)."""
    m = np.asarray(mask, dtype=np.uint8)
    if m.shape == tuple(size):
        return m
    return np.asarray(Image.fromarray(m, mode="L").resize((size[1], size[0]), Image.NEAREST))
