"""The forwarded request body and the sorting of the cloud's answers (no network)."""

from __future__ import annotations

import asyncio
import email.utils
import io
import time
from collections.abc import AsyncIterable, AsyncIterator

import multipart
import pytest

from gateway.forward.client import (
    DELIVERED,
    REJECT,
    RETRY,
    LocalBytesChanged,
    MultipartUpload,
    Outcome,
    classify,
)


async def _pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _collect(form: MultipartUpload, image: bytes | AsyncIterable[bytes]) -> bytes:
    async def main() -> bytes:
        return b"".join([piece async for piece in form.stream(image)])

    return asyncio.run(main())


def _parts(body: bytes, content_type: str) -> dict[str, tuple[bytes, str | None, str | None]]:
    _, opts = multipart.parse_options_header(content_type)
    parser = multipart.MultipartParser(io.BytesIO(body), opts["boundary"])
    return {p.name: (p.raw, p.filename, p.content_type) for p in parser}


@pytest.mark.parametrize("metadata", [None, b'{ "b":1,  "a" : "\\u00e9\\n" }'])
def test_body_has_the_exact_length_and_parts_as_stored(metadata: bytes | None) -> None:
    image = b"\xff\xd8\xff" + bytes(range(256)) * 40
    form = MultipartUpload('we"ird\r\nname.jpg', "image/jpeg", len(image), metadata)
    body = _collect(form, _pieces(image, 1000))
    assert len(body) == form.length
    assert _collect(form, image) == body  # a cached image goes in one piece, the same bytes
    parts = _parts(body, form.content_type)
    assert parts["image"][0] == image
    assert parts["image"][2] == "image/jpeg"
    assert parts["image"][1] == 'we"ird\r\nname.jpg'  # escaped in the header, not breaking out of it
    if metadata is None:
        assert "metadata" not in parts
    else:
        assert parts["metadata"][0] == metadata  # byte for byte


def test_body_refuses_bytes_other_than_recorded() -> None:
    form = MultipartUpload("a.jpg", "image/jpeg", 10, None)
    for wrong in (9, 11):
        with pytest.raises(LocalBytesChanged):
            _collect(form, _pieces(b"\xff" * wrong, 4))
        with pytest.raises(LocalBytesChanged):
            _collect(form, b"\xff" * wrong)


def _answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Outcome:
    return classify(status, body, (headers or {}).get("Retry-After"))


def test_answers_sorted_into_delivered_retry_reject() -> None:
    out = _answer(201, b'{"success":true,"data":{"image_id":"img_1","batch_id":"batch_1","storage_key":"raw/1"}}')
    assert (out.kind, out.image_id, out.batch_id, out.storage_key) == (DELIVERED, "img_1", "batch_1", "raw/1")
    dup = _answer(409, b'{"success":false,"error":{"code":"DUPLICATE_IMAGE"},"data":{"image_id":"img_0"}}')
    assert (dup.kind, dup.image_id, dup.batch_id) == (DELIVERED, "img_0", None)
    assert _answer(409, b"not json").kind == DELIVERED
    for status in (408, 429, 500, 502, 503, 504):
        assert _answer(status).kind == RETRY
    assert _answer(503, headers={"Retry-After": "3"}).retry_after_s == 3.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert _answer(429, headers={"Retry-After": when}).retry_after_s == pytest.approx(30, abs=2)
    for status in (400, 401, 403, 404, 413, 415):
        out = _answer(status, b"x" * 5000)
        assert out.kind == REJECT and out.status == status
        assert len(out.error) < 2100  # a bounded slice of the body


def test_failures_and_statuses_map_in_one_place() -> None:
    """A status is judged by itself even when the connection broke after it; a 2xx only counts
    whole; no status at all is a transport failure to retry."""
    import aiohttp

    reset = aiohttp.ServerDisconnectedError()
    assert (classify(413, failure=reset).kind, classify(413, failure=reset).status) == (REJECT, 413)
    assert classify(503, failure=reset).kind == RETRY
    cut = classify(201, failure=aiohttp.ClientPayloadError("cut"))
    assert (cut.kind, cut.status) == (RETRY, 201) and "answer cut off" in cut.error
    assert classify(None, failure=TimeoutError()).error == "timed out: TimeoutError"
    assert classify(None, failure=reset).error.startswith("transport error")
    # (a refused connection: tests/integration/test_cloud_upload.py)
