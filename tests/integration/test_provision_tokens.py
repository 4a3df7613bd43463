"""Provisioning tokens on a real DuckDB catalog: a single-use token handed to many devices at once
provisions exactly one of them, and a device id already taken spends no use of a token."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.devices.keys import KeyBox
from gateway.devices.provisioning import Provisioner
from gateway.devices.registry import DeviceRegistry
from gateway.devices.tokens import TokenStore
from gateway.errors import DeviceExists, GatewayError, InvalidToken
from gateway.system.ratelimit import DeviceRateLimiter


def _request(token: str, device_id: str) -> bytes:
    return json.dumps({"token": token, "device_info": {"device_id": device_id}}).encode()


def test_a_single_use_token_provisions_one_device_when_many_race(tmp_path: Path) -> None:
    async def main() -> None:
        catalog = Catalog(tmp_path / "catalog.duckdb")
        catalog.open()
        try:
            registry = DeviceRegistry(catalog, KeyBox(b"k" * 32), "local", clock=lambda: 1000.0)
            await registry.load()
            tokens = TokenStore(catalog, clock=lambda: 1000.0)
            provisioner = Provisioner(Settings(), registry, tokens, None, DeviceRateLimiter(0, lambda: 0.0))
            _, single = await tokens.create("one camera", 1.0, single_use=True)
            outcomes = await asyncio.gather(
                *(provisioner.provision(_request(single, f"cam-{i}"), "http://gw/api") for i in range(12)),
                return_exceptions=True)
            won = [o for o in outcomes if not isinstance(o, BaseException)]
            lost = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(won) == 1 and all(isinstance(e, InvalidToken) for e in lost), outcomes
            assert [d.device_id for d in registry.all()] == [won[0][0]["device_id"]]
            [listed] = await tokens.all()
            assert listed.use_count == 1

            # A device id already registered: 409, and the token's use is not spent.
            token_row, multi = await tokens.create("line", None, single_use=False)
            await registry.add("taken", device_id="cam-taken")
            with pytest.raises(DeviceExists):
                await provisioner.provision(_request(multi, "cam-taken"), "http://gw/api")
            assert {t.token_id: t.use_count for t in await tokens.all()}[token_row.token_id] == 0
            with pytest.raises(GatewayError) as info:
                await tokens.revoke("tok_nope")
            assert info.value.status == 404
        finally:
            catalog.close()

    asyncio.run(main())
