"""Forwarding errors in words for site admins: what happened, the cloud's code first, and what to do.

The forwarder records errors as it meets them (`IMAGE_ID: HTTP 401: {envelope}`, `cannot connect:
<aiohttp text>`, urllib3's `HTTPConnectionPool(...): Max retries exceeded ...`); the API keeps them
as they are, and the status page and `gateway status` show them through `explain`. Pure functions.
"""

from __future__ import annotations

import json
import re

import msgspec

_IMAGE = re.compile(r"^(img_[0-9A-Za-z_-]+): ")
_HTTP = re.compile(r"^HTTP (\d{3}): ?(.*)$", re.S)
_URLLIB3 = re.compile(r"HTTPS?ConnectionPool\(host='([^']*)', port=(\d+)\)")
_HOSTPORT = re.compile(r"host ([^\s\]]+?:\d+)")

KEY_HINT = ("register the key at the cloud or `gateway devices set-key`, then `gateway outbox retry` "
            "(it sends the dead letters again)")
NETWORK_HINT = "images wait here and go out once the cloud answers; check the network, cloud.url and cloud.proxy"


class Explained(msgspec.Struct, kw_only=True):
    """One recorded error, for people: `summary` first (the cloud's status and code before any
    message), then `hint` (what to do; empty when nothing is needed)."""

    summary: str
    hint: str = ""
    image_id: str | None = None
    status: int | None = None
    code: str | None = None
    key_refused: bool = False


def explain(raw: str | None) -> Explained | None:
    """`raw` (a recorded forwarding error) in words; None when there is none."""
    if not raw:
        return None
    text = raw.strip()
    image_id = None
    if m := _IMAGE.match(text):
        image_id, text = m.group(1), text[m.end():]
    if text.startswith("KEY_UNREADABLE"):
        return Explained(summary="the device key stored here cannot be opened (KEY_UNREADABLE)",
                         hint="point keys.secret_file at the secret the keys were sealed with, then "
                              "`gateway outbox retry`", image_id=image_id)
    if m := _HTTP.match(text):
        return _http(int(m.group(1)), m.group(2), image_id)
    for prefix, what in (("cannot connect: ", "cannot reach the cloud"), ("transport error: ", "the connection broke"),
                         ("timed out", "the cloud did not answer in time (cloud.timeout_s)")):
        if text.startswith(prefix):
            reason = network_reason(text[len(prefix):]) if prefix.endswith(": ") else ""
            return Explained(summary=f"{what}: {reason}" if reason else what, hint=NETWORK_HINT, image_id=image_id)
    return Explained(summary=network_reason(text) or text, image_id=image_id)


def _http(status: int, body: str, image_id: str | None) -> Explained:
    code, message = _envelope(body)
    said = " ".join(p for p in (str(status), code or "") if p) + (f": {message}" if message else "")
    if status in (401, 403):
        return Explained(summary=f"the cloud refused the device key ({said})", hint=KEY_HINT, image_id=image_id,
                         status=status, code=code, key_refused=True)
    if status == 404:
        hint = "check cloud.url (it should end in /api)"
        return Explained(summary=f"the cloud does not know this address ({said})", hint=hint, image_id=image_id,
                         status=status, code=code)
    if status == 429 or status >= 500:
        return Explained(summary=f"the cloud is busy or failing ({said})", hint="retried on its own, with back-off",
                         image_id=image_id, status=status, code=code)
    return Explained(summary=f"the cloud rejected the image ({said})",
                     hint="`gateway outbox list --state dead` shows them; `gateway outbox retry` sends them again",
                     image_id=image_id, status=status, code=code)


def _envelope(body: str) -> tuple[str | None, str]:
    """(code, message) of the cloud's error envelope; (None, the text cut short) when it is none."""
    try:
        data = json.loads(body)
    except ValueError:
        text = " ".join(body.split())
        return None, text[:160] + ("…" if len(text) > 160 else "")
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return (str(code) if code else None), str(error.get("message") or "")[:160]
    if isinstance(data, dict) and (data.get("detail") or data.get("message")):
        return None, str(data.get("detail") or data.get("message"))[:160]
    return None, " ".join(body.split())[:160]


def network_reason(text: str) -> str:
    """aiohttp's and urllib3's connection errors as one short reason naming the host."""
    lower = text.lower()
    host = ""
    if m := _URLLIB3.search(text):
        host = f"{m.group(1)}:{m.group(2)}"
    elif m := _HOSTPORT.search(text):
        host = m.group(1)
    at = f" at {host}" if host else ""
    if "refused" in lower or "connect call failed" in lower:
        return f"connection refused{at} (nothing listens there)"
    if "name or service not known" in lower or "name resolution" in lower or "nodename nor servname" in lower:
        return f"the name{at or ' of the host'} does not resolve (DNS)"
    if "certificate" in lower or "sslerror" in lower or "ssl handshake" in lower:
        return f"TLS failed{at}: the certificate is not trusted"
    if "timed out" in lower or "timeout" in lower:
        return f"timed out{at}"
    if "no route to host" in lower or "network is unreachable" in lower:
        return f"no route{at} (network down?)"
    if "disconnected" in lower or "reset by peer" in lower or "closed" in lower:
        return f"the other side closed the connection{at}"
    if "max retries exceeded" in lower:
        return f"cannot connect{at}"
    return " ".join(text.split())[:160]


_TECHNICAL = re.compile(r"HTTPS?ConnectionPool\(|Cannot connect to host |\[Errno \d+\]")


def plain(message: str) -> str:
    """An error message with any raw urllib3/aiohttp text in it replaced by a short reason."""
    m = _TECHNICAL.search(message)
    if m is None:
        return message
    head = message[:m.start()].rstrip(" :(")
    reason = network_reason(message[m.start():])
    return f"{head}: {reason}" if head else reason
