"""The one envelope reader: what the gateway writes reads back, and odd bodies never raise."""

from __future__ import annotations

import pytest

from gateway.api.envelope import error_body
from gateway.envelope import read_envelope


def test_reads_back_what_the_gateway_writes() -> None:
    answer = read_envelope(error_body("RATE_LIMITED", "Too many uploads", "limit is 60 uploads per minute"))
    assert answer.is_object and not answer.success
    assert (answer.error.code, answer.error.message) == ("RATE_LIMITED", "Too many uploads")
    assert answer.error.describe(429) == "RATE_LIMITED: Too many uploads (limit is 60 uploads per minute)"


def test_success_data_and_members() -> None:
    answer = read_envelope(b'{"success": true, "data": {"image_id": "img_1", "n": 3}, "pending_actions": [1]}')
    assert answer.success and answer.error.code == ""
    assert answer.data_text("image_id") == "img_1" and answer.data_text("n") is None
    assert answer.member_list("pending_actions") == [1] and answer.member_list("data") == []


def test_missing_code_falls_back_to_the_status() -> None:
    assert read_envelope(b'{"success": false, "error": {"message": "no"}}').error.describe(502) == "502: no"


@pytest.mark.parametrize("body", [b"", b"<html>502</html>", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"error": 3}',
                                  b'{"success": "yes", "data": [1]}', "{\"success\": true}"])
def test_odd_bodies_never_raise(body: bytes | str) -> None:
    answer = read_envelope(body)
    assert answer.error.describe("x").startswith("x:") or answer.success
    assert answer.data_dict() == {}
