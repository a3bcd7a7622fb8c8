"""Models: timm backbones with offline weights, FCN/OCR heads, medical U-Net/V-Net."""

from __future__ import annotations

from frugalseg.models.backbones import create_backbone, create_classifier
from frugalseg.models.segmenter import Segmenter, create_segmenter

__all__ = ["Segmenter", "create_backbone", "create_classifier", "create_segmenter"]


def build_model(spec: dict, pretrained: bool | str = False):
    """Rebuild a model from its spec (saved in checkpoints and exports).

    spec keys: arch (ocr | fcn | unet2d | vnet3d), num_classes, in_chans, and for ocr/fcn backbone and
    output_stride.
    """
    from frugalseg.errors import ConfigError

    arch = spec["arch"]
    if arch in ("ocr", "fcn"):
        return create_segmenter(
            arch, spec["num_classes"], backbone=spec["backbone"], pretrained=pretrained,
            output_stride=spec.get("output_stride", 16), in_chans=spec.get("in_chans", 3),
            aux_stage=spec.get("aux_stage", "penultimate"),  # specs written before the option existed
        )
    if arch == "unet2d":
        from frugalseg.models.medical import unet2d

        return unet2d(spec.get("in_chans", 1), spec["num_classes"])
    if arch == "vnet3d":
        from frugalseg.models.medical import vnet3d

        return vnet3d(spec.get("in_chans", 1), spec["num_classes"])
    raise ConfigError(f"Unknown architecture '{arch}' (ocr, fcn, unet2d, vnet3d).")
