"""A fresh checkout installs exactly the runtime lock through scripts/_venv.sh (the path
scripts/serve takes), reuses the venv while nothing changed, and installs into an emptied venv when
the lock changed, so that nothing an older lock brought stays behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.locks import PROJECT, ROOT, RUNTIME_LOCK, differences, installed, read_lock

# What `pip install -e .` and _venv.sh need from a checkout (the rest of the tree plays no part).
CHECKOUT_FILES = ("pyproject.toml", "README.md", "requirements.txt", "requirements-test.txt", "scripts/_venv.sh")


def checkout(dest: Path) -> Path:
    """A copy of the working tree's installable part, as a fresh clone would have it."""
    for name in CHECKOUT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, dest / name)
    shutil.copytree(ROOT / "gateway", dest / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def ensure_venv(clone: Path, venv: Path) -> str:
    """Run `ensure_venv ""` of the clone's scripts/_venv.sh; its stderr (says when it installs)."""
    result = subprocess.run(
        ["bash", "-c", 'source scripts/_venv.sh && ensure_venv ""'],
        cwd=clone, env=dict(os.environ, GATEWAY_VENV=str(venv), PYTHON=sys.executable),
        capture_output=True, text=True, timeout=1700,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stderr


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)  # one install: ~1 min on an idle machine, 10+ under heavy load
def test_fresh_checkout_installs_exactly_the_runtime_lock(tmp_path: Path) -> None:
    clone, venv = checkout(tmp_path / "clone"), tmp_path / "venv"
    python = venv / "bin" / "python"
    pins = read_lock(clone / RUNTIME_LOCK.name)

    # A venv installed from an older lock: its stamp differs, and it holds a package that lock
    # brought (written as pip would). One install must replace all of it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (venv / ".installed-lock").write_text("requirements.txt 0123456789abcdef\n")
    leftover = next((venv / "lib").glob("python3.*")) / "site-packages" / "leftover_pkg-1.0.dist-info"
    leftover.mkdir(parents=True)
    (leftover / "METADATA").write_text("Metadata-Version: 2.1\nName: leftover-pkg\nVersion: 1.0\n")

    assert "installing requirements.txt" in ensure_venv(clone, venv)
    have = installed(python)
    assert not differences(pins, have), differences(pins, have)
    assert PROJECT in have and "leftover-pkg" not in have
    assert subprocess.run([str(venv / "bin" / "gateway"), "--version"], timeout=60).returncode == 0

    assert ensure_venv(clone, venv) == "", "reinstalled although nothing changed"
