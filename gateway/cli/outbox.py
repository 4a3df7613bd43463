"""`gateway outbox list|retry`: per-image delivery state, and sending dead letters again."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli.control import Control
from gateway.cli.display import cell, table
from gateway.humanize import human_age, human_bytes


def add_arguments(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:  # type: ignore[type-arg]
    """Add `outbox` and its actions to the CLI; returns the parsers that take `--json`."""
    out = sub.add_parser("outbox", help="per-image delivery state: list entries, retry dead letters")
    osub = out.add_subparsers(dest="action", required=True, metavar="ACTION")
    olist = osub.add_parser("list", help="undelivered entries (pending, held, dead, skipped), oldest first")
    olist.add_argument("--dead", action="store_true", help="only dead letters")
    olist.add_argument("--state", help="comma-separated states, or 'all' (default: pending,held,dead,skipped)")
    olist.add_argument("--device", metavar="ID", help="only this device's entries")
    olist.add_argument("--limit", type=int, default=100, help="at most this many (1..10000)")
    retry = osub.add_parser("retry", help="send dead letters (attempts reset) or held near-duplicates")
    retry.add_argument("--all-dead", action="store_true", help="every dead letter")
    retry.add_argument("--all-skipped", action="store_true", help="every near-duplicate held at the edge")
    retry.add_argument("image_ids", nargs="*", metavar="IMAGE_ID")
    return [olist, retry]  # `outbox` itself is among the subcommands already


async def cmd_outbox(ctl: Control, args: argparse.Namespace) -> int:
    if args.action == "retry":
        if args.all_dead + args.all_skipped + bool(args.image_ids) != 1:
            print("gateway outbox retry: give --all-dead, --all-skipped or one or more IMAGE_IDs", file=sys.stderr)
            return 2
        body: dict[str, object] = {"image_ids": args.image_ids}
        if args.all_dead or args.all_skipped:
            body = {"all_dead": True} if args.all_dead else {"all_skipped": True}
        data = await ctl.call("POST", "/outbox/retry", body)
        released = f", {data['released']} held near-duplicate(s) released" if data.get("released") else ""
        print(json.dumps(data, indent=2) if args.json else f"{data['retried']} dead letter(s) queued again{released}")
        return 0
    state = "dead" if args.dead else (args.state or "pending,held,dead,skipped")
    params: dict[str, object] = {"state": state, "limit": args.limit}
    if args.device:
        params["device"] = args.device
    rows = await ctl.call("GET", "/outbox", params=params)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        r["bytes"] = human_bytes(r["size"])
        r["when"] = cell(r["delivered_at"] if r["state"] == "delivered" else r["next_attempt_at"])
        r["error"] = (r["last_error"] or "")[:60].replace("\n", " ")
        waits = r.get("waits_for")
        r["waits"] = waits if isinstance(waits, str) else f"{waits['window']} at {cell(waits['at'])}" if waits else ""
    print(table(rows, [("image_id", "IMAGE"), ("device_id", "DEVICE"), ("class", "CLASS"), ("state", "STATE"),
                        ("waits", "WAITS FOR"), ("bytes", "SIZE"),
                        ("attempts", "ATTEMPTS"), ("last_status", "STATUS"), ("when", "NEXT/DELIVERED"),
                        ("error", "LAST ERROR")]))
    return 0


def uplink_lines(uplink: dict[str, Any], cell: Any) -> list[tuple[str, str]]:
    """`gateway status` lines for the current window and each class's backlog (`UplinkPlan.report`)."""
    w = uplink.get("window") or {}
    classes = uplink.get("classes") or []
    if not w and not classes:
        return []
    cap = f"at most {human_bytes(w['cap_bytes_per_s'])}/s" if w.get("cap_bytes_per_s") else "no cap"
    if not w.get("configured"):
        now = f"no windows: any time, {cap}"
    elif w.get("current"):
        now = f"{w['current']}, {cap}"
    else:
        now = f"outside every window: only always-classes, {cap}"
    if w.get("next_change_at"):
        now += f"; {w['next_change']} at {cell(w['next_change_at'])}"
    lines = [("window", now)]
    for c in classes:
        waits = c.get("waits_for")
        when = "sending" if c["sending_now"] else f"waits for {waits['window']} at {cell(waits['at'])}" if waits \
            else "no window sends it"
        lines.append((f"class {c['name']}", f"priority {c['priority']}{', always' if c['always'] else ''}: "
                                             f"{c['pending_count']} pending ({human_bytes(c['pending_bytes'])}), "
                                             f"oldest {human_age(c['oldest_pending_age_s'])}, {when}"))
    return lines
