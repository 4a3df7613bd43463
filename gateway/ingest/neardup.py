"""Near-duplicate frames: a frame nearly equal to a recent frame of the same device is recognised
at ingest, so that the uplink carries only what changed (`dedup.near_duplicates`).

Each device has a window of reference frames in memory: the last `near_window` frames, no older
than `near_window_s`, that were not near-duplicates themselves. Comparing with references only,
never with earlier near-duplicates, means a slow drift cannot creep past the filter one small step
at a time, and a scene is forwarded at least once per `near_window_s`. The windows start empty at
each start (the first frame of each device after a restart is always a reference): keeping them
would mean keeping thumbnails in the catalog, for the saving of one frame per device.

A frame is a near-duplicate of a reference when their difference hashes are within
`near_max_distance` bits and no region differs by more than `near_max_region_diff` gray levels
(`gateway.ingest.fingerprint`). Fingerprints are background work: they run in worker threads,
within a CPU budget (`near_cpu_share` of a core on average, a token bucket), and only while the
machine has CPU to spare (`near_min_idle_cores` idle, counting what fingerprints used:
`gateway.system.cpuidle`); otherwise the frame is stored unchecked rather than slowing ingest down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec

from gateway.config import DedupSettings
from gateway.ingest.fingerprint import Fingerprint, fingerprint, hamming, regions_within
from gateway.ops.metrics import Metrics
from gateway.system.cpuidle import IdleCpu

log = logging.getLogger("gateway.ingest.neardup")
QUEUED_PER_THREAD = 4  # fingerprints admitted (running or waiting) per thread before frames go unchecked
_THREAD_CLOCKS = hasattr(time, "pthread_getcpuclockid")  # another thread's CPU time can be read (not macOS)
# Of the idle cores asked for, the share that must be idle with fingerprints running: their own CPU
# counts as spare only while they leave some idle, not while they take it from ingest.
LEFT_IDLE_SHARE = 0.25
BURST_CPU_S = 1.0  # CPU seconds of fingerprinting that may be spent at once after a quiet spell


@dataclass(frozen=True, slots=True)
class Reference:
    """A stored frame that later frames of its device are compared with."""

    image_id: str
    batch_id: str
    storage_key: str
    at: float
    fingerprint: Fingerprint


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the filter found: the frame's dHash (None: not fingerprinted), the reference it nearly
    repeats (None: it does not), and the action (`keep`, `hold`, `reject`)."""

    fingerprint: Fingerprint | None = None
    of: Reference | None = None
    action: str = "keep"

    @property
    def dhash(self) -> int | None:
        return None if self.fingerprint is None else self.fingerprint.dhash


UNCHECKED = Verdict()


class _Annotations(msgspec.Struct):
    annotations: list[object] | None = None


def has_annotations(metadata: bytes | None) -> bool:
    """Whether the (already validated) metadata carries at least one annotation."""
    if not metadata:
        return False
    try:
        return bool(msgspec.json.decode(metadata, type=_Annotations).annotations)
    except msgspec.DecodeError:
        return False


