"""Semi-supervision on natural images: mean teacher, co-training and the supervised-only baseline with the
timm-backbone segmenters (ocr, fcn) on folder / VOC data, with crop/scale/flip and the student's colour jitter."""

from __future__ import annotations

import json

import pytest
import torch

from cli_run import run_main
from conftest import data_path
from frugalseg.data import open_split
from frugalseg.data.transforms import ColourJitter
from frugalseg.errors import ConfigError
from frugalseg.models import build_model
from frugalseg.semi.batches import SemiBatches
from frugalseg.semi.meanteacher import mean_teacher_loss
from frugalseg.semi.step import segment, supervised_loss, supervised_with_aux
from frugalseg.stages.semi import CoTrainConfig, DTCConfig, MeanTeacherConfig, network_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_colour_jitter_changes_colour_not_geometry_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 20, 30)
    jitter = ColourJitter(strength=0.4, hue=0.1, grayscale=0.0)
    a = jitter(x, torch.Generator().manual_seed(5))
    b = jitter(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert (a - x).abs().mean() > 0.01  # it does change the colours
    grey = ColourJitter(strength=0.0, hue=0.0, grayscale=1.0)(x, gen)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    one = ColourJitter(0.4)(torch.rand(1, 8, 8), gen)  # greyscale input: brightness and contrast only
    assert one.shape == (1, 8, 8)


def test_crop_batches_and_strong_view_on_voc_images():
    """Square crops of rescaled images (void padding in the masks), flips; `image_strong` jitters the unlabelled
    rows only, pixel-aligned with `image`; the same batch twice for the same (seed, epoch, b)."""
    ds = open_split(data_path("msrc21"), "train", limit=12)
    lab, unl = [0, 1, 2, 3], list(range(4, 12))
    batches = SemiBatches(ds, [lab], unl, labelled_batch_size=2, unlabelled_batch_size=3, steps=2, patch_size=96,
                          augment="crop", scale=(0.5, 1.0), jitter=0.4, seed=3)
    b = batches.batch(0)
    assert b["image"].shape == (5, 3, 96, 96) and b["image_strong"].shape == (5, 3, 96, 96)
    assert torch.equal(b["image_strong"][:2], b["image"][:2])
    assert not torch.equal(b["image_strong"][2:], b["image"][2:])
    assert (b["mask"][2:] == 255).all() and (b["mask"][:2] != 255).any()
    # scale <= 1 on 213-240 px images: some crop of a 0.5-scaled image needs padding, which is void
    again = batches.batch(0)
    assert all(torch.equal(b[k], again[k]) for k in ("image", "mask", "image_strong"))
    with pytest.raises(ConfigError, match="square 2D patches"):
        SemiBatches(ds, [lab], unl, labelled_batch_size=1, unlabelled_batch_size=1, steps=1, patch_size=[64, 96],
                    augment="crop")


def test_aux_head_adds_its_weighted_loss():
    torch.manual_seed(0)
    model = build_model({"arch": "fcn", "num_classes": 3, "in_chans": 3, "backbone": "tf_efficientnet_lite0"})
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    main, aux = segment(model, x, aux=True)
    assert main.shape == aux.shape == (2, 3, 64, 64)
    total = supervised_with_aux(main, aux, y, "ce", 0.4)
    assert total.item() == pytest.approx((supervised_loss(main, y, "ce") + 0.4 * supervised_loss(aux, y, "ce")).item())
    assert segment(model, x, aux=False)[1] is None


def test_mean_teacher_student_sees_its_own_view():
    """The consistency compares the student on the strong view with the teacher on the plain one."""
    torch.manual_seed(0)
    net = build_model({"arch": "unet2d", "num_classes": 2, "in_chans": 3, "channels": [4, 8]})
    x_lab, y = torch.rand(1, 3, 32, 32), torch.randint(0, 2, (1, 32, 32))
    x_unl = torch.rand(2, 3, 32, 32)
    same = mean_teacher_loss(net, net, x_lab, y, x_unl, weight=1.0, teacher_noise=0.0)
    other = mean_teacher_loss(net, net, x_lab, y, x_unl, weight=1.0, teacher_noise=0.0,
                              x_unl_student=(x_unl * 0.5).clamp(0, 1))
    assert same["consistency"].item() < 1e-10 < other["consistency"].item()


def test_config_resolves_natural_image_defaults_and_spec():
    cfg = MeanTeacherConfig(data="x", labelled_fraction=0.1, arch="ocr").resolved(2)
    assert (cfg.augment, cfg.loss, cfg.jitter, cfg.inference_size) == ("crop", "ce", 0.4, None)
    co = CoTrainConfig(data="x", labelled_fraction=0.1, arch="fcn").resolved(2)
    assert co.jitter is None and co.augment == "crop"
    unet = MeanTeacherConfig(data="x", labelled_fraction=0.1).resolved(2)
    assert (unet.augment, unet.loss, unet.jitter, unet.inference_size) == ("ssl4mis", "dice_ce", None, [256, 256])
    with pytest.raises(ConfigError, match="does not use it"):
        CoTrainConfig(data="x", labelled_fraction=0.1, arch="ocr", jitter=0.3).resolved(2)
    with pytest.raises(ConfigError, match="3D data has no colour view"):
        MeanTeacherConfig(data="x", labelled_fraction=0.1, jitter=0.3).resolved(3)
    with pytest.raises(ConfigError, match="jitter"):
        MeanTeacherConfig(data="x", labelled_fraction=0.1, jitter=1.5)
    from frugalseg.data.labels import LabelSpec

    spec = network_spec(cfg, LabelSpec(names=("background", "cow")), 3)
    assert spec["arch"] == "ocr" and spec["backbone"] == "tf_efficientnet_lite0" and "input_size" not in spec
    with pytest.raises(ConfigError, match="segments 2D images"):
        MeanTeacherConfig(data="x", labelled_fraction=0.1, arch="ocr").resolved(3)
    with pytest.raises(ConfigError, match="not a choice of --semi dtc"):
        DTCConfig(data="x", labelled_fraction=0.1, arch="ocr").validate()


@pytest.mark.parametrize("semi", ["meanteacher", "cotrain"])
def test_cli_semi_with_ocr_on_msrc_objects(tmp_path, monkeypatch, semi):
    """The issue's command, tiny: a pretrained OCR segmenter, masks for a few images and nothing for the
    rest; the run is scored by val mIoU on whole images and reports its learning curve."""
    data_path("msrc21")
    out = tmp_path / semi
    code, stdout, err = run_main(
        ["train", "--semi", semi, "--data", "msrc-objects", "--arch", "ocr", "--labelled-fraction", "0.1",
         "--out", str(out), "--iterations", "2", "--epoch-steps", "1", "--labelled-batch-size", "1",
         "--unlabelled-batch-size", "1", "--patch-size", "64", "--val-limit", "2", "--val-every", "1",
         "--unlabelled-limit", "4", "--no-progress"], monkeypatch)
    assert code == 0, err
    assert "val mIoU" in stdout and "val mean Dice" not in stdout
    metrics = json.loads((out / "metrics" / "val.json").read_text())
    assert metrics["model"]["arch"] == "ocr" and metrics["samples"] == 2 and 0 <= metrics["miou"] <= 1
    assert (out / "report.html").exists() and "val/miou" in (out / "logs" / "metrics.csv").read_text()
    assert any((out / "predictions" / "val").iterdir())


def test_cli_dtc_with_ocr_is_refused_clearly(tmp_path, monkeypatch):
    code, _, err = run_main(["train", "--semi", "dtc", "--data", "msrc-objects", "--arch", "ocr",
                             "--labelled-fraction", "0.1", "--out", str(tmp_path / "d")], monkeypatch)
    assert code == 2 and "not a choice of --semi dtc" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
