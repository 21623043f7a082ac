"""Fleet simulator: a discrete-event model of 8 to 512 devices serving a routing trace, re-planned by the real planner.

Pure Python (numpy), no Ray, no Redis. ``compare(trace, devices, ...)`` runs
the same trace twice on the same devices -- **static**: the planner's first
plan kept; **elastic**: re-planned as the controller does -- and reports for
each tokens/s, max/mean device busy time, p99 queueing delay and weight bytes
moved (``SimResult``).

What is modelled
----------------
* **Traffic.** Each trace line (``moefleet.core.trace``) is one MoE layer
  call: ``counts[e]`` token-expert assignments (rows) for expert ``e``.
  ``mode="open"``: a call arrives at its line's ``t`` (the trace's own
  timing; if the fleet is too slow, queues grow). ``mode="closed"``:
  ``concurrency`` clients each send the next line as soon as their previous
  call returns (lines in trace order; measures what the fleet can sustain).
* **Dispatch** is the router's own rule, ``router_service.dispatch.
  split_rows``: per call, each expert's rows are split among its replicas so
  that all finish together, given each device's speed as the placement states
  it (the planner's) and the rows the router still counts in flight there: as
  the router counts them (``router.py``'s ``_absorb``), a call's rows leave the
  count only once all of that call's outputs are in, so a fast device's rows
  stay counted while the call waits for a slower one. One router sees every
  call (a single global view of in-flight rows).
* **Devices** are FIFO servers (``devices.SimDevice``): a call's rows on
  a device take ``overhead + max(sum over its experts of max(rows x row time,
  weight floor), rows x activation transfer time) + returned rows x output
  row time`` (the last for CPU workers only). A call completes when its
  slowest device is done.
* **The router's own time** (``router_call_s`` per call, ``router_worker_call_s``
  per device the call touches) is added to each call's latency, not queued
  (each client embeds its router); ``emulated.EmulationCosts`` fits both on a
  small emulated fleet.
* **Completion order** (``in_order``): a router's compiled graph returns its
  executions' outputs in submission order, so a call served through one waits
  for every call dispatched before it; through plain actor calls (and by
  default here) each call completes when its own slowest device does.
* **Host CPU** (``SimConfig.host_cpu``, local mode only; ``host``): the
  router's, clients' and Ray's CPU work on the cores the devices own -- a
  call's host work first, then its rows; background and controller work on
  the same cores. Each device is then one core (``host.Cores``) whose
  idle time later work fills, instead of a FIFO server.
* **Telemetry** counts each call's rows, at dispatch, into windows of
  ``load_window_s``; the controller reads them decayed exactly as
  ``StateStore.read_load`` does (``load_windows`` windows, ``load_half_life_s``,
  the filling window by its filled fraction: ``core.decay``).
* **The controller** steps every ``interval_s``: ``controller.decide.decide`` -- the
  function ``Controller.step`` calls -- with the simulated load, the workers'
  queue depths (calls in flight, read only with autoscaling), the devices and
  the placement in force; the real ``controller.planner.plan`` and ``autoscale_step``
  with the ``ControllerConfig``'s knobs. An applied plan loads its new
  replicas first (make before break): each device reads its added replicas'
  weights from the checkpoint (as the reconciler does; or from a peer over its
  network link, ``weight_source``), all devices in parallel, plus
  ``reconcile_overhead_s``; then the new placement takes effect for the calls
  that arrive after. The next step starts ``interval_s`` after the previous
  one began, or when the reconcile ends if later (the controller's loop).
* **The first plan** (both runs start from it) is made from scratch from the
  trace's first ``interval_s`` of load (``static_from="first"``) or from the
  whole trace's load (``"mean"``: the best fixed placement in hindsight).

What is not modelled
--------------------
Attention and everything outside the MoE layers; the dependency between a
token's layers (calls are independent); several routers with partial views;
telemetry flush delay; the planner's own run time (a step's decision takes
effect at once; each report records ``decide_wall_s``, what it took here); weight copies slowing the
receiving device or sharing a node's link; memory during a transition (old
and new replicas both held); failures; expert capacity limits (no token is
dropped). Devices of one type are identical and steady (no thermal or
co-tenant noise).

Figures
-------
* ``tokens_per_s``: model tokens (a token passes every simulated layer and
  counts ``top_k`` rows in each) per second, from the first arrival to the
  last completion;
* ``max_over_mean``: max over mean of the devices' busy time over the run
  (devices that held a replica at some point);
* ``p99_ms``: 99th percentile over calls of the queueing delay -- the
  longest wait of the call's rows on any device before service began;
* ``bytes_moved``: weight bytes copied by applied plans (the first
  placement's loading is not counted).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moefleet.core.decay import window_weights
from moefleet.core.placement import DeviceSpec, Inventory, Placement
from moefleet.core.trace import Trace
from moefleet.core.cost_model import weight_load_seconds
from moefleet.router_service.dispatch import NoReplicaError, split_rows

from ..decide import decide, record_apply_seconds
from ..main import ControllerConfig
from ..planner import PlanningError, plan
from ..planner.gate import LinkSpeeds
from .devices import SimDevice, returned_rows
from .host import Cores, HostCpu

__all__ = ["SimConfig", "SimResult", "balanced_capacity", "compare", "initial_placement", "simulate"]

SERVED_WINDOWS = 5
"""Load windows of rows served per device that a prediction check compares (the workers' heartbeats carry 5 s)."""


class SimConfig(BaseModel):
    """How a trace is replayed; the controller's own knobs are ``controller`` (a ``ControllerConfig``)."""

    model_config = ConfigDict(extra="forbid")

    controller: ControllerConfig = Field(
        default_factory=lambda: ControllerConfig(ray_address=None),
        description="The controller's settings: interval_s, load windows, min_tokens, planner knobs, autoscaling.",
    )
    mode: Literal["open", "closed"] = Field(
        default="open", description="'open': calls arrive at the trace's times; 'closed': concurrency clients back to back."
    )
    concurrency: int = Field(default=8, ge=1, description="Clients in closed mode.")
    top_k: int = Field(default=1, ge=1, description="Experts per token: a model token is top_k rows of a layer.")
    load_scale: float = Field(default=1.0, gt=0, description="Multiply every count (more traffic at the same times).")
    reconcile_overhead_s: float = Field(default=0.2, ge=0, description="Fixed time of an applied plan besides copies.")
    static_from: Literal["first", "mean"] = Field(
        default="first", description="The first plan from the trace's first interval ('first') or its whole load ('mean')."
    )
    bin_s: float | None = Field(default=None, gt=0, description="Timeline bin width; default the controller's interval_s.")
    seed: int = Field(default=0, description="Seed of the dispatcher's rounding (the router's random offset).")
    host_cpu: HostCpu | None = Field(
        default=None, description="Local mode: host CPU work on the devices' own cores (one core per device); None: none."
    )
    weight_source: Literal["checkpoint", "peer"] = Field(
        default="checkpoint",
        description="Where an added replica's weights come from: the checkpoint (what the reconciler does: each device "
        "reads them at checkpoint_bytes_per_s) or a peer holding them (over the receiving device's network).",
    )
    checkpoint_bytes_per_s: float = Field(default=2e9, gt=0, description="Read bandwidth of the checkpoint, per device.")
    router_call_s: float = Field(
        default=0.0, ge=0,
        description="The router's own seconds per layer call (gate, dispatch, transport, combine: the cost model's "
        "router stages), added to each call's latency; each client embeds its router, so routers do not queue.",
    )
    in_order: bool = Field(
        default=False,
        description="Calls' outputs come back in the order the calls were dispatched, as a router's compiled graph "
        "returns its executions' (router_service/graph.py): a call waits for every call dispatched before it. "
        "False: each call completes when its own slowest device does (plain actor calls).",
    )
    router_worker_call_s: float = Field(
        default=0.0, ge=0,
        description="The router's seconds per device a layer call touches (preparing that device's part, summing its "
        "partials), added to the call's latency like router_call_s.",
    )


@dataclass
class SimResult:
    """One run's figures (see the module docstring) and its timeline."""

    placement: Literal["elastic", "static"]
    tokens_per_s: float
    max_over_mean: float
    p99_ms: float
    bytes_moved: int
    tokens: float
    calls: int
    makespan_s: float
    p50_latency_ms: float
    p99_latency_ms: float
    copies: int
    plans_applied: int
    steps: int
    failed_steps: int
    busy_s_by_type: dict[str, float]
    latency_percentiles_ms: dict[str, float] = field(default_factory=dict)
    host_cpu_s: float = 0.0
    plans_skipped: int = 0
    device_hours: float = 0.0
    prediction_errors: list[float] = field(default_factory=list)
    timeline: dict[str, list] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The headline figures (``moe-fleet plan --json``)."""
        return {
            "tokens_per_s": self.tokens_per_s, "max_over_mean": self.max_over_mean,
            "p99_ms": self.p99_ms, "bytes_moved": self.bytes_moved, "p99_latency_ms": self.p99_latency_ms,
            "plans_applied": self.plans_applied, "plans_skipped": self.plans_skipped, "device_hours": self.device_hours,
        }

    def to_dict(self, timeline: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("timeline", "reports")}
        if timeline:
            out["timeline"] = self.timeline
            out["reports"] = self.reports
        return out


def balanced_capacity(devices: Sequence[SimDevice], top_k: int, num_layers: int) -> float:
    """Model tokens/s the devices serve when perfectly balanced at large batches (no floors, no overheads)."""
    rows_per_s = sum(1.0 / d.effective_row_s for d in devices)
    return rows_per_s / (top_k * num_layers)


def initial_placement(trace: Trace, devices: Sequence[SimDevice], expert_bytes: float, config: SimConfig) -> Placement:
    """The first plan: from scratch, from the trace's first ``interval_s`` (or whole) load. Raises ``PlanningError``."""
    t0 = float(trace.t[0])
    if config.static_from == "first":
        load = trace.load(t0, t0 + config.controller.interval_s)
    else:
        load = trace.load()
    specs = [d.spec for d in devices]
    result = plan(load * config.load_scale, Inventory(devices=specs), Placement(), config.controller.planner,
                  expert_bytes=expert_bytes, layers=trace.layers)
    return result.target


class _Routing:
    """A placement as the dispatcher reads it: per load row, expert -> device ids holding it (sorted); speeds."""

    def __init__(self, placement: Placement, row_of: dict[int, int], num_rows: int, index: dict[str, int]):
        self.replicas: list[dict[int, list[str]]] = [{} for _ in range(num_rows)]
        self.devices: set[int] = set()
        self.speeds = dict(placement.speeds)
        for (layer, expert), holders in placement.replicas().items():
            row = row_of.get(int(layer))
            kept = [h for h in holders if h in index]
            if row is not None and kept:
                self.replicas[row][int(expert)] = kept
                self.devices.update(index[h] for h in kept)


class _Run:
    """One simulated run. Times are seconds on the trace's clock."""

    def __init__(self, trace: Trace, devices: Sequence[SimDevice], expert_bytes: float, config: SimConfig,
                 initial: Placement, elastic: bool):
        self.trace = trace
        self.devices = list(devices)
        self.specs: list[DeviceSpec] = [d.spec for d in self.devices]
        self.index = {d.device_id: i for i, d in enumerate(self.devices)}
        self.expert_bytes = float(expert_bytes)
        self.config = config
        self.ctl = config.controller
        self.elastic = elastic
        self.layers = trace.layers
        self.row_of = {layer: i for i, layer in enumerate(self.layers)}
        self.rows = np.searchsorted(self.layers, trace.layer)
        counts = trace.counts if config.load_scale == 1.0 else np.rint(trace.counts * config.load_scale).astype(np.int64)
        self.counts = counts
        num_dev = len(self.devices)
        self.host = config.host_cpu
        self.free_at = [0.0] * num_dev  # FIFO devices (without host_cpu)
        # with host_cpu: core d is device d's, spare cores follow
        self.cores = Cores(num_dev + self.host.spare_cores, num_dev) if self.host else None
        self.host_cpu_s = 0.0
        self.next_tick = float(trace.t[0]) + self.host.tick_s if self.host and self.host.background_cores > 0 else math.inf
        self.inflight: list[list[tuple[float, float]]] = [[] for _ in range(num_dev)]  # heaps of (end, rows)
        self.inflight_rows = [0.0] * num_dev
        # the router's count of rows in flight per device: a call's rows stay counted until all its outputs are in
        self.counted: list[list[tuple[float, float]]] = [[] for _ in range(num_dev)]  # heaps of (outputs in, rows)
        self.counted_rows = [0.0] * num_dev
        self.published = initial
        self.routing = _Routing(initial, self.row_of, len(self.layers), self.index)
        self.ever_active = set(self.routing.devices)
        self.active_since = [(float(trace.t[0]), len(self.routing.devices))]  # (time, devices holding replicas)
        self.windows: dict[int, np.ndarray] = {}
        self.served_windows: dict[int, np.ndarray] = {}  # per load window: [D, L] rows each device was given
        self.links = {d.device_id: LinkSpeeds(copy_bytes_per_s=d.copy_bytes_per_s, load_bytes_per_s=math.inf,
                                              overhead_s=config.reconcile_overhead_s) for d in self.devices}
        self.skipped = 0
        self.prediction_errors: list[float] = []
        self.rng = np.random.default_rng(config.seed)
        self.record: dict = {}
        self.reports: list[dict] = []
        self.switch: tuple[float, _Routing] | None = None
        self.last_done = -math.inf  # in_order: when the previous call's outputs came back
        self.next_step = float(trace.t[0]) + self.ctl.interval_s if elastic else math.inf
        self.bytes_moved = 0.0
        self.copies = 0
        self.applied = 0
        self.failed = 0
        # per job (one device's share of one call) and per call
        self.job_dev: list[int] = []
        self.job_start: list[float] = []
        self.job_end: list[float] = []
        self.call_arrival: list[float] = []
        self.call_done: list[float] = []
        self.call_wait: list[float] = []
        self.call_rows: list[int] = []

    # -- device state ---------------------------------------------------------
    def _drain(self, d: int, now: float) -> None:
        q = self.inflight[d]
        while q and q[0][0] <= now:
            self.inflight_rows[d] -= heapq.heappop(q)[1]
        q = self.counted[d]
        while q and q[0][0] <= now:
            self.counted_rows[d] -= heapq.heappop(q)[1]

    # -- events ---------------------------------------------------------------
    def _advance(self, now: float) -> None:
        """Apply every placement switch, controller step and background tick due by ``now``, in time order."""
        while True:
            switch_at = self.switch[0] if self.switch is not None else math.inf
            first = min(switch_at, self.next_step, self.next_tick)
            if first > now:
                return
            if switch_at == first:
                self.routing = self.switch[1]
                self.ever_active |= self.routing.devices
                self.active_since.append((switch_at, len(self.routing.devices)))
                self.switch = None
            elif self.next_step == first:
                self._step(self.next_step)
            else:
                self._host_work(self.next_tick, self.host.background_cores * self.host.tick_s)
                self.next_tick += self.host.tick_s

    def _host_work(self, now: float, seconds: float) -> float:
        """Queue host CPU work arriving at ``now``; returns when it is done."""
        self.host_cpu_s += seconds
        return self.cores.place(self.cores.host_core(now, seconds), now, seconds)[-1][1]

    def _load(self, now: float) -> np.ndarray:
        """Decayed ``[L, E]`` load, as ``StateStore.read_load``: windows weighed by ``core.decay.window_weights``."""
        c = self.ctl
        current = int(now // c.load_window_s)
        indices = [current - age for age in range(c.load_windows)]
        weights = window_weights(now, c.load_window_s, [i * c.load_window_s for i in indices], c.load_half_life_s)
        out = np.zeros((len(self.layers), self.trace.num_experts))
        for index, weight in zip(indices, weights):
            w = self.windows.get(index)
            if w is not None and weight > 0:
                out += weight * w
        return out

    def _step(self, now: float) -> None:
        if self.host is not None and self.host.controller_step_s > 0:
            self._host_work(now, self.host.controller_step_s)
        depths = None
        if self.ctl.autoscaling is not None:
            depths = {}
            for device_id in self.published.assignments:
                d = self.index.get(device_id)
                if d is not None:
                    self._drain(d, now)
                    depths[device_id] = float(len(self.inflight[d]))
        wall = time.perf_counter()
        served, served_load, served_window = self._served(now)
        try:
            decision = decide(self.ctl, self.record, self.specs, self.published, self._load(now), depths, now,
                              expert_bytes=self.expert_bytes, layers=self.layers, links=self.links,
                              served=served, served_load=served_load, served_window_s=served_window)
        except PlanningError as e:  # the controller logs a failed step and tries again next interval
            self.failed += 1
            self.reports.append({"at": now, "failed": str(e)})
            self.next_step = now + self.ctl.interval_s
            return
        self.record = decision.record
        report = dict(decision.report, decide_wall_s=time.perf_counter() - wall)  # this machine's planning time
        self.skipped += "plan_skipped" in report
        if "prediction" in report:
            self.prediction_errors.append(report["prediction"]["error"])
        duration = 0.0
        result = decision.plan
        if result is not None and result.apply:
            added: dict[str, float] = {}
            for move in result.moves:
                if move.kind == "add":
                    added[move.device_id] = added.get(move.device_id, 0.0) + self.expert_bytes
            copy_s = max((self._load_s(d, b) for d, b in added.items()), default=0.0)
            duration = self.config.reconcile_overhead_s + copy_s
            self.published = result.target
            self.switch = (now + duration, _Routing(result.target, self.row_of, len(self.layers), self.index))
            self.bytes_moved += sum(added.values())
            self.copies += result.copies
            self.applied += 1
            self.record = record_apply_seconds(self.record, decision.cost_s, duration)
            pending = self.record.get("pending_prediction")
            if pending is not None:
                self.record["pending_prediction"] = {**pending, "switched_at": now + duration}
            report.update(applied_at=now + duration, reconcile_s=duration)
        self.reports.append(report)
        self.next_step = now + max(self.ctl.interval_s, duration)

    def _served(self, now: float):
        """Rows each device was given per layer over the last ``SERVED_WINDOWS`` complete load windows, and the
        routed load of the same windows: what the workers' heartbeats and the store give the real controller."""
        c = self.ctl
        current = int(now // c.load_window_s)
        indices = range(current - SERVED_WINDOWS, current)
        rows = np.zeros((len(self.devices), len(self.layers)))
        load = np.zeros((len(self.layers), self.trace.num_experts))
        for i in indices:
            if i in self.served_windows:
                rows += self.served_windows[i]
            if i in self.windows:
                load += self.windows[i]
        if rows.sum() <= 0:
            return None, None, 0.0
        served = {d.device_id: {int(layer): float(rows[k, r]) for r, layer in enumerate(self.layers)}
                  for k, d in enumerate(self.devices)}
        return served, load, now - current * c.load_window_s + SERVED_WINDOWS * c.load_window_s

    # -- calls ----------------------------------------------------------------
    def _dispatch(self, i: int, now: float) -> float:
        """Route line ``i`` at ``now``; returns when the call completes."""
        row = int(self.rows[i])
        counts = self.counts[i]
        nz = np.flatnonzero(counts)
        self.call_arrival.append(now)
        total = int(counts.sum())
        self.call_rows.append(total)
        key = int(now // self.ctl.load_window_s)
        w = self.windows.get(key)
        if w is None:
            w = self.windows[key] = np.zeros((len(self.layers), self.trace.num_experts))
        w[row] += counts
        if len(nz) == 0:
            self.call_done.append(now)
            self.call_wait.append(0.0)
            return now
        replicas = self.routing.replicas[row]
        speeds = self.routing.speeds
        per_device: dict[str, list[int]] = {}
        for e in nz:
            holders = replicas.get(int(e))
            if not holders:
                raise NoReplicaError(f"expert {int(e)} of layer {self.layers[row]} has no replica in the placement")
            rows = int(counts[e])
            if len(holders) == 1:
                per_device.setdefault(holders[0], []).append(rows)
                continue
            outstanding = {}  # rows in flight before this call, as the router counts them (router.py's _absorb:
            for holder in holders:  # a call's rows leave the count when the whole call's outputs are in)
                d = self.index[holder]
                self._drain(d, now)
                outstanding[holder] = self.counted_rows[d]
            for holder, n in zip(holders, split_rows(rows, holders, speeds, outstanding, self.rng)):
                if n:
                    per_device.setdefault(holder, []).append(n)
        served = self.served_windows.get(key)
        if served is None:
            served = self.served_windows[key] = np.zeros((len(self.devices), len(self.layers)))
        for holder, rows in per_device.items():
            served[self.index[holder], row] += sum(rows)
        ready = now  # when the call's rows reach the devices
        if self.host is not None:
            self.cores.forget_before(now)  # calls arrive in time order; nothing is placed before now any more
            returned = sum(returned_rows(rows) for rows in per_device.values())
            ready = self._host_work(now, self.host.call_cpu_s(len(per_device), returned))
        done, wait = now, 0.0
        for holder, rows in per_device.items():
            d = self.index[holder]
            seconds = self.devices[d].service_s(rows)
            inbound, outbound = self.devices[d].transfer_s(rows)  # rows to another node and partials back
            arrive = ready + inbound
            if self.cores is not None:
                slices = self.cores.place(d, arrive, seconds)
            else:
                start = max(arrive, self.free_at[d])
                self.free_at[d] = start + seconds
                slices = [(start, start + seconds)]
            start, end = slices[0][0], slices[-1][1] + outbound
            n = sum(rows)
            heapq.heappush(self.inflight[d], (end, n))
            self.inflight_rows[d] += n
            for s, e in slices:
                self.job_dev.append(d)
                self.job_start.append(s)
                self.job_end.append(e)
            done, wait = max(done, end), max(wait, start - now)
        if self.config.in_order:
            done = self.last_done = max(done, self.last_done)
        for holder, rows in per_device.items():
            d = self.index[holder]
            heapq.heappush(self.counted[d], (done, sum(rows)))
            self.counted_rows[d] += sum(rows)
        done += self.config.router_call_s + self.config.router_worker_call_s * len(per_device)
        self.call_done.append(done)
        self.call_wait.append(wait)
        return done

    def _load_s(self, device_id: str, nbytes: float) -> float:
        """Seconds ``device_id`` takes to bring ``nbytes`` of weights on (``cost_model.weight_load_seconds``)."""
        cfg = self.config
        return weight_load_seconds(int(nbytes), cfg.weight_source, checkpoint_bytes_per_s=cfg.checkpoint_bytes_per_s,
                                   peer_bytes_per_s=self.devices[self.index[device_id]].copy_bytes_per_s)

    def run(self) -> SimResult:
        trace = self.trace
        if self.config.mode == "open":
            for i, t in enumerate(trace.t):
                t = float(t)
                self._advance(t)
                self._dispatch(i, t)
        else:
            start = float(trace.t[0])
            clients = [(start, c) for c in range(min(self.config.concurrency, len(trace)))]
            heapq.heapify(clients)
            for i in range(len(trace)):
                now, c = heapq.heappop(clients)
                self._advance(now)
                heapq.heappush(clients, (self._dispatch(i, now), c))
        return self._result()

    # -- figures --------------------------------------------------------------
    def _result(self) -> SimResult:
        cfg = self.config
        arrival = np.asarray(self.call_arrival)
        done = np.asarray(self.call_done)
        wait = np.asarray(self.call_wait)
        latency = done - arrival
        t0 = float(arrival.min())
        makespan = max(float(done.max()) - t0, 1e-12)
        if self.elastic:  # devices holding replicas over time; a static fleet is the whole fleet all along
            ends = [t for t, _ in self.active_since[1:]] + [t0 + makespan]
            device_s = sum(n * max(0.0, min(end, t0 + makespan) - max(t, t0))
                           for (t, n), end in zip(self.active_since, ends))
        else:
            device_s = len(self.devices) * makespan
        rows = float(np.sum(self.call_rows))
        tokens = rows / (cfg.top_k * len(self.layers))
        job_dev = np.asarray(self.job_dev, dtype=np.int64)
        job_start = np.asarray(self.job_start)
        job_end = np.asarray(self.job_end)
        busy = np.bincount(job_dev, weights=job_end - job_start, minlength=len(self.devices))
        active = np.array(sorted(self.ever_active), dtype=np.int64)
        act_busy = busy[active]
        max_over_mean = float(act_busy.max() / act_busy.mean()) if act_busy.mean() > 0 else 1.0
        by_type: dict[str, float] = {}
        for d, dev in enumerate(self.devices):
            by_type[dev.type_name] = by_type.get(dev.type_name, 0.0) + float(busy[d])
        timeline = self._timeline(t0, makespan, job_dev, job_start, job_end, arrival, done, latency, active)
        return SimResult(
            placement="elastic" if self.elastic else "static",
            tokens_per_s=tokens / makespan,
            max_over_mean=max_over_mean,
            p99_ms=float(np.percentile(wait, 99) * 1000),
            bytes_moved=int(round(self.bytes_moved)),
            tokens=tokens,
            calls=len(arrival),
            makespan_s=makespan,
            p50_latency_ms=float(np.percentile(latency, 50) * 1000),
            p99_latency_ms=float(np.percentile(latency, 99) * 1000),
            copies=self.copies,
            plans_applied=self.applied,
            steps=len(self.reports),
            failed_steps=self.failed,
            busy_s_by_type=by_type,
            latency_percentiles_ms={f"p{q:g}": float(np.percentile(latency, q) * 1000) for q in (50, 90, 99, 99.9)},
            host_cpu_s=self.host_cpu_s,
            plans_skipped=self.skipped,
            device_hours=device_s / 3600.0,
            prediction_errors=self.prediction_errors,
            timeline=timeline,
            reports=self.reports,
        )

    def _timeline(self, t0, makespan, job_dev, job_start, job_end, arrival, done, latency, active) -> dict[str, list]:
        """Per bin: balancedness (mean/max busy time of the active devices), tokens/s completed, p99 latency."""
        cfg = self.config
        width = cfg.bin_s or self.ctl.interval_s
        nbins = max(1, int(math.ceil(makespan / width)))
        busy = np.zeros((len(self.devices), nbins))
        b0 = np.clip(((job_start - t0) // width).astype(np.int64), 0, nbins - 1)
        b1 = np.clip(((job_end - t0) // width).astype(np.int64), 0, nbins - 1)
        same = b0 == b1
        np.add.at(busy, (job_dev[same], b0[same]), (job_end - job_start)[same])
        for j in np.flatnonzero(~same):
            d, s, e = job_dev[j], job_start[j], job_end[j]
            for b in range(b0[j], b1[j] + 1):
                lo, hi = max(s, t0 + b * width), min(e, t0 + (b + 1) * width)
                if hi > lo:
                    busy[d, b] += hi - lo
        act = busy[active]
        peak = act.max(axis=0)
        balancedness = np.where(peak > 0, act.mean(axis=0) / np.where(peak > 0, peak, 1), np.nan)
        rows = np.asarray(self.call_rows, dtype=np.float64)
        done_bin = np.clip(((done - t0) // width).astype(np.int64), 0, nbins - 1)
        tokens = np.bincount(done_bin, weights=rows, minlength=nbins) / (cfg.top_k * len(self.layers)) / width
        arr_bin = np.clip(((arrival - t0) // width).astype(np.int64), 0, nbins - 1)
        p99 = []
        for b in range(nbins):
            sel = latency[arr_bin == b]
            p99.append(float(np.percentile(sel, 99) * 1000) if len(sel) else None)
        return {
            "bin_s": width,
            "t": [float(t0 + (b + 0.5) * width) for b in range(nbins)],
            "balancedness": [None if math.isnan(x) else float(x) for x in balancedness],
            "tokens_per_s": [float(x) for x in tokens],
            "p99_latency_ms": p99,
        }


def simulate(
    trace: Trace,
    devices: Sequence[SimDevice],
    *,
    expert_bytes: float,
    config: SimConfig | None = None,
    elastic: bool,
    initial: Placement | None = None,
) -> SimResult:
    """One run of ``trace`` on ``devices``: elastic (the controller re-plans) or static (``initial`` kept).

    ``expert_bytes``: weight bytes of one replica. ``initial``: the starting
    placement (default ``initial_placement``). Raises ``PlanningError`` when
    the devices cannot hold every expert once.
    """
    config = config or SimConfig()
    if not devices:
        raise ValueError("devices: at least one device is needed")
    if len({d.device_id for d in devices}) != len(devices):
        raise ValueError("devices: device ids must be unique")
    if initial is None:
        initial = initial_placement(trace, devices, expert_bytes, config)
    return _Run(trace, devices, expert_bytes, config, initial, elastic).run()


def compare(
    trace: Trace, devices: Sequence[SimDevice], *, expert_bytes: float, config: SimConfig | None = None
) -> dict[str, SimResult]:
    """``{"elastic": ..., "static": ...}``: both runs from the same first plan."""
    config = config or SimConfig()
    initial = initial_placement(trace, devices, expert_bytes, config)
    return {
        "elastic": simulate(trace, devices, expert_bytes=expert_bytes, config=config, elastic=True, initial=initial),
        "static": simulate(trace, devices, expert_bytes=expert_bytes, config=config, elastic=False, initial=initial),
    }
