"""Start-up cost of the command line and the library (issue: architecture).

Times, in fresh interpreters, `frugalseg --help` (must import no stage, no torch), `frugalseg train --help`
(builds the one command's options from the config fields: imports its stage), and `import frugalseg`, as the
median of `--repeats` runs. `--compare DIR` times another checkout's source tree the same way (e.g. a
`git worktree` of the commit before a change), so before and after sit side by side in one result file,
measured on the same machine in the same run. Results: benchmarks/results/startup.json.

    python benchmarks/startup.py [--repeats 7] [--compare /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, git_commit, print_table, save_results

CASES = {
    "help": "import sys; sys.argv = ['frugalseg', '--help']\nfrom frugalseg.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
    "train_help": "import sys; sys.argv = ['frugalseg', 'train', '--help']\nfrom frugalseg.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
    "import": "import frugalseg",
    "python": "pass",  # the interpreter alone, for reference
}


def time_case(src: Path, code: str, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--compare", type=Path, help="another checkout (its src/ is timed the same way)")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    started = time.time()
    trees = {"this": ROOT}
    if args.compare:
        trees["compare"] = args.compare.resolve()
    figures, rows = {}, []
    for label, tree in trees.items():
        entry = {"git_commit": git_commit(tree), "seconds": {}}
        for case, code in CASES.items():
            entry["seconds"][case] = time_case(tree / "src", code, repeats)
        figures[label] = entry
        rows.append((label, entry["git_commit"][:12] if entry["git_commit"] else "?",
                     *(entry["seconds"][c] for c in CASES)))
    print_table(rows, ("tree", "commit", *(f"{c} s" for c in CASES)))
    save_results("startup", {"startup": figures}, {"repeats": repeats, "cases": list(CASES),
                                                   "compare": str(args.compare) if args.compare else None}, started)


if __name__ == "__main__":
    main()
