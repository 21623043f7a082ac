"""Whether a TCP port can be bound the way the fleet's servers bind it.

The fleet's servers (the telemetry endpoint's ``http.server``, gRPC) bind with
``SO_REUSEADDR``: a port whose only sockets are closed connections waiting out
TIME_WAIT (what a fetched ``/metrics`` page leaves behind for a minute after
the server stops) is free to them, and a port something still listens on is
not. A check that binds without ``SO_REUSEADDR`` refuses the first case too,
so every check here binds as the servers do.
"""

from __future__ import annotations

import socket
import time


def bind_error(host: str, port: int) -> OSError | None:
    """None when ``host:port`` can be bound as the fleet's servers bind it (``SO_REUSEADDR``), else the error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return e
    return None


def split_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:8470' -> ('127.0.0.1', 8470); '[::1]:50051' -> ('::1', 50051)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def wait_bindable(addresses: list[str], timeout_s: float, poll_s: float = 0.05) -> dict[str, OSError]:
    """Wait until every 'host:port' of ``addresses`` can be bound again; returns those still refused at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        refused = {a: e for a in addresses if (e := bind_error(*split_address(a))) is not None}
        if not refused or time.monotonic() >= deadline:
            return refused
        time.sleep(poll_s)
