"""Provisioning over HTTP: the public `POST /api/devices/provision` (also under `/api/core/...`), and
the admin API's provisioning tokens (`gateway tokens ...`)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post

from gateway.api.body import read_json_body
from gateway.api.envelope import ok
from gateway.config import Settings
from gateway.devices.provisioning import CloudAnswered, Provisioner
from gateway.devices.tokens import DEFAULT_EXPIRY_DAYS, TokenStore
from gateway.errors import ValidationFailed


@post(["/api/devices/provision", "/api/core/devices/provision"], status_code=201)
async def provision_device(request: Request[Any, Any, Any], provisioner: Provisioner,
                           settings: Settings) -> Response[bytes]:
    """Swap a provisioning token for a device key (public: the token is the credential)."""
    provisioner.admit(request.client.host if request.client else "")
    raw = await read_json_body(request, settings)
    try:
        data, status = await provisioner.provision(raw, own_endpoint=str(request.base_url).rstrip("/") + "/api")
    except CloudAnswered as exc:  # the cloud's refusal, as it came
        answer = exc.answer
        headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
        return Response(answer.body, status_code=answer.status, media_type="application/json", headers=headers)
    return ok(data, status=status)


class NewToken(msgspec.Struct, kw_only=True):
    name: str
    expires_in_days: float | None = None
    never_expires: bool = False
    single_use: bool = False


class TokenRef(msgspec.Struct):
    ref: str


def _decode(raw: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ValidationFailed("Invalid request body", str(exc)[:300]) from None


def setup_line(endpoint: str, token: str) -> str:
    """The command a device's setup runs with a new token (DEVICE_ID and NAME filled in by hand)."""
    body = f'{{"token":"{token}","device_info":{{"device_id":"DEVICE_ID","name":"NAME"}}}}'
    return f"curl -sS -X POST {endpoint}/devices/provision -H 'Content-Type: application/json' -d '{body}'"


@post("/tokens", status_code=201)
async def create_token(request: Request[Any, Any, Any], tokens: TokenStore, settings: Settings) -> Response[bytes]:
    body: NewToken = _decode(await read_json_body(request, settings), NewToken)
    if body.never_expires and body.expires_in_days is not None:
        raise ValidationFailed("Conflicting expiry", "give expires_in_days or never_expires, not both")
    days = None if body.never_expires else DEFAULT_EXPIRY_DAYS if body.expires_in_days is None else body.expires_in_days
    token, raw = await tokens.create(body.name, days, body.single_use)
    endpoint = settings.server.external_url or f"http://<gateway>:{settings.listen_host_port[1]}/api"
    return ok({"token": msgspec.to_builtins(token), "value": raw, "setup": setup_line(endpoint, raw),
               "mode": settings.provisioning_mode}, status=201)


@get("/tokens")
async def list_tokens(tokens: TokenStore) -> Response[bytes]:
    return ok([msgspec.to_builtins(t) for t in await tokens.all()])


@post("/tokens/revoke", status_code=200)
async def revoke_token(request: Request[Any, Any, Any], tokens: TokenStore, settings: Settings) -> Response[bytes]:
    body: TokenRef = _decode(await read_json_body(request, settings), TokenRef)
    return ok(msgspec.to_builtins(await tokens.revoke(body.ref)))


ROUTES = [provision_device]
ADMIN_ROUTES = [create_token, list_tokens, revoke_token]
