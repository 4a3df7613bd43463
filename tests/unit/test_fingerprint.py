"""Near-duplicate fingerprints on a labelled set of generated frames (tests/support/frames.py):
the default thresholds must keep precision and recall at or above 0.95, and never call a
scratched part, a moved part or a new part a near-duplicate of the frame before."""

from __future__ import annotations

import io
import random
import secrets
import struct
import zlib

import pytest
from PIL import Image, ImageChops

from gateway.config import DedupSettings
from gateway.ingest.fingerprint import _local_range, fingerprint, region_difference, regions_within
from gateway.ingest.neardup import has_annotations
from tests.conftest import png_bytes
from tests.support.frames import Pair, labelled_pairs, precision_recall, scores


@pytest.fixture(scope="module")
def scored() -> list[tuple[Pair, int, int | None]]:
    return scores(labelled_pairs(40))


def test_default_thresholds_keep_precision_and_recall_at_095(scored: list[tuple[Pair, int, int | None]]) -> None:
    defaults = DedupSettings()
    precision, recall = precision_recall(scored, defaults.near_max_distance, defaults.near_max_region_diff)
    print(f"precision {precision:.3f} recall {recall:.3f} on {len(scored)} pairs")
    assert precision >= 0.95
    assert recall >= 0.95


def test_no_change_is_swallowed(scored: list[tuple[Pair, int, int | None]]) -> None:
    defaults = DedupSettings()
    swallowed = [p.kind for p, d, r in scored if not p.near_duplicate and d <= defaults.near_max_distance
                 and r is not None and r <= defaults.near_max_region_diff]
    assert swallowed == []


def test_undecodable_frames_get_no_fingerprint() -> None:
    assert fingerprint(b"\xff\xd8\xff\xe0" + secrets.token_bytes(100_000)) is None  # JPEG magic, random bytes
    good = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 90, 90)).save(good, "JPEG")
    assert fingerprint(good.getvalue()) is not None
    assert fingerprint(good.getvalue()[: len(good.getvalue()) // 2]) is None  # truncated


def test_a_png_too_large_to_decode_whole_is_not_decoded() -> None:
    header = png_bytes()  # 1x1; its IHDR is made to claim 9000x9000 (81 Mpx) with a matching CRC
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)
    bomb = header[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + header[33:]
    assert fingerprint(bomb) is None


def test_png_frames_are_fingerprinted_and_sizes_must_match() -> None:
    def png(size: tuple[int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("L", size, 120).save(out, "PNG")
        return out.getvalue()

    a, b, c = fingerprint(png((640, 480))), fingerprint(png((640, 480))), fingerprint(png((800, 600)))
    assert a is not None and b is not None and c is not None
    assert region_difference(a, b) == 0
    assert region_difference(a, c) is None  # another camera size is never a near-duplicate


def test_annotations_are_recognised() -> None:
    assert has_annotations(b'{"annotations": [{"class_value": "x", "type": "bbox", "geometry": [0.5, 0.5, 0.1, 0.1]}]}')
    assert not has_annotations(b'{"annotations": []}')
    assert not has_annotations(b'{"model_id": "m"}')
    assert not has_annotations(None)


def test_local_range_is_the_3x3_minimum_and_maximum() -> None:
    """The separable minimum and maximum (rows, then columns) equal the 3x3 ones, pixel by pixel."""
    rng = random.Random(5)
    for width, height in ((9, 8), (31, 17), (64, 3)):
        gray = Image.frombytes("L", (width, height), bytes(rng.randrange(256) for _ in range(width * height)))
        low, high, core = _local_range(gray)
        px = gray.load()
        assert px is not None
        for y in range(1, height - 1):
            for x in range(1, width - 1):
                around = [px[x + dx, y + dy] for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
                assert low.getpixel((x - 1, y - 1)) == min(around)
                assert high.getpixel((x - 1, y - 1)) == max(around)
                assert core.getpixel((x - 1, y - 1)) == px[x, y]


def test_the_quick_region_check_decides_as_the_full_one() -> None:
    """`regions_within` takes a short cut for frames whose pixels barely differ; on the labelled
    pairs and at every threshold it must call exactly the pairs the full comparison calls."""
    pairs = labelled_pairs(12, seed=23)
    prints = [(fingerprint(p.earlier), fingerprint(p.later)) for p in pairs]
    short_cuts = 0
    for a, b in prints:
        assert a is not None and b is not None
        full = region_difference(a, b)
        assert full is not None
        for limit in (0, 10, 20, 30, 40, 60, 255):
            assert regions_within(a, b, limit) == (full <= limit), (limit, full)
        plain = ImageChops.difference(a.region, b.region).getextrema()[1]
        short_cuts += isinstance(plain, int) and plain <= 30
    assert short_cuts > 0, "the short cut is never taken on these pairs: it tests nothing"
