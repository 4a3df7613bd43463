"""Sending windows: which classes may go now, at what cap, and when that next changes.

Windows are local wall time in `forward.timezone` (empty: the system's), so a plant's "06:00" stays
06:00 across daylight-saving changes. A window that starts later than it ends crosses midnight and
belongs to the day it starts on. With no windows everything may go at any time at
`forward.bandwidth_bytes_per_s`; with windows, outside all of them only `always` classes go (at
that same cap). Overlapping windows send the union of their classes; their caps must agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec


class ForwardWindow(Protocol):
    """A window as configured (`uplink_config.ForwardWindow`, which imports this module for its
    checks); only these fields are read here."""

    @property
    def days(self) -> str: ...
    @property
    def start(self) -> str: ...
    @property
    def end(self) -> str: ...
    @property
    def classes(self) -> list[str] | None: ...
    @property
    def bandwidth_bytes_per_s(self) -> int | None: ...
    @property
    def name(self) -> str: ...

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEK_MIN = 7 * 1440
HORIZON_DAYS = 8  # a weekly schedule repeats within this many days
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


def parse_days(text: str) -> frozenset[int]:
    """'mon-fri', 'sat,sun', 'fri-mon' (wraps), 'mon' -> weekday numbers (Monday 0)."""
    out: set[int] = set()
    for part in text.lower().replace(" ", "").split(","):
        first, sep, last = part.partition("-")
        if first not in DAYS or (sep and last not in DAYS):
            raise ValueError(f"{text!r}: days are mon..sun, as a range 'mon-fri' or a list 'sat,sun'")
        a, b = DAYS.index(first), DAYS.index(last if sep else first)
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


def parse_time(text: str, end: bool = False) -> int:
    """'HH:MM' -> minutes after midnight; '24:00' only as an end."""
    m = _TIME.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a time HH:MM")
    hours, minutes = int(m.group(1)), int(m.group(2))
    if (hours, minutes) == (24, 0) and end:
        return 1440
    if hours > 23 or minutes > 59:
        raise ValueError(f"{text!r} is not a time of day (00:00..23:59{', or 24:00' if end else ''})")
    return hours * 60 + minutes


class Window(msgspec.Struct, frozen=True):
    label: str
    days: frozenset[int]
    start: int  # minutes after local midnight
    end: int  # may be <= start: the window ends the next day
    classes: frozenset[str] | None  # None: every class
    cap: int  # bytes/s, 0 = unlimited


class Moment(msgspec.Struct, frozen=True):
    """What may be sent at one instant, and until when that holds."""

    window: str | None  # the open window(s), None outside every window
    classes: frozenset[str] | None  # allowed classes besides `always` ones; None: all
    cap: int
    next_change_at: float | None  # None: never changes (no windows)
    next_change: str = ""

    def allows(self, class_name: str, always: bool) -> bool:
        return always or self.classes is None or class_name in self.classes


def compile_windows(windows: Sequence[ForwardWindow], default_cap: int) -> list[Window]:
    """Parse the configured windows (raises ValueError naming the bad value)."""
    out = []
    for w in windows:
        start, end = parse_time(w.start), parse_time(w.end, end=True)
        if start == end:
            raise ValueError(f"start and end are both {w.start!r}: for a whole day use start = \"00:00\", "
                             "end = \"24:00\"")
        cap = default_cap if w.bandwidth_bytes_per_s is None else w.bandwidth_bytes_per_s
        out.append(Window(label=w.name or f"{w.days} {w.start}-{w.end}", days=parse_days(w.days), start=start,
                          end=end, classes=None if w.classes is None else frozenset(w.classes), cap=cap))
    return out


def zone(timezone: str) -> ZoneInfo | None:
    """The configured zone; None for the system's (raises ValueError for an unknown name)."""
    if not timezone:
        return None
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{timezone!r} is not a known time zone (e.g. Europe/Berlin, UTC): {exc}") from None


def problems(windows: Sequence[ForwardWindow], timezone: str, default_cap: int) -> list[str]:
    """One message per bad window value, and per pair of overlapping windows with different caps."""
    out = []
    try:
        zone(timezone)
    except ValueError as exc:
        out.append(f"forward.timezone: {exc}")
    compiled: list[tuple[int, Window]] = []
    for i, w in enumerate(windows):
        bad = False
        for key, value in (("days", w.days), ("start", w.start), ("end", w.end)):
            try:
                parse_days(value) if key == "days" else parse_time(value, end=key == "end")
            except ValueError as exc:
                out.append(f"forward.windows[{i}].{key}: {exc}")
                bad = True
        if bad:
            continue
        try:
            compiled.extend((i, c) for c in compile_windows([w], default_cap))
        except ValueError as exc:
            out.append(f"forward.windows[{i}]: {exc}")
    for n, (i, a) in enumerate(compiled):
        for j, b in compiled[n + 1:]:
            shared = _weekly(a) & _weekly(b)
            if shared and a.cap != b.cap:
                first = min(shared)
                when = f"{DAYS[first // 1440]} {first % 1440 // 60:02d}:{first % 60:02d}"
                out.append(f"forward.windows[{i}], forward.windows[{j}]: they overlap (from {when}) with different "
                           f"bandwidth caps ({a.cap} and {b.cap} bytes/s); give them one cap or make them not overlap")
    return out


