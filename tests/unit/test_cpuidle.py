"""`gateway.system.cpuidle`: idle cores from /proc/stat and a cgroup's CPU quota, on files laid
out as Linux lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from gateway.system.cpuidle import IdleCpu

TICKS = os.sysconf("SC_CLK_TCK")


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Machine:
    """A /proc and a /sys/fs/cgroup under `root`: host idle in seconds, a cgroup's usage and quota."""

    def __init__(self, root: Path, cgroup: str = "/") -> None:
        self.proc, self.cgroups = root / "proc", root / "cgroup"
        (self.proc / "self").mkdir(parents=True)
        self.cgroups.mkdir()
        (self.proc / "self" / "cgroup").write_text(f"0::{cgroup}\n")
        self.folder = self.cgroups / cgroup.strip("/")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.idle_s = self.used_s = 0.0
        self.write()

    def write(self) -> None:
        idle = round(self.idle_s * TICKS)
        # user nice system idle iowait ...: idle and iowait both count as idle
        (self.proc / "stat").write_text(f"cpu  5000 10 700 {idle - 40} 40 0 9 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
        for folder in [self.folder, *self.folder.parents]:  # a cgroup's usage counts its children's
            if folder == self.cgroups.parent:
                break
            (folder / "cpu.stat").write_text(f"usage_usec {round(self.used_s * 1e6)}\nuser_usec 1\n")

    def quota(self, folder: Path, cores: float | None) -> None:
        (folder / "cpu.max").write_text("max 100000\n" if cores is None else f"{round(cores * 100000)} 100000\n")

    def idle_cpu(self, clock: Clock) -> IdleCpu:
        return IdleCpu(proc=self.proc, cgroup_root=self.cgroups, clock=clock, interval=0.5)


def test_idle_cores_are_the_hosts_idle_time_over_the_last_interval(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path), Clock()
    idle = machine.idle_cpu(clock)
    assert idle.idle_cores() is None  # no reading yet
    idle.sample()
    assert idle.idle_cores() is None  # nothing to compare with yet
    clock.now += 1.0
    machine.idle_s += 1.5
    machine.write()
    idle.sample()
    assert idle.idle_cores() == pytest.approx(1.5, abs=0.02)
    machine.idle_s += 0.1  # a busy spell: the figure stands until the next reading
    machine.write()
    clock.now += 0.5
    assert idle.idle_cores() == pytest.approx(1.5, abs=0.02)
    idle.sample()  # 0.1 idle seconds over 0.5 s
    assert idle.idle_cores() == pytest.approx(0.2, abs=0.02)


def test_a_figure_from_readings_that_stopped_is_no_answer(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path), Clock()
    idle = machine.idle_cpu(clock)
    idle.sample()
    clock.now += 0.5
    machine.idle_s += 0.9
    machine.write()
    idle.sample()
    assert idle.idle_cores() == pytest.approx(1.8, abs=0.02)
    clock.now += 1.5
    assert idle.idle_cores() == pytest.approx(1.8, abs=0.02)
    clock.now += 0.1  # more than three intervals without a reading: the sampler is not running
    assert idle.idle_cores() is None


def test_the_sampler_reads_every_interval_with_the_callers_reclaimable_cpu(tmp_path: Path) -> None:
    machine = Machine(tmp_path)
    idle = IdleCpu(proc=machine.proc, cgroup_root=machine.cgroups, interval=0.05)
    told: list[float] = []

    def reclaimable() -> float:
        told.append(len(told) * 0.01)
        return told[-1]

    async def main() -> None:
        with anyio.move_on_after(0.3):
            await idle.run(reclaimable)

    anyio.run(main)
    assert 4 <= len(told) <= 8
    # the host file stood still (0 idle); the caller's work is what counts: 0.01 s per 0.05 s
    assert idle.idle_cores() == pytest.approx(0.2, abs=0.05)


def test_a_cgroup_quota_caps_what_counts_as_idle(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path, "/machine.slice/gateway.scope"), Clock()
    machine.quota(machine.folder, None)  # no quota here...
    machine.quota(machine.folder.parent, 1.5)  # ...but on the parent: 1.5 cores
    idle = machine.idle_cpu(clock)
    assert idle.cores == min(1.5, len(os.sched_getaffinity(0)))
    idle.sample()
    clock.now += 1.0
    machine.idle_s += 1.9  # the host is nearly idle, but the container used 1.2 of its 1.5 cores
    machine.used_s += 1.2
    machine.write()
    idle.sample()
    assert idle.idle_cores() == pytest.approx(0.3, abs=0.02)


def test_without_a_quota_the_cgroup_does_not_count(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path, "/user.slice"), Clock()
    machine.quota(machine.folder, None)
    idle = machine.idle_cpu(clock)
    assert idle.cores == len(os.sched_getaffinity(0))
    idle.sample()
    clock.now += 1.0
    machine.idle_s += 0.8
    machine.used_s += 1.9
    machine.write()
    idle.sample()
    assert idle.idle_cores() == pytest.approx(0.8, abs=0.02)


def test_the_callers_own_background_work_counts_as_idle(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path), Clock()
    idle = machine.idle_cpu(clock)
    idle.sample(reclaimable_s=10.0)
    clock.now += 1.0
    machine.idle_s += 0.4
    machine.write()
    idle.sample(reclaimable_s=10.5)
    # 0.4 idle, and 0.5 of a core went to work that would stop if the machine were busy
    assert idle.idle_cores() == pytest.approx(0.9, abs=0.02)


def test_nothing_to_read_means_not_known(tmp_path: Path) -> None:
    clock = Clock()
    idle = IdleCpu(proc=tmp_path / "none", cgroup_root=tmp_path / "none", clock=clock)
    idle.sample()
    clock.now += 0.5
    idle.sample()
    assert idle.idle_cores() is None
