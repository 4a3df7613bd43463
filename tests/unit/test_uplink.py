"""Priority classes, sending windows and the forwarder's lanes, without I/O (docs/uplink.md)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.config import ConfigError, load_settings
from gateway.forward.classes import UplinkPlan
from gateway.forward.lanes import Lanes
from gateway.forward.outbox import Entry
from gateway.forward.uplink_config import ClassMatch, ForwardClass, ForwardWindow
from gateway.forward.windows import Schedule, parse_days, parse_time

ROOT = Path(__file__).resolve().parents[2]
BERLIN = ZoneInfo("Europe/Berlin")

TWO_CLASSES = """
[[forward.classes]]
name = "defects"
priority = 10
always = true
[forward.classes.match]
annotation_class = ["scratch", "dent"]
min_confidence = 0.5
[[forward.classes]]
name = "inspection"
priority = 5
[forward.classes.match]
metadata = { source = "line-3", rework = true }
devices = ["dev_inspect"]
"""


def plan(classes: list[ForwardClass] | None = None, windows: list[ForwardWindow] | None = None,
         tz: str = "Europe/Berlin", cap: int = 0) -> UplinkPlan:
    return UplinkPlan(classes or [], Schedule(windows or [], tz, cap))


def at(text: str) -> float:
    """A Berlin wall time, e.g. '2026-12-07 06:00' (a Monday), as unix seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def test_first_matching_class_wins_and_unmatched_uploads_are_default(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text(TWO_CLASSES)
    p = UplinkPlan.from_settings(load_settings(f, env={}).forward)
    dent = {"class_value": "dent", "type": "bbox", "geometry": [0.5] * 4, "confidence": 0.9}
    assert p.classify("d1", {"annotations": [dent], "source": "line-3", "rework": True}) == "defects"
    assert p.classify("d1", {"annotations": [dent | {"confidence": 0.4}]}) == "default"  # not sure enough
    assert p.classify("d1", {"annotations": [{k: v for k, v in dent.items() if k != "confidence"}]}) == "default"
    assert p.classify("d1", {"annotations": [dent | {"class_value": "smudge"}]}) == "default"
    assert p.classify("d1", {"source": "line-3", "rework": True}) == "inspection"
    assert p.classify("d1", {"source": "line-3", "rework": 1}) == "default"  # JSON 1 is not true
    assert p.classify("d1", {"source": "line-3"}) == "default"  # every listed key must match
    assert p.classify("dev_inspect", None) == "inspection"  # ...or the device
    assert p.classify("d1", None) == "default"
    catch_all = plan([ForwardClass(name="all", priority=1), ForwardClass(name="never", priority=9)])
    assert catch_all.classify("d1", None) == "all"  # no match table: everything, and first match wins
    assert plan([ForwardClass(name="any", match=ClassMatch(min_confidence=0.8))]).classify(
        "d", {"annotations": [dent]}) == "any"


def test_days_and_times_parse_and_refuse_nonsense() -> None:
    assert parse_days("mon-fri") == {0, 1, 2, 3, 4}
    assert parse_days("sat,sun") == {5, 6}
    assert parse_days("MON-SUN") == set(range(7))
    assert parse_days("fri-mon") == {4, 5, 6, 0}  # a range may wrap over the week's end
    assert parse_days("tue") == {1}
    assert parse_time("06:30") == 390 and parse_time("24:00", end=True) == 1440
    for bad in ("weekdays", "mon-", "mon-fry", ""):
        with pytest.raises(ValueError):
            parse_days(bad)
    for bad in ("6", "25:00", "12:60", "24:00", "noon", "06:00:00"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_window_opens_and_closes_in_local_time_and_says_what_changes_next() -> None:
    shifts = ForwardWindow(days="mon-fri", start="06:00", end="22:00", classes=["defects"],
                           bandwidth_bytes_per_s=2_000_000, name="shifts")
    night = ForwardWindow(days="mon-fri", start="22:00", end="06:00", name="night")  # crosses midnight
    p = plan([ForwardClass(name="defects", priority=10), ForwardClass(name="top", always=True)], [shifts, night],
             cap=0)
    before = p.schedule.at(at("2026-12-07 05:59"))  # Monday, before the first shift
    assert before.window is None and not p.may_send("defects", before) and p.may_send("top", before)
    assert before.next_change_at == at("2026-12-07 06:00") and before.next_change == "shifts opens"
    day = p.schedule.at(at("2026-12-07 06:00"))
    assert day.window == "shifts" and day.cap == 2_000_000
    assert p.may_send("defects", day) and not p.may_send("default", day) and p.may_send("top", day)
    assert day.next_change_at == at("2026-12-07 22:00")
    late = p.schedule.at(at("2026-12-08 01:00"))  # Monday's night window, on Tuesday
    assert late.window == "night" and late.cap == 0 and p.may_send("default", late)
    weekend = p.schedule.at(at("2026-12-12 12:00"))  # Saturday: Friday's night ended at 06:00
    assert weekend.window is None and weekend.next_change_at == at("2026-12-14 06:00")
    assert p.waits_for("default", at("2026-12-12 12:00")) == (at("2026-12-14 22:00"), "night")
    assert p.waits_for("defects", at("2026-12-07 12:00")) is None


def test_local_time_holds_across_a_daylight_saving_change() -> None:
    p = plan(windows=[ForwardWindow(days="sun", start="06:00", end="07:00")])
    # 2026-03-29: Berlin moves from UTC+1 to UTC+2 at 02:00; 06:00 local is 04:00 UTC.
    opens = p.schedule.at(at("2026-03-29 01:00")).next_change_at
    assert opens == datetime(2026, 3, 29, 4, 0, tzinfo=ZoneInfo("UTC")).timestamp()


def test_no_windows_means_everything_at_the_forward_cap_forever() -> None:
    p = plan(cap=5000)
    m = p.schedule.at(at("2026-12-07 03:00"))
    assert m.window is None and m.cap == 5000 and m.next_change_at is None and p.may_send("anything", m)


def problems_of(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "g.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(f, env={})
    return info.value.problems


def test_each_bad_class_or_window_value_gets_one_message_naming_it(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, TWO_CLASSES + """
[[forward.classes]]
name = "defects"
[[forward.classes]]
name = "default"
[forward]
timezone = "Mars/Olympus"
[[forward.windows]]
days = "mon-fri"
start = "06:00"
end = "22:00"
classes = ["defects", "nosuch"]
bandwidth_bytes_per_s = 1000
[[forward.windows]]
days = "fri-sat"
start = "20:00"
end = "02:00"
bandwidth_bytes_per_s = 2000
[[forward.windows]]
days = "weekdays"
start = "25:00"
end = "07:00"
""")
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert any(p.startswith("forward.classes[2].name") and "twice" in p for p in problems), text
    assert any(p.startswith("forward.classes[3].name") and "implicit" in p for p in problems), text
    assert any(p.startswith("forward.timezone") and "Mars/Olympus" in p for p in problems), text
    assert any(p.startswith("forward.windows[0].classes") and "'nosuch'" in p for p in problems), text
    assert any(p.startswith("forward.windows[0], forward.windows[1]") and "fri 20:00" in p for p in problems), text
    assert any(p.startswith("forward.windows[2].days") and "weekdays" in p for p in problems), text
    assert any(p.startswith("forward.windows[2].start") and "25:00" in p for p in problems), text
    assert all(str(tmp_path / "g.toml") in p for p in problems), text
    bad_conf = problems_of(tmp_path, '[[forward.classes]]\nname = "x"\n[forward.classes.match]\nmin_confidence = 2\n'
                                     'colour = "red"\n')
    assert len(bad_conf) == 1 and bad_conf[0].startswith("forward.classes"), bad_conf


def test_overlapping_windows_with_one_cap_are_fine_and_send_the_union(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text(TWO_CLASSES + """
[[forward.windows]]
start = "06:00"
end = "12:00"
classes = ["defects"]
[[forward.windows]]
start = "10:00"
end = "14:00"
classes = ["inspection"]
""")
    p = UplinkPlan.from_settings(load_settings(f, env={}).forward)
    both = p.schedule.at(datetime.fromisoformat("2026-12-07 11:00").astimezone().timestamp())
    assert both.classes == {"defects", "inspection"}


def test_shipped_example_windows_are_valid(tmp_path: Path) -> None:
    """The commented two-shift example in config/gateway.toml, uncommented, loads."""
    lines = (ROOT / "config/gateway.toml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# [[forward.classes]]"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    example = [line.removeprefix("#").removeprefix(" ") for line in lines[start:end]]
    f = tmp_path / "g.toml"
    f.write_text("\n".join(example).replace('"dev_..."', '"dev_1"'))
    s = load_settings(f, env={})
    assert [c.name for c in s.forward.classes] == ["defects", "inspection"] and len(s.forward.windows) == 3


def test_bad_windows_stop_the_server_before_it_listens(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('[[forward.windows]]\nstart = "6am"\nend = "22:00"\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "--config", str(f), "serve"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert "forward.windows[0]" in result.stderr and "'6am'" in result.stderr
    assert not (tmp_path / "data").exists()


def entry(image_id: str, device: str, cls: str, seq: int, due: float = 0.0) -> Entry:
    return Entry(image_id=image_id, seq=seq, device_id=device, size=1, attempts=0, next_attempt_at=due,
                 batch_id="b", filename="f.jpg", content_type="image/jpeg", storage_key="k", metadata=None,
                 xxh3_128="0", priority_class=cls)


def test_lanes_send_higher_classes_first_devices_in_turn_and_backoff_holds_only_its_lane() -> None:
    p = plan([ForwardClass(name="defects", priority=10)])
    lanes = Lanes(p, per_lane=1, low_water=8)
    queues = {
        ("default", "a"): [entry("a1", "a", "default", 1), entry("a2", "a", "default", 2)],
        ("default", "b"): [entry("b1", "b", "default", 3)],
        ("defects", "a"): [entry("a3", "a", "defects", 4, due=100.0), entry("a4", "a", "defects", 5)],  # backoff
        ("defects", "b"): [entry("b2", "b", "defects", 6), entry("b3", "b", "defects", 7)],
    }
    lanes.replace(queues, fetch=40)
    moment = p.schedule.at(0.0)

    def start_all(now: float, hold: float = float("-inf")) -> list[str]:
        started = []
        while (e := lanes.start_next(now, moment, hold)) is not None:
            started.append(e.image_id)
        return started

    # b's defect first; then b3 waits for b2 (its lane's order), and so do all routine frames:
    # a's defects wait for a3's backoff (a4 keeps its place behind it), which holds back nothing else.
    assert start_all(50.0) == ["b2"]
    assert lanes.due_in(50.0, moment, 5.0) == 5.0  # the held-back routine frames do not make the loop spin
    lanes.finished("b2")
    lanes.drop("b", "b2")
    assert start_all(50.0) == ["b3"]  # routine frames wait while a defect is in flight: it arrives first
    lanes.finished("b3")
    lanes.drop("b", "b3")
    assert start_all(50.0) == ["a1", "b1"]  # no defect in flight or due: routine frames go, one per device
    for done in ("a1", "b1"):
        lanes.finished(done)
        lanes.drop(done[0], done)
    assert start_all(50.0, hold=10) == []  # held: only priority >= 10 may start, and a3 is not due
    assert start_all(100.0, hold=10) == ["a3"]
    assert start_all(100.0) == []  # a4 waits for a3 (its lane), so the routine a2 waits too
    lanes.finished("a3")
    lanes.drop("a", "a3")
    assert start_all(100.0) == ["a4"]
    assert lanes.due_in(100.0, moment, 5.0) == 5.0  # a2 waits for a4's answer, which wakes the loop
    lanes.finished("a4")
    lanes.drop("a", "a4")
    assert start_all(100.0) == ["a2"]


def test_lanes_skip_classes_the_window_does_not_send() -> None:
    p = plan([ForwardClass(name="defects", priority=10, always=True)],
             [ForwardWindow(days="mon-sun", start="06:00", end="22:00")])
    lanes = Lanes(p, per_lane=1, low_water=8)
    lanes.replace({("default", "a"): [entry("a1", "a", "default", 1)],
                   ("defects", "a"): [entry("a2", "a", "defects", 2)]}, fetch=40)
    night = p.schedule.at(at("2026-12-07 03:00"))
    assert lanes.start_next(at("2026-12-07 03:00"), night, float("-inf")).image_id == "a2"  # type: ignore[union-attr]
    assert lanes.start_next(at("2026-12-07 03:00"), night, float("-inf")) is None
    assert lanes.due_in(at("2026-12-07 03:00"), night, 5.0) == 5.0  # nothing it may send is due: no busy loop
