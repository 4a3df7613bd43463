"""How many CPU cores the machine left idle lately: the sign that background work (near-duplicate
fingerprints) can run without taking CPU from ingest.

Two readings, the smaller wins:
- idle time (idle + iowait) of the CPUs this process may run on, from /proc/stat;
- where cgroups (v2) of the gateway have CPU quotas (`podman run --cpus`), the smallest headroom
  among them: each quota less what its cgroup used (cpu.stat), since a throttled container sees
  an idle host. cgroup v1 quotas are not read, nor quotas above a cgroup namespace's root (a
  pod's), which cannot be seen from inside it.

`run` takes a reading every `interval` seconds (a background task) and `idle_cores()` answers at
once: the last interval's figure or the mean of the last `SMOOTHING` intervals, whichever is
smaller, so that a burst shuts background work out within one interval while a short idle spell
in a busy second does not let it in; None where nothing can be read (not Linux) or before the
first interval, 0 when the readings fell behind (the event loop itself is overloaded).
The caller's own deferrable work counts as idle (its running CPU total, `reclaimable`), so that
background work which stops when the machine is busy does not stop itself. `left_idle()` is the
last interval's idle CPU without it, unsmoothed: background work that crowds the rest out leaves
nothing idle, however much it would give back, and a check that only refuses should refuse at once.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import anyio

INTERVAL_S = 0.2  # short: a burst after a quiet spell is seen within this
STALE_AFTER = 3  # intervals without a reading: the event loop is too busy to take one
SMOOTHING = 5  # intervals in the mean (1 s)


class Quota(NamedTuple):
    folder: Path  # the cgroup whose cpu.max sets it
    cores: float


class Reading(NamedTuple):
    at: float
    host_idle_s: float | None  # idle seconds of this process's CPUs, all told
    cgroup_used_s: tuple[float | None, ...]  # CPU seconds each quota's cgroup used, all told
    reclaimable_s: float  # the caller's deferrable work, all told


class IdleCpu:
    """Idle cores lately, read by a background task."""

    def __init__(self, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                 clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL_S) -> None:
        self.proc = proc
        self.clock = clock
        self.interval = interval
        self.quotas = cgroup_quotas(proc, cgroup_root)
        self.quota = min(self.quotas, key=lambda q: q.cores) if self.quotas else None  # the tightest
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._cpus = {f"cpu{n}".encode() for n in _allowed_cpus()}
        self._last: Reading | None = None
        self._idle: float | None = None
        self._left: float | None = None  # the last interval's idle cores, reclaimable work not counted
        self._recent: deque[tuple[float, float]] = deque(maxlen=SMOOTHING)  # (span, idle cores) of each

    @property
    def cores(self) -> float:
        """CPUs this process may use: its affinity, or the cgroup quota where smaller."""
        cpus = float(len(self._cpus))
        return min(cpus, self.quota.cores) if self.quota else cpus

    @property
    def measurable(self) -> bool:
        """Whether there is anything to read here (Linux: /proc/stat)."""
        return self._host_idle_s() is not None

    def idle_cores(self) -> float | None:
        """Idle cores plus the cores the caller's reclaimable work used, the smaller of the last
        interval's and the last second's mean (None: not known; 0 when the readings fell behind)."""
        return self._unless_stale(self._idle)

    def left_idle(self) -> float | None:
        """Idle cores over the last interval, the caller's reclaimable work not counted (None: not
        known; 0 when the readings fell behind)."""
        return self._unless_stale(self._left)

    def _unless_stale(self, figure: float | None) -> float | None:
        if self._last is None:
            return None
        if self.clock() - self._last.at > STALE_AFTER * self.interval:
            return 0.0  # the sampler could not run on time: the loop is busy, nothing is idle
        return figure

    async def run(self, reclaimable: Callable[[], float] = lambda: 0.0) -> None:
        """Background task: a reading every interval, for as long as the gateway runs (returns at
        once where nothing can be read)."""
        if not self.measurable:
            return
        while True:
            self.sample(reclaimable())
            await anyio.sleep(self.interval)

    def sample(self, reclaimable_s: float = 0.0) -> None:
        """Take a reading; the figure is the average since the previous one."""
        now = Reading(self.clock(), self._host_idle_s(), self._cgroup_used_s(), reclaimable_s)
        last, self._last = self._last, now
        if last is None or now.at <= last.at:
            return
        span = now.at - last.at
        figures = []
        if now.host_idle_s is not None and last.host_idle_s is not None:
            figures.append((now.host_idle_s - last.host_idle_s) / span)
        for quota, used, used_before in zip(self.quotas, now.cgroup_used_s, last.cgroup_used_s, strict=True):
            if used is not None and used_before is not None:
                figures.append(quota.cores - (used - used_before) / span)
        if not figures:
            self._idle = self._left = None
            return
        left = min(figures)
        self._left = max(0.0, left)
        idle = max(0.0, left + (now.reclaimable_s - last.reclaimable_s) / span)
        self._recent.append((span, idle))
        mean = sum(s * i for s, i in self._recent) / sum(s for s, _ in self._recent)
        self._idle = min(idle, mean)

    def _host_idle_s(self) -> float | None:
        try:
            with open(self.proc / "stat", "rb") as f:
                lines = f.read().splitlines()
            idle = 0
            for line in lines[1:]:  # cpu0, cpu1, ...: the ones this process may run on
                fields = line.split()
                if fields and fields[0] in self._cpus:
                    idle += int(fields[4]) + int(fields[5])  # idle + iowait, in clock ticks
            return idle / self._ticks
        except (OSError, IndexError, ValueError):
            return None

    def _cgroup_used_s(self) -> tuple[float | None, ...]:
        return tuple(_usage_s(quota.folder) for quota in self.quotas)


def cgroup_quotas(proc: Path, root: Path) -> list[Quota]:
    """The CPU quotas of this process's cgroup (v2) and its ancestors, nearest first; none where
    none is set or the cgroup cannot be found."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None or ".." in Path(relative).parts:  # outside our view of the hierarchy
        return []
    folder, quotas = root / relative.lstrip("/"), []
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(Quota(folder, int(quota) / int(period)))
        except (OSError, ValueError, ZeroDivisionError):
            pass
        if folder == root or root not in folder.parents:
            return quotas
        folder = folder.parent


def _usage_s(folder: Path) -> float | None:
    """CPU seconds a cgroup used, all told (cpu.stat's usage_usec)."""
    try:
        for line in (folder / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    except (OSError, ValueError):
        pass
    return None


def _allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))
