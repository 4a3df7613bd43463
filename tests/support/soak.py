"""A bounded soak run: many devices upload for a few minutes while the cloud flaps and the
gateway is killed with SIGKILL once, half-way; then the backlog drains and everything is counted.

    python -m tests.support.soak [--short] [--duration S] [--devices N] [--json FILE]  (or scripts/soak)

Parts: one real `gateway serve` process (tests.support.gateway_proc), the fake cloud as its own
process (`python -m tests.support.fakecloud`, steered through `/_control/`), and device threads
here. Devices behave as real ones: an upload that got no answer, a 503, a 507 or a 429 is sent
again later; a 409 on such a resend means the gateway had it (its answer was lost) and counts as
acknowledged. A share of requests are duplicates and a share are malformed.

At the end: acknowledged / delivered / lost (acknowledged but not at the cloud) / resent to the
cloud (answered 409 by its dedup) / 5xx answers to bad input; exit status 0 only when nothing
was lost and no bad request got a 5xx.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import xxhash

from tests.support.gateway_proc import GatewayProcess, free_port

UPLOAD = "/api/device/images/upload"
RETRYABLE = {0, 429, 503, 507}  # 0: no answer (connection refused or cut)


def jpeg(size: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + secrets.token_bytes(max(0, size - 6)) + b"\xff\xd9"


def _bad_requests(key: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, httpx.post kwargs) of malformed uploads; each must get a 4xx."""
    img = jpeg(1000)
    boundary = "soakB0undary"
    truncated = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"t.jpg\"\r\n\r\n"
                 ).encode() + img[:500]
    mp = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return [
        ("no image part", {"headers": {"X-Device-Key": key}, "data": {"metadata": "{}"},
                           "files": {"other": ("x.txt", b"hello", "text/plain")}}),
        ("not an image", {"headers": {"X-Device-Key": key},
                          "files": {"image": ("a.jpg", b"GIF89a" * 50, "image/jpeg")}}),
        ("metadata not JSON", {"headers": {"X-Device-Key": key}, "data": {"metadata": "{nope"},
                               "files": {"image": ("a.jpg", jpeg(900), "image/jpeg")}}),
        ("unknown key", {"headers": {"X-Device-Key": "adk_" + secrets.token_hex(16)},
                         "files": {"image": ("a.jpg", img, "image/jpeg")}}),
        ("JSON body", {"headers": {"X-Device-Key": key}, "json": {"image": "aGVsbG8="}}),
        ("truncated multipart", {"headers": {"X-Device-Key": key} | mp, "content": truncated}),
        ("bad bbox", {"headers": {"X-Device-Key": key}, "files": {"image": ("a.jpg", jpeg(800), "image/jpeg")},
                      "data": {"metadata": json.dumps({"annotations": [{"class_value": "x", "type": "bbox",
                                                                         "geometry": [2, 2, 2]}]})}}),
    ]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, str] = field(default_factory=dict)  # xxh3 -> image_id
    statuses: Counter[str] = field(default_factory=Counter)  # "kind status"
    bad_5xx: int = 0
    bad_sent: int = 0
    duplicates_sent: int = 0
    resends: int = 0
    unacked_at_end: int = 0

    def note(self, kind: str, status: int) -> None:
        with self.lock:
            self.statuses[f"{kind} {status}"] += 1


