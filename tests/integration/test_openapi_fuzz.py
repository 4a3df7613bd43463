"""Fuzz the HTTP surface the gateway documents about itself (/schema/openapi.json).

Schemathesis generates requests for every operation in the app's own OpenAPI document (path
and query parameters; wrong types and odd values too), sent with a valid device key, admin and
sync tokens so that the fuzzer gets past the guards. Most handlers read their JSON bodies
themselves, so a second test posts hypothesis-made JSON to every JSON route. The checks: never a
5xx, every error in the envelope, and the server healthy afterwards. Bounded: a few hundred cases.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.support import figures
from tests.support.gateway_proc import ADMIN_TOKEN, SYNC_TOKEN, GatewayProcess

EXAMPLES_PER_OPERATION = 30
SEEN: Counter[str] = Counter()  # "METHOD path -> status"


@pytest.fixture(scope="module")
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path_factory.mktemp("gw-fuzz"), {"GATEWAY_STORAGE_BACKEND": "folder"}).start()
    yield proc
    code = proc.stop()
    statuses = Counter(k.rsplit(" ", 1)[1] for k in SEEN.elements())
    rows = [(s, n) for s, n in sorted(statuses.items())]
    figures.report(request.config, "openapi_fuzz", "OpenAPI fuzzing (tests/integration/test_openapi_fuzz.py)",
                   ["status", "requests"], rows,
                   {"requests": sum(statuses.values()), "5xx": sum(n for s, n in statuses.items() if s[0] == "5")})
    assert code == 0, proc.log_tail()


@pytest.fixture(scope="module")
def device_key(gw: GatewayProcess) -> str:
    return gw.add_device("cam-fuzz")[1]


def _check_envelope(status: int, content_type: str, body: bytes, where: str) -> None:
    assert status < 500, f"{where}: {status} {body[:300]!r}"
    if status >= 400 and body:
        assert content_type.startswith("application/json"), f"{where}: {status} {content_type}"
        envelope = json.loads(body)
        assert envelope["success"] is False and isinstance(envelope["error"]["code"], str), where
        assert isinstance(envelope["error"]["details"], str), where


def _content_type(headers: Any) -> str:
    value = headers.get("content-type", "")
    return str(value[0] if isinstance(value, list) and value else value)


def _fuzz(operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str]) -> None:
    """Run hypothesis over one operation's generated cases."""

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if case.path.endswith("/verify") and isinstance(case.body, dict):
            case.body.pop("repair", None)  # never let the fuzzer repair anything
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        SEEN[f"{case.method} {case.path} {response.status_code}"] += 1
        case.validate_response(response, checks=[not_a_server_error])
        _check_envelope(response.status_code, _content_type(response.headers), response.content,
                        f"{case.method} {case.path}")

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # nothing to break in an operation without parameters


def test_openapi_operations_never_5xx(gw: GatewayProcess, device_key: str) -> None:
    """Every documented operation, positive and negative (wrong types, out-of-range) cases.
    Schemathesis' own pytest plugin does not run under pytest 9 yet, so the hypothesis
    strategies it builds are driven here directly."""
    schema = schemathesis.openapi.from_url(f"{gw.url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        auth = SYNC_TOKEN if operation.path.startswith("/api/sync") else ADMIN_TOKEN
        headers = {"X-Device-Key": device_key, "Authorization": f"Bearer {auth}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, gw.url, headers)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
JSON_ROUTES = [
    ("/api/device/checkin", None),
    ("/api/core/agent/checkin", None),
    ("/api/devices/provision", None),
    ("/api/admin/tokens", "admin"),
    ("/api/admin/tokens/revoke", "admin"),
    ("/api/admin/devices", "admin"),
    ("/api/admin/devices/approve", "admin"),
    ("/api/admin/devices/revoke", "admin"),
    ("/api/admin/outbox/retry", "admin"),
    ("/api/admin/verify", "admin"),
]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(JSON_ROUTES), body=json_values | st.binary(max_size=200))
def test_json_routes_take_any_body_without_5xx(gw: GatewayProcess, device_key: str, route: tuple[str, Any],
                                              body: Any) -> None:
    path, _ = route
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if path == "/api/admin/verify" and isinstance(body, dict):
        body.pop("repair", None)  # the fuzzer must not clean up after the other tests
        raw = json.dumps(body).encode()
    resp = httpx.post(f"{gw.url}{path}", content=raw, timeout=30,
                      headers={"X-Device-Key": device_key, "Authorization": f"Bearer {ADMIN_TOKEN}",
                               "Content-Type": "application/json"})
    SEEN[f"POST {path} {resp.status_code}"] += 1
    _check_envelope(resp.status_code, resp.headers.get("content-type", ""), resp.content, f"POST {path}")


def test_server_still_healthy_after_fuzzing(gw: GatewayProcess) -> None:
    assert httpx.get(f"{gw.url}/api/health", timeout=10).status_code == 200
    assert httpx.get(f"{gw.url}/api/ready", timeout=10).status_code == 200
