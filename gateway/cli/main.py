"""The `gateway` command: `serve`, and admin commands that work with the server running or stopped."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from gateway import __version__
from gateway.cli import statustext
from gateway.cli.backup import add_arguments as add_backup_arguments
from gateway.cli.backup import cmd_backup, cmd_restore
from gateway.cli.control import Control, ControlError, connect
from gateway.cli.devices import add_arguments as add_device_arguments
from gateway.cli.devices import cmd_devices
from gateway.cli.display import cell as _cell
from gateway.cli.display import fields as _fields
from gateway.cli.display import table as _table
from gateway.cli.journal import add_arguments as add_journal_arguments
from gateway.cli.journal import cmd_journal
from gateway.cli.outbox import add_arguments as add_outbox_arguments
from gateway.cli.outbox import cmd_outbox, uplink_lines
from gateway.cli.serve import serve
from gateway.cli.settings import cmd_config
from gateway.cli.tokens import add_arguments as add_tokens_arguments
from gateway.cli.tokens import cmd_tokens
from gateway.cli.verify import add_arguments as add_verify_arguments
from gateway.cli.verify import cmd_verify
from gateway.config import ConfigError, check_listen, load
from gateway.errors import StartRefused
from gateway.humanize import human_age, human_bytes

# -- commands ------------------------------------------------------------------------------


async def cmd_status(ctl: Control, args: argparse.Namespace) -> int:
    s = await ctl.call("GET", "/status")
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    batches = ", ".join(f"{k} {v}" for k, v in sorted(s["batches"].items())) or "none"
    lines = [
        ("source", ctl.where),
        ("connectivity", s["connectivity"]),
        ("images", f"{s['images']} ({human_bytes(s['image_bytes'])})"),
        ("devices", str(s["devices"])),
        ("batches", batches),
        ("pending", f"{s['backlog_count']} ({human_bytes(s['backlog_bytes'])}), "
                    f"{s['held_count']} held for key confirmation"),
        ("oldest pending", human_age(s["oldest_pending_age_s"])),
        ("dead letters", str(s["dead_count"]) + (
            f" ({s['key_unreadable_count']} device key unreadable: check keys.secret_file)"
            if s.get("key_unreadable_count") else "")),
        ("delivered", str(s["delivered_count"])),
        *([("journal quarantine", f"{s['journal_quarantined']} record(s) DuckDB refused: "
                                  "see `gateway journal quarantine list`")] if s.get("journal_quarantined") else []),
        ("last success", statustext.last_success(s)),
        ("last error", statustext.last_error(s)),
        ("backlog sent", statustext.outlook(s)),
        *uplink_lines(s.get("uplink") or {}, _cell),
        ("disk free", human_bytes(s["disk_free_bytes"])),
        ("catalog", human_bytes(s["catalog_bytes"])),
    ]
    print(_fields(lines))
    return 0


async def cmd_batches(ctl: Control, args: argparse.Namespace) -> int:
    if args.action == "list":
        params = {"limit": args.limit, "offset": args.offset} | ({"state": args.state} if args.state else {})
        rows = await ctl.call("GET", "/batches", params=params)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                r["size"] = human_bytes(r["total_bytes"])
                r["manifest"] = "yes" if r["manifest_key"] else "no"
            print(_table(rows, [("batch_id", "BATCH"), ("device_id", "DEVICE"), ("state", "STATE"),
                                ("image_count", "IMAGES"), ("size", "SIZE"), ("opened_at", "OPENED"),
                                ("sealed_at", "SEALED"), ("manifest", "MANIFEST")]))
        return 0
    if args.action == "seal":
        data = await ctl.call("POST", f"/batches/{args.batch_id}/seal")
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            b = data["batch"]
            print(f"batch {b['batch_id']}: " + ("sealed" if data["sealed_now"] else f"already {b['state']}")
                  + f" ({b['image_count']} image(s))")
        return 0
    data = await ctl.call("GET", f"/batches/{args.batch_id}")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    b = data["batch"]
    fields = [("batch", b["batch_id"]), ("device", b["device_id"]), ("state", b["state"]),
              ("images", f"{b['image_count']} ({human_bytes(b['total_bytes'])})"),
              ("opened", _cell(b["opened_at"])), ("sealed", _cell(b["sealed_at"])),
              ("forwarded", _cell(b["forwarded_at"])), ("drained", _cell(b["drained_at"])),
              ("manifest", f"{b['manifest_key']} ({_cell(b['manifest_at'])})" if b["manifest_key"] else "-")]
    print(_fields(fields))
    print()
    print(_table(data["manifest"], [("image_id", "IMAGE"), ("filename", "FILE"), ("size", "BYTES"),
                                    ("xxh3_128", "XXH3-128"), ("cloud_image_id", "CLOUD IMAGE")]))
    return 0


# -- argument parsing ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="AcuSight edge ingest gateway")
    p.add_argument("--config", metavar="FILE", help="settings file (default: $GATEWAY_CONFIG or config/gateway.toml)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = sub.add_parser("serve", help="run the server")
    serve_parser.add_argument("--listen", metavar="HOST:PORT",
                              help="address to listen on, instead of server.listen (the CLI finds the server "
                                   "through server.listen: set it there to use the CLI on another port)")
    sub.add_parser("config", help="the effective settings, of the running server if one answers, with sources")

    device_parsers = add_device_arguments(sub)

    sub.add_parser("status", help="backlog, connectivity, last success and error, disk")

    add_verify_arguments(sub.add_parser("verify", help="check the catalog against the object store, both ways"))

    bat = sub.add_parser("batches", help="list, show and seal batches")
    bsub = bat.add_subparsers(dest="action", required=True, metavar="ACTION")
    blist = bsub.add_parser("list", help="list batches, oldest first")
    blist.add_argument("--state", choices=("collecting", "sealed", "forwarded", "drained"))
    blist.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    blist.add_argument("--offset", type=int, default=0)
    bsub.add_parser("show", help="a batch and its manifest rows").add_argument("batch_id", metavar="BATCH_ID")
    bsub.add_parser("seal", help="seal a collecting batch now").add_argument("batch_id", metavar="BATCH_ID")

    from gateway.syncjob.cli import add_arguments as add_drain_arguments

    add_drain_arguments(sub.add_parser(
        "drain", help="sync job: copy drainable batches from a gateway into a folder, verify, ack"))

    outbox_parsers = add_outbox_arguments(sub)
    token_parsers = add_tokens_arguments(sub)
    journal_parsers = add_journal_arguments(sub)
    add_backup_arguments(sub)  # top-level verbs: --json comes with sub.choices

    for parser in [p, *sub.choices.values(), *device_parsers, *bsub.choices.values(), *outbox_parsers,
                   *token_parsers, *journal_parsers]:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="machine-readable output")
    return p


COMMANDS: dict[str, Callable[[Control, argparse.Namespace], Any]] = {
    "devices": cmd_devices,
    "status": cmd_status,
    "verify": cmd_verify,
    "batches": cmd_batches,
    "outbox": cmd_outbox,
    "tokens": cmd_tokens,
    "journal": cmd_journal,
    "backup": cmd_backup,
}


def extend(name: str, handler: Callable[[Control, argparse.Namespace], Any]) -> None:
    COMMANDS[name] = handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    if args.command == "drain":  # a client of some gateway: the local settings play no part
        from gateway.syncjob.cli import main as drain_main

        return drain_main(args)
    try:
        loaded = load(args.config)
        if getattr(args, "listen", None):
            problems = check_listen(args.listen, "serve --listen")
            if problems:
                raise ConfigError(problems)
            loaded.settings.server.listen = args.listen
            loaded.sources["server.listen"] = "command line"
    except ConfigError as exc:
        print("gateway: bad configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(loaded)
    if args.command == "restore":  # a stopped gateway's files only
        return cmd_restore(loaded, args)

    async def run() -> int:
        if args.command == "config":
            return await cmd_config(loaded, args)
        handler = COMMANDS[args.command]
        ctl = await connect(loaded)
        try:
            return int(await handler(ctl, args))
        finally:
            await ctl.close()

    try:
        return anyio.run(run)
    except ControlError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except StartRefused as exc:  # working on a stopped server's files that must not be opened as they are
        print(f"gateway: refusing to open the catalog: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gateway ... | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
