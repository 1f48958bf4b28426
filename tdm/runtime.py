"""Process-wide CPU runtime settings that the entry points apply once (CLI, service, flows,
benchmarks, the test session).

``tune_allocator`` keeps freed memory in glibc's heap instead of handing it back to the kernel.
Code that allocates and frees tensors of a few MB at every call (JTM's scoring: a user state of
up to 16 MB and the activation unit's pre-activation per batch of samples) otherwise has the heap
top trimmed after each free and faults every page in again on the next call: JTM's attention-DNN
scoring spent more system time than user time, and runs 38-43% faster with these settings
(docs/PERFORMANCE.md, section 8). Set ``TDM_MALLOC_TUNE=0`` to leave the allocator alone (for
example under jemalloc or tcmalloc via ``LD_PRELOAD``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

__all__ = ["TOP_PAD_BYTES", "tune_allocator"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

TOP_PAD_BYTES = 256 << 20  # heap kept beyond the top after a free (and added on each growth)
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest; blocks below it come from the heap
_applied: bool | None = None


def tune_allocator() -> bool:
    """Apply the allocator settings once per process; True when glibc accepted them.

    A no-op returning False off glibc (macOS, musl), or with ``TDM_MALLOC_TUNE=0``."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("TDM_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, 2 * TOP_PAD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
    if not _applied:
        logger.debug("mallopt refused the allocator settings; glibc defaults kept")
    return _applied
