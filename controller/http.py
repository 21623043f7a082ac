"""The fleet's one HTTP endpoint: ``/metrics`` (Prometheus), ``/`` (the dashboard), ``/api/state`` (its JSON).

``TelemetryServer(store, config, host, port)`` reads only the fleet's store,
so it runs wherever that is reachable: in local mode beside the fleet
(``LocalFleet`` starts it, 127.0.0.1:8470 by default), beside the controller
on a cluster (``python -m moefleet.controller.main --http-port 8470``).

A sampler thread takes a snapshot (``telemetry.build_snapshot``) every
``sample_interval_s`` and keeps a short history for the dashboard's
timeline; every route answers from the latest snapshot, so a page costs the
store nothing more. The sampler reads only what changed since its last read
(``telemetry.InputsReader``); the per-expert totals (``L x E`` counters,
exported only on ``/metrics``) are read when ``/metrics`` is scraped, at most
once per ``sample_interval_s``. While the store is unreachable the last
snapshot is served with ``store_error`` set (and ``moefleet_store_up 0``).

Routes:

``GET /metrics``     Prometheus text format (``telemetry.metric_families``).
``GET /``            the dashboard, one self-contained page (``dashboard.html``, no network at run time).
``GET /api/state``   the latest snapshot without the cumulative per-expert totals, plus ``history`` and ``rates``.
``GET /healthz``     200 once a snapshot was taken.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from .telemetry import InputsReader, TelemetryConfig, build_snapshot, metric_families, rates, totals_table

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8470


def dashboard_html() -> bytes:
    """The dashboard page shipped with the package."""
    return resources.files("moefleet.controller").joinpath("dashboard.html").read_bytes()


class _Collector:
    def __init__(self, server: "TelemetryServer"):
        self.server = server

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        snap, error = self.server.latest()
        yield GaugeMetricFamily("moefleet_store_up", "1 when the fleet's store answered the last snapshot",
                                value=0.0 if error else 1.0)
        if snap is not None and self.server.config.expert_metrics:
            snap = {**snap, "expert_tokens_total": self.server.expert_totals(snap)}
        if snap is not None:
            yield from metric_families(snap, self.server.config)


class TelemetryServer:
    """Serves the routes above from snapshots of ``store`` (a ``StateStore``); ``start()`` returns 'host:port'."""

    def __init__(self, store, config: TelemetryConfig | None = None, host: str = "127.0.0.1", port: int = DEFAULT_HTTP_PORT):
        from prometheus_client import CollectorRegistry

        self.store = store
        self.config = config or TelemetryConfig()
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.reader = InputsReader(store, self.config)
        self._totals: tuple[float, dict] | None = None  # (monotonic time read, per-expert totals)
        self._totals_lock = threading.Lock()
        self.history: deque = deque(maxlen=self.config.history)
        self._snap: dict | None = None
        self._prev: deque = deque(maxlen=6)  # recent snapshots, for rates over a few seconds
        self._rates: dict = {}
        self._error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- sampling --------------------------------------------------------
    def sample(self) -> dict | None:
        """Take one snapshot now (the sampler thread calls this every ``sample_interval_s``)."""
        try:
            snap = build_snapshot(self.reader.read(), self.config)
        except Exception as e:  # the store is down or answered badly: keep serving the last snapshot, say why
            with self._lock:
                if self._error is None:
                    log.warning("telemetry: cannot read the fleet's store: %s", e)
                self._error = f"{type(e).__name__}: {e}"
            return None
        with self._lock:
            oldest = self._prev[0] if self._prev else None
            self._rates = rates(oldest, snap) if oldest is not None else {}
            self._prev.append(snap)
            self._snap, self._error = snap, None
            self.history.append({
                "t": snap["t"],
                "balancedness": snap["balancedness"],
                "min_balancedness": snap["min_balancedness"],
                "tokens_per_s": self._rates.get("tokens_per_s"),
                "errors_per_s": self._rates.get("errors_per_s"),
                "p99_s": self._rates.get("p99_s"),
                "bytes_moved": snap["rebalances"]["bytes_moved"],
                "rebalances": snap["rebalances"]["total"],
                "placement_version": snap["placement"]["version"],
            })
        return snap

    def expert_totals(self, snap: dict) -> list[list[int]]:
        """``expert_tokens_total [L][E]`` for ``snap``'s table: the store's per-expert totals, read when a scrape
        asks for them (at most once per ``sample_interval_s``; the snapshots themselves do not read them). The store
        unreachable: the last totals read (counters never go back)."""
        with self._totals_lock:
            if self._totals is None or time.monotonic() - self._totals[0] >= self.config.sample_interval_s:
                try:
                    self._totals = (time.monotonic(), self.store.load_totals())
                except Exception as e:  # the gauge moefleet_store_up says so; the counters hold their last values
                    log.warning("telemetry: cannot read the per-expert totals: %s", e)
                    if self._totals is None:
                        self._totals = (time.monotonic(), {})
            totals = self._totals[1]
        return totals_table(totals, snap["layers"], snap["num_experts"])

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sample()
            self._stop.wait(max(0.05, self.config.sample_interval_s - (time.monotonic() - t0)))

    def latest(self) -> tuple[dict | None, str | None]:
        with self._lock:
            return self._snap, self._error

    def state(self) -> dict:
        """What ``/api/state`` answers."""
        with self._lock:
            snap, error, history, r = self._snap, self._error, list(self.history), dict(self._rates)
        if snap is None:
            return {"t": None, "store_error": error, "history": history, "rates": r}
        out = {k: v for k, v in snap.items() if k != "expert_tokens_total"}
        out.update(store_error=error, history=history, rates=r)
        return out

    # -- serving ---------------------------------------------------------
    def start(self) -> str:
        """Bind, take a first snapshot, start sampling and serving; returns 'host:port'.

        Raises OSError naming the address when it cannot be bound (in use, not allowed).
        """
        try:
            self._httpd = ThreadingHTTPServer((self.host, self.port), _handler(self))
        except OSError as e:
            raise OSError(e.errno, f"cannot serve telemetry on {self.host}:{self.port}: {e.strerror or e}") from e
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.sample()
        self._threads = [
            threading.Thread(target=self._sample_loop, name="moefleet-telemetry-sampler", daemon=True),
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="moefleet-http", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("telemetry: http://%s/ (dashboard), /metrics, /api/state", self.address)
        return self.address

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and sampling. Idempotent."""
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []


def _handler(server: TelemetryServer):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    page = dashboard_html()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - the http.server interface
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
            elif path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            elif path == "/api/state":
                body = json.dumps(server.state(), separators=(",", ":"), allow_nan=False).encode()
                self._send(200, body, "application/json")
            elif path == "/healthz":
                snap, error = server.latest()
                ok = snap is not None
                self._send(200 if ok else 503, (b"ok\n" if ok else f"no snapshot yet: {error}\n".encode()), "text/plain")
            else:
                self._send(404, f"no such page: {path} (try /, /metrics, /api/state)\n".encode(), "text/plain")

        def log_message(self, fmt, *args):  # requests are not logged one by one
            log.debug("http: " + fmt, *args)

    return Handler
