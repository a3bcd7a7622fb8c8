"""Confusion-matrix metrics on hand-computed cases (ignore pixels, absent classes, Dice)."""

from __future__ import annotations

import math

import pytest
import torch

from frugalseg.metrics import ConfusionMatrix, confusion_matrix, dice_per_class, iou_per_class, summarise


def test_hand_computed_iou_and_dice():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, truth, num_classes=4)
    # valid pixels: 6. class0: tp1 fp1 fn1 -> 1/3; class1: tp2 fp1 fn0 -> 2/3; class2: tp1 fp0 fn1 -> 1/2; class3 absent
    iou = iou_per_class(cm)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3])
    dice = dice_per_class(cm)
    assert dice[:3].tolist() == pytest.approx([2 / 4, 4 / 5, 2 / 3])
    m = summarise(cm, ["bg", "a", "b", "c"], background=0)
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3, abs=1e-6)
    assert m["per_class"]["c"]["iou"] is None
    assert m["mean_dice_foreground"] == pytest.approx((4 / 5 + 2 / 3) / 2, abs=1e-6)
    assert m["pixels"] == 6 and m["pixel_accuracy"] == pytest.approx(4 / 6, abs=1e-6)


def test_class_in_truth_never_predicted_counts_as_zero():
    truth = torch.tensor([0, 1, 1])
    pred = torch.tensor([0, 0, 0])
    iou = iou_per_class(confusion_matrix(pred, truth, 2))
    assert iou.tolist() == pytest.approx([1 / 3, 0.0])


def test_predicted_class_absent_from_truth_counts_as_zero():
    iou = iou_per_class(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2))
    assert iou.tolist() == pytest.approx([0.5, 0.0])


def test_out_of_range_ids_raise():
    with pytest.raises(ValueError, match="truth holds ids"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)
    with pytest.raises(ValueError, match="prediction holds ids"):
        confusion_matrix(torch.tensor([7]), torch.tensor([0]), 3)


def test_metric_accumulates_logits_and_ids():
    metric = ConfusionMatrix(3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 5.0
    metric.update(logits, torch.tensor([[[1, 1], [0, 255]]]))
    metric.update(torch.tensor([[2, 2]]), torch.tensor([[2, 0]]))
    cm = metric.compute()
    assert cm.sum() == 5 and cm[1, 1] == 2 and cm[0, 1] == 1 and cm[2, 2] == 1 and cm[0, 2] == 1
