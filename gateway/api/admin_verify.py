"""Admin routes of `gateway verify` (mounted on the admin router, behind its token guard).

`POST /api/admin/verify` runs one verification and answers with its report; while it runs,
`GET /api/admin/verify/progress` says how far it is (the CLI draws its progress bar from that).
One run at a time: a second one gets 409.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.params import Dependency

from gateway.api.body import read_json_body
from gateway.api.envelope import ok
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.errors import Conflict, ValidationFailed
from gateway.ops.verify import Verifier, VerifyProgress
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.ops.verify")


class VerifyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    full: bool = False
    repair: bool = False
    sample: int = 100


@post("/verify", status_code=200)
async def run_verify(request: Request[Any, Any, Any], catalog: Catalog,
                     store: Annotated[ObjectStore, Dependency(skip_validation=True)],  # a Protocol: not checkable
                     settings: Settings, clock: Callable[[], float],
                     verify_progress: VerifyProgress) -> Response[bytes]:
    try:
        body = msgspec.json.decode(await read_json_body(request, settings) or b"{}", type=VerifyRequest)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValidationFailed("Invalid request body", str(exc)) from None
    if body.sample < 0:
        raise ValidationFailed("Invalid request body", "sample must be >= 0")
    progress = verify_progress
    if progress.running:
        raise Conflict("A verification is already running", f"phase {progress.phase}")
    progress.running, progress.started_at = True, clock()
    verifier = Verifier(catalog, store, settings.data_dir / "spool", settings.storage.orphan_grace_s,
                        progress, now=clock())
    try:
        report = await anyio.to_thread.run_sync(
            lambda: verifier.run(full=body.full, sample=body.sample, repair=body.repair), abandon_on_cancel=True)
    finally:
        verifier.cancelled.set()
        progress.running = False
    summary = report.summary()
    log.info("verify: %d rows, %d objects, %d hashed: %s", report.rows, report.objects, report.hashed, summary)
    return ok({**msgspec.to_builtins(report), "summary": summary})


@get("/verify/progress")
async def verify_progress(verify_progress: VerifyProgress) -> Response[bytes]:
    return ok(msgspec.to_builtins(verify_progress))


ROUTES = [run_verify, verify_progress]
