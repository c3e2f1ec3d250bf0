"""Keep glibc from holding on to the memory of freed chunk buffers.

glibc serves allocations above its mmap threshold with their own mappings,
which return to the system when freed, but it raises that threshold each
time such a block is freed, up to 32 MiB. After the first few chunks,
8 MiB buffers then come from the heap arenas of the worker threads, where
freed space stays resident. Fixing the threshold (mallopt(3),
M_MMAP_THRESHOLD) keeps the daemon's resident memory near its limits.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1024 * 1024


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; return False where that is not possible."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES))
    except (OSError, AttributeError):
        log.debug("mallopt is not available; resident memory may grow")
        return False
