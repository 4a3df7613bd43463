"""Name the calling thread at the OS level, so `top -H`, `ps -L` and /proc show what each gateway
thread is (Python's thread names stay inside Python). Best effort: Linux only, silent elsewhere."""

from __future__ import annotations

import contextlib
import ctypes
import sys

_PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
