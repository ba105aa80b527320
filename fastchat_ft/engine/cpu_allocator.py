"""Keep glibc's malloc from handing every large activation back to the kernel during CPU training.

glibc serves blocks above M_MMAP_THRESHOLD with a fresh mmap and unmaps them on free, so each step's activations
(hundreds of KB to tens of MB per tensor) come back as new zero-filled pages: a page fault per 4 KB, paid again
every step. Raising the mmap threshold to its maximum (32 MB on 64-bit) and the trim threshold keeps freed blocks
in the heap for the next step to reuse. The same cure as running PyTorch under jemalloc or tcmalloc (what Intel's
CPU tuning guide advises), but with nothing to install or LD_PRELOAD. bench/cpu_allocator.py measures it (GEMMs of
the SmolLM2 step's shapes, and a whole training step, with and without). Peak RSS is unchanged (freed memory is
reused, not added); the process's RSS stays near its peak instead of shrinking between steps.

FASTCHAT_FT_MALLOC_TUNING=0 turns it off (e.g. to measure what it buys).
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("fastchat_ft")

M_TRIM_THRESHOLD = -1   # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20   # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger values are refused
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Apply the settings once per process; returns whether they are in effect (False off glibc or when disabled)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("FASTCHAT_FT_MALLOC_TUNING", "1").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False  # musl, macOS, Windows: other allocators, other knobs
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as exc:  # no libc.so.6 or no mallopt symbol: leave malloc as it is
        log.debug("malloc tuning skipped: %s", exc)
        return False
    _applied = bool(ok)
    return _applied
