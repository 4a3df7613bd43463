"""Bodies and connections a hostile client controls, against a real `gateway serve` (issue 23,
items 1 and 10): JSON bodies have a limit and a read timeout, refused uploads are answered before
their body is read, half-sent headers are cut off, and requests in progress are capped."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.client import raw_request
from tests.support.gateway_proc import ADMIN_TOKEN, GatewayProcess

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
FOLDER = {"GATEWAY_STORAGE_BACKEND": "folder"}


def _chunked(total: int, piece: int = MiB) -> Iterator[bytes]:
    """A JSON-looking body of `total` bytes in HTTP/1.1 chunked framing (no Content-Length)."""
    sent = 0
    yield b'1\r\n{\r\n'
    block = b'"' + b"x" * (piece - 2) + b'"'
    while sent < total:
        yield f"{len(block):x}\r\n".encode() + block + b"\r\n"
        sent += len(block)
    yield b"0\r\n\r\n"


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], float]:
    """Read one answer's head; (status, headers, seconds it took)."""
    sock.settimeout(timeout)
    started = time.monotonic()
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed without an answer ({data[:100]!r})")
        data += piece
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:])}
    return int(head[0].split()[1]), headers, time.monotonic() - started


def test_huge_checkin_is_refused_413_while_streaming_with_flat_memory(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(FOLDER)
    _, key = gw.add_device("camera")
    ok = httpx.post(f"{gw.url}/api/device/checkin", json={"status": "ok", "metrics": {"t": 1}},
                    headers={"X-Device-Key": key})
    assert ok.status_code == 200
    before = gw.vm_hwm_kib()
    # 150 MiB, chunked: no Content-Length to refuse it by, the limit must hold while reading.
    status, headers, body = raw_request(
        f"{gw.url}/api/device/checkin",
        _head("/api/device/checkin", {"X-Device-Key": key, "Content-Type": "application/json",
                                      "Transfer-Encoding": "chunked"}),
        _chunked(150 * MiB))
    assert status == 413 and b"PAYLOAD_TOO_LARGE" in body
    assert headers.get("connection") == "close"
    # Declared too big: refused from the header, before any byte of the body.
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(_head("/api/device/checkin", {"X-Device-Key": key, "Content-Type": "application/json",
                                                   "Content-Length": str(150 * MiB)}))
        status, headers, took = _answer(sock, 5)
    assert status == 413 and took < 2
    growth_mib = (gw.vm_hwm_kib() - before) / 1024
    assert growth_mib < 20, f"server peak RSS grew {growth_mib:.0f} MiB"


def test_admin_json_body_over_the_limit_is_413(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway(FOLDER)
    resp = httpx.post(f"{gw.url}/api/admin/devices", content=b'{"name": "' + b"x" * (2 * MiB) + b'"}',
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


def test_stalled_checkin_gets_408_within_the_read_timeout(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({**FOLDER, "GATEWAY_SERVER_READ_TIMEOUT_S": "2"})
    _, key = gw.add_device("camera")
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(_head("/api/device/checkin", {"X-Device-Key": key, "Content-Type": "application/json",
                                                   "Content-Length": "100000"}) + b'{"status": ')
        status, _, took = _answer(sock, 15)
    assert status == 408 and took < 6


def test_refused_upload_is_answered_before_its_body_is_sent(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway(FOLDER)
    _, pending_key = gw.add_device("pending-camera", status="pending")
    for key, expected in (("adk_" + "0" * 32, 401), (pending_key, 403), (None, 401)):
        headers = {"Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(50 * MiB)}
        if key:
            headers["X-Device-Key"] = key
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(_head("/api/device/images/upload", headers))  # not one byte of the body
            status, answer_headers, took = _answer(sock, 5)
        assert status == expected and took < 2, (key, status, took)
        assert answer_headers.get("connection") == "close"


def test_client_writing_its_whole_body_first_still_gets_the_refusal(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(FOLDER)
    body = b"--b\r\n" + b"\xff" * (20 * MiB)
    for _ in range(3):
        resp = httpx.post(f"{gw.url}/api/device/images/upload", content=body, timeout=30,
                          headers={"X-Device-Key": "adk_" + "0" * 32,
                                   "Content-Type": "multipart/form-data; boundary=b"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "INVALID_DEVICE_KEY"


def test_half_sent_headers_are_cut_off_by_the_header_timeout(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway(FOLDER)  # default server.header_timeout_s
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /api/device/checkin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Dev")
        sock.settimeout(20)
        started = time.monotonic()
        try:
            closed = sock.recv(1024) == b""
        except ConnectionResetError:
            closed = True
        took = time.monotonic() - started
    assert closed and took < 15, f"held {took:.0f} s"


def test_requests_in_progress_are_capped_with_503(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({**FOLDER, "GATEWAY_SERVER_MAX_CONNECTIONS": "3"})
    _, key = gw.add_device("camera")
    held = []
    try:
        for _ in range(3):  # three uploads that send their headers and then nothing: in progress
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(_head("/api/device/images/upload", {
                "X-Device-Key": key, "Content-Type": "multipart/form-data; boundary=b", "Content-Length": "5000"}))
            held.append(sock)
        time.sleep(0.5)
        resp = httpx.get(f"{gw.url}/api/device/self", headers={"X-Device-Key": key}, timeout=5)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert int(resp.headers["retry-after"]) >= 1
        assert httpx.get(f"{gw.url}/api/health", timeout=5).status_code == 200  # still seen alive
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert httpx.get(f"{gw.url}/api/device/self", headers={"X-Device-Key": key}, timeout=5).status_code == 200
