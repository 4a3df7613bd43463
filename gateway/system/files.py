"""Durable file-system steps shared by the catalog's journal, the stores, the drain and backups."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a folder's entries (a new, renamed or replaced file), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # the name callers use for a folder
