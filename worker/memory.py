"""The worker's allocator: a task's buffers (its vectors, a few MB each) reused, not mapped anew.

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
