"""glibc malloc settings for a server that holds image bodies in memory (see ingest.form.MemoryBudget).

By default glibc serves each image-sized buffer with a fresh mmap, or trims the heap after freeing
it, so every upload faults its pages in again. Buffers up to 16 MiB come from the heap, and up to
64 MiB of freed heap is kept for the next upload (bounded, as in-memory images are). Figures:
docs/design.md, "Measured figures behind the code". Best effort: glibc only, silent elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_for_images() -> bool:
    """Apply the settings above; True if glibc took them."""
    if platform.libc_ver()[0] != "glibc":
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return False
