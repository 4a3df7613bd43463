"""The catalog journal's file: whole frames survive, a torn or corrupt tail ends it, reset empties it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.catalog.journal import Journal, JournalDamaged, frame, parse
from gateway.catalog.records import Frame, ImageAccepted, OutboxDelivered, write


def _entry(n: int) -> Frame:
    return write([ImageAccepted(image_id=f"img_{n}", seq=n, batch_id="b", device_id="d", filename="f.jpg",
                                content_type="image/jpeg", size=n, xxh3_128=f"{n:032x}", storage_key=f"k{n}",
                                metadata=b"\x00\xff" * n, received_at=1.0, fingerprint=None, near_duplicate_of=None,
                                outbox_state="pending"),
                  OutboxDelivered(image_id=f"img_{n}", at=2.0, status=201)])


def test_frames_round_trip(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    assert j.open() == []
    j.append([frame(_entry(1)), frame(_entry(2))])
    j.append([frame(_entry(3))])
    j.close()
    again = Journal(tmp_path / "j")
    assert again.open() == [_entry(1), _entry(2), _entry(3)]
    assert again.size == (tmp_path / "j").stat().st_size


def test_a_torn_tail_is_dropped_and_new_frames_follow_the_last_whole_one(tmp_path: Path) -> None:
    path = tmp_path / "j"
    whole = frame(_entry(1)) + frame(_entry(2))
    path.write_bytes(whole + frame(_entry(3))[:-5])  # the write of entry 3 never returned
    j = Journal(path)
    assert j.open() == [_entry(1), _entry(2)]
    assert path.stat().st_size == len(whole)
    j.append([frame(_entry(4))])
    j.close()
    assert Journal(path).open() == [_entry(1), _entry(2), _entry(4)]


def test_a_corrupt_frame_ends_the_journal() -> None:
    one, two = frame(_entry(1)), bytearray(frame(_entry(2)))
    two[-1] ^= 0xFF  # a flipped bit in the body: the CRC does not match
    entries, good = parse(one + bytes(two) + frame(_entry(3)))
    assert entries == [_entry(1)] and good == len(one)
    assert parse(b"\x00\x00") == ([], 0)  # shorter than a header


def test_reset_empties_the_file(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.open()
    j.append([frame(_entry(1))])
    j.reset()
    assert (tmp_path / "j").stat().st_size == 0 and j.size == 0
    j.append([frame(_entry(2))])
    j.close()
    assert Journal(tmp_path / "j").open() == [_entry(2)]


# Issue 23, item 4: only a torn tail is cut. Five records, one byte flipped in the first: open()
# used to return no entry after it and cut the file from 105 to 21 bytes, silently.
def test_a_damaged_record_followed_by_whole_ones_stops_the_open_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "j"
    frames = [frame(_entry(n)) for n in range(1, 6)]
    data = bytearray(b"".join(frames))
    data[len(frames[0]) // 2] ^= 0x01  # one byte flipped in the first record's body
    path.write_bytes(bytes(data))
    j = Journal(path)
    with pytest.raises(JournalDamaged) as info:
        j.open()
    j.close()
    assert info.value.offset == 0 and info.value.path == path
    assert str(path) in str(info.value) and "byte 0" in str(info.value)
    assert path.read_bytes() == bytes(data)  # byte for byte
    assert list(tmp_path.iterdir()) == [path]


def test_a_damaged_length_field_mid_file_is_found_too(tmp_path: Path) -> None:
    path = tmp_path / "j"
    frames = [frame(_entry(n)) for n in range(1, 6)]
    data = bytearray(b"".join(frames))
    at = len(frames[0]) + len(frames[1])
    data[at + 1] ^= 0x40  # the third record's length now points past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(JournalDamaged) as info:
        Journal(path).open()
    assert info.value.offset == at and path.read_bytes() == bytes(data)


def test_a_torn_tail_is_kept_aside_beside_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    whole = frame(_entry(1)) + frame(_entry(2))
    torn = frame(_entry(3))[:-5]
    path.write_bytes(whole + torn)
    assert Journal(path).open() == [_entry(1), _entry(2)]
    assert path.read_bytes() == whole
    (aside,) = [p for p in tmp_path.iterdir() if p != path]
    assert aside.name.startswith("j.torn-") and aside.read_bytes() == torn
