"""Compare the figures of two benchmark result files (e.g. `--quick` before and after a refactoring).

Every number under `figures` is compared leaf by leaf; leaves whose path names a time or a rate (seconds,
images/s, speed-ups, page faults, memory) are reported apart, since they measure the machine, not the
method. Writes benchmarks/results/compare_<name>.json with the counts and every differing leaf.

    python benchmarks/compare_results.py BEFORE.json AFTER.json [--name architecture_quick] [--tol 0]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from common import print_table, save_results

TIMING_WORDS = ("second", "per_s", "speedup", "wall", "page_fault", "rss", "_s_", "time", "throughput", "allocator",
                "torch_threads", "machine", "seconds_per", "s_per_")


def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def is_timing(path: str) -> bool:
    low = path.lower()
    return any(w in low for w in TIMING_WORDS) or low.endswith("_s")


def same(a, b, tol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return True
        return abs(a - b) <= tol
    return a == b


def compare(before: dict, after: dict, tol: float, keys: list[str] | None) -> dict:
    fb, fa = before.get("figures", {}), after.get("figures", {})
    sections = keys or sorted(set(fb) & set(fa))
    out = {"compared": 0, "equal": 0, "timing_leaves_skipped": 0, "differ": [], "only_before": [], "only_after": []}
    for sec in sections:
        lb, la = dict(leaves(fb.get(sec, {}), sec)), dict(leaves(fa.get(sec, {}), sec))
        for p in sorted(set(lb) | set(la)):
            if is_timing(p):
                out["timing_leaves_skipped"] += 1
            elif p not in la:
                out["only_before"].append(p)
            elif p not in lb:
                out["only_after"].append(p)
            else:
                out["compared"] += 1
                if same(lb[p], la[p], tol):
                    out["equal"] += 1
                else:
                    out["differ"].append({"path": p, "before": lb[p], "after": la[p]})
    out["before_commit"] = before.get("git_commit")
    out["after_commit"] = after.get("git_commit")
    out["sections"] = sections
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--name", default=None, help="results key (default: the after file's benchmark name)")
    ap.add_argument("--tol", type=float, default=0.0, help="absolute tolerance on numbers (default: exact)")
    ap.add_argument("--sections", nargs="*", help="top-level figure keys to compare (default: those in both)")
    args = ap.parse_args()
    started = time.time()
    before, after = json.loads(args.before.read_text()), json.loads(args.after.read_text())
    res = compare(before, after, args.tol, args.sections)
    name = args.name or after.get("benchmark", args.after.stem)
    print_table([(name, res["compared"], res["equal"], len(res["differ"]), len(res["only_before"]),
                  len(res["only_after"]), res["timing_leaves_skipped"])],
                ("benchmark", "compared", "equal", "differ", "only before", "only after", "timing skipped"))
    for d in res["differ"][:20]:
        print(f"  {d['path']}: {d['before']} -> {d['after']}")
    save_results("compare_quick", {name: res}, {name: {"before": str(args.before), "after": str(args.after),
                                                       "tol": args.tol}}, started)


if __name__ == "__main__":
    main()
