"""`scripts/bench`'s report: the run's facts, the table it prints, and `docs/benchmarks.md`.

    scripts/bench --json out.json          # a run; the report as JSON (the table is printed too)
    scripts/benchdoc out.json > docs/benchmarks.md

The Markdown is generated whole from one report, with the run's date, machine and commit, so the
figures in the docs are always one run's and never pasted by hand.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.benchlib.neardup import print_rows

KiB, MiB = 1024, 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


def _first_line(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def run_info(started: float, sections: list[str], argv: list[str]) -> dict[str, Any]:
    """When, where and what ran: the facts a figure means nothing without."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    mem_kib = _first_line("/proc/meminfo", "MemTotal").split()[0] if _first_line("/proc/meminfo", "MemTotal") else ""
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "cpu_model": _first_line("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "memory_gib": round(int(mem_kib) / MiB, 1) if mem_kib else None,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "system": platform.platform(), "python": platform.python_version(), "commit": commit,
        "sections": sections, "arguments": argv,
    }


def _size(n: int) -> str:
    return f"{n // KiB} KiB" if n < MiB else f"{n // MiB} MiB"


def print_table(report: dict[str, Any]) -> None:
    print(f"\n== 1/2. ingest on the {report.get('store', 'single')} store: gateway vs direct S3 PUT into the same "
          "store vs discard endpoint (best of the alternated rounds)")
    print("   (S3 req/s: the faster direct client, minio's signed PUT or a presigned UNSIGNED-PAYLOAD PUT)")
    print(f"{'size':>8} {'conc':>4} {'gw req/s':>9} {'gw MB/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'signed/s':>9} {'unsign/s':>9} {'S3 req/s':>9} {'discard/s':>9} {'gw/S3':>6} {'CPU lim':>7} "
          f"{'lim hi':>6} {'gw/disc':>7}")
    for r in report.get("ingest", []):
        size = f"{r['size'] // KiB} KiB" if r["size"] < MiB else f"{r['size'] // MiB} MiB"
        print(f"{size:>8} {r['concurrency']:>4} {r['gateway_rps']:>9} {r['gateway_mb_s']:>8} "
              f"{r['gateway_p50_ms']:>7} {r['gateway_p99_ms']:>7} {r['s3_signed_rps']:>9} {r['s3_unsigned_rps']:>9} "
              f"{r['s3_rps']:>9} {r['discard_rps']:>9} "
              f"{r['ratio_vs_s3']:>6} {r.get('cpu_limit_ratio', ''):>7} {r.get('cpu_limit_ratio_high', ''):>6} "
              f"{r['ratio_vs_discard']:>7}")
    if report.get("ingest"):
        print(f"   (CPU lim: gw/S3 if CPU were the only limit: {os.cpu_count()} cores over the CPU one gateway upload "
              "costs in client, gateway and store together, against the direct client's rate; lim hi: the same with "
              "the store's CPU per request at the lesser of the gateway round's and the presigned direct round's, "
              "its cost at full speed)")
        print("\n   where the CPU goes, ms per request (the same best rounds; 2 cores = 2000 ms per second):")
        print(f"{'size':>8} {'conc':>4} | {'gateway':>7} {'loop':>6} {'writer':>6} {'other':>6} {'S3':>6} "
              f"{'client':>6} | direct: {'S3':>6} {'client':>6} {'S3@gw':>6} | discard: {'server':>6} | {'group':>5}")
        for r in report["ingest"]:
            size = f"{r['size'] // KiB} KiB" if r["size"] < MiB else f"{r['size'] // MiB} MiB"
            g, d, c = (r["cpu_ms_per_request"][k] for k in ("gateway_round", "s3_round", "discard_round"))
            paced = r["cpu_ms_per_request"].get("s3_at_gateway_rate", {}).get("s3", "")
            print(f"{size:>8} {r['concurrency']:>4} | {g.get('gateway', 0):>7} {g.get('gateway event loop', 0):>6} "
                  f"{g.get('gateway catalog-writer', 0):>6} {g.get('gateway other threads', 0):>6} "
                  f"{g.get('s3', 0):>6} {g.get('client', 0):>6} | direct: {d.get('s3', 0):>6} "
                  f"{d.get('client', 0):>6} {paced:>6} | discard: {c.get('discard', 0):>6} | "
                  f"{r['catalog_group_size']:>5}")
        print("   (S3: the process serving S3, on a cluster its front only; S3@gw: its CPU per direct PUT paced to "
              "the gateway round's rate; group: uploads per catalog transaction in the gateway round)")
    if "memory" in report:
        m = report["memory"]
        print(f"\n== 3. memory: peak RSS with 8 x 45 MiB concurrent = {m['peak_rss_mib']} MiB "
              f"(baseline {m['baseline_mib']} MiB); growth on a refused 50 MiB + 1 body = "
              f"{m['growth_on_refused_50mib_mib']} MiB (status {m['refused_status']})")
    if "dedup" in report:
        d = report["dedup"]
        print(f"\n== 4. dedup with {d['rows']:,} images ({d['samples']} uploads timed after {d['warm_up']}): "
              f"new bytes: check p50/p99 {d['check_p50_ms']}/"
              f"{d['check_p99_ms']} ms, insert p50/p99 {d['insert_p50_ms']}/{d['insert_p99_ms']} ms, check+insert "
              f"p50/p99 {d['check_plus_insert_p50_ms']}/{d['check_plus_insert_p99_ms']} ms; stored bytes: duplicate "
              f"look-up p50/p99 {d['duplicate_lookup_p50_ms']}/{d['duplicate_lookup_p99_ms']} ms; catalog "
              f"{d['bytes_per_image']} bytes/image")
    if "forward" in report:
        f = report["forward"]
        print(f"\n== 5. forwarder drain of {f['images']} x 1 MiB at concurrency {f['concurrency']}"
              f"{' (with classes and a window)' if f.get('classes') else ''}: "
              f"{f['gateway_rate_per_s']}/s vs plain client from memory {f['plain_rate_per_s']}/s "
              f"(mean of {' and '.join(map(str, f['plain_rates_before_after']))}, before and after) -> {f['ratio']}; "
              f"vs plain client reading each from S3 {f['store_to_cloud_rate_per_s']}/s -> "
              f"{f['ratio_vs_store_to_cloud']}")
        cpu = ", ".join(f"{k} {v}" for k, v in f.get("cpu_ms_per_image", {}).items())
        print(f"   CPU ms per forwarded image: {cpu}; catalog writes per transaction {f['catalog_group_size']}")
    if "bandwidth" in report:
        b = report["bandwidth"]
        refused = b.get("uploads_refused_503")
        again = f"; {refused} upload(s) answered 503 and sent again" if refused else ""
        print(f"\n== 5b. bandwidth cap: {b['images']} images drained at {b['rate_bytes_per_s']:,} B/s against a cap of "
              f"{b['cap_bytes_per_s']:,} B/s -> {b['rate_vs_cap']} (target {b['target']}){again}")
    if "startup" in report:
        s = report["startup"]
        print(f"\n== 6. start-up: ready in {s['pending']['ready_s']} s with {s['pending']['outbox_rows']:,} pending "
              f"outbox rows (empty catalog: {s['empty']['ready_s']} s)")
    if "neardup" in report:
        print_rows(report["neardup"])


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


