"""Worker threads for blocking calls that may wait on the network for a long time.

Unlike anyio's worker threads (and `concurrent.futures`), these are daemon threads: a call stuck
on a stalled peer never holds up the process's exit. A cancelled caller stops waiting at once;
the call itself runs on and its result is dropped, so calls must tidy up after themselves (and
should watch a stop flag the caller sets on cancellation, see `Forwarder._attempt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.osthread import name_this_thread

T = TypeVar("T")


class DaemonPool:
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in one of the pool's threads and return (or raise) what it did."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._start_threads()
        self._queue.put((fn, args, loop, future))
        return await future

    def _start_threads(self) -> None:
        if len(self._threads) >= self.size:
            return
        with self._lock:
            while len(self._threads) < self.size:
                name = f"{self.name}-{len(self._threads)}"
                t = threading.Thread(target=self._work, args=(name,), name=name, daemon=True)
                t.start()
                self._threads.append(t)

    def _work(self, name: str) -> None:
        name_this_thread(name)
        while True:
            fn, args, loop, future = self._queue.get()
            if future.cancelled():
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller, whatever it is
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, future, result, error)
            del fn, args, future, result, error


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
