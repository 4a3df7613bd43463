"""Priority classes: which class an upload belongs to, decided once at ingest and kept in the outbox.

Classes are tried in the order declared and the first that matches wins; an upload no class
matches is in the implicit `default` class (priority 0). A class's `match` table holds up to three
criteria and any one of them suffices: an annotation listed in `annotation_class` (at least
`min_confidence` sure, where set; an annotation without a confidence then does not count), every
`metadata` key equal to its value (top-level keys of the metadata as received), or the device
being listed in `devices`. A class with no (or an empty) match table matches everything.
An outbox entry whose class is no longer configured is sent as a `default` one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.forward.uplink_config import DEFAULT_CLASS, ForwardClass
from gateway.forward.windows import Moment, Schedule


def _same(want: object, got: object) -> bool:
    # JSON true is not the number 1, whatever Python's == says.
    if isinstance(want, bool) or isinstance(got, bool):
        return type(want) is type(got) and want == got
    return want == got


def _matches(c: ForwardClass, device_id: str, meta: dict[str, Any] | None) -> bool:
    m = c.match
    if m is None or (m.annotation_class is None and m.min_confidence is None and not m.metadata and not m.devices):
        return True
    if m.devices and device_id in m.devices:
        return True
    if meta is None:
        return False
    if m.metadata and all(k in meta and _same(v, meta[k]) for k, v in m.metadata.items()):
        return True
    if m.annotation_class is not None or m.min_confidence is not None:
        annotations = meta.get("annotations")
        for ann in annotations if isinstance(annotations, list) else []:
            if not isinstance(ann, dict):
                continue
            if m.annotation_class is not None and ann.get("class_value") not in m.annotation_class:
                continue
            if m.min_confidence is not None:
                conf = ann.get("confidence")
                if isinstance(conf, bool) or not isinstance(conf, int | float) or conf < m.min_confidence:
                    continue
            return True
    return False


class UplinkPlan:
    """The site's classes and windows, built from settings; shared by ingest, the forwarder and status.

    Also the one-way signal from ingest to the forwarder: `arrived(priority)` after an upload of a
    class above the lowest is acknowledged, so the forwarder reads the outbox again before sending
    anything of a lower class (`listen` is how the forwarder hears it)."""

    def __init__(self, classes: list[ForwardClass], schedule: Schedule) -> None:
        self.classes = classes
        self.schedule = schedule
        self.priorities = {DEFAULT_CLASS: 0} | {c.name: c.priority for c in classes}
        self.always = frozenset(c.name for c in classes if c.always)
        self.lowest = min(self.priorities.values())
        self._listener: Callable[[int], None] | None = None

    @classmethod
    def from_settings(cls, forward: Any) -> UplinkPlan:
        """From `Settings.forward` (checked at load, so this does not raise)."""
        return cls(forward.classes, Schedule(forward.windows, forward.timezone, forward.bandwidth_bytes_per_s))

    @property
    def configured(self) -> bool:
        return bool(self.classes) or self.schedule.configured

    def classify(self, device_id: str, meta: dict[str, Any] | None) -> str:
        """The class of an upload from its device and decoded metadata (None: no metadata part)."""
        for c in self.classes:
            if _matches(c, device_id, meta):
                return c.name
        return DEFAULT_CLASS

    def priority(self, class_name: str) -> int:
        return self.priorities.get(class_name, 0)

    def is_always(self, class_name: str) -> bool:
        return class_name in self.always

    def may_send(self, class_name: str, moment: Moment) -> bool:
        known = class_name if class_name in self.priorities else DEFAULT_CLASS
        return moment.allows(known, known in self.always)

    def waits_for(self, class_name: str, now: float) -> tuple[float, str] | None:
        """When a window next sends this class and which (None: it may go now, or no window sends it)."""
        known = class_name if class_name in self.priorities else DEFAULT_CLASS
        return self.schedule.next_open(known, known in self.always, now)

    def annotate(self, rows: list[dict[str, Any]], now: float) -> None:
        """Add `waits_for` to outbox rows (`gateway outbox list`): the window a pending entry waits
        for, as {"window", "at"}; "no window" if none sends its class; None if it may go now."""
        moment = self.schedule.at(now)
        for row in rows:
            cls = row.get("class") or DEFAULT_CLASS
            if row.get("state") not in ("pending", "held") or self.may_send(cls, moment):
                row["waits_for"] = None
                continue
            waits = self.waits_for(cls, now)
            row["waits_for"] = "no window" if waits is None else {"window": waits[1], "at": waits[0]}

    # -- ingest -> forwarder -----------------------------------------------------------------------

    def listen(self, listener: Callable[[int], None]) -> None:
        self._listener = listener

    def arrived(self, class_name: str) -> None:
        """An upload of this class was acknowledged (its outbox entry is readable now)."""
        p = self.priority(class_name)
        if p > self.lowest and self._listener is not None:
            self._listener(p)

    # -- figures -------------------------------------------------------------------------------

    def report(self, backlog: dict[str, tuple[int, int, float | None]], now: float) -> dict[str, Any]:
        """Per-class backlog and the current window, for `gateway status`, /metrics and the status page.
        `backlog`: class -> (count, bytes, oldest created_at) of undelivered entries."""
        moment = self.schedule.at(now)
        names = [*sorted(self.priorities, key=lambda n: (-self.priorities[n], n)),
                 *sorted(n for n in backlog if n not in self.priorities)]
        rows = []
        for name in names:
            count, size, oldest = backlog.get(name, (0, 0, None))
            waits = self.waits_for(name, now)
            rows.append({
                "name": name, "priority": self.priority(name), "always": name in self.always,
                "pending_count": count, "pending_bytes": size,
                "oldest_pending_age_s": None if oldest is None else max(0.0, now - oldest),
                "sending_now": self.may_send(name, moment),
                "waits_for": None if waits is None else {"window": waits[1], "at": waits[0]},
            })
        window = {
            "configured": self.schedule.configured, "current": moment.window, "cap_bytes_per_s": moment.cap,
            "classes": None if moment.classes is None else sorted(moment.classes | self.always),
            "next_change_at": moment.next_change_at, "next_change": moment.next_change or None,
        }
        return {"classes": rows, "window": window}
