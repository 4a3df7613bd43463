"""Named pause points for the crash tests (`tests/e2e/test_overlap_crash.py`).

`GATEWAY_FAILPOINTS=name[:seconds][,...]` in the environment makes the code that reaches one of
those points write `<data>/failpoints/<name>` and then wait there for good (or `seconds`), so that
a test can kill -9 the process inside one exact window (the upload's record written but not its
object, and so on), or act while it waits. Unset, as always outside those tests, a point costs
one look-up in an empty dict.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

ENV = "GATEWAY_FAILPOINTS"


class Failpoints:
    """The points named in the environment, and where to say that one was reached."""

    def __init__(self, data_dir: Path, names: str | None = None) -> None:
        raw = os.environ.get(ENV, "") if names is None else names
        self.points: dict[str, float | None] = {}
        for item in filter(None, (n.strip() for n in raw.split(","))):
            name, _, seconds = item.partition(":")
            self.points[name] = float(seconds) if seconds else None
        self.folder = data_dir / "failpoints"

    async def reach(self, name: str) -> None:
        """Pause here if `name` is armed (after saying so in the failpoints folder)."""
        if name not in self.points:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(f"{os.getpid()}\n")
        seconds = self.points[name]
        if seconds is None:
            await anyio.sleep_forever()
        else:
            await anyio.sleep(seconds)
