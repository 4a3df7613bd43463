"""Server-side failures tell the client nothing of the gateway's insides (issue 23, item 6): a 5xx
carries a generic `details` naming the request id; the log line under that id has the full text."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, jpeg_bytes
from tests.support.client import upload, wait_for
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e


def _log_lines(gw: GatewayProcess, rid: str) -> list[dict[str, Any]]:
    lines = []
    for line in gw.log_path.read_text(errors="replace").splitlines():
        if rid in line and line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_failure_details_are_generic_and_logged_with_the_request_id(
    backend: str, start_gateway: Callable[..., GatewayProcess], backend_env: Callable[[str], dict[str, str]],
) -> None:
    env = backend_env(backend)
    if backend == "minio":
        with socket.socket() as s:  # a port nobody listens on: the store is unreachable
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        env["GATEWAY_MINIO_ENDPOINT"] = f"127.0.0.1:{dead}"
        gw = start_gateway(env, wait_ready=False)
        wait_for("the server to listen", lambda: _answers(gw))
        internals = [f"127.0.0.1:{dead}", "port=", "Errno", "refused", "HTTPConnectionPool"]
    else:
        gw = start_gateway(env)
        objects = gw.workdir / "data" / "objects"
        for child in sorted(objects.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        objects.rmdir()
        objects.write_bytes(b"not a folder")  # the store's folder is gone: every write fails
        internals = [str(gw.workdir), "Errno", "File exists", "Not a directory", "/objects"]
    _, key = gw.add_device("camera")
    resp = upload(gw, key, jpeg_bytes(3000))
    assert resp.status_code == 503, resp.text
    rid = resp.headers["x-request-id"]
    details = resp.json()["error"]["details"]
    assert rid and rid in details
    assert not [word for word in internals if word in details], details
    logged = _log_lines(gw, rid)
    assert any(line.get("request_id") == rid and line.get("status") == 503 for line in logged), logged
    full = " ".join(str(line.get("msg", "")) for line in logged)
    assert any(word in full for word in internals), full  # the admin finds the real cause under the id


def _answers(gw: GatewayProcess) -> bool:
    try:
        httpx.get(f"{gw.url}/api/health", timeout=1)
        return True
    except httpx.TransportError:
        return False
