"""The sample systemd unit (config/gateway.service): systemd accepts it, and its settings load."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "config" / "gateway.service"


def _environment() -> dict[str, str]:
    env = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env


def test_the_units_settings_load_with_the_shipped_file() -> None:
    env = _environment()
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/gateway.toml"
    settings = load_settings(env={**env, "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml")})
    assert str(settings.data_dir) == "/var/lib/gateway/data"
    assert settings.keys.secret_file == "/var/lib/gateway/secrets/gateway.key"
    text = UNIT.read_text()
    assert "ExecStart=/opt/gateway/bin/gateway serve" in text
    assert "RestartPreventExitStatus=2" in text  # a refused start exits 2: restarting cannot help


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    gateway = Path(sys.executable).with_name("gateway")  # the unit's /opt/gateway venv is not here
    unit = tmp_path / "gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/gateway/bin/gateway", str(gateway)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gateway.service" not in result.stderr, result.stderr
