"""Folder storage (the embedded default): objects are files under `<data>/objects/<key>`.

A finished spool file is hard-linked into place (same file system: no copy), after an fsync of
the file and followed by an fsync of its folder, so an acknowledged object survives a power cut.
Temp files (a copy in progress, the readiness probe) live in `<data>/objects/.tmp/`: no storage
key may start with a dot, so no object can be mistaken for a temp file or hidden as one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio

from gateway.errors import InsufficientStorage, ServiceUnavailable, ValidationFailed
from gateway.storage.base import CHUNK, ObjectInfo
from gateway.system.files import fsync_dir

_FULL = {errno.ENOSPC, errno.EDQUOT}
_NAME_REFUSED = {errno.ENAMETOOLONG, errno.EILSEQ}  # the file system will not take this name
TMP_DIR = ".tmp"
STALE_TMP_S = 3600.0  # temp files older than this were left by a crash: removed by `ensure_ready`


class FolderStore:
    name = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if key.startswith((".", "/")) or ".." in key.split("/"):
            raise ValueError(f"bad object key {key!r}")
        return self.root / key

    def _tmp_path(self) -> Path:
        """A fresh temp file name, in the folder no storage key can reach."""
        return self.root / TMP_DIR / uuid.uuid4().hex

    def ensure_ready(self) -> None:
        try:
            (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
            # A name of its own per call: concurrent readiness checks must not race on one file.
            probe = self.root / TMP_DIR / f"ready-probe-{os.getpid()}-{threading.get_ident()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            self._sweep_tmp()
        except OSError as exc:
            raise _store_error(exc) from exc

    def _sweep_tmp(self) -> None:
        """Remove temp files a crash left behind (old enough that no write can still own them)."""
        cutoff = time.time() - STALE_TMP_S
        with os.scandir(self.root / TMP_DIR) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue

    def put_file(self, key: str, path: Path, size: int, content_type: str) -> None:
        dest = self._path(key)
        tmp: Path | None = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(path, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                tmp = self._tmp_path()
                tmp.parent.mkdir(exist_ok=True)
                shutil.copyfile(path, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise _store_error(exc) from exc

    async def put_bytes_async(self, key: str, data: bytes, content_type: str) -> None:
        await anyio.to_thread.run_sync(self.put_bytes, key, data, content_type)

    def close(self) -> None:
        pass

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        dest = self._path(key)
        tmp = self._tmp_path()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _store_error(exc) from exc

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            fh = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise _store_error(exc) from exc
        return _read_chunks(fh, chunk_size)

    async def read_async(self, key: str) -> AsyncIterator[bytes]:
        chunks = await anyio.to_thread.run_sync(self.iter_chunks, key)
        return _chunks_async(chunks)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error(exc) from exc
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _store_error(exc) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirs, files in os.walk(base):
            if Path(dirpath) == self.root:
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # temp files: no key starts with a dot
                files = [f for f in files if not f.startswith(".")]
            for fname in files:
                full = Path(dirpath) / fname
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(key, st.st_size, st.st_mtime)


def _read_chunks(fh: object, chunk_size: int) -> Iterator[bytes]:
    import io

    assert isinstance(fh, io.BufferedReader)
    with fh:
        while chunk := fh.read(chunk_size):
            yield chunk



def _store_error(exc: OSError) -> Exception:
    if exc.errno in _FULL:
        return InsufficientStorage("Local disk is full", str(exc))
    if exc.errno in _NAME_REFUSED:  # the name's fault, not the store's: retrying will not help
        return ValidationFailed("File name refused by the storage", "choose a shorter or plainer file name")
    return ServiceUnavailable("Local storage unavailable", str(exc))


async def _chunks_async(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A blocking iterator read one chunk per worker-thread call; closed even when left early."""
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
