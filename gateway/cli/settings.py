"""`gateway config`: the effective settings, of the running server when one answers, with sources."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.cli.control import ControlError, probe, where_to_set
from gateway.cli.display import table
from gateway.config import LoadedSettings
from gateway.config.rows import settings_rows


async def cmd_config(loaded: LoadedSettings, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]]
    ctl = await probe(loaded)
    if ctl is not None:
        try:
            rows = await ctl.call("GET", "/config")
        finally:
            await ctl.close()
        where = f"the running server at {ctl.where}"
    else:
        rows = settings_rows(loaded.settings, loaded)
        where = (f"{loaded.file or 'defaults (no settings file found)'} (no server answered at "
                 f"{loaded.settings.admin_url} with an admin token this CLI has; {where_to_set(loaded)})")
    if args.json:
        print(json.dumps({"from": where, "settings": {r["key"]: {"value": r["value"], "source": r["source"]}
                                                      for r in rows}}, indent=2))
        return 0
    print(f"settings of {where}")
    print(table(rows, [("key", "KEY"), ("shown", "VALUE"), ("source", "SOURCE")]))
    return 0


__all__ = ["ControlError", "cmd_config"]
