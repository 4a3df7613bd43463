"""Test-side helpers: upload through real HTTP, and look at what a gateway holds."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from minio import Minio

from tests.support.gateway_proc import GatewayProcess


def metrics(gw: GatewayProcess) -> dict[str, float]:
    """Every sample on the gateway's /metrics, keyed by its series as printed: `name` or
    `name{label="value"}`."""
    samples = {}
    for line in httpx.get(f"{gw.url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def upload(
    gw: GatewayProcess,
    key: str | None,
    image: bytes | None,
    filename: str = "frame.jpg",
    metadata: str | bytes | None = None,
    content_type: str = "image/jpeg",
    timeout: float = 60.0,
) -> httpx.Response:
    headers = {"X-Device-Key": key} if key is not None else {}
    files: dict[str, Any] = {}
    if image is not None:
        files["image"] = (filename, image, content_type)
    data = {"metadata": metadata} if metadata is not None else None
    if not files and data:
        # httpx only sends multipart when a file is present; build it by hand.
        boundary = "testboundary1234"
        meta = metadata.encode() if isinstance(metadata, str) else metadata
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n".encode()
                + (meta or b"") + f"\r\n--{boundary}--\r\n".encode())
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        return httpx.post(f"{gw.url}/api/device/images/upload", content=body, headers=headers, timeout=timeout)
    return httpx.post(f"{gw.url}/api/device/images/upload", files=files, data=data, headers=headers,
                      timeout=timeout)


def raw_request(url: str, head: bytes, body_chunks: Any, read_timeout: float = 30.0) -> tuple[int, dict[str, str],
                                                                                                  bytes]:
    """Send a request over a plain socket while reading the answer, as curl does: a server may
    answer (413, 415, 401) before the body ends and stop reading. Returns (status, headers, body)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=read_timeout)

    def send() -> None:
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                raise ConnectionError(f"connection closed without an answer (got {data[:200]!r})")
            data += piece
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
        return status, headers, rest
    finally:
        sock.close()
        sender.join(timeout=10)


def multipart_head(url: str, key: str, boundary: str, length: int, filename: str = "big.jpg") -> tuple[bytes, bytes]:
    """Request head and the image part's preamble for a streamed multipart upload of `length` image bytes."""
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode()
    epilogue = f"\r\n--{boundary}--\r\n".encode()
    total = len(preamble) + length + len(epilogue)
    path = urlsplit(url).path or "/"
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Device-Key: {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n").encode()
    return head + preamble, epilogue


def admin_status(gw: GatewayProcess) -> dict[str, Any]:
    with gw.admin() as client:
        resp = client.get("/api/admin/status")
        resp.raise_for_status()
        return resp.json()["data"]  # type: ignore[no-any-return]


def stored_objects(gw: GatewayProcess) -> dict[str, bytes]:
    """Every image object the gateway's store holds, by key."""
    if gw.env.get("GATEWAY_STORAGE_BACKEND") == "minio":
        client = Minio(gw.env["GATEWAY_MINIO_ENDPOINT"], gw.env["GATEWAY_MINIO_ACCESS_KEY"],
                       gw.env["GATEWAY_MINIO_SECRET_KEY"], secure=False)
        bucket = gw.env["GATEWAY_MINIO_BUCKET"]
        if not client.bucket_exists(bucket):
            return {}
        out = {}
        for obj in client.list_objects(bucket, prefix="raw-data/", recursive=True):
            resp = client.get_object(bucket, obj.object_name)
            try:
                out[obj.object_name] = resp.read()
            finally:
                resp.close()
                resp.release_conn()
        return out
    root = Path(gw.env["GATEWAY_DATA_DIR"]) / "objects"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "raw-data").glob("*") if p.is_file()} \
        if (root / "raw-data").is_dir() else {}


def spool_files(gw: GatewayProcess) -> list[str]:
    spool = Path(gw.env["GATEWAY_DATA_DIR"]) / "spool"
    return sorted(p.name for p in spool.glob("*")) if spool.is_dir() else []


def upload_streamed(url: str, key: str, size: int, tag: int, block: bytes, read_timeout: float = 120.0) -> int:
    """Upload `size` image bytes (JPEG magic, an 8-byte `tag` so each differs, then `block` over
    and over) without building the body in memory; returns the answer's status."""

    def chunks() -> Any:
        yield b"\xff\xd8\xff" + tag.to_bytes(8, "big")
        left = size - 11
        while left > 0:
            piece = block[: min(len(block), left)]
            left -= len(piece)
            yield piece
        yield tail

    head, tail = multipart_head(url, key, f"bnd{tag}", size, filename=f"big{tag}.jpg")
    return raw_request(url, head, chunks(), read_timeout=read_timeout)[0]


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    """Poll `check()` every 0.1 s until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
