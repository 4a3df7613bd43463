"""Where the near-duplicate filter sits on an upload's path, in-process (a real catalog on disk,
folder storage): to keep or hold, the frame's fingerprint runs beside its store write, so the
filter adds no wait of its own to the upload; to reject, it runs first, since a rejected frame
must leave nothing stored. Each step is stretched so that the order shows."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest

from gateway.app import create_app
from gateway.ingest import neardup
from gateway.ingest.pipeline import Ingestor
from gateway.runtime import Gateway
from tests.support.frames import Scene, capture, draw
from tests.support.inprocess import folder_settings

ADMIN = "overlap-admin-token"
STEP_S = 0.4  # each fingerprint and each store write, at least


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stretched(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[float, float]]]:
    spans: dict[str, list[tuple[float, float]]] = {"fingerprint": [], "store": []}
    lock = threading.Lock()
    fingerprint, put_file = neardup.fingerprint, Ingestor._put_file

    def timed(name: str, fn, *args):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        time.sleep(STEP_S)
        try:
            return fn(*args)
        finally:
            with lock:
                spans[name].append((started, time.monotonic()))

    monkeypatch.setattr(neardup, "fingerprint", lambda source: timed("fingerprint", fingerprint, source))
    monkeypatch.setattr(Ingestor, "_put_file", lambda self, *a: timed("store", put_file, self, *a))
    return spans


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["keep", "hold", "reject"])
async def test_the_fingerprint_runs_beside_the_store_write_unless_the_frame_may_be_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    spans = stretched(monkeypatch)
    settings = folder_settings(tmp_path, ADMIN, GATEWAY_DEDUP_NEAR_DUPLICATES=action,
                               GATEWAY_DEDUP_NEAR_MIN_IDLE_CORES="0")
    scene = draw(Scene(seed=5, parts=((300, 200),)))
    frames = [capture(scene, i, shift=(i % 2, 0), sigma=3.0, quality=85) for i in range(2)]
    gw = Gateway(settings)
    await gw.start()
    try:
        async with anyio.create_task_group() as tg, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(settings, gw)), base_url="http://gw", timeout=30
        ) as client:
            gw.run_background(tg)
            resp = await client.post("/api/admin/devices", json={"name": "camera"},
                                     headers={"Authorization": f"Bearer {ADMIN}"})
            assert resp.status_code == 201, resp.text
            key = resp.json()["data"]["key"]
            statuses = []
            for i, frame in enumerate(frames):
                resp = await client.post("/api/device/images/upload", headers={"X-Device-Key": key},
                                         files={"image": (f"f{i}.jpg", frame, "image/jpeg")})
                statuses.append(resp.status_code)
            tg.cancel_scope.cancel()
    finally:
        await gw.stop()

    fingerprinted, stored = spans["fingerprint"], spans["store"]
    assert len(fingerprinted) == 2
    if action == "reject":
        assert statuses == [201, 409]  # the second frame nearly repeats the first: nothing of it stored
        assert len(stored) == 1
        assert fingerprinted[0][1] <= stored[0][0], "judged before anything was stored"
    else:
        assert statuses == [201, 201]
        assert len(stored) == 2
        for (fp_start, fp_end), (put_start, put_end) in zip(fingerprinted, stored, strict=True):
            assert fp_start < put_end and put_start < fp_end, "the fingerprint and the store write overlap"
