"""The supervised-only baseline and the data module every semi-supervised method shares."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml

from conftest import data_path
from frugalseg.errors import ConfigError, DataError

pytest.importorskip("monai")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_baseline_batches_are_the_labelled_blocks_of_the_semi_batches():
    """Same seed, same labelled stream: the baseline sees exactly the labelled patches the methods see."""
    from frugalseg.data.hdf5 import load_hdf5
    from frugalseg.semi.batches import SemiBatches

    ds = load_hdf5(data_path("acdc"), "train")
    kw = dict(labelled_batch_size=2, steps=3, patch_size=32, seed=5)
    semi = SemiBatches(ds, [[0, 1, 2, 3]], [50, 51, 52], unlabelled_batch_size=2, **kw)
    alone = SemiBatches(ds, [[0, 1, 2, 3]], [], unlabelled_batch_size=0, **kw)
    for b in range(3):
        full, lab = semi.batch(b), alone.batch(b)
        assert lab["labelled"].all() and lab["image"].shape[0] == 2
        assert torch.equal(full["image"][:2], lab["image"]) and torch.equal(full["mask"][:2], lab["mask"])
    with pytest.raises(DataError, match="no unlabelled sample"):
        SemiBatches(ds, [[0]], [], unlabelled_batch_size=1, **kw)
    with pytest.raises(DataError, match="both labelled and unlabelled"):
        SemiBatches(ds, [[0, 1]], [1, 2], unlabelled_batch_size=1, **kw)


def test_open_semi_data_budget_validation_split_and_errors():
    from frugalseg.stages.semi import DTCConfig, SupervisedOnlyConfig, open_semi_data

    data_path("la2018")
    data = open_semi_data(DTCConfig(data="la2018", labelled_patients=2, val_limit=1).validate())
    assert data.cfg.dims == 3 and data.cfg.patch_size == [112, 112, 80] and data.cfg.val_split == "test"
    assert len(data.labelled) == 2 and len(data.unlabelled) == 6 and len(data.val) == 1
    assert [s.supervision for s in data.train.samples] == ["mask"] * 2 + ["none"] * 6
    everything = SupervisedOnlyConfig(data="la2018", labelled_fraction=1.0)
    assert open_semi_data(everything, require_unlabelled=False).unlabelled == []  # the fully supervised bound
    with pytest.raises(DataError, match="nothing is left unlabelled"):
        open_semi_data(DTCConfig(data="la2018", labelled_fraction=1.0))
    with pytest.raises(ConfigError, match=r"labelled_fraction=0.05 of the 8 patients of la2018:train selects no"):
        open_semi_data(DTCConfig(data="la2018", labelled_fraction=0.05))
    with pytest.raises(DataError, match="asked for 9 labelled patients but the list has only 8"):
        open_semi_data(DTCConfig(data="la2018", labelled_patients=9))
    with pytest.raises(ConfigError, match="holds 3D samples but dims=2"):
        open_semi_data(DTCConfig(data="la2018", labelled_patients=2, dims=2))
    # the baseline takes the methods' command line as is: labelled batches only
    assert SupervisedOnlyConfig(data="la2018", labelled_patients=2, unlabelled_batch_size=2).resolved(3) \
        .unlabelled_batch_size == 0


def test_supervised_only_acdc_2d_run(tmp_path):
    from frugalseg.export import load_export
    from frugalseg.stages.semi import SupervisedOnlyConfig, train_semi

    data_path("acdc")
    out = tmp_path / "sup"
    res = train_semi(SupervisedOnlyConfig(
        data="acdc", out=str(out), labelled_patients=1, patch_size=[32], channels=[4, 8], labelled_batch_size=2,
        iterations=40, epoch_steps=10, val_limit=1, val_every=0, progress=False))
    assert res["method"] == "none" and res["iterations"] == 40 and res["unlabelled"] == 0 and res["streams"] == [res["labelled"]]
    assert math.isfinite(res["losses"]["loss"]) and set(res["losses"]) == {"loss"}
    # it learns: the epoch-mean loss halves over 4 epochs of 10 iterations (measured 1.16 → 0.56, about 2 s)
    with open(out / "logs" / "metrics.csv", newline="") as f:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    val = res["val"]
    assert val["kind"] == "volume" and val["samples"] == 1 and set(val["surface"]) == {"RV", "Myo", "LV"}
    assert all(k in val for k in ("case_mean_dice", "case_mean_jaccard", "case_mean_hd95", "case_mean_asd"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["semi"] == "none" and saved["unlabelled_batch_size"] == 0 and saved["patch_size"] == [32, 32]
    budget = json.loads((out / "budget.json").read_text())
    assert budget["method"] == "none" and budget["unlabelled"] == [] and len(budget["labelled"]) == res["labelled"]
    model, spec, labels = load_export(out / "model")
    assert spec["arch"] == "unet2d" and spec["channels"] == [4, 8] and spec["input_size"] == 32
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["frugalseg"]["kind"] == "supervised" and ckpt["global_step"] == 40


def test_supervised_only_la_3d_run_with_dtc_network(tmp_path):
    from frugalseg.export import load_export
    from frugalseg.stages.semi import SupervisedOnlyConfig, train_semi

    data_path("la2018")
    out = tmp_path / "sup3d"
    res = train_semi(SupervisedOnlyConfig(
        data="la2018", out=str(out), labelled_patients=2, network="levelset", arch="unet", channels=[4, 8],
        patch_size=[32, 32, 16], labelled_batch_size=1, iterations=2, val_limit=1, val_every=0, progress=False))
    val = res["val"]
    assert val["split"] == "test" and val["kind"] == "volume" and val["samples"] == 1
    assert set(val["surface"]) == {"left_atrium"} and val["surface_units"] == "voxel"
    lj = val["surface"]["left_atrium"]
    assert lj["jaccard"] == pytest.approx(val["per_case"][0]["dice"]["left_atrium"] /
                                          (2 - val["per_case"][0]["dice"]["left_atrium"]))
    model, spec, _ = load_export(out / "model")  # the dual-head network loads like any export
    assert spec["arch"] == "levelset_unet3d" and spec["patch_size"] == [32, 32, 16]
    seg, sdf = model(torch.zeros(1, 1, 32, 32, 16))
    assert seg.shape == (1, 2, 32, 32, 16) and sdf.shape == (1, 1, 32, 32, 16)


@pytest.mark.parametrize("semi", ["dtc", "meanteacher", "cotrain"])
def test_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, semi):
    """Exact resume (the one Lightning module every method's step runs in): optimiser, EMA teacher, the batches
    and the per-step noise / adversarial seeds continue where they stopped. The learning rate is constant here
    (`step` schedule): a poly schedule depends on `iterations`, which the resumed run changes; so do the ramps
    and the step length left to `scale_schedule`, which are given here."""
    from safetensors.torch import load_file

    from frugalseg.stages.semi import SEMI_METHODS

    data_path("acdc")
    cls, train = SEMI_METHODS[semi]
    common = dict(data="acdc", labelled_patients=2, unlabelled_limit=4, patch_size=[32, 32], channels=[4, 8],
                  labelled_batch_size=1, unlabelled_batch_size=2, epoch_steps=2, lr_schedule="step", val_split=None,
                  progress=False, rampup_every=1, lr_step=1000)
    common.update({"cotrain": {"ramp_epochs": 4.0}, "none": {}}.get(semi, {"consistency_rampup": 4.0}))

    def weights(out):
        return {p.relative_to(out).as_posix(): load_file(str(p)) for p in sorted(out.rglob("*.safetensors"))}

    train(cls(out=str(tmp_path / "straight"), iterations=4, **common))
    train(cls(out=str(tmp_path / "resumed"), iterations=2, **common))
    train(cls(out=str(tmp_path / "resumed"), iterations=4, resume=True, **common))
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and len(straight) >= 1
    assert all(torch.equal(straight[f][k], resumed[f][k]) for f in straight for k in straight[f])
    # and the checkpoint's `model.*` is the exported network (co-training: member 0 of `models.*`)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    prefix, folder = ("models.0.", "models/members/0") if semi == "cotrain" else ("model.", "model")
    exported = straight[f"{folder}/model.safetensors"]
    assert all(torch.equal(ckpt["state_dict"][prefix + k], v) for k, v in exported.items())


def test_step_terms_are_logged_on_the_logger_steps_and_the_epoch_loss_once_an_epoch(tmp_path):
    """The training step logs only on the steps the CSV logger writes (every 10th): the file has a row of every
    term at steps 9 and 19, and the epoch's mean loss (summed in the module, without a host sync per step)."""
    import csv

    from frugalseg.stages.semi import MeanTeacherConfig, train_semi

    data_path("acdc")
    cfg = MeanTeacherConfig(data="acdc", out=str(tmp_path / "mt"), labelled_patients=1, unlabelled_limit=4,
                            patch_size=[32, 32], channels=[4, 8], labelled_batch_size=1, unlabelled_batch_size=1,
                            iterations=20, epoch_steps=20, val_split=None, progress=False)
    train_semi(cfg)
    rows = list(csv.DictReader((tmp_path / "mt" / "logs" / "metrics.csv").open()))
    step_rows = [r for r in rows if r.get("train/loss_step")]
    assert [int(r["step"]) for r in step_rows] == [9, 19]
    assert all(r["train/consistency"] and r["train/sup"] and r["train/w_consistency"] for r in step_rows)
    epoch = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch) == 1 and 0 < epoch[0] < 10
