"""`gateway journal quarantine list|apply|drop`: settle catalog journal records DuckDB refused."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli.control import Control


def add_arguments(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:  # type: ignore[type-arg]
    """Add `journal quarantine ...` to the CLI; returns the parsers that take `--json`."""
    journal = sub.add_parser("journal", help="catalog journal records DuckDB refused (quarantine)")
    jsub = journal.add_subparsers(dest="group", required=True, metavar="GROUP")
    quarantine = jsub.add_parser("quarantine", help="list, apply again or drop quarantined journal records")
    qsub = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    qlist = qsub.add_parser("list", help="quarantined records: why, and what each held (image ids, keys)")
    qapply = qsub.add_parser("apply", help="apply records again (after a fix); those DuckDB takes leave")
    qapply.add_argument("--all", action="store_true", help="every quarantined record")
    qapply.add_argument("ids", nargs="*", metavar="ID")
    qdrop = qsub.add_parser("drop", help="give records up for good, listing what they held")
    qdrop.add_argument("ids", nargs="+", metavar="ID")
    return [quarantine, qlist, qapply, qdrop]  # `journal` itself is among the subcommands already


def _describe(record: dict[str, Any]) -> str:
    held = record["held"]
    kinds = ", ".join(f"{kind} {n}" for kind, n in held["records"].items()) or "no records"
    lines = [f"{record['id']}  {kinds}", f"    reason: {record['reason'][:300]}"]
    lines += [f"    image {i}" for i in held["image_ids"]]
    lines += [f"    object {k}" for k in held["storage_keys"]]
    lines += [f"    sealed batch {b}" for b in held["sealed_batches"]]
    if held.get("unreadable"):
        lines.append(f"    not readable by this gateway: {held['unreadable'][:300]}")
    return "\n".join(lines)


async def cmd_journal(ctl: Control, args: argparse.Namespace) -> int:
    base = "/journal/quarantine"
    if args.action == "list":
        rows = await ctl.call("GET", f"{base}/")
        print(json.dumps(rows, indent=2) if args.json else "\n".join(_describe(r) for r in rows)
              or "no quarantined journal records")
        return 0
    if args.action == "apply":
        if args.all == bool(args.ids):
            print("gateway journal quarantine apply: give --all or one or more IDs", file=sys.stderr)
            return 2
        data = await ctl.call("POST", f"{base}/apply", {"all": True} if args.all else {"ids": args.ids})
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(f"{len(data['applied'])} record(s) applied")
            for record_id, reason in data["refused"].items():
                print(f"{record_id}: still refused: {reason}")
        return 1 if data["refused"] else 0
    data = await ctl.call("POST", f"{base}/drop", {"ids": args.ids})
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"{len(data['dropped'])} record(s) dropped; they held:")
        for record in data["dropped"]:
            print(_describe(record))
    return 0
