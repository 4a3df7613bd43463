"""Loopback ports for the test servers, chosen below the kernel's ephemeral range.

A port the kernel hands out as an outgoing connection's source port (any client anywhere on the
machine) is taken for as long as that connection lives. A server that stops listening on such a
port (a cloud going down, a gateway killed and started again) could then not take it back: CI
once failed with "Address already in use" when the fake cloud came back. Below the ephemeral
range only servers bind, so a port stays free for the server that chose it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

HOST = "127.0.0.1"
LOWEST = 10000


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (source ports of outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the ephemeral range; where that range starts too low
    to leave room, any port the kernel gives."""
    top = ephemeral_low()
    if top - LOWEST < 1000:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            return int(sock.getsockname()[1])
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randrange(LOWEST, top)
        if bindable(port):
            return port
    raise RuntimeError(f"no free loopback port found in [{LOWEST}, {top})")
