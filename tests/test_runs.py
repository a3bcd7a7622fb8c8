"""Provenance of benchmark results: the commit they name."""
import subprocess
from pathlib import Path

import pytest

from frugalseg.runs import git_commit


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "speed.json").write_text("{}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return tmp_path


def test_results_files_do_not_make_a_commit_dirty(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == head
    (repo / "benchmarks" / "results" / "speed.json").write_text('{"a": 1}\n')
    assert git_commit(repo) == head
    assert git_commit(repo / "src") == head  # asked from a subfolder: the whole tree is checked
    (repo / "src" / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == f"{head}-dirty"
    assert git_commit(repo / "benchmarks") == f"{head}-dirty"


def test_outside_a_repository_there_is_no_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None


def test_a_git_that_cannot_filter_paths_still_sees_changes(repo: Path, monkeypatch) -> None:
    import frugalseg.runs as runs

    real = subprocess.run

    def old_git(cmd, **kw):  # exclude pathspecs unknown: exit 128, nothing on stdout
        if ":/" in cmd:
            return subprocess.CompletedProcess(cmd, 128, "", "fatal: Unimplemented pathspec magic")
        return real(cmd, **kw)

    monkeypatch.setattr(runs.subprocess, "run", old_git)
    head = git(repo, "rev-parse", "HEAD")
    (repo / "benchmarks" / "results" / "speed.json").write_text('{"a": 2}\n')
    assert git_commit(repo) == f"{head}-dirty"  # the plain check cannot leave results out, but misses nothing
