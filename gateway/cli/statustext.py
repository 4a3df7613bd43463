"""`gateway status` lines in words: times with their zone, the last error explained, the backlog's outlook."""

from __future__ import annotations

from typing import Any

from gateway.humanize import human_age, zoned_time
from gateway.ops.errortext import explain


def last_success(s: dict[str, Any]) -> str:
    return zoned_time(s.get("last_success_at"))


def last_error(s: dict[str, Any]) -> str:
    """The cloud's status and code first, what to do after; `resolved` once a delivery came since."""
    said = explain(s.get("last_error"))
    if said is None:
        return "-"
    at, success = s.get("last_error_at"), s.get("last_success_at")
    when = f" (at {zoned_time(at)})" if at else ""
    if at is not None and success is not None and success >= at:
        return f"resolved, delivered since: {said.summary}{when}"
    return said.summary + when + (f"\n    what to do: {said.hint}" if said.hint else "")


def outlook(s: dict[str, Any]) -> str:
    """When the backlog will be gone."""
    if not s.get("backlog_count"):
        return "nothing waiting"
    if s.get("connectivity") == "off":
        return "kept here: forwarding is off (no cloud URL set)"
    if s.get("connectivity") == "offline":
        return "waiting for the cloud to come back"
    if s.get("eta_s") is not None:
        return f"about {human_age(s['eta_s'])} at the recent rate"
    return "not moving: nothing delivered lately"
