"""One attempt at forwarding one outbox entry: the device's key, the image's bytes, the upload."""

from __future__ import annotations

from collections.abc import AsyncIterable

import anyio

from gateway.devices.keys import KeyUnreadable
from gateway.devices.registry import DeviceRegistry
from gateway.errors import GatewayError
from gateway.forward import outbox
from gateway.forward.backoff import ByteBucket
from gateway.forward.cache import ForwardCache
from gateway.forward.client import (
    DELIVERED,
    REJECT,
    RETRY,
    CloudClient,
    Held,
    LocalBytesChanged,
    MultipartUpload,
    Outcome,
)
from gateway.storage import ObjectStore

# The reason of a dead letter whose device key does not open under the key secret (status, metrics).
KEY_UNREADABLE = "KEY_UNREADABLE"


class Sender:
    """Sends one entry as its device; knows nothing of order, retries or the catalog."""

    def __init__(self, registry: DeviceRegistry, store: ObjectStore, client: CloudClient,
                 cache: ForwardCache | None) -> None:
        self.registry = registry
        self.store = store
        self.client = client
        self.cache = cache

    async def send(self, entry: outbox.Entry, bucket: ByteBucket) -> tuple[Outcome, bool]:
        """One attempt; the flag says whether the outcome is the cloud's (it then moves the gate).

        The image comes from the forward cache (from memory when the kernel holds it, else read
        in a worker thread) or, failing that, streamed from the object store; it is posted from
        the event loop, paced under `bucket`'s cap. Cancelling the task (shutdown) drops the
        request and its connection."""
        key = self.registry.cached_key_of(entry.device_id)
        if key is None:
            try:
                key = await anyio.to_thread.run_sync(self.registry.key_of, entry.device_id)
            except KeyUnreadable as exc:
                return Outcome(kind=REJECT, error=f"{KEY_UNREADABLE}: device key cannot be opened ({exc}); "
                                                  "check keys.secret_file, then `gateway outbox retry`"), False
        if key is None:
            return Outcome(kind=REJECT, error="no key stored for this device; cannot act as it"), False
        image: Held | AsyncIterable[bytes] | None = None
        if self.cache is not None:
            image = self.cache.read_from_memory(entry.image_id, entry.size, entry.xxh3_128)
            if image is None:
                image = await anyio.to_thread.run_sync(self.cache.read, entry.image_id, entry.size, entry.xxh3_128)
        try:
            if image is None:
                image = await self.store.read_async(entry.storage_key)
        except KeyError:
            return Outcome(kind=REJECT, error="local bytes missing from the object store"), False
        except GatewayError as exc:
            return Outcome(kind=RETRY, error=f"object store: {exc}"), False
        form = MultipartUpload(entry.filename, entry.content_type, entry.size, entry.metadata)
        rate = bucket.rate

        async def pace(n: int) -> None:
            """Wait until the bandwidth cap lets `n` more bytes go."""
            wait = bucket.take(n)
            if wait > 0:
                await anyio.sleep(wait)

        try:
            return await self.client.upload(key, form, image, pace if rate > 0 else None,
                                            extra_s=form.length / rate if rate > 0 else 0.0), True
        except LocalBytesChanged as exc:
            return Outcome(kind=REJECT, error=f"local bytes changed: {exc}"), False
        except GatewayError as exc:
            return Outcome(kind=RETRY, error=f"object store: {exc}"), False
        finally:
            close = getattr(image, "aclose", None)
            if close is not None:
                await close()


def outcome_label(outcome: Outcome, cloud_answered: bool) -> str:
    """The `forward_attempts` metric label of an attempt's outcome."""
    if not cloud_answered:
        return "local_error"
    if outcome.kind == DELIVERED:
        return "already_delivered" if outcome.status == 409 else "delivered"
    if outcome.kind == RETRY:
        return "connection_error" if outcome.status is None else "retry"
    return "rejected"
