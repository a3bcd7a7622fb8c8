"""Models: timm backbones with offline weights, FCN/OCR heads, medical U-Net/V-Net."""

from __future__ import annotations

from frugalseg.models.backbones import create_backbone, create_classifier
from frugalseg.models.segmenter import Segmenter, create_segmenter

__all__ = ["Segmenter", "create_backbone", "create_classifier", "create_segmenter"]


def build_model(spec: dict, pretrained: bool | str = False):
    """Rebuild a model from its spec (saved in checkpoints and exports).

    spec keys: arch (ocr | fcn | unet2d | unet3d | vnet3d | levelset_unet2d | levelset_unet3d |
    levelset_vnet3d), num_classes, in_chans, and for ocr/fcn backbone and output_stride; for the medical
    networks optionally channels (U-Nets) and dropout.
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

        # channels / dropout: optional spec keys (semi-supervised runs size the U-Net; older specs lack them)
        return unet2d(spec.get("in_chans", 1), spec["num_classes"], tuple(spec.get("channels", UNET_CHANNELS)),
                      float(spec.get("dropout", 0.0)))
    if arch == "unet3d":
        return unet3d(spec.get("in_chans", 1), spec["num_classes"], tuple(spec.get("channels", UNET_CHANNELS)),
                      float(spec.get("dropout", 0.0)))
    if arch == "vnet3d":
        from frugalseg.models.medical import vnet3d

        return vnet3d(spec.get("in_chans", 1), spec["num_classes"], dropout=float(spec.get("dropout", 0.5)))
    if arch.startswith("levelset_"):  # DTC's dual-task networks (segmentation + level-set heads)
        from frugalseg.models.levelset import build_levelset

        return build_levelset(spec)
    raise ConfigError(f"Unknown architecture '{arch}' (ocr, fcn, unet2d, unet3d, vnet3d, levelset_*).")


UNET_CHANNELS = (16, 32, 64, 128, 256)


def unet3d(in_channels: int, num_classes: int, channels=UNET_CHANNELS, dropout: float = 0.0):
    """A 3D U-Net (MONAI UNet, the settings of `medical.unet2d` in 3D) for any D, H, W: a lighter
    alternative to the V-Net for volumes."""
    from frugalseg.errors import ConfigError, require
    from frugalseg.models.medical import PadToMultiple

    nets = require("monai.networks.nets", "medical", "The unet3d model")
    if len(channels) < 2 or in_channels < 1 or num_classes < 1:
        raise ConfigError(f"unet3d needs two levels of channels, an input channel and a class, got {tuple(channels)}.")
    net = nets.UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=tuple(channels),
                    strides=(2,) * (len(channels) - 1), num_res_units=2, dropout=dropout)
    return PadToMultiple(net, 2 ** (len(channels) - 1))