def _weekly(w: Window) -> set[int]:
    """The window's minutes of the week (Monday 00:00 = 0)."""
    length = (w.end - w.start) % 1440 or 1440
    return {(day * 1440 + w.start + m) % WEEK_MIN for day in w.days for m in range(length)}


class Schedule:
    """Answers `at(now)` for a list of windows; answers are cached until the next window edge."""

    def __init__(self, windows: Sequence[ForwardWindow], timezone: str, default_cap: int) -> None:
        self.windows = compile_windows(windows, default_cap)
        self.tz = zone(timezone)
        self.default_cap = default_cap
        self._cached: tuple[float, float, Moment] | None = None  # valid from, valid until, answer

    @property
    def configured(self) -> bool:
        return bool(self.windows)

    def at(self, now: float) -> Moment:
        if not self.windows:
            return Moment(window=None, classes=None, cap=self.default_cap, next_change_at=None)
        cached = self._cached
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        spans = self._spans(now)
        edges = sorted({t for s, e, _ in spans for t in (s, e)})
        moment = self._state(spans, now)
        prev = max((t for t in edges if t <= now), default=now)
        for t in edges:
            if t <= now:
                continue
            later = self._state(spans, t)
            if (later.window, later.classes, later.cap) != (moment.window, moment.classes, moment.cap):
                what = f"{later.window} opens" if later.window else f"{moment.window} closes"
                moment = Moment(window=moment.window, classes=moment.classes, cap=moment.cap, next_change_at=t,
                                next_change=what)
                break
        nxt = min((t for t in edges if t > now), default=now + 86400.0)
        self._cached = (prev, nxt, moment)
        return moment

    def next_open(self, class_name: str, always: bool, now: float) -> tuple[float, str] | None:
        """When a window next sends `class_name`, and which; None when it may go now or no window sends it."""
        if self.at(now).allows(class_name, always):
            return None
        for start, _end, w in sorted(s for s in self._spans(now) if s[1] > now):
            if w.classes is None or class_name in w.classes:
                return max(start, now), w.label
        return None

    def _state(self, spans: list[tuple[float, float, Window]], t: float) -> Moment:
        open_ = [w for s, e, w in spans if s <= t < e]
        if not open_:
            return Moment(window=None, classes=frozenset(), cap=self.default_cap, next_change_at=None)
        classes: frozenset[str] | None = frozenset()
        for w in open_:
            classes = None if classes is None or w.classes is None else classes | w.classes
        labels = list(dict.fromkeys(w.label for w in open_))
        return Moment(window=" + ".join(labels), classes=classes, cap=open_[0].cap, next_change_at=None)

    def _spans(self, now: float) -> list[tuple[float, float, Window]]:
        """Every window occurrence from a day before `now` to HORIZON_DAYS after, as unix times."""
        today = self._local(now).date()
        out = []
        for k in range(-1, HORIZON_DAYS):
            day = today + timedelta(days=k)
            for w in self.windows:
                if day.weekday() in w.days:
                    end_day = day if w.end > w.start else day + timedelta(days=1)
                    out.append((self._unix(day, w.start), self._unix(end_day, w.end), w))
        return out

    def _local(self, t: float) -> datetime:
        return datetime.fromtimestamp(t, self.tz) if self.tz is not None else datetime.fromtimestamp(t)

    def _unix(self, day: date, minutes: int) -> float:
        naive = datetime(day.year, day.month, day.day) + timedelta(minutes=minutes)
        return (naive.replace(tzinfo=self.tz) if self.tz is not None else naive).timestamp()


def describe(at: Callable[[float], str], moment: Moment) -> str:
    """'window X (cap), until T' for people; `at` formats a unix time."""
    where = f"window {moment.window}" if moment.window else "outside every window"
    cap = f"at most {moment.cap} bytes/s" if moment.cap else "no cap"
    change = f"; {moment.next_change} at {at(moment.next_change_at)}" if moment.next_change_at else ""
    return f"{where}, {cap}{change}"
