"""Kill `frugalseg` at its file renames and rerun it (issue: reliability).

Every artefact is written under a temporary name and renamed when complete, so a rename is where a kill
(SIGKILL, power loss, the OOM killer) changes what is on disk. For each command (`train`, `eval`, `predict`,
`run` on a small generated shapes dataset, CPU), an uninterrupted run lists its renames; then, for each kill
point N, a fresh copy of the command is killed just before rename N (`tests/fault_runner.py`, `os._exit(137)`)
and the same command is run again (`train` with `--resume`). Each point passes when:

- the killed process died at that rename (exit 137);
- after the rerun no temporary file is left and every JSON / YAML / image / NumPy / safetensors / checkpoint
  file reads back whole (`fault_runner.damaged_files`);
- the rerun's result equals the uninterrupted run's: `train` validation metrics and every exported weight,
  `eval` metrics, `predict` mask bytes, `run` per-stage pseudo-mask mIoU and final val mIoU.

Kill points: every rename for `train`, `eval` and `predict`; for `run` (over a hundred renames, ~30 s each)
the first rename of each kind of artefact (sample ids folded). `--quick`: five points for `train` (config,
checkpoint, export, metrics, report), three for `eval` and `predict`, three for `run` (`QUICK_POINTS`). Results are
appended point by point to runs/bench/fault_injection/progress.json, so an interrupted benchmark resumes;
the table and benchmarks/results/fault_injection.json are written at the end.

    python benchmarks/fault_injection.py [--quick] [--only train eval predict run] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, print_table, save_results

sys.path.insert(0, str(ROOT / "tests"))
from fault_runner import damaged_files  # noqa: E402

from frugalseg.data.io import is_temporary  # noqa: E402
from frugalseg.data.synthetic import make_shapes_dataset  # noqa: E402

RUNNER = ROOT / "tests" / "fault_runner.py"
WORK = ROOT / "runs" / "bench" / "fault_injection"
KILLED = 137
DATA = dict(n_train=8, n_val=3, size=48, seed=2)


def call(args: list[str], kill_at: int, targets: Path) -> tuple[int, list[str], float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    targets.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(RUNNER), str(kill_at), str(targets), *args], capture_output=True,
                          text=True, env=env)
    if kill_at == 0 and proc.returncode != 0:
        raise RuntimeError(f"frugalseg {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    done = json.loads(targets.read_text()) if targets.exists() else []
    return proc.returncode, done, time.perf_counter() - t


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if is_temporary(p))


def kind(target: str) -> str:
    """A rename's kind: its path with sample ids and numbers folded (`crf/shape_0003.png` -> `crf/#.png`)."""
    return re.sub(r"shape_\d+", "#", re.sub(r"resume_\d+", "resume_#", target))


# ---- the commands ----------------------------------------------------------------------------------------
def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--arch", "fcn", "--pretrained", "false", "--epochs", "2",
            "--batch-size", "4", "--crop-size", "48", "--no-progress", "--devices", "cpu"]


def run_args(data: Path, out: Path) -> list[str]:
    return ["run", "--data", str(data), "--out", str(out), "--limit", "4", "--classifier-epochs", "1", "--scales",
            "1.0", "--rounds", "1", "--seg-epochs", "1", "--crop-size", "48", "--batch-size", "4", "--crf-workers", "0",
            "--no-progress", "--devices", "cpu"]


def train_result(run: Path) -> dict:
    from safetensors.torch import load_file

    metrics = json.loads((run / "metrics" / "val.json").read_text())
    weights = load_file(run / "model" / "model.safetensors")
    return {"miou": metrics["miou"], "per_class": metrics["per_class"],
            "weights": {k: v.flatten()[:64].tolist() + [float(v.double().sum())] for k, v in weights.items()}}


def eval_result(run: Path) -> dict:
    metrics = json.loads((run / "metrics" / "val.json").read_text())
    return {"miou": metrics["miou"], "per_class": metrics["per_class"]}


def predict_result(out: Path) -> dict:
    return {p.name: p.read_bytes().hex() for p in sorted(out.glob("*.png"))}


