"""`gateway.system.cpuidle`: idle cores from /proc/stat and a cgroup's CPU quota, on files laid
out as Linux lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from gateway.system.cpuidle import IdleCpu, cgroup_quotas

TICKS = os.sysconf("SC_CLK_TCK")
CPUS = sorted(os.sched_getaffinity(0))


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Machine:
    """A /proc and a /sys/fs/cgroup under `root`: idle seconds of the CPUs this process may use
    (split between idle and iowait), and each cgroup's usage."""

    def __init__(self, root: Path, cgroup: str = "/") -> None:
        self.proc, self.cgroups = root / "proc", root / "cgroup"
        (self.proc / "self").mkdir(parents=True)
        self.cgroups.mkdir()
        (self.proc / "self" / "cgroup").write_text(f"0::{cgroup}\n")
        self.folder = self.cgroups / cgroup.strip("/")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.idle_s = self.iowait_s = self.other_cpu_idle_s = 0.0
        self.used: dict[Path, float] = {}
        self.write()

    def write(self) -> None:
        per_cpu = [(self.idle_s / len(CPUS), self.iowait_s / len(CPUS)) if n in CPUS else (self.other_cpu_idle_s, 0)
                   for n in range(max(CPUS) + 2)]  # and one CPU this process may not use
        lines = [f"cpu  5000 10 700 {sum(i for i, _ in per_cpu) * TICKS:.0f} {sum(w for _, w in per_cpu) * TICKS:.0f}"
                 " 0 9 0 0 0"]
        lines += [f"cpu{n} 1 2 3 {i * TICKS:.0f} {w * TICKS:.0f} 6 7 8 0 0" for n, (i, w) in enumerate(per_cpu)]
        (self.proc / "stat").write_text("\n".join([*lines, "intr 1 2 3", "ctxt 99"]) + "\n")
        for folder, used in self.used.items():
            (folder / "cpu.stat").write_text(f"usage_usec {round(used * 1e6)}\nuser_usec 1\n")

    def quota(self, folder: Path, cores: float | None) -> None:
        (folder / "cpu.max").write_text("max 100000\n" if cores is None else f"{round(cores * 100000)} 100000\n")
        self.used.setdefault(folder, 0.0)
        self.write()

    def idle_cpu(self, clock: Clock) -> IdleCpu:
        return IdleCpu(proc=self.proc, cgroup_root=self.cgroups, clock=clock, interval=0.5)


def elapse(machine: Machine, clock: Clock, idle: IdleCpu, idle_s: float, used: dict[Path, float] | None = None,
           seconds: float = 1.0) -> None:
    """`seconds` pass with `idle_s` idle on our CPUs and `used` CPU seconds in those cgroups; then a reading."""
    clock.now += seconds
    machine.idle_s += idle_s
    for folder, spent in (used or {}).items():
        machine.used[folder] += spent
    machine.write()
    idle.sample()


def test_idle_cores_are_idle_and_iowait_of_our_cpus_over_the_last_interval(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path), Clock()
    idle = machine.idle_cpu(clock)
    assert idle.cores == len(CPUS) and idle.measurable
    assert idle.idle_cores() is None and idle.left_idle() is None  # no reading yet
    idle.sample()
    assert idle.idle_cores() is None  # nothing to compare with yet
    clock.now += 1.0
    machine.idle_s += 1.2
    machine.iowait_s += 0.3  # waiting for the disk is idle too
    machine.other_cpu_idle_s += 1.0  # a CPU this process may not run on: not ours to count
    machine.write()
    idle.sample()
    assert idle.idle_cores() == pytest.approx(1.5, abs=0.02)
    machine.idle_s += 0.1  # a busy spell: the figure stands until the next reading
    machine.write()
    clock.now += 0.5
    assert idle.idle_cores() == pytest.approx(1.5, abs=0.02)
    idle.sample()  # 0.1 idle seconds over 0.5 s
    assert idle.idle_cores() == pytest.approx(0.2, abs=0.02)


