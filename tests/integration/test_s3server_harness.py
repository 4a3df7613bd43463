"""The SeaweedFS test harness itself: credentials enforced, objects round-trip, faults recover."""

from __future__ import annotations

import io
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from tests.support.s3server import S3Handle, S3Server, make_client

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shared_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Handle | S3Server]:
    """The server `scripts/test` started (GATEWAY_TEST_S3_*), else one of our own."""
    existing = S3Server.from_env()
    if existing is not None:
        yield existing
        return
    with S3Server(tmp_path_factory.mktemp("s3-harness")) as server:
        yield server


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    """A private server, for tests that kill or freeze it."""
    with S3Server(tmp_path / "s3") as server:
        yield server


def new_bucket(client: Minio) -> str:
    name = f"harness-{secrets.token_hex(6)}"
    client.make_bucket(name)
    return name


def test_signed_request_works(shared_s3: S3Handle | S3Server) -> None:
    client = shared_s3.client(timeout=5)
    bucket = new_bucket(client)
    assert bucket in {b.name for b in client.list_buckets()}


@pytest.mark.parametrize("who", ["wrong-secret", "unknown-key", "anonymous"])
def test_bad_credentials_are_refused(shared_s3: S3Handle | S3Server, who: str) -> None:
    access, secret = {
        "wrong-secret": (shared_s3.access_key, shared_s3.secret_key + "x"),
        "unknown-key": ("AKNOBODY" + secrets.token_hex(4).upper(), shared_s3.secret_key),
        "anonymous": ("", ""),
    }[who]
    client = make_client(shared_s3.endpoint, access, secret, timeout=5)
    with pytest.raises(S3Error) as refused:
        client.list_buckets()
    assert refused.value.code in {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"}


def test_put_get_object(shared_s3: S3Handle | S3Server) -> None:
    client = shared_s3.client(timeout=5)
    bucket = new_bucket(client)
    body = secrets.token_bytes(100_000)
    client.put_object(bucket, "a/b.bin", io.BytesIO(body), len(body),
                      metadata={"x-amz-meta-origin": "harness"})
    response = client.get_object(bucket, "a/b.bin")
    try:
        assert response.read() == body
    finally:
        response.close()
        response.release_conn()
    assert client.stat_object(bucket, "a/b.bin").size == len(body)
    client.remove_object(bucket, "a/b.bin")
    client.remove_bucket(bucket)


def test_kill_and_restart_on_same_ports(own_s3: S3Server) -> None:
    client = own_s3.client(timeout=3)  # configured before the fault, reused after it
    bucket = new_bucket(client)
    client.put_object(bucket, "survivor", io.BytesIO(b"still here"), 10)
    endpoint, old_pid = own_s3.endpoint, own_s3.pid

    own_s3.kill()
    assert own_s3.pid is None and not own_s3.running
    with pytest.raises(Exception):  # noqa: B017 - connection refused, whatever urllib3 wraps it in
        client.list_buckets()

    started = time.monotonic()
    own_s3.restart()
    assert time.monotonic() - started < 15
    assert own_s3.endpoint == endpoint and own_s3.pid not in (None, old_pid)
    response = client.get_object(bucket, "survivor")
    try:
        assert response.read() == b"still here"
    finally:
        response.close()
        response.release_conn()


def test_suspend_makes_requests_hang_until_resume(own_s3: S3Server) -> None:
    impatient = own_s3.client(timeout=1)
    own_s3.suspend()
    try:
        with pytest.raises(Exception):  # noqa: B017 - read timeout
            impatient.list_buckets()
    finally:
        own_s3.resume()
    impatient.list_buckets()


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY", "PID"):
        monkeypatch.delenv(f"GATEWAY_TEST_S3_{var}", raising=False)
    assert S3Server.from_env() is None
    monkeypatch.setenv("GATEWAY_TEST_S3_ENDPOINT", "127.0.0.1:1")
    monkeypatch.setenv("GATEWAY_TEST_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("GATEWAY_TEST_S3_SECRET_KEY", "sk")
    assert S3Server.from_env() == S3Handle("127.0.0.1:1", "ak", "sk", None)


def test_serve_cli_writes_env_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    env_file = tmp_path / "s3.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.s3server", "serve", "--dir", str(tmp_path / "w"),
         "--env-file", str(env_file)],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not env_file.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "env file not written in 30 s"
            time.sleep(0.1)
        values = dict(shlex.split(line)[1].split("=", 1)
                      for line in env_file.read_text().splitlines())
        weed_pid = int(values["GATEWAY_TEST_S3_PID"])
        make_client(values["GATEWAY_TEST_S3_ENDPOINT"], values["GATEWAY_TEST_S3_ACCESS_KEY"],
                    values["GATEWAY_TEST_S3_SECRET_KEY"], timeout=5).list_buckets()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(weed_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
