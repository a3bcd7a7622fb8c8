"""Keep large freed blocks in the process instead of handing them back to the OS after every step.

Why: a CPU forward/backward pass allocates and frees the same activation-sized blocks (1-30 MB) at every
step. glibc's defaults trim the top of the heap once 2x the largest recently freed block is free there,
so the next step gets fresh pages from the kernel and pays a page fault per 4 KiB page (a large share of
AdvCAM's climb on a 2-core CPU). glibc raises its thresholds by itself only after the
process happens to free a larger mapped block, so a fresh process that only climbs or trains stays slow.
Peak memory barely moves: the blocks are reused, not added.

The `frugalseg` command and the benchmarks call `tune_cpu_allocator()` at start-up; library users may
call it themselves. It is process-wide, so it stays off where the user has chosen: when
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES glibc.malloc.* are set (glibc's own
knobs), or FRUGALSEG_DEFAULT_ALLOCATOR=1, or on a C library without `mallopt` (macOS, Windows, musl ignores it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's dynamic maximum on 64-bit)
TRIM_THRESHOLD = 256 << 20  # free heap top kept before it is returned to the OS

_state: dict[str, object] = {"tuned": None}


def tune_cpu_allocator() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    if _state["tuned"] is not None:
        return bool(_state["tuned"])
    _state["tuned"] = False
    if os.environ.get("FRUGALSEG_DEFAULT_ALLOCATOR") == "1":
        return False
    if ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping the C library's defaults")
    _state["tuned"] = ok
    return ok


def allocator_description() -> str:
    """What the result files record about the allocator."""
    if _state["tuned"]:
        return f"glibc mallopt mmap_threshold={MMAP_THRESHOLD >> 20} MiB trim_threshold={TRIM_THRESHOLD >> 20} MiB"
    return "C library defaults"
