"""Exports loadable without Lightning: `model.safetensors` + `config.json` (model spec, label spec)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from frugalseg.data.io import atomic_path, write_text
from frugalseg.data.labels import LabelSpec
from frugalseg.errors import DataError
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


def load_export(path: Path) -> tuple[torch.nn.Module, dict, LabelSpec]:
    """Model (eval mode, CPU), its spec and label spec from an export folder or a Lightning checkpoint.

    A checkpoint's network is its `model.*` weights: the segmenter of supervised training, the network of
    a semi-supervised step (a mean teacher's student; co-training's members are `models.<k>.*`, loaded
    from its `models/` export instead)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        from safetensors.torch import load_file

        meta = json.loads((path / "config.json").read_text())
        if meta.get("format_version", 0) > EXPORT_FORMAT:
            raise DataError(f"{path}: export format {meta['format_version']} is newer than this frugalseg reads.")
        model = build_model(meta["model"], pretrained=False)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.eval(), meta["model"], LabelSpec.from_dict(meta["labels"])
    if path.is_file() and path.suffix == ".ckpt":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta = ckpt.get("frugalseg")
        if meta is None:
            raise DataError(f"{path}: not a frugalseg checkpoint (no 'frugalseg' section).")
        model = build_model(meta["model"], pretrained=False)
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
        return model.eval(), meta["model"], LabelSpec.from_dict(meta["labels"])
    raise DataError(f"{path}: expected an export folder (config.json + model.safetensors) or a .ckpt file.")
