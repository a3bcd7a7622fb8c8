"""Shared test fixtures: where the real datasets are, and small generated inputs."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

DATA_ROOT = Path(os.environ.get("FRUGALSEG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def data_path(name: str) -> Path:
    path = DATA_ROOT / name
    if not path.exists():
        pytest.skip(f"real dataset {path} not available (set FRUGALSEG_DATA)")
    return path


def import_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (its folder on sys.path only while it is imported; the scripts import
    their `common` helper by plain name)."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@pytest.fixture(autouse=True)
def _data_root_env(monkeypatch):
    """Task names (msrc-objects, acdc, ...) resolve under the shared data folder in tests."""
    monkeypatch.setenv("FRUGALSEG_DATA", str(DATA_ROOT))


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared CPU: one intra-op thread is faster than two fighting (a cotrain step went
    from 6 s to 0.1 s). Test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    from frugalseg.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=4, size=64, seed=1)
