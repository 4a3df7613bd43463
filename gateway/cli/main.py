"""The `gateway` command: `serve`, and admin commands that work with the server running or stopped."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from gateway import __version__
from gateway.cli.control import Control, ControlError, connect
from gateway.cli.journal import add_arguments as add_journal_arguments
from gateway.cli.journal import cmd_journal
from gateway.cli.outbox import add_arguments as add_outbox_arguments
from gateway.cli.outbox import cmd_outbox
from gateway.cli.tokens import add_arguments as add_tokens_arguments
from gateway.cli.tokens import cmd_tokens
from gateway.cli.verify import add_arguments as add_verify_arguments
from gateway.cli.verify import cmd_verify
from gateway.config import ConfigError, Settings, load_settings, redacted
from gateway.errors import StartRefused
from gateway.humanize import human_age, human_bytes


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain text table: `columns` is (key, heading)."""
    cells = [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value > 1e9:  # a unix time
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


# -- commands ------------------------------------------------------------------------------


async def cmd_devices(ctl: Control, args: argparse.Namespace) -> int:
    if args.action == "add":
        body = {"name": args.name, "key": args.key, "device_id": args.device_id, "status": args.status}
        data = await ctl.call("POST", "/devices", body)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            d = data["device"]
            print(f"added device {d['device_id']} ({d['name']}), status {d['status']}")
            if not args.key:
                print(f"key (shown once, give it to the device): {data['key']}")
        return 0
    if args.action == "list":
        rows = await ctl.call("GET", "/devices")
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                r["state"] = "revoked" if r["revoked"] else r["status"]
                r["requests"] = len(r["pending_requests"])
                r["near_dup"] = "off" if r.get("near_dup_exempt") else "on"
            print(_table(rows, [("device_id", "DEVICE"), ("name", "NAME"), ("state", "STATUS"),
                                ("origin", "ORIGIN"), ("near_dup", "NEAR-DUP"), ("last_seen_at", "LAST SEEN"),
                                ("last_model_id", "MODEL"), ("last_ip", "IP"), ("requests", "PENDING REQ")]))
        return 0
    change: dict[str, Any] = {"ref": args.ref}
    if args.action == "near-dup":
        change["on"] = args.switch == "on"
    data = await ctl.call("POST", f"/devices/{args.action}", change)
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.action == "near-dup":
        state = "off (exempt)" if data["near_dup_exempt"] else "on"
        print(f"device {data['device_id']} ({data['name']}): near-duplicate filter {state}")
    else:
        state = "revoked" if data["revoked"] else data["status"]
        print(f"device {data['device_id']} ({data['name']}): {state}")
    return 0


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
        ("last success", _cell(s["last_success_at"])),
        ("last error", s["last_error"] or "-"),
        ("time to drain", human_age(s["eta_s"])),
        ("disk free", human_bytes(s["disk_free_bytes"])),
        ("catalog", human_bytes(s["catalog_bytes"])),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
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
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    print()
    print(_table(data["manifest"], [("image_id", "IMAGE"), ("filename", "FILE"), ("size", "BYTES"),
                                    ("xxh3_128", "XXH3-128"), ("cloud_image_id", "CLOUD IMAGE")]))
    return 0


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(redacted(settings), indent=2))
    return 0


# -- serve ---------------------------------------------------------------------------------


def serve(settings: Settings) -> int:
    # A stop signal that arrives while we are still starting must not kill the process: note it,
    # and stop cleanly as soon as the server is up.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))

    import hypercorn.asyncio
    from hypercorn.config import Config as HypercornConfig

    from gateway import logs
    from gateway.api.connections import protect
    from gateway.app import create_app
    from gateway.system import eventloop, malloc

    # Everything the server creates (data folder, catalog, objects, manifests, spool) is for its own
    # user only: folders 0700, files 0600.
    os.umask(0o077)
    malloc.tune_for_images()
    logs.configure(settings.log.level, settings.log.format)
    app = create_app(settings)
    config = HypercornConfig()
    config.bind = [settings.server.listen]
    config.graceful_timeout = settings.server.graceful_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # hypercorn's idle timer runs from the connection's start (or its previous answer) until a
    # request's headers are complete: it is both the header timeout and the keep-alive timeout.
    config.keep_alive_timeout = settings.server.header_timeout_s
    if settings.server.certfile and settings.server.keyfile:
        config.certfile = settings.server.certfile
        config.keyfile = settings.server.keyfile

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            app.state.gateway.stop_accepting()  # readiness turns 503 at once
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if early:
            on_signal()
        served = protect(app, settings.server)
        await hypercorn.asyncio.serve(served, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    try:
        eventloop.run(main)
    except Exception as exc:  # start-up failures: one clear line, non-zero exit
        refused = _start_refused(exc)
        if refused is not None:  # data would be lost or misread: status 2, the operator must act
            print(f"gateway: refusing to start: {refused}", file=sys.stderr)
            return 2
        print(f"gateway: cannot serve: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a repeated stop signal while exiting changes nothing
            signal.signal(sig, signal.SIG_IGN)
    return 0


def _start_refused(exc: BaseException) -> StartRefused | None:
    """The `StartRefused` behind a start-up failure, however the server wrapped it."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, StartRefused):
            return cur
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return None


# -- argument parsing ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="AcuSight edge ingest gateway")
    p.add_argument("--config", metavar="FILE", help="settings file (default: $GATEWAY_CONFIG or config/gateway.toml)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", help="run the server")
    sub.add_parser("config", help="show the effective settings (secrets redacted)")

    dev = sub.add_parser("devices", help="add, list, approve, reject, revoke devices")
    dsub = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = dsub.add_parser("add", help="register a device; prints its new key once")
    add.add_argument("name")
    add.add_argument("--key", help="register an existing cloud key instead of generating one")
    add.add_argument("--device-id", help="use this device id (default: a new dev_<uuid>)")
    add.add_argument("--status", choices=("approved", "pending"), default="approved")
    dsub.add_parser("list", help="list devices")
    for action in ("approve", "reject", "revoke"):
        a = dsub.add_parser(action, help=f"{action} a device, by device id or key")
        a.add_argument("ref", metavar="DEVICE_ID_OR_KEY")
    nd = dsub.add_parser("near-dup", help="switch a device's near-duplicate filter on or off (off: exempt)")
    nd.add_argument("ref", metavar="DEVICE_ID_OR_KEY")
    nd.add_argument("switch", choices=("on", "off"))

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

    for parser in [p, *sub.choices.values(), *dsub.choices.values(), *bsub.choices.values(), *outbox_parsers,
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
        settings = load_settings(args.config)
    except ConfigError as exc:
        print("gateway: bad configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    if args.command == "config":
        return cmd_config(settings, args)
    handler = COMMANDS[args.command]

    async def run() -> int:
        ctl = await connect(settings)
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
