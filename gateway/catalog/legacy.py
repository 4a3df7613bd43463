"""The journal's first layout (no format number: rows, SQL text and parameters), read and
converted into typed records, so that a journal left by an older gateway is applied by this
schema's appliers rather than replayed as its SQL. Frozen: this layout is never written again.

Every write the older gateway journaled is recognised by its table and column names (rows) or its
exact SQL text (updates, statements); anything else is `Unreadable`, and the start is refused.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from gateway.catalog.records import (
    FORMAT,
    BatchOpened,
    BatchSealed,
    Frame,
    ImageAccepted,
    OutboxDelivered,
    Record,
    Unreadable,
)

_T = TypeVar("_T", bound=msgspec.Struct)


class _Rows(msgspec.Struct, array_like=True, frozen=True):
    table: str
    columns: tuple[str, ...]
    values: list[tuple[Any, ...]]


class _Update(msgspec.Struct, array_like=True, frozen=True):
    sql: str
    row: str
    params: list[Any]


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    rows: list[_Rows]
    statements: list[tuple[str, list[Any]]] = []
    updates: list[_Update] = []


_decode = msgspec.msgpack.Decoder(_Entry).decode

# The SQL texts the first layout carried (gateway.batches.SEAL_SQL, gateway.outbox._DELIVERED and _CLOUD_IDS).
SEAL_SQL = ("UPDATE batches SET state = 'sealed', sealed_at = ?, image_count = ?, total_bytes = ? "
            "WHERE batch_id = ? AND state = 'collecting'")
DELIVERED_SQL = ("UPDATE outbox SET state = 'delivered', delivered_at = v.done_at, last_status = v.status, "
                 "attempts = outbox.attempts + 1 FROM (VALUES {rows}) v(id, done_at, status) "
                 "WHERE outbox.image_id = v.id AND outbox.state = 'pending'")
CLOUD_IDS_SQL = ("UPDATE images SET cloud_image_id = coalesce(v.image_key, images.cloud_image_id), "
                 "cloud_batch_id = coalesce(v.batch_key, images.cloud_batch_id), "
                 "cloud_storage_key = coalesce(v.storage_key, images.cloud_storage_key) "
                 "FROM (VALUES {rows}) v(id, image_key, batch_key, storage_key) WHERE images.image_id = v.id")


def convert(body: bytes) -> Frame:
    """A first-layout body as a frame of typed records (same meaning, same order of effect)."""
    try:
        entry = _decode(body)
    except msgspec.DecodeError as exc:
        raise Unreadable(f"a first-layout record: {exc}") from exc
    records: list[Record] = []
    images: list[dict[str, Any]] = []
    outbox: dict[str, dict[str, Any]] = {}
    for rows in entry.rows:
        for values in rows.values:
            if len(values) != len(rows.columns):
                raise Unreadable(f"a first-layout row of {rows.table} with {len(values)} values")
            row = dict(zip(rows.columns, values, strict=True))
            if rows.table == "batches":
                records.append(_opened(row))
            elif rows.table == "images":
                images.append(row)
            elif rows.table == "outbox":
                outbox[str(row.get("image_id"))] = row
            else:
                raise Unreadable(f"a first-layout row of table {rows.table!r}")
    for image in images:
        records.append(_accepted(image, outbox.pop(str(image.get("image_id")), None)))
    if outbox:
        raise Unreadable(f"a first-layout outbox row without its image ({', '.join(outbox)})")
    records.extend(_deliveries(entry.updates))
    for sql, params in entry.statements:
        if sql != SEAL_SQL or len(params) != 4:
            raise Unreadable(f"a first-layout statement this gateway does not know: {sql[:80]!r}")
        sealed_at, count, size, batch_id = params
        records.append(BatchSealed(batch_id=batch_id, sealed_at=sealed_at, image_count=count, total_bytes=size))
    return Frame(FORMAT, records)


def _opened(row: dict[str, Any]) -> BatchOpened:
    if row.get("state") != "collecting":
        raise Unreadable(f"a first-layout batch row in state {row.get('state')!r}")
    return _typed(BatchOpened, {k: v for k, v in row.items() if k != "state"}, "batch")


def _accepted(image: dict[str, Any], entry: dict[str, Any] | None) -> ImageAccepted:
    if entry is None:
        raise Unreadable(f"a first-layout image row without its outbox entry ({image.get('image_id')})")
    fields = {"fingerprint": None, "near_duplicate_of": None, **image, "outbox_state": entry.get("state")}
    return _typed(ImageAccepted, fields, "image")


def _typed(kind: type[_T], fields: dict[str, Any], what: str) -> _T:
    """`fields` (by column name) as a record of `kind`; every column must have its field."""
    extra = set(fields) - set(kind.__struct_fields__)
    if extra:
        raise Unreadable(f"a first-layout {what} row with columns {sorted(extra)}")
    # A field newer than the first layout (e.g. `priority_class`) takes its default.
    values = [kind.__struct_config__.tag, *(
        fields.get(f.name) if f.name in fields or f.default is msgspec.NODEFAULT else f.default
        for f in msgspec.structs.fields(kind))]
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise Unreadable(f"a first-layout {what} row: {exc}") from exc


def _deliveries(updates: list[_Update]) -> list[Record]:
    """The delivery marks, each with the cloud's ids when its entry carried them."""
    delivered: dict[str, OutboxDelivered] = {}
    ids: dict[str, list[Any]] = {}
    for u in updates:
        if u.sql == DELIVERED_SQL and len(u.params) == 3:
            image_id, at, status = u.params
            delivered[str(image_id)] = OutboxDelivered(image_id=image_id, at=at, status=status)
        elif u.sql == CLOUD_IDS_SQL and len(u.params) == 4:
            ids[str(u.params[0])] = u.params[1:]
        else:
            raise Unreadable(f"a first-layout update this gateway does not know: {u.sql[:80]!r}")
    out: list[Record] = []
    for image_id, d in delivered.items():
        image_key, batch_key, storage_key = ids.pop(image_id, (None, None, None))
        out.append(msgspec.structs.replace(d, cloud_image_id=image_key, cloud_batch_id=batch_key,
                                           cloud_storage_key=storage_key))
    if ids:
        raise Unreadable(f"first-layout cloud ids without their delivery ({', '.join(ids)})")
    return out
