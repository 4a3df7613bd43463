"""Figures from test runs: printed as a table in the pytest output, and kept as JSON when asked.

docs/reliability.md quotes these tables; set `GATEWAY_FIGURES_DIR` to a folder to
also get one `<name>.json` per table there.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def report(config: pytest.Config, name: str, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
           summary: dict[str, Any] | None = None) -> None:
    """Print the table past pytest's capture; write `<name>.json` under $GATEWAY_FIGURES_DIR if set."""
    text = f"\n{title}\n{table(header, rows)}\n"
    if summary:
        text += "".join(f"{k}: {v}\n" for k, v in summary.items())
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line(text)
        else:
            print(text)
    out = os.environ.get("GATEWAY_FIGURES_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        payload = {"title": title, "header": list(header), "rows": [list(map(str, r)) for r in rows],
                   "summary": summary or {}}
        (Path(out) / f"{name}.json").write_text(json.dumps(payload, indent=2))


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def readme_section(folder: Path) -> str:
    """The tables of docs/reliability.md, from the JSON files a run left in `folder`."""
    out: list[str] = []
    bad = _load(folder, "bad_input")
    if bad:
        s = bad["summary"]
        out += ["### Bad input", "", f"{s['cases']} malformed or hostile requests "
                "(tests/integration/test_bad_input.py); after each: /api/health, catalog rows, stored objects "
                "and the spool checked.", "",
                table(["case", "expected", "got", "stored / spool / health"], bad["rows"]), "",
                "".join(f"- {k}: **{v}**\n" for k, v in s.items())]
    fuzz = _load(folder, "openapi_fuzz")
    if fuzz:
        out += ["### Fuzzing", "", f"Schemathesis over every operation of /schema/openapi.json plus hypothesis-made "
                f"JSON bodies: **{fuzz['summary']['requests']}** requests, answers "
                + ", ".join(f"{r[1]} x {r[0]}" for r in fuzz["rows"]) + f"; **{fuzz['summary']['5xx']}** 5xx.", ""]
    faults = _load(folder, "faults")
    if faults:
        out += ["### Faults injected", "", table(faults["header"], faults["rows"]), ""]
    for name, title in (("soak_short", "Soak, short (CI)"), ("soak_full", "Soak, full (scripts/soak)")):
        soak = _load(folder, name)
        if soak and "acknowledged" in soak:  # the raw figures of `scripts/soak --json`
            keep = [k for k, v in soak.items() if not isinstance(v, dict | list)]
            soak = {"rows": [(k, soak[k]) for k in keep]
                    + [("verify --full missing / mismatches",
                        f"{soak['verify']['missing']} / {soak['verify']['hash_mismatch']}")]}
        if soak:
            out += [f"### {title}", "", table(["figure", "value"], soak["rows"]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(readme_section(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GATEWAY_FIGURES_DIR", "."))))
