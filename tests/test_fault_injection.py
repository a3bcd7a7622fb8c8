"""Fault injection: `frugalseg train`, `eval`, `predict` and `run` killed (as by SIGKILL) just before one of their
file renames, then run again: no temporary or truncated file remains, and the rerun ends with the result of an
uninterrupted run.

Each command runs in its own process through `tests/fault_runner.py`, which counts the renames (every artefact
is written under a temporary name and renamed) and dies with `os._exit(137)` before rename N. The points below
are a sample chosen by kind (first checkpoint, export, metrics, predictions, a mid-pipeline stage); the
benchmark `benchmarks/fault_injection.py` kills at every rename.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fault_runner import damaged_files
from frugalseg.data.io import is_temporary
from frugalseg.data.synthetic import make_shapes_dataset

RUNNER = Path(__file__).with_name("fault_runner.py")
KILLED = 137


def frugalseg(args: list[str], kill_at: int, targets: Path) -> tuple[int, list[str]]:
    """Run `frugalseg args` in a fresh process, killed before rename `kill_at` (0: never): (exit code, targets)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RUNNER), str(kill_at), str(targets), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    if kill_at == 0:
        assert proc.returncode in (0, 1), proc.stderr[-3000:]
    done = json.loads(targets.read_text()) if targets.exists() else []
    return proc.returncode, done


def leftovers(folder: Path) -> list[str]:
    """Temporary files of the atomic writer still under `folder`."""
    return sorted(str(p) for p in folder.rglob("*") if is_temporary(p))


def kill_points(targets: list[str], *patterns: str) -> list[int]:
    """1-based rename numbers: the first target containing each pattern."""
    return [next(i + 1 for i, t in enumerate(targets) if p in t) for p in patterns]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("fi") / "data", n_train=8, n_val=3, size=48, seed=2)


def _train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--arch", "fcn", "--pretrained", "false", "--epochs", "2",
            "--batch-size", "4", "--crop-size", "48", "--no-progress", "--devices", "cpu"]


def _train_result(run: Path) -> tuple[dict, dict]:
    """Validation metrics and logged rows (epoch, step, columns filled); the exported weights."""
    metrics = json.loads((run / "metrics" / "val.json").read_text())
    weights = load_file(run / "model" / "model.safetensors")
    with open(run / "logs" / "metrics.csv", newline="") as f:
        rows = [(r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v))) for r in csv.DictReader(f)]
    return {**{k: metrics[k] for k in ("miou", "per_class", "samples")}, "log": rows}, weights


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted `train` run and the renames it made."""
    root = tmp_path_factory.mktemp("ref")
    code, targets = frugalseg(_train_args(data, root / "run"), 0, root / "targets.json")
    assert code == 0 and len(targets) > 10
    return root / "run", [os.path.relpath(t, root / "run") for t in targets]


def test_train_killed_at_a_rename_then_resumed_ends_like_an_uninterrupted_run(data, reference, tmp_path):
    ref_run, targets = reference
    want_metrics, want_weights = _train_result(ref_run)
    first_checkpoint, export, metrics = kill_points(targets, "checkpoints/last.ckpt", "model/model.safetensors",
                                                    "metrics/val.json")
    second_checkpoint = first_checkpoint + 1 + targets[first_checkpoint:].index("checkpoints/last.ckpt")
    points = [second_checkpoint, export, metrics]  # killed in epoch 1, after training, while evaluating
    for n in points:
        run = tmp_path / f"killed_{n}"
        code, _ = frugalseg(_train_args(data, run), n, tmp_path / "t.json")
        assert code == KILLED, (n, targets[n - 1])
        code, _ = frugalseg([*_train_args(data, run), "--resume"], 0, tmp_path / "t.json")
        assert leftovers(run) == [] and damaged_files(run) == [], (n, targets[n - 1])
        got_metrics, got_weights = _train_result(run)
        assert got_metrics == want_metrics, (n, targets[n - 1])
        assert got_weights.keys() == want_weights.keys()
        assert all((got_weights[k] == want_weights[k]).all() for k in want_weights), (n, targets[n - 1])


def test_eval_and_predict_killed_then_rerun_write_complete_identical_files(data, reference, tmp_path):
    ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    want = json.loads((run / "metrics" / "val.json").read_text())
    code, targets = frugalseg(["eval", str(run), "--split", "val"], 0, tmp_path / "t.json")
    assert code == 0
    (run / "metrics" / "val.json").unlink()
    n = kill_points([os.path.relpath(t, run) for t in targets], "metrics/val.json")[0]  # predictions written
    code, _ = frugalseg(["eval", str(run), "--split", "val"], n, tmp_path / "t.json")
    assert code == KILLED and leftovers(run) and not (run / "metrics" / "val.json").exists()
    code, _ = frugalseg(["eval", str(run), "--split", "val"], 0, tmp_path / "t.json")
    assert code == 0 and leftovers(run) == [] and damaged_files(run) == []
    got = json.loads((run / "metrics" / "val.json").read_text())
    assert {k: got[k] for k in ("miou", "per_class")} == {k: want[k] for k in ("miou", "per_class")}

    images = data / "images"
    code, targets = frugalseg(["predict", str(images), "--model", str(run), "--out", str(tmp_path / "ref")], 0,
                              tmp_path / "t.json")
    assert code == 0 and len(targets) == 2 * 11  # a mask and an overlay per image
    out = tmp_path / "masks"
    code, _ = frugalseg(["predict", str(images), "--model", str(run), "--out", str(out)], 7, tmp_path / "t.json")
    assert code == KILLED and leftovers(out)  # the kill left the temporary file of write 7
    code, _ = frugalseg(["predict", str(images), "--model", str(run), "--out", str(out)], 0, tmp_path / "t.json")
    assert code == 0 and leftovers(out) == [] and damaged_files(out) == []
    for ref in (tmp_path / "ref").glob("*.png"):
        assert (out / ref.name).read_bytes() == ref.read_bytes()


def test_run_pipeline_killed_mid_stage_then_rerun_ends_with_the_same_figures(data, tmp_path):
    args = ["run", "--data", str(data), "--limit", "4", "--classifier-epochs", "1", "--scales", "1.0", "--rounds", "1",
            "--seg-epochs", "1", "--crop-size", "48", "--batch-size", "4", "--crf-workers", "0", "--no-progress",
            "--devices", "cpu"]
    code, targets = frugalseg([*args, "--out", str(tmp_path / "ref")], 0, tmp_path / "t.json")
    assert code == 0

    def figures(run: Path) -> dict:
        summary = json.loads((run / "summary.json").read_text())
        return {"stages": [(s["stage"], s["miou"]) for s in summary["stages"]], "val": summary["final_val_miou"]}

    rel = [os.path.relpath(t, tmp_path / "ref") for t in targets]
    n = kill_points(rel, "crf/")[0] + 1  # inside the CRF stage, after its first pseudo-mask
    run = tmp_path / "killed"
    code, _ = frugalseg([*args, "--out", str(run)], n, tmp_path / "t.json")
    assert code == KILLED and leftovers(run)
    code, _ = frugalseg([*args, "--out", str(run)], 0, tmp_path / "t.json")
    assert code == 0 and leftovers(run) == [] and damaged_files(run) == []
    assert figures(run) == figures(tmp_path / "ref")
