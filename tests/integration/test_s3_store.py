"""The S3 store against the real S3 server: the blocking calls (spooled files, manifests) are
minio's own signed requests, whose body's SHA-256 is signed over plain HTTP (minio's public API has
no UNSIGNED-PAYLOAD there; the event loop's presigned PUT does: test_s3_async_put.py), and land
intact either way."""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MinioSettings
from gateway.errors import ServiceUnavailable
from gateway.storage.s3 import S3Store


def store(s3: Any, sign_payload: bool, secret: str | None = None) -> S3Store:
    bucket = f"sig-{int(sign_payload)}-{secrets.token_hex(4)}-{int(time.time()) % 10**6}"
    settings = MinioSettings(endpoint=s3.endpoint, access_key=s3.access_key,
                             secret_key=secret or s3.secret_key, bucket=bucket, sign_payload=sign_payload)
    return S3Store(settings)


def traced_put_headers(st: S3Store, key: str, data: bytes, tmp_path: Path, as_file: bool) -> str:
    """What the client sent for one PUT, from minio's own request trace."""
    trace = io.StringIO()
    st.client.trace_on(trace)
    try:
        if as_file:
            path = tmp_path / "body"
            path.write_bytes(data)
            st.put_file(key, path, len(data), "image/jpeg")
        else:
            st.put_bytes(key, data, "image/jpeg")
    finally:
        st.client.trace_off()
    request = trace.getvalue().split("---------END-HTTP---------")[0]
    assert request.startswith("---------START-HTTP---------\nPUT "), request[:200]
    return request


@pytest.mark.parametrize("sign_payload", [False, True], ids=["unsigned-payload", "signed-payload"])
@pytest.mark.parametrize("as_file", [False, True], ids=["bytes", "file"])
def test_objects_round_trip_with_the_payload_signed_or_not(
    s3: Any, tmp_path: Path, sign_payload: bool, as_file: bool
) -> None:
    st = store(s3, sign_payload)
    st.ensure_ready()
    data = secrets.token_bytes(300_000)
    sent = traced_put_headers(st, "raw-data/a.jpg", data, tmp_path, as_file)
    payload = re.search(r"(?im)^x-amz-content-sha256: (\S+)$", sent)
    assert payload is not None, sent
    assert payload.group(1) == hashlib.sha256(data).hexdigest()
    assert re.search(r"(?im)^authorization: AWS4-HMAC-SHA256 Credential=", sent), "the request is still signed"
    assert re.search(r"(?im)^content-length: 300000$", sent)
    assert b"".join(st.iter_chunks("raw-data/a.jpg")) == data
    info = st.stat("raw-data/a.jpg")
    assert info is not None and info.size == len(data)


def test_an_unsigned_payload_still_needs_the_right_secret(s3: Any) -> None:
    good = store(s3, sign_payload=False)
    good.ensure_ready()
    bad = store(s3, sign_payload=False, secret="not-the-secret")
    bad.bucket = good.bucket
    with pytest.raises(ServiceUnavailable, match="refused"):
        bad.put_bytes("raw-data/b.jpg", b"\xff\xd8\xff" + secrets.token_bytes(1000), "image/jpeg")
    assert good.stat("raw-data/b.jpg") is None
