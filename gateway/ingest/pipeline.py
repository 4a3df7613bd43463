"""The upload fast path: stream -> spool + hash + sniff -> dedup -> (store | record) -> 2xx.

Durable before acknowledged: the answer is sent only after the object is in the store and the
catalog journal holds the image row, its batch membership and its outbox entry (fsynced). The
two run side by side; until both are done the image is `storing` (the forwarder leaves it alone,
its batch is not sealed), and a PUT that fails withdraws the record.
The spool file `<spool>/<uuid-hex>.part` doubles as the upload's intent record: it is removed
only once the upload is committed with its object or known to have left nothing behind, so after
a crash the start-up reconciliation finds every upload that may have left a stray object or a
row without its object (`reconcile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path

import anyio
import msgspec

from gateway.catalog import Catalog, Conn
from gateway.catalog.collecting import NewImage, Placed
from gateway.config import Settings
from gateway.devices.registry import Device
from gateway.errors import DuplicateImage, GatewayError, NearDuplicateImage, ServiceUnavailable
from gateway.forward import outbox
from gateway.forward.cache import ForwardCache
from gateway.forward.classes import UplinkPlan
from gateway.ingest.filenames import safe_filename
from gateway.ingest.form import MemoryBudget, SpooledImage, UploadForm, boundary_of, read_upload_form
from gateway.ingest.metadata import validate_metadata
from gateway.ingest.neardup import UNCHECKED, NearDuplicates, Verdict
from gateway.ingest.reconcile import leftover_image_ids
from gateway.ingest.seen import SeenKeys
from gateway.ingest.storing import StoringImages
from gateway.ops.metrics import Metrics
from gateway.retries import CATALOG_WRITER
from gateway.storage import ObjectStore
from gateway.system.cpuidle import IdleCpu
from gateway.system.failpoints import Failpoints
from gateway.system.files import fsync_dir

log = logging.getLogger("gateway.ingest")
LARGE_PUT_BYTES = 8 * 1024 * 1024
MEMORY_PER_UPLOAD = 8 * 1024 * 1024  # images up to this size may skip the spool file (object stores)...
MEMORY_TOTAL = 48 * 1024 * 1024  # ...while all such images in memory stay under this
STORING_RETRY_AFTER_S = 5  # a retry of bytes whose earlier upload is not settled: the reconciliation's pace


class UploadResult(msgspec.Struct, kw_only=True):
    image_id: str
    batch_id: str
    storage_key: str
    duplicate: bool = False
    batch_sealed: bool = False
    size: int = 0  # image bytes stored by this upload (0 for a duplicate)


class Ingestor:
    """Takes one upload request from a device through to a durable, acknowledged image."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: ObjectStore,
        metrics: Metrics,
        clock: Callable[[], float],
        uplink: UplinkPlan | None = None,
        forward_cache: ForwardCache | None = None,
        on_sealed: Callable[[str], None] | None = None,
        idle_cpu: IdleCpu | None = None,
        storing: StoringImages | None = None,
        failpoints: Failpoints | None = None,
    ) -> None:
        """`uplink`: the priority classes, decided here; `forward_cache`: where recorded images wait
        for the forwarder (object stores); `on_sealed`: a batch filled up; `idle_cpu`: the machine's
        idle CPU, which near-duplicate fingerprints leave to ingest (None: they run whatever the load);
        `storing`: the images recorded before their objects are stored, shared with the forwarder;
        `failpoints`: where the crash tests pause an upload (from the environment by default)."""
        self.settings = settings
        self.uplink = uplink or UplinkPlan.from_settings(settings.forward)  # priority classes, decided here
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.spool_dir = settings.data_dir / "spool"
        self._inflight: dict[str, asyncio.Event] = {}
        self._seen: SeenKeys | None = None  # None until built: then every upload asks the catalog
        self._seen_claimed: list[str] | None = []
        self._seen_wanted: anyio.Event | None = None
        self._active: set[str] = set()
        self._large_puts = anyio.Semaphore(settings.storage.max_concurrent_large_puts)
        self.storing = storing if storing is not None else StoringImages()
        self._settling: set[asyncio.Future[UploadResult]] = set()  # uploads whose requests went away
        self.failpoints = failpoints or Failpoints(settings.data_dir)
        # Object stores take small images from memory; folder storage hard-links the spool file.
        self.memory = MemoryBudget(MEMORY_TOTAL, MEMORY_PER_UPLOAD) if not store_wants_files(store) else None
        self.on_sealed = on_sealed
        self.forward_cache = forward_cache
        self.near = NearDuplicates(settings.dedup, metrics, clock, lambda: len(self._active), idle_cpu)

    @property
    def active_intents(self) -> set[str]:
        """Spool names of uploads in progress (reconciliation must leave them alone)."""
        return set(self._active)

    async def start(self) -> None:
        """The spool folder; the last image sequence number and the open batches, from the catalog.
        Leftover intents' images (recorded, perhaps without their objects, before a crash) are
        `storing` until the reconciliation settles them, for the catalog writer too: no batch
        holding one is sealed meanwhile (so they are held before the batches are first read)."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.settings.data_dir)  # the spool folder's own entry: its intent records must outlive a power cut
        leftovers = leftover_image_ids(self.spool_dir)
        for image_id in leftovers:
            self.storing.add(image_id)

        def load(conn: Conn) -> None:
            if leftovers:
                self.catalog.collecting.hold(conn, leftovers)
            self.catalog.uploads.load(conn)

        await self.catalog.write(load)

    async def watch_cpu(self) -> None:
        """Background task: the idle CPU the near-duplicate filter needs (`NearDuplicates.watch_cpu`)."""
        await self.near.watch_cpu()

    async def keep_seen_keys(self) -> None:
        """Background task: build the filter of stored dedup keys, and rebuild it when it fills up.
        Until it is ready every upload asks the catalog, so serving need not wait for it."""
        while True:
            await self.load_seen_keys()
            assert self._seen_wanted is not None
            await self._seen_wanted.wait()

    async def load_seen_keys(self) -> None:
        """(Re)build the filter of stored dedup keys from the catalog."""
        self._seen_wanted = anyio.Event()
        # Keys claimed while the catalog is being read, and those of uploads in progress now,
        # whose rows may reach the catalog only after the read.
        self._seen_claimed = list(self._inflight)
        seen = await anyio.to_thread.run_sync(self._read_seen)
        for key in self._seen_claimed:
            seen.add(key)
        self._seen, self._seen_claimed = seen, None

    def _read_seen(self) -> SeenKeys:
        if self.settings.dedup.scope == "device":
            sql = "SELECT device_id || ':' || xxh3_128 FROM images"
        else:
            sql = "SELECT xxh3_128 FROM images"
        cur = self.catalog.cursor()
        total = (cur.execute("SELECT count(*) FROM images").fetchone() or (0,))[0]
        seen = SeenKeys(max(1 << 20, 2 * int(total)))
        cur.execute(sql)
        while rows := cur.fetchmany(50_000):
            for (key,) in rows:
                seen.add(key)
        return seen

    def _maybe_stored(self, key: str) -> bool:
        return self._seen is None or key in self._seen

    def _claim_seen(self, key: str) -> None:
        if self._seen_claimed is not None:
            self._seen_claimed.append(key)
        if self._seen is not None:
            self._seen.add(key)
            if self._seen.full and self._seen_wanted is not None:
                self._seen_wanted.set()

    def _dedup_key(self, device_id: str, digest: str) -> str:
        return f"{device_id}:{digest}" if self.settings.dedup.scope == "device" else digest

    async def upload(
        self,
        device: Device,
        content_type: str | None,
        body: AsyncIterator[bytes],
        *,
        held: bool = False,
        length: int = 0,
    ) -> UploadResult:
        """`length` is the request's declared Content-Length (0: not given); a body declared too
        big for the memory budget's per-upload share goes straight to the spool file."""
        boundary = boundary_of(content_type)
        uid = uuid.uuid4()
        spool_path = self.spool_dir / f"{uid.hex}.part"
        limits = self.settings.limits
        self._active.add(uid.hex)
        try:
            form = await read_upload_form(
                body, boundary, spool_path,
                max_image_bytes=limits.max_image_bytes, max_metadata_bytes=limits.max_metadata_bytes,
                memory=self.memory if length <= MEMORY_PER_UPLOAD else None,
            )
        except BaseException:
            self._active.discard(uid.hex)
            _unlink(spool_path)
            raise
        ingesting = asyncio.ensure_future(self._ingest(uid, spool_path, device, form, held))
        try:
            return await asyncio.shield(ingesting)
        except asyncio.CancelledError:  # the request is gone; the upload is still settled, in the background
            self._settling.add(ingesting)
            ingesting.add_done_callback(self._settled_alone)
            raise

    def _settled_alone(self, ingesting: asyncio.Future[UploadResult]) -> None:
        self._settling.discard(ingesting)
        if not ingesting.cancelled() and (exc := ingesting.exception()) is not None:
            log.info("an upload whose request went away ended with: %s", exc)

    async def finish(self, timeout_s: float) -> None:
        """At shutdown, before the catalog closes: uploads whose requests went away settle first."""
        if self._settling:
            with anyio.move_on_after(timeout_s):
                await asyncio.gather(*self._settling, return_exceptions=True)

    async def _ingest(self, uid: uuid.UUID, spool_path: Path, device: Device, form: UploadForm,
                      held: bool) -> UploadResult:
        """A parsed upload through to its answer. Runs to its end even if the request is cancelled,
        so that its record and its object are settled together and what it holds (its bytes' claim
        against duplicates, its intent, its memory) is let go only then."""
        image = form.image
        intent_handed_over = False
        try:
            meta = None if form.metadata is None else validate_metadata(form.metadata)
            priority_class = self.uplink.classify(device.device_id, meta)
            key = self._dedup_key(device.device_id, image.xxh3_128)
            while (pending := self._inflight.get(key)) is not None:
                await pending.wait()
            # Claimed with no await since the check above: from here until the commit, no other
            # upload of these bytes can get past that loop (this process is the only writer).
            done = self._inflight[key] = asyncio.Event()
            try:
                existing = await self.find_duplicate(device.device_id, image.xxh3_128)
                if existing is not None:
                    return self._duplicate(existing)
                # A frame to reject is judged before anything is stored; to keep or hold, beside its PUT.
                verdict: Verdict | asyncio.Future[Verdict] = UNCHECKED
                if self.near.enabled and not device.near_dup_exempt and self.near.admit():
                    if self.settings.dedup.near_duplicates == "reject":
                        verdict = await self._near_verdict(device, image, form.metadata)
                    else:
                        verdict = asyncio.ensure_future(self._near_verdict(device, image, form.metadata))
                        verdict.add_done_callback(_retrieved)  # also when the upload fails before using it
                self._claim_seen(key)
                intent_handed_over = True  # from here on _store_and_record owns the spool file
                result = await self._store_and_record(uid, device, image, form.metadata, held, verdict,
                                                      priority_class)
            finally:
                del self._inflight[key]
                done.set()
            self.metrics.upload_bytes.inc(image.size)
            self.metrics.uploads_by_device.labels(device.device_id).inc()
            self.uplink.arrived(priority_class)
            return result
        finally:
            self._active.discard(uid.hex)
            if not intent_handed_over:
                _unlink(spool_path)
            if image.held and self.memory is not None:
                self.memory.give_back(image.held)

    async def _near_verdict(self, device: Device, image: SpooledImage, metadata: bytes | None) -> Verdict:
        """Is this frame a near-duplicate of a recent one of its device? Refused here when the
        action is `reject` (nothing stored yet)."""
        source = image.data if image.data is not None else image.path
        verdict = await self.near.judge(device.device_id, source, metadata, image.size)
        if verdict.action == "reject" and verdict.of is not None:
            of = verdict.of
            raise NearDuplicateImage(
                details=f"near-duplicate of image {of.image_id}",
                data={"image_id": of.image_id, "batch_id": of.batch_id, "storage_key": of.storage_key},
            )
        return verdict

    def _duplicate(self, existing: UploadResult) -> UploadResult:
        self.metrics.dedup_hits.inc()
        if self.settings.dedup.on_duplicate == "reject":
            raise DuplicateImage(
                details=f"existing image {existing.image_id}",
                data={"image_id": existing.image_id, "batch_id": existing.batch_id,
                      "storage_key": existing.storage_key},
            )
        return UploadResult(
            image_id=existing.image_id, batch_id=existing.batch_id, storage_key=existing.storage_key, duplicate=True
        )

    async def find_duplicate(self, device_id: str, digest: str) -> UploadResult | None:
        """The stored image these bytes duplicate, if any: the filter answers "certainly new" for
        most new bytes without a catalog read; "maybe" is decided by the catalog. A recorded image
        whose object is not known to be stored (`storing`: left so by a crash, or by a withdrawal
        not yet written), or withdrawn while the catalog was read, is no answer either way: 503,
        to be asked again."""
        if not self._maybe_stored(self._dedup_key(device_id, digest)):
            return None
        existing = await self.catalog.read(lambda c: self._find_duplicate(c, device_id, digest))
        if existing is not None and existing.image_id in self.storing:
            raise ServiceUnavailable(
                "An earlier upload of these bytes is not settled yet",
                f"image {existing.image_id} is recorded but its object is not known to be stored; retry",
                retry_after=STORING_RETRY_AFTER_S)
        return existing

    def _find_duplicate(self, conn: Conn, device_id: str, digest: str) -> UploadResult | None:
        if self.settings.dedup.scope == "device":
            row = conn.execute(
                "SELECT image_id, batch_id, storage_key FROM images WHERE xxh3_128 = ? AND device_id = ? LIMIT 1",
                [digest, device_id],
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT image_id, batch_id, storage_key FROM images WHERE xxh3_128 = ? LIMIT 1", [digest]
            ).fetchone()
        if row is None:
            return None
        return UploadResult(image_id=row[0], batch_id=row[1], storage_key=row[2], duplicate=True)

    async def _store_and_record(
        self, uid: uuid.UUID, device: Device, image: SpooledImage, metadata: bytes | None, held: bool,
        verdict: Verdict | asyncio.Future[Verdict] = UNCHECKED, priority_class: str = "default",
    ) -> UploadResult:
        """Store the object and record it side by side; answered once both are done, in whichever
        order they finish. The record says its object is being stored (`NewImage.storing`): until
        the PUT has settled, the image is in `storing` and its batch is not sealed; a PUT that
        fails withdraws the record. `verdict` may still be coming (the near-duplicate filter runs
        beside the PUT): the record waits for it."""
        filename = safe_filename(image.filename, image.content_type)
        storage_key = f"raw-data/{uid.hex}_{filename}"
        put = asyncio.ensure_future(self._put(storage_key, image))
        try:
            if isinstance(verdict, asyncio.Future):
                verdict = await _settled(verdict)
        except BaseException:  # cancelled before anything was recorded: the intent stays for reconciliation
            put.cancel()
            raise
        # A quarantined device's entry stays `held` for its key check, near-duplicate or not.
        skipped = verdict.action == "hold" and verdict.of is not None and not held
        new = NewImage(
            image_id=f"img_{uid}",
            device_id=device.device_id,
            filename=filename,
            content_type=image.content_type,
            size=image.size,
            xxh3_128=image.xxh3_128,
            storage_key=storage_key,
            metadata=metadata,
            received_at=self.clock(),
            outbox_state=outbox.SKIPPED if skipped else outbox.HELD if held else outbox.PENDING,
            batch_max_images=self.settings.batches.max_images,
            fingerprint=verdict.dhash,
            near_duplicate_of=None if verdict.of is None else verdict.of.image_id,
            priority_class=priority_class,
            storing=True,
        )
        self.storing.add(new.image_id)
        await self.failpoints.reach("upload.before_record")
        recorded = asyncio.wrap_future(self.catalog.submit_upload(new))
        placed = await self._settle(new, image, put, recorded, held or skipped)
        self.near.remember(device.device_id, verdict, new.image_id, placed.batch_id, new.storage_key)
        return UploadResult(image_id=new.image_id, batch_id=placed.batch_id, storage_key=new.storage_key,
                            batch_sealed=placed.sealed, size=new.size)

    async def _put(self, storage_key: str, image: SpooledImage) -> None:
        """The object into the store: from memory (the S3 store sends it from the event loop) or
        from the spool file (a worker thread; few large ones at a time)."""
        await self.failpoints.reach("upload.before_put")
        if image.data is not None:
            await self.store.put_bytes_async(storage_key, image.data, image.content_type)
        elif image.size > LARGE_PUT_BYTES:
            async with self._large_puts:
                await anyio.to_thread.run_sync(self._put_file, storage_key, image)
        else:
            await anyio.to_thread.run_sync(self._put_file, storage_key, image)

    async def _settle(self, new: NewImage, image: SpooledImage, put: asyncio.Future[None],
                      recorded: asyncio.Future[Placed], held_back: bool) -> Placed:
        """Wait for both the PUT and the record, then settle what one left without the other:
        an object without its record is removed, a record without its object is withdrawn.
        Both done: the intent goes, the bytes to the forward cache (`_keep_for_forwarding`)."""
        await asyncio.gather(put, recorded, return_exceptions=True)
        put_error = put.exception()
        record_error = recorded.exception()
        if record_error is not None:  # nothing committed: the object, if stored, must go
            self.storing.discard(new.image_id)
            if put_error is None:
                await self._discard_object(new.storage_key, image.path)
            else:
                self._empty_intent(image)
            raise record_error
        if put_error is not None:
            # The store said no. Keep the (emptied) intent in case a lost answer hid a stored object.
            self._empty_intent(image)
            await self._withdraw(new, recorded.result())
            raise put_error
        placed = recorded.result()
        await self.failpoints.reach("upload.before_answer")
        self.storing.discard(new.image_id)
        self._tell_writer(f"that {new.image_id}'s object is stored",
                          lambda: self.catalog.submit_stored(new.image_id, self.clock()), self._sealed)
        self._keep_for_forwarding(new.image_id, image, held_back)
        return placed

    async def _withdraw(self, new: NewImage, placed: Placed) -> None:
        """A recorded upload whose object is not in the store: its rows go, before the device is
        answered. Should that write fail, it is sent again in the background; meanwhile the image
        stays out of reach (`storing`: not forwarded, and a retry of its bytes gets 503)."""

        def submit() -> Future[str | None]:
            return self.catalog.submit_withdrawn(new.image_id, new.device_id, placed.batch_id, new.size,
                                                 self.clock())

        def withdrawn(sealed: str | None) -> None:
            self.storing.discard(new.image_id, withdrawn=True)
            self._sealed(sealed)

        try:
            sealed = await asyncio.wrap_future(submit())
        except Exception as exc:
            self._tell_writer_later(f"the withdrawal of {new.image_id}, whose object was not stored", submit,
                                    withdrawn, 1, exc)
            return
        withdrawn(sealed)

    def _tell_writer(self, what: str, submit: Callable[[], Future[str | None]], then: Callable[[str | None], None],
                     failures: int = 0) -> None:
        """Send the catalog writer a word that must reach it (`submit`), again while it is refused
        (`retries.CATALOG_WRITER`) until the catalog closes (the next start settles from the
        catalog and the intents); `then` gets its answer. `failures`: refusals so far."""
        def answered(done: asyncio.Future[str | None]) -> None:
            if done.cancelled():
                return
            if (exc := done.exception()) is None:
                then(done.result())
            elif self.catalog.writing:
                self._tell_writer_later(what, submit, then, failures + 1, exc)

        asyncio.wrap_future(submit()).add_done_callback(answered)

    def _tell_writer_later(self, what: str, submit: Callable[[], Future[str | None]],
                           then: Callable[[str | None], None], failures: int, why: BaseException) -> None:
        delay = CATALOG_WRITER.delay_s(failures)
        log.warning("could not record %s (trying again in %.0f s): %s", what, delay, why)
        asyncio.get_running_loop().call_later(delay, self._tell_writer, what, submit, then, failures)

    def _sealed(self, batch_id: str | None) -> None:
        """A word to the writer sealed a closing batch: its manifest is due (`on_sealed`)."""
        if batch_id is not None and self.on_sealed is not None:
            self.on_sealed(batch_id)

    def _keep_for_forwarding(self, image_id: str, image: SpooledImage, held: bool) -> None:
        """The upload is recorded: its intent file goes, and its bytes to the forward cache if any.
        Not a held (quarantined) upload's: it waits on the cloud's word about its key, and the key
        check may dead-letter it without the forwarder, which is what removes copies."""
        cache = self.forward_cache
        if cache is not None and not held:
            if image.data is not None:
                cache.offer(image_id, image.data)
            elif cache.adopt(image_id, image.path, image.size):
                return
        _unlink(image.path)

    def _empty_intent(self, image: SpooledImage) -> None:
        """Keep a failed upload's intent, emptied of its bytes; not under folder storage, where the
        spool file may be the object itself (a hard link made before the failure), which the
        reconciliation must still find whole or not at all."""
        if not store_wants_files(self.store):
            _truncate(image.path)

    def _put_file(self, storage_key: str, image: SpooledImage) -> None:
        self.store.put_file(storage_key, image.path, image.size, image.content_type)

    async def _discard_object(self, storage_key: str, spool_path: Path) -> None:
        try:
            await anyio.to_thread.run_sync(self.store.delete, storage_key)
        except GatewayError as exc:
            log.warning("could not remove unrecorded object %s (reconciled at next start): %s", storage_key, exc)
            return
        _unlink(spool_path)


async def _settled(judging: asyncio.Future[Verdict]) -> Verdict:
    """The filter's verdict; a filter that failed lets the frame through unchecked (it is a
    saving, never a gate). Cancelling the upload cancels this wait, not the thread it waits for."""
    try:
        return await asyncio.shield(judging)
    except Exception:
        log.exception("near-duplicate check failed; the frame is stored unchecked")
        return UNCHECKED


def _retrieved(done: asyncio.Future[Verdict]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved: asyncio does not log a failure nobody awaited as "never retrieved"


def store_wants_files(store: ObjectStore | None) -> bool:
    """Folder storage takes the spool file itself (a hard link); an object store takes bytes."""
    return store is None or store.name == "folder"


def _truncate(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.truncate(path, 0)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
