"""`CheckinRelay`: device check-ins and agent heartbeats, relayed to the cloud while forwarding is on.

The device routes call it whatever the settings: with forwarding off (no cloud.url) it answers
no actions, so no route needs to know whether a forwarder exists.
"""

from __future__ import annotations

from typing import Any

from gateway.forward.worker import Forwarder


class CheckinRelay:
    """The cloud's actions for a device's check-in or heartbeat; [] without a forwarder or a reachable cloud."""

    def __init__(self, forwarder: Forwarder | None) -> None:
        self.forwarder = forwarder

    async def checkin(self, key: str, body: bytes) -> list[Any]:
        return [] if self.forwarder is None else await self.forwarder.relay_checkin(key, body)

    async def heartbeat(self, key: str, body: bytes) -> list[Any]:
        return [] if self.forwarder is None else await self.forwarder.relay_heartbeat(key, body)
