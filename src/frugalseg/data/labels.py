"""Class definitions that travel with data, metrics, visuals, checkpoints and exports.

One `LabelSpec` answers every question about label values: names, colours, which index is
background (if any) and which value is void. Remapping (merging classes into background, marking
classes as ignored) is a lookup table from source ids to target ids, applied once when a mask is read,
so every later stage sees the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from frugalseg.errors import DataError

IGNORE_INDEX = 255


BACKGROUND_NAMES = ("background", "bg", "_background_")


def background_index(names: Sequence[str]) -> int | None:
    """0 when the first class is called background (any of `BACKGROUND_NAMES`, any case), else None.

    One rule for every format: labelme and others write "_background_", and a loader that did not know
    that would silently treat class 0 as a foreground class (tags, metrics and maps would all count it).
    """
    return 0 if names and names[0].strip().lower() in BACKGROUND_NAMES else None


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), used for palette PNGs everywhere."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


@dataclass(frozen=True)
class LabelSpec:
    """Names of the classes, in id order, plus the conventions for background and void.

    `background` is the index of the background class, or None for datasets where every labelled
    pixel belongs to a named class (MSRC-21 before merging). `ignore_index` pixels are excluded from
    losses and metrics.
    """

    names: tuple[str, ...]
    background: int | None = 0
    ignore_index: int = IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.names:
            raise DataError("A label spec needs at least one class name.")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise DataError(f"Duplicate class names: {dup}")
        if len(self.names) >= self.ignore_index:
            raise DataError(f"{len(self.names)} classes collide with ignore index {self.ignore_index}.")
        if self.background is not None and not 0 <= self.background < len(self.names):
            raise DataError(f"Background index {self.background} is outside 0..{len(self.names) - 1}.")
        if not self.palette:
            object.__setattr__(self, "palette", tuple(voc_palette(len(self.names))))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def foreground(self) -> list[int]:
        """Class ids that can be image-level tags (every class except background)."""
        return [i for i in range(self.num_classes) if i != self.background]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise DataError(f"Unknown class name '{name}'. Known classes: {', '.join(self.names)}") from None

    def check_mask(self, mask: np.ndarray, where: str) -> None:
        """Raise a clear error if a mask holds ids that are neither classes nor void."""
        values = np.unique(mask)
        bad = [int(v) for v in values if v >= self.num_classes and v != self.ignore_index]
        if bad:
            hint = ""
            if set(int(v) for v in values) <= {0, 255} and self.num_classes > 1:
                hint = " It looks like a 0/255 binary mask: map 255 to class 1 (e.g. with a class map)."
            raise DataError(
                f"{where}: mask holds class ids {bad[:10]} outside 0..{self.num_classes - 1} "
                f"(and {self.ignore_index} = void).{hint}"
            )

    def palette_bytes(self) -> list[int]:
        """A flat 768-entry palette for Pillow, void drawn white."""
        full = list(self.palette) + voc_palette(256)[len(self.palette):]
        full[self.ignore_index] = (255, 255, 255)
        return [c for rgb in full for c in rgb]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "background": self.background,
            "ignore_index": self.ignore_index,
            "palette": [list(p) for p in self.palette],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelSpec":
        return cls(
            names=tuple(d["names"]),
            background=d.get("background", 0),
            ignore_index=int(d.get("ignore_index", IGNORE_INDEX)),
            palette=tuple(tuple(p) for p in d.get("palette", ())),
        )


@dataclass(frozen=True)
class ClassMap:
    """A remapping from a source LabelSpec to a target one, as a 256-entry lookup table."""

    source: LabelSpec
    target: LabelSpec
    lut: np.ndarray  # uint8[256]

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        return self.lut[mask]

    def tags(self, source_ids: Iterable[int]) -> frozenset[int]:
        """Map source-class tags to target tags (background and void drop out)."""
        out = set()
        for i in source_ids:
            t = int(self.lut[i])
            if t != self.target.ignore_index and t != self.target.background:
                out.add(t)
        return frozenset(out)


def merge_into_background(
    spec: LabelSpec,
    background: Sequence[str],
    ignore: Sequence[str] = (),
    background_name: str | None = None,
) -> ClassMap:
    """Merge `background` classes into class 0, send `ignore` classes to void, keep the rest in order.

    This is how MSRC-21 becomes the VOC-like msrc-objects task: stuff classes become background. A
    spec that already has a background class keeps it (under its own name) and the merged classes join it.
    """
    for name in [*background, *ignore]:
        spec.index(name)  # raises on unknown names
    existing = spec.names[spec.background] if spec.background is not None else None
    bg_name = background_name or existing or "background"
    merged = set(background) | ({existing} if existing else set())
    kept = [n for n in spec.names if n not in merged and n not in ignore]
    names = (bg_name, *kept)
    target = LabelSpec(names=names, background=0, ignore_index=spec.ignore_index)
    lut = np.full(256, spec.ignore_index, dtype=np.uint8)
    for i, n in enumerate(spec.names):
        if n in merged:
            lut[i] = 0
        elif n in ignore:
            lut[i] = spec.ignore_index
        else:
            lut[i] = names.index(n)
    return ClassMap(spec, target, lut)


def identity_map(spec: LabelSpec) -> ClassMap:
    lut = np.full(256, spec.ignore_index, dtype=np.uint8)
    lut[: spec.num_classes] = np.arange(spec.num_classes)
    return ClassMap(spec, spec, lut)
