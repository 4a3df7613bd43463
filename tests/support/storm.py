"""Devices uploading without pause while something breaks, with every answer kept for the verdict.

``Storm(url, keys)`` runs one thread per device key, each with its own HTTP client, sending fresh
JPEGs (random bytes, so none is a duplicate) until ``stop()``. Each answer is an ``Attempt``:
when it was sent and answered, its status, ``Retry-After``, the ids of a 2xx and the XXH3-128 of
what was sent. ``ReadyWatch`` polls ``/api/ready`` the same way. The figures (``recovery``,
``back_to_speed``) are read from those records afterwards.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import xxhash

from gateway.envelope import read_envelope

UPLOAD = "/api/device/images/upload"
KiB = 1024


@dataclass(frozen=True)
class Attempt:
    """One upload and its answer (status 0: the connection failed, no answer at all)."""

    device: int
    sent: float
    answered: float
    status: int
    retry_after: str | None
    code: str | None
    data: dict[str, Any] | None
    xxh3: str

    @property
    def acked(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class Storm:
    """One uploading thread per device key until ``stop()``; ``attempts`` holds every answer."""

    url: str
    keys: list[str]
    sizes: tuple[int, ...] = (32 * KiB, 128 * KiB, 512 * KiB)
    attempts: list[Attempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, key), daemon=True, name=f"storm-{i}")
                         for i, key in enumerate(self.keys)]

    def start(self) -> Storm:
        for thread in self._threads:
            thread.start()
        return self

    def wait_acked(self, count: int, timeout: float = 60.0) -> float:
        """Block until `count` uploads were acknowledged (the gateway and store are warm); when."""
        deadline = time.monotonic() + timeout
        while sum(1 for a in list(self.attempts) if a.acked) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} uploads acknowledged in {timeout:g} s")
            time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> list[Attempt]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return self.attempts

    def _run(self, device: int, key: str) -> None:
        rng = random.Random(secrets.randbits(64))
        with httpx.Client(timeout=90) as client:
            while not self._stop.is_set():
                image = b"\xff\xd8\xff\xe0" + rng.randbytes(rng.choice(self.sizes))
                sent = time.monotonic()
                try:
                    resp = client.post(self.url + UPLOAD, headers={"X-Device-Key": key},
                                       files={"image": (f"d{device}.jpg", image, "image/jpeg")})
                    status, retry, answer = resp.status_code, resp.headers.get("retry-after"), read_envelope(
                        resp.content)
                except httpx.HTTPError:
                    status, retry, answer = 0, None, read_envelope(b"")
                if not answer.is_object:  # not an envelope: counted as no answer
                    status, retry = 0, None
                attempt = Attempt(device, sent, time.monotonic(), status, retry, answer.error.code or None,
                                  answer.data if 200 <= status < 300 else None,
                                  xxhash.xxh3_128_hexdigest(image))
                with self._lock:
                    self.attempts.append(attempt)
                if status == 503:  # as a well-behaved device would, but briefly: keep the pressure on
                    self._stop.wait(0.2)


@dataclass
class ReadyWatch:
    """Polls ``/api/ready`` every 0.1 s in a thread; ``seen`` holds (time, status)."""

    url: str
    seen: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ready-watch")

    def start(self) -> ReadyWatch:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(30)
        return self.seen

    def first(self, status: int, after: float) -> float | None:
        """When `status` was first seen after `after`."""
        return next((t for t, s in self.seen if t >= after and s == status), None)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    status = client.get(self.url + "/api/ready").status_code
                except httpx.HTTPError:
                    status = 0
                self.seen.append((time.monotonic(), status))
                self._stop.wait(0.1)


def recovery(attempts: list[Attempt], died: float, back: float, since: float | None = None) -> float:
    """Seconds from `since` (default `died`) until uploads succeed again: the answer time of the
    first 2xx sent after the last failed upload that was sent while the server was away (no
    failure: the first 2xx sent after `died`)."""
    failed = [a.sent for a in attempts if died <= a.sent < back and not a.acked]
    after = max(failed) if failed else died
    ok = [a.answered for a in attempts if a.acked and a.sent >= after]
    return round(min(ok) - (died if since is None else since), 2) if ok else float("nan")


def rate(attempts: list[Attempt], start: float, end: float) -> float:
    """Acknowledged uploads per second answered in [start, end)."""
    return sum(1 for a in attempts if a.acked and start <= a.answered < end) / max(1e-9, end - start)


def back_to_speed(attempts: list[Attempt], before: tuple[float, float], back: float, end: float,
                  share: float = 0.8, window: float = 2.0) -> tuple[float, float]:
    """(seconds from `back` until a `window`-second span runs at `share` of the rate of acknowledged
    uploads in `before` (counted from its first 2xx), that rate). NaN when not reached by `end`."""
    start, stop = before
    first = min((a.answered for a in attempts if a.acked and start <= a.answered < stop), default=stop)
    baseline = rate(attempts, first, stop) if stop - first >= 1.0 else float("nan")
    for t in _steps(back, end - window, 0.25):
        if rate(attempts, t, t + window) >= share * baseline:
            return round(t + window - back, 2), round(baseline, 1)
    return float("nan"), round(baseline, 1)


def _steps(start: float, stop: float, step: float) -> list[float]:
    out, t = [], start
    while t <= stop:
        out.append(t)
        t += step
    return out
