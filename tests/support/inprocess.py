"""A gateway run in the test's own process (`Gateway` + `create_app` over httpx's ASGI transport),
for tests that patch its insides: the settings every such test starts from, and an async wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio

from gateway.config import Settings, load_settings


def folder_settings(tmp_path: Path, admin_token: str, config: str = "", **env: str) -> Settings:
    """Settings for a gateway on folder storage under `tmp_path` (`config` as its gateway.toml),
    with `admin_token`, no free-disk floor, and `env` (GATEWAY_... variables) on top."""
    (tmp_path / "gateway.toml").write_text(config)
    return load_settings(tmp_path / "gateway.toml", env={
        "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_KEYS_SECRET_FILE": str(tmp_path / "secret.key"),
        "GATEWAY_ADMIN_TOKEN": admin_token, "GATEWAY_LIMITS_MIN_FREE_DISK_BYTES": "0",
        "GATEWAY_STORAGE_BACKEND": "folder", **env,
    })


async def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Until `check()` holds, on the event loop; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)
