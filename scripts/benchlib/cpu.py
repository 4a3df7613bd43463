"""CPU time per process (and per gateway thread) from /proc, to say which process is the limit.

Linux only. Threads are grouped by their OS-level name: the gateway names its catalog writer and
forwarder threads (`gateway.system.osthread`); its main thread runs the event loop; the rest (S3 PUT
workers, DuckDB's own workers) are "other threads"."""

from __future__ import annotations

import os
import re
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _ticks(stat_path: Path) -> int:
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def process_seconds(pid: int) -> float:
    """CPU seconds `pid` has used (its own threads, not its children)."""
    return _ticks(Path(f"/proc/{pid}/stat")) / TICK


def named_thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the live, named threads of `pid` by role (the main thread is the event loop)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        role = "event loop" if task.name == str(pid) else re.sub(r"-\d+$", "", name)
        if role in ("event loop", "catalog-writer", "forward"):
            out[role] = out.get(role, 0.0) + _ticks(task / "stat") / TICK
    return out


class CpuMeter:
    """CPU milliseconds per request of each process, over one measured round."""

    def __init__(self, pids: dict[str, int | None], split: int | None = None) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.split = split  # the pid whose threads are reported by role

    def __enter__(self) -> CpuMeter:
        self._start = {k: process_seconds(p) for k, p in self.pids.items()}
        self._threads = named_thread_seconds(self.split) if self.split else {}
        self._split_start = process_seconds(self.split) if self.split else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {k: process_seconds(p) - self._start[k] for k, p in self.pids.items()}
        self.threads: dict[str, float] = {}
        if self.split:
            # Named threads live as long as the process; the rest (short-lived workers, DuckDB's
            # own threads) is the process's total less theirs, which counts threads that ended too.
            now = named_thread_seconds(self.split)
            self.threads = {k: max(0.0, v - self._threads.get(k, 0.0)) for k, v in now.items()}
            total = process_seconds(self.split) - self._split_start
            self.threads["other threads"] = max(0.0, total - sum(self.threads.values()))

    def per_request_ms(self, requests: int) -> dict[str, float]:
        out = {k: round(v * 1000 / requests, 2) for k, v in self.used.items()}
        for role, v in sorted(self.threads.items()):
            out[f"gateway {role}"] = round(v * 1000 / requests, 2)
        return out
