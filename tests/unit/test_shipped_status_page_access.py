"""The shipped container files turn the status page's loopback pass off (issue 23, item 8): with
a port mapping every remote request reaches the container from a local-looking address."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_containerfile_turns_loopback_trust_off() -> None:
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^\s*GATEWAY_ADMIN_LOOPBACK_STATUS_PAGE=false\b", text, re.MULTILINE)


def test_compose_turns_loopback_trust_off() -> None:
    text = (ROOT / "config/compose.yaml").read_text()
    assert re.search(r'^\s*GATEWAY_ADMIN_LOOPBACK_STATUS_PAGE:\s*"?false"?\s*$', text, re.MULTILINE)


def test_containerfile_keeps_the_data_volume_private() -> None:
    assert "chmod 0700 /data" in (ROOT / "Containerfile").read_text()
