"""Run `frugalseg ARGS` and die just before its N-th file rename, as a SIGKILL (power loss, OOM killer) would.

    python tests/fault_runner.py N TARGETS.json frugalseg-args...

Every artefact frugalseg writes goes to a temporary name first and is renamed (`os.replace`) when complete,
so the renames are the points where a kill changes what is on disk: dying just before rename N leaves the
temporary file of write N and every file of writes 1..N-1. `os._exit(137)` skips every clean-up handler,
like a real kill. With N = 0 the command runs to its end and TARGETS.json lists every renamed target in
order (how the fault-injection test and benchmark find the points to kill at).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def damaged_files(folder: Path) -> list[str]:
    """Files under `folder` that do not read back whole in their format (JSON, YAML, images, NumPy archives,
    safetensors, checkpoints, NIfTI): a truncated artefact left under its final name."""
    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from safetensors.torch import load_file

    readers = {".json": lambda p: json.loads(p.read_text()), ".yaml": lambda p: yaml.safe_load(p.read_text()),
               ".png": lambda p: Image.open(p).load(), ".jpg": lambda p: Image.open(p).load(),
               ".npz": lambda p: dict(np.load(p)), ".safetensors": load_file,
               ".ckpt": lambda p: torch.load(p, map_location="cpu", weights_only=False)}
    bad = []
    for path in sorted(Path(folder).rglob("*")):
        reader = readers.get(path.suffix)
        if path.is_file() and reader is not None and not path.name.startswith("."):
            try:
                reader(path)
            except Exception as exc:  # noqa: BLE001 - any failure to read back is the finding
                bad.append(f"{path}: {type(exc).__name__}")
    return bad


def main() -> None:
    kill_at, targets_file, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    real_replace = os.replace
    targets: list[str] = []

    def replace(src, dst, *a, **kw):
        if len(targets) + 1 == kill_at:
            os._exit(137)
        targets.append(os.fspath(dst))
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    sys.argv = ["frugalseg", *args]
    from frugalseg.cli import main as cli_main

    try:
        cli_main()
    finally:
        with open(targets_file, "w") as f:
            json.dump(targets, f)


if __name__ == "__main__":
    main()
