"""Free loopback ports for the servers tests start (a coordinator, PostgreSQL, SeaweedFS), and for addresses where
nothing listens."""

from __future__ import annotations

import socket


def free_ports(count: int = 1) -> list[int]:
    """``count`` distinct loopback ports free at the moment of asking (held together, so never the same one twice)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """One loopback port free at the moment of asking."""
    return free_ports(1)[0]
