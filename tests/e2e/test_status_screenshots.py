"""The status page in three states a site admin meets in the first hour (issue 24), in a real
headless chromium: forwarding off, the cloud offline, a device key the cloud refuses. Each state's
wording is checked in the DOM and a desktop screenshot is saved under
test-output/status-page/states/ (the path is printed); copies checked by eye are in docs/screenshots/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from tests.e2e.test_status_page import OUTPUT, find_chromium, png_size, run_chromium, wait_for_status
from tests.support.client import upload
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import ADMIN_TOKEN, GatewayProcess

pytestmark = pytest.mark.e2e
STATES = OUTPUT / "states"
SIZE = (1280, 1100)
FAST = {"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2",
        "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0"}


def shoot(chromium: str, gw: GatewayProcess, profile: Path, name: str) -> tuple[str, Path]:
    """The page's DOM (after signing in with the token) and a screenshot of it."""
    dom = run_chromium(chromium, profile, "--dump-dom", f"{gw.url}/?token={ADMIN_TOKEN}").stdout
    shot = STATES / f"{name}.png"
    shot.unlink(missing_ok=True)
    run_chromium(chromium, profile, f"--screenshot={shot}", f"--window-size={SIZE[0]},{SIZE[1]}", f"{gw.url}/")
    assert png_size(shot) == SIZE and shot.stat().st_size > 10_000, shot
    return dom, shot


def test_status_page_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chromium = find_chromium()
    STATES.mkdir(parents=True, exist_ok=True)
    shots = []

    off = GatewayProcess(tmp_path / "off", FAST).start()
    try:
        _, key = off.add_device("Line 1")
        for i in range(2):
            assert upload(off, key, jpeg_bytes(10_000 + i)).status_code == 201
        dom, shot = shoot(chromium, off, tmp_path / "p1", "forwarding-off")
        shots.append(shot)
        assert "forwarding off: no cloud URL set" in dom and "drained in" not in dom
    finally:
        off.stop()

    with FakeCloud() as cloud:
        gw = GatewayProcess(tmp_path / "gw", {**FAST, "GATEWAY_CLOUD_URL": cloud.url}).start()
        try:
            device_id, key = gw.add_device("Line 1")
            cloud.add_device(key, device_id=device_id)
            cloud.refuse_connections()
            for i in range(3):
                assert upload(gw, key, jpeg_bytes(20_000 + i)).status_code == 201
            status = wait_for_status(gw, lambda s: s["connectivity"] == "offline")
            assert status["connectivity"] == "offline", status
            dom, shot = shoot(chromium, gw, tmp_path / "p2", "offline")
            shots.append(shot)
            assert "waiting for the cloud to come back" in dom and "stalled" not in dom
            assert "cannot reach the cloud: connection refused at 127.0.0.1:" in dom
            assert "Connect call failed" not in dom and "ssl:default" not in dom

            cloud.accept_connections()
            status = wait_for_status(gw, lambda s: s["delivered_count"] == 3)
            assert status["delivered_count"] == 3, status
            _, generated = gw.add_device("Line 2")  # a key the gateway made: the cloud does not know it
            cloud.set_key_status(generated, 401)
            assert upload(gw, generated, jpeg_bytes(30_000)).status_code == 201
            status = wait_for_status(gw, lambda s: s["dead_count"] == 1)
            assert status["dead_count"] == 1, status
            dom, shot = shoot(chromium, gw, tmp_path / "p3", "refused-key")
            shots.append(shot)
            assert "the cloud refused the device key (401 INVALID_DEVICE_KEY" in dom
            assert "gateway devices set-key" in dom and "gateway outbox retry" in dom
        finally:
            gw.stop()
    with capsys.disabled():
        print("\nstatus page states: " + ", ".join(str(s) for s in shots))
