"""The server's event loop: uvloop when it is installed, asyncio's own loop when it is not."""

from __future__ import annotations

import asyncio
import sys

import pytest

from gateway.system import eventloop


def loop_module_running() -> str:
    seen: list[str] = []

    async def main() -> None:
        await asyncio.sleep(0)
        seen.append(type(asyncio.get_running_loop()).__module__)

    eventloop.run(main)
    return seen[0]


def test_uvloop_runs_the_server_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert loop_module_running().startswith("uvloop")


def test_without_uvloop_the_standard_loop_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails, as on a platform without it
    assert loop_module_running().startswith("asyncio")
