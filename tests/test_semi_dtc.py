"""Dual-task consistency: SDF targets, the task transform, the loss, ramps, networks, data, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import data_path
from frugalseg.errors import ConfigError
from frugalseg.semi.ramps import (DTC_CONSISTENCY, DTC_RAMPUP, SSL4MIS_CONSISTENCY, SSL4MIS_RAMPUP, consistency_weight,
                                  sigmoid_rampup)
from frugalseg.semi.sdf import compute_sdf, sdf_targets, signed_distance_map

pytest.importorskip("monai")


# ---- signed distance maps -----------------------------------------------------------------------
def _rect() -> np.ndarray:
    m = np.zeros((7, 8), dtype=bool)
    m[2:5, 2:6] = True  # 3 × 4 object: two interior pixels, ten boundary pixels
    return m


def test_sdf_2d_hand_made_values_and_signs():
    s = signed_distance_map(_rect())
    assert s.dtype == np.float32 and s.shape == (7, 8)
    # Interior (distance 2 to the background, the maximum): -2/2 = -1.
    assert s[3, 3] == -1.0 and s[3, 4] == -1.0
    # Inner boundary: exactly 0, and nothing else is 0.
    boundary = _rect().copy()
    boundary[3, 3:5] = False
    assert np.all(s[boundary] == 0.0)
    assert np.count_nonzero(s == 0) == 10
    # Outside: positive, distance to the object / max distance (corner: sqrt(8)).
    assert np.all(s[~_rect()] > 0)
    assert s[0, 0] == pytest.approx(1.0)
    assert s[1, 3] == pytest.approx(1 / math.sqrt(8), abs=1e-6)
    assert s[1, 1] == pytest.approx(math.sqrt(2) / math.sqrt(8), abs=1e-6)
    assert s.min() == -1.0 and s.max() == pytest.approx(1.0)


def test_sdf_empty_and_full_masks_give_zeros():
    assert np.array_equal(signed_distance_map(np.zeros((5, 6), bool)), np.zeros((5, 6), np.float32))
    assert np.array_equal(signed_distance_map(np.ones((5, 6), bool)), np.zeros((5, 6), np.float32))
    assert np.array_equal(signed_distance_map(np.ones((3, 4, 5), bool)), np.zeros((3, 4, 5), np.float32))


def test_sdf_3d_signs_boundary_and_range():
    from scipy.ndimage import distance_transform_edt

    m = np.zeros((9, 10, 11), dtype=bool)
    m[2:7, 3:8, 3:9] = True  # 5 × 5 × 6 box
    s = signed_distance_map(m)
    assert s.min() == -1.0 and s.max() == pytest.approx(1.0)
    assert s[4, 5, 5] == -1.0  # the centre is the deepest point (distance 3)
    assert np.all(s[~m] > 0)
    # zero exactly on the inner boundary = object voxels with a face-neighbour in the background
    assert np.array_equal(s == 0, distance_transform_edt(m) == 1)
    assert np.all(s[m & (distance_transform_edt(m) > 1)] < 0)


def test_compute_sdf_one_channel_per_foreground_class():
    labels = np.zeros((2, 12, 12), dtype=np.uint8)
    labels[0, 2:6, 2:6] = 1
    labels[0, 6:10, 6:11] = 3
    labels[0, 0, :] = 255  # void: outside every class
    labels[1, 3:9, 3:9] = 2
    maps = compute_sdf(labels, num_classes=4)
    assert maps.shape == (2, 3, 12, 12) and maps.dtype == np.float32
    for b in range(2):
        for c in range(1, 4):
            np.testing.assert_array_equal(maps[b, c - 1], signed_distance_map(labels[b] == c))
    assert np.all(maps[0, 1] == 0) and np.all(maps[1, 0] == 0)  # absent classes
    assert np.all(maps[0, :, 0, :][[0, 2]] > 0)  # void row is outside
    binary = compute_sdf((labels[:1] == 1).astype(np.uint8), num_classes=2)
    assert binary.shape == (1, 1, 12, 12)
    t = sdf_targets(torch.from_numpy(labels.astype(np.int64)), 4)
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(maps))
    with pytest.raises(ValueError, match="at least 2 classes"):
        compute_sdf(labels, 1)


def test_transform_recovers_mask_with_finite_gradients_near_boundary():
    from frugalseg.semi.dtc import K_TRANSFORM, sdf_to_mask

    yy, xx = np.mgrid[:32, :32]
    mask = (yy - 16) ** 2 + (xx - 15) ** 2 <= 8**2
    s = torch.from_numpy(signed_distance_map(mask)).requires_grad_(True)
    t = sdf_to_mask(s)
    on_boundary = torch.from_numpy(signed_distance_map(mask) == 0) & torch.from_numpy(mask)
    target = torch.from_numpy(mask).float()
    assert torch.all(t[on_boundary] == 0.5)  # sigmoid(0) on the zero level set
    assert torch.max((t - target).abs()[~on_boundary]) < 1e-3
    t.sum().backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad[on_boundary], torch.full_like(s.grad[on_boundary], -K_TRANSFORM / 4))
    # Predicted level sets are near 0 around the contour: the gradient is alive there.
    near = torch.tensor([-2e-3, -5e-4, 0.0, 5e-4, 2e-3], requires_grad=True)
    sdf_to_mask(near).sum().backward()
    assert torch.all(near.grad < 0) and torch.isfinite(near.grad).all()


# ---- ramps ----------------------------------------------------------------------------------------
def test_ramp_values():
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 40) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(40, 40) == 1.0 and sigmoid_rampup(400, 40) == 1.0
    assert sigmoid_rampup(-3, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(7, 0) == 1.0
    # DTC: weight 1.0, ramp 40 "epochs" of 150 iterations (6000 iterations, its whole run).
    assert (DTC_CONSISTENCY, DTC_RAMPUP, SSL4MIS_CONSISTENCY, SSL4MIS_RAMPUP) == (1.0, 40.0, 0.1, 200.0)
    assert consistency_weight(0) == pytest.approx(math.exp(-5))
    assert consistency_weight(149) == consistency_weight(0)
    assert consistency_weight(3000) == pytest.approx(math.exp(-1.25))
    assert consistency_weight(5999) == pytest.approx(math.exp(-5 * (1 / 40) ** 2))
    assert consistency_weight(6000) == 1.0
    assert consistency_weight(15000, SSL4MIS_CONSISTENCY, SSL4MIS_RAMPUP) == pytest.approx(0.1 * math.exp(-1.25))


# ---- the loss -------------------------------------------------------------------------------------
def test_dtc_loss_zero_consistency_when_heads_agree():
    from frugalseg.semi.dtc import K_TRANSFORM, dtc_loss

    torch.manual_seed(0)
    # Binary: foreground logit -k·sdf against background 0 gives softmax[1] = sigmoid(-k·sdf).
    sdf = (torch.rand(2, 1, 6, 7) - 0.5) * 4e-3
    logits = torch.cat([torch.zeros_like(sdf), -K_TRANSFORM * sdf], 1)
    labels = torch.randint(0, 2, (2, 6, 7))
    terms = dtc_loss(logits, sdf, labels, step=3000)
    assert float(terms["loss_consistency"]) < 1e-12
    assert float(terms["consistency_weight"]) == pytest.approx(math.exp(-1.25))
    expected = terms["loss_seg"] + 0.3 * terms["loss_sdf"] + terms["consistency_weight"] * terms["loss_consistency"]
    torch.testing.assert_close(terms["loss"], expected)
    # Multi-class (K = 3): saturated level sets matching confident one-hot logits.
    region = torch.zeros(1, 8, 8, dtype=torch.long)
    region[:, :, 3:6], region[:, :, 6:] = 1, 2
    onehot = torch.nn.functional.one_hot(region, 3).movedim(-1, 1).float()
    logits3 = onehot * 60.0
    sdf3 = torch.where(onehot[:, 1:] > 0, -0.5, 0.5)
    assert float(dtc_loss(logits3, sdf3, region)["loss_consistency"]) < 1e-12
    # ... and a disagreement is measured: flip one class's level set.
    assert float(dtc_loss(logits3, -sdf3, region)["loss_consistency"]) > 0.3


def test_dtc_loss_unlabelled_images_only_feed_the_consistency_term():
    from frugalseg.semi.dtc import dtc_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 3, 10, 9, requires_grad=True)
    raw_sdf = torch.randn(4, 2, 10, 9, requires_grad=True)
    labels = torch.randint(0, 3, (4, 10, 9))
    labels[2:] = 255  # samples 2 and 3 are unlabelled
    labelled = torch.tensor([True, True, False, False])
    terms = dtc_loss(logits, torch.tanh(raw_sdf), labels, labelled, step=6000)
    g_logits, g_sdf = torch.autograd.grad(terms["loss_seg"] + terms["loss_sdf"], (logits, raw_sdf), retain_graph=True)
    assert torch.all(g_logits[2:] == 0) and torch.all(g_sdf[2:] == 0)
    assert g_logits[:2].abs().sum() > 0 and g_sdf[:2].abs().sum() > 0
    c_logits, c_sdf = torch.autograd.grad(terms["loss_consistency"], (logits, raw_sdf), retain_graph=True)
    assert c_logits[2:].abs().sum() > 0 and c_sdf[2:].abs().sum() > 0
    t_logits, _ = torch.autograd.grad(terms["loss"], (logits, raw_sdf))
    torch.testing.assert_close(t_logits[2:], c_logits[2:] * float(terms["consistency_weight"]))
    # Without the flag, void-only samples count as unlabelled; given targets equal computed ones.
    inferred = dtc_loss(logits, torch.tanh(raw_sdf), labels, None, step=6000,
                        sdf_target=sdf_targets(labels.clamp(max=2) * (labels != 255), 3))
    torch.testing.assert_close(inferred["loss"], terms["loss"])
    with pytest.raises(ValueError, match="one map per foreground class"):
        dtc_loss(logits, raw_sdf[:, :1], labels)


# ---- networks -------------------------------------------------------------------------------------
def test_levelset_networks_heads_and_gradients():
    from frugalseg.models.levelset import build_levelset, levelset_unet2d, levelset_vnet3d
    from frugalseg.semi.dtc import dtc_loss

    torch.manual_seed(0)
    net = levelset_unet2d(1, 4, channels=(8, 16, 32))
    seg, sdf = net(torch.randn(2, 1, 30, 27))
    assert seg.shape == (2, 4, 30, 27) and sdf.shape == (2, 3, 30, 27)
    assert sdf.abs().max() <= 1
    spec = {"arch": "levelset_unet3d", "num_classes": 2, "in_chans": 1, "channels": [4, 8]}
    seg3, sdf3 = build_levelset(spec)(torch.randn(1, 1, 9, 10, 11))
    assert seg3.shape == (1, 2, 9, 10, 11) and sdf3.shape == (1, 1, 9, 10, 11)
    with pytest.raises(ConfigError, match="Unknown level-set"):
        build_levelset({"arch": "levelset_x", "num_classes": 2})
    # The reference's network family: both heads read the V-Net decoder and train through DTC's loss.
    vnet = levelset_vnet3d(1, 2, dropout=0.5)
    x = torch.randn(2, 1, 16, 16, 16)
    labels = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    labels[0, 4:12, 5:11, 4:12] = 1
    labels[1] = 255
    seg, sdf = vnet(x)
    terms = dtc_loss(seg, sdf, labels, torch.tensor([True, False]), step=0)
    terms["loss"].backward()
    for head in (vnet.seg_head, vnet.sdf_head):
        assert head.weight.grad.abs().sum() > 0
    assert vnet.features.net.in_tr.conv_block.conv.weight.grad.abs().sum() > 0


# ---- data (the shared semi batches, with DTC's SDF targets) --------------------------------------------
def test_labelled_choice_and_mixed_batches_on_acdc():
    from frugalseg.data.hdf5 import load_hdf5, patient_of
    from frugalseg.semi.batches import SemiBatches, select_labelled

    ds = load_hdf5(data_path("acdc"), "train")
    ids = select_labelled(ds, patients=1)
    assert {patient_of(i) for i in ids} == {patient_of(ds[0].id)}
    drawn = select_labelled(ds, fraction=0.1, seed=3)
    assert drawn == select_labelled(ds, fraction=0.1, seed=3) and len({patient_of(i) for i in drawn}) == 5
    with pytest.raises(ConfigError, match="exactly one"):
        select_labelled(ds, patients=1, fraction=0.1)
    small = ds.with_samples(ds.samples[:40])
    lab = [i for i, s in enumerate(small.samples) if s.id in set(ids)]
    unl = [i for i, s in enumerate(small.samples) if s.id not in set(ids)]
    batches = SemiBatches(small, [lab], unl, patch_size=(48, 40), sdf_classes=4, labelled_batch_size=2,
                          unlabelled_batch_size=3, steps=8, seed=1)
    b = batches.batch(5)
    assert b["image"].shape == (5, 1, 48, 40) and b["mask"].shape == (5, 48, 40) and b["sdf"].shape == (5, 3, 48, 40)
    assert b["labelled"].tolist() == [True, True, False, False, False]
    assert torch.all(b["mask"][2:] == 255) and torch.all(b["sdf"][2:] == 0)
    assert int(b["mask"][:2].max()) <= 3
    torch.testing.assert_close(b["sdf"][:2], sdf_targets(b["mask"][:2], 4))
    assert all(int(i) in lab for i in b["index"][:2]) and all(int(i) in unl for i in b["index"][2:])
    again = batches.batch(5)
    assert torch.equal(again["image"], b["image"]) and torch.equal(again["mask"], b["mask"])
    assert not torch.equal(batches.batch(6)["image"], b["image"])
    batches.set_epoch(2)
    assert batches.global_index(3) == 19 and not torch.equal(batches.batch(5)["image"], b["image"])


def test_3d_patches_crops_and_sdf_on_la():
    from frugalseg.data.hdf5 import load_hdf5
    from frugalseg.semi.batches import SemiBatches

    ds = load_hdf5(data_path("la2018"), "train")
    kw = dict(labelled_batch_size=1, unlabelled_batch_size=1, steps=2, patch_size=[40, 36, 24], sdf_classes=2, seed=0)
    b = SemiBatches(ds, [[0, 1]], [2, 3], **kw).batch(0)
    assert b["image"].shape == (2, 1, 40, 36, 24) and b["mask"].shape == (2, 40, 36, 24)
    assert b["sdf"].shape == (2, 1, 40, 36, 24) and torch.all(b["sdf"][1] == 0) and torch.all(b["mask"][1] == 255)
    torch.testing.assert_close(b["sdf"][:1], sdf_targets(b["mask"][:1], 2))
    # no augmentation: the centre crop of the volume, as the reference's CenterCrop
    plain = SemiBatches(ds, [[0]], [2], **{**kw, "augment": "none"}).batch(0)
    image, mask = ds.read_pair(ds[0])
    d, h, w = image.shape
    box = (slice((d - 40) // 2, (d - 40) // 2 + 40), slice((h - 36) // 2, (h - 36) // 2 + 36),
           slice((w - 24) // 2, (w - 24) // 2 + 24))
    assert torch.equal(plain["image"][0, 0], torch.from_numpy(image[box]))
    assert torch.equal(plain["mask"][0], torch.from_numpy(mask[box].astype(np.int64)))
    # a patch larger than the volume is zero-padded
    big = SemiBatches(ds, [[0]], [2], **{**kw, "patch_size": [32, 32, 96]}).batch(0)
    assert big["image"].shape[-1] == 96 and bool((big["image"][0, 0, :, :, :4] == 0).all())


def _finite(losses: dict) -> bool:
    return set(losses) >= {"loss", "loss_seg", "loss_sdf", "loss_consistency"} and all(
        math.isfinite(v) for v in losses.values())


def test_train_dtc_acdc_2d_three_iterations(tmp_path):
    from frugalseg.export import load_export
    from frugalseg.stages.semi import DTCConfig, train_semi

    data_path("acdc")
    cfg = DTCConfig(data="acdc", out=str(tmp_path / "run"), labelled_patients=1, iterations=3, labelled_batch_size=2,
                    unlabelled_batch_size=2, patch_size=[64, 64], channels=[8, 16, 32], val_limit=1, progress=False)
    result = train_semi(cfg)
    assert _finite(result["losses"])
    # 2D: SSL4MIS's weight 0.1, its ramp scaled to the 3-iteration run (3 units of 1): λ at the last step (2)
    assert result["losses"]["consistency_weight"] == pytest.approx(0.1 * math.exp(-5 * (1 - 2 / 3) ** 2))
    val = result["val"]
    assert val["samples"] == 1 and set(val["surface"]) == {"RV", "Myo", "LV"}
    assert val["surface_units"] == "voxel" and val["kind"] == "volume"
    assert val["case_mean_dice"] == pytest.approx(sum(val["per_case"][0]["dice"].values()) / 3)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "metrics" / "val.json").exists()
    model, spec, labels = load_export(run / "model")
    assert spec["arch"] == "levelset_unet2d" and labels.num_classes == 4
    seg, sdf = model(torch.zeros(1, 1, 64, 64))  # the dual-head network loads like any export
    assert seg.shape == (1, 4, 64, 64) and sdf.shape == (1, 3, 64, 64)
    assert "dims: 2" in (run / "config.yaml").read_text()


def test_train_dtc_la_3d_tiny_patch(tmp_path):
    from frugalseg.stages.semi import DTCConfig, train_semi

    data_path("la2018")
    cfg = DTCConfig(data="la2018", out=str(tmp_path / "run"), labelled_patients=2, iterations=2, labelled_batch_size=1,
                    unlabelled_batch_size=1, patch_size=[32, 32, 16], arch="unet", channels=[4, 8], val_split=None,
                    progress=False)
    result = train_semi(cfg)
    assert _finite(result["losses"])
    # 3D: DTC's weight 1.0, its ramp scaled to the 2-iteration run (2 units of 1): λ at the last step (1)
    assert result["losses"]["consistency_weight"] == pytest.approx(math.exp(-5 * 0.5 ** 2))
    assert "val" not in result


class _Oracle(nn.Module):
    """Reads the class map from its input: segmentation logits 20·one-hot, level sets to match."""

    def forward(self, x):
        ids = x[:, 0].round().long().clamp(0, 1)
        logits = torch.nn.functional.one_hot(ids, 2).movedim(-1, 1).float() * 20
        return logits, torch.tanh(-logits[:, 1:])


def test_evaluate_dtc_sliding_window_and_largest_component(tmp_path):
    import h5py

    from frugalseg.data.hdf5 import load_hdf5
    from frugalseg.evaluation import evaluate

    label = np.zeros((20, 18, 12), dtype=np.uint8)
    label[4:14, 5:13, 3:9] = 1
    image = label.astype(np.float32)
    image[17:19, 1:3, 1:3] = 1.0  # a speck the oracle also segments: removed by largest-component
    for case in ("a", "b"):
        (tmp_path / case).mkdir()
        with h5py.File(tmp_path / case / "mri_norm2.h5", "w") as f:
            f["image"], f["label"] = image, label
    (tmp_path / "train.list").write_text("a\n")
    (tmp_path / "test.list").write_text("a\nb\n")
    ds = load_hdf5(tmp_path, "test")
    common = dict(dims=3, size=(8, 8, 8), overlap=0.25, progress=False)
    plain = evaluate(_Oracle(), ds, ds.labels, **common, max_cases=1)
    assert plain["samples"] == 1
    assert plain["surface"]["class_1"]["dice"] < 1
    lcc = evaluate(_Oracle(), ds, ds.labels, **common, largest_component=True)
    assert lcc["samples"] == 2
    assert lcc["surface"]["class_1"]["dice"] == 1.0 and lcc["surface"]["class_1"]["hd95"] == 0.0
    assert lcc["per_case"][0]["empty_pred"]["class_1"] is False


def test_config_checks_and_epoch_alignment():
    from frugalseg.stages.semi import DTCConfig

    with pytest.raises(ConfigError, match="exactly one of labelled_patients"):
        DTCConfig(data="acdc").validate()
    cfg = DTCConfig(data="la2018", labelled_patients=16).resolved(3)
    assert (cfg.arch, cfg.patch_size, cfg.iterations, cfg.labelled_batch_size, cfg.consistency,
            cfg.consistency_rampup) == ("vnet", [112, 112, 80], 6000, 2, 1.0, 40.0)
    assert cfg.epoch_length == 150 and cfg.lr_schedule == "step" and cfg.dropout == 0.5
    acdc = DTCConfig(data="acdc", labelled_patients=7).resolved(2)
    assert (acdc.arch, acdc.patch_size, acdc.iterations, acdc.labelled_batch_size, acdc.consistency) == \
        ("unet", [256, 256], 30000, 12, 0.1)
    assert DTCConfig(data="acdc", labelled_patients=7, patch_size=[128]).resolved(2).patch_size == [128, 128]
    # Runs end on an epoch boundary (where last.ckpt is written): epochs shrink to divide the iterations.
    assert DTCConfig(iterations=1000, epoch_steps=150).epoch_length == 125
    assert DTCConfig(iterations=3, epoch_steps=150).epoch_length == 3
    with pytest.raises(ConfigError, match="V-Net is 3D"):
        DTCConfig(data="acdc", labelled_patients=1, arch="vnet").resolved(2)
    with pytest.raises(ConfigError, match="must give 1 or 3 sizes"):
        DTCConfig(data="la2018", labelled_patients=1, patch_size=[64, 64]).resolved(3)


def test_train_dtc_resume_continues_with_the_next_batches(tmp_path, monkeypatch):
    from frugalseg.semi.batches import SemiBatches
    from frugalseg.stages.semi import DTCConfig, train_semi

    data_path("acdc")
    drawn: list[int] = []
    original = SemiBatches.batch
    monkeypatch.setattr(SemiBatches, "batch",
                        lambda self, b, rank=0: drawn.append(self.global_index(b)) or original(self, b, rank))
    common = dict(data="acdc", out=str(tmp_path / "run"), labelled_patients=1, labelled_batch_size=1,
                  unlabelled_batch_size=1, epoch_steps=2, patch_size=[32, 32], channels=[4, 8], val_split=None,
                  progress=False)
    train_semi(DTCConfig(iterations=2, **common))
    assert drawn == [0, 1]
    drawn.clear()
    again = train_semi(DTCConfig(iterations=4, resume=True, **common))
    assert drawn == [2, 3]  # the resumed run draws the batches the uninterrupted run would have
    assert _finite(again["losses"])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def _reference_sdf(mask: np.ndarray) -> np.ndarray:
    """DTC's compute_sdf for one mask, as the reference writes it (float64, skimage's inner boundary)."""
    from scipy.ndimage import distance_transform_edt
    from skimage.segmentation import find_boundaries

    pos = mask.astype(bool)
    posdis, negdis = distance_transform_edt(pos), distance_transform_edt(~pos)
    sdf = (negdis - negdis.min()) / (negdis.max() - negdis.min()) - (posdis - posdis.min()) / (posdis.max() - posdis.min())
    sdf[find_boundaries(pos.astype(np.uint8), mode="inner")] = 0
    return sdf


def test_fast_sdf_equals_the_reference_formula_on_random_and_acdc_masks():
    """The speed-up (boundary from the distance map, float32 normalisation) keeps DTC's targets: the same zero
    set exactly and values within float32 rounding, on random blobs (2D and 3D, touching the borders) and on
    real ACDC labels."""
    import h5py
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    masks = [gaussian_filter(rng.random(shape), 2) > 0.5 for shape in [(40, 37)] * 6 + [(12, 14, 10)] * 3]
    for f in sorted((data_path("acdc") / "data" / "slices").glob("*.h5"))[:6]:
        with h5py.File(f) as h:
            label = h["label"][:]
        masks += [label == c for c in (1, 2, 3)]
    for m in masks:
        if not m.any() or m.all():
            continue
        fast, ref = signed_distance_map(m), _reference_sdf(m)
        assert fast.dtype == np.float32
        assert np.array_equal(fast == 0, ref == 0)
        np.testing.assert_allclose(fast, ref, atol=1e-6, rtol=0)
