"""`gateway tokens create|list|revoke`: provisioning tokens for devices' setup scripts (local mode)."""

from __future__ import annotations

import argparse
import json
import sys

from gateway.cli.control import Control
from gateway.cli.display import cell, table


def add_arguments(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:  # type: ignore[type-arg]
    """Add `tokens` and its actions to the CLI; returns the parsers that take `--json`."""
    tok = sub.add_parser("tokens", help="provisioning tokens: create, list, revoke")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = tsub.add_parser("create", help="make a token; prints it once, with the device's setup line")
    create.add_argument("name", help="what the token is for, e.g. 'line 3 cameras'")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in-days", type=float, metavar="N", help="valid for N days (default 7)")
    expiry.add_argument("--never-expires", action="store_true", help="valid until revoked")
    create.add_argument("--single-use", action="store_true", help="provisions one device only")
    tlist = tsub.add_parser("list", help="every token (never the token itself)")
    revoke = tsub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id", metavar="ID")
    return [create, tlist, revoke]


async def cmd_tokens(ctl: Control, args: argparse.Namespace) -> int:
    if args.action == "create":
        body = {"name": args.name, "expires_in_days": args.expires_in_days, "never_expires": args.never_expires,
                "single_use": args.single_use}
        data = await ctl.call("POST", "/tokens", body)
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        t = data["token"]
        use = "single use" if t["single_use"] else "reusable"
        print(f"created provisioning token {t['token_id']} ({t['name']}), {use}, expires {cell(t['expires_at'])}")
        print(f"token (shown once): {data['value']}")
        print(f"device setup: {data['setup']}")
        if data["mode"] != "local":
            print("note: provisioning relays to the cloud here ([provisioning] mode); this token works only with "
                  "mode = 'local'", file=sys.stderr)
        return 0
    if args.action == "revoke":
        t = await ctl.call("POST", "/tokens/revoke", {"ref": args.token_id})
        print(json.dumps(t, indent=2) if args.json else f"token {t['token_id']} ({t['name']}): revoked")
        return 0
    rows = await ctl.call("GET", "/tokens")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        r["use"] = "single" if r["single_use"] else "multi"
        r["revoked"] = r["revoked_at"] is not None
    print(table(rows, [("token_id", "ID"), ("name", "NAME"), ("use", "USE"), ("use_count", "USED"),
                        ("created_at", "CREATED"), ("expires_at", "EXPIRES"), ("last_used_at", "LAST USED"),
                        ("revoked", "REVOKED")]))
    return 0
