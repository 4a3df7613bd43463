"""Uploads recorded in the catalog whose objects may not be in the store yet.

An upload's catalog record and its PUT run side by side (`Ingestor`), so for a few milliseconds
its row can be in the catalog before its object is in the store, and a PUT that fails withdraws
a row already written. After a crash, a leftover upload intent may name such a row until the
reconciliation settles it. What reads an image's bytes on its own initiative (the forwarder)
leaves these images alone, and `watch`es them to look again once they are settled; a device never
learns of one, since it is answered only after both (and a retry of its bytes meanwhile is asked
to come back later). Withdrawn images are remembered a while, for a reader that saw the row
before it went.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from gateway.notify import Signal

GONE_KEPT = 4096  # withdrawn ids remembered (a reader's query may have returned them just before)


class StoringImages:
    """Image ids whose objects are not known to be in the store (the event loop and worker threads)."""

    def __init__(self, settled: Signal | None = None) -> None:
        """`settled`: fired when a watched image leaves (its object stored, or its record withdrawn)."""
        self._ids: set[str] = set()
        self._watched: set[str] = set()
        self._gone: OrderedDict[str, None] = OrderedDict()  # withdrawn, most recent last
        self._lock = threading.Lock()
        self.settled = settled

    def add(self, image_id: str) -> None:
        with self._lock:
            self._ids.add(image_id)

    def discard(self, image_id: str, withdrawn: bool = False) -> None:
        """The image's object is stored, or (`withdrawn`) its record is gone."""
        with self._lock:
            self._ids.discard(image_id)
            if withdrawn:
                self._gone[image_id] = None
                if len(self._gone) > GONE_KEPT:
                    self._gone.popitem(last=False)
            if image_id not in self._watched:
                return
            self._watched.discard(image_id)
        if self.settled is not None:
            self.settled.fire()

    def watch(self, image_id: str) -> bool:
        """True if the image is storing (`settled` then fires when it leaves) or was withdrawn."""
        with self._lock:
            if image_id in self._gone:
                return True
            if image_id not in self._ids:
                return False
            self._watched.add(image_id)
            return True

    def __contains__(self, image_id: object) -> bool:
        """Storing, or withdrawn lately: either way not an image to read or to answer with."""
        with self._lock:
            return image_id in self._ids or image_id in self._gone

    def __len__(self) -> int:
        return len(self._ids)
