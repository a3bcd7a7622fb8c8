"""Consistency-weight ramp-up (Laine & Aila 2017; the `ramps.py` that UA-MT, DTC and SSL4MIS share).

    sigmoid_rampup(t, T) = exp(-5 (1 - clip(t, 0, T) / T)^2)        (1 when T = 0)
    λ(step) = weight · sigmoid_rampup(step // every, T)

DTC's official training (train_la_dtc.py) uses weight = `args.consistency` = **1.0**, T = 40 and counts
t in "epochs" of 150 iterations (`iter_num // 150`), so the ramp spans 6000 iterations, its whole run.
Its `--consistency_weight 0.1` argument is never read. SSL4MIS's 2D scripts use weight 0.1 and
T = 200 (of 150 iterations: 30 000, their whole run); both sets of constants are given below.
"""

from __future__ import annotations

import math

__all__ = [
    "COTRAIN_RAMP", "DTC_CONSISTENCY", "DTC_ITERATIONS", "DTC_LR_STEP", "DTC_RAMPUP", "RAMPUP_EVERY",
    "SSL4MIS_CONSISTENCY", "SSL4MIS_ITERATIONS", "SSL4MIS_RAMPUP",
    "consistency_weight", "sigmoid_rampup",
]

DTC_CONSISTENCY = 1.0  # train_la_dtc.py `--consistency` (the one the loss reads)
DTC_RAMPUP = 40.0  # `--consistency_rampup`, in units of RAMPUP_EVERY iterations
RAMPUP_EVERY = 150  # `get_current_consistency_weight(iter_num // 150)`
SSL4MIS_CONSISTENCY = 0.1  # SSL4MIS 2D scripts (ACDC), `--consistency`
SSL4MIS_RAMPUP = 200.0  # SSL4MIS 2D scripts, `--consistency_rampup`
SSL4MIS_ITERATIONS = 30000  # SSL4MIS 2D scripts, `--max_iterations`
COTRAIN_RAMP = 100.0  # deep co-training (official ACDC config): both weights ramped over 100 of its 200 epochs
DTC_ITERATIONS = 6000  # train_la_dtc.py `--max_iterations`
DTC_LR_STEP = 2500  # train_la_dtc.py: lr x 0.1 every 2500 iterations


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t/T)^2) with t clipped to [0, T]: 0.0067 at t = 0, 1 at t >= T; 1 if T = 0."""
    if rampup_length == 0:
        return 1.0
    t = min(max(float(current), 0.0), float(rampup_length))
    phase = 1.0 - t / rampup_length
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(
    step: int,
    weight: float = DTC_CONSISTENCY,
    rampup: float = DTC_RAMPUP,
    every: int = RAMPUP_EVERY,
) -> float:
    """λ at a training iteration: `weight * sigmoid_rampup(step // every, rampup)` (DTC's schedule)."""
    return weight * sigmoid_rampup(int(step) // max(1, int(every)), rampup)
