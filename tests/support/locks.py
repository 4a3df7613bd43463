"""Read the lock files (requirements*.txt written by scripts/lock) and what a venv has installed,
so tests can compare the two exactly."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.txt"
TEST_LOCK = ROOT / "requirements-test.txt"
PROJECT = "acusight-edge-gateway"
# Installed beside the lock on purpose: pip itself (the venv's installer) and the project.
NOT_LOCKED = {"pip", PROJECT}


@dataclass(frozen=True)
class Pin:
    """One `name==version [; marker]` entry of a lock, with its hashes."""

    name: str
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self) -> bool:
        """Whether pip installs this pin for the running interpreter and platform."""
        return self.marker is None or self.marker.evaluate()


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a lock file, by canonical name (continuation lines joined, comments dropped)."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        hashes = tuple(w.removeprefix("--hash=") for w in words if w.startswith("--hash="))
        requirement = " ".join(w for w in words if not w.startswith("--hash="))
        spec, _, marker = requirement.partition(";")
        name, sep, version = spec.strip().partition("==")
        assert sep, f"{path.name}: not pinned with ==: {line!r}"
        pin = Pin(canonicalize_name(name), version.strip(), Marker(marker) if marker.strip() else None, hashes)
        assert pin.name not in pins, f"{path.name}: {pin.name} pinned twice"
        pins[pin.name] = pin
    return pins


def installed(python: Path) -> dict[str, str]:
    """Every distribution installed in the venv of `python`, by canonical name: its version
    (what `pip freeze --all` lists, read as JSON)."""
    out = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "list", "--format=json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return {canonicalize_name(d["name"]): d["version"] for d in json.loads(out)}


def differences(pins: dict[str, Pin], have: dict[str, str]) -> list[str]:
    """What keeps a venv from being exactly the lock: pins missing or at another version, and
    packages the lock does not name (pip and the project itself excepted)."""
    wanted = {name: pin.version for name, pin in pins.items() if pin.applies()}
    problems = [
        f"{name}: locked {version}, installed {have.get(name, 'nothing')}"
        for name, version in sorted(wanted.items())
        if have.get(name) != version
    ]
    problems += [
        f"{name} {version}: installed but not in the lock"
        for name, version in sorted(have.items())
        if name not in wanted and name not in NOT_LOCKED
    ]
    return problems