def run_result(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {"stages": [(s["stage"], s["miou"]) for s in summary["stages"]], "val": summary["final_val_miou"]}


class Command:
    """How one command is run, re-run after a kill, and judged."""

    def __init__(self, name: str, data: Path, root: Path):
        self.name, self.data, self.root = name, data, root
        self.trained = root / "reference_train"  # the finished run eval and predict start from

    def prepare(self, folder: Path) -> Path:
        """A fresh folder for one attempt; what the command writes into."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if self.name == "eval":
            shutil.copytree(self.trained, folder)
        return folder

    def args(self, folder: Path, rerun: bool = False) -> list[str]:
        if self.name == "train":
            return train_args(self.data, folder) + (["--resume"] if rerun else [])
        if self.name == "eval":
            return ["eval", str(folder), "--split", "val"]
        if self.name == "predict":
            return ["predict", str(self.data / "images"), "--model", str(self.trained), "--out", str(folder)]
        return run_args(self.data, folder)

    def result(self, folder: Path) -> dict:
        return {"train": train_result, "eval": eval_result, "predict": predict_result, "run": run_result}[self.name](folder)


#: `--quick`: the first rename under each of these (a config, a checkpoint, an export, metrics, a report; in the
#: pipeline the classifier, a refinement stage, a segmenter).
QUICK_POINTS = {"train": ("config.yaml", "checkpoints/", "model/", "metrics/", "report.html"),
                "run": ("classifier/", "crf/", "round1/segmenter/")}


def choose_points(name: str, targets: list[str], quick: bool) -> list[int]:
    if quick and name in QUICK_POINTS:
        return sorted({next(i + 1 for i, t in enumerate(targets) if t.startswith(p)) for p in QUICK_POINTS[name]})
    if name in ("eval", "predict") and quick:
        return sorted({1, len(targets) // 2, len(targets)})
    if name in ("train", "eval", "predict"):
        return list(range(1, len(targets) + 1))
    seen, points = set(), []
    for i, t in enumerate(targets):
        if kind(t) not in seen:
            seen.add(kind(t))
            points.append(i + 1)
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer kill points (a few minutes)")
    ap.add_argument("--only", nargs="+", choices=["train", "eval", "predict", "run"],
                    default=["train", "eval", "predict", "run"])
    ap.add_argument("--fresh", action="store_true", help="forget the progress of an earlier, interrupted benchmark")
    args = ap.parse_args()
    started = time.time()
    mode = "quick" if args.quick else "full"
    root = WORK / mode
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    progress_file = root / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    data = make_shapes_dataset(root / "data", **DATA)
    figures, rows = {}, []
    for name in args.only:
        cmd = Command(name, data, root)
        if name in ("eval", "predict") and not (cmd.trained / "stages" / "train.done").exists():
            call(train_args(data, cmd.trained), 0, root / "targets.json")
        ref = cmd.prepare(root / name / "reference")
        code, targets, ref_seconds = call(cmd.args(ref), 0, root / "targets.json")
        expected = cmd.result(ref)
        rel = [os.path.relpath(t, ref) for t in targets]
        points = choose_points(name, rel, args.quick)
        print(f"{name}: {len(rel)} renames, killing at {len(points)} of them ({ref_seconds:.0f} s a run)", flush=True)
        done = progress.setdefault(name, {})
        for n in points:
            if str(n) in done and done[str(n)]["target"] == rel[n - 1]:
                continue
            folder = cmd.prepare(root / name / "attempt")
            code, _, t1 = call(cmd.args(folder), n, root / "targets.json")
            left_by_kill = len(leftovers(folder))
            code2, _, t2 = call(cmd.args(folder, rerun=True), 0, root / "targets.json")
            entry = {"target": rel[n - 1], "killed": code == KILLED, "temporaries_left_by_kill": left_by_kill,
                     "rerun_exit": code2, "leftovers_after_rerun": leftovers(folder),
                     "damaged_after_rerun": damaged_files(folder), "same_result": cmd.result(folder) == expected,
                     "seconds": round(t1 + t2, 1)}
            entry["passed"] = (entry["killed"] and code2 == 0 and not entry["leftovers_after_rerun"]
                               and not entry["damaged_after_rerun"] and entry["same_result"])
            done[str(n)] = entry
            progress_file.write_text(json.dumps(progress, indent=1))
            print(f"  kill before rename {n:3d} ({rel[n - 1]}): {'pass' if entry['passed'] else 'FAIL'}", flush=True)
        entries = [done[str(n)] for n in points]
        failed = {str(n): e for n, e in zip(points, entries) if not e["passed"]}
        figures[name] = {
            "renames": len(rel), "kill_points": len(points), "killed": sum(e["killed"] for e in entries),
            "temporaries_left_by_kills": sum(e["temporaries_left_by_kill"] > 0 for e in entries),
            "passed": sum(e["passed"] for e in entries), "failed": failed,
            "seconds_uninterrupted": round(ref_seconds, 1),
        }
        rows.append((name, len(rel), len(points), figures[name]["killed"], figures[name]["temporaries_left_by_kills"],
                     figures[name]["passed"], len(failed)))
    print()
    print_table(rows, ("command", "renames", "kill points", "killed", "temp left by kill", "passed", "failed"))
    settings = {f"{mode}": {"data": f"generated shapes {DATA}", "train": "fcn, no pretraining, 2 epochs, crop 48, cpu",
                            "run": "limit 4, classifier 1 epoch, 1 round, seg 1 epoch, crop 48, cpu",
                            "rerun": "same command (train: --resume)"}}
    path = save_results("fault_injection", {f"{mode}_{name}": entry for name, entry in figures.items()}, settings,
                        started)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