def test_a_busy_second_is_not_forgotten_for_one_idle_moment(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path), Clock()
    idle = machine.idle_cpu(clock)
    idle.sample()
    for step_idle in (0.1, 0.1, 0.1, 0.1, 1.0):  # four busy intervals (0.2 cores idle), then 2 cores idle
        elapse(machine, clock, idle, step_idle, seconds=0.5)
    assert idle.idle_cores() == pytest.approx((4 * 0.2 + 2.0) / 5, abs=0.02)  # the mean, not the moment
    for _ in range(5):  # a whole second idle: the figure is up again
        elapse(machine, clock, idle, 1.0, seconds=0.5)
    assert idle.idle_cores() == pytest.approx(2.0, abs=0.02)


def test_readings_that_fell_behind_mean_nothing_is_idle(tmp_path: Path) -> None:
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
    clock.now += 0.1  # three intervals without a reading: the event loop could not run the sampler
    assert idle.idle_cores() == 0.0 and idle.left_idle() == 0.0


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
    assert len(told) >= 3
    # the host file stood still (nothing idle); the caller's work is what counts: 0.01 s a reading
    figure = idle.idle_cores()
    assert figure is not None and 0 < figure <= 0.01 / 0.05


def test_the_tightest_cgroup_quota_headroom_caps_what_counts_as_idle(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path, "/machine.slice/libpod-1.scope/container"), Clock()
    scope, slice_ = machine.folder.parent, machine.folder.parent.parent
    machine.quota(machine.folder, None)  # no quota on the leaf...
    machine.quota(scope, 1.5)  # ...1.5 cores on its parent...
    machine.quota(slice_, 3.0)  # ...and a looser one above
    idle = machine.idle_cpu(clock)
    assert idle.quota is not None and idle.quota.folder == scope
    assert idle.cores == min(1.5, len(CPUS))
    idle.sample()
    # the host is nearly idle, but the scope used 1.2 of its 1.5 cores (the looser quota's cgroup
    # used more: not the one that binds)
    elapse(machine, clock, idle, 1.9, {scope: 1.2, slice_: 1.7})
    assert idle.idle_cores() == pytest.approx(0.3, abs=0.02)
    # the looser quota binds once its other children use it up: 3.0 less 2.9 leaves 0.1
    elapse(machine, clock, idle, 1.9, {scope: 1.0, slice_: 2.9})
    assert idle.left_idle() == pytest.approx(0.1, abs=0.02)


def test_a_quota_at_the_namespace_root_counts(tmp_path: Path) -> None:
    # podman with its own cgroup namespace: /proc/self/cgroup says 0::/, the quota is at the root
    machine, clock = Machine(tmp_path, "/"), Clock()
    machine.quota(machine.cgroups, 1.0)
    idle = machine.idle_cpu(clock)
    assert idle.cores == 1.0
    idle.sample()
    elapse(machine, clock, idle, 1.8, {machine.cgroups: 0.75})
    assert idle.idle_cores() == pytest.approx(0.25, abs=0.02)


def test_without_a_quota_the_cgroup_does_not_count(tmp_path: Path) -> None:
    machine, clock = Machine(tmp_path, "/user.slice"), Clock()
    machine.quota(machine.folder, None)
    idle = machine.idle_cpu(clock)
    assert idle.quota is None and idle.cores == len(CPUS)
    idle.sample()
    elapse(machine, clock, idle, 0.8, {machine.folder: 1.9})
    assert idle.idle_cores() == pytest.approx(0.8, abs=0.02)


def test_a_cgroup_outside_our_view_or_a_broken_quota_is_no_quota(tmp_path: Path) -> None:
    machine = Machine(tmp_path, "/../elsewhere")
    assert cgroup_quotas(machine.proc, machine.cgroups) == []
    machine = Machine(tmp_path / "b", "/box")
    (machine.folder / "cpu.max").write_text("50000 0\n")
    assert cgroup_quotas(machine.proc, machine.cgroups) == []


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
    assert idle.left_idle() == pytest.approx(0.4, abs=0.02)  # what it left to the others


def test_nothing_to_read_means_not_known_and_no_sampler(tmp_path: Path) -> None:
    clock = Clock()
    idle = IdleCpu(proc=tmp_path / "none", cgroup_root=tmp_path / "none", clock=clock)
    assert not idle.measurable
    anyio.run(idle.run)  # returns at once
    idle.sample()
    clock.now += 0.5
    idle.sample()
    assert idle.idle_cores() is None
