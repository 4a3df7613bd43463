"""Perceptual fingerprints of frames, for near-duplicate detection (`gateway.ingest.neardup`).

A fingerprint is a 64-bit difference hash (dHash) of a 9x8 grayscale thumbnail, stored in the
catalog, plus a grayscale region image (short side 240-479 px) kept in memory for a pixel-level
comparison: a global hash cannot see a scratch a few pixels wide, the region image can. JPEGs
are decoded at 1/2, 1/4 or 1/8 scale by libjpeg-turbo's DCT scaling (Pillow's `draft`), luma
only. CPU-bound: call `fingerprint` and `region_difference` from a worker thread.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops

log = logging.getLogger("gateway.ingest.fingerprint")
REGION_SIDE = 240  # the region image's short side is at least this (and under twice this)
MAX_FULL_DECODE_PIXELS = 40_000_000  # frames that would decode to more pixels are not fingerprinted


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A frame's dHash and region image, with the image's 3x3 local minimum and maximum computed
    once (one frame is compared with several others)."""

    dhash: int
    width: int
    height: int
    region: Image.Image  # the region image less a 1-px border
    low: Image.Image  # 3x3 minimum of the region image, same size as `region`
    high: Image.Image  # 3x3 maximum


def fingerprint(source: bytes | Path) -> Fingerprint | None:
    """The frame's fingerprint, or None when it cannot be decoded (it is then stored without one)."""
    try:
        return _fingerprint(source)
    except Exception as exc:  # any decode failure: truncated, corrupt, odd formats, bombs
        log.debug("no fingerprint: %s", exc)
        return None


def _fingerprint(source: bytes | Path) -> Fingerprint | None:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        width, height = im.size
        short = min(width, height)
        if short < 8:
            return None
        # Memory stays bounded: a JPEG decodes at 1/8 scale or less, anything else whole.
        if width * height // (64 if im.format == "JPEG" else 1) > MAX_FULL_DECODE_PIXELS:
            return None
        if im.format == "JPEG":  # DCT scaling: the smallest of 1/1..1/8 still >= REGION_SIDE
            im.draft("L", (max(1, width * REGION_SIDE // short), max(1, height * REGION_SIDE // short)))
        gray = im.convert("L")
    factor = min(gray.size) // REGION_SIDE
    if factor > 1:
        gray = gray.reduce(factor)
    low, high, core = _local_range(gray)
    small = gray.resize((9, 8), Image.Resampling.BOX).tobytes()
    bits = 0
    for i in range(72):
        if i % 9 != 8:  # bit set where a pixel is brighter than its right neighbour
            bits = (bits << 1) | (small[i] > small[i + 1])
    return Fingerprint(dhash=bits, width=width, height=height, region=core, low=low, high=high)


def _local_range(gray: Image.Image) -> tuple[Image.Image, Image.Image, Image.Image]:
    """3x3 minimum and maximum of every inner pixel, and the inner pixels themselves (the 1-px
    border goes: a camera's jitter brings new content in there). A 3x3 minimum is the minimum of
    three row minima of 3x1, so each takes four operations, not eight."""
    w, h = gray.size
    core = gray.crop((1, 1, w - 1, h - 1))
    rows = [gray.crop((dx, 0, dx + w - 2, h)) for dx in range(3)]  # the 3 horizontal neighbours
    row_low = ImageChops.darker(ImageChops.darker(rows[0], rows[1]), rows[2])
    row_high = ImageChops.lighter(ImageChops.lighter(rows[0], rows[1]), rows[2])
    low, high = (_column_fold(img, h, fold) for img, fold in ((row_low, ImageChops.darker),
                                                              (row_high, ImageChops.lighter)))
    return low, high, core


def _column_fold(img: Image.Image, h: int, fold: Callable[[Image.Image, Image.Image], Image.Image]
                 ) -> Image.Image:
    """`fold` of each pixel's vertical 3x1 neighbourhood (one row shorter at the top and bottom)."""
    w = img.size[0]
    up, mid, down = (img.crop((0, dy, w, dy + h - 2)) for dy in range(3))
    return fold(fold(up, mid), down)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def region_difference(a: Fingerprint, b: Fingerprint) -> int | None:
    """The largest local difference between two frames in gray levels (0-255), or None when their
    sizes differ: each pixel is compared with the range of the other frame's 3x3 neighbourhood
    (a shift of a pixel or two costs nothing), both ways."""
    if (a.width, a.height) != (b.width, b.height) or a.region.size != b.region.size:
        return None
    excess = ImageChops.lighter(
        ImageChops.lighter(ImageChops.subtract(a.region, b.high), ImageChops.subtract(b.low, a.region)),
        ImageChops.lighter(ImageChops.subtract(b.region, a.high), ImageChops.subtract(a.low, b.region)),
    )
    high = excess.getextrema()[1]
    assert isinstance(high, int)  # an "L" image's extrema are ints
    return high


def regions_within(a: Fingerprint, b: Fingerprint, limit: int) -> bool:
    """Whether `region_difference(a, b) <= limit`, checked the cheap way first: no pixel's local
    difference exceeds its plain difference (each range holds the pixel itself), so frames whose
    pixels differ by at most `limit` everywhere pass after one comparison instead of seven (the
    common case: sensor noise on a still scene). Only the others pay for the 3x3 ranges."""
    if (a.width, a.height) != (b.width, b.height) or a.region.size != b.region.size:
        return False
    plain = ImageChops.difference(a.region, b.region).getextrema()[1]
    assert isinstance(plain, int)  # an "L" image's extrema are ints
    if plain <= limit:
        return True
    diff = region_difference(a, b)
    return diff is not None and diff <= limit
