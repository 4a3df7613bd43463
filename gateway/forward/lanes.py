"""The forwarder's read-ahead: pending entries in one FIFO lane per (class, device), and the order
in which lanes get a free upload slot.

A higher priority goes first, gateway-wide: while one of its entries is in flight or due, no
lower priority starts, so a higher class reaches the cloud before a lower one (a routine frame
started beside a defect could arrive first, and would share the link with it). Lanes of one
priority take turns (round robin), and each lane sends oldest `seq` first with at most `per_lane`
entries in flight; an entry in backoff holds back only the later entries of its own device and
class, and lets lower classes go. A lane whose class the
current window does not send is skipped (`UplinkPlan.may_send`).
"""

from __future__ import annotations

from gateway.forward.classes import UplinkPlan
from gateway.forward.outbox import Entry
from gateway.forward.windows import Moment

Lane = tuple[str, str]  # (class, device id)


class Lanes:
    """Queues of pending entries held in memory between reads of the outbox."""

    def __init__(self, plan: UplinkPlan, per_lane: int, low_water: int) -> None:
        self.plan = plan
        self.per_lane = per_lane
        self.low_water = low_water
        self.queues: dict[Lane, list[Entry]] = {}
        self.truncated: set[Lane] = set()  # lanes with more pending than was read
        self.in_flight: dict[str, Lane] = {}  # image id -> lane
        self.running_low = False  # a truncated lane is nearly out of entries: read again soon
        self._busy: dict[Lane, int] = {}
        self._tiers: list[tuple[int, list[Lane]]] = []  # priority (highest first), its lanes
        self._turn: dict[int, int] = {}  # per priority: the lane whose turn is next

    def replace(self, queues: dict[Lane, list[Entry]], fetch: int) -> None:
        """A fresh read of the outbox (`fetch` entries read per lane at most)."""
        self.queues = queues
        self.truncated = {lane for lane, q in queues.items() if len(q) >= fetch}
        tiers: dict[int, list[Lane]] = {}
        for lane in sorted(queues):
            tiers.setdefault(self.plan.priority(lane[0]), []).append(lane)
        self._tiers = sorted(tiers.items(), reverse=True)

    def lowest_priority(self) -> int | None:
        """The lowest priority with entries in hand (None: nothing in hand)."""
        return min((self.plan.priority(lane[0]) for lane, q in self.queues.items() if q), default=None)

    def device_ids(self) -> list[str]:
        return list(dict.fromkeys(device for _, device in self.queues))

    def of_device(self, device_id: str) -> list[Entry]:
        return [e for (_, device), q in self.queues.items() if device == device_id for e in q]

    # -- choosing --------------------------------------------------------------------------------

    def start_next(self, now: float, moment: Moment, hold_below: float) -> Entry | None:
        """The next entry to send, marked in flight; None when nothing may start now. Lanes of a
        priority below `hold_below` wait (a fresher read of the outbox may hold higher ones)."""
        for priority, lanes in self._tiers:
            if priority < hold_below:
                return None
            first = self._turn.get(priority, 0)
            busy = False  # an entry of this priority in flight, or due behind one: lower ones wait
            for i in range(len(lanes)):
                lane = lanes[(first + i) % len(lanes)]
                entry = self._due(lane, now, moment)
                if entry is None:
                    busy = busy or lane in self._busy
                    continue
                self.in_flight[entry.image_id] = lane
                self._busy[lane] = self._busy.get(lane, 0) + 1
                self._turn[priority] = (first + i + 1) % len(lanes)
                return entry
            if busy:
                return None
        return None

    def has_due(self, now: float, moment: Moment) -> bool:
        return any(self._due(lane, now, moment) is not None for lane in self.queues)

    def due_in(self, now: float, moment: Moment, longest: float, hold_below: float = float("-inf")) -> float:
        """Seconds until an entry that `start_next` could start becomes due (at most `longest`);
        lower priorities held back by a higher one do not count: a finished upload wakes the loop."""
        wait = longest
        for priority, lanes in self._tiers:
            if priority < hold_below:
                break
            for lane in lanes:
                if self._busy.get(lane, 0) >= self.per_lane or not self.plan.may_send(lane[0], moment):
                    continue
                for entry in self.queues.get(lane, [])[: self.per_lane]:
                    if entry.image_id not in self.in_flight:
                        wait = min(wait, entry.next_attempt_at - now)
                        break
            if any(lane in self._busy for lane in lanes):
                break
        return wait

    def _due(self, lane: Lane, now: float, moment: Moment) -> Entry | None:
        if self._busy.get(lane, 0) >= self.per_lane or not self.plan.may_send(lane[0], moment):
            return None
        for entry in self.queues.get(lane, [])[: self.per_lane]:
            if entry.image_id in self.in_flight:
                continue
            return entry if entry.next_attempt_at <= now else None
        return None

    # -- results ---------------------------------------------------------------------------------

    def finished(self, image_id: str) -> None:
        """The upload of `image_id` is over, whatever became of it."""
        lane = self.in_flight.pop(image_id, None)
        if lane is not None:
            left = self._busy.get(lane, 0) - 1
            if left > 0:
                self._busy[lane] = left
            else:
                self._busy.pop(lane, None)

    def update(self, newer: Entry) -> None:
        """Replace the copy in hand (a refill may have put one read before this result)."""
        queue = self.queues.get((newer.priority_class, newer.device_id), [])
        for i, queued in enumerate(queue):
            if queued.image_id == newer.image_id:
                queue[i] = newer

    def drop(self, device_id: str, image_id: str) -> None:
        """The entry is done with (delivered or dead-lettered): out of its lane."""
        for lane, queue in list(self.queues.items()):
            if lane[1] != device_id:
                continue
            before = len(queue)
            queue[:] = [e for e in queue if e.image_id != image_id]
            if len(queue) == before:
                continue
            if lane in self.truncated and len(queue) <= self.per_lane + self.low_water:
                self.running_low = True
            if not queue:
                self.queues.pop(lane, None)
            return
