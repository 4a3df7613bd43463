"""The catalog journal's records: one typed struct per kind of acknowledged write, no SQL.

A journal frame's body is `msgpack([FORMAT, [record, ...]])`: the records of one acknowledged
write (an upload: its batch opening, image and seal; a delivery; a withdrawal), applied together. Each record is
an array whose first element names its kind. The catalog applies each kind with SQL of the current
schema (`apply.py`), so a journal written before a migration is replayed correctly after it.
Bodies of the first layout (SQL text, before the format number existed) are converted by `legacy.py`;
`journal.decode` reads both.

Evolving: a new field goes at the end of its struct with a default; any other change is a new
kind or a new FORMAT, with the older one still read (converted here).
"""

from __future__ import annotations

import msgspec

from gateway.errors import StartRefused

FORMAT = 1  # the layout this code writes; it reads every earlier one


class BatchOpened(msgspec.Struct, tag="batch_opened", array_like=True, frozen=True):
    """A device's new collecting batch (its first upload)."""

    batch_id: str
    device_id: str
    opened_at: float


class ImageAccepted(msgspec.Struct, tag="image_accepted", array_like=True, frozen=True):
    """An upload: its image row and its outbox entry (`outbox_state` pending, held or skipped)."""

    image_id: str
    seq: int
    batch_id: str
    device_id: str
    filename: str
    content_type: str
    size: int
    xxh3_128: str
    storage_key: str
    metadata: bytes | None
    received_at: float
    fingerprint: int | None
    near_duplicate_of: str | None
    outbox_state: str
    priority_class: str = "default"  # forward.classes (added after format 1's first release: trailing, defaulted)


class BatchSealed(msgspec.Struct, tag="batch_sealed", array_like=True, frozen=True):
    """A collecting batch filled by an upload: sealed with its final counts."""

    batch_id: str
    sealed_at: float
    image_count: int
    total_bytes: int


class OutboxDelivered(msgspec.Struct, tag="outbox_delivered", array_like=True, frozen=True):
    """The cloud took an image (2xx or 409), with the ids it answered with."""

    image_id: str
    at: float
    status: int | None
    cloud_image_id: str | None = None
    cloud_batch_id: str | None = None
    cloud_storage_key: str | None = None


class ImageWithdrawn(msgspec.Struct, tag="image_withdrawn", array_like=True, frozen=True):
    """An upload recorded while its object was being stored, whose object did not get there (the
    store refused it, or a crash cut it short): its image row and outbox entry go, and so does its
    batch if that is left collecting and empty. Never an acknowledged upload's."""

    image_id: str
    batch_id: str


Record = BatchOpened | ImageAccepted | BatchSealed | OutboxDelivered | ImageWithdrawn
KINDS: tuple[type[Record], ...] = (BatchOpened, ImageAccepted, BatchSealed, OutboxDelivered, ImageWithdrawn)


class Frame(msgspec.Struct, array_like=True, frozen=True):
    """One acknowledged write: its records, applied in one transaction (none for a readiness probe)."""

    version: int
    records: list[Record]


def write(records: list[Record]) -> Frame:
    """A frame of this code's format."""
    return Frame(FORMAT, records)


class JournalUnreadable(StartRefused):
    """A whole record (its checksum holds) that this code cannot read: a newer gateway's, or an
    unknown kind. Acknowledged writes would be lost by skipping it, so the start is refused."""

    def __init__(self, path: object, offset: int, why: str) -> None:
        self.offset = offset
        super().__init__(
            f"catalog journal {path}: the record at byte {offset} cannot be read by this gateway ({why}). "
            f"The file is left as it is. Start the gateway version that wrote it to apply it, or keep a copy "
            f"and move the file aside (its acknowledged writes are then not in the catalog)")


class Unreadable(Exception):
    """A body this code cannot read; `JournalUnreadable` says where."""


_encode = msgspec.msgpack.Encoder().encode


def encode(frame: Frame) -> bytes:
    return _encode(frame)
