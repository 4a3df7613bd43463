"""Figures for people: byte sizes, durations and times, shared by the CLI and the status page."""

from __future__ import annotations

import time


def human_bytes(n: float | None) -> str:
    """`1536` -> `1.5 KiB`; None -> `-`."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_age(seconds: float | None) -> str:
    """A duration, coarser as it grows: `45s`, `12m`, `3h05m`, `4d`; None -> `-`."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def local_time(unix: float | None) -> str:
    """Unix seconds as the gateway's local `YYYY-MM-DD HH:MM:SS`; None -> `-`."""
    if unix is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def zoned_time(unix: float | None) -> str:
    """Unix seconds as local time with its zone, `YYYY-MM-DD HH:MM:SS CET (+0100)`; None -> `-`."""
    if unix is None:
        return "-"
    t = time.localtime(unix)
    return time.strftime("%Y-%m-%d %H:%M:%S %Z (%z)", t)
