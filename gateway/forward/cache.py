"""The forward cache: local copies of images waiting for the cloud, so that the forwarder sends
them without reading each back from the object store.

With an object store, forwarding an image from the store costs a GET, more CPU than the POST
itself (figures: docs/design.md, "Measured figures behind the code"). An upload that is forwarded
later leaves its bytes here instead (written by one background thread after the upload is
answered, or the spool file renamed in), and the forwarder takes them from here.

Only a cache, never a copy the gateway depends on:
- the object store keeps the bytes; a miss (not cached, cache full, file gone or damaged) means
  the forwarder reads the store as before;
- a file is used only if its size and XXH3-128 match the catalog's, checked before a byte is sent;
- files are known through an in-memory index: the folder is emptied at start (its files are not
  worth a recovery), and a file counts only once written whole;
- it stays under `forward.cache_bytes` and never takes the data folder's disk below twice
  `limits.min_free_disk_bytes`; below the floor, `CapacityGuard` empties it before refusing uploads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
from pathlib import Path

import xxhash

from gateway.system.osthread import name_this_thread

log = logging.getLogger("gateway.forward")

MAX_IMAGE_BYTES = 8 * 1024 * 1024  # larger images are rare; they are read from the store
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # preadv2's "only what is in memory" (Linux)
QUEUED_BYTES = 32 * 1024 * 1024  # bytes waiting for the writer thread; past it an image is not cached


class ForwardCache:
    def __init__(self, folder: Path, max_bytes: int, disk_floor: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.disk_floor = disk_floor  # free bytes the cache never takes the disk below
        self.hits = 0
        self.misses = 0
        self._index: dict[str, int] = {}  # name -> size, of whole files only
        self._removing: dict[str, int] = {}  # dropped, the file not yet removed: name -> size
        self._queued_names: set[str] = set()  # offered, not yet written (drop() takes a name out)
        self._bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, bytes | None] | None] = queue.SimpleQueue()  # None: remove
        self._queued = 0
        self._writer: threading.Thread | None = None

    @property
    def size(self) -> int:
        """Bytes of the copies held (and being written)."""
        return self._bytes

    @property
    def count(self) -> int:
        return len(self._index)

    def open(self) -> None:
        """Start empty: whatever an earlier run left is removed (the store holds those bytes)."""
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=5)
            self._writer = None

    # -- filling (upload side) ----------------------------------------------------------------

    def offer(self, name: str, data: bytes) -> bool:
        """Keep a copy of `data` (written by the cache's thread); False if it is not taken."""
        size = len(data)
        with self._lock:
            if (size > MAX_IMAGE_BYTES or self._queued + size > QUEUED_BYTES
                    or self._bytes + self._queued + size > self.max_bytes):
                return False
            self._queued += size
            self._queued_names.add(name)
        self._start_writer()
        self._queue.put((name, data))
        return True

    def _start_writer(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="fwd-cache", daemon=True)
                self._writer.start()

    def adopt(self, name: str, path: Path, size: int) -> bool:
        """Move a finished spool file in (a rename); False if it is not taken (the caller removes it)."""
        if size > MAX_IMAGE_BYTES or not self._reserve(size):
            return False
        try:
            os.rename(path, self.folder / name)
        except OSError:
            self._release(size)
            return False
        with self._lock:
            self._index[name] = size
        return True

    def _write_loop(self) -> None:
        name_this_thread("fwd-cache")
        while (item := self._queue.get()) is not None:
            name, data = item
            if data is None:
                with self._lock:
                    size = self._removing.pop(name, 0)
                self._remove(name, size)
                continue
            try:
                self._write(name, data)
            finally:
                with self._lock:
                    self._queued -= len(data)

    def _write(self, name: str, data: bytes) -> None:
        if not self._reserve(len(data)):
            with self._lock:
                self._queued_names.discard(name)
            return
        path = self.folder / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            self._release(len(data))
            with self._lock:
                self._queued_names.discard(name)
            with contextlib.suppress(OSError):
                os.unlink(path)
            log.debug("forward cache: could not keep %s: %s", name, exc)
            return
        with self._lock:
            wanted = name in self._queued_names
            self._queued_names.discard(name)
            if wanted:
                self._index[name] = len(data)
                return
            self._bytes -= len(data)  # dropped while it was being written
        with contextlib.suppress(OSError):
            os.unlink(path)

    def _reserve(self, size: int) -> bool:
        """Count `size` bytes in, if both the cap and the disk floor allow."""
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return False
        with self._lock:
            if self._bytes + size > self.max_bytes or free - size < self.disk_floor:
                return False
            self._bytes += size
        return True

    def _release(self, size: int) -> None:
        with self._lock:
            self._bytes -= size

    # -- using (forwarder side) -----------------------------------------------------------------

    def read(self, name: str, size: int, xxh3_128: str) -> bytes | None:
        """The cached bytes, if whole and as recorded; otherwise None (and a bad copy is dropped)."""
        with self._lock:
            known = self._index.get(name)
            if known is None:
                self.misses += 1  # counted under the lock: the forwarder's threads all read
                return None
        data = b""
        try:  # three system calls: each gives the GIL back and must take it again
            fd = os.open(self.folder / name, os.O_RDONLY)
            try:
                data = os.read(fd, size + 1)
            finally:
                os.close(fd)
        except OSError:
            pass
        return data if self._checked(name, known, size, xxh3_128, data) else None

    def read_from_memory(self, name: str, size: int, xxh3_128: str) -> bytes | bytearray | None:
        """`read`, for the event loop: the copy only if the kernel holds all of it in memory (the
        page cache), so that reading it cannot wait on the disk. None, with nothing counted or
        dropped, when there is no copy, a part of it would have to come from the disk, or it is
        not as recorded: `read` then decides, in a thread."""
        if _NOWAIT is None or self._index.get(name) != size:
            return None
        buf = bytearray(size + 1)
        try:
            fd = os.open(self.folder / name, os.O_RDONLY)
            try:
                got = os.preadv(fd, [buf], 0, _NOWAIT)
            finally:
                os.close(fd)
        except OSError:  # EAGAIN: not all in memory; or no such file (a thread's read will tell)
            return None
        if got != size:  # a short read: the rest is on the disk (or the copy is not as recorded)
            return None
        del buf[size:]
        if xxhash.xxh3_128_hexdigest(buf) != xxh3_128:
            return None  # a bad copy: `read` finds it again, drops it and counts the miss
        with self._lock:
            self.hits += 1
        return buf

    def _checked(self, name: str, known: int, size: int, xxh3_128: str, data: bytes | bytearray) -> bool:
        """Whether `data` is the copy as recorded (counted as a hit); a bad copy is dropped."""
        if known != size or len(data) != size or xxhash.xxh3_128_hexdigest(data) != xxh3_128:
            log.warning("forward cache: copy of %s is not as recorded; reading the store", name)
            self.drop(name)
            with self._lock:
                self.misses += 1
            return False
        with self._lock:
            self.hits += 1
        return True

    def drop(self, name: str) -> None:
        """Forget a copy (delivered, or given up on). The file goes in the cache's thread: removing
        a freshly written 1 MiB file took the forwarder's threads about as long as sending it."""
        with self._lock:
            self._queued_names.discard(name)
            size = self._index.pop(name, None)
            if size is None:
                return
            self._removing[name] = size
        self._start_writer()
        self._queue.put((name, None))

    def clear(self) -> int:
        """Remove every copy now (the disk is nearly full); returns the bytes freed."""
        with self._lock:
            doomed, self._index = self._index, {}
        for name, size in doomed.items():
            self._remove(name, size)
        return sum(doomed.values())

    def _remove(self, name: str, size: int) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.folder / name)
        self._release(size)
