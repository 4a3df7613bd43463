"""The forward cache on real files: copies are used only whole and as recorded, stay within their
cap and the disk floor, and go when dropped, cleared or left by an earlier run."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import xxhash

from gateway.forward.cache import MAX_IMAGE_BYTES, ForwardCache


def h(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def opened(folder: Path, max_bytes: int = 1 << 30, disk_floor: int = 0) -> ForwardCache:
    cache = ForwardCache(folder, max_bytes, disk_floor)
    cache.open()
    return cache


def settle(cache: ForwardCache, count: int) -> None:
    """Wait for the writer thread to index `count` copies."""
    deadline = time.monotonic() + 10
    while cache.count < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert cache.count == count


def test_an_offered_copy_is_written_and_read_back_once_whole(tmp_path: Path) -> None:
    cache = opened(tmp_path / "c")
    data = b"\xff\xd8\xff" + bytes(range(256)) * 400
    assert cache.offer("img_1", data)
    settle(cache, 1)
    assert (tmp_path / "c" / "img_1").read_bytes() == data
    assert cache.size == len(data)
    assert cache.read("img_1", len(data), h(data)) == data
    assert (cache.hits, cache.misses) == (1, 0)
    cache.drop("img_1")
    cache.close()  # the file goes in the cache's thread
    assert not (tmp_path / "c" / "img_1").exists() and cache.size == 0 and cache.count == 0
    assert cache.read("img_1", len(data), h(data)) is None
    assert cache.misses == 1
    cache.close()


def test_a_copy_that_is_not_as_recorded_is_never_used_and_goes(tmp_path: Path) -> None:
    cache = opened(tmp_path / "c")
    data = b"\x89PNG\r\n\x1a\n" + b"x" * 5000
    for name in ("flipped", "short", "long"):
        cache.offer(name, data)
    settle(cache, 3)
    flipped = bytearray(data)
    flipped[100] ^= 1
    (tmp_path / "c" / "flipped").write_bytes(bytes(flipped))  # same size, other bytes
    (tmp_path / "c" / "short").write_bytes(data[:-1])
    (tmp_path / "c" / "long").write_bytes(data + b"!")
    for name in ("flipped", "short", "long"):
        assert cache.read(name, len(data), h(data)) is None, name
    cache.close()
    for name in ("flipped", "short", "long"):
        assert not (tmp_path / "c" / name).exists()
    assert cache.count == 0 and cache.size == 0 and cache.misses == 3
    cache.offer("gone", data)
    settle(cache, 1)
    (tmp_path / "c" / "gone").unlink()  # removed behind the cache's back
    assert cache.read("gone", len(data), h(data)) is None and cache.count == 0
    cache.close()


def test_the_cap_and_the_disk_floor_bound_what_is_kept(tmp_path: Path) -> None:
    data = b"\xff\xd8\xff" + b"a" * 997
    capped = opened(tmp_path / "capped", max_bytes=3 * len(data))
    taken = [capped.offer(f"img_{i}", data) for i in range(5)]
    assert taken == [True, True, True, False, False]  # offers beyond the cap are refused at once
    settle(capped, 3)
    capped.drop("img_0")
    capped.close()  # its room is given back once the file is gone
    assert capped.offer("img_5", data)
    settle(capped, 3)
    assert capped.size == 3 * len(data)
    assert not capped.offer("big", b"\xff\xd8\xff" + bytes(MAX_IMAGE_BYTES))  # larger images: read from the store
    capped.close()

    floor = shutil.disk_usage(tmp_path).total  # the disk is always below this floor
    floored = opened(tmp_path / "floored", disk_floor=floor)
    assert floored.offer("img_0", data)  # taken for the writer, which then checks the disk
    spool = tmp_path / "spool.part"
    spool.write_bytes(data)
    assert not floored.adopt("img_1", spool, len(data))
    floored.close()  # the writer has run its queue
    assert floored.count == 0 and floored.size == 0 and list((tmp_path / "floored").iterdir()) == []
    assert spool.exists()  # not taken: left to the caller


def test_a_spool_file_is_moved_in_and_a_copy_dropped_while_queued_is_not_kept(tmp_path: Path) -> None:
    cache = opened(tmp_path / "c")
    data = b"\xff\xd8\xff" + b"s" * 3000
    spool = tmp_path / "abc.part"
    spool.write_bytes(data)
    assert cache.adopt("img_a", spool, len(data))
    assert not spool.exists() and cache.read("img_a", len(data), h(data)) == data
    many = [(f"img_{i}", b"\xff\xd8\xff" + bytes([i]) * 200_000) for i in range(40)]
    for name, blob in many:
        cache.offer(name, blob)
    for name, _ in many:
        cache.drop(name)  # most are dropped before the writer gets to them
    cache.close()
    assert cache.count == 1 and cache.size == len(data)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["img_a"]


def test_open_empties_what_an_earlier_run_left_and_clear_frees_everything(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "img_old").write_bytes(b"\xff\xd8\xffold")
    (folder / "img_half.tmp").write_bytes(b"\xff")
    cache = opened(folder)
    assert list(folder.iterdir()) == [] and cache.count == 0
    data = b"\xff\xd8\xff" + b"c" * 1000
    for i in range(4):
        cache.offer(f"img_{i}", data)
    settle(cache, 4)
    assert cache.clear() == 4 * len(data)
    assert cache.count == 0 and cache.size == 0 and list(folder.iterdir()) == []
    cache.close()


def test_read_from_memory_gives_only_a_whole_good_copy_the_kernel_holds(tmp_path: Path) -> None:
    """The event loop's read: a copy in the page cache comes back (a hit); a copy that is not as
    recorded, missing, or out of memory gives None with nothing counted or dropped, for `read`."""
    cache = opened(tmp_path / "c")
    data = b"\xff\xd8\xff" + os.urandom(300_000)
    for name in ("warm", "cold", "flipped"):
        cache.offer(name, data)
    settle(cache, 3)
    assert bytes(cache.read_from_memory("warm", len(data), h(data)) or b"") == data
    assert (cache.hits, cache.misses) == (1, 0)
    flipped = bytearray(data)
    flipped[1000] ^= 1
    (tmp_path / "c" / "flipped").write_bytes(bytes(flipped))
    assert cache.read_from_memory("flipped", len(data), h(data)) is None
    assert cache.read_from_memory("nothing", len(data), h(data)) is None
    assert cache.read_from_memory("warm", len(data) + 1, h(data)) is None  # not the recorded size
    assert (cache.hits, cache.misses, cache.count) == (1, 0, 3)
    # Out of memory: written back to the disk and dropped from the page cache.
    fd = os.open(tmp_path / "c" / "cold", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert cache.read_from_memory("cold", len(data), h(data)) is None
    assert cache.read("cold", len(data), h(data)) == data  # the thread's read takes it from the disk
    assert cache.read("flipped", len(data), h(data)) is None  # and drops the bad copy, counting it
    assert (cache.hits, cache.misses, cache.count) == (2, 1, 2)
    cache.close()