class Device(threading.Thread):
    def __init__(self, run: Soak, name: str, key: str, seed: int) -> None:
        super().__init__(daemon=True, name=name)
        self.run_, self.key, self.rng = run, key, random.Random(seed)
        self.mine: list[bytes] = []  # acknowledged images, for duplicates
        self.waiting: list[bytes] = []  # sent, not acknowledged yet: send again

    def run(self) -> None:
        soak, tally = self.run_, self.run_.tally
        with httpx.Client(timeout=30) as client:
            while not soak.stop_load.is_set():
                roll = self.rng.random()
                if self.waiting and roll < 0.5:
                    self._upload(client, self.waiting.pop(0), resend=True)
                elif roll < 0.08 and self.mine:
                    self._duplicate(client)
                elif roll < 0.15:
                    self._bad(client)
                else:
                    size = self.rng.choice([4_000, 20_000, 60_000, 150_000]) if self.rng.random() > 0.02 else 2_000_000
                    self._upload(client, jpeg(size), resend=False)
                soak.stop_load.wait(self.rng.uniform(0.0, soak.pause_s))
        with tally.lock:
            tally.unacked_at_end += len(self.waiting)

    def _post(self, client: httpx.Client, **kwargs: Any) -> httpx.Response | None:
        try:
            return client.post(self.run_.gw.url + UPLOAD, **kwargs)
        except httpx.HTTPError:
            return None

    def _upload(self, client: httpx.Client, image: bytes, resend: bool) -> None:
        tally = self.run_.tally
        resp = self._post(client, headers={"X-Device-Key": self.key},
                          files={"image": ("frame.jpg", image, "image/jpeg")},
                          data={"metadata": json.dumps({"source": "soak", "model_id": "m1"})})
        status = resp.status_code if resp is not None else 0
        tally.note("resend" if resend else "upload", status)
        if resend:
            with tally.lock:
                tally.resends += 1
        if status in (200, 201) or (status == 409 and resend):
            assert resp is not None
            with tally.lock:
                tally.acked[xxhash.xxh3_128_hexdigest(image)] = resp.json()["data"]["image_id"]
            self.mine.append(image)
        elif status in RETRYABLE:
            self.waiting.append(image)
            self.run_.stop_load.wait(0.2)
        else:
            tally.note("UNEXPECTED upload", status)

    def _duplicate(self, client: httpx.Client) -> None:
        resp = self._post(client, headers={"X-Device-Key": self.key},
                          files={"image": ("again.jpg", self.rng.choice(self.mine), "image/jpeg")})
        status = resp.status_code if resp is not None else 0
        self.run_.tally.note("duplicate", status)
        with self.run_.tally.lock:
            self.run_.tally.duplicates_sent += 1

    def _bad(self, client: httpx.Client) -> None:
        name, kwargs = self.rng.choice(_bad_requests(self.key))
        resp = self._post(client, **kwargs)
        status = resp.status_code if resp is not None else 0
        tally = self.run_.tally
        tally.note("bad", status)
        with tally.lock:
            tally.bad_sent += 1
            if status >= 500:
                tally.bad_5xx += 1
                print(f"soak: bad request {name!r} got {status}: {resp.text[:200] if resp else ''}", file=sys.stderr)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.tally = Tally()
        self.stop_load = threading.Event()
        self.pause_s = args.pause
        self.events: list[str] = []
        self.started = time.monotonic()
        self.cloud_port = free_port()
        self.cloud_proc: subprocess.Popen[str] | None = None
        self.gw = GatewayProcess(workdir / "gateway", {
            "GATEWAY_STORAGE_BACKEND": "folder",
            "GATEWAY_CLOUD_URL": f"http://127.0.0.1:{self.cloud_port}/api",
            "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2",
            "GATEWAY_FORWARD_BACKOFF_MAX_S": "2",
            "GATEWAY_CLOUD_TIMEOUT_S": "3",  # a 6 s stall at the cloud is then a lost answer: resend, 409
            "GATEWAY_BATCHES_MAX_IMAGES": "200",
            "GATEWAY_LOG_LEVEL": "warning",
        })

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {message}"
        self.events.append(line)
        print(f"soak: {line}", file=sys.stderr, flush=True)

    # -- the parts -------------------------------------------------------------------------

    def start_cloud(self) -> None:
        self.cloud_proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fakecloud", "--port", str(self.cloud_port)],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.cloud_proc.stdout is not None
        line = self.cloud_proc.stdout.readline()
        if not line.startswith("FAKECLOUD_URL="):
            raise RuntimeError(f"fake cloud did not start: {line!r}")

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"http://127.0.0.1:{self.cloud_port}/_control/{path}"
        for _ in range(50):  # while the cloud refuses connections its control API is gone too
            try:
                resp = httpx.post(url, json=body or {}, timeout=10) if body is not None else httpx.get(url, timeout=10)
                return resp.json()["data"]
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"fake cloud control {path} unreachable")

    def flap_cloud(self) -> None:
        """Every few seconds: 503s with Retry-After, refused connections, lost answers, normal."""
        rng = random.Random(7)
        normal: tuple[str, dict[str, Any], str] = ("normal", {}, "normal")
        plan = [("status", {"status": 503, "retry_after": 1}, "503 + Retry-After"), normal,
                ("refuse", {"seconds": 3}, "connections refused 3 s"), normal,
                ("stall", {"seconds": 6}, "answers held 6 s (lost to a 3 s timeout)"), normal,
                ("status", {"status": 500}, "500"), normal,
                ("reset", {}, "connections reset mid-body"), normal]
        i = 0
        while not self.stop_load.wait(rng.uniform(2.0, 4.0)):
            mode, extra, label = plan[i % len(plan)]
            i += 1
            self.control("mode", {"mode": mode, **extra})
            self.log(f"cloud -> {label}")
        self.control("mode", {"mode": "normal"})

    def kill_gateway_once(self, at_s: float) -> None:
        if self.stop_load.wait(at_s):
            return
        self.log("gateway -> kill -9")
        self.gw.kill()
        time.sleep(1.0)
        self.gw.start(timeout=60)
        self.log("gateway restarted and ready")

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        self.start_cloud()
        self.gw.start()
        try:
            devices = []
            for i in range(a.devices):
                device_id, key = self.gw.add_device(f"soak-{i:02d}")
                self.control("devices", {"key": key, "device_id": device_id})
                devices.append(Device(self, f"soak-{i:02d}", key, seed=i))
            self.log(f"{a.devices} devices, {a.duration:.0f} s of load, kill -9 at {a.duration / 2:.0f} s")
            helpers = [threading.Thread(target=self.flap_cloud, daemon=True),
                       threading.Thread(target=self.kill_gateway_once, args=(a.duration / 2,), daemon=True)]
            for t in [*devices, *helpers]:
                t.start()
            time.sleep(a.duration)
            self.stop_load.set()
            for t in [*devices, *helpers]:
                t.join(90)
            self.log("load stopped; cloud normal; draining")
            drained = self.drain(a.drain_timeout)
            stats = self.control("stats")
            with self.gw.admin() as admin:
                status = admin.get("/api/admin/status").json()["data"]
                verify = admin.post("/api/admin/verify", json={"full": True}, timeout=600).json()["data"]
        finally:
            self.gw.stop(timeout=60)
            if self.cloud_proc is not None:
                self.cloud_proc.terminate()
                self.cloud_proc.wait(10)
        return self.figures(drained, stats, status, verify, self.outbox_states())

    def outbox_states(self) -> dict[str, str]:
        """image id -> outbox state, read from the stopped gateway's catalog file."""
        import duckdb

        con = duckdb.connect(str(Path(self.gw.env["GATEWAY_DATA_DIR"]) / "catalog.duckdb"), read_only=True)
        try:
            return dict(con.execute("SELECT image_id, state FROM outbox").fetchall())
        finally:
            con.close()

    def drain(self, timeout: float) -> bool:
        started = time.monotonic()
        deadline = started + timeout
        s: dict[str, Any] = {"backlog_count": "?"}
        while time.monotonic() < deadline:
            with self.gw.admin() as admin:
                s = admin.get("/api/admin/status").json()["data"]
            if s["backlog_count"] == 0 and s["held_count"] == 0:
                self.log(f"drained in {time.monotonic() - started:.0f} s: {s['delivered_count']} delivered, "
                         f"{s['dead_count']} dead")
                return True
            time.sleep(0.5)
        self.log(f"drain timed out with {s['backlog_count']} image(s) still pending")
        return False

    def figures(self, drained: bool, stats: dict[str, Any], status: dict[str, Any], verify: dict[str, Any],
                states: dict[str, str]) -> dict[str, Any]:
        t = self.tally
        at_cloud = {h for hashes in stats["devices"].values() for h in hashes}
        acked = set(t.acked)
        # Not at the cloud yet but still waiting in the gateway's outbox is late, not lost; lost
        # is acknowledged and neither at the cloud nor pending (no row, or dead-lettered).
        not_there = acked - at_cloud
        still_pending = {h for h in not_there if states.get(t.acked[h]) in ("pending", "held")}
        good_5xx = sum(n for k, n in t.statuses.items() if not k.startswith("bad") and k.split()[-1][0] == "5")
        return {
            "duration_s": round(time.monotonic() - self.started, 1),
            "devices": self.args.devices,
            "acknowledged": len(acked),
            "delivered": len(acked & at_cloud),
            "lost": len(not_there - still_pending),
            "still_pending_at_gateway": len(still_pending),
            "at_cloud_never_acknowledged": len(at_cloud - acked),
            "resent_to_cloud_409": stats["duplicates"],
            "stored_twice_at_cloud": stats["by_status"].get("201", 0) - stats["stored"],
            "cloud_answers": stats["by_status"],
            "duplicates_sent": t.duplicates_sent,
            "bad_requests_sent": t.bad_sent,
            "bad_requests_5xx": t.bad_5xx,
            "device_resends": t.resends,
            "unacknowledged_at_end": t.unacked_at_end,
            "5xx_to_valid_uploads_during_faults": good_5xx,
            "gateway_images": status["images"],
            "gateway_dead_letters": status["dead_count"],
            "drained": drained,
            "verify": verify["summary"],
            "answers": dict(sorted(t.statuses.items())),
            "events": self.events,
        }


