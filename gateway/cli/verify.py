"""`gateway verify [--full] [--repair] [--sample N] [--json]`: the CLI side of `gateway.ops.verify`.

The check runs in the server (admin API) or in-process on a stopped server's files; meanwhile
this polls its progress and shows it on stderr (`display.StepBar`) once the run has taken more
than a second.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import anyio

from gateway.cli.control import Control
from gateway.cli.display import StepBar, table

_KINDS = [
    ("missing", "row without object, not delivered (lost locally)"),
    ("missing_delivered", "row without object, delivered (repair: mark bytes removed)"),
    ("stray", "object without row, older than the grace period (repair: remove)"),
    ("evicted_leftover", "object of an evicted image still present (repair: remove)"),
    ("size_mismatch", "object size differs from the catalog"),
    ("hash_mismatch", "object XXH3-128 differs from the catalog"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="hash every object (default: a random sample)")
    parser.add_argument("--sample", type=int, default=100, metavar="N", help="rows hashed without --full (100)")
    parser.add_argument("--repair", action="store_true",
                        help="remove old strays and evicted leftovers; mark delivered images whose bytes are gone")


async def cmd_verify(ctl: Control, args: argparse.Namespace) -> int:
    body = {"full": args.full, "repair": args.repair, "sample": args.sample}
    result: dict[str, Any] = {}

    async def run(done: anyio.Event) -> None:
        try:
            result["data"] = await ctl.call("POST", "/verify", body)
        finally:
            done.set()

    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, done)
        await _show_progress(ctl, done)
    data = result["data"]
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_render(data))
    return 0 if data["summary"]["unrepaired"] == 0 else 1


async def _show_progress(ctl: Control, done: anyio.Event) -> None:
    started = time.monotonic()
    bar = StepBar("verify")
    try:
        while not done.is_set():
            with anyio.move_on_after(0.5):
                await done.wait()
            if done.is_set() or time.monotonic() - started < 1.0:
                continue
            try:
                p = await ctl.call("GET", "/verify/progress")
            except Exception:  # progress is a courtesy; the run's own answer is what counts
                continue
            bar.show(str(p.get("phase", "")), int(p.get("done") or 0), int(p.get("total") or 0))
    finally:
        bar.close()


def _render(data: dict[str, Any]) -> str:
    s = data["summary"]
    mode = "all objects hashed" if data["full"] else f"{data['hashed']} object(s) hashed (sample)"
    lines = [f"checked {data['rows']} catalog row(s) against {data['objects']} object(s); {mode}, "
             f"{data['hashed_bytes']} bytes, in {data['duration_s']:.1f} s"]
    rows = [{"kind": kind, "count": s[kind], "meaning": meaning} for kind, meaning in _KINDS]
    rows.append({"kind": "recent strays", "count": data["strays_in_grace"], "meaning": "object without row, inside "
                 "the grace period or with an upload in progress (left alone)"})
    lines.append("")
    lines.append(table(rows, [("kind", "FINDING"), ("count", "COUNT"), ("meaning", "MEANING")], right=("count",)))
    if data["findings"]:
        lines.append("")
        for f in data["findings"][:50]:
            mark = "repaired" if f["repaired"] else "open"
            lines.append(f"  [{mark}] {f['kind']}: {f['key']} {f['detail']}")
        if len(data["findings"]) > 50:
            lines.append(f"  ... {len(data['findings']) - 50} more (use --json)")
    lines.append("")
    if s["unrepaired"]:
        hint = "" if data["repair"] else "; run with --repair to fix what is safe to fix"
        lines.append(f"{s['unrepaired']} problem(s) open, {s['repaired']} repaired{hint}")
    else:
        lines.append(f"consistent ({s['repaired']} repaired)" if s["repaired"] else "consistent")
    return "\n".join(lines)
