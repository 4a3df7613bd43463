"""Issue 23, item 11: the drain job does not trust sizes from the server.

A small sync server on loopback lies: an image's stream runs on past the manifest's size, or the
manifest is huge. Before: the job wrote the whole stream before comparing sizes, and read the
Parquet manifest whole into memory.
"""

from __future__ import annotations

import json
import threading
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import xxhash

from gateway.syncjob.drain import DrainJob

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
IMAGE = b"\xff\xd8\xff" + b"x" * 97
BATCH = "batch_1"


class LyingSyncServer:
    """Serves one batch of one image; `image_extra` bytes past the image, a `manifest_bytes` manifest."""

    def __init__(self, image_extra: int = 0, manifest_bytes: int = 1024) -> None:
        self.image_extra = image_extra
        self.manifest = b"\0" * manifest_bytes
        self.sent = 0  # body bytes the client took before it hung up
        self.acks = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body delimited by the close: no length announced

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, chunks: Iterator[bytes], digest: str) -> None:
                self.send_response(200)
                self.send_header("X-Content-XXH3-128", digest)
                self.end_headers()
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        server.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/api/sync/batches":
                    self._json({"success": True, "data": [{"batch_id": BATCH, "image_count": 1, "total_bytes": 100}],
                                "meta": {"total": 1}})
                elif path == f"/api/sync/batches/{BATCH}":
                    row = {"image_id": "img_1", "filename": "a.jpg", "size": len(IMAGE),
                           "xxh3_128": xxhash.xxh3_128_hexdigest(IMAGE)}
                    self._json({"success": True, "data": {"batch": {"batch_id": BATCH, "image_count": 1},
                                                          "manifest": [row]}})
                elif path == "/api/sync/images/img_1":
                    extra = server.image_extra

                    def chunks() -> Iterator[bytes]:
                        yield IMAGE
                        left = extra
                        while left > 0:
                            yield b"y" * min(MiB, left)
                            left -= MiB

                    self._stream(chunks(), xxhash.xxh3_128_hexdigest(IMAGE))
                elif path == f"/api/sync/batches/{BATCH}/manifest.parquet":
                    data = server.manifest
                    self._stream((data[i : i + MiB] for i in range(0, len(data), MiB)),
                                 xxhash.xxh3_128_hexdigest(data))
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                server.acks += 1
                self._json({"success": True, "data": {"state": "drained"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LyingSyncServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _drain(url: str, dest: Path) -> Any:
    return DrainJob(url, dest, "token-0123456789", jobs=1, attempts=1, timeout_s=30).run()


def test_an_image_stream_longer_than_the_manifest_says_is_cut_at_once(tmp_path: Path) -> None:
    with LyingSyncServer(image_extra=256 * MiB) as server:
        report = _drain(server.url, tmp_path / "dest")
    assert list(report.batches_failed) == [BATCH] and "more than" in report.batches_failed[BATCH]
    assert server.acks == 0
    assert [p for p in (tmp_path / "dest").rglob("*") if p.is_file()] == []  # nothing kept of it
    # Stopped at the first byte past the size; what the sockets' buffers took is all that left.
    assert server.sent < 32 * MiB, server.sent


def test_the_manifest_is_streamed_to_disk_not_held_in_memory(tmp_path: Path) -> None:
    with LyingSyncServer(manifest_bytes=96 * MiB) as server:
        tracemalloc.start()
        try:
            report = _drain(server.url, tmp_path / "dest")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert list(report.batches_failed) == [BATCH] and server.acks == 0  # not a Parquet file
    assert peak < 16 * MiB, peak
    assert not list((tmp_path / "dest").rglob("manifest.parquet*"))
