"""Shortened schedules: ramps and the step learning-rate schedule keep their share of the run
(`stages.semi.scale_schedule`), so a CPU-sized run does not switch the semi-supervised terms off."""

from __future__ import annotations

import pytest

from frugalseg.semi.cotrain import cotrain_ramp
from frugalseg.semi.ramps import consistency_weight
from frugalseg.stages.semi import CoTrainConfig, DTCConfig, MeanTeacherConfig, SupervisedOnlyConfig


def _resolved(cls, dims: int, **kw):
    return cls(data="acdc", labelled_patients=7, **kw).resolved(dims)


@pytest.mark.parametrize("cls, dims, ramp_field, reference", [
    (DTCConfig, 2, "consistency_rampup", 200.0), (DTCConfig, 3, "consistency_rampup", 40.0),
    (MeanTeacherConfig, 2, "consistency_rampup", 200.0), (MeanTeacherConfig, 3, "consistency_rampup", 40.0),
    (CoTrainConfig, 2, "ramp_epochs", 100.0), (CoTrainConfig, 3, "ramp_epochs", 20.0),
])
def test_protocol_length_keeps_the_reference_constants(cls, dims, ramp_field, reference):
    cfg = _resolved(cls, dims)
    assert cfg.rampup_every == 150 and getattr(cfg, ramp_field) == reference
    assert cfg.lr_step == (2500 if dims == 3 else 12500)  # 2500 of DTC's 6000 iterations: the same share


@pytest.mark.parametrize("cls, dims, ramp_field, share", [
    (DTCConfig, 2, "consistency_rampup", 1.0), (DTCConfig, 3, "consistency_rampup", 1.0),
    (MeanTeacherConfig, 2, "consistency_rampup", 1.0), (MeanTeacherConfig, 3, "consistency_rampup", 1.0),
    (CoTrainConfig, 2, "ramp_epochs", 0.5), (CoTrainConfig, 3, "ramp_epochs", 0.5),
])
def test_short_run_ramps_span_the_same_share_in_single_iterations(cls, dims, ramp_field, share):
    cfg = _resolved(cls, dims, iterations=1500)
    assert cfg.rampup_every == 1
    assert getattr(cfg, ramp_field) == pytest.approx(1500 * share)
    assert cfg.lr_step == 625  # 1500 · 2500 / 6000


def test_unscaled_short_run_would_switch_consistency_off_and_scaled_one_reaches_full_weight():
    """The issue's example: SSL4MIS's 0.1·sigmoid_rampup(t // 150, 200) at the end of a 3000-iteration run."""
    assert consistency_weight(2999, 0.1, 200.0, 150) < 0.002
    cfg = _resolved(DTCConfig, 2, iterations=3000)
    end = consistency_weight(2999, cfg.consistency, cfg.consistency_rampup, cfg.rampup_every)
    half = consistency_weight(1500, cfg.consistency, cfg.consistency_rampup, cfg.rampup_every)
    assert end == pytest.approx(0.1, rel=1e-5) and half == pytest.approx(0.1 * 2.718281828 ** -1.25, rel=1e-3)
    co = _resolved(CoTrainConfig, 2, iterations=3000)
    assert cotrain_ramp(1500 // co.rampup_every, co.ramp_epochs, co.lambda_cot) == pytest.approx(1.0)
    assert cotrain_ramp(1, co.ramp_epochs, co.lambda_cot) == pytest.approx(2.718281828 ** (-5 * (1 - 1 / 1500) ** 2))


def test_explicit_values_are_kept_as_given():
    cfg = _resolved(DTCConfig, 2, iterations=1500, rampup_every=10, consistency_rampup=7.0, lr_step=300)
    assert (cfg.rampup_every, cfg.consistency_rampup, cfg.lr_step) == (10, 7.0, 300)
    # rampup_every given, ramp left open: the ramp still spans the run, counted in the given unit
    cfg = _resolved(MeanTeacherConfig, 2, iterations=1500, rampup_every=10)
    assert cfg.consistency_rampup == pytest.approx(150.0)
    assert _resolved(SupervisedOnlyConfig, 2, iterations=1500).rampup_every == 1
