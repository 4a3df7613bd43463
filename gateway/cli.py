"""The `gateway` command: `serve`, and admin commands that work with the server running or stopped."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings, redacted
from gateway.control import Control, ControlError, connect


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


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


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
            print(_table(rows, [("device_id", "DEVICE"), ("name", "NAME"), ("state", "STATUS"),
                                ("origin", "ORIGIN"), ("last_seen_at", "LAST SEEN")]))
        return 0
    data = await ctl.call("POST", f"/devices/{args.action}", {"ref": args.ref})
    if args.json:
        print(json.dumps(data, indent=2))
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
        ("dead letters", str(s["dead_count"])),
        ("delivered", str(s["delivered_count"])),
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


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(redacted(settings), indent=2))
    return 0


# -- serve ---------------------------------------------------------------------------------


def serve(settings: Settings) -> int:
    import hypercorn.asyncio
    from hypercorn.config import Config as HypercornConfig

    from gateway import logs
    from gateway.app import create_app

    logs.configure(settings.log.level, settings.log.format)
    app = create_app(settings)
    config = HypercornConfig()
    config.bind = [settings.server.listen]
    config.graceful_timeout = settings.server.graceful_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75.0
    if settings.server.certfile and settings.server.keyfile:
        config.certfile = settings.server.certfile
        config.keyfile = settings.server.keyfile

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            app.state.gateway.shutting_down = True  # readiness turns 503 at once
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    try:
        asyncio.run(main())
    except Exception as exc:  # start-up failures: one clear line, non-zero exit
        print(f"gateway: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


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

    sub.add_parser("status", help="backlog, connectivity, last success and error, disk")

    for parser in [p, *sub.choices.values(), *dsub.choices.values()]:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="machine-readable output")
    return p


COMMANDS: dict[str, Callable[[Control, argparse.Namespace], Any]] = {
    "devices": cmd_devices,
    "status": cmd_status,
}


def extend(name: str, handler: Callable[[Control, argparse.Namespace], Any]) -> None:
    COMMANDS[name] = handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
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
