"""Run a real `gateway serve` process for tests: free port, own data folder, env settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.ports import free_port as free_port  # the port helper the tests import from here

ADMIN_TOKEN = "test-admin-token-0123456789"
SYNC_TOKEN = "test-sync-token-0123456789"


def gateway_env(workdir: Path, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GATEWAY_") or k.startswith("GATEWAY_TEST_")
    }
    env.update(
        {
            "GATEWAY_CONFIG": str(workdir / "gateway.toml"),
            "GATEWAY_SERVER_LISTEN": f"127.0.0.1:{port}",
            "GATEWAY_SERVER_EXTERNAL_URL": f"http://127.0.0.1:{port}/api",  # needed where provisioning relays
            "GATEWAY_DATA_DIR": str(workdir / "data"),
            "GATEWAY_KEYS_SECRET_FILE": str(workdir / "secret.key"),
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "GATEWAY_SYNC_TOKEN": SYNC_TOKEN,
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_LIMITS_MIN_FREE_DISK_BYTES": "0",
        }
    )
    env.update(extra or {})
    return env


def s3_env(s3: Any) -> dict[str, str]:
    return {
        "GATEWAY_STORAGE_BACKEND": "minio",
        "GATEWAY_MINIO_ENDPOINT": s3.endpoint,
        "GATEWAY_MINIO_ACCESS_KEY": s3.access_key,
        "GATEWAY_MINIO_SECRET_KEY": s3.secret_key,
        "GATEWAY_MINIO_BUCKET": f"t{os.getpid()}-{int(time.time() * 1000) % 10**9}",
    }


class GatewayProcess:
    """One `python -m gateway serve` subprocess."""

    def __init__(
        self, workdir: Path, env_extra: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "gateway.toml").touch()
        self.port = port or free_port()
        self.env = gateway_env(workdir, self.port, env_extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> GatewayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        wait_until_ready(self.url, self.proc, self.log_tail, timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def vm_hwm_kib(self) -> int:
        """Peak resident set size of the server process (VmHWM), in KiB."""
        return self._status_kib("VmHWM")

    def vm_rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    def _status_kib(self, field: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the `gateway` CLI against this server's settings."""
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"gateway {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def add_device(self, name: str, status: str = "approved") -> tuple[str, str]:
        """Register a device through the admin API; returns (device_id, key)."""
        with self.admin() as client:
            resp = client.post("/api/admin/devices", json={"name": name, "status": status})
            resp.raise_for_status()
            data = resp.json()["data"]
        return data["device"]["device_id"], data["key"]


def wait_until_ready(url: str, proc: subprocess.Popen[bytes], log: Callable[[], str], timeout: float = 60.0) -> None:
    """Until `url`/api/ready answers 200; RuntimeError with `log()` when the process exits first or
    `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(f"{url}/api/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready in {timeout}s:\n{log()}")
