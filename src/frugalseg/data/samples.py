"""Samples, datasets and per-sample supervision.

A dataset is a list of samples plus one `LabelSpec`. Each sample points at its image and, where one
exists, its ground-truth mask. What *training* may see is the sample's `supervision`: a mask, image
tags, or nothing. Ground truth stays attached for evaluation; a label budget (see `budget.py`) only
changes `supervision`, so every method is measured against the same hidden masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from frugalseg.data.io import RASTER_SUFFIXES, read_label_png, read_rgb, safe_name, sample_file, suffix_of
from frugalseg.data.labels import ClassMap, LabelSpec, identity_map
from frugalseg.data.volume_io import volume_reader
from frugalseg.errors import DataError

Supervision = Literal["mask", "tags", "none"]


def report_problem(problems: list[str] | None, message: str) -> None:
    """A structural problem found while opening a dataset: raise it, or record it and go on.

    Loaders fail fast by default (`problems` None: training must stop at the first bad input, before any
    work). `frugalseg data validate` passes a list instead: each problem is recorded, the loader leaves out
    what the problem makes unusable (an orphan mask, a tag row for a missing image, an unknown tag name) and
    goes on, so one run lists every problem rather than the first one.
    """
    if problems is None:
        raise DataError(message)
    problems.append(message)


@dataclass(frozen=True)
class Sample:
    """One image (2D or 3D) with what is known about it.

    `mask` is the ground-truth file (for HDF5 the same file as `image`). `tags` are image-level class ids
    given by the dataset; when None they are derived from the mask on demand. `spacing` is the physical
    pixel/voxel size in (z,) y, x order when the format stores it, else None (metrics then report voxels).
    """

    id: str
    image: Path
    mask: Path | None = None
    tags: frozenset[int] | None = None
    supervision: Supervision = "mask"
    spacing: tuple[float, ...] | None = None


@dataclass
class SegDataset:
    """A list of samples with one label spec, and the class map applied when masks are read."""

    name: str
    samples: list[Sample]
    labels: LabelSpec
    class_map: ClassMap | None = None
    ndim: int = 2
    _tag_cache: dict[str, frozenset[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.class_map is None:
            self.class_map = identity_map(self.labels)
        ids = [s.id for s in self.samples]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DataError(f"{self.name}: duplicate sample ids {dup}.")

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    # ---- reading -------------------------------------------------------------------------
    def read_image(self, sample: Sample) -> np.ndarray:
        """RGB uint8 (H, W, 3) for raster images; float32 (H, W) or (D, H, W) for medical formats."""
        if suffix_of(sample.image) in RASTER_SUFFIXES:
            return read_rgb(sample.image)
        return volume_reader(sample.image)[0](sample.image)

    def read_raw_mask(self, sample: Sample) -> np.ndarray:
        """The ids stored in the mask file, checked against the source classes but not remapped.

        Checks on what the user wrote (0/255 binary masks) need these: after a class map, 255 may also be
        a class the run chose to ignore.
        """
        if sample.mask is None:
            raise DataError(f"{self.name}/{sample.id}: no ground-truth mask exists for this sample.")
        if suffix_of(sample.mask) in RASTER_SUFFIXES:
            raw = read_label_png(sample.mask, palette=list(self.class_map.source.palette))
        else:
            raw = volume_reader(sample.mask)[1](sample.mask)
        self.class_map.source.check_mask(raw, f"{sample.mask}")
        return raw

    def read_mask(self, sample: Sample) -> np.ndarray:
        """Ground-truth ids in this dataset's label spec (class map applied, 255 = void)."""
        return self.class_map(self.read_raw_mask(sample))

    def check_sizes(self, sample: Sample, image: np.ndarray, mask: np.ndarray) -> None:
        """Raise if an image and its mask differ in size (a mask of another image, or a resized one)."""
        spatial = image.shape[:2] if image.ndim == 3 and image.shape[-1] == 3 and self.ndim == 2 else image.shape
        if tuple(spatial) != tuple(mask.shape):
            raise DataError(
                f"{self.name}/{sample.id}: image size {tuple(spatial)} does not match mask size "
                f"{tuple(mask.shape)} ({sample.image} vs {sample.mask})."
            )

    def read_pair(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image = self.read_image(sample)
        mask = self.read_mask(sample)
        self.check_sizes(sample, image, mask)
        return image, mask

    def tags_of(self, sample: Sample) -> frozenset[int]:
        """Image-level tags: given by the dataset, else every non-background class present in the mask."""
        if sample.tags is not None:
            return sample.tags
        if sample.id not in self._tag_cache:
            mask = self.read_mask(sample)
            present = np.unique(mask)
            self._tag_cache[sample.id] = frozenset(
                int(c) for c in present if c != self.labels.ignore_index and c != self.labels.background
            )
        return self._tag_cache[sample.id]

    # ---- views ---------------------------------------------------------------------------
    def with_samples(self, samples: Sequence[Sample], name: str | None = None) -> "SegDataset":
        return SegDataset(
            name=name or self.name,
            samples=list(samples),
            labels=self.labels,
            class_map=self.class_map,
            ndim=self.ndim,
            _tag_cache=self._tag_cache,
        )

    def subset(self, ids: Iterable[str]) -> "SegDataset":
        by_id = {s.id: s for s in self.samples}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{self.name}: unknown sample ids {missing[:5]}.")
        return self.with_samples([by_id[i] for i in ids])

    def with_supervision(self, kind: Supervision) -> "SegDataset":
        return self.with_samples([replace(s, supervision=kind) for s in self.samples])

    def by_supervision(self, kind: Supervision) -> "SegDataset":
        return self.with_samples([s for s in self.samples if s.supervision == kind])

    def summary(self) -> dict[str, int]:
        out = {"samples": len(self.samples), "mask": 0, "tags": 0, "none": 0}
        for s in self.samples:
            out[s.supervision] += 1
        return out


def with_mask_folder(ds: SegDataset, folder: str | Path) -> SegDataset:
    """The samples of `ds` that have a mask in `folder` (`<safe id>.png`, ids of `ds.labels`, 255 = ignore).

    This is how pseudo-masks (CRF, mining rounds) become training labels: the masks are already in the
    dataset's class ids, so no class map is applied to them, and each sample keeps the tags of the original
    dataset (given, or derived from its own masks) so nothing re-derives tags from the pseudo-masks.
    Samples without a file are left out; a folder with none of them is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Mask folder {folder} does not exist.")
    samples = []
    for s in ds.samples:
        path = sample_file(folder, s.id, ".png")
        if path.exists():
            samples.append(replace(s, mask=path, tags=ds.tags_of(s), supervision="mask"))
    if not samples:
        raise DataError(f"{folder}: no mask named after a sample of {ds.name} (expected files like "
                        f"{safe_name(ds.samples[0].id) if ds.samples else 'ID'}.png).")
    return SegDataset(name=f"{ds.name}+{folder.name}", samples=samples, labels=ds.labels,
                      class_map=identity_map(ds.labels), ndim=ds.ndim)
