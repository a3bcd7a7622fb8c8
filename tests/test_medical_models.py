"""Medical networks (MONAI U-Net / V-Net) and whole-volume inference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from frugalseg.errors import ConfigError
from frugalseg.inference import predict_volume_sliding, predict_volume_slices

pytest.importorskip("monai")


def test_unet2d_any_slice_size():
    from frugalseg.models.medical import unet2d

    torch.manual_seed(0)
    model = unet2d(1, 4, channels=(8, 16, 32)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 40, 37)).shape == (2, 4, 40, 37)  # 37 is no multiple of 4: padded
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_unet2d_default_and_build_model():
    from frugalseg.models import build_model

    model = build_model({"arch": "unet2d", "num_classes": 4, "in_chans": 1}).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 48, 40)).shape == (1, 4, 48, 40)


def test_vnet3d_shape_and_channel_check():
    from frugalseg.models.medical import vnet3d

    model = vnet3d(1, 2, dropout=0.0).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 18, 16, 17)).shape == (1, 2, 18, 16, 17)
    with pytest.raises(ConfigError, match="dividing 16"):
        vnet3d(3, 2)


class _TwoHeads(nn.Module):
    """A 1×1 convolution returning (segmentation, extra) like dual-task networks."""

    def __init__(self, dims: int, k: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(1, k, 1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.tanh(y)


def test_predict_volume_slices_shapes_resize_and_probabilities():
    torch.manual_seed(0)
    model = _TwoHeads(2, 3).eval()
    volume = torch.randn(5, 30, 28)
    probs = predict_volume_slices(model, volume, batch=2)
    assert probs.shape == (5, 3, 30, 28) and probs.device.type == "cpu"
    torch.testing.assert_close(probs.sum(1), torch.ones(5, 30, 28))
    expected = model.conv(volume[:, None]).softmax(1)
    torch.testing.assert_close(probs, expected.detach())
    resized = predict_volume_slices(model, volume, batch=4, size=16)
    assert resized.shape == (5, 3, 30, 28)
    with pytest.raises(ConfigError, match="volume"):
        predict_volume_slices(model, torch.randn(30, 28))


def test_predict_volume_sliding_matches_direct_application():
    torch.manual_seed(0)
    model = _TwoHeads(3, 2).eval()
    volume = torch.randn(20, 14, 9)  # smaller than the window along the last axis: padded and cropped
    probs = predict_volume_sliding(model, volume, patch_size=(8, 8, 12), overlap=0.5, sw_batch_size=2)
    assert probs.shape == (2, 20, 14, 9) and probs.device.type == "cpu"
    # A pointwise model gives the same answer whichever windows cover a voxel.
    expected = model.conv(volume[None, None])[0].softmax(0).detach()
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="patch_size"):
        predict_volume_sliding(model, volume, patch_size=(8, 8))
