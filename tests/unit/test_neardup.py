"""The per-device reference windows and the CPU budget of `gateway.ingest.neardup`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from gateway.config import DedupSettings
from gateway.ingest import neardup
from gateway.ingest.neardup import NearDuplicates, Verdict
from gateway.ops.metrics import Metrics
from gateway.system.cpuidle import IdleCpu
from tests.support.frames import Scene, capture, draw

ANNOTATED = json.dumps({"annotations": [{"class_value": "x", "type": "bbox", "geometry": [0.5, 0.5, 0.1, 0.1]}]})


@pytest.fixture(scope="module")
def shots() -> list[bytes]:
    scene = draw(Scene(seed=3, parts=((200, 200),)))
    return [capture(scene, i, shift=(i % 2, 0), sigma=4.0, quality=85) for i in range(4)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def judge(nd: NearDuplicates, frame: bytes, metadata: str | None = None) -> Verdict:
    """A frame's verdict as the ingest path gets it: admitted, then judged, or unchecked."""
    async def run() -> Verdict:
        return await nd.judge("dev", frame, None if metadata is None else metadata.encode(), len(frame))

    return anyio.run(run) if nd.admit() else neardup.UNCHECKED


def test_near_duplicates_point_at_references_which_expire(shots: list[bytes]) -> None:
    clock = Clock()
    nd = NearDuplicates(DedupSettings(near_duplicates="hold", near_window_s=60), Metrics(), clock)
    first = judge(nd, shots[0])
    assert first.of is None and first.fingerprint is not None
    nd.remember("dev", first, "img_1", "batch_1", "raw-data/1")
    again = judge(nd, shots[1])
    assert again.of is not None and again.of.image_id == "img_1" and again.action == "hold"
    nd.remember("dev", again, "img_2", "batch_1", "raw-data/2")  # a near-duplicate never becomes a reference
    assert judge(nd, shots[2]).of.image_id == "img_1"  # type: ignore[union-attr]
    assert judge(nd, shots[2], ANNOTATED).action == "keep"  # the device saw something: not held
    clock.now += 61  # the reference is too old now: the frame is forwarded as a new reference
    assert judge(nd, shots[3]).of is None


def test_frames_go_unchecked_once_the_cpu_budget_is_spent(shots: list[bytes],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neardup, "BURST_CPU_S", 0.0001)
    metrics = Metrics()
    nd = NearDuplicates(DedupSettings(near_cpu_share=1e-6), metrics, Clock())
    assert judge(nd, shots[0]).fingerprint is not None  # within the initial burst
    assert judge(nd, shots[1]).fingerprint is None  # budget spent: stored unchecked
    assert metrics.registry.get_sample_value("acusight_gateway_fingerprints_total", {"result": "busy"}) == 1


def test_a_gateway_with_too_many_uploads_in_progress_stores_frames_unchecked(shots: list[bytes]) -> None:
    in_progress = [5]
    nd = NearDuplicates(DedupSettings(near_busy_uploads=4), Metrics(), Clock(),
                        lambda: in_progress[0])
    assert judge(nd, shots[0]).fingerprint is None  # 5 uploads in progress: ingest keeps the CPU
    in_progress[0] = 4
    assert judge(nd, shots[0]).fingerprint is not None


class Idle(IdleCpu):
    """The machine's idle cores as the test sets them; `run` notes what it was given as reclaimable."""

    def __init__(self, cores: float) -> None:
        super().__init__(proc=Path("/nonexistent"), cgroup_root=Path("/nonexistent"))
        self.idle: float | None = None
        self.left: float | None = None  # idle without fingerprints' CPU (None: as `idle`)
        self.reclaimable: list[float] = []
        self._cores = cores

    @property
    def cores(self) -> float:
        return self._cores

    @property
    def measurable(self) -> bool:
        return True

    def idle_cores(self) -> float | None:
        return self.idle

    def left_idle(self) -> float | None:
        return self.idle if self.left is None else self.left

    async def run(self, reclaimable: Callable[[], float] = lambda: 0.0) -> None:
        self.reclaimable.append(reclaimable())


