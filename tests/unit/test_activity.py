"""The status page's in-memory figures: per-minute throughput, ETA, recent errors; the progress bar."""

from __future__ import annotations

import io

from gateway.cli.display import StepBar, TransferBar, fields, table
from gateway.ops.activity import ErrorEntry, RecentErrors, Throughput


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_throughput_buckets_by_minute_and_fills_quiet_minutes_with_zeros() -> None:
    clock = FakeClock(6000.0)  # a minute boundary
    tp = Throughput(clock)
    tp.record_accepted(100)
    tp.record_accepted(50)
    clock.t += 120  # two minutes later
    tp.record_delivered(150)
    minutes = tp.last_minutes(4)
    assert [m.minute for m in minutes] == [5940, 6000, 6060, 6120]
    assert [(m.accepted, m.accepted_bytes) for m in minutes] == [(0, 0), (2, 150), (0, 0), (0, 0)]
    assert [(m.delivered, m.delivered_bytes) for m in minutes] == [(0, 0), (0, 0), (0, 0), (1, 150)]


def test_throughput_keeps_a_bounded_ring() -> None:
    clock = FakeClock(0.0)
    tp = Throughput(clock, minutes=5)
    for _ in range(20):
        tp.record_accepted(1)
        clock.t += 60
    assert sum(m.accepted for m in tp.last_minutes(60)) == 5


def test_eta_from_recent_delivery_rate() -> None:
    clock = FakeClock(1000.0)
    tp = Throughput(clock)
    assert tp.eta_s(0, 0) == 0.0
    assert tp.eta_s(10, 1000) is None  # nothing delivered yet: unknown, not zero
    clock.t += 100
    for _ in range(10):
        tp.record_delivered(100)  # 1000 bytes in 100 s since start: 10 B/s
    eta = tp.eta_s(5, 500)
    assert eta is not None and abs(eta - 50.0) < 1e-6


def test_recent_errors_newest_first_bounded_and_masking_keys() -> None:
    errors = RecentErrors(size=3)
    for i in range(5):
        errors.add(ErrorEntry(at=float(i), method="POST", path="/api/device/images/upload", status=401,
                              code="INVALID_DEVICE_KEY", message=f"bad key adk_{'ab' * 16} #{i}"))
    latest = errors.latest(10)
    assert [round(x.at) for x in latest] == [4, 3, 2]
    assert all("ab" * 16 not in x.message and "adk_…" in x.message for x in latest)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only() -> None:
    tty = Tty()
    bar = TransferBar(stream=tty, label="drain")
    bar.start(4, 4096)
    bar.advance(2, nbytes=2048)
    bar.note("batch_1: drained")
    bar.advance(2, nbytes=2048)
    bar.finish()
    out = tty.getvalue()
    assert "drain" in out and "4/4" in out and "4.1 kB" in out and "100%" in out and "batch_1: drained" in out

    plain = io.StringIO()
    bar = TransferBar(stream=plain, label="drain")
    bar.start(4, 4096)
    bar.advance(4, nbytes=4096)
    bar.finish()
    assert plain.getvalue() == ""


def test_verify_steps_show_as_a_bar_on_a_terminal_and_as_lines_when_piped() -> None:
    tty = Tty()
    bar = StepBar("verify", stream=tty)
    bar.show("hashing", 5, 10)
    bar.close()
    assert "verify: hashing" in tty.getvalue() and "5/10" in tty.getvalue()
    plain = io.StringIO()
    bar = StepBar("verify", stream=plain, plain_every_s=3600)
    bar.show("listing", 1, 0)
    bar.show("hashing", 5, 10)  # within the interval: no second line
    bar.close()
    assert plain.getvalue().startswith("verify: listing 1  ") and plain.getvalue().count("\n") == 1


def test_tables_are_plain_when_piped_and_framed_on_a_terminal() -> None:
    rows = [{"id": "batch_1", "n": 3, "at": None, "ok": True}, {"id": "b_22", "n": 12, "at": None, "ok": False}]
    columns = [("id", "BATCH"), ("n", "COUNT"), ("at", "SEALED"), ("ok", "OK")]
    assert table(rows, columns, io.StringIO(), right=("n",)) == (
        "BATCH    COUNT  SEALED  OK\n"
        "batch_1      3  -       yes\n"
        "b_22        12  -       no"
    )
    assert fields([("source", "http://127.0.0.1:8080"), ("last error", "-")], io.StringIO()) == (
        "source      http://127.0.0.1:8080\nlast error  -")
    framed = table(rows, columns, Tty())
    assert "\x1b[1m" in framed and "─" in framed and "batch_1" in framed  # bold heading, a rule under it


def test_progress_bar_notes_and_byte_counts() -> None:
    out = io.StringIO()
    bar = TransferBar(stream=out, label="drain")
    bar.start(2, 3000)
    bar.advance(nbytes=1000)
    bar.advance(nbytes=-1000)  # a transfer that failed half-way and will be retried
    bar.advance(images=1, nbytes=1500)
    bar.note("batch_1: drained")
    bar.finish()
    assert out.getvalue() == "batch_1: drained\n"  # not a terminal: notes only, no bar
    assert bar.done == 1 and bar.nbytes == 1500
    quiet = io.StringIO()
    silent = TransferBar(stream=quiet, enabled=False)
    silent.note("nothing")
    assert quiet.getvalue() == ""
