"""The status page in a real headless browser (Debian's chromium): the figures it shows match the
admin API, and a phone-sized screenshot is saved under test-output/status-page/.

Chromium is installed with scripts/browser-deps when missing (root or sudo, and apt): where it
cannot be, the test fails and says why.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import jpeg_bytes, png_bytes
from tests.support.client import admin_status, upload
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import ADMIN_TOKEN, GatewayProcess

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output" / "status-page"
PHONE = (412, 915)  # CSS pixels of a common Android phone
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--hide-scrollbars", "--force-device-scale-factor=1",
]


def find_chromium() -> str:
    """Debian's chromium, installed by scripts/browser-deps when missing (CI runs on a fresh
    machine): the test fails, never skips, when it cannot be had."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "browser-deps")], capture_output=True, text=True,
                            timeout=1800)
    found = shutil.which("chromium")
    assert result.returncode == 0 and found, f"chromium could not be installed: {result.stderr.strip()[-500:]}"
    return found


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


class Figures(HTMLParser):
    """Text of every `data-figure` element, and device rows (id -> name, image count)."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, str] = {}
        self.devices: dict[str, dict[str, str]] = {}
        self.title = ""
        self._open: list[tuple[str, str]] = []  # (what, key) being read
        self._device = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "title":
            self._in_title = True
        if tag == "tr" and a.get("data-device-id"):
            self._device = a["data-device-id"] or ""
            self.devices[self._device] = {"name": "", "images": ""}
        if a.get("data-figure"):
            figure = a["data-figure"] or ""
            if figure == "device-images" and self._device:
                self._open.append(("device-images", self._device))
            else:
                self._open.append(("figure", figure))
                self.figures[figure] = ""
        elif "device-name" in (a.get("class") or "").split() and self._device:
            self._open.append(("device-name", self._device))
        elif self._open:
            self._open.append(("", ""))  # a child element inside a figure: its text still counts

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag == "tr":
            self._device = ""
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        for what, key in self._open:
            if what == "figure":
                self.figures[key] += data
            elif what == "device-name":
                self.devices[key]["name"] += data
            elif what == "device-images":
                self.devices[key]["images"] += data


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def wait_for_status(gw: GatewayProcess, done: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = admin_status(gw)
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_status_page_in_a_real_browser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chromium = find_chromium()
    with FakeCloud() as cloud:
        gw = GatewayProcess(tmp_path / "gw", {
            "GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_CLOUD_URL": cloud.url,
            "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0",
        }).start()
        try:
            check_page(gw, cloud, chromium, tmp_path, capsys)
        finally:
            gw.stop()


def check_page(gw: GatewayProcess, cloud: FakeCloud, chromium: str, tmp_path: Path,
               capsys: pytest.CaptureFixture[str]) -> None:
    cam_a, key_a = gw.add_device("Line 1 <camera>")
    cam_b, key_b = gw.add_device("Inspection & QA")
    gw.add_device("Spare camera", status="pending")
    cloud.add_device(key_a, device_id=cam_a)
    cloud.set_key_status(key_b, 403)  # the cloud refuses this device for good: its images are dead letters
    for i in range(3):
        assert upload(gw, key_a, jpeg_bytes(20_000 + i), filename=f"line1_{i}.jpg").status_code == 201
    first = png_bytes(b"qa-0")
    assert upload(gw, key_b, first, filename="qa_0.png", content_type="image/png").status_code == 201
    assert upload(gw, key_b, png_bytes(b"qa-1"), filename="qa_1.png", content_type="image/png").status_code == 201
    assert upload(gw, key_b, first, filename="qa_again.png", content_type="image/png").status_code == 409
    assert upload(gw, "adk_" + "0" * 32, first, content_type="image/png").status_code == 401

    status = wait_for_status(gw, lambda s: s["delivered_count"] == 3 and s["dead_count"] == 2)
    assert (status["delivered_count"], status["dead_count"], status["backlog_count"]) == (3, 2, 0), status
    with gw.admin() as admin:
        devices = {d["device_id"]: d for d in admin.get("/api/admin/devices").json()["data"]}

    # Through `?token=`: the browser follows the redirect with its new cookie.
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", f"{gw.url}/?token={ADMIN_TOKEN}").stdout
    after = admin_status(gw)
    page = Figures()
    page.feed(dom)
    assert "gateway" in page.title.lower() and "sign in" not in dom.lower()
    assert int(page.figures["images"]) == status["images"] == 5
    assert int(page.figures["backlog-count"]) == status["backlog_count"] == 0
    assert int(page.figures["dead-letters"]) == status["dead_count"] == 2
    assert int(page.figures["devices"]) == status["devices"] == 3
    assert page.figures["connectivity"].strip() in (status["connectivity"], after["connectivity"])
    assert int(page.figures["accepted-recent"]) == 5
    assert int(page.figures["delivered-recent"]) == 3
    assert {d: v["name"] for d, v in page.devices.items()} == {d: v["name"] for d, v in devices.items()}
    assert page.devices[cam_a]["images"] == "3" and page.devices[cam_b]["images"] == "2"
    assert "INVALID_DEVICE_KEY" in dom and "DUPLICATE_IMAGE" in dom
    dead_section = dom.split("Dead letters")[-1]
    assert "qa_0.png" in dead_section and "qa_1.png" in dead_section and "403" in dead_section
    # A gateway on a plant LAN has no internet: the page loads nothing from elsewhere.
    assert re.search(r'(?:src|href)="(?:https?:)?//', dom) is None

    OUTPUT.mkdir(parents=True, exist_ok=True)
    phone = OUTPUT / "status-phone.png"
    desktop = OUTPUT / "status-desktop.png"
    for shot in (phone, desktop):
        shot.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={phone}", f"--window-size={PHONE[0]},{PHONE[1]}",
                 f"{gw.url}/")
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={desktop}", "--window-size=1280,1400",
                 f"{gw.url}/")
    assert png_size(phone) == PHONE
    assert phone.stat().st_size > 10_000, "an almost empty screenshot"
    with capsys.disabled():  # the path is the point: show it even when pytest captures output
        print(f"\nstatus page screenshots: {phone} (phone {PHONE[0]}x{PHONE[1]}), {desktop} (1280x1400)")
