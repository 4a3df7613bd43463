"""Debian's `tinyproxy`, started on loopback for a test, with its own log of every request it relays.

Installed with scripts/apt-install when missing (CI runs on a fresh machine): a test that needs it fails,
never skips, when it cannot be had.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def binary() -> str:
    found = shutil.which("tinyproxy") or next((p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy")
                                               if os.path.exists(p)), None)
    if found:
        return found
    result = subprocess.run(["bash", str(ROOT / "scripts" / "apt-install"), "tinyproxy"], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, f"tinyproxy could not be installed: {result.stderr.strip()[-500:]}"
    found = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    assert os.path.exists(found), "tinyproxy could not be installed"
    return found


class TinyProxy:
    """`tinyproxy -d` on 127.0.0.1:<free port>; `log()` is what it wrote so far."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_file = workdir / "tinyproxy.log"
        self.conf = workdir / "tinyproxy.conf"
        self.conf.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{self.log_file}\"\nLogLevel Info\n"
            f"PidFile \"{workdir / 'tinyproxy.pid'}\"\nMaxClients 50\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
            "ConnectPort 443\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TinyProxy:
        self.proc = subprocess.Popen([binary(), "-d", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None, f"tinyproxy exited: {self.log()}"
                assert time.monotonic() < deadline, "tinyproxy did not start listening"
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def requests(self) -> list[str]:
        """The request lines it relayed, e.g. `POST http://127.0.0.1:1234/api/device/checkin HTTP/1.1`."""
        return [line.split("): ", 1)[1] for line in self.log().splitlines() if "Request (file descriptor" in line]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
