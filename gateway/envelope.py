"""The answer envelope as a client reads it: the one parser for the gateway's and the cloud's answers.

    {"success": bool, "data": ...?, "error": {"code", "message", "details"}?, "meta": ...?}

`gateway.api.envelope` writes it; everything that reads one (the CLI, the drain job, the cloud
client, provisioning relay, the access log, the test harness) goes through `read_envelope`, which
never raises: a body that is not a JSON object reads as an empty envelope (`is_object` False).
"""

from __future__ import annotations

from typing import Any

import msgspec


class EnvelopeError(msgspec.Struct, frozen=True, kw_only=True):
    """The `error` member; missing fields read as empty strings."""

    code: str = ""
    message: str = ""
    details: str = ""

    def describe(self, fallback_code: object = "") -> str:
        """`CODE: message (details)` for people; `fallback_code` (e.g. the HTTP status) when no code came."""
        detail = f" ({self.details})" if self.details else ""
        return f"{self.code or fallback_code}: {self.message}{detail}"


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """One answer's body as parsed; `raw` is the whole JSON object ({} when the body was none)."""

    raw: dict[str, Any]
    is_object: bool

    @property
    def success(self) -> bool:
        return self.raw.get("success") is True

    @property
    def data(self) -> Any:
        return self.raw.get("data")

    @property
    def meta(self) -> Any:
        return self.raw.get("meta")

    def data_dict(self) -> dict[str, Any]:
        """`data` when it is an object, else {}."""
        data = self.raw.get("data")
        return data if isinstance(data, dict) else {}

    def data_text(self, name: str) -> str | None:
        """`data[name]` when it is a string, else None."""
        value = self.data_dict().get(name)
        return value if isinstance(value, str) else None

    def member_list(self, name: str) -> list[Any]:
        """A top-level list member (`pending_actions` of an answer sent without the envelope), else []."""
        value = self.raw.get(name)
        return value if isinstance(value, list) else []

    @property
    def error(self) -> EnvelopeError:
        """The error member (all fields empty when there is none)."""
        err = self.raw.get("error")
        if not isinstance(err, dict):
            return EnvelopeError()
        return EnvelopeError(code=_text(err.get("code")), message=_text(err.get("message")),
                             details=_text(err.get("details")))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def read_envelope(body: bytes | bytearray | str) -> Envelope:
    """Parse an answer's body; never raises (a body that is not a JSON object gives `is_object` False)."""
    try:
        payload = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return Envelope(raw={}, is_object=False)
    if not isinstance(payload, dict):
        return Envelope(raw={}, is_object=False)
    return Envelope(raw=payload, is_object=True)
