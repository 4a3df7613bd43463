"""Progress for long CLI work (`verify`, `drain`): a bar on stderr, only when stderr is a terminal.

    with Progress(total=len(items), label="verify") as bar:     # total None: unknown (set_total later)
        for item in items:
            ...
            bar.advance()            # or bar.advance(1, nbytes=size) to show bytes/s too

`ProgressBar` is the same bar in the drain job's words (`start(images, bytes)`, `advance(images=,
nbytes=)`, `note(text)`, `finish()`), and `RateLimit` caps bytes/s across threads.
Stdout stays clean for `--json`; redirected stderr (cron, CI, pipes) gets no bar at all.
Thread-safe: worker threads may share one bar. No dependency.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from gateway.humanize import human_age, human_bytes

BAR_WIDTH = 24


class Progress:
    """Counts work done out of `total` (None: unknown) and redraws one line at most every `interval_s`.

    `enabled`: None draws only when `stream` is a terminal; True/False force it on or off.
    """

    def __init__(
        self,
        total: int | None,
        label: str = "",
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.total_bytes: int | None = None  # when known, progress is measured in bytes
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else enabled
        self.interval_s = interval_s
        self.clock = clock
        self.done = 0
        self.nbytes = 0
        self.started = clock()
        self._drawn_at = float("-inf")
        self._width = 0
        self._lock = threading.Lock()

    def advance(self, n: int = 1, nbytes: int = 0) -> None:
        """Record `n` more items (and `nbytes` more bytes; negative undoes a partial transfer) done."""
        with self._lock:
            self.done += n
            self.nbytes += nbytes
            self._draw()

    def set_total(self, total: int | None) -> None:
        """The total, once known (e.g. after listing the work)."""
        with self._lock:
            self.total = total
            self._draw(force=True)

    def line(self) -> str:
        """The text of the bar as it stands (also what tests look at)."""
        elapsed = max(self.clock() - self.started, 1e-9)
        total_bytes = self.total_bytes
        # How far along: by bytes when their total is known (image sizes vary), else by count.
        if total_bytes:
            frac: float | None = min(1.0, max(0.0, self.nbytes / total_bytes))
        elif self.total:
            frac = min(1.0, self.done / self.total)
        else:
            frac = None
        parts = [self.label] if self.label else []
        if frac is not None:
            filled = int(frac * BAR_WIDTH)
            parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + f"] {frac * 100:3.0f}%")
        parts.append(f"{self.done}/{self.total}" if self.total else str(self.done))
        if total_bytes:
            parts.append(f"{human_bytes(self.nbytes)}/{human_bytes(total_bytes)}")
        parts.append(f"{self.done / elapsed:.1f}/s")
        if self.nbytes:
            parts.append(f"{human_bytes(self.nbytes / elapsed)}/s")
        if frac is not None and 0 < frac < 1:
            parts.append(f"ETA {human_age(elapsed * (1 - frac) / frac)}")
        elif frac is not None and frac >= 1:
            parts.append(f"in {human_age(elapsed)}")
        return " ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self._drawn_at < self.interval_s:
            return
        self._drawn_at = now
        text = self.line()
        pad = " " * max(0, self._width - len(text))  # wipe what a longer previous line left behind
        self._width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line; later calls do nothing."""
        with self._lock:
            if self.enabled:
                self._draw(force=True)
                self.stream.write("\n")
                self.stream.flush()
                self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressBar(Progress):
    """The same bar with the drain job's vocabulary: totals known later, counts in images and bytes.

        bar = ProgressBar(enabled=not args.quiet, label="drain")
        bar.start(total_images, total_bytes)     # either may be None
        bar.advance(images=1, nbytes=size)       # nbytes alone for a chunk; negative undoes a partial one
        bar.note("batch_x drained")              # a line above the bar (printed even when not a terminal)
        bar.finish()

    `enabled=False` silences it all; otherwise the bar is drawn only on a terminal.
    """

    def __init__(self, *, enabled: bool = True, label: str = "", stream: TextIO | None = None,
                 interval_s: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(None, label, stream=stream, enabled=None if enabled else False, interval_s=interval_s,
                         clock=clock)
        self.notes_on = enabled

    def start(self, total: int | None = None, total_bytes: int | None = None) -> None:
        with self._lock:
            self.total, self.total_bytes = total, total_bytes
            self.started = self.clock()
            self._draw(force=True)

    def advance(self, images: int = 0, nbytes: int = 0) -> None:
        super().advance(images, nbytes)

    def note(self, text: str) -> None:
        if not self.notes_on:
            return
        with self._lock:
            if self.enabled:
                self.stream.write("\r" + " " * self._width + "\r")
                self._width = 0
            self.stream.write(text + "\n")
            self._draw(force=True)
            self.stream.flush()

    def finish(self) -> None:
        self.close()


class RateLimit:
    """Caps throughput across threads at `bytes_per_s` (0: unlimited); `spend(n)` sleeps as needed.

    Up to `burst_s` seconds of unused allowance carry over, so short pauses are not penalised.
    """

    def __init__(self, bytes_per_s: int, *, burst_s: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.bytes_per_s = bytes_per_s
        self.burst_s = burst_s
        self.clock = clock
        self.sleep = sleep
        self._next = clock()
        self._lock = threading.Lock()

    def spend(self, n: int) -> None:
        if self.bytes_per_s <= 0 or n <= 0:
            return
        with self._lock:
            now = self.clock()
            self._next = max(self._next, now - self.burst_s) + n / self.bytes_per_s
            wait = self._next - now
        if wait > 0:
            self.sleep(wait)
