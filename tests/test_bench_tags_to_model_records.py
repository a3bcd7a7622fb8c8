"""The IRN study's run records (benchmarks/tags_to_model.py): a finished run is read back from its record when
the settings match, run again when they differ, never recorded for --quick, and paths under the study's folder
are written relative to it so a record outlives the run folders."""

from __future__ import annotations


import pytest
from conftest import import_benchmark



@pytest.fixture(scope="module")
def ttm():
    return import_benchmark("tags_to_model")


def test_recorded_runs_once_reads_back_and_reruns_on_other_settings(ttm, tmp_path, monkeypatch):
    monkeypatch.setattr(ttm, "RUN_RECORDS", tmp_path / "records")
    root = tmp_path / "runs" / "tags_to_model"
    calls = []

    def run(value):
        def go():
            calls.append(value)
            return {"val_miou": value}
        return go

    cfg = ttm.PipelineConfig(data="msrc-objects", out=str(root / "x"))
    assert ttm.run_record(root, "segmenter.x.seed0", cfg, run(0.5)) == {"val_miou": 0.5}
    assert ttm.run_record(root, "segmenter.x.seed0", cfg, run(0.7)) == {"val_miou": 0.5}
    assert calls == [0.5]
    other = ttm.PipelineConfig(data="msrc-objects", out=str(root / "x"), seed=3)
    assert ttm.run_record(root, "segmenter.x.seed0", other, run(0.6)) == {"val_miou": 0.6}
    assert calls == [0.5, 0.6]
    record = (tmp_path / "records" / "segmenter.x.seed0.json").read_text()
    assert '"seed": 3' in record and '"git_commit"' in record and '"machine"' in record
    # --quick keeps no record
    quick = tmp_path / "runs" / "tags_to_model_quick"
    ttm.run_record(quick, "q", cfg, run(0.1))
    ttm.run_record(quick, "q", cfg, run(0.2))
    assert calls[-2:] == [0.1, 0.2] and not (tmp_path / "records" / "q.json").exists()


def test_record_from_before_a_new_field_matches_while_it_holds_its_default(ttm, tmp_path):
    records = tmp_path / "records"
    calls = []

    def run():
        calls.append(1)
        return {"val_miou": 0.5}

    ttm.recorded(records, "r", {"lr": 0.01}, run)
    # the config gained `lal_k` (default 5.0) since the record: still the same run
    assert ttm.recorded(records, "r", {"lr": 0.01, "lal_k": 5.0}, run, defaults={"lal_k": 5.0}) == {"val_miou": 0.5}
    assert calls == [1]
    # ... but not with another value, nor without the defaults to tell
    ttm.recorded(records, "r", {"lr": 0.01, "lal_k": 2.0}, run, defaults={"lal_k": 5.0})
    assert calls == [1, 1]
    ttm.recorded(records, "r", {"lr": 0.01}, run)  # the record now holds lal_k 2.0: a field gone is a change
    assert calls == [1, 1, 1]


def test_config_settings_relative_paths_and_no_output_fields(ttm, tmp_path):
    root = tmp_path / "runs" / "tags_to_model"
    cfg = ttm.PipelineConfig(data="msrc-objects", out=str(root / "cam_crf_seed1"), seed=1,
                             classifier=str(root / "cam_irn" / "classifier"))
    settings = ttm.config_settings(cfg, root)
    assert settings["classifier"] == "<runs>/cam_irn/classifier"
    assert "out" not in settings and settings["seed"] == 1
    other = ttm.config_settings(ttm.PipelineConfig(data="msrc-objects", out=str(root / "elsewhere"), seed=1,
                                                   classifier=str(root / "cam_irn" / "classifier")), root)
    assert other == settings
