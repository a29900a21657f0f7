"""The worker's memory: a task's buffers reused, not mapped anew; the loaded engine out of the collector's way.

glibc serves an allocation above its mmap threshold with a fresh mapping, whose
pages the kernel faults in and zeroes on first touch: every task then pays for
its vectors' memory again (measured: 1.4 page faults and ~8 us of kernel time
per text with the hash engine). A higher threshold keeps such buffers in the
heap, where the next task reuses them. Only the worker's own process is tuned,
never a producer's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

#: mallopt parameters (malloc.h) and values: buffers up to 32 MB (glibc's largest
#: threshold) come from the heap, which is trimmed only past 64 MB of free top.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def keep_task_buffers_in_heap() -> bool:
    """Raise glibc's mmap threshold; False where the C library is not glibc (nothing to do)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("allocator: mmap threshold %d MB (%s)", MMAP_THRESHOLD >> 20, "set" if done else "refused")
    return done


def freeze_what_is_loaded() -> None:
    """Move every object alive now (the engine, its model and libraries: millions of objects with
    torch or SGLang) out of the cyclic collector's reach: a full collection would otherwise walk
    them all again and again while the worker serves, and they live as long as the process."""
    gc.collect()
    gc.freeze()
    log.debug("%d objects frozen out of the garbage collector", gc.get_freeze_count())
