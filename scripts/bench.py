"""`scripts/bench`: the gateway measured against its ceilings, side by side, in one run.

Starts its own SeaweedFS (`weed mini`, or with `--store cluster` a replicated cluster: master,
three volume servers, filer, `weed s3`), gateways (minio backend), a discard endpoint and a fake
cloud on 127.0.0.1, then alternates rounds (gateway, direct S3 PUT, discard) so that machine noise hits
each alike. Prints a table (or `--json`). Ratios, not absolute figures, are the point.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from scripts.benchlib.bandwidth import bandwidth_section  # noqa: E402
from scripts.benchlib.catalog import dedup_latency, fill  # noqa: E402
from scripts.benchlib.cpu import CpuMeter  # noqa: E402
from scripts.benchlib.load import Round, multipart_upload, s3_put, s3_put_presigned  # noqa: E402
from scripts.benchlib.neardup import neardup_section  # noqa: E402
from scripts.benchlib.report import print_table, run_info  # noqa: E402
from tests.support.client import upload_streamed  # noqa: E402
from tests.support.gateway_proc import GatewayProcess, free_port, s3_env  # noqa: E402
from tests.support.s3cluster import S3Cluster  # noqa: E402
from tests.support.s3server import S3Server  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
UPLOAD = "/api/device/images/upload"
S3_MEMORY_LIMIT = "1GiB"


def store_pids(s3: S3Server | S3Cluster) -> dict[str, int | None]:
    """The store's processes for the CPU meter: `s3` is the one serving S3 (weed mini or weed s3)."""
    if isinstance(s3, S3Cluster):
        return {"s3" if role == "s3" else f"s3 {role}": pid for role, pid in s3.pids().items()}
    return {"s3": s3.pid}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def requests_for(size: int, concurrency: int, quick: bool) -> int:
    """Enough requests for a few seconds a round: bounded by bytes, by count, and by concurrency."""
    budget = (48 if quick else 160) * MiB  # bytes per round
    cap = (300 if quick else 600) if concurrency > 1 else 200
    return max(concurrency * 4, min(cap, budget // size))


def metered(pids: dict[str, int | None], split: int | None, run: Callable[..., Round], *args: Any) -> Round:
    """Run one round and note the CPU each process spent on it, per request."""
    with CpuMeter(pids, split) as meter:
        r = run(*args)
    if r.requests == 0:  # no rate to compare with: say why, rather than divide by it later
        raise RuntimeError(f"every request of a {r.kind} round failed ({r.errors}); the first: {r.first_error}")
    r.cpu = meter.per_request_ms(max(1, r.requests))
    return r


def catalog_writes(url: str) -> tuple[float, float]:
    """The gateway's committed catalog (transactions, writes) from /metrics."""
    tx = writes = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("acusight_gateway_catalog_transactions_total "):
            tx = float(line.split()[1])
        elif line.startswith("acusight_gateway_catalog_writes_total "):
            writes = float(line.split()[1])
    return tx, writes


def grouped(url: str, run: Callable[[], Round]) -> Round:
    """Run a gateway round and note its catalog group-commit size (writes per transaction)."""
    tx0, w0 = catalog_writes(url)
    r = run()
    tx1, w1 = catalog_writes(url)
    r.group = round((w1 - w0) / (tx1 - tx0), 2) if tx1 > tx0 else 0.0
    return r


def cpu_limit_rps(cpu_ms: dict[str, float]) -> float:
    """Requests per second the machine's cores allow at `cpu_ms` (per process, per request; the
    "gateway <role>" entries split the gateway's own figure and are not counted again)."""
    total = sum(v for k, v in cpu_ms.items() if not k.startswith("gateway "))
    return round((os.cpu_count() or 1) * 1000 / total, 1) if total > 0 else 0.0


def best(rounds: list[Round]) -> Round:
    return max(rounds, key=lambda r: r.rps)


def ingest_section(s3: S3Server | S3Cluster, work: Path, quick: bool, only_conc: list[int] | None = None
                   ) -> list[dict[str, Any]]:
    gw = GatewayProcess(work / "gw-ingest", s3_env(s3)).start()
    _, key = gw.add_device("bench-ingest")
    discard_port = free_port()
    discard = subprocess.Popen([sys.executable, "-m", "scripts.benchlib.discard", str(discard_port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{discard_port}/", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    sizes = [100 * KiB, 1 * MiB] if quick else [100 * KiB, 1 * MiB, 5 * MiB]
    concurrencies = only_conc or ([8] if quick else [1, 8, 32])
    repeats = 1 if quick else 2
    rows = []
    try:
        # Warm-up, not measured: the direct bucket is created and each server opens its first volume.
        multipart_upload(gw.port, UPLOAD, key, 100 * KiB, 8, 64)
        s3_put(s3.endpoint, s3.access_key, s3.secret_key, "bench-direct", 100 * KiB, 8, 64)
        s3_put_presigned(s3.endpoint, s3.access_key, s3.secret_key, "bench-direct", 100 * KiB, 8, 64)
        multipart_upload(discard_port, UPLOAD, None, 100 * KiB, 8, 64)
        for size in sizes:
            for conc in concurrencies:
                n = requests_for(size, conc, quick)
                got: dict[str, list[Round]] = {"gateway": [], "s3": [], "s3u": [], "discard": []}
                for _ in range(repeats):  # alternate, so noise hits every kind alike
                    got["gateway"].append(grouped(gw.url, functools.partial(
                        metered, {"gateway": gw.pid, **store_pids(s3), "client": os.getpid()}, gw.pid,
                        multipart_upload, gw.port, UPLOAD, key, size, conc, n)))
                    got["s3"].append(metered(
                        {**store_pids(s3), "client": os.getpid()}, None,
                        s3_put, s3.endpoint, s3.access_key, s3.secret_key, "bench-direct", size, conc, n))
                    got["s3u"].append(metered(
                        {**store_pids(s3), "client": os.getpid()}, None,
                        s3_put_presigned, s3.endpoint, s3.access_key, s3.secret_key, "bench-direct", size, conc, n))
                    got["discard"].append(metered(
                        {"discard": discard.pid, "client": os.getpid()}, None,
                        multipart_upload, discard_port, UPLOAD, None, size, conc, n))
                # The direct ceiling is the faster of the two direct clients: minio's signed PUT and a
                # presigned UNSIGNED-PAYLOAD PUT over kept-alive connections (as the gateway sends).
                signed, unsigned = best(got["s3"]), best(got["s3u"])
                g, d, c = best(got["gateway"]), best([signed, unsigned]), best(got["discard"])
                # The store's CPU per request grows as its rate falls (idle Go threads spinning for work),
                # so its cost in the gateway round is set beside its cost for direct PUTs at that rate
                # (half a round: the bench writes gigabytes into the store as it is).
                paced = metered({**store_pids(s3)}, None, s3_put_presigned, s3.endpoint, s3.access_key,
                                s3.secret_key, "bench-direct", size, conc, max(conc * 2, n // 2), g.rps)
                row = {
                    "size": size, "concurrency": conc, "requests": n,
                    "gateway_rps": round(g.rps, 1), "gateway_mb_s": round(g.mb_per_s, 1),
                    "gateway_p50_ms": round(g.pct(0.5), 2), "gateway_p99_ms": round(g.pct(0.99), 2),
                    "gateway_errors": g.errors,
                    "s3_rps": round(d.rps, 1), "s3_client": "presigned" if d is unsigned else "minio",
                    "s3_signed_rps": round(signed.rps, 1), "s3_unsigned_rps": round(unsigned.rps, 1),
                    "s3_p50_ms": round(d.pct(0.5), 2), "s3_p99_ms": round(d.pct(0.99), 2),
                    "discard_rps": round(c.rps, 1),
                    "ratio_vs_s3": round(g.rps / d.rps, 3) if d.rps else None,
                    "ratio_vs_discard": round(g.rps / c.rps, 3) if c.rps else None,
                    "catalog_group_size": g.group,
                    "cpu_ms_per_request": {"gateway_round": g.cpu, "s3_round": d.cpu, "discard_round": c.cpu,
                                           "s3_at_gateway_rate": paced.cpu},
                    # If CPU were the only limit: the cores over the CPU one upload costs in all
                    # processes (client, gateway, store), against the direct client's measured rate.
                    "cpu_limit_rps": (limit := cpu_limit_rps(g.cpu)),
                    "cpu_limit_ratio": round(limit / d.rps, 3) if d.rps else None,
                    # The same with each store process's CPU per request at the least of the gateway round
                    # and the presigned direct round (the store at full speed, the gateway's kind of PUT):
                    # the most the cores could allow this gateway.
                    "cpu_limit_ratio_high": round(cpu_limit_rps(
                        {k: min(v, unsigned.cpu.get(k, v)) if k.startswith("s3") else v for k, v in g.cpu.items()})
                        / d.rps, 3) if d.rps else None,
                }
                rows.append(row)
                log(f"ingest {size // KiB} KiB x{conc}: gateway {g.rps:.0f}/s, s3 signed {signed.rps:.0f}/s, "
                    f"unsigned {unsigned.rps:.0f}/s, "
                    f"discard {c.rps:.0f}/s -> {row['ratio_vs_s3']} of S3")
    finally:
        os.killpg(discard.pid, signal.SIGTERM)
        discard.wait()
        gw.stop()
    return rows


def memory_section(s3: S3Server | S3Cluster, work: Path) -> dict[str, Any]:
    gw = GatewayProcess(work / "gw-mem", s3_env(s3)).start()
    _, key = gw.add_device("bench-mem")
    url = f"{gw.url}{UPLOAD}"
    block = secrets.token_bytes(MiB)

    def send(size: int, tag: int) -> int:
        return upload_streamed(url, key, size, tag, block)

    base = gw.vm_hwm_kib()
    refused = send(50 * MiB + 1, 0)
    after_refused = gw.vm_hwm_kib()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: send(45 * MiB, i + 1), range(8)))
    peak = gw.vm_hwm_kib()
    gw.stop()
    return {
        "baseline_mib": round(base / 1024, 1), "refused_status": refused,
        "growth_on_refused_50mib_mib": round((after_refused - base) / 1024, 1),
        "accepted_45mib_x8_statuses": statuses, "peak_rss_mib": round(peak / 1024, 1),
    }


# `--classes`: half the devices in a higher class, and a window open all week: the same drain
# through the class lanes and the window schedule (compare with the run without it).
CLASSES_TOML = """
[[forward.classes]]
name = "line-a"
priority = 5
[forward.classes.match]
devices = [{devices}]
[[forward.windows]]
days = "mon-sun"
start = "00:00"
end = "24:00"
"""


def forward_section(s3: S3Server | S3Cluster, work: Path, quick: bool, images: int = 0,
                    classes: bool = False) -> dict[str, Any]:
    from tests.support.fakecloud import FakeCloud

    count = images or (200 if quick else 2000)
    concurrency = 8
    size = MiB
    cloud = FakeCloud().start()
    try:
        devices = 8
        gw = GatewayProcess(work / "gw-fwd", s3_env(s3) | {
            "GATEWAY_CLOUD_URL": cloud.url, "GATEWAY_FORWARD_CONCURRENCY": str(concurrency),
            "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1",
        })
        if classes:
            ids = ", ".join(f'"fwd-dev-{i}"' for i in range(0, devices, 2))
            (gw.workdir / "gateway.toml").write_text(CLASSES_TOML.format(devices=ids))
        # The plain client's baseline: one round before the backlog is built, one after the drain.
        plain_key = "adk_" + secrets.token_hex(16)
        cloud.add_device(plain_key)
        plain_before = multipart_upload(cloud.port, UPLOAD, plain_key, size, concurrency, count)

        def forwarded() -> list[Any]:
            return [r for r in cloud.stored.values() if r.device_key != plain_key]

        cloud.refuse_connections()  # build a backlog while the uplink is down
        gw.start()
        keys = []
        for i in range(devices):
            key = "adk_" + secrets.token_hex(16)
            cloud.add_device(key)
            with gw.admin() as client:
                client.post("/api/admin/devices", json={"name": f"fwd{i}", "key": key,
                                                        "device_id": f"fwd-dev-{i}"}).raise_for_status()
            keys.append(key)
        per = count // devices
        with concurrent.futures.ThreadPoolExecutor(devices) as pool:
            list(pool.map(lambda k: multipart_upload(gw.port, UPLOAD, k, size, 1, per), keys))
        os.sync()  # an outage lasts long enough for the backlog's writes to reach the disk
        tx0, w0 = catalog_writes(gw.url)
        with CpuMeter({"gateway": gw.pid, **store_pids(s3), "fake cloud": os.getpid()}, gw.pid) as meter:
            cloud.accept_connections()
            deadline = time.monotonic() + 600
            while len(forwarded()) < per * devices and time.monotonic() < deadline:
                time.sleep(0.05)
        tx1, w1 = catalog_writes(gw.url)
        arrivals = sorted(r.at for r in forwarded())
        gw.stop()
        delivered = len(arrivals)
        gw_seconds = arrivals[-1] - arrivals[0] if delivered > 1 else float("nan")
        gw_rate = (delivered - 1) / gw_seconds if delivered > 1 else 0.0
        os.sync()
        plain_after = multipart_upload(cloud.port, UPLOAD, plain_key, size, concurrency, count)
        plain_rate = (plain_before.rps + plain_after.rps) / 2
        # A second ceiling: a plain client that reads each stored image back from the same S3 store
        # and posts it, as the forwarder must (the cloud answers 409, after reading the whole body).
        from_store = store_to_cloud(s3, gw.env["GATEWAY_MINIO_BUCKET"], cloud.port, plain_key, concurrency)
        return {
            "images": per * devices, "size": size, "concurrency": concurrency, "delivered": delivered,
            "classes": classes,
            "gateway_rate_per_s": round(gw_rate, 1), "plain_rate_per_s": round(plain_rate, 1),
            "plain_rates_before_after": [round(plain_before.rps, 1), round(plain_after.rps, 1)],
            "ratio": round(gw_rate / plain_rate, 3) if plain_rate else None,
            "store_to_cloud_rate_per_s": round(from_store, 1),
            "ratio_vs_store_to_cloud": round(gw_rate / from_store, 3) if from_store else None,
            "cpu_ms_per_image": meter.per_request_ms(max(1, delivered)),
            "catalog_group_size": round((w1 - w0) / (tx1 - tx0), 2) if tx1 > tx0 else 0.0,
        }
    finally:
        cloud.stop()


def store_to_cloud(s3: S3Server | S3Cluster, bucket: str, port: int, key: str, concurrency: int) -> float:
    """Images per second a plain client moves from the S3 store to the cloud (GET, then POST)."""
    import http.client

    client = s3.client(timeout=60)
    names = [o.object_name for o in client.list_objects(bucket, prefix="raw-data/", recursive=True)]
    boundary = "storeb0undary"

    def one(name: str) -> None:
        resp = client.get_object(bucket, name)
        try:
            data = resp.read()
        finally:
            resp.close()
            resp.release_conn()
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("POST", UPLOAD, body=head + data + tail, headers={
            "X-Device-Key": key, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        conn.getresponse().read()
        conn.close()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, names))
    return len(names) / (time.perf_counter() - started)


def startup_section(s3: S3Server | S3Cluster, work: Path, rows: int) -> dict[str, Any]:
    out = {}
    for label, n in (("empty", 0), ("pending", rows)):
        proc = GatewayProcess(work / f"gw-start-{label}", s3_env(s3) | {
            "GATEWAY_CLOUD_URL": f"http://127.0.0.1:{free_port()}/api"})  # an unreachable cloud
        data = proc.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        if n:
            fill(data / "catalog.duckdb", n, "pending")
        t0 = time.monotonic()
        proc.start(wait_ready=False)
        health = ready = None
        while time.monotonic() - t0 < 120 and ready is None:
            try:
                if health is None and httpx.get(f"{proc.url}/api/health", timeout=1).status_code == 200:
                    health = time.monotonic() - t0
                if httpx.get(f"{proc.url}/api/ready", timeout=1).status_code == 200:
                    ready = time.monotonic() - t0
            except httpx.TransportError:
                time.sleep(0.02)
        proc.stop()
        out[label] = {"outbox_rows": n, "health_s": round(health or -1, 2), "ready_s": round(ready or -1, 2)}
    return out


ALL_SECTIONS = {"single": "ingest,memory,dedup,forward,bandwidth,startup,neardup",
                "cluster": "ingest,memory,dedup,forward,bandwidth,startup"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a reduced run (under a minute), as CI runs it")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="the report as JSON, on stdout or into PATH (for `scripts/benchdoc`)")
    parser.add_argument("--store", choices=["single", "cluster"], default="single",
                        help="the S3 store: one `weed mini` (single) or a replicated SeaweedFS cluster")
    parser.add_argument("--only", default="",
                        help="comma-separated sections to run (default: all; on the cluster all but neardup, "
                             "whose cost does not depend on the store)")
    parser.add_argument("--concurrency", default="", help="comma-separated ingest concurrencies (default: all)")
    parser.add_argument("--forward-images", type=int, default=0, help="images in the forwarder drain (default 2000)")
    parser.add_argument("--classes", action="store_true",
                        help="forwarder drain with two priority classes and a window configured")
    args = parser.parse_args()
    only = set((args.only or ALL_SECTIONS[args.store]).split(","))
    started = time.time()
    report: dict[str, Any] = {"quick": args.quick, "cpus": os.cpu_count(), "store": args.store}
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        work = Path(tmp)
        # A production-like heap target for the store (tests run SeaweedFS at 64 MiB to save memory,
        # where its garbage collector burns more CPU than its requests), and volumes big enough that
        # a round does not wait for a new one to open (see S3Server).
        store = S3Cluster if args.store == "cluster" else S3Server
        s3 = store(work / "s3", memory_limit=S3_MEMORY_LIMIT, volume_mb=1024).start()
        try:
            if "ingest" in only:
                conc = [int(c) for c in args.concurrency.split(",") if c]
                report["ingest"] = ingest_section(s3, work, args.quick, conc or None)
            if "memory" in only:
                report["memory"] = memory_section(s3, work)
            if "dedup" in only:
                log("dedup: filling the catalog")
                report["dedup"] = dedup_latency(work / "dedup", 100_000 if args.quick else 1_000_000,
                                                200 if args.quick else 1000)
            if "forward" in only:
                report["forward"] = forward_section(s3, work, args.quick, args.forward_images, args.classes)
            if "startup" in only:
                report["startup"] = startup_section(s3, work, 100_000)
            if "neardup" in only and isinstance(s3, S3Server):
                report["neardup"] = neardup_section(s3, work, args.quick, metered, requests_for)
            if "bandwidth" in only:
                report["bandwidth"] = bandwidth_section(s3, work, args.quick)
        finally:
            s3.stop()
    report["run"] = run_info(started, sorted(only), sys.argv[1:])
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print_table(report)
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
