"""How many CPU cores the machine left idle lately: the sign that background work (near-duplicate
fingerprints) can run without taking CPU from ingest.

Two readings, the smaller wins:
- the host's idle time from /proc/stat (idle + iowait, all CPUs);
- where the gateway's cgroup (v2) has a CPU quota (`podman run --cpus`), the quota less what the
  cgroup used (cpu.stat), since a throttled container sees an idle host.

`run` takes a reading every `interval` seconds (a background task); `idle_cores()` answers the
last interval's figure at once, or None before the first interval, when readings stopped, or where
neither file can be read (not Linux). The caller's own deferrable work counts as idle (its running
CPU total, `reclaimable`), so that background work which stops when the machine is busy does not
stop itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio

INTERVAL_S = 0.2  # short: a burst after a quiet spell is seen within this
STALE_AFTER = 3  # intervals: a figure older than this is not an answer (the sampler stopped)


class IdleCpu:
    """Idle cores over the last interval."""

    def __init__(self, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                 clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL_S) -> None:
        self.proc = proc
        self.clock = clock
        self.interval = interval
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._cgroup = _quota_cgroup(proc, cgroup_root)
        # when, host idle seconds, cgroup used seconds, the caller's reclaimable seconds
        self._last: tuple[float, float | None, float | None, float] | None = None
        self._idle: float | None = None

    @property
    def cores(self) -> float:
        """CPUs this process may use: its affinity, or the cgroup's quota where smaller."""
        try:
            cpus = float(len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            cpus = float(os.cpu_count() or 1)
        return min(cpus, self._cgroup[1]) if self._cgroup else cpus

    def idle_cores(self) -> float | None:
        """Idle cores over the last interval, plus the cores the caller's reclaimable work used in
        it (None: not known)."""
        if self._last is None or self.clock() - self._last[0] > STALE_AFTER * self.interval:
            return None
        return self._idle

    async def run(self, reclaimable: Callable[[], float] = lambda: 0.0) -> None:
        """Background task: a reading every interval, for as long as the gateway runs."""
        while True:
            self.sample(reclaimable())
            await anyio.sleep(self.interval)

    def sample(self, reclaimable_s: float = 0.0) -> None:
        """Take a reading; the figure is the average since the previous one."""
        now = self.clock()
        reading = (now, self._host_idle_s(), self._cgroup_used_s(), reclaimable_s)
        if self._last is not None and now > self._last[0]:
            span = now - self._last[0]
            figures = []
            if reading[1] is not None and self._last[1] is not None:
                figures.append((reading[1] - self._last[1]) / span)
            if reading[2] is not None and self._last[2] is not None and self._cgroup:
                figures.append(self._cgroup[1] - (reading[2] - self._last[2]) / span)
            reclaimed = (reclaimable_s - self._last[3]) / span
            self._idle = max(0.0, min(figures) + reclaimed) if figures else None
        self._last = reading

    def _host_idle_s(self) -> float | None:
        try:
            with open(self.proc / "stat", "rb") as f:
                fields = f.readline().split()
            return (int(fields[4]) + int(fields[5])) / self._ticks  # idle + iowait, in jiffies
        except (OSError, IndexError, ValueError):
            return None

    def _cgroup_used_s(self) -> float | None:
        if self._cgroup is None:
            return None
        try:
            for line in (self._cgroup[0] / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
        except (OSError, ValueError):
            pass
        return None


def _quota_cgroup(proc: Path, root: Path) -> tuple[Path, float] | None:
    """The nearest cgroup (v2) of this process, itself or an ancestor, with a CPU quota, and the
    quota in cores; None where there is none."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    folder = root / relative.lstrip("/")
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                return folder, int(quota) / int(period)
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            return None
        folder = folder.parent
