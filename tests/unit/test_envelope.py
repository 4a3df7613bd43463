"""The one error envelope, pinned for every error code the gateway can answer with."""

from __future__ import annotations

import logging

import msgspec
import pytest

from gateway.api.envelope import error_body, ok, render_gateway_error
from gateway.errors import ALL_ERRORS, DuplicateImage, GatewayError, RateLimited, ServiceUnavailable
from gateway.logs import request_id

SPEC_CODES = {
    ("UNAUTHORIZED", 401), ("INVALID_DEVICE_KEY", 401), ("DEVICE_NOT_APPROVED", 403), ("VALIDATION_ERROR", 400),
    ("PAYLOAD_TOO_LARGE", 413), ("UNSUPPORTED_MEDIA_TYPE", 415), ("DUPLICATE_IMAGE", 409), ("RATE_LIMITED", 429),
    ("INSUFFICIENT_STORAGE", 507), ("SERVICE_UNAVAILABLE", 503), ("NEAR_DUPLICATE_IMAGE", 409),
    ("INVALID_TOKEN", 401), ("TOKEN_EXPIRED", 401), ("DEVICE_EXISTS", 409),  # provisioning (SPEC §2)
}


def _headers(resp: object) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.headers.items()}  # type: ignore[attr-defined]


def test_every_spec_code_has_an_error_class() -> None:
    assert {(cls.code, cls.status) for cls in ALL_ERRORS} >= SPEC_CODES


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.code)
def test_envelope_shape(cls: type[GatewayError]) -> None:
    resp = render_gateway_error(None, cls("something went wrong", "more"))  # type: ignore[arg-type]
    assert resp.status_code == cls.status
    body = msgspec.json.decode(resp.content)
    # Server-side failures keep their details for the log (under the request id), not the client.
    details = "more" if cls.status < 500 else body["error"]["details"]
    error = {"code": cls.code, "message": "something went wrong", "details": details}
    assert body == {"success": False, "error": error}
    if cls.status >= 500:
        assert "more" not in details and "request id" in details
    assert cls.code.isupper() and " " not in cls.code
    if cls.status in (429, 503, 507):
        assert int(_headers(resp)["retry-after"]) > 0


def test_server_side_details_name_the_request_id_and_go_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    token = request_id.set("abc123def456")
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.api"):
            resp = render_gateway_error(  # type: ignore[arg-type]
                None, ServiceUnavailable("Local storage unavailable", "[Errno 13] Permission denied: '/srv/data/x'"))
    finally:
        request_id.reset(token)
    details = msgspec.json.decode(resp.content)["error"]["details"]
    assert "abc123def456" in details and "/srv" not in details and "Errno" not in details
    assert "Permission denied: '/srv/data/x'" in caplog.text


def test_duplicate_carries_existing_ids_in_data() -> None:
    ids = {"image_id": "img_x", "batch_id": "batch_y", "storage_key": "raw-data/z"}
    body = msgspec.json.decode(render_gateway_error(None, DuplicateImage(data=ids)).content)  # type: ignore[arg-type]
    assert body["data"] == ids and body["error"]["code"] == "DUPLICATE_IMAGE"


def test_retry_after_can_be_set() -> None:
    resp = render_gateway_error(None, RateLimited(retry_after=17))  # type: ignore[arg-type]
    assert _headers(resp)["retry-after"] == "17"


def test_success_envelope() -> None:
    assert msgspec.json.decode(ok({"a": 1}, meta={"total": 1}).content) == {
        "success": True, "data": {"a": 1}, "meta": {"total": 1}}
    assert msgspec.json.decode(error_body("X_Y", "m")) == {
        "success": False, "error": {"code": "X_Y", "message": "m", "details": ""}}
