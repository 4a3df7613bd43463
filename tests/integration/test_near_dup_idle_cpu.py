"""A running gateway keeps the machine's idle-CPU figure fresh for the near-duplicate filter
(`dedup.near_min_idle_cores`), in-process with its background tasks, and only where the filter
needs it."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from gateway.runtime import Gateway
from tests.support.inprocess import folder_settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["keep", "off"])
async def test_the_gateway_reads_idle_cpu_while_the_filter_is_on(tmp_path: Path, action: str) -> None:
    gw = Gateway(folder_settings(tmp_path, "idle-admin-token", GATEWAY_DEDUP_NEAR_DUPLICATES=action))
    idle = gw.services.ingestor.near.idle_cpu
    await gw.start()
    try:
        async with anyio.create_task_group() as tg:
            gw.run_background(tg)
            await anyio.sleep(1.2)  # several intervals, with no upload and nobody asking
            if action == "keep":
                figure = idle.idle_cores()  # ready at the first frame after a quiet spell
                assert figure is not None and 0 <= figure <= idle.cores + 0.1
            else:
                assert idle.idle_cores() is None  # no fingerprints, no readings
            tg.cancel_scope.cancel()
    finally:
        await gw.stop()
