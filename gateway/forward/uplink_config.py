"""Settings of uplink-aware forwarding: `[[forward.classes]]` and `[[forward.windows]]` (docs/uplink.md).

Data only, checked by `problems` (called from `gateway.config`'s cross-checks): the matching and the
clock arithmetic live in `gateway.forward.classes` and `gateway.forward.windows`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

DEFAULT_CLASS = "default"  # images no class matches; priority 0, never `always`


def _help(text: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, **constraints)


class ClassMatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What puts an upload in a class: any one of the criteria given (an empty table matches everything)."""

    # The annotation's confidence must be at least `min_confidence` (0..1) where it is set.
    annotation_class: Annotated[
        list[str] | None, _help("Any annotation whose class_value is listed (with min_confidence, if set).")
    ] = None
    min_confidence: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = msgspec.field(default=None)
    metadata: Annotated[
        dict[str, str | int | float | bool] | None, _help("Every listed top-level metadata key equals its value.")
    ] = None
    devices: Annotated[list[str] | None, _help("Uploads of these device ids.")] = None


class ForwardClass(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A priority class: matched in the order declared, first match wins."""

    name: Annotated[str, _help("The class's name, shown in outbox lists, metrics and the status page.")]
    priority: Annotated[int, _help("Higher goes first, gateway-wide; the implicit default class has 0.")] = 0
    always: Annotated[bool, _help("Sent outside every window too.")] = False
    match: Annotated[ClassMatch | None, _help("What belongs to the class; omitted: everything.")] = None


class ForwardWindow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A sending window in local time (`forward.timezone`); `start` > `end` crosses midnight."""

    days: Annotated[str, _help('Days the window starts on: "mon-fri", "sat,sun", "mon-sun".')] = "mon-sun"
    start: Annotated[str, _help('Local start time "HH:MM".')] = "00:00"
    end: Annotated[str, _help('Local end time "HH:MM" ("24:00": midnight).')] = "24:00"
    classes: Annotated[list[str] | None, _help("Classes sent in this window; omitted: all.")] = None
    # Cap in this window (0 = unlimited); omitted: forward.bandwidth_bytes_per_s.
    bandwidth_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] | None = None
    name: Annotated[str, _help("Shown on the status page; default: its days and times.")] = ""


def problems(classes: list[ForwardClass], windows: list[ForwardWindow], timezone: str, default_cap: int) -> list[str]:
    """One message per bad value of the classes, windows and time zone (key paths as in the file)."""
    from gateway.forward import windows as win  # clock arithmetic; imported here to keep this module data-only

    out: list[str] = []
    names: set[str] = set()
    for i, c in enumerate(classes):
        where = f"forward.classes[{i}]"
        if not c.name.strip():
            out.append(f"{where}.name: must not be empty")
        elif c.name == DEFAULT_CLASS:
            out.append(f"{where}.name: {DEFAULT_CLASS!r} is the implicit class of unmatched images; "
                       "declare a catch-all class (no match table) under another name instead")
        elif c.name in names:
            out.append(f"{where}.name: class {c.name!r} is declared twice")
        names.add(c.name)
    known = names | {DEFAULT_CLASS}
    for i, w in enumerate(windows):
        for name in w.classes or []:
            if name not in known:
                out.append(f"forward.windows[{i}].classes: unknown class {name!r}; known: {', '.join(sorted(known))}")
    out.extend(win.problems(windows, timezone, default_cap))
    return out
