"""The lock files: the running venv is exactly the test lock, the runtime lock pins what the test
lock pins, and both still satisfy pyproject.toml (a changed dependency without `scripts/lock`
fails here, not on a gateway PC)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.locks import PROJECT, ROOT, RUNTIME_LOCK, TEST_LOCK, Pin, differences, installed, read_lock


def pyproject_requirements() -> dict[str, list[Requirement]]:
    """pyproject.toml's requirements by lock: the runtime's (with the build backend) and the test
    lock's (runtime, every extra, build backend)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    build = [Requirement(r) for r in data["build-system"]["requires"]]
    runtime = [Requirement(r) for r in data["project"]["dependencies"]]
    extras = [Requirement(r) for reqs in data["project"]["optional-dependencies"].values() for r in reqs]
    return {RUNTIME_LOCK.name: runtime + build, TEST_LOCK.name: runtime + extras + build}


def test_the_running_venv_is_exactly_the_test_lock() -> None:
    """scripts/test installs requirements-test.txt with --require-hashes and the project with
    --no-deps: every locked package at its version, nothing else but pip and the project."""
    have = installed(Path(sys.executable))
    assert PROJECT in have
    problems = differences(read_lock(TEST_LOCK), have)
    assert not problems, "the venv differs from requirements-test.txt (run scripts/test to reinstall):\n" + "\n".join(
        problems
    )


def test_runtime_pins_are_the_test_pins() -> None:
    """The container and scripts/serve run what the tests ran."""
    runtime, test = read_lock(RUNTIME_LOCK), read_lock(TEST_LOCK)
    assert runtime
    assert set(runtime) <= set(test), sorted(set(runtime) - set(test))
    for name, pin in runtime.items():
        assert (pin.version, pin.hashes) == (test[name].version, test[name].hashes), name


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, TEST_LOCK], ids=lambda p: p.name)
def test_lock_satisfies_pyproject(lock: Path) -> None:
    """Every requirement of pyproject.toml is pinned in the lock inside its range, and every pin
    carries sha256 hashes (pip --require-hashes refuses the file otherwise)."""
    pins = read_lock(lock)
    for requirement in pyproject_requirements()[lock.name]:
        pin: Pin | None = pins.get(canonicalize_name(requirement.name))
        if requirement.marker is not None and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        assert pin is not None, f"{requirement} is not in {lock.name}: run scripts/lock"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{lock.name} pins {pin.name}=={pin.version}, outside {requirement}: run scripts/lock"
        )
    for pin in pins.values():
        assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), pin.name


def test_pyproject_bounds_every_major() -> None:
    """Compatible ranges with an upper bound, so `scripts/lock --upgrade` never crosses a major
    release unseen (duckdb 2.0 removed calls 1.x code used)."""
    for reqs in pyproject_requirements().values():
        for requirement in reqs:
            if requirement.name == "setuptools":
                continue  # the build backend: any recent one builds the project
            assert any(s.operator in ("<", "~=", "==") for s in requirement.specifier), (
                f"{requirement} has no upper bound"
            )
