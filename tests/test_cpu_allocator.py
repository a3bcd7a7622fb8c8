"""The process-wide allocator settings: applied once, and left alone where the user chose otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = "from frugalseg.cpu_allocator import tune_cpu_allocator, allocator_description; print(tune_cpu_allocator(), '|', allocator_description())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("FRUGALSEG_DEFAULT_ALLOCATOR", "GLIBC_TUNABLES")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuned_on_glibc_and_described():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    out = _run({})
    assert out.startswith("True | glibc mallopt mmap_threshold=32 MiB trim_threshold=256 MiB")


@pytest.mark.parametrize("env", [{"FRUGALSEG_DEFAULT_ALLOCATOR": "1"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}])
def test_allocator_left_alone_when_user_chose(env):
    assert _run(env) == "False | C library defaults"
