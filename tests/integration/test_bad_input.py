"""The malformed-request corpus: each case gets its documented 4xx in the envelope, stores nothing,
leaves no catalog row and no spool file, and the server stays healthy afterwards.

Requests go over raw sockets (httpx would tidy them up). The figures table printed at the end is
the one docs/reliability.md quotes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import jpeg_bytes
from tests.support import figures
from tests.support.client import admin_status, raw_request, spool_files, stored_objects
from tests.support.gateway_proc import GatewayProcess

UPLOAD = "/api/device/images/upload"
BOUNDARY = "corpusB0undary"
READ_TIMEOUT_S = 2
MAX_METADATA = 64 * 1024

Reply = tuple[int, dict[str, str], bytes]
RESULTS: list[tuple[str, str, str, str]] = []  # case, expected, got, stored/spool/health


@pytest.fixture(scope="module")
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {
        "GATEWAY_STORAGE_BACKEND": "folder",
        "GATEWAY_SERVER_READ_TIMEOUT_S": str(READ_TIMEOUT_S),  # the slow-body cases wait this long
        "GATEWAY_LIMITS_MAX_METADATA_BYTES": str(MAX_METADATA),
    }
    proc = GatewayProcess(tmp_path_factory.mktemp("gw-bad"), env).start()
    yield proc
    code = proc.stop()
    refused = [r for r in RESULTS if r[2][0] == "4" or r[2] == "connection closed"]
    accepted = [r for r in RESULTS if r[2].startswith("2")]
    figures.report(
        request.config, "bad_input", "Bad-input corpus (tests/integration/test_bad_input.py)",
        ["case", "expected", "got", "stored / spool / health"], RESULTS,
        {"cases": len(RESULTS),
         "refused (4xx or hang-up)": len(refused),
         "refused but left something (row, object, spool file)": sum(
             1 for r in refused if r[3] != "nothing stored, spool empty, healthy"),
         "valid uploads with odd names or chunked framing, accepted (names sanitised)": len(accepted),
         "5xx answers": sum(1 for r in RESULTS if r[2].startswith("5"))},
    )
    assert code == 0, proc.log_tail()


@pytest.fixture(scope="module")
def key(gw: GatewayProcess) -> str:
    return gw.add_device("cam-corpus")[1]


# -- building raw requests ------------------------------------------------------------------


def head(key: str, content_type: str | None, length: int | None, *, path: str = UPLOAD, method: str = "POST",
         chunked: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"X-Device-Key: {key}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def part(name: str, data: bytes, *, filename: bytes | None = None, boundary: str = BOUNDARY,
         extra: bytes = b"") -> bytes:
    disp = f'Content-Disposition: form-data; name="{name}"'.encode()
    if filename is not None:
        disp += b'; filename="' + filename + b'"'
    ctype = b"Content-Type: image/jpeg\r\n" if filename is not None else b""
    return f"--{boundary}\r\n".encode() + disp + b"\r\n" + extra + ctype + b"\r\n" + data + b"\r\n"


def end(boundary: str = BOUNDARY) -> bytes:
    return f"--{boundary}--\r\n".encode()


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def send(gw: GatewayProcess, head_bytes: bytes, *chunks: bytes, timeout: float = 30.0) -> Reply:
    status, headers, body = raw_request(gw.url, head_bytes, iter(chunks), read_timeout=timeout)
    # Bytes past Content-Length belong to whatever the server made of the rest of the stream.
    return status, headers, body[: int(headers.get("content-length", len(body)))]


def form(key: str, body: bytes, content_type: str = MULTIPART) -> tuple[bytes, bytes]:
    return head(key, content_type, len(body)), body


def chunked(body: bytes, size: int = 1000) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def slow(gw: GatewayProcess, head_bytes: bytes, body: bytes, every_s: float = 1.0) -> Reply:
    """Send the body a byte at a time, `every_s` apart, while waiting for the answer."""

    def trickle() -> Iterator[bytes]:
        for i in range(len(body)):
            time.sleep(every_s)
            yield body[i : i + 1]

    return raw_request(gw.url, head_bytes, trickle(), read_timeout=READ_TIMEOUT_S * 10 + 10)


# -- the corpus -------------------------------------------------------------------------------


# Framing errors h11 (inside hypercorn) refuses before the app sees a request: a bare 400 with
# an empty body and the connection closed. No envelope is possible there; nothing reaches the app.
HTTP_LAYER = "(HTTP layer, empty body)"


@dataclass
class Case:
    name: str
    status: int
    code: str
    run: Callable[[GatewayProcess, str], Reply]
    stores: bool = False  # the one case in here that is a valid upload


IMG = jpeg_bytes(3000)
GOOD = part("image", IMG, filename=b"ok.jpg") + part("metadata", b'{"model_id": "m"}') + end()


def _deep(n: int) -> bytes:
    return b'{"a": ' + b"[" * n + b"]" * n + b"}"


CASES: list[Case] = [
    Case("no boundary", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, GOOD, "multipart/form-data"))),
    Case("wrong boundary", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, GOOD, "multipart/form-data; boundary=notTheOneUsed"))),
    Case("truncated body (cut inside the image)", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, GOOD[: len(GOOD) // 2]))),
    Case("missing final boundary", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg")))),
    Case("5,000 parts", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, b"".join(part(f"p{i}", b"x") for i in range(5000)) + GOOD))),
    Case("1 MB part header", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg", extra=b"X-Pad: " + b"a" * 2**20
                                            + b"\r\n") + end()))),
    Case("metadata part given twice", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("metadata", b"{}") + part("metadata", b"{}") + part(
             "image", IMG, filename=b"a.jpg") + end()))),
    Case("image part given twice", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg") + part(
             "image", jpeg_bytes(100), filename=b"b.jpg") + end()))),
    Case(f"metadata over {MAX_METADATA // 1024} KiB", 413, "PAYLOAD_TOO_LARGE",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg") + part(
             "metadata", json.dumps({"pad": "x" * MAX_METADATA}).encode()) + end()))),
    Case("metadata nested 40 deep", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg") + part("metadata", _deep(40)) + end()))),
    Case("metadata nested 30,000 deep", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg") + part("metadata", _deep(30000))
                                    + end()))),
    Case("metadata not JSON", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg") + part("metadata", b"\xff{nope")
                                    + end()))),
    Case("metadata a JSON array", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", IMG, filename=b"a.jpg") + part("metadata", b"[1, 2]") + end()))),
    Case("Content-Length shorter than the body", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, head(k, MULTIPART, len(GOOD) - 40), GOOD)),
    Case("Content-Length longer than the body (client then waits)", 408, "REQUEST_TIMEOUT",
         lambda g, k: send(g, head(k, MULTIPART, len(GOOD) + 500), GOOD)),
    Case("Content-Length not a number", 400, HTTP_LAYER,
         lambda g, k: send(g, head(k, MULTIPART, None)[:-2] + b"Content-Length: 12abc\r\n\r\n", GOOD)),
    Case("chunked, malformed multipart inside", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, head(k, MULTIPART, None, chunked=True), chunked(GOOD[:-30]))),
    Case("chunked, broken chunk framing", 400, HTTP_LAYER,
         lambda g, k: send(g, head(k, MULTIPART, None, chunked=True), b"zz\r\n" + GOOD + b"\r\n0\r\n\r\n")),
    Case("slow body, 1 byte/s (read timeout 2 s)", 408, "REQUEST_TIMEOUT",
         lambda g, k: slow(g, head(k, MULTIPART, len(GOOD)), GOOD)),
    Case("body stalls after the headers", 408, "REQUEST_TIMEOUT",
         lambda g, k: send(g, head(k, MULTIPART, len(GOOD)), GOOD[:100])),
    Case("JSON body to the upload route", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, b'{"image": "aGVsbG8="}', "application/json"))),
    Case("empty body", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, b""))),
    Case("no Content-Type", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, head(k, None, len(GOOD)), GOOD)),
    Case("metadata only, no image", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("metadata", b"{}") + end()))),
    Case("image part without bytes", 400, "VALIDATION_ERROR",
         lambda g, k: send(g, *form(k, part("image", b"", filename=b"a.jpg") + end()))),
    Case("unknown route", 404, "NOT_FOUND",
         lambda g, k: send(g, head(k, None, 0, path="/api/device/images/nope", method="GET"))),
    Case("unknown route outside /api", 404, "NOT_FOUND",
         lambda g, k: send(g, head(k, None, 0, path="/../../etc/passwd", method="GET"))),
    Case("GET on the upload route", 405, "METHOD_NOT_ALLOWED",
         lambda g, k: send(g, head(k, None, 0, method="GET"))),
    Case("DELETE on the upload route", 405, "METHOD_NOT_ALLOWED",
         lambda g, k: send(g, head(k, None, 0, method="DELETE"))),
    Case("PUT on /api/health", 405, "METHOD_NOT_ALLOWED",
         lambda g, k: send(g, head(k, None, 0, path="/api/health", method="PUT"))),
]


def _disconnect_mid_body(gw: GatewayProcess, key: str) -> Reply:
    """A client that hangs up half-way: there is nobody to answer, so only the effects are checked."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head(key, MULTIPART, len(GOOD)) + GOOD[: len(GOOD) // 2])
        time.sleep(0.3)
    return 0, {}, b""


