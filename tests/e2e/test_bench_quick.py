"""`scripts/bench --quick` runs in CI as a report: every section must produce its figures.

No timing assertions here (the machines are noisy); the figures are printed for the log and the
targets live in the benchmark's own output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_quick_benchmark_reports_every_section() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench.py"), "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    print("\n" + json.dumps(report, indent=1))
    assert {"ingest", "memory", "dedup", "forward", "startup"} <= set(report)
    for row in report["ingest"]:
        assert row["gateway_errors"] == 0 and row["gateway_rps"] > 0 and row["s3_rps"] > 0
        assert row["cpu_limit_ratio"] > 0 and row["cpu_limit_ratio_high"] > 0
        assert row["cpu_ms_per_request"]["s3_at_gateway_rate"]["s3"] > 0  # the store, paced to the gateway's rate
    assert report["memory"]["refused_status"] == 413
    assert report["memory"]["accepted_45mib_x8_statuses"] == [201] * 8
    assert report["forward"]["delivered"] == report["forward"]["images"]
    assert report["startup"]["pending"]["ready_s"] > 0
