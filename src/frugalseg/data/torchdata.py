"""PyTorch datasets over `SegDataset`: decoded once, cached in memory, augmented per epoch.

Images are small relative to memory for the datasets this library targets on one machine (a few
thousand images), and decoding PNGs every epoch costs more than the CPU can spare next to training;
`cache=True` keeps decoded tensors. Volumes (ndim 3) used by 2D training are expanded into slices by
the dataset loader, not here.

Also here, for validation and evaluation: `EvalCases` (whole cases, one per item, as a 2D or 3D network
reads them: `case_input`), `first_item` (the collate of one-case batches) and `input_channels` (what the
first convolution of a network for this dataset takes).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.data.samples import SegDataset
from frugalseg.data.transforms import to_tensor_image
from frugalseg.errors import DataError


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation generator of one sample in one epoch: reproducible whatever the worker count."""
    return torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFFFFFF)


class SeededShuffle(Sampler[int]):
    """A shuffled order of `n` items drawn from (seed, epoch) alone.

    DataLoader's `shuffle=True` draws each epoch's order from the global RNG, whose state a resumed run
    does not share with the run it continues: the resumed run would see other batches and end elsewhere.
    Here the order of epoch e is a function of (seed, e); Lightning calls `set_epoch` before each epoch
    (also the first one after a resume), so an interrupted and resumed run sees the batches of an
    uninterrupted one.
    """

    def __init__(self, n: int, seed: int = 0, on_epoch: Callable[[int], None] | None = None):
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0
        self.on_epoch = on_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        # ints only: a str in the hashed tuple would make the order change with PYTHONHASHSEED
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, -7)) & 0x7FFFFFFF)
        return iter(torch.randperm(self.n, generator=g).tolist())


def shuffled_loader(data: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                    persistent_workers: bool = False) -> DataLoader:
    """The training loader of the epoch-based stages: `SeededShuffle` order, full batches only (unless the
    data is smaller than one batch). The sampler hands each epoch to the dataset (its augmentation) when
    Lightning sets it, before any worker prefetches a batch: a resumed run may create its first iterator before
    `on_train_epoch_start`. Its own generator gives the workers their base seed: a loader drawing it
    from the global RNG would draw once more in a resumed run (its workers start again) than in the run it
    continues, and every later global draw (dropout) would differ."""
    n = len(data)
    sampler = SeededShuffle(n, seed, on_epoch=getattr(data, "set_epoch", None))
    return DataLoader(data, batch_size=min(batch_size, n), sampler=sampler, drop_last=n > batch_size,
                      num_workers=num_workers, persistent_workers=persistent_workers and num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class MixedShuffle(SeededShuffle):
    """Each epoch: every one of the `n_real` items once, plus extra items (indices n_real..n_real+n_extra-1)
    making up the share `extra_share` of the epoch's draws, drawn without repetition until all were seen
    (then a new pass). The order is a function of (seed, epoch), as `SeededShuffle`'s.

    An epoch is therefore `n_real / (1 - extra_share)` draws whatever the size of the extra set: with 10 real
    and 500 synthetic pairs at share 0.5 it is 20 draws, 10 of them real, and the synthetic set is walked
    through over 50 epochs. A run of a fixed number of steps spends `1 - extra_share` of its draws on real
    pairs, however many synthetic pairs there are."""

    def __init__(self, n_real: int, n_extra: int, extra_share: float, seed: int = 0,
                 on_epoch: Callable[[int], None] | None = None):
        if not 0 < extra_share < 1:
            raise ValueError(f"extra_share must be in (0, 1), got {extra_share}")
        self.n_real, self.n_extra, self.share = int(n_real), int(n_extra), float(extra_share)
        self.n_draws_extra = max(1, round(self.n_real * self.share / (1 - self.share)))
        super().__init__(self.n_real + self.n_draws_extra, seed, on_epoch)  # its epoch and length

    def _extra(self, epoch: int) -> list[int]:
        """The extra items of `epoch`: a slice of the seeded permutation of its pass over the extra set."""
        start = epoch * self.n_draws_extra
        out: list[int] = []
        while len(out) < self.n_draws_extra:
            pass_no, offset = divmod(start + len(out), self.n_extra)
            g = torch.Generator().manual_seed(hash((self.seed, pass_no, -11)) & 0x7FFFFFFF)
            perm = torch.randperm(self.n_extra, generator=g).tolist()
            out += perm[offset: offset + self.n_draws_extra - len(out)]
        return [self.n_real + i for i in out]

    def __iter__(self):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, -7)) & 0x7FFFFFFF)
        items = list(range(self.n_real)) + self._extra(self.epoch)
        return iter([items[i] for i in torch.randperm(len(items), generator=g).tolist()])


class ConcatPairs(Dataset):
    """Two `MaskedImages` as one (indices of the second follow the first); epochs reach both."""

    def __init__(self, first: "MaskedImages", second: "MaskedImages"):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def set_epoch(self, epoch: int) -> None:
        self.first.set_epoch(epoch)
        self.second.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        if i < len(self.first):
            return self.first[i]
        item = self.second[i - len(self.first)]
        return {**item, "index": i}


