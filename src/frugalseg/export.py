"""Exports loadable without Lightning: `model.safetensors` + `config.json` (model spec, label spec).

Reading an export or a training checkpoint never fails with a library's traceback: a missing, truncated or
corrupt file is a `DataError` naming it and saying what to do (`read_safetensors`, `read_checkpoint`, and
`check_checkpoint`, the cheap check of a checkpoint before a resume writes anything)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from frugalseg.data.io import atomic_path, write_text
from frugalseg.data.labels import LabelSpec
from frugalseg.errors import DataError, first_line
from frugalseg.models import build_model

EXPORT_FORMAT = 1
# Format of the `frugalseg` entry every training checkpoint carries (label spec, model spec, kind).
CHECKPOINT_FORMAT = 1


def save_export(model: torch.nn.Module, spec: dict, labels: LabelSpec, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(
        out_dir / "config.json",
        json.dumps({"format_version": EXPORT_FORMAT, "model": spec, "labels": labels.to_dict()}, indent=2),
    )
    return out_dir


# What to do about a damaged file, by kind of file.
EXPORT_ADVICE = "re-export it by re-running training, or restore the file"
RESUME_ADVICE = "delete it to train from scratch, or pass a complete checkpoint"
CHECKPOINT_ADVICE = "pass a complete checkpoint, or the run's model/ export folder"


def _read_export_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {EXPORT_ADVICE}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: truncated or corrupt ({first_line(exc, sentence=True)}); {EXPORT_ADVICE}.") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), dict) and isinstance(meta.get("labels"), dict)):
        raise DataError(f"{path}: incomplete (no 'model' and 'labels' sections); {EXPORT_ADVICE}.")
    if meta.get("format_version", 0) > EXPORT_FORMAT:
        raise DataError(f"{folder}: export format {meta['format_version']} is newer than this frugalseg reads; "
                        "upgrade frugalseg.")
    return meta


def _build(meta: dict, where: Path, advice: str) -> tuple[torch.nn.Module, LabelSpec]:
    """The network and label spec a checkpoint's or export's metadata describe (`where` names the file)."""
    try:
        labels = LabelSpec.from_dict(meta["labels"])
        model = build_model(meta["model"], pretrained=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: incomplete model description ({type(exc).__name__}: {first_line(exc, sentence=True)}); {advice}.") from None
    return model, labels


def _load_weights(model: torch.nn.Module, state: dict, where: Path, advice: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"{where}: the weights do not fit the model its config describes ({first_line(exc, sentence=True)}); {advice}.") from None


def read_safetensors(path: Path, advice: str = EXPORT_ADVICE) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with a `DataError` naming the file when it is missing, truncated or corrupt."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing; {advice}.")
    try:
        return load_file(str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or first_line(exc, sentence=True)}).") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
        raise DataError(f"{path}: truncated or corrupt ({first_line(exc, sentence=True)}); {advice}.") from None


def read_checkpoint(path: Path, advice: str = CHECKPOINT_ADVICE, mmap: bool = False) -> dict:
    """A training checkpoint (on CPU) with its `frugalseg` section, or a `DataError` naming the file when it is
    missing, empty, truncated, corrupt or not frugalseg's. `mmap`: tensors stay on disk until used (cheap)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing; {advice}.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, not a checkpoint; {advice}.")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=False)  # not mmap-able: say why it fails
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError ... for damaged files
        raise DataError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {first_line(exc, sentence=True)}); {advice}.") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("frugalseg"), dict):
        raise DataError(f"{path}: not a frugalseg checkpoint (no 'frugalseg' section); {advice}.")
    version = ckpt["frugalseg"].get("format_version", 0)
    if isinstance(version, int) and version > CHECKPOINT_FORMAT:
        raise DataError(f"{path}: checkpoint format {version} is newer than this frugalseg reads; upgrade frugalseg.")
    return ckpt


def check_checkpoint(path: Path | str) -> dict:
    """The `frugalseg` section of a training checkpoint (format version, kind, label and model spec where the
    kind has them), read cheaply (memory-mapped, on CPU) before a resume writes anything: a `DataError` naming
    the file and what to do when it is missing, truncated, corrupt or not frugalseg's."""
    return dict(read_checkpoint(Path(path), RESUME_ADVICE, mmap=True)["frugalseg"])


def load_export(path: Path) -> tuple[torch.nn.Module, dict, LabelSpec]:
    """Model (eval mode, CPU), its spec and label spec from an export folder or a Lightning checkpoint.

    A checkpoint's network is its `model.*` weights: the segmenter of supervised training, the network of
    a semi-supervised step (a mean teacher's student; co-training's members are `models.<k>.*`, loaded
    from its `models/` export instead). A damaged file is a `DataError` naming it and what to do."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        meta = _read_export_config(path)
        weights = path / "model.safetensors"
        model, labels = _build(meta, path / "config.json", EXPORT_ADVICE)
        state = read_safetensors(weights)
        _load_weights(model, state, weights, EXPORT_ADVICE)
        return model.eval(), meta["model"], labels
    if path.suffix == ".ckpt" and (path.is_file() or not path.exists()):
        ckpt = read_checkpoint(path)
        meta = ckpt["frugalseg"]
        if not isinstance(meta.get("model"), dict) or "labels" not in meta:
            raise DataError(f"{path}: a {meta.get('kind', 'frugalseg')} checkpoint without a segmentation model; "
                            f"{CHECKPOINT_ADVICE}.")
        model, labels = _build(meta, path, CHECKPOINT_ADVICE)
        state = {k[len("model."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
        _load_weights(model, state, path, CHECKPOINT_ADVICE)
        return model.eval(), meta["model"], labels
    raise DataError(f"{path}: expected an export folder (config.json + model.safetensors) or a .ckpt file.")
