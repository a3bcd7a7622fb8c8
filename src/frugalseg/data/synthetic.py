"""A generated shapes dataset for `make demo`: no download, runs in a minute on a CPU.

Only the demo uses it; every quality figure in the docs comes from real data. Images are textured
backgrounds with discs, squares and triangles of jittered colour; masks mark each shape's class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from frugalseg.data.io import atomic_path, write_label_png, write_text
from frugalseg.data.labels import LabelSpec

CLASSES = ("background", "disc", "square", "triangle")
COLOURS = {1: (200, 60, 50), 2: (60, 170, 70), 3: (60, 90, 200)}


def _draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    base = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    waves = 20 * np.sin(xx / rng.uniform(4, 12) + rng.uniform(0, 6))[..., None]
    image = np.clip(base + noise + waves, 0, 255).astype(np.uint8)
    mask = Image.new("L", (size, size), 0)
    canvas = Image.fromarray(image)
    draw_img, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 4))
        r = int(rng.integers(size // 10, size // 4))
        cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
        colour = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in COLOURS[cls])
        if cls == 1:
            box = [cx - r, cy - r, cx + r, cy + r]
            draw_img.ellipse(box, fill=colour)
            draw_mask.ellipse(box, fill=cls)
        elif cls == 2:
            box = [cx - r, cy - r, cx + r, cy + r]
            draw_img.rectangle(box, fill=colour)
            draw_mask.rectangle(box, fill=cls)
        else:
            pts = [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
            draw_img.polygon(pts, fill=colour)
            draw_mask.polygon(pts, fill=cls)
    return np.asarray(canvas), np.asarray(mask)


def make_shapes_dataset(root: str | Path, n_train: int = 48, n_val: int = 16, size: int = 128, seed: int = 0) -> Path:
    """Write a folders-layout dataset (images/, masks/, classes.txt, tags.csv, splits/) and return its path."""
    root = Path(root)
    if (root / "splits" / "val.txt").exists():
        return root
    rng = np.random.default_rng(seed)
    spec = LabelSpec(CLASSES)
    ids = [f"shape_{i:04d}" for i in range(n_train + n_val)]
    rows = ["image_id,tags"]
    for i in ids:
        image, mask = _draw_sample(rng, size)
        with atomic_path(root / "images" / f"{i}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        write_label_png(root / "masks" / f"{i}.png", mask, spec.palette_bytes())
        present = sorted(set(np.unique(mask).tolist()) - {0})
        rows.append(f"{i},{';'.join(CLASSES[c] for c in present)}")
    write_text(root / "classes.txt", "\n".join(CLASSES) + "\n")
    write_text(root / "tags.csv", "\n".join(rows) + "\n")
    write_text(root / "splits" / "train.txt", "\n".join(ids[:n_train]) + "\n")
    write_text(root / "splits" / "val.txt", "\n".join(ids[n_train:]) + "\n")
    return root
