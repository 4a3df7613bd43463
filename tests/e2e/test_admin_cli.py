"""Issue 24: a site admin's first hour. The CLI from another folder, `serve --listen`, the start-up
line, a second server on a locked catalog, `gateway config` with sources, the `devices` verbs and
the forwarder's offline/online log lines, each with real server processes."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from tests.support.client import admin_status, upload, wait_for
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess, free_port, wait_until_ready

pytestmark = pytest.mark.e2e


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


def _gateway(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_cli_from_another_folder_creates_nothing_and_says_which_path_it_tried(tmp_path: Path) -> None:
    for command in (["devices", "list"], ["status"], ["outbox", "list"]):
        result = _gateway(*command, cwd=tmp_path, env=_env())
        assert result.returncode == 1, result
        assert f"no catalog at {tmp_path / 'data' / 'catalog.duckdb'}" in result.stderr
        assert "--config FILE" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no catalog, no key secret, no folder


def _wait_ready(log: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
    wait_until_ready(f"http://127.0.0.1:{port}", proc, log.read_text)


def test_serve_listen_start_line_second_server_and_config_with_sources(tmp_path: Path) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    (site / "config").mkdir(parents=True)
    elsewhere.mkdir()
    config = site / "config" / "gateway.toml"
    config.write_text('[data]\ndir = "../data"\n[keys]\nsecret_file = "../secrets/gateway.key"\n'
                      '[admin]\ntoken_file = "../secrets/admin.token"\n[batches]\nmax_images = 5\n')
    port = free_port()
    server_env = _env(GATEWAY_CONFIG=str(config), GATEWAY_BATCHES_TIMEOUT_S="900",
                      GATEWAY_LIMITS_MIN_FREE_DISK_BYTES="0")
    cli_env = _env(GATEWAY_CONFIG=str(config))  # a second shell: only the settings file in common
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}"],
                                cwd=elsewhere, env=server_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_ready(log, port, proc)
        token_file = site / "secrets" / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        lines = [json.loads(x)["msg"] for x in log.read_text().splitlines() if x.startswith("{")]
        start = [x for x in lines if x.startswith("gateway ") and " listening on " in x]
        assert len(start) == 1, lines
        assert (f"listening on http://127.0.0.1:{port}; storage folder {site / 'data' / 'objects'}; "
                f"data {site / 'data'}; forwarding off (cloud.url empty); admin API on (new token written to "
                f"{token_file}); sync API off") in start[0]

        # The CLI reads server.listen from the file (8080): it names the setting and the file.
        missed = _gateway("devices", "list", cwd=elsewhere, env=cli_env)
        assert missed.returncode == 1
        assert f"PID {proc.pid}" in missed.stderr and "server.listen = '0.0.0.0:8080'" in missed.stderr
        assert f"set server.listen (or admin.url) in {config}" in missed.stderr

        # A second server on the same catalog: status 2, one line naming the PID.
        second = _gateway("serve", "--listen", f"127.0.0.1:{free_port()}", cwd=elsewhere, env=server_env)
        assert second.returncode == 2
        errors = [x for x in (second.stdout + second.stderr).splitlines() if "ExceptionGroup" in x
                  or "Traceback" in x or "refusing" in x]
        assert errors == [f"gateway: refusing to start: another gateway (PID {proc.pid}) already serves the "
                          f"catalog {site / 'data' / 'catalog.duckdb'}; stop it first, or give this one its own "
                          "data.dir"], second.stdout + second.stderr

        # Told where the server listens, the CLI finds it; `gateway config` shows the server's settings.
        config.write_text(config.read_text() + f'[server]\nlisten = "127.0.0.1:{port}"\n')
        shown = _gateway("config", cwd=elsewhere, env=cli_env)
        assert shown.returncode == 0, shown.stderr
        assert f"settings of the running server at http://127.0.0.1:{port}" in shown.stdout
        rows = {ln.split()[0]: ln for ln in shown.stdout.splitlines()[2:]}
        assert rows["batches.timeout_s"].split()[1:] == ["900.0", "env", "GATEWAY_BATCHES_TIMEOUT_S"]
        assert rows["batches.max_images"].split()[1:] == ["5", "file", str(config.resolve())]
        assert rows["server.listen"].split()[1:] == [f"'127.0.0.1:{port}'", "command", "line"]
        assert rows["admin.token"].split()[1:] == ["'<redacted>'", "admin.token_file", str(token_file)]
        assert rows["limits.max_image_bytes"].split()[1:] == ["52428800", "(50.0", "MiB)", "default"]
        assert token_file.read_text().strip() not in shown.stdout
        as_json = json.loads(_gateway("config", "--json", cwd=elsewhere, env=cli_env).stdout)
        assert as_json["settings"]["batches.timeout_s"] == {"value": 900.0, "source": "env GATEWAY_BATCHES_TIMEOUT_S"}
        assert as_json["settings"]["sync.token"] == {"value": "", "source": "default"}
        added = _gateway("devices", "add", "cam-a", cwd=elsewhere, env=cli_env)
        assert added.returncode == 0 and "added device" in added.stdout, added.stderr
        assert "warning" not in added.stderr  # forwarding is off: a generated key is fine
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert list(elsewhere.iterdir()) == []


def test_devices_verbs_set_key_then_retry_and_connectivity_log_lines(tmp_path: Path) -> None:
    with FakeCloud() as cloud:
        gw = GatewayProcess(tmp_path / "gw", {
            "GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_CLOUD_URL": cloud.url,
            "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1",
            "GATEWAY_CLOUD_VERIFY_UNKNOWN_KEYS": "false"}).start()
        try:
            added = gw.cli("devices", "add", "line-3 camera")
            assert "warning: forwarding is on" in added.stderr and "devices set-key" in added.stderr
            made_key = re.search(r"adk_[0-9a-f]{32}", added.stdout)
            assert made_key is not None
            device_id = re.search(r"dev_[0-9a-f-]+", added.stdout)
            assert device_id is not None
            dev = device_id.group(0)

            # The cloud does not know the key: the image is dead-lettered (401).
            assert upload(gw, made_key.group(0), jpeg_bytes()).status_code == 201
            wait_for("dead letter", lambda: admin_status(gw)["dead_count"] == 1)
            shown = gw.cli("devices", "show", "line-3 camera").stdout
            assert dev in shown and re.search(r"undelivered\s+0 pending, 0 held, 1 dead", shown), shown

            refused = gw.cli("devices", "remove", dev, check=False)
            assert refused.returncode == 1 and "undelivered" in refused.stderr and "--force" in refused.stderr

            renamed = gw.cli("devices", "rename", dev, "line-3 left camera").stdout
            assert "line-3 left camera" in renamed

            cloud_key = "adk_" + secrets.token_hex(16)
            cloud.add_device(cloud_key)
            set_key = gw.cli("devices", "set-key", dev, f" {cloud_key} \n")  # a pasted key's whitespace
            assert "new key set" in set_key.stdout and "outbox retry" in set_key.stdout
            assert upload(gw, made_key.group(0), jpeg_bytes()).status_code == 401  # the old key is gone
            gw.cli("outbox", "retry", "--all-dead")
            assert cloud.wait_until(lambda c: len(c.stored) == 1, timeout=30), cloud.stats()
            assert next(iter(cloud.stored.values())).device_key == cloud_key

            # Offline with the reason and the backlog, and back.
            cloud.refuse_connections()
            assert upload(gw, cloud_key, jpeg_bytes()).status_code == 201
            wait_for("offline line", lambda: "cloud offline" in gw.log_path.read_text(), timeout=60)
            offline = [json.loads(x) for x in gw.log_path.read_text().splitlines()
                       if x.startswith("{") and "cloud offline" in x]
            assert len(offline) == 1 and offline[0]["level"] == "warning"
            assert cloud.url in offline[0]["msg"] and "1 image(s)" in offline[0]["msg"]
            cloud.accept_connections()
            wait_for("online line", lambda: "cloud online again" in gw.log_path.read_text(), timeout=60)
            online = [json.loads(x) for x in gw.log_path.read_text().splitlines()
                      if x.startswith("{") and "cloud online again" in x]
            assert len(online) == 1 and online[0]["level"] == "warning" and "offline" in online[0]["msg"]
            assert cloud.wait_until(lambda c: len(c.stored) == 2, timeout=30)

            # Removing: refused no more once everything is delivered; then forgotten.
            wait_for("delivered", lambda: admin_status(gw)["backlog_count"] == 0)
            removed = gw.cli("devices", "remove", "line-3 left camera").stdout
            assert f"device {dev} (line-3 left camera) removed" in removed
            assert dev not in gw.cli("devices", "list").stdout
            assert upload(gw, cloud_key, jpeg_bytes()).status_code == 401
        finally:
            gw.stop()


def test_remove_force_dead_letters_what_is_undelivered(tmp_path: Path) -> None:
    dead_port = free_port()  # nothing listens: entries stay pending
    gw = GatewayProcess(tmp_path / "gw", {"GATEWAY_STORAGE_BACKEND": "folder",
                                          "GATEWAY_CLOUD_URL": f"http://127.0.0.1:{dead_port}/api",
                                          "GATEWAY_CLOUD_VERIFY_UNKNOWN_KEYS": "false"}).start()
    try:
        key = "adk_" + secrets.token_hex(16)
        gw.cli("devices", "add", "cam", "--key", f"{key} ")  # trailing space stripped
        assert upload(gw, key, jpeg_bytes()).status_code == 201
        assert gw.cli("devices", "remove", "cam", check=False).returncode == 1
        forced = gw.cli("devices", "remove", "cam", "--force").stdout
        assert "removed; 1 undelivered image(s) dead-lettered" in forced
        status = admin_status(gw)
        assert status["dead_count"] == 1 and status["backlog_count"] == 0
    finally:
        gw.stop()


def test_the_cli_on_a_stopped_gateway_without_its_key_secret_makes_none(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw", {"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_ADMIN_TOKEN": "",
                                          "GATEWAY_ADMIN_TOKEN_FILE": ""}).start()
    assert gw.stop() == 0
    assert "cam" in gw.cli("devices", "add", "cam").stdout  # a stopped server's files: fine
    secret = Path(gw.env["GATEWAY_KEYS_SECRET_FILE"])
    secret.unlink()
    result = gw.cli("devices", "list", check=False)
    assert result.returncode == 1 and f"the key secret {secret} is missing" in result.stderr
    assert not secret.exists()