# -- checks ---------------------------------------------------------------------------------


class State:
    def __init__(self, gw: GatewayProcess) -> None:
        self.images = admin_status(gw)["images"]
        self.objects = set(stored_objects(gw))


def _effects(gw: GatewayProcess, before: State) -> str:
    """'nothing stored, spool empty, healthy', or what went wrong; waits briefly for the server
    to finish a request whose client has gone."""
    deadline = time.monotonic() + 5
    while True:
        problems = []
        health = httpx.get(f"{gw.url}/api/health", timeout=10)
        if health.status_code != 200:
            problems.append(f"health {health.status_code}")
        after = State(gw)
        if after.images != before.images:
            problems.append(f"{after.images - before.images} catalog row(s)")
        if after.objects != before.objects:
            problems.append(f"{len(after.objects - before.objects)} object(s)")
        if spool_files(gw):
            problems.append(f"spool {spool_files(gw)}")
        if not problems or time.monotonic() > deadline:
            return "; ".join(problems) or "nothing stored, spool empty, healthy"
        time.sleep(0.2)


def _envelope(reply: Reply) -> dict[str, Any]:
    status, headers, raw = reply
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, raw[:300])
    body: dict[str, Any] = json.loads(raw)
    assert body["success"] is False
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], str)
    return body


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request_is_refused_cleanly(gw: GatewayProcess, key: str, case: Case) -> None:
    before = State(gw)
    reply = case.run(gw, key)
    status = reply[0]
    if case.code == HTTP_LAYER and status == 400 and reply[2] == b"":
        code = HTTP_LAYER
    else:
        code = _envelope(reply)["error"]["code"] if status >= 400 else "-"
    effects = _effects(gw, before)
    RESULTS.append((case.name, f"{case.status} {case.code}", f"{status} {code}", effects))
    assert (status, code) == (case.status, case.code), reply[2][:500]
    assert effects == "nothing stored, spool empty, healthy"


