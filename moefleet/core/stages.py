"""Stage timers of the serving path: where the time of one layer call goes.

A layer call passes these stages, in order (``STAGES``). The router records
the ones it runs and the ones its workers report back with each result;
the client stages are timed by the caller (the benchmarks do) since only it
sees them. ``router_service/metrics.py`` exports the router's as one
Prometheus histogram, ``moefleet_stage_seconds{router, stage}``.

Workers time their part of a call (``WORKER_STAGES``) and stamp the wall
clock when they start and finish it; the router turns the stamps into the
``to_worker`` and ``return`` stages (the time spent between the processes).
On one machine the two clocks are one; across machines the split between
``to_worker`` and ``return`` carries the clocks' offset, their sum does not.

Plain data: ``StageHistograms`` keeps cumulative buckets, sums and counts per
stage, cheap enough for every call (a bisect and three additions).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

STAGES: dict[str, str] = {
    "client_encode": "client: request tensors to protobuf bytes",
    "grpc": "client round trip less the router's time and the client's own encode/decode (network, HTTP/2, message parsing)",
    "decode": "router: request message to tensors",
    "validate": "router: request checks (shape, size, NaN/Inf)",
    "queue": "router: waiting for the micro-batch window and the batch's turn",
    "gate": "router: router logits and top-k routing",
    "dispatch_plan": "router: grouping rows by expert and worker",
    "transport_prepare": "router: the workers' messages built (rows gathered for workers on other nodes, the batch handed to the transport)",
    "to_worker": "router's call until the worker starts it (compiled-graph channel or actor call, the worker's queue)",
    "worker_gather": "worker: hidden states in, rows gathered by expert",
    "expert_ffn": "worker: the experts' FFNs",
    "worker_combine": "worker: each token's weighted sum over the worker's experts, result out",
    "return": "worker's result until the router holds it",
    "workers": "router: waiting for every worker of the call (the slowest worker's to_worker + compute + return)",
    "combine": "router: workers' partial outputs into the output",
    "shared_experts": "router: shared experts (on a thread, beside the workers)",
    "reply": "router: output tensor to the reply message",
    "router_total": "router: the request from its arrival at the handler to its reply built (the sum of the router's stages)",
    "call_overhead": "router: a layer call's time from its gate to its output, less its slowest worker's compute (moefleet_call_overhead_seconds)",
    "client_decode": "client: reply bytes to a tensor",
}
"""Stage name -> what it covers, in the order a call passes them."""

CLIENT_STAGES = ("client_encode", "grpc", "client_decode")
WORKER_STAGES = ("worker_gather", "expert_ffn", "worker_combine")
ROUTER_STAGES = tuple(s for s in STAGES if s not in CLIENT_STAGES)
"""Stages a router records per layer call (worker stages once per worker call)."""

BUCKETS_S: tuple[float, ...] = tuple(m * 10.0**e for e in range(-5, 1) for m in (1, 2, 5)) + (10.0,)
"""Histogram bucket upper bounds: 10 us to 10 s, 1-2-5 steps (+Inf implied)."""


@dataclass
class _Hist:
    counts: list[int]  # per bucket, not cumulative; last = above the largest bound
    sum: float = 0.0
    count: int = 0


@dataclass
class StageHistograms:
    """Durations per stage: bucket counts, sum and count (Prometheus histogram semantics). Thread-safe."""

    buckets: tuple[float, ...] = BUCKETS_S
    _h: dict[str, _Hist] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage: {stage!r} is not one of {list(STAGES)}")
        seconds = max(0.0, float(seconds))
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            h = self._h.get(stage)
            if h is None:
                h = self._h[stage] = _Hist([0] * (len(self.buckets) + 1))
            h.counts[i] += 1
            h.sum += seconds
            h.count += 1

    def cumulative(self, stage: str) -> list[tuple[str, int]]:
        """[(upper bound as Prometheus writes it, cumulative count)], ending with '+Inf'."""
        with self._lock:
            h = self._h.get(stage)
            counts = list(h.counts) if h else [0] * (len(self.buckets) + 1)
        out, total = [], 0
        for bound, c in zip([*map(_fmt, self.buckets), "+Inf"], counts):
            total += c
            out.append((bound, total))
        return out

    def stages(self) -> list[str]:
        """Stages observed at least once, in call order."""
        return [s for s in STAGES if s in self._h]

    def totals(self) -> dict[str, tuple[float, int]]:
        """stage -> (sum of seconds, count), for the stages observed."""
        with self._lock:
            return {s: (self._h[s].sum, self._h[s].count) for s in STAGES if s in self._h}


def _fmt(x: float) -> str:
    return repr(float(f"{x:.6g}"))


def per_call_ms(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]], calls: int) -> dict[str, float]:
    """Mean milliseconds per call of each stage between two ``totals()`` snapshots (``calls`` layer calls)."""
    out = {}
    for s in STAGES:
        if s in after:
            s0, _ = before.get(s, (0.0, 0))
            out[s] = 1000.0 * (after[s][0] - s0) / max(calls, 1)
    return out
