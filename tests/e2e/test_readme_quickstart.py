"""Issue 24: the README's admin quick start, followed literally in a fresh folder, in its order.

The code blocks marked `<!-- quickstart -->` are read from README.md and run as written: the server
from the fresh folder (`scripts/serve`, through symlinks to this checkout's scripts and venv), the CLI
and the camera's `curl` from a second shell in another folder that knows only `GATEWAY_CONFIG`
(the README's way from another folder), against the project's fake cloud. Only the port and
the cloud's URL are this test's own (a free port instead of 8080, the fake cloud's URL).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import free_port, wait_until_ready

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, text) of each `<!-- quickstart -->` block of README.md, in order; comment lines out."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- quickstart -->\n```(\w+)\n(.*?)```", readme, flags=re.S)
    return [(lang, "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")).strip())
            for lang, text in blocks]


def fresh_folder(site: Path, port: int) -> None:
    """What an unpacked gateway holds: scripts, the venv, the lock, config/gateway.toml."""
    site.mkdir()
    for name in ("scripts", "pyproject.toml", "requirements.txt", "requirements-test.txt"):
        (site / name).symlink_to(ROOT / name)
    (site / ".venv").symlink_to(Path(sys.prefix))
    (site / "config").mkdir()
    config = (ROOT / "config/gateway.toml").read_text()
    # The README's way to another port: server.listen in the settings file (8080 may be taken here).
    config = config.replace('listen = "0.0.0.0:8080"', f'listen = "127.0.0.1:{port}"')
    (site / "config/gateway.toml").write_text(config)


def shell_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


class Server:
    """`scripts/serve` as the README's second step runs it, in the fresh folder."""

    def __init__(self, site: Path, command: str, port: int) -> None:
        self.site, self.command, self.port = site, command, port
        self.log = site / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["bash", "-c", f"exec {self.command}"], cwd=self.site, env=shell_env(),
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_ready(f"http://127.0.0.1:{self.port}", self.proc, self.log.read_text)

    def stop(self) -> None:  # Ctrl-C
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            assert self.proc.wait(30) == 0, self.log.read_text()


def test_the_readme_quick_start_forwards_a_camera_image_without_a_wrong_turn(tmp_path: Path) -> None:
    blocks = quickstart_blocks()
    assert [lang for lang, _ in blocks] == ["sh", "sh", "sh", "sh", "toml", "sh"], blocks
    token_cmd, serve_cmd, add_cmd, curl_cmd, forward_toml, check_cmd = (text for _, text in blocks)
    port = free_port()
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    fresh_folder(site, port)
    elsewhere.mkdir()
    camera_key = "adk_" + secrets.token_hex(16)
    # The second shell: another folder; the CLI finds the settings through GATEWAY_CONFIG.
    second = shell_env(GATEWAY_CONFIG=str(site / "config/gateway.toml"), CAMERA_KEY=camera_key)

    def in_second_shell(command: str) -> subprocess.CompletedProcess[str]:
        command = command.replace(".venv/bin/gateway", str(site / ".venv/bin/gateway"))
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        return subprocess.run(["bash", "-c", command], cwd=elsewhere, env=second, capture_output=True, text=True,
                              timeout=120)

    with FakeCloud() as cloud:
        cloud.add_device(camera_key)
        # 1. the admin token, written before the first start
        subprocess.run(["bash", "-c", token_cmd], cwd=site, env=shell_env(), check=True, timeout=30)
        token_file = site / "secrets/admin.token"
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600
        # 2. start
        server = Server(site, serve_cmd, port)
        server.start()
        try:
            log = server.log.read_text()
            assert f"listening on http://127.0.0.1:{port}" in log and "forwarding off" in log
            assert f"admin API on (token file {token_file})" in log
            assert token_file.read_text().strip() == token  # the admin's own token, kept
            # 3. register the camera with its cloud key, from the second shell
            added = in_second_shell(add_cmd)
            assert added.returncode == 0, added.stderr
            assert "added device" in added.stdout and "warning" not in added.stderr
            # 4. the camera uploads
            (elsewhere / "frame_0001.jpg").write_bytes(jpeg_bytes())
            sent = in_second_shell(curl_cmd)
            assert sent.returncode == 0 and '"success":true' in sent.stdout, sent.stdout + sent.stderr
            # 5. forwarding on: the settings file, then Ctrl-C and start again
            config = site / "config/gateway.toml"
            wanted = forward_toml.replace("https://acusight.io/api", cloud.url)
            text = config.read_text()
            assert '[cloud]\n# Cloud API base URL' in text
            url_line = wanted.split("\n", 1)[1]  # the block's `url = ...` under [cloud]
            config.write_text(re.sub(r'(\[cloud\]\n(?:#.*\n)*)url = ""', lambda m: m.group(1) + url_line, text,
                                     count=1))
            server.stop()
            server.start()
            assert f"forwarding on to {cloud.url}" in server.log.read_text()
            # 6. check: the cloud has the camera's image, and the CLI says so
            assert cloud.wait_until(lambda c: len(c.stored) == 1, timeout=30), cloud.stats()
            deadline = time.monotonic() + 30
            while True:
                checked = in_second_shell(check_cmd)
                assert checked.returncode == 0, checked.stderr
                if re.search(r"delivered\s+1\b", checked.stdout) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert re.search(r"connectivity\s+online", checked.stdout), checked.stdout
            assert re.search(r"delivered\s+1\b", checked.stdout), checked.stdout
            assert "line-3 camera" in checked.stdout
            # Without --key, with forwarding on: the warning the README promises.
            generated = in_second_shell('.venv/bin/gateway devices add "line-4 camera"')
            assert generated.returncode == 0, generated.stderr
            assert "warning: forwarding is on" in generated.stderr and "set-key" in generated.stderr
        finally:
            server.stop()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["frame_0001.jpg"]  # the CLI made nothing there
