"""A fleet's ports after it stops: judged as its servers bind them, waited for by ``down``."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest

from moefleet.core.ports import bind_error, wait_bindable

pytestmark = pytest.mark.integration

TIME_WAIT = "06"  # the state column of /proc/net/tcp


def _time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is ``port`` (IPv4, this network namespace)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == TIME_WAIT:
                n += 1
    return n


def test_a_fetched_telemetry_port_is_free_to_the_check_and_to_the_next_endpoint(store):
    """After /metrics was fetched and the endpoint stopped, its port holds connections in TIME_WAIT: ``up``'s
    check must call it free, as the endpoint that binds it next does (moe-fleet down, then up, at once)."""
    from moefleet.cli import _check_http_port
    from moefleet.controller.http import TelemetryServer

    server = TelemetryServer(store, host="127.0.0.1", port=0)
    server.start()
    port = server.port
    for _ in range(5):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
    server.stop()
    assert _time_wait_on(port) >= 1  # the situation of the report: nothing listens, closed connections linger
    with socket.socket() as plain:  # what the old check did: a bind without SO_REUSEADDR is refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert bind_error("127.0.0.1", port) is None
    _check_http_port(port)  # no SystemExit
    again = TelemetryServer(store, host="127.0.0.1", port=port)
    assert again.start() == f"127.0.0.1:{port}"
    again.stop()


def test_a_port_something_listens_on_is_refused_by_the_check():
    from moefleet.cli import _check_http_port

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert bind_error("127.0.0.1", port) is not None
        with pytest.raises(SystemExit, match=f"port {port} on 127.0.0.1 is not free"):
            _check_http_port(port)


def test_wait_bindable_returns_when_the_listener_closes_and_names_what_still_listens():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    assert list(wait_bindable([address], timeout_s=0.2)) == [address]
    closed = threading.Event()

    def close_soon():
        closed.wait(0.3)
        listener.close()

    t = threading.Thread(target=close_soon)
    t.start()
    assert wait_bindable([address], timeout_s=10) == {}
    t.join()
