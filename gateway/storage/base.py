"""The `ObjectStore` interface shared by the folder and S3 backends.

Every method but `put_bytes_async` and `read_async` blocks (file system or the `minio` client):
callers on the event loop go through `anyio.to_thread`.
Backends raise `InsufficientStorage` for a full disk or quota and
`ServiceUnavailable` when the store cannot be reached.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import msgspec

CHUNK = 256 * 1024


class ObjectInfo(msgspec.Struct, frozen=True):
    key: str
    size: int
    modified: float  # unix seconds


class ObjectStore(Protocol):
    name: str

    def ensure_ready(self) -> None:
        """Create what the store needs (bucket, folder) and prove it answers; raises if not."""

    def put_file(self, key: str, path: Path, size: int, content_type: str) -> None:
        """Store the file at `path` (already complete and closed) under `key`, durably."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    async def put_bytes_async(self, key: str, data: bytes, content_type: str) -> None:
        """`put_bytes`, called from the event loop (the S3 store sends it from there)."""

    def close(self) -> None:
        """Let go of connections and handles; the store is not used afterwards."""

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes, streamed; raises `KeyError` when there is no such object."""

    async def read_async(self, key: str) -> AsyncIterator[bytes]:
        """`iter_chunks` from the event loop: found (else `KeyError`) before it returns; close
        the iterator (`aclose`) when not read to its end."""

    def stat(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None:
        """Remove `key`; no error when it is already gone."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