INTRO = """`scripts/bench` starts its own SeaweedFS, gateways (minio backend), a discard endpoint (Litestar
and hypercorn parsing the multipart body and dropping it) and a fake cloud, all on 127.0.0.1. It
alternates rounds so that machine noise hits each side alike, measures each round's CPU time per
request for every process from `/proc` (the gateway split into its event loop, its catalog writer
and its other threads), and prints a table, or JSON with `--json`. Ratios, not absolute figures,
are the point: the client, the gateway and SeaweedFS share the machine's cores. `--quick` is the
reduced run CI makes (no timing assertions); `--store cluster` runs on a replicated SeaweedFS
cluster. Why the figures are what they are: docs/design.md, "Where the time goes"."""


def markdown(report: dict[str, Any], source: str = "") -> str:
    """docs/benchmarks.md from one report of `scripts/bench --json`."""
    run = report.get("run", {})
    kind = "quick run (`--quick`)" if report.get("quick") else "full run"
    store = report.get("store", "single")
    load = run.get("load_average")
    lines = ["# Benchmarks", "",
             f"<!-- Generated by `scripts/benchdoc {source or 'REPORT.json'}` from `scripts/bench --json`; "
             "do not edit by hand: run the bench and generate it again. -->", "", INTRO, "",
             f"**This run:** {run.get('date_utc', 'date unknown')} UTC, a {kind} on the {store} "
             f"store, {run.get('duration_s', '?')} s, commit `{run.get('commit') or '?'}`"
             + (f", arguments `{' '.join(run['arguments'])}`" if run.get("arguments") else "") + ".  ",
             f"**Machine:** {run.get('cpu_model', '?')}, {run.get('cpus', report.get('cpus'))} CPUs, "
             f"{run.get('memory_gib', '?')} GiB, {run.get('system', '?')}, Python {run.get('python', '?')}"
             + (f"; load average at the end {' / '.join(map(str, load))}" if load else "") + ".", ""]
    if report.get("ingest"):
        lines += ["## Ingest: the gateway against its ceilings", "",
                  "Best of the alternated rounds. Direct S3 PUT: the faster of minio's signed PUT and a presigned "
                  "UNSIGNED-PAYLOAD PUT into the same store.", ""]
        lines += _table(["size", "concurrency", "gateway req/s", "gateway MB/s", "p50 ms", "p99 ms", "errors",
                         "direct S3 PUT req/s", "discard req/s", "gateway / S3", "CPU limit of gateway / S3",
                         "CPU limit, store at full speed", "gateway / discard"],
                        [[_size(r["size"]), r["concurrency"], r["gateway_rps"], r["gateway_mb_s"], r["gateway_p50_ms"],
                          r["gateway_p99_ms"], r["gateway_errors"], r["s3_rps"], r["discard_rps"], r["ratio_vs_s3"],
                          r.get("cpu_limit_ratio", ""), r.get("cpu_limit_ratio_high", ""), r["ratio_vs_discard"]]
                         for r in report["ingest"]])
        lines += ["CPU limit: the gateway / S3 ratio if CPU were the only limit: the machine's cores over the CPU "
                  "one gateway upload costs in the client, the gateway and the store together, against the direct "
                  "client's measured rate. \"Store at full speed\" counts the store's CPU per request at the lesser "
                  "of the gateway round's and the presigned direct round's (at full speed): the least a request "
                  "costs it, so the most the cores allow.",
                  ""]
        lines += ["CPU per request in ms, from the same rounds (one core gives 1,000 ms a second). Group: uploads "
                  "per catalog transaction.", ""]
        rows = []
        for r in report["ingest"]:
            g, d = r["cpu_ms_per_request"]["gateway_round"], r["cpu_ms_per_request"]["s3_round"]
            paced = r["cpu_ms_per_request"].get("s3_at_gateway_rate", {}).get("s3", "")
            rows.append([_size(r["size"]), r["concurrency"], g.get("gateway"), g.get("gateway event loop"),
                         g.get("gateway catalog-writer"), g.get("gateway other threads"), g.get("s3"),
                         d.get("s3"), d.get("client"), paced, r["catalog_group_size"]])
        lines += _table(["size", "concurrency", "gateway", "event loop", "catalog writer", "other threads",
                         "S3 server (gateway round)", "direct: S3 server", "direct: client",
                         "S3 server, direct at the gateway's rate", "group"], rows)
        lines += ["The store's CPU per request grows as its request rate falls, so the last S3 column paces the "
                  "direct client to the gateway round's rate: the store's cost of a request at that rate.", ""]
    if "memory" in report:
        m = report["memory"]
        lines += ["## Memory", "", f"Peak RSS with 8 concurrent 45 MiB uploads: **{m['peak_rss_mib']} MiB** "
                  f"({m['baseline_mib']} MiB at rest; statuses {sorted(set(m['accepted_45mib_x8_statuses']))}). "
                  f"A refused 50 MiB + 1 byte body (status {m['refused_status']}) grew it by "
                  f"{m['growth_on_refused_50mib_mib']} MiB.", ""]
    if "dedup" in report:
        d = report["dedup"]
        lines += ["## Dedup", "", f"{d['rows']:,} images in the catalog, {d['samples']} uploads timed after "
                  f"{d['warm_up']} untimed ones; catalog {d['bytes_per_image']} bytes per image.", ""]
        lines += _table(["step", "p50 ms", "p99 ms"], [
            ["check of new bytes", d["check_p50_ms"], d["check_p99_ms"]],
            ["recording the upload", d["insert_p50_ms"], d["insert_p99_ms"]],
            ["check plus record", d["check_plus_insert_p50_ms"], d["check_plus_insert_p99_ms"]],
            ["look-up of stored bytes (a duplicate)", d["duplicate_lookup_p50_ms"], d["duplicate_lookup_p99_ms"]]])
    if "forward" in report:
        f = report["forward"]
        cpu = ", ".join(f"{k} {v}" for k, v in f.get("cpu_ms_per_image", {}).items())
        lines += ["## Forwarder", "", f"{f['images']} pending {_size(f['size'])} images drained at concurrency "
                  f"{f['concurrency']} ({f['delivered']} delivered).", ""]
        lines += _table(["who", "images/s", "gateway / it"], [
            ["the gateway's forwarder", f["gateway_rate_per_s"], ""],
            ["plain client from memory (mean of before and after: "
             + " and ".join(map(str, f["plain_rates_before_after"])) + ")", f["plain_rate_per_s"], f["ratio"]],
            ["plain client reading each image from the store", f["store_to_cloud_rate_per_s"],
             f["ratio_vs_store_to_cloud"]]])
        lines += [f"CPU ms per forwarded image: {cpu}; catalog writes per transaction {f['catalog_group_size']}.", ""]
    if "startup" in report:
        s = report["startup"]
        lines += ["## Start-up", "", f"Ready {s['pending']['ready_s']} s after launch with "
                  f"{s['pending']['outbox_rows']:,} pending outbox rows ({s['empty']['ready_s']} s with an empty "
                  "catalog).", ""]
    if report.get("neardup"):
        lines += ["## Near-duplicate filter", "", "Filter on (keep) against off, real JPEGs, against a direct S3 "
                  "PUT (best rounds). fp CPU: fingerprint and comparison per fingerprinted upload; fp share: uploads "
                  "fingerprinted (the rest found no core to spare, or the CPU budget spent, and went unchecked). "
                  "Steady: the filter on at a quarter of the best rate with it off, below saturation; busier: at 60 % "
                  "of it (full runs only).", ""]
        lines += _table(["size", "concurrency", "off req/s", "on req/s", "S3 req/s", "off / S3", "on / S3", "drop",
                         "median drop of a round", "fp CPU ms", "fp share", "gateway CPU ms off / on",
                         "steady req/s", "steady fp share", "steady fp CPU ms", "busier req/s", "busier fp share"],
                        [[_size(r["size"]), r["concurrency"], r["off_rps"], r["on_rps"], r["s3_rps"], r["ratio_off"],
                          r["ratio_on"], r["ratio_drop"], r.get("median_round_drop", ""), r["fingerprint_cpu_ms"],
                          r["fingerprinted_share"],
                          f"{r['gateway_cpu_ms_per_request']['off']} / {r['gateway_cpu_ms_per_request']['on']}",
                          *_steady(r.get("steady")), *_steady(r.get("steady_busier"))[:2]]
                         for r in report["neardup"]])
    missing = [s for s in ("ingest", "memory", "dedup", "forward", "startup", "neardup") if s not in report]
    if missing:
        lines += [f"Not in this run: {', '.join(missing)} (`scripts/bench --only ...` chose the sections).", ""]
    return "\n".join(lines).rstrip() + "\n"


def _steady(steady: dict[str, Any] | None) -> list[Any]:
    """A near-duplicate row's steady round: rate, share fingerprinted, fingerprint CPU (reports from
    before it have none)."""
    if not steady:
        return ["", "", ""]
    return [steady["rps"], steady["fingerprinted_share"], steady["fingerprint_cpu_ms"]]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: scripts/benchdoc REPORT.json > docs/benchmarks.md", file=sys.stderr)
        return 2
    sys.stdout.write(markdown(json.loads(Path(argv[0]).read_text()), Path(argv[0]).name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
