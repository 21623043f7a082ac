"""What a router counts about the requests it answers: replies by gRPC status, latency per layer.

Plain counters inside ``RouterStats`` (``codes``, ``layer_latency``), carried
in the router's heartbeat, so the fleet's telemetry endpoint sums them over
every router (``moefleet_requests_total{code}``,
``moefleet_layer_latency_seconds{layer}``). They only grow; a restarted
router starts again from zero, which Prometheus reads as a counter reset.

``layer_latency[str(layer)]`` is ``{"counts": [B + 1], "sum": seconds}``:
``counts[i]`` requests took at most ``LATENCY_BUCKETS_S[i]`` and more than the
bucket before (the last entry: more than the largest bound), not cumulative.
"""

from __future__ import annotations

import bisect

__all__ = ["LATENCY_BUCKETS_S", "observe_request"]

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)
"""Upper bounds (seconds) of the per-layer latency histogram buckets; an implicit +Inf follows."""


def observe_request(codes: dict[str, int], layer_latency: dict[str, dict], code: str, layer: int | None, seconds: float) -> None:
    """Count one answered request: its status ``code`` (e.g. 'OK'), and for ``layer`` (when given) its latency.

    Failed requests count by code only: their layer may not exist, and their
    latency is not the layer's.
    """
    codes[code] = codes.get(code, 0) + 1
    if layer is None:
        return
    h = layer_latency.get(str(layer))
    if h is None:
        h = layer_latency[str(layer)] = {"counts": [0] * (len(LATENCY_BUCKETS_S) + 1), "sum": 0.0}
    h["counts"][bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
    h["sum"] += seconds
