"""Prometheus metrics of a router, read from its ``RouterCore`` when scraped (no second bookkeeping)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


class RouterCollector:
    """Exports ``RouterStats`` counters, the router's gauges and its stage timers, with a ``router`` label.

    ``moefleet_stage_seconds{router, stage}``: a histogram per stage of the
    serving path (``moefleet.core.stages.STAGES``; worker stages once per worker call).
    """

    COUNTERS = {
        "requests": "Requests accepted for serving",
        "batches": "Layer calls dispatched to workers (after micro-batching)",
        "tokens_computed": "Tokens computed",
        "expired": "Requests whose deadline passed before they were computed",
        "cancelled": "Requests dropped before dispatch because the caller went away",
        "rejected_full": "Requests refused at once because a limit was reached (queued requests, tokens or bytes in flight)",
        "retries": "Layer calls re-dispatched after a worker failed or held a stale placement",
        "forward_s": "Seconds spent serving layer calls",
        "telemetry_s": "Seconds spent counting and flushing per-expert load",
    }

    def __init__(self, core, router_id: str):
        self.core = core
        self.router_id = router_id

    def collect(self):
        stats = self.core.stats
        for name, doc in self.COUNTERS.items():
            c = CounterMetricFamily(f"moefleet_router_{name}", doc, labels=["router"])
            c.add_metric([self.router_id], float(getattr(stats, name)))
            yield c
        g = GaugeMetricFamily("moefleet_router_queued_requests", "Requests waiting or in flight", labels=["router"])
        g.add_metric([self.router_id], float(self.core._queued))
        yield g
        g = GaugeMetricFamily("moefleet_router_inflight_tokens", "Tokens of admitted, unanswered requests", labels=["router"])
        g.add_metric([self.router_id], float(self.core.inflight_tokens))
        yield g
        g = GaugeMetricFamily("moefleet_router_inflight_bytes", "Request bytes of admitted, unanswered requests", labels=["router"])
        g.add_metric([self.router_id], float(self.core.inflight_bytes))
        yield g
        g = GaugeMetricFamily("moefleet_router_placement_version", "Placement version in use", labels=["router"])
        g.add_metric([self.router_id], float(self.core.placement.version))
        yield g
        h = HistogramMetricFamily(
            "moefleet_stage_seconds", "Seconds per stage of the serving path (see moefleet.core.stages)", labels=["router", "stage"]
        )
        stages = self.core.stages
        for stage, (total, _) in stages.totals().items():
            h.add_metric([self.router_id, stage], stages.cumulative(stage), sum_value=total)
        yield h
        g = GaugeMetricFamily("moefleet_worker_outstanding_rows", "Rows in flight per worker", labels=["router", "worker"])
        for worker, rows in sorted(self.core.outstanding.items()):
            g.add_metric([self.router_id, worker], float(rows))
        yield g
        yield from transport_metrics(self.core, self.router_id)


def transport_metrics(core, router_id: str):
    """``moefleet_transport_bytes_total{router, direction, transport}`` and ``moefleet_call_overhead_seconds{router}``.

    Bytes are what the cost model's ``call_bytes`` says each call moved (``moefleet.core.cost_model``):
    ``direction`` is ``to_workers`` or ``from_workers``, ``transport`` one of its ``TRANSPORTS``. The overhead
    is a layer call's time from its gate to its output less its slowest worker's compute."""
    c = CounterMetricFamily(
        "moefleet_transport_bytes", "Bytes layer calls moved between router and workers (cost model: moefleet.core.cost_model)",
        labels=["router", "direction", "transport"],
    )
    with core._lock:
        moved = dict(core.transport_bytes)
    for (direction, transport), n in sorted(moved.items()):
        c.add_metric([router_id, direction, transport], float(n))
    yield c
    h = HistogramMetricFamily(
        "moefleet_call_overhead_seconds", "A layer call's time less its slowest worker's compute (gate, dispatch, transport, combine)",
        labels=["router"],
    )
    stages = core.stages
    total = stages.totals().get("call_overhead")
    if total is not None:
        h.add_metric([router_id], stages.cumulative("call_overhead"), sum_value=total[0])
    yield h


def serve_metrics(core, router_id: str, host: str, port: int) -> int:
    """Start a Prometheus endpoint for this router on ``host:port`` (0 picks a free port); returns the port."""
    registry = CollectorRegistry()
    registry.register(RouterCollector(core, router_id))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]
