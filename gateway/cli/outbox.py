"""`gateway outbox list|retry`: per-image delivery state, and sending dead letters again."""

from __future__ import annotations

import argparse
import json
import sys

from gateway.cli.control import Control
from gateway.cli.display import cell, table
from gateway.humanize import human_bytes


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
    print(table(rows, [("image_id", "IMAGE"), ("device_id", "DEVICE"), ("state", "STATE"), ("bytes", "SIZE"),
                        ("attempts", "ATTEMPTS"), ("last_status", "STATUS"), ("when", "NEXT/DELIVERED"),
                        ("error", "LAST ERROR")]))
    return 0
