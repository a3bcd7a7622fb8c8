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
    assert cfg.lr_step == 2500  # DTC's 2500 of 6000 (3D, step schedule); 2D's poly decay does not read it


@pytest.mark.parametrize("cls, dims, ramp_field, share", [
    (DTCConfig, 2, "consistency_rampup", 1.0), (DTCConfig, 3, "consistency_rampup", 1.0),
    (MeanTeacherConfig, 2, "consistency_rampup", 1.0), (MeanTeacherConfig, 3, "consistency_rampup", 1.0),
    (CoTrainConfig, 2, "ramp_epochs", 0.5), (CoTrainConfig, 3, "ramp_epochs", 0.5),
])
def test_short_run_ramps_span_the_same_share_in_single_iterations(cls, dims, ramp_field, share):
    cfg = _resolved(cls, dims, iterations=1500)
    assert cfg.rampup_every == 1
    assert getattr(cfg, ramp_field) == pytest.approx(1500 * share)
    assert cfg.lr_step == (625 if dims == 3 else 2500)  # the step schedule (3D): 1500 · 2500 / 6000


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


def test_a_lengthened_resume_keeps_the_runs_own_ramps_and_steps(tmp_path):
    """`keep_saved_schedule`: extending a 1200-iteration DTC run to 2400 with --resume keeps its lr step (500)
    and ramp (1200), instead of re-deriving 1000 / 2400 and raising the learning rate ×10 at iteration 500."""
    import yaml

    from frugalseg.stages.semi import keep_saved_schedule

    first = _resolved(DTCConfig, 3, iterations=1200)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"rampup_every": first.rampup_every, "lr_step": first.lr_step,
                                                         "consistency_rampup": first.consistency_rampup}))
    given = DTCConfig(data="acdc", labelled_patients=7, iterations=2400, resume=True)
    longer = keep_saved_schedule(given.resolved(3), given, tmp_path)
    assert (longer.iterations, longer.lr_step, longer.consistency_rampup, longer.rampup_every) == (2400, 500, 1200.0, 1)
    fresh = DTCConfig(data="acdc", labelled_patients=7, iterations=2400)  # no --resume: the new length's own
    assert keep_saved_schedule(fresh.resolved(3), fresh, tmp_path).lr_step == 1000
    explicit = DTCConfig(data="acdc", labelled_patients=7, iterations=2400, resume=True, lr_step=700)
    assert keep_saved_schedule(explicit.resolved(3), explicit, tmp_path).lr_step == 700
