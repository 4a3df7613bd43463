"""`Signal`: a one-way "look again" from producers to the consumer built with it.

The composition root makes a signal first and hands it to both sides, so a producer (the catalog
writer, the key checker, an admin route) tells the forwarder without importing it or holding it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class Signal:
    """Fired from any thread; listeners run on the event loop given to `bind` (the server's)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def listen(self, listener: Callable[[], None]) -> None:
        """Called by the consumer's constructor: `listener` runs on the loop at every `fire`."""
        self._listeners.append(listener)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the listeners run on (the runtime's `start`); until then a fire reaches nobody,
        which is harmless: nothing waits on it, and every consumer looks at its state when it starts."""
        self._loop = loop

    def fire(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:  # a worker thread (the catalog writer)
            on_loop = False
        if on_loop:
            self._deliver()
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        for listener in self._listeners:
            listener()
