"""The simulated-oracle loop on real EM sections: partial masks, rounds, AULC, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from frugalseg.active.loop import (
    LoopSettings,
    RegionPool,
    aulc,
    balanced_class_weights,
    fit_partial,
    run_loop,
    same_settings,
)
from frugalseg.errors import ConfigError, DataError
from tests.conftest import data_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _pool():
    root = data_path("isbi2012") / "train"
    images, truths = [], []
    for k in range(4):
        im = np.asarray(Image.open(root / "image" / f"{k}.png").convert("L"), np.float32)[:96, :96] / 255
        lab = np.asarray(Image.open(root / "label" / f"{k}.png").convert("L"))[:96, :96]
        images.append(im)
        truths.append(np.where(lab == 0, 1, 0).astype(np.int64))  # membrane = 1
    return RegionPool.build(images[:3], truths[:3], n_segments=30), images[3:], truths[3:]


def _net():
    from frugalseg.models.medical import unet2d

    return unet2d(1, 2, (4, 8, 16), dropout=0.1)


def test_partial_masks_and_counts():
    pool, _, _ = _pool()
    labelled = pool.empty()
    assert pool.annotated(labelled) == (0, 0)
    labelled[1][[0, 2]] = True
    masks = pool.partial_masks(labelled)
    inside = np.isin(pool.regions[1], [0, 2])
    assert (masks[1][inside] == pool.truths[1][inside]).all() and (masks[1][~inside] == 255).all()
    assert (masks[0] == 255).all()
    assert pool.annotated(labelled) == (int(inside.sum()), 2)
    with pytest.raises(DataError, match="nothing is annotated yet"):
        fit_partial(_net(), pool.images, pool.partial_masks(pool.empty()), 1, np.random.default_rng(0))


def test_balanced_class_weights_equalise_the_annotated_classes():
    masks = [np.array([[0, 0, 0, 1], [255, 255, 0, 0]]), np.full((2, 2), 255)]
    w = balanced_class_weights(masks, 3)
    # 5 background, 1 foreground, no class 2: each present class's pixels weigh the same in total
    assert w.tolist() == pytest.approx([6 / (2 * 5), 6 / (2 * 1), 1.0])
    assert float(w[0] * 5 + w[1] * 1) == pytest.approx(6)  # the annotated pixels' mean weight stays 1
    pool, _, _ = _pool()
    labelled = pool.empty()
    labelled[0][:3] = True
    masks = pool.partial_masks(labelled)
    assert len(np.unique(masks[0][masks[0] != 255])) == 2  # both classes annotated: the weights differ from 1
    losses = []
    for balanced in (False, True):  # the same network, batch and step; only the weights differ
        torch.manual_seed(0)
        losses.append(fit_partial(_net(), pool.images, masks, 1, np.random.default_rng(0), class_balanced=balanced))
    assert np.isfinite(losses[1]) and losses[1] != pytest.approx(losses[0], rel=1e-3)


def test_a_run_saved_before_a_settings_field_existed_still_matches():
    from dataclasses import asdict

    s = LoopSettings(strategy="entropy", rounds=3)
    saved = {k: v for k, v in asdict(s).items() if k != "class_balanced"}  # a record from before the field
    assert same_settings(saved, s)
    assert not same_settings(saved, LoopSettings(strategy="entropy", rounds=3, class_balanced=True))
    assert not same_settings({**saved, "rounds": 4}, s)


@pytest.mark.parametrize("strategy", ["geometry", "mc_dropout"])
def test_rounds_grow_the_annotation_and_resume(strategy, tmp_path):
    pool, test_x, test_y = _pool()
    s = LoopSettings(strategy=strategy, rounds=2, initial_regions=4, per_round=5, iterations_first=3,
                     iterations_per_round=2, batch_size=2, crop=32, mc_passes=2)
    res = run_loop(pool, test_x, test_y, s, _net, state_dir=tmp_path / "state")
    curve = res["curve"]
    assert [c["round"] for c in curve] == [0, 1, 2]
    assert [c["regions"] for c in curve] == [4, 9, 14]
    assert curve[0]["pixels"] < curve[1]["pixels"] < curve[2]["pixels"]
    assert all(0 <= c["dice"] <= 1 and 0 <= c["jaccard"] <= c["dice"] + 1e-9 for c in curve)
    assert res["aulc"] == pytest.approx(aulc([c["fraction"] for c in curve], [c["dice"] for c in curve]))
    again = run_loop(pool, test_x, test_y, s, _net, state_dir=tmp_path / "state")  # finished: read back
    assert again["curve"] == curve
    longer = LoopSettings(**{**s.__dict__, "rounds": 3})
    with pytest.raises(ConfigError, match="other settings"):
        run_loop(pool, test_x, test_y, longer, _net, state_dir=tmp_path / "state")


def test_aulc_by_hand_and_unknown_strategy():
    assert aulc([0, 1, 2], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="at least two points"):
        aulc([1], [0.5])
    pool, test_x, test_y = _pool()
    with pytest.raises(ConfigError, match="unknown strategy 'plane' for images"):
        run_loop(pool, test_x, test_y, LoopSettings(strategy="plane"), _net)


@pytest.mark.parametrize("strategy", ["plane", "top_supervoxels", "random_plane"])
def test_volume_rounds_reveal_at_least_the_voxel_budget(strategy):
    pool2d, _, _ = _pool()
    vol = np.stack([np.resize(im, (48, 48)) for im in pool2d.images] * 2)  # a 6×48×48 stack
    gt = np.stack([np.resize(t, (48, 48)) for t in pool2d.truths] * 2)
    pool = RegionPool.build([vol[:4]], [gt[:4]], n_segments=40, spacing=(2.0, 1.0, 1.0))
    s = LoopSettings(strategy=strategy, rounds=1, initial_regions=3, per_round=500, iterations_first=2,
                     iterations_per_round=2, batch_size=2, crop=32, plane_r=3.0, plane_radius=12.0,
                     plane_candidates=3, plane_grid=6)
    curve = run_loop(pool, [vol[4:]], [gt[4:]], s, _net)["curve"]
    assert curve[1]["pixels"] - curve[0]["pixels"] >= 500 or curve[1]["fraction"] == 1.0
    if strategy == "plane":
        c = curve[1]
        assert c["planes"] >= 1 and c["exact"] >= 1 and c["exhaustive"] == 3 * 36 * c["planes"]
