"""`gateway drain URL DEST`: the command line of the sync job (`gateway.syncjob.drain`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from gateway.cli.display import TransferBar
from gateway.syncjob.drain import AccessDenied, DrainError, DrainJob


def parse_rate(text: str) -> int:
    """Bytes per second, with an optional K, M or G suffix (powers of 1024): `500K`, `2M`."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 500K, 2M)")
    return int(float(match[1]) * units[match[2].upper()])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="the gateway, e.g. http://gateway:8080")
    p.add_argument("dest", metavar="DEST", type=Path, help="destination folder (one sub-folder per batch)")
    p.add_argument("--token", help="the gateway's [sync] token (default: $GATEWAY_SYNC_TOKEN)")
    p.add_argument("--jobs", type=int, default=4, help="images downloaded at once (default 4)")
    p.add_argument("--limit-rate", type=parse_rate, default=0, metavar="RATE",
                   help="bandwidth cap in bytes/s, e.g. 500K or 2M (default: unlimited)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on the gateway (default 60)")
    p.add_argument("--cacert", help="CA bundle or certificate to trust for an https:// gateway")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-batch lines")


def main(args: argparse.Namespace) -> int:
    """Exit 0: everything drainable was drained; 1: some batch failed (run again); 2: refused."""
    token = args.token or os.environ.get("GATEWAY_SYNC_TOKEN", "")
    if not token:
        print("gateway drain: no token (use --token or GATEWAY_SYNC_TOKEN)", file=sys.stderr)
        return 2
    job = DrainJob(
        args.url, args.dest, token, jobs=args.jobs, limit_rate=args.limit_rate, timeout_s=args.timeout,
        verify=args.cacert or True, progress=TransferBar(enabled=not args.quiet, label="drain"),
    )
    try:
        report = job.run()
    except AccessDenied as exc:
        print(f"gateway drain: refused: {exc}", file=sys.stderr)
        return 2
    except DrainError as exc:  # the batch list itself could not be fetched
        print(f"gateway drain: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gateway drain: interrupted (run again to resume)", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(report.__dict__, indent=2))
    if not args.quiet:
        print(f"drained {len(report.batches_drained)} batch(es): {report.images_downloaded} image(s) downloaded "
              f"({report.bytes_downloaded / 1048576:.1f} MiB), {report.images_kept} already here, "
              f"{len(report.batches_failed)} batch(es) failed, in {report.seconds:.1f} s", file=sys.stderr)
    return 1 if report.batches_failed else 0
