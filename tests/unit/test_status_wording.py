"""Issue 24, item 12: the status page and `gateway status` in words a site admin reads: no raw
urllib3/aiohttp text, the cloud's code before its message, hints that fit the cause, resolved
errors marked, times with their zone, admin-API errors out of the devices' error list."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from gateway.api.status_page import device_errors
from gateway.api.status_render import PageFigures, render_page
from gateway.cli import statustext
from gateway.humanize import zoned_time
from gateway.ops.activity import ErrorEntry
from gateway.ops.errortext import KEY_HINT, explain, plain
from gateway.ops.status import DeadLetter, StatusReport

NOW = 1_764_870_000.0
LONG_MESSAGE = "The API key is not valid for this organization; " * 4
REFUSED = "img_0123abcd: HTTP 401: " + json.dumps(
    {"success": False, "error": {"code": "INVALID_DEVICE_KEY", "message": LONG_MESSAGE}})
AIOHTTP_REFUSED = ("img_0123abcd: cannot connect: Cannot connect to host 127.0.0.1:4711 ssl:default "
                   "[Connect call failed ('127.0.0.1', 4711)]")
URLLIB3 = ("Object store unavailable (HTTPConnectionPool(host='127.0.0.1', port=9000): Max retries exceeded with "
           "url: /bucket (Caused by NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f>: "
           "Failed to establish a new connection: [Errno 111] Connection refused')))")


@pytest.fixture(autouse=True)
def berlin() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def figures(report: StatusReport, **kw: object) -> PageFigures:
    base: dict[str, object] = dict(report=report, devices=[], uploads=[], dead=[], errors=[], minutes=[], now=NOW,
                                   uptime_s=60.0, version="0.1.0", forwarding_on=True,
                                   cloud_url="https://cloud.example/api")
    return PageFigures(**(base | kw))  # type: ignore[arg-type]


def test_a_refused_key_shows_status_and_code_first_and_the_key_hint() -> None:
    said = explain(REFUSED)
    assert said is not None and said.key_refused and said.status == 401
    assert said.summary.startswith("the cloud refused the device key (401 INVALID_DEVICE_KEY: The API key")
    assert "devices set-key" in said.hint and "outbox retry" in said.hint
    page = render_page(figures(StatusReport(last_error=REFUSED, last_error_at=NOW - 30, connectivity="online",
                                            dead_count=1),
                               dead=[DeadLetter(image_id="img_0123abcd", device_id="dev_1", filename="a.jpg",
                                                attempts=1, last_status=401, last_error=REFUSED,
                                                created_at=NOW - 60)]))
    assert "401 INVALID_DEVICE_KEY" in page  # not cut off before its code
    assert "<code>gateway devices set-key</code>" in page and "<code>gateway outbox retry</code>" in page
    assert "the cloud refused the device key: register the key at the cloud" in page


def test_raw_connection_errors_are_translated() -> None:
    said = explain(AIOHTTP_REFUSED)
    assert said is not None
    assert said.summary == "cannot reach the cloud: connection refused at 127.0.0.1:4711 (nothing listens there)"
    assert plain(URLLIB3) == "Object store unavailable: connection refused at 127.0.0.1:9000 (nothing listens there)"
    page = render_page(figures(StatusReport(last_error=AIOHTTP_REFUSED, last_error_at=NOW - 5,
                                            connectivity="offline", backlog_count=3, backlog_bytes=3000),
                               errors=[ErrorEntry(at=NOW - 2, method="POST", path="/api/device/images/upload",
                                                  status=503, code="SERVICE_UNAVAILABLE", message=URLLIB3)]))
    assert "Connect call failed" not in page and "HTTPConnectionPool" not in page
    assert "Max retries" not in page and "connection refused at 127.0.0.1:9000" in page


def test_the_backlog_outlook_is_a_sentence() -> None:
    offline = render_page(figures(StatusReport(connectivity="offline", backlog_count=2, backlog_bytes=10)))
    assert "waiting for the cloud to come back" in offline and "drained in" not in offline
    stuck = render_page(figures(StatusReport(connectivity="online", backlog_count=2, backlog_bytes=10)))
    assert "not moving: nothing delivered lately" in stuck and "stalled" not in stuck
    off = render_page(figures(StatusReport(connectivity="off", backlog_count=2, backlog_bytes=10),
                              forwarding_on=False))
    assert "forwarding is off" in off
    assert statustext.outlook({"backlog_count": 2, "connectivity": "offline"}) == "waiting for the cloud to come back"
    assert statustext.outlook({"backlog_count": 2, "connectivity": "online", "eta_s": 120.0}).startswith("about 2")


def test_an_error_followed_by_a_delivery_is_marked_resolved() -> None:
    report = StatusReport(last_error=AIOHTTP_REFUSED, last_error_at=NOW - 100, last_success_at=NOW - 10,
                          connectivity="online")
    page = render_page(figures(report))
    assert 'data-figure="last-error-resolved"' in page and 'class="bad" data-figure="last-error"' not in page
    line = statustext.last_error(msgspec_dict(report))
    assert line.startswith("resolved, delivered since: cannot reach the cloud")
    current = statustext.last_error(msgspec_dict(StatusReport(last_error=REFUSED, last_error_at=NOW)))
    assert current.startswith("the cloud refused the device key (401 INVALID_DEVICE_KEY") and KEY_HINT in current


def test_times_carry_their_timezone() -> None:
    assert zoned_time(NOW) == "2025-12-04 18:40:00 CET (+0100)"
    page = render_page(figures(StatusReport(last_success_at=NOW - 60, connectivity="online")))
    assert "CET (+0100) (gateway time)" in page and 'title="2025-12-04 18:39:00 CET (+0100)"' in page
    assert statustext.last_success({"last_success_at": NOW}) == "2025-12-04 18:40:00 CET (+0100)"


def test_admin_api_errors_stay_out_of_the_devices_error_list() -> None:
    def err(path: str) -> ErrorEntry:
        return ErrorEntry(at=NOW, method="GET", path=path, status=403, code="FORBIDDEN")

    kept = device_errors([err("/api/admin/devices"), err("/api/device/images/upload"), err("/"),
                          err("/api/admin/status"), err("/api/core/agent/checkin")])
    assert [x.path for x in kept] == ["/api/device/images/upload", "/api/core/agent/checkin"]


def msgspec_dict(report: StatusReport) -> dict[str, object]:
    import msgspec

    out: dict[str, object] = msgspec.to_builtins(report)
    return out
