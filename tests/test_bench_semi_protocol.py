"""The CPU protocol's bookkeeping (benchmarks/semi.py): a finished run is found again by its settings, new
options do not invalidate it, other settings do, and the aggregate is mean ± sd over seeds with the gain over
supervised-only called beyond the spread only when it is larger than both seed spreads."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import import_benchmark



@pytest.fixture(scope="module")
def semi():
    return import_benchmark("semi")


def _write(semi, records: Path, method: str, seed: int, dice: float, **settings_change) -> None:
    cfg = semi.cpu_config("acdc_l7", method, seed)
    settings = {**semi._settings_of(cfg), **settings_change}
    figures = {"seed": seed, "dice": dice, "hd95": 10.0, "jaccard": dice - 0.1, "asd": 2.0, "units": "voxel",
               "wall_s": 100.0, "s_per_iteration": 0.2, "split": "val", "cases": 20, "labelled": 136,
               "unlabelled": 808, "curve": [[149, 0.5], [299, 0.6]]}
    path = semi.record_path(records, "acdc_l7", method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "figures": figures}))


def test_records_are_matched_by_settings(semi, tmp_path):
    _write(semi, tmp_path, "dtc", 1, 0.7)
    assert semi.read_record(tmp_path, "acdc_l7", "dtc", 1)["dice"] == 0.7
    _write(semi, tmp_path, "dtc", 2, 0.7, lr=0.5)  # made with another learning rate: redone
    assert semi.read_record(tmp_path, "acdc_l7", "dtc", 2) is None
    # a record written before an option existed matches while the option keeps its default
    path = semi.record_path(tmp_path, "acdc_l7", "dtc", 1)
    kept = json.loads(path.read_text())
    del kept["settings"]["jitter"], kept["settings"]["aux_weight"]
    path.write_text(json.dumps(kept))
    assert semi.read_record(tmp_path, "acdc_l7", "dtc", 1) is not None
    assert semi.read_record(tmp_path, "acdc_l7", "dtc", 3) is None


def test_aggregate_mean_sd_gain_and_spread(semi, tmp_path):
    for seed, (sup, dtc, mt) in enumerate([(0.60, 0.66, 0.62), (0.62, 0.67, 0.58), (0.64, 0.68, 0.66)], start=1):
        _write(semi, tmp_path, "supervised_only", seed, sup)
        _write(semi, tmp_path, "dtc", seed, dtc)
        _write(semi, tmp_path, "meanteacher", seed, mt)
    agg = semi.aggregate(tmp_path)["acdc_l7"]
    sup, dtc, mt = agg["supervised_only"], agg["dtc"], agg["meanteacher"]
    assert sup["dice_mean"] == pytest.approx(0.62) and sup["sd"] == pytest.approx(statistics.stdev([0.6, 0.62, 0.64]))
    assert dtc["per_seed"] == [0.66, 0.67, 0.68] and dtc["gain_over_supervised"] == pytest.approx(0.05)
    assert dtc["beyond_spread"] is True  # +0.05 against sds of 0.02 and 0.01
    assert mt["gain_over_supervised"] == pytest.approx(0.0) and mt["beyond_spread"] is False
    table = semi.markdown_table({"acdc_l7": agg})
    assert "| acdc_l7 (val) | dtc | 3 | 0.670 ± 0.010 | 0.660 / 0.670 / 0.680 | +0.050 | yes |" in table
