"""Provisioning tokens (`[provisioning] mode = "local"`): made by `gateway tokens create`, swapped by a
device's setup script for its key at `POST /api/devices/provision`.

A token is `apt_` + 32 lowercase hex characters, shown once; the catalog keeps only its SHA-256
(128 random bits need no slow hash). A token can be used while it is not revoked, not expired and,
if single-use, not used yet:

    usable --(a device is provisioned with it; single-use)--> used up   (401 INVALID_TOKEN after)
    usable --(expires_at passes)-----------------------------> expired  (401 TOKEN_EXPIRED)
    any    --(gateway tokens revoke)-------------------------> revoked  (401 INVALID_TOKEN)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.catalog import Catalog, Conn
from gateway.errors import InvalidToken, NotFound, TokenExpired, ValidationFailed

TOKEN_PATTERN = re.compile(r"apt_[0-9a-f]{32}")
DEFAULT_EXPIRY_DAYS = 7.0
_DAY_S = 86400.0
_COLUMNS = "token_id, name, single_use, use_count, created_at, expires_at, last_used_at, revoked_at"


class ProvisioningToken(msgspec.Struct, kw_only=True):
    """What is known of a token; never the token itself."""

    token_id: str
    name: str
    single_use: bool
    use_count: int
    created_at: float
    expires_at: float | None  # None: never expires
    last_used_at: float | None
    revoked_at: float | None


def _row(r: tuple[Any, ...]) -> ProvisioningToken:
    return ProvisioningToken(token_id=r[0], name=r[1], single_use=bool(r[2]), use_count=int(r[3]), created_at=r[4],
                             expires_at=r[5], last_used_at=r[6], revoked_at=r[7])


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class TokenStore:
    """Provisioning tokens in the catalog: create, list, revoke, and the checks of a presented token."""

    def __init__(self, catalog: Catalog, clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.clock = clock

    async def create(self, name: str, expires_in_days: float | None, single_use: bool) -> tuple[ProvisioningToken, str]:
        """A new token and its value in clear (shown once). `expires_in_days` None: never expires."""
        name = name.strip()
        if not name or len(name) > 200:
            raise ValidationFailed("Bad token name", "a name of 1 to 200 characters")
        if expires_in_days is not None and not 0 < expires_in_days <= 3650:
            raise ValidationFailed("Bad expiry", "expires_in_days must be more than 0 and at most 3650")
        now = self.clock()
        raw = "apt_" + secrets.token_hex(16)
        token = ProvisioningToken(
            token_id="tok_" + secrets.token_hex(6), name=name, single_use=single_use, use_count=0, created_at=now,
            expires_at=now + expires_in_days * _DAY_S if expires_in_days is not None else None,
            last_used_at=None, revoked_at=None,
        )
        await self.catalog.write(lambda c: c.execute(
            "INSERT INTO provisioning_tokens (token_id, name, token_hash, single_use, use_count, created_at, "
            "expires_at) VALUES (?, ?, ?, ?, 0, ?, ?)",
            [token.token_id, token.name, token_hash(raw), single_use, now, token.expires_at],
        ))
        return token, raw

    async def all(self) -> list[ProvisioningToken]:
        rows = await self.catalog.read(
            lambda c: c.execute(f"SELECT {_COLUMNS} FROM provisioning_tokens ORDER BY created_at, token_id").fetchall()
        )
        return [_row(r) for r in rows]

    async def revoke(self, token_id: str) -> ProvisioningToken:
        now = self.clock()

        def op(c: Conn) -> tuple[Any, ...] | None:
            c.execute("UPDATE provisioning_tokens SET revoked_at = coalesce(revoked_at, ?) WHERE token_id = ?",
                      [now, token_id])
            return c.execute(f"SELECT {_COLUMNS} FROM provisioning_tokens WHERE token_id = ?", [token_id]).fetchone()

        row = await self.catalog.write(op)
        if row is None:
            raise NotFound("No such provisioning token", token_id)
        return _row(row)

    async def check(self, presented: str) -> ProvisioningToken:
        """The usable token matching `presented`, or 401 INVALID_TOKEN / TOKEN_EXPIRED. Every stored
        hash is compared in constant time (tokens are few), so timing tells nothing of the match."""
        if not TOKEN_PATTERN.fullmatch(presented):
            raise InvalidToken(details="tokens look like apt_ followed by 32 lowercase hex characters")
        wanted = token_hash(presented).encode()
        rows = await self.catalog.read(
            lambda c: c.execute(f"SELECT token_hash, {_COLUMNS} FROM provisioning_tokens").fetchall()
        )
        found: tuple[Any, ...] | None = None
        for row in rows:
            if hmac.compare_digest(str(row[0]).encode(), wanted):
                found = row[1:]
        if found is None:
            raise InvalidToken(details="no such token")
        token = _row(found)
        self._usable(token, self.clock())
        return token

    @staticmethod
    def _usable(token: ProvisioningToken, now: float) -> None:
        if token.revoked_at is not None:
            raise InvalidToken(details="the token was revoked")
        if token.single_use and token.use_count > 0:
            raise InvalidToken(details="the single-use token was used already")
        if token.expires_at is not None and token.expires_at <= now:
            raise TokenExpired()

    async def claim(self, token_id: str) -> None:
        """Count one use, checking again in the catalog's one writer, so a single-use token given to
        two devices at once provisions only one of them."""
        now = self.clock()

        def op(c: Conn) -> None:
            row = c.execute(f"SELECT {_COLUMNS} FROM provisioning_tokens WHERE token_id = ?", [token_id]).fetchone()
            if row is None:
                raise InvalidToken(details="no such token")
            self._usable(_row(row), now)
            c.execute("UPDATE provisioning_tokens SET use_count = use_count + 1, last_used_at = ? WHERE token_id = ?",
                      [now, token_id])

        await self.catalog.write(op)

    async def unclaim(self, token_id: str) -> None:
        """Give back a use that provisioned nothing (the device could not be registered)."""
        await self.catalog.write(lambda c: c.execute(
            "UPDATE provisioning_tokens SET use_count = greatest(use_count - 1, 0) WHERE token_id = ?", [token_id]))
