"""Figures from test runs: printed as a table in the pytest output, and kept as JSON when asked.

Set `GATEWAY_FIGURES_DIR` to a folder to also get one `<name>.json` per table there (with the
run's date, machine and commit); `scripts/reliabilitydoc FOLDER > docs/reliability.md` then
generates the whole document from those files and `reliability.md.in` (its prose), so no figure
in it is pasted by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
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
                   "summary": summary or {}, "run": run_info()}
        (Path(out) / f"{name}.json").write_text(json.dumps(payload, indent=2))


def run_info() -> dict[str, Any]:
    """When and where the figures were made."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": commit,
            "cpus": os.cpu_count(), "cpu_model": model or platform.machine(), "system": platform.platform()}


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


TEMPLATE = Path(__file__).with_name("reliability.md.in")
RERUN = {
    "bad_input": "tests/integration/test_bad_input.py", "openapi_fuzz": "tests/integration/test_openapi_fuzz.py",
    "faults": "tests/integration/test_faults.py", "soak_short": "tests/e2e/test_soak.py",
    "soak_full": "scripts/soak --json FOLDER/soak_full.json", "cluster": "tests/e2e/test_cluster_failure.py",
}


def _missing(name: str) -> str:
    return f"_Not in this generation: run `{RERUN[name]}` with `GATEWAY_FIGURES_DIR` set, then generate again._"


def _soak(folder: Path, name: str) -> dict[str, Any] | None:
    soak = _load(folder, name)
    if soak and "acknowledged" in soak:  # the raw figures of `scripts/soak --json`
        keep = [k for k, v in soak.items() if not isinstance(v, dict | list)]
        rows = [[k, soak[k]] for k in keep] + [["verify --full missing / mismatches",
                                                 f"{soak['verify']['missing']} / {soak['verify']['hash_mismatch']}"]]
        return {"rows": rows, "run": soak.get("run") or {}}
    return soak


def _figure(rows: list[list[Any]] | None, key: str) -> str | None:
    return next((str(r[1]) for r in rows or [] if r[0] == key), None)


def _summary(bad: dict[str, Any] | None, fuzz: dict[str, Any] | None, faults: dict[str, Any] | None,
             soaks: dict[str, dict[str, Any] | None]) -> str:
    """The table at the top, from whichever figures this generation has."""
    rows: list[list[str]] = []
    soak_rows = {n: (s or {}).get("rows") for n, s in soaks.items() if s}
    tried = []
    if bad:
        tried.append(f"{bad['summary']['cases']} hand-made cases")
    if fuzz:
        tried.append(f"{fuzz['summary']['requests']} generated requests (OpenAPI fuzzing)")
    sent = [int(v) for r in soak_rows.values() if (v := _figure(r, "bad_requests_sent")) is not None]
    if sent:
        tried.append(f"{sum(sent)} bad uploads mixed into the soak runs")
    if tried:
        rows.append(["malformed and hostile requests tried", ", ".join(tried),
                     "test_bad_input, test_openapi_fuzz, soak"])
    if bad:
        b = bad["summary"]
        left = b["refused but left something (row, object, spool file)"]
        rows.append(["bad requests refused, leaving no object, no row, no spool file, server healthy",
                     f"{b['refused (4xx or hang-up)'] - left} of {b['refused (4xx or hang-up)']}", "test_bad_input"])
    fives = []
    if bad:
        fives.append(f"**{bad['summary']['5xx answers']}** (corpus)")
    if fuzz:
        fives.append(f"**{fuzz['summary']['5xx']}** (fuzzing)")
    fives += [f"**{v}** ({n.replace('_', ' ')})" for n, r in soak_rows.items()
              if (v := _figure(r, "bad_requests_5xx")) is not None]
    if fives:
        rows.append(["**5xx answers to bad input**", " · ".join(fives), "all of them"])
    if faults:
        rows.append(["faults injected", "; ".join(r[0] for r in faults["rows"]), "test_faults"])
    for n, r in soak_rows.items():
        figs = [_figure(r, k) for k in ("acknowledged", "delivered", "lost")]
        if None not in figs:
            rows.append([f"uploads acknowledged / delivered / **lost** ({n.replace('_', ' ')})",
                         f"{figs[0]} / {figs[1]} / **{figs[2]}**", "soak"])
        twice, resent = _figure(r, "stored_twice_at_cloud"), _figure(r, "resent_to_cloud_409")
        if twice is not None:
            rows.append([f"stored twice at the cloud ({n.replace('_', ' ')})",
                         f"{twice} ({resent} resends after lost answers, absorbed by the cloud's dedup with a 409)",
                         "soak"])
    return table(["what", "figure", "test"], rows) if rows else "_No figures in this generation._"


