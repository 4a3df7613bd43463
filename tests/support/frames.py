"""A labelled set of synthetic camera frames for near-duplicate detection, generated (no downloads).

A scene is a textured part on a conveyor background, drawn with Pillow. A near-duplicate pair is
the same scene captured twice: fresh sensor noise, a shift of up to 2 px, JPEG re-encoding at
different qualities. A change pair differs in the scene itself: the part moved, a part appeared,
or a defect mark (a scratch a few pixels wide) was added.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field, replace
from statistics import NormalDist

from PIL import Image, ImageChops, ImageDraw

WIDTH, HEIGHT = 1024, 768
MARGIN = 4  # drawn around the frame so that a shifted capture has real content at its edges


@dataclass(frozen=True)
class Scene:
    seed: int
    parts: tuple[tuple[int, int], ...]  # top-left corners of the parts on the belt
    scratches: tuple[tuple[int, int, int, int, int, int], ...] = field(default=())  # x0, y0, x1, y1, width, delta


def draw(scene: Scene) -> Image.Image:
    """The scene without noise, MARGIN px larger on every side."""
    rng = random.Random(scene.seed)
    w, h = WIDTH + 2 * MARGIN, HEIGHT + 2 * MARGIN
    im = Image.new("RGB", (w, h), (64, 66, 70))
    d = ImageDraw.Draw(im)
    for y in range(0, h, 24):  # belt slats
        d.rectangle((0, y, w, y + 3), fill=(84, 86, 90))
    for _ in range(400):  # belt wear and dirt
        x, y = rng.randrange(w), rng.randrange(h)
        g = rng.randrange(40, 110)
        d.rectangle((x, y, x + rng.randrange(2, 14), y + rng.randrange(1, 5)), fill=(g, g, g + 4))
    part_rng = random.Random(scene.seed * 7919 + 1)
    for px, py in scene.parts:
        _part(d, px + MARGIN, py + MARGIN, part_rng)
    for x0, y0, x1, y1, width, delta in scene.scratches:
        g = max(0, min(255, 176 + delta))
        d.line((x0 + MARGIN, y0 + MARGIN, x1 + MARGIN, y1 + MARGIN), fill=(g, g, g), width=width)
    return im


def _part(d: ImageDraw.ImageDraw, x: int, y: int, rng: random.Random) -> None:
    d.rounded_rectangle((x, y, x + 260, y + 180), radius=18, fill=(176, 176, 172), outline=(120, 120, 118), width=3)
    for i in range(6, 170, 6):  # machining marks
        g = 166 + rng.randrange(-6, 7)
        d.line((x + 10, y + i, x + 250, y + i), fill=(g, g, g - 2), width=1)
    for hx, hy in ((40, 40), (220, 40), (40, 140), (220, 140)):  # holes
        d.ellipse((x + hx - 14, y + hy - 14, x + hx + 14, y + hy + 14), fill=(30, 30, 32))
    d.rectangle((x + 100, y + 70, x + 160, y + 110), fill=(140, 140, 150))  # a label


def capture(scene_image: Image.Image, seed: int, *, shift: tuple[int, int], sigma: float, quality: int) -> bytes:
    """One JPEG frame of a drawn scene: shifted by up to MARGIN px, with Gaussian sensor noise."""
    dx, dy = shift
    frame = scene_image.crop((MARGIN + dx, MARGIN + dy, MARGIN + dx + WIDTH, MARGIN + dy + HEIGHT))
    if sigma > 0:
        frame = ImageChops.add(frame, _noise(random.Random(seed), sigma), scale=1.0, offset=-128)
    out = io.BytesIO()
    frame.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _noise(rng: random.Random, sigma: float) -> Image.Image:
    """Gaussian noise around 128: uniform random bytes mapped through the normal quantile function
    (Pillow's own `effect_noise` is 20x slower at this size)."""
    dist = NormalDist(128.0, sigma)
    lut = [max(0, min(255, round(dist.inv_cdf((i + 0.5) / 256)))) for i in range(256)] * 3
    return Image.frombytes("RGB", (WIDTH, HEIGHT), rng.randbytes(WIDTH * HEIGHT * 3)).point(lut)


@dataclass(frozen=True)
class Pair:
    earlier: bytes
    later: bytes
    near_duplicate: bool  # the label: True when only noise, jitter or encoding differ
    kind: str


def _two_captures(first: Image.Image, second: Image.Image, rng: random.Random) -> tuple[bytes, bytes]:
    """Two frames shifted against each other by up to 2 px on each axis (camera jitter)."""
    shifts = [(rng.randint(-1, 1), rng.randint(-1, 1))]
    shifts.append((shifts[0][0] + rng.randint(-1, 1), shifts[0][1] + rng.randint(-1, 1)))
    frames = [capture(img, rng.randrange(1 << 30), shift=shift, sigma=rng.uniform(2.0, 6.0),
                      quality=rng.choice((60, 70, 80, 90, 95)))
              for img, shift in zip((first, second), shifts, strict=True)]
    return frames[0], frames[1]


def _scratch(rng: random.Random, part: tuple[int, int]) -> tuple[int, int, int, int, int, int]:
    px, py = part
    length, angle = rng.randint(30, 80), rng.uniform(0, math.pi)
    x0, y0 = px + rng.randint(60, 180), py + rng.randint(50, 130)
    x1, y1 = x0 + int(length * math.cos(angle)), y0 + int(length * math.sin(angle))
    return (x0, y0, x1, y1, rng.randint(2, 4), rng.choice((-1, 1)) * rng.randint(50, 100))


def labelled_pairs(count: int = 40, seed: int = 19) -> list[Pair]:
    """`count` near-duplicate pairs and `count` change pairs (moved, appeared, scratched in turn)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        part = (rng.randint(60, WIDTH - 360), rng.randint(60, HEIGHT - 280))
        base = Scene(seed=1000 + i, parts=(part,))
        img = draw(base)
        pairs.append(Pair(*_two_captures(img, img, rng), True, "noise+shift+jpeg"))
        kind = ("moved", "appeared", "scratch")[i % 3]
        if kind == "moved":
            step = rng.randint(12, 60)
            dx, dy = rng.choice(((step, 0), (-step, 0), (0, step), (0, -step)))
            changed = replace(base, parts=((part[0] + dx, part[1] + dy),))
        elif kind == "appeared":
            first = Scene(seed=base.seed, parts=())
            img = draw(first)
            changed = base
        else:
            changed = replace(base, scratches=(_scratch(rng, part),))
        pairs.append(Pair(*_two_captures(img, draw(changed), rng), False, kind))
    return pairs


def scores(pairs: list[Pair]) -> list[tuple[Pair, int, int | None]]:
    """Each pair with its difference-hash distance and region difference."""
    from gateway.ingest.fingerprint import fingerprint, hamming, region_difference

    out = []
    for p in pairs:
        a, b = fingerprint(p.earlier), fingerprint(p.later)
        assert a is not None and b is not None
        out.append((p, hamming(a.dhash, b.dhash), region_difference(a, b)))
    return out


def precision_recall(scored: list[tuple[Pair, int, int | None]], max_distance: int,
                     max_region: int) -> tuple[float, float]:
    """Of the pairs called near-duplicates, the share that are (precision); of the near-duplicates,
    the share called so (recall)."""
    called = [p.near_duplicate for p, d, r in scored if d <= max_distance and r is not None and r <= max_region]
    true_pos = sum(called)
    positives = sum(p.near_duplicate for p, _, _ in scored)
    return (true_pos / len(called) if called else 1.0), (true_pos / positives if positives else 1.0)


if __name__ == "__main__":  # the threshold sweep in docs/design.md: python -m tests.support.frames [COUNT]
    import sys

    scored = scores(labelled_pairs(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
    for kind in ("noise+shift+jpeg", "moved", "appeared", "scratch"):
        dist = sorted(d for p, d, _ in scored if p.kind == kind)
        region = sorted(r or 0 for p, _, r in scored if p.kind == kind)
        print(f"{kind:18} dhash {dist[0]}..{dist[-1]}  region {region[0]}..{region[-1]}")
    for max_distance in (6, 8, 10, 12, 14, 16, 64):
        row = []
        for max_region in (20, 24, 26, 28, 30, 32, 36, 40):
            p, r = precision_recall(scored, max_distance, max_region)
            row.append(f"{max_region}:{p:.3f}/{r:.3f}")
        print(f"dhash<={max_distance:2}  " + "  ".join(row))
