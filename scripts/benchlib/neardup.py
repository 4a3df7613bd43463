"""`scripts/bench --only neardup`: ingest with the near-duplicate filter on (`keep`) and off, with
real decodable JPEGs, against the direct S3 PUT of the same bytes, in rounds whose order rotates."""

from __future__ import annotations

import functools
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from scripts.benchlib.load import Round, multipart_upload, s3_put
from tests.support.frames import Scene, capture, draw
from tests.support.gateway_proc import GatewayProcess, s3_env
from tests.support.s3server import S3Server

KiB, MiB = 1024, 1024 * 1024
UPLOAD = "/api/device/images/upload"
ROUNDS = 4  # rounds per size in a full run (one in --quick)
# Requests per round in a full run, by frame size: about 4-5 s a gateway round on 2 cores (rounds
# of 1-2 s gave per-round drops anywhere from -0.2 to +0.35 at 1 MiB).
REQUESTS = {100 * KiB: 1200, 1 * MiB: 480, 5 * MiB: 120}
ORDER = ["off", "keep", "s3"]
STEADY_SHARE = 0.25  # the steady round's rate, of the best rate with the filter off
BUSIER_SHARE = 0.6  # a busier steady round's (full runs only)
STEADY_S = 6.0  # ...and their length
FRAME_COUNT = 6  # distinct frames sent in turn (each with a fresh comment, so exact dedup lets all in)
# Frame sizes (pixels, JPEG quality, sensor noise) whose JPEGs come near 100 KiB, 1 MiB and 5 MiB.
FRAMES = {100 * KiB: (1024, 768, 88, 3.0), 1 * MiB: (2048, 1536, 95, 6.0), 5 * MiB: (4096, 3072, 95, 8.0)}