def mixed_loader(real: "MaskedImages", extra: "MaskedImages", extra_share: float, batch_size: int, seed: int,
                 num_workers: int = 0, persistent_workers: bool = False) -> DataLoader:
    """The training loader over real pairs and extra (e.g. synthetic) pairs at `extra_share` of the draws."""
    data = ConcatPairs(real, extra)
    sampler = MixedShuffle(len(real), len(extra), extra_share, seed, on_epoch=data.set_epoch)
    n = len(sampler)
    return DataLoader(data, batch_size=min(batch_size, n), sampler=sampler, drop_last=n > batch_size,
                      num_workers=num_workers, persistent_workers=persistent_workers and num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class SharedEpoch:
    """The training epoch, seen by the main process *and* DataLoader worker processes.

    Persistent workers hold their own copy of the dataset, so a plain attribute set in the main process at
    the start of an epoch never reaches them and every epoch would repeat epoch 0's augmentation. The value
    lives in a shared-memory tensor instead (shared across fork and spawn by torch.multiprocessing); Lightning
    calls `on_train_epoch_start` before it starts the epoch's iterator, so workers read the new value.
    """

    def __init__(self, epoch: int = 0):
        self._value = torch.full((), int(epoch), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))

    def get(self) -> int:
        return int(self._value)


class EpochAware:
    """Mixin: `epoch` (read in `__getitem__`, possibly in a worker) backed by a `SharedEpoch`."""

    _shared_epoch: SharedEpoch

    @property
    def epoch(self) -> int:
        return self._shared_epoch.get()

    def set_epoch(self, epoch: int) -> None:
        self._shared_epoch.set(epoch)


class MaskedImages(EpochAware, Dataset):
    """(image, mask) pairs of the samples whose supervision is a mask (or all, with `all_samples`)."""

    def __init__(
        self,
        ds: SegDataset,
        transform: Callable | None = None,
        *,
        all_samples: bool = False,
        cache: bool = True,
        seed: int = 0,
    ):
        self.ds = ds if all_samples else ds.by_supervision("mask")
        self.transform = transform
        self.cache = cache
        self.seed = seed
        self._shared_epoch = SharedEpoch()
        self._items: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self._items:
            return self._items[i]
        sample = self.ds[i]
        image, mask = self.ds.read_pair(sample)
        item = (to_tensor_image(image), torch.from_numpy(mask.astype("int64")))
        if self.cache:
            self._items[i] = item
        return item

    def __getitem__(self, i: int) -> dict:
        image, mask = self.load(i)
        if self.transform is not None:
            image, mask = self.transform(image, mask, sample_generator(self.seed, self.epoch, i))
        return {"image": image, "mask": mask, "index": i}


def pad_collate(batch: list[dict]) -> dict:
    """Stack samples of different sizes by padding images with 0 and masks with void."""
    h = max(b["image"].shape[-2] for b in batch)
    w = max(b["image"].shape[-1] for b in batch)
    c = batch[0]["image"].shape[0]
    images = torch.zeros(len(batch), c, h, w)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.long)
    sizes = []
    for k, b in enumerate(batch):
        bh, bw = b["image"].shape[-2:]
        images[k, :, :bh, :bw] = b["image"]
        masks[k, :bh, :bw] = b["mask"]
        sizes.append((bh, bw))
    return {"image": images, "mask": masks, "index": torch.tensor([b["index"] for b in batch]), "sizes": sizes}


def first_item(batch: list[dict]) -> dict:
    """Collate of one-case batches (`batch_size=1`): the case itself (cases differ in size)."""
    return batch[0]


def input_channels(ds: SegDataset) -> int:
    """Input channels of a network for `ds`: 3 for RGB 2D images, else 1 (greyscale images, slices, volumes)."""
    image = ds.read_image(ds[0])
    return 3 if ds.ndim == 2 and image.ndim == 3 and image.shape[-1] == 3 else 1


def case_input(image: np.ndarray, ds_ndim: int, net_dims: int) -> torch.Tensor:
    """A case as a network reads it: a 2D network gets (D, C, H, W) slices (a 2D image is one slice),
    a 3D network one (C, D, H, W) volume."""
    if ds_ndim == 3:
        v = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if v.ndim != 3:
            raise DataError(f"expected a (D, H, W) volume, got shape {tuple(v.shape)}.")
        return v[:, None] if net_dims == 2 else v[None]
    if net_dims != 2:
        raise DataError("a 3D network cannot segment 2D images; train on volumes or use a 2D network.")
    return to_tensor_image(np.ascontiguousarray(image))[None]


class EvalCases(Dataset):
    """Whole cases with a mask, one per item: {"input": `case_input`, "mask": (D, H, W) or (H, W) int64,
    "index"}. Validation of 2D networks on volumes (slice by slice) and of 3D networks (sliding window);
    load with `DataLoader(..., batch_size=1, collate_fn=first_item)`."""

    def __init__(self, ds: SegDataset, net_dims: int = 2):
        self.ds = ds
        self.net_dims = net_dims
        self.samples = [s for s in ds.samples if s.mask is not None]
        if not self.samples:
            raise DataError(f"{ds.name}: no sample has a ground-truth mask to validate against.")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image, mask = self.ds.read_pair(self.samples[i])
        return {"input": case_input(image, self.ds.ndim, self.net_dims),
                "mask": torch.from_numpy(mask.astype(np.int64)), "index": i}