def test_client_hanging_up_mid_body_leaves_nothing(gw: GatewayProcess, key: str) -> None:
    before = State(gw)
    _disconnect_mid_body(gw, key)
    effects = _effects(gw, before)
    RESULTS.append(("client hangs up mid-body", "no answer possible", "connection closed", effects))
    assert effects == "nothing stored, spool empty, healthy"


@pytest.mark.parametrize(
    "raw_name, expected",
    [
        (b"caf\xe9 \xff\xfe.jpg", "caf"),  # latin-1 / invalid UTF-8 bytes
        (b"a\r\nX-Injected: 1.jpg", None),  # CR/LF: ends the part header early
        (b'a\\"; name=\\"metadata.jpg', None),  # escaped quotes trying to rename the part
        (b"../../etc/passwd\x00.jpg", None),  # path traversal and NUL
    ],
    ids=["non-UTF-8", "CRLF injection", "quote injection", "traversal+NUL"],
)
def test_hostile_file_names_are_refused_or_sanitised(gw: GatewayProcess, key: str, raw_name: bytes,
                                                      expected: str | None) -> None:
    """A valid image under a hostile name: either refused with a 400 storing nothing, or stored
    under a sanitised key that holds no control, quote, path or header characters."""
    before = State(gw)
    image = jpeg_bytes(2000)
    reply = send(gw, *form(key, part("image", image, filename=raw_name) + end()))
    status, headers, raw = reply
    shown = raw_name.decode("latin-1").encode("unicode_escape").decode()
    assert "x-injected" not in headers
    if status == 400:
        assert _envelope(reply)["error"]["code"] == "VALIDATION_ERROR"
        effects = _effects(gw, before)
        RESULTS.append((f"file name {shown!r}", "400 or sanitised", "400 VALIDATION_ERROR", effects))
        assert effects == "nothing stored, spool empty, healthy"
        return
    assert status == 201, raw[:500]
    key_ = json.loads(raw)["data"]["storage_key"]
    name = key_.split("_", 1)[1]
    assert all(ch.isalnum() or ch in "._-()+" for ch in name), key_
    assert ".." not in name and "/" not in name
    if expected:
        assert name.startswith(expected)
    assert stored_objects(gw)[key_] == image
    assert spool_files(gw) == []
    RESULTS.append((f"file name {shown!r}", "400 or sanitised", f"201, stored as {name!r}",
                    "sanitised key, spool empty, healthy"))


def test_chunked_valid_upload_succeeds(gw: GatewayProcess, key: str) -> None:
    image = jpeg_bytes(50_000)
    body = part("image", image, filename=b"chunked.jpg") + part("metadata", b'{"source": "chunked"}') + end()
    status, _, raw = send(gw, head(key, MULTIPART, None, chunked=True), chunked(body, 4096))
    assert status == 201, raw[:500]
    stored = json.loads(raw)["data"]["storage_key"]
    assert stored_objects(gw)[stored] == image
    assert spool_files(gw) == []
    RESULTS.append(("chunked transfer encoding, valid upload", "201", f"{status}", "stored once, spool empty"))
