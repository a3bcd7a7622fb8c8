"""Mean teacher: EMA math, consistency loss, noise, a tiny real run on ACDC slices."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from conftest import data_path
from frugalseg.errors import ConfigError
from frugalseg.semi.meanteacher import ema_decay_at, ema_update, input_noise, mean_teacher_loss
from frugalseg.stages.semi import MeanTeacherConfig, train_semi


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_decay_warmup():
    assert ema_decay_at(0) == 0.0  # the first update copies the student
    assert ema_decay_at(1) == 0.5
    assert ema_decay_at(9) == pytest.approx(0.9)
    assert ema_decay_at(99) == pytest.approx(0.99) and ema_decay_at(10_000) == 0.99
    assert ema_decay_at(10_000, 0.999) == pytest.approx(0.999)


def test_ema_update_math_on_a_tiny_model():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        student[0].weight.fill_(1.0)
        student[0].bias.fill_(-2.0)
        teacher[0].weight.fill_(3.0)
        teacher[0].bias.fill_(4.0)
        student[1].running_mean.fill_(5.0)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.99)
    assert torch.allclose(teacher[0].weight, torch.full((2, 3), 0.99 * 3.0 + 0.01 * 1.0))  # 2.98
    assert torch.allclose(teacher[0].bias, torch.full((2,), 0.99 * 4.0 + 0.01 * -2.0))  # 3.94
    assert torch.equal(teacher[1].running_mean, t0["1.running_mean"])  # buffers untouched (SSL4MIS)
    ema_update(teacher, student, 0.5)
    assert teacher[0].weight[0, 0].item() == pytest.approx(0.5 * 2.98 + 0.5 * 1.0)
    ema_update(teacher, student, ema_decay_at(0))  # decay 0: exact copy
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="differ at parameter"):
        ema_update(nn.Linear(3, 3), nn.Linear(3, 2), 0.9)


def test_input_noise_is_clipped_and_seeded():
    x = torch.zeros(2, 1, 50, 50)
    n = input_noise(x, 0.1, 0.2, torch.Generator().manual_seed(0))
    assert n.abs().max().item() <= 0.2 + 1e-7 and 0.08 < n.std().item() < 0.1  # clipping trims the tails
    assert torch.equal(n, input_noise(x, 0.1, 0.2, torch.Generator().manual_seed(0)))
    assert torch.equal(input_noise(x, 0.0, 0.2), torch.zeros_like(x))


def test_consistency_is_zero_when_teacher_equals_student_and_no_noise():
    torch.manual_seed(0)
    student = nn.Conv2d(1, 3, 3, padding=1)
    teacher = nn.Conv2d(1, 3, 3, padding=1)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    x_lab, x_unl = torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8)
    y = torch.randint(0, 3, (2, 8, 8))
    out = mean_teacher_loss(student, teacher, x_lab, y, x_unl, weight=0.1, teacher_noise=0.0)
    assert out["consistency"].item() == pytest.approx(0.0, abs=1e-12)
    noisy = mean_teacher_loss(student, teacher, x_lab, y, x_unl, weight=0.1, generator=torch.Generator().manual_seed(1))
    assert noisy["consistency"].item() > 0 and math.isfinite(noisy["loss"].item())
    # the loss is sup + weight · consistency, and only the student gets gradients
    assert noisy["loss"].item() == pytest.approx(noisy["sup"].item() + 0.1 * noisy["consistency"].item(), rel=1e-6)
    noisy["loss"].backward()
    assert student.weight.grad is not None and teacher.weight.grad is None


def test_labelled_fraction_selecting_nothing_is_a_clear_error(tmp_path):
    data_path("acdc")
    cfg = MeanTeacherConfig(data="acdc", out=str(tmp_path / "mt"), labelled_patients=None, labelled_fraction=0.005)
    with pytest.raises(ConfigError, match=r"labelled_fraction=0.005 of the 50 patients of acdc:train selects no"):
        train_semi(cfg)
    with pytest.raises(ConfigError, match="evaluate must be student or teacher"):
        MeanTeacherConfig(data="acdc", evaluate="ema").validate()


def test_three_iteration_mean_teacher_run_finishes_with_finite_losses(tmp_path):
    data_path("acdc")
    out = tmp_path / "mt"
    cfg = MeanTeacherConfig(
        data="acdc", out=str(out), labelled_patients=1, unlabelled_limit=6, patch_size=32,
        labelled_batch_size=2, unlabelled_batch_size=2, iterations=3, epoch_steps=2, consistency_rampup=0,
        val_limit=1, val_every=1, progress=False,
    )
    res = train_semi(cfg)
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)  # 3 epochs of 1 iteration
    assert any(r.get("val/dice_fg") for r in rows)  # in-training validation ran
    val = res["val"]
    assert val["kind"] == "volume" and val["samples"] == 1
    assert set(val["surface"]) == {"RV", "Myo", "LV"} and (out / "metrics" / "val.json").exists()
    # `frugalseg eval` on the run: the exported model/ (the student) gives the recorded figures again
    from frugalseg.stages.train import evaluate_run

    again = evaluate_run(out, split="val", write_predictions=False, report=False)
    assert again["method"] == "meanteacher" and again["per_case"] == val["per_case"]
    assert again["case_mean_dice"] == val["case_mean_dice"] and again["miou"] == val["miou"]
    from frugalseg.export import load_export

    student, spec, labels = load_export(out / "model")
    teacher, _, _ = load_export(out / "teacher")
    assert spec["arch"] == "unet2d" and labels.names == ("background", "RV", "Myo", "LV")
    # after 3 steps (EMA decays 0, 0.5, 0.667) the teacher lags the student but is not a copy
    diffs = [(a - b).abs().max().item() for a, b in zip(student.parameters(), teacher.parameters())]
    assert max(diffs) > 0
    ckpt, _, _ = load_export(out / "checkpoints" / "last.ckpt")  # `model.*` = the student
    assert all(torch.equal(a, b) for a, b in zip(ckpt.parameters(), student.parameters()))
