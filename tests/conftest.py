"""Shared fixtures: the real S3 server and cluster (SeaweedFS), image bytes, gateway processes per backend."""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_proc import GatewayProcess, s3_env


@pytest.fixture
def cloud() -> Iterator[Any]:
    """A fake AcuSight cloud on loopback that speaks the upload contract and fails on command."""
    from tests.support.fakecloud import FakeCloud

    with FakeCloud() as fake:
        yield fake


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The S3 server `scripts/test` started, or one of our own when pytest runs alone."""
    from tests.support.s3server import S3Server

    existing = S3Server.from_env()
    if existing is not None:
        yield existing
        return
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    os.environ["GATEWAY_TEST_S3_ENDPOINT"] = server.endpoint
    os.environ["GATEWAY_TEST_S3_ACCESS_KEY"] = server.access_key
    os.environ["GATEWAY_TEST_S3_SECRET_KEY"] = server.secret_key
    try:
        yield server
    finally:
        server.stop()
        for var in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY"):
            os.environ.pop(f"GATEWAY_TEST_S3_{var}", None)


@pytest.fixture(scope="session")
def s3_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A replicated SeaweedFS cluster (tests/support/s3cluster.py), started once for the run by the
    first test that asks for it. Its logs stay under the pytest tmp folder, whose path is printed
    with every log's tail when a test of the run failed."""
    from tests.support.s3cluster import S3Cluster

    cluster = S3Cluster(tmp_path_factory.mktemp("s3-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        if request.session.testsfailed:  # past pytest's capture: the last test may have passed
            plugins = request.config.pluginmanager
            capture, reporter = plugins.getplugin("capturemanager"), plugins.getplugin("terminalreporter")
            with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                text = f"\nS3 cluster logs kept in {cluster.log_dir}\n{cluster.log_tails(15)}"
                if reporter is not None:
                    reporter.write_line(text)


def png_bytes(payload: bytes = b"") -> bytes:
    """A valid PNG (1x1) with `payload` in a private chunk, so every call can differ."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"prVt", payload)
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))


def jpeg_bytes(size: int = 2048) -> bytes:
    """JPEG magic followed by random bytes: the gateway sniffs, it does not decode."""
    body = secrets.token_bytes(max(0, size - 6))
    return b"\xff\xd8\xff\xe0" + body + b"\xff\xd9"


@pytest.fixture
def unique_png() -> Callable[[], bytes]:
    return lambda: png_bytes(secrets.token_bytes(16))


BACKENDS = ["folder", "minio"]
# The third store: the gateway's minio backend on a replicated SeaweedFS cluster. Only the core
# upload, forward and drain tests run on it (`-m "not cluster"` leaves them out).
CLUSTER = pytest.param("cluster", marks=pytest.mark.cluster)
BACKENDS_AND_CLUSTER = [*BACKENDS, CLUSTER]


def store_env(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    """The gateway's storage settings for `backend`: folder, minio (one weed) or cluster."""
    if backend == "minio":
        return s3_env(request.getfixturevalue("s3"))
    if backend == "cluster":
        return s3_env(request.getfixturevalue("s3_cluster"))
    return {"GATEWAY_STORAGE_BACKEND": "folder"}


@pytest.fixture
def backend_env(request: pytest.FixtureRequest) -> Callable[[str], dict[str, str]]:
    return lambda backend: store_env(request, backend)


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateway processes (stopped at the end of the test)."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None, name: str = "gw", wait_ready: bool = True) -> GatewayProcess:
        proc = GatewayProcess(tmp_path / name, env)
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    yield start
    for proc in started:
        with contextlib.suppress(Exception):
            proc.stop(timeout=30)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`), every test on the replicated cluster runs on one
    worker, so the run starts one cluster, not one per worker."""
    for item in items:
        if item.get_closest_marker("cluster") is not None:
            item.add_marker(pytest.mark.xdist_group("cluster"))
