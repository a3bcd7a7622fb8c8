"""Models: timm backbones with offline weights, FCN/OCR heads, medical U-Net/V-Net."""

from __future__ import annotations

from pathlib import Path

from frugalseg.models.backbones import create_backbone, create_classifier, load_network_weights
from frugalseg.models.segmenter import Segmenter, create_segmenter

__all__ = ["Segmenter", "build_model", "create_backbone", "create_classifier", "create_segmenter", "first_output"]


def first_output(out):
    """The segmentation logits of a network's output: networks with several outputs (DTC's level-set nets:
    segmentation, level set) put them first; inference, evaluation and the semi-supervised losses read them so."""
    return out[0] if isinstance(out, (tuple, list)) else out


def build_model(spec: dict, pretrained: bool | str = False):
    """Rebuild a model from its spec (saved in checkpoints and exports).

    spec keys: arch (ocr | fcn | unet2d | unet3d | vnet3d | levelset_unet2d | levelset_unet3d |
    levelset_vnet3d | unet_generator), num_classes, in_chans, and for ocr/fcn backbone and output_stride; for the medical
    networks optionally channels (U-Nets) and dropout.

    pretrained: for ocr/fcn the backbone's weights (True: ImageNet; a path: a weight file or a `frugalseg pretrain`
    run). The other networks have no ImageNet weights: True or False is a random init, a path a state dict of the
    whole network (e.g. a U-Net from `frugalseg pretrain`), checked tensor by tensor.
    """
    model = _new_network(spec, pretrained if spec["arch"] in ("ocr", "fcn") else False)
    if spec["arch"] not in ("ocr", "fcn") and isinstance(pretrained, (str, Path)):
        load_network_weights(model, pretrained)
    return model


def _new_network(spec: dict, pretrained: bool | str):
    from frugalseg.errors import ConfigError

    arch = spec["arch"]
    if arch in ("ocr", "fcn"):
        return create_segmenter(
            arch, spec["num_classes"], backbone=spec["backbone"], pretrained=pretrained,
            output_stride=spec.get("output_stride", 16), in_chans=spec.get("in_chans", 3),
            aux_stage=spec.get("aux_stage", "penultimate"),  # specs written before the option existed
        )
    if arch in ("unet2d", "unet3d"):
        from frugalseg.models.medical import unet

        # channels / dropout: optional spec keys (semi-supervised runs size the U-Net; older specs lack them)
        return unet(int(arch[4]), spec.get("in_chans", 1), spec["num_classes"],
                    tuple(spec.get("channels", UNET_CHANNELS)), float(spec.get("dropout", 0.0)))
    if arch == "vnet3d":
        from frugalseg.models.medical import vnet3d

        return vnet3d(spec.get("in_chans", 1), spec["num_classes"], dropout=float(spec.get("dropout", 0.5)))
    if arch == "unet_generator":  # the mask → image cGAN's generator (frugalseg.synth)
        from frugalseg.models.gan import UNetGenerator

        return UNetGenerator(spec["in_chans"], spec.get("out_chans", 3), spec.get("ngf", 32), spec.get("depth", 6),
                             float(spec.get("dropout", 0.5)))
    if arch.startswith("levelset_"):  # DTC's dual-task networks (segmentation + level-set heads)
        from frugalseg.models.levelset import build_levelset

        return build_levelset(spec)
    raise ConfigError(f"Unknown architecture '{arch}' (ocr, fcn, unet2d, unet3d, vnet3d, levelset_*).")


UNET_CHANNELS = (16, 32, 64, 128, 256)
