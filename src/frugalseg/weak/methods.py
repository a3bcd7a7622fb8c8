"""The class-map methods by name: one signature, one dict, and the names of every seed source.

Every map method is `fn(model, images, tags, options) -> list[ClassMaps]`: a `TagClassifier`, same-size
images (B, 3, H, W) in [0, 1] on the model's device, each image's tags as classifier output indices, and
the method's own options object (`MAP_OPTIONS[name]`, a dataclass with the paper's defaults). The result
holds one `ClassMaps` per image (stride-4 and image-size maps of its tagged classes, in [0, 1]).

    fn = MAP_METHODS["advcam"]
    maps = fn(model, images, [[1, 3], [2]], AdvCAMConfig(steps=27))

Group-wise maps (`group`) need partners drawn from the whole split, not a batch: they are a seed source
(`SEED_METHODS`) with their own function, `frugalseg.weak.group.group_maps`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, get_args

import torch

from frugalseg.weak.advcam import AdvCAMConfig, advcam_maps
from frugalseg.weak.cam import DEFAULT_SCALES, ClassMaps, HighResMode, cam_maps
from frugalseg.weak.prm import prm_maps

MapMethodName = Literal["cam", "advcam", "prm"]
SeedMethodName = Literal[MapMethodName, "group"]  # nested Literals flatten: cam, advcam, prm, group
#: where seeds can come from: a map method, or group-wise co-attention over images sharing a tag
SEED_METHODS: tuple[str, ...] = get_args(SeedMethodName)


@dataclass
class CAMOptions:
    scales: tuple[float, ...] = DEFAULT_SCALES  # multi-scale + flip, as IRN's make_cam
    high_res: HighResMode = "resize"  # the image-size map: stretched, or IRN's stride-16 up-size then crop


@dataclass
class PRMOptions:
    peak_threshold: float = 0.0  # a peak counts when its class-map value is above this
    proposal_count: int = 100  # superpixel proposals per image (MCG is not available)


def cam(model: torch.nn.Module, images: torch.Tensor, tags: Sequence[Sequence[int]],
        options: CAMOptions) -> list[ClassMaps]:
    return cam_maps(model, images, tags, scales=options.scales, high_res=options.high_res)


def advcam(model: torch.nn.Module, images: torch.Tensor, tags: Sequence[Sequence[int]],
           options: AdvCAMConfig) -> list[ClassMaps]:
    return advcam_maps(model, images, tags, options)


def prm(model: torch.nn.Module, images: torch.Tensor, tags: Sequence[Sequence[int]],
        options: PRMOptions) -> list[ClassMaps]:
    return prm_maps(model, images, tags, peak_threshold=options.peak_threshold,
                    proposal_count=options.proposal_count)


MapMethod = Callable[[torch.nn.Module, torch.Tensor, Sequence[Sequence[int]], Any], list[ClassMaps]]
MAP_METHODS: dict[str, MapMethod] = {"cam": cam, "advcam": advcam, "prm": prm}
MAP_OPTIONS: dict[str, type] = {"cam": CAMOptions, "advcam": AdvCAMConfig, "prm": PRMOptions}
assert tuple(MAP_METHODS) == get_args(MapMethodName) == tuple(MAP_OPTIONS)
assert set(MAP_METHODS) < set(SEED_METHODS)


def method_options(method: str, values: Mapping[str, Any]) -> Any:
    """The options object of `method`, its fields taken from the same-named entries of `values` (e.g. a
    stage config's fields; lists become tuples), the method's defaults for the rest."""
    cls = MAP_OPTIONS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})
