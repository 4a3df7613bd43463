"""The short soak run (`scripts/soak --short`, about a minute) as a CI test: many devices,
duplicates, bad requests, the cloud flapping, one kill -9; nothing acknowledged may be lost."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.support import figures

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _faults(events: list[str]) -> str:
    """'cloud -> 500 x1, gateway -> kill -9 x1, ...' from the soak's event log."""
    seen = Counter(e.split("] ", 1)[1] for e in events if "->" in e and not e.endswith("normal"))
    return ", ".join(f"{k} x{n}" for k, n in seen.items())


def test_short_soak_loses_nothing(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.soak", "--short", "--json", str(out), "--workdir", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert out.exists(), result.stdout + result.stderr
    f = json.loads(out.read_text())
    figures.report(
        request.config, "soak_short", "Short soak (scripts/soak --short, tests/e2e/test_soak.py)",
        ["figure", "value"],
        [(k, f[k]) for k in ("duration_s", "devices", "acknowledged", "delivered", "lost", "still_pending_at_gateway",
                             "resent_to_cloud_409",
                             "stored_twice_at_cloud", "duplicates_sent", "bad_requests_sent", "bad_requests_5xx",
                             "5xx_to_valid_uploads_during_faults", "device_resends", "gateway_dead_letters")]
        + [("verify --full missing / mismatches", f"{f['verify']['missing']} / {f['verify']['hash_mismatch']}"),
           ("faults injected", _faults(f["events"]))],
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert any("kill -9" in e for e in f["events"]) and any("restarted" in e for e in f["events"])
    assert f["acknowledged"] > 100 and f["duplicates_sent"] > 0 and f["bad_requests_sent"] > 0
    assert f["lost"] == 0 and f["delivered"] == f["acknowledged"]
    assert f["bad_requests_5xx"] == 0
    assert f["stored_twice_at_cloud"] == 0
    assert f["drained"] and f["gateway_dead_letters"] == 0
    assert f["verify"]["missing"] == 0 and f["verify"]["hash_mismatch"] == 0