class NearDuplicates:
    """The per-device windows of reference frames, and the fingerprint workers."""

    def __init__(self, settings: DedupSettings, metrics: Metrics, clock: Callable[[], float],
                 uploads_in_progress: Callable[[], int] = lambda: 0, idle_cpu: IdleCpu | None = None) -> None:
        """`idle_cpu`: the machine's idle CPU (None: fingerprint whatever the load, as in tests)."""
        self.settings = settings
        self.uploads_in_progress = uploads_in_progress
        self.metrics = metrics
        self.clock = clock
        self.idle_cpu = idle_cpu
        # An idle core is worth asking for only where there are cores to spare at all.
        self.min_idle_cores = 0.0 if idle_cpu is None else min(settings.near_min_idle_cores, idle_cpu.cores / 2)
        # CPU seconds fingerprints used, all told, those still running included (idle_cpu counts
        # them as spare): finished ones, and the CPU clock of each worker thread at work.
        self._cpu_lock = threading.Lock()
        self._cpu_done = 0.0
        self._cpu_running: dict[int, tuple[int, float]] = {}  # thread id: its CPU clock, its CPU time at start
        self._windows: dict[str, deque[Reference]] = {}
        self._limiter = anyio.CapacityLimiter(settings.near_fingerprint_threads)
        self._admitted = 0
        self._budget = BURST_CPU_S  # CPU seconds fingerprints may spend now
        self._budget_at = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.settings.near_duplicates != "off"

    async def watch_cpu(self) -> None:
        """Background task: the machine's idle CPU, read every `cpuidle.INTERVAL_S`, fingerprints'
        own CPU counted as spare (they would stop if it were needed)."""
        if not (self.enabled and self.min_idle_cores and self.idle_cpu):
            return
        if not self.idle_cpu.measurable:
            log.warning("idle CPU cannot be read here (no /proc/stat): frames are fingerprinted whatever the load")
            return
        quota = self.idle_cpu.quota
        log.info("fingerprints while %.2g of %.3g cores are idle%s", self.min_idle_cores, self.idle_cpu.cores,
                 f" (CPU quota of cgroup {quota.folder})" if quota else "")
        await self.idle_cpu.run(self.cpu_used)

    def cpu_used(self) -> float:
        """CPU seconds fingerprints have used so far, those still running included: a large
        frame's fingerprint is credited as it runs, not all at once when it ends."""
        with self._cpu_lock:
            running = sum(time.clock_gettime(clock) - start for clock, start in self._cpu_running.values())
            return self._cpu_done + running

    def admit(self) -> bool:
        """Whether a frame arriving now is fingerprinted; if not, it is stored unchecked (counted by
        reason). Decided on the event loop, before any task is made for the frame."""
        reason = self._refusal()
        if reason is None:
            return True
        self.metrics.fingerprints.labels(reason).inc()
        return False

    async def judge(self, device_id: str, source: bytes | Path, metadata: bytes | None, size: int) -> Verdict:
        """Fingerprint an admitted frame (in a worker thread) and compare it with its device's
        references."""
        refs = self._recent(device_id)
        self._admitted += 1
        try:
            fp, ref, cpu = await anyio.to_thread.run_sync(self._compare, source, refs, limiter=self._limiter)
        finally:
            self._admitted -= 1
        self._budget -= cpu
        self.metrics.fingerprint_cpu_seconds.inc(cpu)
        self.metrics.fingerprints.labels("undecodable" if fp is None else "done").inc()
        if ref is None:
            return Verdict(fingerprint=fp)
        action = self.settings.near_duplicates
        if action != "keep" and not self.settings.near_duplicates_include_annotated and has_annotations(metadata):
            action = "keep"  # the device saw something in this frame: it goes through
        self.metrics.near_duplicates.labels(device_id, action).inc()
        if action != "keep":
            self.metrics.near_duplicate_bytes_not_sent.inc(size)
        return Verdict(fingerprint=fp, of=ref, action=action)

    def _refusal(self) -> str | None:
        """Why one more fingerprint may not start now (None: it may): the workers' queue full, less
        CPU idle than asked for, too many uploads in progress, or the CPU budget spent."""
        if self._admitted >= QUEUED_PER_THREAD * self.settings.near_fingerprint_threads:
            return "busy"
        if self.min_idle_cores and self.idle_cpu is not None:
            spare, left = self.idle_cpu.idle_cores(), self.idle_cpu.left_idle()
            # The second: fingerprints crowd ingest out, and what they would give back is not idle.
            if (spare is not None and spare < self.min_idle_cores) or (
                    left is not None and left < LEFT_IDLE_SHARE * self.min_idle_cores):
                return "no_idle_cpu"
        busy = self.settings.near_busy_uploads
        if busy and self.uploads_in_progress() > busy:
            return "busy"
        now = time.monotonic()
        self._budget = min(BURST_CPU_S, self._budget + (now - self._budget_at) * self.settings.near_cpu_share)
        self._budget_at = now
        return None if self._budget > 0 else "busy"

    def _compare(
        self, source: bytes | Path, refs: tuple[Reference, ...]
    ) -> tuple[Fingerprint | None, Reference | None, float]:
        """The frame's fingerprint, the reference it nearly repeats, and the CPU seconds spent."""
        started = time.thread_time()
        thread = threading.get_ident()
        if _THREAD_CLOCKS:
            with self._cpu_lock:
                self._cpu_running[thread] = (time.pthread_getcpuclockid(thread), started)
        try:
            fp = fingerprint(source)
            match = None
            if fp is not None:
                for ref in reversed(refs):  # newest first
                    if hamming(fp.dhash, ref.fingerprint.dhash) > self.settings.near_max_distance:
                        continue
                    if regions_within(fp, ref.fingerprint, self.settings.near_max_region_diff):
                        match = ref
                        break
        finally:
            spent = time.thread_time() - started
            with self._cpu_lock:
                self._cpu_running.pop(thread, None)
                self._cpu_done += spent
        return fp, match, spent

    def _recent(self, device_id: str) -> tuple[Reference, ...]:
        window = self._windows.get(device_id)
        if not window:
            return ()
        oldest = self.clock() - self.settings.near_window_s
        while window and window[0].at < oldest:
            window.popleft()
        return tuple(window)

    def remember(self, device_id: str, verdict: Verdict, image_id: str, batch_id: str, storage_key: str) -> None:
        """A stored frame that was not a near-duplicate becomes a reference of its device."""
        if verdict.fingerprint is None or verdict.of is not None:
            return
        window = self._windows.get(device_id)
        if window is None:
            window = self._windows[device_id] = deque(maxlen=self.settings.near_window)
        window.append(Reference(image_id=image_id, batch_id=batch_id, storage_key=storage_key, at=self.clock(),
                                fingerprint=verdict.fingerprint))
