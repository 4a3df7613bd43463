"""Streaming multipart/form-data reader for uploads: one pass over the body, nothing buffered whole.

The `image` part goes straight to a spool file while its XXH3-128 is computed, its first bytes
sniffed and its size checked against the limit; reading stops at the first byte over the limit
(413) or as soon as the first bytes show it is neither JPEG nor PNG (415). The `metadata` part is
kept in memory up to its own small limit. Other parts are read and dropped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import xxhash
from multipart import MultipartError, MultipartSegment, ParserLimitReached, PushMultipartParser, parse_options_header

from gateway.errors import (
    GatewayError,
    InsufficientStorage,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from gateway.humanize import human_bytes

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PARTS = 16
MAX_PART_HEADER_BYTES = 8 * 1024


def image_too_large(max_image_bytes: int) -> PayloadTooLarge:
    """The one 413 an upload gets, whichever check saw it first: it names the setting and its size."""
    return PayloadTooLarge("Image is too large", f"limits.max_image_bytes is {max_image_bytes} bytes "
                           f"({human_bytes(max_image_bytes)}); the request may carry that plus the metadata")


def sniff(head: bytes) -> str | None:
    if head.startswith(PNG_MAGIC):
        return "image/png"
    if head.startswith(JPEG_MAGIC):
        return "image/jpeg"
    return None


def could_still_match(head: bytes) -> bool:
    return PNG_MAGIC.startswith(head[:8]) or JPEG_MAGIC.startswith(head[:3])


class SpooledImage(msgspec.Struct, kw_only=True):
    path: Path  # the intent file; it holds the bytes unless `data` does
    size: int
    xxh3_128: str
    content_type: str
    declared_type: str | None
    filename: str | None
    data: bytes | None = None  # the bytes, when they were kept in memory (see MemoryBudget)
    held: int = 0  # of the memory budget: the caller gives it back once done with `data`


class UploadForm(msgspec.Struct, kw_only=True):
    image: SpooledImage
    metadata: bytes | None


class MemoryBudget:
    """Image bytes that may be held in memory instead of written to the spool file, across all
    uploads (event-loop only). With an object store the spool file is only a staging copy, and
    writing every image to disk and reading it back costs the event loop time (docs/design.md) and
    doubles the disk writes. Small images stay in memory up to these bounds; the rest spill."""

    def __init__(self, total: int, per_upload: int) -> None:
        self.total = total
        self.per_upload = per_upload
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used -= n


class ImageSpool:
    """Takes one image part while hashing, sniffing and counting it: in memory while `budget`
    allows, else in the spool file (which always exists: it is the upload's intent record)."""

    def __init__(self, path: Path, max_bytes: int, budget: MemoryBudget | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.head = b""
        self._hash = xxhash.xxh3_128()
        self._fd = -1
        self._budget = budget
        self.memory: list[bytes] | None = [] if budget is not None else None  # joined once, at the end
        self.held = 0  # bytes of the budget this upload holds
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _spool_error(exc) from exc

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise image_too_large(self.max_bytes)
        if len(self.head) < 8:
            self.head += bytes(chunk[: 8 - len(self.head)])
            if not could_still_match(self.head):
                raise UnsupportedMediaType(details="bytes are neither JPEG (FF D8 FF) nor PNG")
        self._hash.update(chunk)
        if self.memory is not None:
            assert self._budget is not None
            if self.size <= self._budget.per_upload and self._budget.take(len(chunk)):
                self.memory.append(bytes(chunk))
                self.held += len(chunk)
                return
            self._spill()
        self._write(chunk)

    def _spill(self) -> None:
        """Too big (or too many at once) for memory: what was kept goes to the file, and so will the rest."""
        kept, self.memory = self.memory, None
        for part in kept or ():
            self._write(part)
        self.release()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:  # a full disk is the device's 507, not our 500
            raise _spool_error(exc) from exc

    def release(self) -> None:
        """Give the memory budget back (the bytes themselves go with the last reference)."""
        if self._budget is not None and self.held:
            self._budget.give_back(self.held)
        self.held = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _spool_error(exc: OSError) -> GatewayError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("Local disk is full", "no room for the upload spool")
    return ServiceUnavailable("Upload spool unavailable", str(exc)[:200])


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary from a Content-Type header, or `ValidationFailed`."""
    if not content_type:
        raise ValidationFailed("Expected multipart/form-data", "no Content-Type header")
    mime, options = parse_options_header(content_type)
    if mime != "multipart/form-data":
        raise ValidationFailed("Expected multipart/form-data", f"got {mime or 'nothing'}")
    boundary = options.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise ValidationFailed("Expected multipart/form-data", "missing or invalid boundary")
    try:
        return str(boundary).encode("latin-1")
    except UnicodeEncodeError:
        raise ValidationFailed("Expected multipart/form-data", "invalid boundary") from None


async def read_upload_form(
    body: AsyncIterator[bytes],
    boundary: bytes,
    spool_path: Path,
    *,
    max_image_bytes: int,
    max_metadata_bytes: int,
    memory: MemoryBudget | None = None,
) -> UploadForm:
    """Parse the body; the image lands in `spool_path`, or in memory as far as `memory` allows
    (then `release()` the returned image when done with its bytes). The caller removes the file
    on error."""
    max_body = max_image_bytes + max_metadata_bytes + 256 * 1024
    received = 0
    spool: ImageSpool | None = None
    target: str | None = None  # "image" | "metadata" | "skip"
    metadata = bytearray()
    meta_seen = False
    image_done = False
    declared: str | None = None
    filename: str | None = None
    try:
        parser = PushMultipartParser(
            boundary,
            max_header_size=MAX_PART_HEADER_BYTES,
            max_header_count=8,
            max_segment_count=MAX_PARTS,
        )
        async for chunk in body:
            received += len(chunk)
            if received > max_body:
                raise image_too_large(max_image_bytes)
            for event in parser.parse(chunk):
                if isinstance(event, MultipartSegment):
                    if event.name == "image":
                        if spool is not None:
                            raise ValidationFailed("Invalid upload", "the image part is given twice")
                        spool = ImageSpool(spool_path, max_image_bytes, memory)
                        declared, filename = event.content_type, event.filename
                        target = "image"
                    elif event.name == "metadata":
                        if meta_seen:
                            raise ValidationFailed("Invalid upload", "the metadata part is given twice")
                        meta_seen = True
                        target = "metadata"
                    else:
                        target = "skip"
                elif event is None:
                    if target == "image":
                        image_done = True
                    target, _segment = None, None
                elif target == "image":
                    assert spool is not None
                    spool.write(event)
                elif target == "metadata":
                    if len(metadata) + len(event) > max_metadata_bytes:
                        raise PayloadTooLarge("Metadata is too large", f"limit is {max_metadata_bytes} bytes")
                    metadata += event
        parser.close()
        if spool is None or not image_done:
            raise ValidationFailed("Missing image", "the form has no `image` file part")
        if spool.size == 0:
            raise ValidationFailed("Empty image", "the `image` part holds no bytes")
        content_type = sniff(spool.head)
        if content_type is None:
            raise UnsupportedMediaType(details="bytes are neither JPEG (FF D8 FF) nor PNG")
    except BaseException as exc:
        if spool is not None:
            spool.release()
        if isinstance(exc, (ParserLimitReached, MultipartError)):
            raise ValidationFailed("Malformed multipart body", str(exc)) from None
        raise
    finally:
        if spool is not None:
            spool.close()
    image = SpooledImage(
        path=spool_path,
        size=spool.size,
        xxh3_128=spool.hexdigest(),
        content_type=content_type,
        declared_type=declared,
        filename=filename,
        data=b"".join(spool.memory) if spool.memory is not None else None,
        held=spool.held,
    )
    return UploadForm(image=image, metadata=bytes(metadata) if meta_seen else None)
