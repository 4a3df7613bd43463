"""`gateway devices ...`: add, list, show, rename, set-key, remove, approve, reject, revoke, near-dup."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli.control import Control
from gateway.cli.display import cell, table


def add_arguments(sub: Any) -> list[argparse.ArgumentParser]:
    """The `devices` verbs; returns their parsers (each gets `--json`)."""
    dev = sub.add_parser("devices", help="add, list, show, rename, set-key, remove, approve, reject, revoke devices")
    dsub = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = dsub.add_parser("add", help="register a device; prints its new key once")
    add.add_argument("name")
    add.add_argument("--key", help="register an existing cloud key instead of generating one")
    add.add_argument("--device-id", help="use this device id (default: a new dev_<uuid>)")
    add.add_argument("--status", choices=("approved", "pending"), default="approved")
    dsub.add_parser("list", help="list devices")
    dsub.add_parser("show", help="one device: status, key origin, images and undelivered entries").add_argument(
        "ref", metavar="DEVICE")
    rename = dsub.add_parser("rename", help="give a device another name")
    rename.add_argument("ref", metavar="DEVICE")
    rename.add_argument("name")
    set_key = dsub.add_parser("set-key", help="give a device another key, e.g. the one the cloud knows; then "
                                              "`outbox retry` sends its dead letters")
    set_key.add_argument("ref", metavar="DEVICE")
    set_key.add_argument("key", metavar="KEY")
    remove = dsub.add_parser("remove", help="forget a device (refused while it has undelivered images)")
    remove.add_argument("ref", metavar="DEVICE")
    remove.add_argument("--force", action="store_true", help="remove even so; its undelivered images are dead-lettered")
    for action in ("approve", "reject", "revoke"):
        a = dsub.add_parser(action, help=f"{action} a device, by device id, key or name")
        a.add_argument("ref", metavar="DEVICE")
    nd = dsub.add_parser("near-dup", help="switch a device's near-duplicate filter on or off (off: exempt)")
    nd.add_argument("ref", metavar="DEVICE")
    nd.add_argument("switch", choices=("on", "off"))
    return list(dsub.choices.values())


async def cmd_devices(ctl: Control, args: argparse.Namespace) -> int:
    if getattr(args, "ref", None):
        args.ref = args.ref.strip()  # a pasted key's stray space is no part of it
    if args.action == "add":
        return await _add(ctl, args)
    if args.action == "list":
        return await _list(ctl, args)
    if args.action == "show":
        return await _show(ctl, args)
    change: dict[str, Any] = {"ref": args.ref}
    if args.action == "near-dup":
        change["on"] = args.switch == "on"
    elif args.action == "rename":
        change["name"] = args.name
    elif args.action == "set-key":
        change["key"] = args.key.strip()
    elif args.action == "remove":
        change["force"] = args.force
    data = await ctl.call("POST", f"/devices/{args.action}", change)
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.action == "near-dup":
        state = "off (exempt)" if data["near_dup_exempt"] else "on"
        print(f"device {data['device_id']} ({data['name']}): near-duplicate filter {state}")
    elif args.action == "remove":
        dead = f"; {data['dead_lettered']} undelivered image(s) dead-lettered" if data["dead_lettered"] else ""
        print(f"device {data['device_id']} ({data['name']}) removed{dead}")
    elif args.action == "set-key":
        print(f"device {data['device_id']} ({data['name']}): new key set; the old one no longer works. "
              "Images dead-lettered under the old key: `gateway outbox retry`")
    else:
        state = "revoked" if data["revoked"] else data["status"]
        print(f"device {data['device_id']} ({data['name']}): {state}")
    return 0


async def _add(ctl: Control, args: argparse.Namespace) -> int:
    key = args.key.strip() if args.key else None
    body = {"name": args.name, "key": key, "device_id": args.device_id, "status": args.status}
    data = await ctl.call("POST", "/devices", body)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        d = data["device"]
        print(f"added device {d['device_id']} ({d['name']}), status {d['status']}")
        if not key:
            print(f"key (shown once, give it to the device): {data['key']}")
    if data.get("generated") and data.get("cloud_url"):
        print(f"warning: forwarding is on ({data['cloud_url']}) and this key was made here: the cloud does not "
              "know it and will refuse this device's images (401) until the key is registered at the cloud. "
              "Register it there, or use the cloud's key: `gateway devices set-key "
              f"{data['device']['device_id']} CLOUD_KEY` (or `devices add --key CLOUD_KEY`)", file=sys.stderr)
    return 0


async def _list(ctl: Control, args: argparse.Namespace) -> int:
    rows = await ctl.call("GET", "/devices")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        r["state"] = "revoked" if r["revoked"] else r["status"]
        r["requests"] = len(r["pending_requests"])
        r["near_dup"] = "off" if r.get("near_dup_exempt") else "on"
    print(table(rows, [("device_id", "DEVICE"), ("name", "NAME"), ("state", "STATUS"),
                       ("origin", "ORIGIN"), ("near_dup", "NEAR-DUP"), ("last_seen_at", "LAST SEEN"),
                       ("last_model_id", "MODEL"), ("last_ip", "IP"), ("requests", "PENDING REQ")]))
    return 0


async def _show(ctl: Control, args: argparse.Namespace) -> int:
    d = await ctl.call("GET", f"/devices/{args.ref}")
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    u = d["usage"]
    fields = [("device", d["device_id"]), ("name", d["name"]),
              ("status", "revoked" if d["revoked"] else d["status"]), ("origin", d["origin"]),
              ("organization", d["organization_id"]), ("created", cell(d["created_at"])),
              ("last seen", cell(d["last_seen_at"])), ("last status", cell(d["last_status"])),
              ("model", cell(d["last_model_id"])), ("ip", cell(d["last_ip"])),
              ("near-dup filter", "off (exempt)" if d["near_dup_exempt"] else "on"),
              ("images", str(u.get("images", 0))),
              ("undelivered", f"{u.get('pending', 0)} pending, {u.get('held', 0)} held, {u.get('dead', 0)} dead"),
              ("delivered", str(u.get("delivered", 0)))]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    return 0