def render(f: dict[str, Any]) -> str:
    rows = [
        ("uploads acknowledged by the gateway", f["acknowledged"]),
        ("delivered to the cloud", f["delivered"]),
        ("lost (acknowledged; not at the cloud, not pending)", f["lost"]),
        ("still pending at the gateway when the run ended", f["still_pending_at_gateway"]),
        ("resent to the cloud, absorbed by its dedup (409)", f["resent_to_cloud_409"]),
        ("stored twice at the cloud", f["stored_twice_at_cloud"]),
        ("duplicates sent by devices", f["duplicates_sent"]),
        ("bad requests sent", f["bad_requests_sent"]),
        ("5xx answers to bad requests", f["bad_requests_5xx"]),
        ("5xx answers to valid uploads (faults; devices resent)", f["5xx_to_valid_uploads_during_faults"]),
        ("device resends", f["device_resends"]),
        ("dead letters", f["gateway_dead_letters"]),
        ("verify --full: missing / mismatches", f"{f['verify']['missing']} / {f['verify']['hash_mismatch']}"),
        ("duration", f"{f['duration_s']} s, {f['devices']} devices, 1 kill -9, cloud flapping"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="about a minute: 35 s of load, 6 devices (CI)")
    p.add_argument("--duration", type=float, default=240.0, help="seconds of load (default 240)")
    p.add_argument("--devices", type=int, default=16, help="device threads (default 16)")
    p.add_argument("--pause", type=float, default=1.0,
                   help="longest pause between a device's requests, s (default 1.0: ~2 uploads/s/device)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds allowed to drain the backlog (default 300)")
    p.add_argument("--workdir", type=Path, help="keep the gateway's files here (default: a temp dir)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.short:
        args.duration, args.devices, args.drain_timeout, args.pause = 35.0, 6, 60.0, 0.05
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        figures = Soak(args, args.workdir or Path(tmp)).run()
    print(render(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ok = figures["lost"] == 0 and figures["bad_requests_5xx"] == 0 and figures["drained"] \
        and figures["verify"]["missing"] == 0 and figures["verify"]["hash_mismatch"] == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
