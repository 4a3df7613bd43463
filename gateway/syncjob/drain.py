"""The sync job (`gateway drain URL DEST`): copy every drainable batch of a gateway into a folder.

Each batch lands in `DEST/<batch_id>/`: every image as `<image_id>_<filename>` and the batch's
`manifest.parquet`. A file is downloaded to `<name>.part`, its XXH3-128 checked while it streams
(against the manifest and the `X-Content-XXH3-128` header), fsynced and renamed into place; the
folder is fsynced, and only then is the batch acked (`forwarded -> drained` on the gateway).
Run it again after a crash and it gets the same result: files already there with the right hash
are kept, stray `.part` files are removed, and a batch acked before the crash is no longer listed.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import xxhash

from gateway.cli.display import TransferBar
from gateway.envelope import read_envelope
from gateway.ingest.filenames import cap_name
from gateway.retries import GATEWAY
from gateway.system.files import fsync_dir
from gateway.system.ratelimit import TokenBucket

HASH_HEADER = "X-Content-XXH3-128"
CHUNK = 256 * 1024
DRAINABLE = "forwarded"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")
_MAX_LOCAL_NAME_BYTES = 255 - len(".part")


class DrainError(Exception):
    """One batch could not be drained (it is left un-acked; the next run tries again)."""


class AccessDenied(DrainError):
    """The gateway refused the token (or its sync API is off): nothing can be drained."""


class _Retry(Exception):
    """A transient failure (connection, 5xx, 429, corrupt transfer): try the request again."""


@dataclass
class DrainReport:
    batches_drained: list[str] = field(default_factory=list)
    batches_failed: dict[str, str] = field(default_factory=dict)
    images_downloaded: int = 0
    images_kept: int = 0  # already on disk with the right hash (a resumed run)
    bytes_downloaded: int = 0
    stray_parts_removed: int = 0
    seconds: float = 0.0


def local_name(image_id: str, filename: str) -> str:
    """`<image_id>_<filename>`: unique per image, and safe whatever the server sent."""
    if not _SAFE_ID.match(image_id):
        raise DrainError(f"unsafe image id from the gateway: {image_id!r}")
    name = _UNSAFE_CHARS.sub("_", filename).lstrip(".")
    # In bytes as well as characters: `<image_id>_<name>.part` must fit a file name's 255 bytes.
    name = cap_name(name, 150, _MAX_LOCAL_NAME_BYTES - len(image_id.encode()) - 1) or "image"
    return f"{image_id}_{name}"


def file_xxh3(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def sync_base_url(url: str) -> str:
    """The sync API under a gateway URL given as `http://host:8080`, `.../api` or `.../api/sync`."""
    base = url.rstrip("/")
    for suffix in ("/api/sync", "/api"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return f"{base}/api/sync"


class DrainJob:
    """Drains one gateway into one destination folder."""

    def __init__(
        self,
        url: str,
        dest: Path,
        token: str,
        *,
        jobs: int = 4,
        limit_rate: int = 0,
        timeout_s: float = 60.0,
        attempts: int = GATEWAY.attempts,
        verify: str | bool = True,
        progress: TransferBar | None = None,
    ) -> None:
        self.base_url = sync_base_url(url)
        self.dest = dest
        self.token = token
        self.jobs = max(1, jobs)
        # Up to 0.5 s of unused allowance carries over, so short pauses are not penalised.
        self.rate = TokenBucket(limit_rate, limit_rate * 0.5, time.monotonic, full=False, shared=True)
        self.timeout_s = timeout_s
        self.retry = replace(GATEWAY, attempts=max(1, attempts))
        self.verify = verify
        self.progress = progress or TransferBar(enabled=False)
        self.report = DrainReport()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    # -- HTTP --------------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        """One client per thread: a sync client shared by threads serialises them (NOTES)."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"},
                timeout=self.timeout_s, verify=self.verify,
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def _with_retries(self, what: str, attempt: Callable[[], Any]) -> Any:
        failures = 0
        while True:
            try:
                return attempt()
            except (httpx.TransportError, _Retry) as exc:
                failures += 1
                if self.retry.gives_up_after(failures):
                    raise DrainError(f"{what}: {exc}") from None
                self.progress.note(f"retrying {what} ({exc})")
                time.sleep(self.retry.delay_s(failures))

    @staticmethod
    def _check(resp: httpx.Response, what: str) -> None:
        """Sort an answer into ok, retry later, or give up (with the envelope's message)."""
        if resp.status_code < 300:
            return
        if not resp.is_stream_consumed:
            resp.read()
        answer = read_envelope(resp.content)
        message = answer.error.describe("None") if answer.is_object else resp.text[:200]
        if resp.status_code in (401, 403):
            raise AccessDenied(f"{what}: {resp.status_code} {message}")
        if GATEWAY.retries(resp.status_code):
            raise _Retry(f"{resp.status_code} {message}")
        raise DrainError(f"{what}: {resp.status_code} {message}")

    def _get_json(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            resp = self._client().get(path, params=params)
            self._check(resp, f"GET {path}")
            return resp.json()  # type: ignore[no-any-return]

        return self._with_retries(f"GET {path}", attempt)  # type: ignore[no-any-return]

    # -- the job -----------------------------------------------------------------------------

    def drainable_batches(self) -> list[dict[str, Any]]:
        """Every batch the gateway lists as drainable, oldest first (all pages)."""
        found: list[dict[str, Any]] = []
        while True:
            page = self._get_json("/batches", {"state": DRAINABLE, "limit": 500, "offset": len(found)})
            found.extend(page["data"])
            if not page["data"] or len(found) >= page["meta"]["total"]:
                return found

    def run(self) -> DrainReport:
        started = time.monotonic()
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            batches = self.drainable_batches()
            total_bytes = sum(b["total_bytes"] for b in batches)
            images = sum(b["image_count"] for b in batches)
            self.progress.note(f"{len(batches)} batch(es) to drain: {images} image(s), {total_bytes / 1048576:.1f} MiB")
            self.progress.start(images, total_bytes)
            # One pool (and so one HTTP client per thread) for the whole run, not one per batch.
            with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="drain") as pool:
                for batch in batches:
                    batch_id = batch["batch_id"]
                    try:
                        self.drain_batch(batch_id, pool)
                    except AccessDenied:
                        raise
                    except DrainError as exc:
                        self.report.batches_failed[batch_id] = str(exc)
                        self.progress.note(f"{batch_id}: NOT drained: {exc}")
        finally:
            self.progress.finish()
            self.close()
            self.report.seconds = round(time.monotonic() - started, 3)
        return self.report

    def drain_batch(self, batch_id: str, pool: ThreadPoolExecutor) -> None:
        """Every image (downloaded by `pool`) and the manifest on disk and verified, then the ack."""
        if not _SAFE_ID.match(batch_id):
            raise DrainError(f"unsafe batch id from the gateway: {batch_id!r}")
        detail = self._get_json(f"/batches/{batch_id}")["data"]
        rows: list[dict[str, Any]] = detail["manifest"]
        if len(rows) != detail["batch"]["image_count"] or len({r["image_id"] for r in rows}) != len(rows):
            raise DrainError(f"manifest of {batch_id} does not match its image count")
        folder = self.dest / batch_id
        folder.mkdir(parents=True, exist_ok=True)
        for stray in folder.glob("*.part"):  # a download cut short by a crash
            stray.unlink(missing_ok=True)
            self.report.stray_parts_removed += 1
        downloaded_before = self.report.images_downloaded
        outcomes = list(pool.map(lambda row: self._image(folder, row), rows))
        failures = [o for o in outcomes if isinstance(o, DrainError)]
        if failures:
            if any(isinstance(f, AccessDenied) for f in failures):
                raise next(f for f in failures if isinstance(f, AccessDenied))
            raise DrainError(f"{len(failures)} image(s) failed, first: {failures[0]}")
        self._manifest(folder, batch_id, rows)
        fsync_dir(folder)
        fsync_dir(self.dest)
        self._ack(batch_id)
        self.report.batches_drained.append(batch_id)
        fetched = self.report.images_downloaded - downloaded_before
        self.progress.note(f"{batch_id}: {len(rows)} image(s) ({fetched} downloaded, "
                           f"{len(rows) - fetched} already here), acked")

    def _image(self, folder: Path, row: dict[str, Any]) -> DrainError | None:
        """Download one image unless it is already there; errors are returned, not raised,
        so that one bad image does not abandon the others' downloads mid-way."""
        try:
            target = folder / local_name(row["image_id"], row["filename"])
            if target.exists():
                if target.stat().st_size == row["size"] and file_xxh3(target) == row["xxh3_128"]:
                    with self._lock:
                        self.report.images_kept += 1
                    self.progress.advance(1, row["size"])
                    return None
                target.unlink()  # not what the manifest says: fetch it again
            self._with_retries(f"image {row['image_id']}", lambda: self._download(row, target))
            return None
        except DrainError as exc:
            return exc
        except OSError as exc:  # the destination disk, not the gateway: fail this batch, not the job
            return DrainError(f"image {row['image_id']}: {exc}")

    def _download(self, row: dict[str, Any], target: Path) -> None:
        part = target.with_name(target.name + ".part")
        received = 0
        try:
            with self._client().stream("GET", f"/images/{row['image_id']}") as resp:
                self._check(resp, f"GET image {row['image_id']}")
                if resp.headers.get(HASH_HEADER) != row["xxh3_128"]:
                    raise DrainError(f"image {row['image_id']}: the gateway's hash header disagrees with the manifest")
                digest = xxhash.xxh3_128()
                size = int(row["size"])
                with open(part, "wb") as fh:
                    for chunk in resp.iter_bytes(CHUNK):
                        if received + len(chunk) > size:  # not one byte past what the manifest says
                            raise DrainError(f"image {row['image_id']}: the gateway sent more than the "
                                             f"manifest's {size} bytes")
                        fh.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        self.progress.advance(0, len(chunk))
                        if (wait := self.rate.take(len(chunk))) > 0:
                            time.sleep(wait)
                    fh.flush()
                    os.fsync(fh.fileno())
            if received != row["size"] or digest.hexdigest() != row["xxh3_128"]:
                raise _Retry(f"corrupt transfer ({received} bytes, xxh3 {digest.hexdigest()})")
            os.replace(part, target)
        except BaseException:
            part.unlink(missing_ok=True)
            self.progress.advance(0, -received)
            raise
        with self._lock:
            self.report.images_downloaded += 1
            self.report.bytes_downloaded += received
        self.progress.advance(1, 0)

    def _manifest(self, folder: Path, batch_id: str, rows: list[dict[str, Any]]) -> None:
        """The Parquet manifest, always fetched again (cloud ids may have been added since),
        checked against the JSON manifest: same images, same hashes."""
        target = folder / "manifest.parquet"
        part = folder / "manifest.parquet.part"

        def attempt() -> None:
            # Streamed to disk, hashed on the way: its size is the server's word, not ours to hold.
            with self._client().stream("GET", f"/batches/{batch_id}/manifest.parquet") as resp:
                self._check(resp, f"GET manifest of {batch_id}")
                digest = xxhash.xxh3_128()
                with open(part, "wb") as fh:
                    for chunk in resp.iter_bytes(CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
            if digest.hexdigest() != resp.headers.get(HASH_HEADER):
                raise _Retry("corrupt manifest transfer")

        try:
            self._with_retries(f"manifest of {batch_id}", attempt)
            import duckdb  # here, not at import: `gateway --help` need not load it

            try:
                with duckdb.connect() as db:
                    found = set(db.execute("SELECT image_id, xxh3_128 FROM read_parquet(?)",
                                           [str(part)]).fetchall())
            except duckdb.Error as exc:
                raise DrainError(f"manifest.parquet of {batch_id} is not a readable Parquet file: {exc}") from None
            if found != {(r["image_id"], r["xxh3_128"]) for r in rows}:
                raise DrainError(f"manifest.parquet of {batch_id} disagrees with the batch's image list")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)

    def _ack(self, batch_id: str) -> None:
        def attempt() -> None:
            resp = self._client().post(f"/batches/{batch_id}/ack")
            self._check(resp, f"ack {batch_id}")
            state = resp.json()["data"]["state"]
            if state != "drained":
                raise DrainError(f"ack {batch_id}: batch is {state}, not drained")

        # An ack is idempotent on the gateway, so retrying one whose answer was lost is safe.
        self._with_retries(f"ack {batch_id}", attempt)

