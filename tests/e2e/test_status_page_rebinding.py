"""The status page over real HTTP from 127.0.0.1 (issue 23, item 8): loopback is trusted only when
the Host header names a loopback host, so a DNS-rebinding page in the gateway PC's browser (its
own name resolving to 127.0.0.1) cannot read it."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e


def test_dns_rebinding_host_on_loopback_is_refused(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})
    for host in (f"rebound.example.com:{gw.port}", "rebound.example.com", f"192.0.2.7:{gw.port}"):
        resp = httpx.get(f"{gw.url}/", headers={"Host": host}, timeout=10)
        assert resp.status_code == 401 and "Backlog" not in resp.text, host
    for host in (f"127.0.0.1:{gw.port}", f"localhost:{gw.port}"):
        resp = httpx.get(f"{gw.url}/", headers={"Host": host}, timeout=10)
        assert resp.status_code == 200 and "Backlog" in resp.text, host
