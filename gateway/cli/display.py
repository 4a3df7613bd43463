"""What the CLI and the drain job show people, through `rich`: tables on stdout, progress on stderr.

Tables are aligned columns under a heading line; on a terminal the heading is bold and the table
fits the window (long cells fold, nothing is cut), piped they are plain text one row a line, so
`grep`/`awk` keep working. Progress bars are drawn only when stderr is a terminal; stdout stays
clean for `--json`, and redirected stderr (cron, CI) gets the notes alone.
"""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

PLAIN_WIDTH = 100_000  # piped: never wrap a row


def cell(value: Any) -> str:
    """A value as a table shows it: None as '-', booleans as yes/no, unix times as local times."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value > 1e9:  # a unix time
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _render(grid: Table, live: bool) -> str:
    buf = io.StringIO()
    width = shutil.get_terminal_size().columns if live else PLAIN_WIDTH
    console = Console(file=buf, width=width, force_terminal=live, no_color=not live, highlight=False,
                      color_system="standard" if live else None)
    console.print(grid)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if not live or line.strip())


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], stream: TextIO | None = None,
          right: Sequence[str] = ()) -> str:
    """`rows` as a table for `stream` (stdout by default): `columns` is (key, heading); the
    columns of the keys in `right` are right-aligned (counts)."""
    live = is_terminal(stream if stream is not None else sys.stdout)
    grid = Table(box=box.SIMPLE_HEAD if live else None, show_edge=False, pad_edge=False, padding=(0, 1),
                 header_style="bold" if live else "")
    for key, heading in columns:
        grid.add_column(heading, overflow="fold", justify="right" if key in right else "left")
    for r in rows:
        grid.add_row(*(cell(r.get(k)) for k, _ in columns))
    return _render(grid, live)


def fields(pairs: Sequence[tuple[str, str]], stream: TextIO | None = None) -> str:
    """Name/value lines (`gateway status`, `batches show`): names aligned, bold on a terminal."""
    live = is_terminal(stream if stream is not None else sys.stdout)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold" if live else "", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in pairs:
        grid.add_row(key, value)
    return _render(grid, live)


class TransferBar:
    """Progress of a long transfer counted in items and bytes (the drain job); thread-safe.

        bar = TransferBar(label="drain")
        bar.start(total_items, total_bytes)    # either may be None
        bar.advance(1, nbytes=size)            # nbytes alone for a chunk; negative undoes a partial one
        bar.note("batch_x drained")            # a line above the bar (printed even when not a terminal)
        bar.finish()

    `enabled=False` silences it all; otherwise the bar is drawn only on a terminal."""

    def __init__(self, *, enabled: bool = True, label: str = "", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.notes_on = enabled
        self.label = label
        self.done = 0
        self.nbytes = 0
        self.total: int | None = None
        self._lock = threading.Lock()
        live = enabled and is_terminal(self.stream)
        self.console = Console(file=self.stream, highlight=False, force_terminal=live or None)
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), TaskProgressColumn(),
            TextColumn("{task.fields[items]}"), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not live, refresh_per_second=5,
        )
        self.task: TaskID | None = None

    def start(self, total: int | None = None, total_bytes: int | None = None) -> None:
        with self._lock:
            self.total = total
            self.task = self.bar.add_task(self.label, total=total_bytes, items=self._items())
            self.bar.start()

    def _items(self) -> str:
        return f"{self.done}/{self.total}" if self.total else str(self.done)

    def advance(self, images: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.done += images
            self.nbytes += nbytes
            if self.task is not None:
                self.bar.update(self.task, completed=self.nbytes, items=self._items())

    def note(self, text: str) -> None:
        if not self.notes_on:
            return
        with self._lock:
            if self.bar.live.is_started:
                self.bar.console.print(text, markup=False, highlight=False)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            self.bar.stop()


class StepBar:
    """Progress of work the CLI polls a server about (`gateway verify`): a bar on a terminal, else
    one plain line every `plain_every_s` seconds."""

    def __init__(self, label: str, stream: TextIO | None = None, plain_every_s: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = is_terminal(self.stream)
        self.label = label
        self.plain_every_s = plain_every_s
        self._last_line = float("-inf")
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), TaskProgressColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(file=self.stream, force_terminal=self.live or None),
                            disable=not self.live, transient=True)
        self.task = self.bar.add_task(label, total=None)
        self.started = time.monotonic()

    def show(self, phase: str, done: int, total: int | None) -> None:
        """The work's state as last polled."""
        if self.live:
            self.bar.start()
            self.bar.update(self.task, description=f"{self.label}: {phase}", completed=done, total=total or None)
            return
        now = time.monotonic()
        if now - self._last_line >= self.plain_every_s:
            of = f"/{total}" if total else ""
            self.stream.write(f"{self.label}: {phase} {done}{of}  {now - self.started:.0f}s\n")
            self.stream.flush()
            self._last_line = now

    def close(self) -> None:
        self.bar.stop()
