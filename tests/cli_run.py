"""Run the real `frugalseg` entry point in the test process: what a user sees (exit code, stdout, stderr)."""

from __future__ import annotations

import sys

from click.testing import CliRunner

from frugalseg.cli import main


def run_main(args: list[str], monkeypatch) -> tuple[int, str, str]:
    """`frugalseg ARGS` through `frugalseg.cli.main` (error lines, exit codes): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["frugalseg", *args])
    with CliRunner().isolation() as streams:
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = streams[0].getvalue().decode(), streams[1].getvalue().decode()
    return code, out, err
