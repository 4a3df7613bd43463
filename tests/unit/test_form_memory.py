"""Small images kept in memory instead of the spool file (object-store backends): the bytes, the
intent file, the spill to disk, and the memory budget given back on every path."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import xxhash

from gateway.errors import PayloadTooLarge, UnsupportedMediaType
from gateway.ingest.form import MemoryBudget, read_upload_form

B = b"memb0undary"


def _body(image: bytes) -> bytes:
    return (b"--" + B + b'\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--" + B + b"--\r\n")


async def _chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _read(tmp_path: Path, image: bytes, budget: MemoryBudget, max_image: int = 1 << 20):
    return asyncio.run(read_upload_form(_chunks(_body(image)), B, tmp_path / "u.part", max_image_bytes=max_image,
                                        max_metadata_bytes=1024, memory=budget))


def _jpeg(n: int) -> bytes:
    return b"\xff\xd8\xff" + os.urandom(n - 3)


def test_a_small_image_stays_in_memory_and_its_intent_file_stays_empty(tmp_path: Path) -> None:
    budget = MemoryBudget(total=1 << 20, per_upload=64 * 1024)
    image = _jpeg(50_000)
    form = _read(tmp_path, image, budget)
    assert form.image.data == image and form.image.size == len(image)
    assert form.image.xxh3_128 == xxhash.xxh3_128(image).hexdigest()
    assert (tmp_path / "u.part").read_bytes() == b""  # the intent record, without the bytes
    assert budget.used == form.image.held == len(image)
    budget.give_back(form.image.held)
    assert budget.used == 0


@pytest.mark.parametrize("budget", [MemoryBudget(total=1 << 20, per_upload=64 * 1024),  # too big for one upload
                                    MemoryBudget(total=30_000, per_upload=1 << 20)])  # the budget runs out
def test_a_bigger_image_spills_to_the_file_whole(tmp_path: Path, budget: MemoryBudget) -> None:
    image = _jpeg(100_000)
    form = _read(tmp_path, image, budget)
    assert form.image.data is None and form.image.held == 0
    assert (tmp_path / "u.part").read_bytes() == image
    assert budget.used == 0


@pytest.mark.parametrize(("image", "limit", "error"), [
    (_jpeg(3000), 2000, PayloadTooLarge),  # refused mid-image, with 2000 bytes already held
    (b"GIF89a" + bytes(3000), 1 << 20, UnsupportedMediaType),
])
def test_a_refused_image_gives_its_memory_back(tmp_path: Path, image: bytes, limit: int,
                                              error: type[Exception]) -> None:
    budget = MemoryBudget(total=1 << 20, per_upload=1 << 20)
    with pytest.raises(error):
        _read(tmp_path, image, budget, max_image=limit)
    assert budget.used == 0