def real_jpeg(target: int, seed: int = 0, shift: tuple[int, int] = (0, 0)) -> bytes:
    """A camera-like JPEG frame of roughly `target` bytes (the synthetic scene of the tests), with
    its own sensor noise (`seed`) and position (`shift`, in pixels)."""
    from tests.support import frames

    width, height, quality, sigma = FRAMES[target]
    frames.WIDTH, frames.HEIGHT = width, height  # the generator draws at the module's frame size
    try:
        scene = draw(Scene(seed=7, parts=((width // 4, height // 4),)))
        return capture(scene, seed or random.randrange(1 << 30), shift=shift, sigma=sigma, quality=quality)
    finally:
        frames.WIDTH, frames.HEIGHT = 1024, 768


def camera_frames(target: int, count: int = FRAME_COUNT) -> list[bytes]:
    """`count` frames of one still scene as a camera on a vibrating line sends them: fresh noise
    and a jitter of a pixel each, so each is a near-duplicate of the first, and the filter does
    all of its work (a frame with the same pixels would pass its cheap first check)."""
    shifts = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)]
    return [real_jpeg(target, seed=1 + i, shift=shifts[i % len(shifts)]) for i in range(count)]


def fingerprint_figures(url: str) -> tuple[float, float, float]:
    """(fingerprints done, frames left unchecked for want of CPU, fingerprint CPU seconds) from /metrics."""
    done = busy = cpu = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith('acusight_gateway_fingerprints_total{result="done"}'):
            done = float(line.split()[-1])
        elif line.startswith(('acusight_gateway_fingerprints_total{result="busy"}',
                              'acusight_gateway_fingerprints_total{result="no_idle_cpu"}')):
            busy += float(line.split()[-1])
        elif line.startswith("acusight_gateway_fingerprint_cpu_seconds_total "):
            cpu = float(line.split()[-1])
    return done, busy, cpu


def fingerprint_summary(done: float, unchecked: float, cpu: float) -> dict[str, float | None]:
    """CPU milliseconds per fingerprint, and the share of frames fingerprinted, from counts."""
    return {"fingerprint_cpu_ms": round(1000 * cpu / done, 2) if done else None,
            "fingerprinted_share": round(done / (done + unchecked), 3) if done + unchecked else None}


def steady_round(metered: Callable[..., Round], gw: GatewayProcess, key: str, shots: list[bytes], rate: float,
                 conc: int) -> dict[str, Any]:
    """Uploads at a steady `rate` to the gateway with the filter on: the rate reached, the share of
    frames fingerprinted, the CPU per fingerprint and the gateway's CPU per upload."""
    time.sleep(1.5)  # the filter's idle-CPU figure covers the last second: not a saturated round's
    before = fingerprint_figures(gw.url)
    r = metered({"gateway": gw.pid}, None, functools.partial(multipart_upload, jpeg=shots, rate=rate),
                gw.port, UPLOAD, key, len(shots[0]), conc, max(20, int(rate * STEADY_S)))
    done, unchecked, cpu = (a - b for a, b in zip(fingerprint_figures(gw.url), before, strict=True))
    return {"rps": round(r.rps, 1), **fingerprint_summary(done, unchecked, cpu),
            "gateway_cpu_ms_per_request": r.cpu.get("gateway")}


def neardup_section(s3: S3Server, work: Path, quick: bool, metered: Callable[..., Round],
                    requests_for: Callable[[int, int, bool], int]) -> list[dict[str, Any]]:
    gws = {mode: GatewayProcess(work / f"gw-nd-{mode}", s3_env(s3) | {"GATEWAY_DEDUP_NEAR_DUPLICATES": mode}).start()
           for mode in ("off", "keep")}
    keys = {mode: gw.add_device(f"bench-nd-{mode}")[1] for mode, gw in gws.items()}
    rows = []
    rounds = 1 if quick else ROUNDS
    try:
        # Warm-up, not measured: the direct bucket is created (a first round paid for it: a third
        # of the direct rate in a one-round --quick run).
        s3_put(s3.endpoint, s3.access_key, s3.secret_key, "bench-nd", 100 * KiB, 8, 64)
        for size in [100 * KiB, 1 * MiB] if quick else [100 * KiB, 1 * MiB, 5 * MiB]:
            shots = camera_frames(size)
            jpeg = shots[0]
            n, conc = requests_for(len(jpeg), 8, quick) if quick else REQUESTS[size], 8
            got: dict[str, list[Round]] = {"off": [], "keep": [], "s3": []}
            counts = [0.0, 0.0, 0.0]  # fingerprints done, unchecked (busy), CPU seconds: this size's rounds
            for i in range(rounds):
                # Each round runs the three clients in a rotated order, so that none always
                # follows another (a round after a gateway round meets the store still flushing).
                for mode in ORDER[i % len(ORDER):] + ORDER[:i % len(ORDER)]:
                    if mode == "s3":
                        got["s3"].append(metered({"s3": s3.pid, "client": os.getpid()}, None,
                                                 functools.partial(s3_put, jpeg=jpeg), s3.endpoint,
                                                 s3.access_key, s3.secret_key, "bench-nd", len(jpeg), conc, n))
                        continue
                    gw = gws[mode]
                    before = fingerprint_figures(gw.url)
                    got[mode].append(metered({"gateway": gw.pid, "s3": s3.pid, "client": os.getpid()}, gw.pid,
                                             functools.partial(multipart_upload, jpeg=shots),
                                             gw.port, UPLOAD, keys[mode], len(jpeg), conc, n))
                    after = fingerprint_figures(gw.url)
                    if mode == "keep":
                        counts = [c + a - b for c, a, b in zip(counts, after, before, strict=True)]
            off, on, direct = (max(got[k], key=lambda r: r.rps) for k in ("off", "keep", "s3"))
            # Below saturation, at a steady quarter of the rate: the share of frames a gateway with CPU
            # to spare checks, and what a fingerprint costs (saturated rounds fingerprint few or none);
            # in full runs at 60 % too, where the machine has less than a core to spare.
            steady = {f"{share:.0%}": steady_round(metered, gws["keep"], keys["keep"], shots, share * off.rps, conc)
                      for share in ([STEADY_SHARE] if quick else [STEADY_SHARE, BUSIER_SHARE])}
            drops = [round((a.rps - b.rps) / d.rps, 3) for a, b, d in zip(got["off"], got["keep"], got["s3"],
                                                                          strict=True)]
            rows.append({
                "size": len(jpeg), "concurrency": conc, "requests": n, "rounds": rounds,
                "off_rps": round(off.rps, 1), "on_rps": round(on.rps, 1), "s3_rps": round(direct.rps, 1),
                "ratio_off": round(off.rps / direct.rps, 3), "ratio_on": round(on.rps / direct.rps, 3),
                "ratio_drop": round((off.rps - on.rps) / direct.rps, 3),
                # Each round's own drop (off minus on, over the round's direct PUT), and their median:
                # paired within a round, so a slow spell of the machine hits both sides alike.
                "round_drops": drops,
                "median_round_drop": round(statistics.median(drops), 3),
                **fingerprint_summary(*counts),
                "steady": steady[f"{STEADY_SHARE:.0%}"],
                "steady_busier": steady.get(f"{BUSIER_SHARE:.0%}"),
                "gateway_cpu_ms_per_request": {"off": off.cpu.get("gateway"), "on": on.cpu.get("gateway")},
            })
    finally:
        for gw in gws.values():
            gw.stop()
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("\n== 7. near-duplicate filter on (keep) vs off, real JPEGs, vs direct S3 PUT (best rounds)")
    print(f"{'size':>9} {'conc':>4} {'off/s':>7} {'on/s':>7} {'S3/s':>7} {'off/S3':>6} {'on/S3':>6} {'drop':>6} "
          f"{'fp CPU ms':>9} {'fp share':>8} {'gw CPU ms off/on':>16}")
    for r in rows:
        cpu = r["gateway_cpu_ms_per_request"]
        print(f"{r['size'] // KiB:>5} KiB {r['concurrency']:>4} {r['off_rps']:>7} {r['on_rps']:>7} {r['s3_rps']:>7} "
              f"{r['ratio_off']:>6} {r['ratio_on']:>6} {r['ratio_drop']:>6} {r['fingerprint_cpu_ms']!s:>9} "
              f"{r['fingerprinted_share']:>8} {cpu['off']!s:>7}/{cpu['on']!s:<8}")
        if r.get("round_drops"):
            print(f"{'':>14} drop in each of the {r['rounds']} rounds: {', '.join(map(str, r['round_drops']))}; "
                  f"median {r['median_round_drop']}")
        for name in ("steady", "steady_busier"):
            if st := r.get(name):
                print(f"{'':>14} {name.replace('_', ' ')} {st['rps']}/s: fingerprinted {st['fingerprinted_share']}, "
                      f"fp CPU ms {st['fingerprint_cpu_ms']}, gateway CPU ms {st['gateway_cpu_ms_per_request']}")
    print("   (drop: (off - on) / S3 of the best rounds; fp CPU ms: fingerprint and comparison CPU per fingerprinted"
          " upload; fp share: uploads fingerprinted, the rest found no core to spare [dedup.near_min_idle_cores],"
          " the CPU budget [dedup.near_cpu_share] spent or the workers busy and went unchecked; steady: the"
          f" gateway with the filter on at {STEADY_SHARE:.0%} of the best rate with it off, busier: at"
          f" {BUSIER_SHARE:.0%})")

