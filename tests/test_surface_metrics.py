"""HD95 / ASD: hand-computed cases, empty masks, spacing, and agreement with MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from frugalseg.surface_metrics import asd, dice, hausdorff, hd95, surface_distances, surface_report


def _squares(offset: tuple[int, int], size: int = 2, shape: tuple[int, int] = (20, 20)) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros(shape, bool)
    gt[5:5 + size, 5:5 + size] = True
    pred = np.roll(gt, offset, axis=(0, 1))
    return pred, gt


def test_two_small_squares_offset_by_three_pixels():
    # 2x2 squares: every pixel is surface. Shifted 3 columns, the near column is 2 away, the far 3:
    # both directed sets are {2, 2, 3, 3} -> HD95 = 3, ASD = 2.5.
    pred, gt = _squares((0, 3))
    d_pg, d_gp = surface_distances(pred, gt)
    assert sorted(d_pg.tolist()) == [2, 2, 3, 3] and sorted(d_gp.tolist()) == [2, 2, 3, 3]
    assert hd95(pred, gt) == pytest.approx(3.0)
    assert asd(pred, gt) == pytest.approx(2.5)
    # spacing is (y, x): a horizontal shift is scaled by x = 1.0, a vertical one by y = 2.0.
    assert hd95(pred, gt, spacing=(2.0, 1.0)) == pytest.approx(3.0)
    pred_v, gt_v = _squares((3, 0))
    assert hd95(pred_v, gt_v, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    assert asd(pred_v, gt_v, spacing=(2.0, 1.0)) == pytest.approx(5.0)


def test_large_squares_hausdorff_is_the_shift():
    pred, gt = _squares((0, 3), size=10, shape=(30, 30))
    assert hausdorff(pred, gt, percentile=100) == pytest.approx(3.0)
    assert hausdorff(pred, gt, spacing=(1.0, 0.5), percentile=100) == pytest.approx(1.5)
    assert 0 < hd95(pred, gt) <= 3.0
    assert hd95(gt, gt) == 0.0 and asd(gt, gt) == 0.0


def test_3d_points_and_anisotropic_spacing():
    pred = np.zeros((6, 5, 5), bool)
    gt = np.zeros((6, 5, 5), bool)
    pred[0, 2, 2] = True
    gt[2, 2, 2] = True
    assert hd95(pred, gt) == pytest.approx(2.0)
    assert hd95(pred, gt, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert asd(pred, gt, spacing=(3.0, 0.5, 0.5)) == pytest.approx(6.0)


def test_masks_touching_the_border_have_surface_there():
    gt = np.zeros((10, 10), bool)
    gt[:, :4] = True  # touches three borders
    pred = np.zeros((10, 10), bool)
    pred[:, :6] = True
    assert hausdorff(pred, gt, percentile=100) == pytest.approx(2.0)


def test_empty_masks_give_nan_and_are_flagged():
    gt = np.zeros((8, 8), bool)
    gt[2:5, 2:5] = True
    empty = np.zeros_like(gt)
    for a, b in ((empty, gt), (gt, empty), (empty, empty)):
        assert math.isnan(hd95(a, b)) and math.isnan(asd(a, b))
    assert math.isnan(dice(empty, empty)) and dice(gt, empty) == 0.0

    pred_ids = np.zeros((8, 8), np.uint8)
    gt_ids = np.zeros((8, 8), np.uint8)
    gt_ids[2:5, 2:5] = 1
    pred_ids[2:5, 3:6] = 1
    gt_ids[6, 6] = 2  # class 2 missed by the prediction
    rep = surface_report(pred_ids, gt_ids, [1, 2, 3], spacing=None)
    assert rep[1]["dice"] == pytest.approx(2 * 6 / 18) and rep[1]["hd95"] == pytest.approx(1.0)
    assert not rep[1]["empty_pred"] and not rep[1]["empty_gt"]
    assert rep[2]["empty_pred"] and not rep[2]["empty_gt"] and math.isnan(rep[2]["hd95"]) and rep[2]["dice"] == 0.0
    assert rep[3]["empty_pred"] and rep[3]["empty_gt"] and math.isnan(rep[3]["dice"]) and math.isnan(rep[3]["asd"])


def test_void_ground_truth_is_left_out_of_dice():
    gt_ids = np.array([[1, 1, 255, 0]], np.uint8)
    pred_ids = np.array([[1, 1, 1, 0]], np.uint8)
    assert surface_report(pred_ids, gt_ids, [1])[1]["dice"] == pytest.approx(1.0)


def test_bad_inputs_raise():
    a = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="differs"):
        hd95(a, np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="2 positive voxel sizes"):
        hd95(a, a, spacing=(1.0,))


@pytest.mark.parametrize(
    "shape,spacing", [((40, 50), (2.0, 1.0)), ((18, 24, 20), (2.5, 0.7, 1.1)), ((18, 24, 20), None)]
)
def test_agrees_with_monai(shape, spacing):
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(sum(shape))
    pred = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    gt = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5

    def t(x):
        return torch.from_numpy(x)[None, None].float()

    def monai_hd(a, b, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return metrics.compute_hausdorff_distance(t(a), t(b), include_background=True, spacing=spacing, **kw).item()

    d_pg, d_gp = surface_distances(pred, gt, spacing)
    # Same surfaces and distances: each directed 95th percentile equals MONAI's directed HD95.
    assert np.percentile(d_pg, 95) == pytest.approx(monai_hd(pred, gt, percentile=95, directed=True), rel=1e-5)
    assert np.percentile(d_gp, 95) == pytest.approx(monai_hd(gt, pred, percentile=95, directed=True), rel=1e-5)
    # The maximum is the classic Hausdorff distance in both definitions.
    assert hausdorff(pred, gt, spacing, percentile=100) == pytest.approx(monai_hd(pred, gt), rel=1e-5)
    # medpy's union HD95 lies between MONAI's two directed values.
    lo, hi = sorted((np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    assert lo - 1e-6 <= hd95(pred, gt, spacing) <= hi + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_asd = metrics.compute_average_surface_distance(
            t(pred), t(gt), include_background=True, symmetric=True, spacing=spacing
        ).item()
    assert asd(pred, gt, spacing) == pytest.approx(monai_asd, rel=1e-5)


def test_boundary_band_is_the_labelled_pixels_near_a_class_change():
    from frugalseg.surface_metrics import boundary_band

    t = np.zeros((9, 9), np.uint8)
    t[:, 5:] = 1
    t[0, 0] = 255
    band = boundary_band(t, 1)
    # the edge pixels are columns 4 and 5; one pixel more on each side: columns 3-6
    assert band[4].tolist() == [False, False, False, True, True, True, True, False, False]
    assert not band[0, 0] and band[1, 0] and not band[3, 0]  # void never in the band; its neighbours are edges
    assert boundary_band(t, 0)[4].tolist() == [False] * 4 + [True, True] + [False] * 3
    assert not boundary_band(np.ones((4, 4, 4), np.uint8), 2).any()  # 3D, one class: no boundary
    with pytest.raises(ValueError, match="width"):
        boundary_band(t, -1)