def test_frames_go_unchecked_while_the_machine_has_no_core_to_spare(shots: list[bytes]) -> None:
    idle = Idle(cores=2)
    metrics = Metrics()
    nd = NearDuplicates(DedupSettings(), metrics, Clock(), idle_cpu=idle)
    assert nd.min_idle_cores == 1.0
    assert judge(nd, shots[0]).fingerprint is not None  # not measured yet: checked
    idle.idle = 0.45  # a saturated 2-core gateway at 100 KiB (docs/design.md)
    assert judge(nd, shots[1]).fingerprint is None
    assert metrics.registry.get_sample_value("acusight_gateway_fingerprints_total", {"result": "no_idle_cpu"}) == 1
    idle.idle = 1.2
    assert judge(nd, shots[2]).fingerprint is not None


def test_fingerprints_that_crowd_ingest_out_do_not_count_as_spare(shots: list[bytes]) -> None:
    idle = Idle(cores=2)
    metrics = Metrics()
    nd = NearDuplicates(DedupSettings(), metrics, Clock(), idle_cpu=idle)
    idle.idle, idle.left = 1.1, 0.6  # fingerprints used half a core, 0.6 stayed idle: go on
    assert judge(nd, shots[0]).fingerprint is not None
    idle.idle, idle.left = 1.0, 0.05  # a core of fingerprints, nothing else idle: they take it from ingest
    assert judge(nd, shots[1]).fingerprint is None
    assert metrics.registry.get_sample_value("acusight_gateway_fingerprints_total", {"result": "no_idle_cpu"}) == 1


def test_the_idle_cpu_watch_counts_fingerprints_as_spare(shots: list[bytes]) -> None:
    idle = Idle(cores=2)
    metrics = Metrics()
    nd = NearDuplicates(DedupSettings(), metrics, Clock(), idle_cpu=idle)
    judge(nd, shots[0])
    anyio.run(nd.watch_cpu)
    # what fingerprints spent is what the sampler counts as spare, so that they do not stop themselves
    spent = metrics.registry.get_sample_value("acusight_gateway_fingerprint_cpu_seconds_total")
    assert idle.reclaimable == [nd.cpu_used()] and nd.cpu_used() == spent > 0


def test_a_running_fingerprint_is_credited_as_it_runs(shots: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(source: bytes) -> neardup.Fingerprint | None:
        deadline = time.thread_time() + 0.3  # a large frame's fingerprint: CPU, not waiting
        while time.thread_time() < deadline:
            pass
        return fingerprint(source)

    fingerprint = neardup.fingerprint
    monkeypatch.setattr(neardup, "fingerprint", slow)
    nd = NearDuplicates(DedupSettings(), Metrics(), Clock())
    seen: list[float] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(nd.judge, "dev", shots[0], None, len(shots[0]))
            await anyio.sleep(0.15)
            seen.append(nd.cpu_used())  # halfway through
        seen.append(nd.cpu_used())

    anyio.run(main)
    assert 0.03 < seen[0] < 0.3 <= seen[1]


def test_by_default_uploads_in_progress_do_not_decide(shots: list[bytes]) -> None:
    idle = Idle(cores=2)
    idle.idle = 1.5
    nd = NearDuplicates(DedupSettings(), Metrics(), Clock(), lambda: 50, idle_cpu=idle)
    assert judge(nd, shots[0]).fingerprint is not None  # 50 slow senders, the CPU idle: checked


def test_a_one_core_machine_asks_for_half_a_core_and_zero_asks_for_none(shots: list[bytes]) -> None:
    idle = Idle(cores=1)
    nd = NearDuplicates(DedupSettings(), Metrics(), Clock(), idle_cpu=idle)
    assert nd.min_idle_cores == 0.5
    idle.idle = 0.6
    assert judge(nd, shots[0]).fingerprint is not None
    nd = NearDuplicates(DedupSettings(near_min_idle_cores=0), Metrics(), Clock(), idle_cpu=idle)
    idle.idle = 0.0
    assert judge(nd, shots[0]).fingerprint is not None