def _cluster(folder: Path) -> str:
    runs = {n: _load(folder, n) for n in ("cluster_volume_kill", "cluster_s3_kill")}
    if not any(runs.values()):
        return _missing("cluster")
    names: list[str] = []
    for r in runs.values():
        names += [row[0] for row in (r or {}).get("rows", []) if row[0] not in names]
    values = {n: {row[0]: row[1] for row in (r or {}).get("rows", [])} for n, r in runs.items()}
    return table(["figure", "volume server killed", "`weed s3` killed"],
                 [[k, values["cluster_volume_kill"].get(k, "-"), values["cluster_s3_kill"].get(k, "-")] for k in names])


def _provenance(fig: dict[str, Any]) -> str:
    run = fig.get("run") or {}
    if not run:
        return ""
    commit = f", commit `{run['commit']}`" if run.get("commit") else ""
    note = f" ({run['system']})" if "not re-run" in str(run.get("system", "")) else ""
    return f"\n\n_Run of {run.get('date_utc', '?')}{commit}{note}._"


def document(folder: Path, template: Path = TEMPLATE) -> str:
    """docs/reliability.md: the prose of `template` with every figure taken from `folder`."""
    bad, fuzz, faults = _load(folder, "bad_input"), _load(folder, "openapi_fuzz"), _load(folder, "faults")
    soaks = {"soak_short": _soak(folder, "soak_short"), "soak_full": _soak(folder, "soak_full")}
    found = [f for f in (bad, fuzz, faults, *soaks.values()) if f]
    dates = sorted(f.get("run", {}).get("date_utc", "") for f in found if f.get("run"))
    machine = next((f["run"] for f in found if f.get("run")), None)
    run = ("<!-- Generated by `scripts/reliabilitydoc` from the figures the tests wrote (GATEWAY_FIGURES_DIR) "
           "and tests/support/reliability.md.in; do not edit by hand. -->\n\n"
           "We publish what the gateway survives, measured by its own tests. To make these figures again: "
           "`GATEWAY_FIGURES_DIR=docs/figures scripts/test tests/integration/test_bad_input.py "
           "tests/integration/test_openapi_fuzz.py tests/integration/test_faults.py tests/e2e/test_soak.py "
           "tests/e2e/test_cluster_failure.py`, `scripts/soak --json docs/figures/soak_full.json`, then "
           "`scripts/reliabilitydoc docs/figures > docs/reliability.md` (docs/figures/ keeps the figures "
           "shown here).")
    if dates:
        run += (f"\n\nFigures of the runs of {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
                + " UTC")
        if machine:
            run += (f" on {machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} CPUs "
                    f"({machine.get('system', '?')}), commit `{machine.get('commit') or '?'}`")
        run += "."
    parts = {"run": run, "summary": _summary(bad, fuzz, faults, soaks), "cluster": _cluster(folder)}
    if bad:
        s = bad["summary"]
        parts["bad_input"] = "\n".join([
            f"{s['cases']} malformed or hostile requests (tests/integration/test_bad_input.py); after each: "
            "/api/health, catalog rows, stored objects and the spool checked.", "",
            table(bad["header"], bad["rows"]), "", *(f"- {k}: **{v}**" for k, v in s.items())]) + _provenance(bad)
    if fuzz:
        parts["openapi_fuzz"] = ("Schemathesis over every operation of /schema/openapi.json plus hypothesis-made "
                                 f"JSON bodies: **{fuzz['summary']['requests']}** requests, answers "
                                 + ", ".join(f"{r[1]} x {r[0]}" for r in fuzz["rows"])
                                 + f"; **{fuzz['summary']['5xx']}** 5xx." + _provenance(fuzz))
    if faults:
        parts["faults"] = table(faults["header"], faults["rows"]) + _provenance(faults)
    for name, soak in soaks.items():
        if soak:
            parts[name] = table(["figure", "value"], soak["rows"]) + _provenance(soak)
    text = template.read_text()
    for name in ("run", "summary", "bad_input", "openapi_fuzz", "faults", "soak_short", "soak_full", "cluster"):
        text = text.replace("{{" + name + "}}", parts.get(name) or _missing(name))
    return text


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        print("usage: scripts/reliabilitydoc FIGURES_DIR > docs/reliability.md", file=sys.stderr)
        raise SystemExit(2)
    sys.stdout.write(document(Path(sys.argv[1])))
