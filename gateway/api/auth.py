"""Bearer-token guards for the admin and sync APIs (constant-time comparison)."""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request

from gateway.errors import Forbidden, Unauthorized


def require_bearer(request: Request[Any, Any, Any], token: str, api: str) -> None:
    if not token:
        raise Forbidden(f"The {api} API is off", f"set [{api}] token to enable it")
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized(f"Missing {api} token", "send Authorization: Bearer <token>")
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise Unauthorized(f"Invalid {api} token")
