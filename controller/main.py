"""The controller: one leader at a time turns load into placement, and keeps the fleet whole.

Each step of the leader (every ``interval_s``; liveness every ``health_interval_s``):

1. liveness: a worker of the placement whose heartbeat lapsed (judged on the
   store's clock, confirmed by asking Ray) is down. The step then plans at
   once without it: its experts are re-placed on the survivors (a repair, made
   past the copy cap), routers already avoid it, and a fresh worker is started
   for the device; once it heartbeats it is a device the planner can use again.
   A start that fails is tried again with backoff until ``restart_attempts``
   have failed; then the device is declared lost (a ``device_lost`` event).
   Ray's answer is asked in the workers' liveness concurrency group, beside
   their forwards: a worker that does not answer in time is not dead but
   stalled, and is taken for dead only after ``stalled_down_s``;
2. convergence: live workers are made to hold what the placement says (what a
   leader that died mid-rebalance loaded but never published is unloaded;
   what a placement names but a worker lacks is loaded);
3. autoscaling: the number of active devices follows the workers' queue depth
   (pure policy in ``autoscale.py``; its state is returned and stored in Redis);
4. plan (pure, ``planner.plan``) from the decayed load, the active live
   devices and the current placement; the plan's predicted gain is recorded
   whether or not it is applied; a plan is applied only when it pays for its
   move over the measured hot-set horizon, outside the cooldown, after it kept
   winning ``confirm_steps`` steps (a ``plan_skipped`` event says why not);
   after a rebalance the balancedness the devices measure is checked against
   the prediction (``moefleet_prediction_error``, ``prediction_miss`` events);
5. if the decision says so, the reconciler applies the plan without pausing
   requests, fenced by the lease; the rebalance's measured seconds correct the
   cost model.

Steps 3 and 4 are ``decide.decide``, a pure function the fleet simulator calls
too, so a simulated controller decides exactly as this one does.

Leadership: a lease in Redis with a fencing token. A follower polls for it;
when the leader dies its lease lapses and the follower takes over within the
lease time, continuing from the placement and records in Redis. While Redis
is unreachable the leader pauses (it cannot renew, so it stops acting); when
Redis is back it re-acquires, and if Redis lost its data it republishes the
placement the workers actually hold (with the devices' speeds) as a new
generation. Every write a leader makes (placement, records, events, counters)
lands only under its current holding: a deposed leader writes nothing.

    python -m moefleet.controller.main --config controller.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moefleet.core.config import WorkerConfig
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import DeviceSpec, Inventory, Placement, held_experts, worker_actor_name
from moefleet.core.state import LeaseLostError, StateStore, resolve_redis_url
from moefleet.kernels.experts import packed_kind

from .autoscale import AutoscalingConfig
from .decide import decide, record_apply_seconds
from .planner import Plan, PlannerKnobs, min_replicas
from .reconciler import LoadFailedError, Reconciler
from .telemetry import TelemetryConfig

log = logging.getLogger(__name__)

RECORD = "controller"
RECOVER_PARTIAL_AFTER_S = 30.0
"""With no placement published, what live workers hold is republished once it covers every expert, or after this
long (a store that lost its table while a worker was down)."""


class ControllerConfig(BaseModel):
    """The controller's settings (the ConfigMap's ``controller.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(default=None, description="Checkpoint the fleet serves; None for the built-in model.")
    redis_url: str | None = Field(default=None, description="Redis URL; default MOEFLEET_REDIS_URL.")
    namespace: str = Field(default="moefleet", description="Ray namespace and Redis key prefix.")
    ray_address: str | None = Field(default="auto", description="Ray cluster to join ('auto', an address, or None for none).")
    interval_s: float = Field(default=2.0, gt=0, description="Seconds between control steps.")
    health_interval_s: float = Field(
        default=0.25, gt=0, description="Seconds between liveness checks of the placement's workers (a death triggers a step)."
    )
    restart_workers: bool = Field(default=True, description="Start a fresh worker for a device whose worker died.")
    restart_attempts: int = Field(
        default=8, gt=0, description="Failed starts of a device's fresh worker after which the device is declared lost."
    )
    restart_backoff_s: float = Field(default=0.5, gt=0, description="Wait before the second start; doubled after each failure.")
    restart_max_backoff_s: float = Field(default=30.0, gt=0, description="Longest wait between two starts.")
    restart_timeout_s: float = Field(
        default=120.0, gt=0, description="A fresh worker not ready within this (no resources, node gone) is a failed start."
    )
    stalled_down_s: float = Field(
        default=10.0, gt=0,
        description="A worker whose heartbeat lapsed and that does not answer Ray's liveness call (stalled, not dead) "
        "counts as down after this long.",
    )
    lease_ttl_s: float = Field(default=5.0, gt=0, description="Leader lease; a dead leader is replaced within this.")
    load_window_s: float = Field(default=1.0, gt=0, description="Width of the routers' load windows.")
    load_windows: int = Field(default=30, gt=0, description="Windows of load the planner looks at.")
    load_half_life_s: float = Field(default=10.0, gt=0, description="Half-life of the decayed load estimate.")
    min_tokens: float = Field(default=100.0, ge=0, description="Plan only when the window saw at least this many tokens.")
    planner: PlannerKnobs = Field(
        default_factory=lambda: PlannerKnobs(min_replicas="auto"),
        description="The planner's knobs; ``min_replicas`` is 'auto' unless set (2 copies of every expert where the GPU "
        "devices' memory holds them beside the headroom, else 1).",
    )

    @field_validator("planner", mode="before")
    @classmethod
    def _auto_min_replicas(cls, v):
        """A fleet keeps two copies of every expert where memory allows unless ``planner.min_replicas`` says otherwise."""
        if isinstance(v, dict) and "min_replicas" not in v:
            return {**v, "min_replicas": "auto"}
        if isinstance(v, PlannerKnobs) and "min_replicas" not in v.model_fields_set:
            return v.model_copy(update={"min_replicas": "auto"})
        return v

    kappa: float = Field(
        default=2.0, ge=0,
        description="The cost-benefit gate: a plan (a repair excepted) is applied only when its predicted gain over the "
        "horizon exceeds kappa x its cost, gain x horizon_s > kappa x the move's seconds (planner/gate.py).",
    )
    horizon_s: float = Field(
        default=60.0, gt=0,
        description="How long a hot set is taken to last until the controller has measured hot-set lifetimes; then the "
        "median of the last eight measured, capped at max_horizon_s.",
    )
    max_horizon_s: float = Field(default=600.0, gt=0, description="Longest horizon a plan's gain is counted over.")
    hot_fraction: float = Field(
        default=0.125, gt=0, le=1,
        description="Share of each layer's experts (the most loaded; at least 2) that make its hot set; the hot set has "
        "moved when fewer than half of them are still hot.",
    )
    cooldown_s: float = Field(
        default=10.0, ge=0, description="After an applied plan, no other is applied for this long (repairs excepted)."
    )
    confirm_steps: int = Field(
        default=3, ge=1,
        description="A plan is applied only after the same plan (moves at least 80% alike) passed the gate this many "
        "steps in a row: a plan born of one window's noise does not keep winning.",
    )
    copy_bytes_per_s: float = Field(
        default=1.25e9, gt=0, description="Link bandwidth a weight copy crosses to reach a device (the move's cost)."
    )
    load_bytes_per_s: float = Field(
        default=25e9, gt=0, description="Bandwidth of loading copied weights into a device's memory (the move's cost)."
    )
    rebalance_overhead_s: float = Field(
        default=1.0, ge=0, description="Fixed seconds of a rebalance besides its copies (publish, drain, unload)."
    )
    prediction_checks: int = Field(
        default=3, ge=1,
        description="Steps whose measured balancedness is compared with the prediction after a rebalance (averaged).",
    )
    prediction_miss: float = Field(
        default=0.1, gt=0,
        description="A prediction is a miss when |measured - predicted| balancedness exceeds this: a prediction_miss "
        "event, and the devices' speeds as the planner sees them are corrected from the measured split.",
    )
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Active-device autoscaling; None keeps all devices.")
    devices: list[DeviceSpec] = Field(
        default_factory=list, description="Static inventory (local mode); empty reads the Ray cluster's nodes."
    )
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    drain_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for routers to drain an old placement.")
    trace: str | None = Field(default=None, description="Replay per-expert load from this JSON trace instead of Redis.")
    local: bool = Field(
        default=False, description="Local mode: the static devices are CPU workers on this node (no GPU request, no node affinity)."
    )
    http_host: str = Field(default="127.0.0.1", description="Address the telemetry endpoint binds (0.0.0.0 in a pod).")
    http_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Serve /metrics, the dashboard and /api/state on this port beside the controller (None: not served; "
        "local mode serves them from the fleet instead).",
    )
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="What the telemetry endpoint exports.")


def held_expert_bytes(ckpt: MoECheckpoint, layers: list[int], worker: WorkerConfig, local: bool = False):
    """Bytes one replica of each expert occupies on a worker: one number, or ``[L, E]`` where layers differ.

    What the workers hold: experts of a quantized checkpoint stay packed on CUDA
    workers where a kernel takes their form (fp8 values + block scales, MXFP4
    bytes + exponents), and are dequantized to the compute dtype elsewhere.
    """
    cuda = worker.num_gpus > 0 and not local and worker.backend != "torch"
    dtype = worker.dtype or ckpt.spec.dtype
    sizes = [ckpt.expert_bytes(layer, dtype, packed=packed_kind(ckpt, layer, "triton" if cuda else "torch") is not None) for layer in layers]
    if len(set(sizes)) <= 1:
        return sizes[0] if sizes else ckpt.expert_bytes(ckpt.spec.moe_layers[0], dtype)
    return np.array([[size] * ckpt.layer_spec(layer).num_experts for layer, size in zip(layers, sizes)], dtype=float)


def load_matrix(load: dict, layers: list[int], num_experts: int) -> np.ndarray:
    """[L, E] from ``{(layer, expert): tokens}``."""
    row = {layer: i for i, layer in enumerate(layers)}
    m = np.zeros((len(layers), num_experts))
    for (layer, expert), v in load.items():
        if layer in row and 0 <= expert < num_experts:
            m[row[layer], expert] = v
    return m


class Controller:
    """One controller process (leader or follower)."""

    def __init__(self, config: ControllerConfig, *, holder: str | None = None, store: StateStore | None = None, clock=time.time):
        from moefleet.core.default_model import default_model_dir

        self.config = config
        self.holder = holder or f"controller-{uuid.uuid4().hex[:8]}"
        self.store = store or StateStore(resolve_redis_url(config.redis_url), namespace=config.namespace, socket_timeout_s=2.0)
        self.checkpoint = str(config.checkpoint or default_model_dir())
        ckpt = MoECheckpoint(self.checkpoint)
        self.spec = ckpt.spec
        self.layers = list(self.spec.moe_layers)
        self.expert_bytes = held_expert_bytes(ckpt, self.layers, config.worker, local=config.local)
        self.clock = clock
        self.leader = False
        self.token = 0
        self._trace = json.loads(Path(config.trace).read_text()) if config.trace else None
        self._trace_start: float | None = None
        self.reconciler = Reconciler(
            self.store, self.checkpoint, config.namespace, config.worker, {d.device_id: d for d in config.devices},
            drain_timeout_s=config.drain_timeout_s, local=config.local, redis_url=self.store.url, clock=clock,
        )
        self.reconciler.keepalive = self._keepalive
        self.reconciler.expert_bytes = self._replica_bytes
        self.last_report: dict = {}
        self.down: set[str] = set()  # devices of the placement whose worker is dead
        self._restarting: dict[str, tuple[object, object, float]] = {}  # device -> (handle, ready ref, started)
        self._retry: dict[str, dict] = {}  # device -> {"failures", "next_at" (monotonic), "error"}: restarts to try again
        self.lost: set[str] = set()  # devices declared lost (restarts gave up) until a worker of theirs heartbeats
        self._unanswered: dict[str, float] = {}  # device -> monotonic time since its worker has not answered Ray
        # monotonic time since which the store has answered (None while it does not): heartbeats are
        # judged only once it has answered longer than a heartbeat lives (after an outage or a reset)
        self._store_ok_since: float | None = -float("inf")
        self._seen_generation = ""
        self._last_step = -float("inf")
        self._full_until: dict[str, float] = {}  # device -> monotonic time until which it takes no new experts
        self.full_cooldown_s = 60.0
        self.status: dict = {}  # {"state", "reason", "detail", "since"}: step_state of the last step
        self._health_version = None  # (version, generation) of the placement health() last read, and that placement
        self._health_placement: Placement | None = None
        self._windows: dict = {}  # load windows that no longer change, read once (StateStore.read_windows)
        self._partial_since: float | None = None  # since when live workers hold part of the experts and no placement exists

    def _cap_if_full(self, device: DeviceSpec, current: Placement) -> DeviceSpec:
        """A device whose worker refused loads lately, capped at what it holds now (the planner adds nothing there)."""
        until = self._full_until.get(device.device_id)
        if until is None or time.monotonic() >= until:
            self._full_until.pop(device.device_id, None)
            return device
        held = sum(self._replica_bytes(k) for k in current.assignments.get(device.device_id, []))
        cap = int(held / max(1e-9, 1.0 - self.config.planner.headroom)) + 1
        return device.model_copy(update={"memory_bytes": min(device.memory_bytes, cap)})

    def _replica_bytes(self, key) -> int:
        """Bytes one replica of ``key`` holds on a worker (what the reconciler stages moves with)."""
        eb = self.expert_bytes
        if np.ndim(eb) == 0:
            return int(eb)
        return int(eb[self.layers.index(int(key[0])), int(key[1])])

    # -- inputs ----------------------------------------------------------
    def inventory(self) -> Inventory:
        """The static devices of the config, else the cluster's: its nodes' and the fleet's own workers'.

        Workers a deployment started where Ray placed them (``moe-fleet deploy``: the Serve
        application's starting workers, recorded in the store) are devices too, and a fresh worker
        for one of them is started as the deployment started it.
        """
        if self.config.devices:
            return Inventory(devices=self.config.devices)
        import ray

        from .inventory import FLEET_DEVICES_RECORD, cluster_inventory, fleet_worker_options

        fleet = (self.store.get_record(FLEET_DEVICES_RECORD) or {}).get("devices") or {}
        total = int(np.sum(np.broadcast_to(np.asarray(self.expert_bytes, dtype=float), (len(self.layers), self.spec.layer.num_experts))))
        self.reconciler.start_options = {d: fleet_worker_options(e) for d, e in fleet.items()}
        return cluster_inventory(ray.nodes(), fleet, total_expert_bytes=total,
                                 expert_bytes=int(np.max(np.asarray(self.expert_bytes, dtype=float))))

    def model_mismatch(self, heartbeats: dict[str, dict]) -> tuple[str, str] | None:
        """(reason, detail) when the routers serve another model than this controller's checkpoint; else None.

        A controller planning another model's experts would place what the fleet does not have: it
        stays out of the way and says why.
        """
        served = next((info["model"] for key, info in heartbeats.items() if key.startswith("router:") and info.get("model")), None)
        if not served:
            return None
        theirs = ([int(x) for x in served.get("moe_layers") or []], int(served.get("num_experts") or 0))
        if theirs == (self.layers, self.spec.layer.num_experts):
            return None
        fleet = f"{served.get('family', '?')}, {len(theirs[0])} MoE layers × {theirs[1]} experts"
        mine = f"{self.spec.family}, {len(self.layers)} MoE layers × {self.spec.layer.num_experts} experts"
        if self.config.checkpoint is None:
            return ("no checkpoint", f"the fleet serves {fleet}; this controller's config names no checkpoint, so it took "
                                     f"the built-in model ({mine}): set checkpoint to the fleet's checkpoint directory")
        return ("checkpoint mismatch", f"the fleet serves {fleet}; this controller's checkpoint {self.config.checkpoint} "
                                       f"is {mine}: set checkpoint to the fleet's checkpoint directory")

    def set_status(self, state: str, reason: str, detail: str = "") -> dict:
        """The controller's state and why (shown by ``status``); logged once each time it changes."""
        if (state, reason) != (self.status.get("state"), self.status.get("reason")):
            level = logging.WARNING if state in ("blocked", "failing") else logging.INFO
            log.log(level, "controller %s: %s%s", state, reason, f" ({detail})" if detail else "")
            self.status = {"state": state, "reason": reason, "detail": detail, "since": time.time()}
        else:
            self.status = {**self.status, "detail": detail}
        return self.status

    def load(self, now: float | None) -> np.ndarray:
        c = self.config
        if self._trace is not None:
            now = self.clock() if now is None else now
            if self._trace_start is None:
                self._trace_start = now
            t = now - self._trace_start
            entries = self._trace["steps"]
            step = max((s for s in entries if s["t"] <= t), key=lambda s: s["t"], default=entries[0])
            return np.asarray(step["load"], dtype=float)
        raw = self.store.read_load(None, c.load_window_s, c.load_windows, c.load_half_life_s, cache=self._windows)
        return load_matrix(raw, self.layers, self.spec.layer.num_experts)

    def served(self, now: float, records: dict[str, dict]) -> tuple[dict | None, np.ndarray | None, float]:
        """What the devices measured they served over their last seconds, and what the routers sent meanwhile.

        Returns ``(served, served_load, window_s)``: device -> layer -> rows
        (the workers' ``recent_tokens``), the routers' ``[L, E]`` counts over
        the store's complete windows of the same length, and how far back the
        devices' count reaches (their window, one bucket and a heartbeat).
        ``(None, None, 0)`` when replaying a trace or nothing was reported.
        """
        if self._trace is not None:
            return None, None, 0.0
        served, window = {}, 0.0
        for d, info in records.items():
            recent = info.get("recent_tokens") or {}
            if "layers" in recent:
                served[d] = {int(k): float(v) for k, v in recent["layers"].items()}
                window = max(window, float(recent.get("window_s", 0.0)))
        if not served or window <= 0:
            return None, None, 0.0
        c = self.config
        count = max(1, int(round(window / c.load_window_s)))
        # the complete windows: the ``count`` ending with the one before ``now``'s (the current one is not read)
        windows = self.store.read_windows(now - c.load_window_s, c.load_window_s, count, cache=self._windows)
        raw: dict = {}
        for _, counts in windows:
            for key, n in counts.items():
                raw[key] = raw.get(key, 0) + n
        served_load = load_matrix(raw, self.layers, self.spec.layer.num_experts)
        return served, served_load, window + 1.0 + 0.25

    def worker_records(self, heartbeats: dict[str, dict] | None = None) -> dict[str, dict]:
        """Live workers' heartbeat info by device id (the store's clock)."""
        heartbeats = self.store.workers() if heartbeats is None else heartbeats
        return {k.split(":", 1)[1]: v for k, v in heartbeats.items() if k.startswith("worker:")}

    def queue_depths(self, records: dict[str, dict] | None = None) -> dict[str, float]:
        """Workers' queue depth (in-flight calls), by device id, from their heartbeats."""
        records = self.worker_records() if records is None else records
        return {d: float(info.get("queue_depth", 0)) for d, info in records.items()}

    # -- leadership ------------------------------------------------------
    def hold_lease(self) -> bool:
        ttl = self.config.lease_ttl_s
        if self.leader:
            self.token = self.store.renew_lease(self.holder, ttl, token=self.token)
            self.leader = bool(self.token)
            if not self.leader:
                log.warning("%s lost the leader lease", self.holder)
        if not self.leader:
            self.token = self.store.try_acquire_lease(self.holder, ttl)
            self.leader = bool(self.token)
            if self.leader:
                log.info("%s is the leader (fencing token %d)", self.holder, self.token)
                self.emit("leader", {"holder": self.holder, "token": self.token})
        self.reconciler.fence = (self.holder, self.token) if self.leader else None
        return self.leader

    @property
    def fence(self) -> tuple[str, int] | None:
        return (self.holder, self.token) if self.leader else None

    def emit(self, kind: str, data: dict) -> None:
        """An event written under the lease (``LeaseLostError`` once it is lost: a deposed leader writes nothing)."""
        self.store.emit_event(kind, data, fence=(self.holder, self.token))

    def _lost_lease(self, why: str) -> None:
        if self.leader:
            log.warning("%s lost the leader lease (%s): stopping as leader", self.holder, why)
        self.leader = False
        self.token = 0
        self.reconciler.fence = None

    def _keepalive(self) -> bool:
        """Renew the lease under our token (the reconciler calls this before publishing and unloading)."""
        try:
            self.token = self.store.renew_lease(self.holder, self.config.lease_ttl_s, token=self.token)
        except Exception as e:  # the store is down: we cannot prove we lead, so we do not act
            log.warning("%s: lease renewal failed: %s", self.holder, e)
            self.token = 0
        self.leader = bool(self.token)
        return self.leader

    # -- liveness --------------------------------------------------------
    def _store_settled(self) -> bool:
        """Heartbeats are trusted once the store has answered for longer than a heartbeat's lifetime."""
        from moefleet.expert_workers.group import HEARTBEAT_TTL_S

        return self._store_ok_since is not None and time.monotonic() - self._store_ok_since > HEARTBEAT_TTL_S + 0.25

    def _ray_alive(self, device: str) -> bool | None:
        """Ask Ray whether the device's worker answers (a lapsed heartbeat may be the worker's link to Redis).

        True: it answered. False: dead (no actor of that name, or Ray says it
        died). None: no answer in time; ``ready`` runs in the workers' liveness
        concurrency group, beside the forwards, so this is a stalled process
        (stopped, its node unreachable), not a busy one.
        """
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

        try:
            h = ray.get_actor(worker_actor_name(device), namespace=self.config.namespace)
        except ValueError:  # no actor of that name
            return False
        try:
            ray.get(h.ready.remote(), timeout=0.5)
            return True
        except GetTimeoutError:
            return None
        except ActorDiedError:
            return False
        except RayActorError as e:  # ActorUnavailableError (restarting, unreachable) is one: not known dead
            return None if type(e).__name__ == "ActorUnavailableError" else False
        except Exception as e:  # noqa: BLE001 - whatever else: not known dead
            log.warning("liveness of %s unknown: %s", device, e)
            return None

    def find_down(self, placement: Placement, records: dict[str, dict]) -> set[str]:
        """Devices of ``placement`` whose worker is dead (no heartbeat, and Ray confirms), or stalled past ``stalled_down_s``."""
        if not self._store_settled():
            return set()
        down = set()
        now = time.monotonic()
        for d in placement.assignments:
            if d in records or d in self._restarting:
                self._unanswered.pop(d, None)
                continue
            alive = self._ray_alive(d)
            if alive is None:
                since = self._unanswered.setdefault(d, now)
                if now - since < self.config.stalled_down_s:
                    continue
                log.warning("worker of %s has not answered for %.1fs: taken for dead", d, now - since)
            elif alive:
                self._unanswered.pop(d, None)
                continue
            down.add(d)
        return down

    def _restart(self, devices: set[str], records: dict[str, dict] | None = None) -> None:
        """Start a fresh, empty worker for each device whose worker died, once Ray has released its name.

        A device whose start failed is tried again (whether or not the placement
        still names it) after a backoff that doubles with each failure, until
        ``restart_attempts`` failed: then it is declared lost (``device_lost``).
        """
        if not self.config.restart_workers:
            return
        import ray

        records = records or {}
        now = time.monotonic()
        for d in sorted((set(devices) | set(self._retry)) - self.lost):
            if d in self._restarting:
                continue
            if d in records:  # heartbeating after all
                self._retry.pop(d, None)
                continue
            retry = self._retry.get(d)
            if retry is not None and now < retry["next_at"]:
                continue
            try:
                old = ray.get_actor(worker_actor_name(d), namespace=self.config.namespace)
            except ValueError:
                old = None
            if old is not None:
                if self._ray_alive(d) is True:
                    self._retry.pop(d, None)
                    continue  # it answers after all
                ray.kill(old, no_restart=True)  # a dead actor can keep its name until killed: free it
                time.sleep(0.05)
            try:
                h = self.reconciler.handle(d, [])
                self._restarting[d] = (h, h.ready.remote(), time.monotonic())
                log.info("started a fresh worker for device %s", d)
                self.emit("worker_restart", {"device": d, "attempt": 1 + (retry or {}).get("failures", 0)})
            except LeaseLostError:
                raise
            except Exception as e:  # Ray refused (no resources, name taken): tried again after a backoff
                self._restart_failed(d, f"could not start: {e}")

    def _restart_failed(self, device: str, why: str) -> None:
        """Count a failed start of ``device``'s worker: schedule the next one, or declare the device lost."""
        c = self.config
        retry = self._retry.setdefault(device, {"failures": 0})
        retry["failures"] += 1
        retry["error"] = why[:300]
        if retry["failures"] >= c.restart_attempts:
            del self._retry[device]
            self.lost.add(device)
            log.error("device %s declared lost: %d starts of its worker failed (last: %s)", device, c.restart_attempts, why)
            self.emit("device_lost", {"device": device, "attempts": c.restart_attempts, "error": retry["error"]})
            return
        wait = min(c.restart_max_backoff_s, c.restart_backoff_s * 2 ** (retry["failures"] - 1))
        retry["next_at"] = time.monotonic() + wait
        log.warning("worker of %s: start %d failed (%s); trying again in %.1fs", device, retry["failures"], why, wait)

    def _poll_restarts(self, records: dict[str, dict]) -> None:
        import ray

        for d in list(self.lost):
            if d in records:  # a worker of a lost device heartbeats (started by hand, node back): a device again
                self.lost.discard(d)
        for d, (h, ref, t0) in list(self._restarting.items()):
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    ray.get(ref)
                except Exception as e:  # it died while starting: try again after a backoff
                    del self._restarting[d]
                    self._restart_failed(d, f"died while starting: {e}")
                    continue
                if d in records:  # heartbeating: a device again
                    del self._restarting[d]
                    self._retry.pop(d, None)
                    log.info("worker of %s is back after %.1fs", d, time.monotonic() - t0)
            elif time.monotonic() - t0 > self.config.restart_timeout_s:  # never scheduled (no resources, node gone)
                del self._restarting[d]
                try:
                    ray.kill(h, no_restart=True)
                except Exception as e:  # noqa: BLE001 - it may be gone already
                    log.debug("could not kill the stuck worker of %s: %s", d, e)
                self._restart_failed(d, f"not ready within {self.config.restart_timeout_s:.0f}s")

    # -- recovery ----------------------------------------------------------
    def _recoverable(self, records: dict[str, dict]) -> bool:
        """Whether what the live workers hold may be republished as the placement (no placement is published).

        Only once they hold every expert, or have held only part of them for ``RECOVER_PARTIAL_AFTER_S``: a fleet's
        application publishes its first placement after its workers start, and a controller that republished the
        first worker's experts in between would publish a placement missing the others'.
        """
        held = {k for info in records.values() for k in held_experts(info) or ()}
        if not held or held >= {(layer, e) for layer in self.layers for e in range(self.spec.layer.num_experts)}:
            self._partial_since = None
            return True
        if self._partial_since is None:
            self._partial_since = time.monotonic()
        return time.monotonic() - self._partial_since >= RECOVER_PARTIAL_AFTER_S

    def recover_placement(self, records: dict[str, dict], inventory: Inventory | None = None) -> Placement | None:
        """The store lost the placement table: republish what the live workers hold, as a new generation.

        The devices' speeds come from the inventory (what the planner assumes),
        so routers split rows between replicas by speed from the first request.
        """
        held = {d: held_experts(info) or [] for d, info in records.items()}
        held = {d: keys for d, keys in held.items() if keys}
        if not held:
            return None
        by_id = (inventory or self.inventory()).by_id()
        speeds = {d: float(by_id[d].speed) for d in held if d in by_id}
        recovered = Placement(assignments=held, speeds=speeds)
        published = self.store.publish_placement(recovered, expected_version=0, fence=(self.holder, self.token))
        log.warning("placement table was lost; republished what %d workers hold as v%d (generation %s)",
                    len(held), published.version, published.generation)
        self.emit("placement_recovered", {"version": published.version, "generation": published.generation})
        return published

    # -- one step --------------------------------------------------------
    def placement(self) -> Placement | None:
        """The stored placement, read again only when its version or generation moved (it is 126 kB of JSON at
        58 x 256 experts over 32 devices: read and parsed four times a second it dominated the store's traffic)."""
        stamp = self.store.placement_stamp()
        if stamp != self._health_version or self._health_placement is None:
            self._health_placement, self._health_version = self.store.get_placement(), stamp
        return self._health_placement

    def health(self) -> bool:
        """Quick liveness check; True when a placement worker is newly down (the caller steps at once)."""
        if not self.leader:
            return False
        # four times a second: the placement read again only when its version moved, and of the workers only
        # whether each heartbeat is current (their expiry times), never their records
        current = self.placement()
        if current is None:
            return False
        keys = [f"worker:{d}" for d in current.assignments]
        alive = {k.split(":", 1)[1]: {} for k in self.store.alive_keys(keys)} if keys else {}
        newly = self.find_down(current, alive) - self.down
        return bool(newly)

    def step(self, now: float | None = None) -> dict | None:
        """One control step if leader; returns the report (also stored in Redis), or None as follower."""
        self._step_t0 = time.perf_counter()
        now = self.store.time() if now is None else now
        if not self.hold_lease():
            return None
        record = self.store.get_record(RECORD) or {}
        heartbeats = self.store.workers()
        report: dict = {"at": now, "holder": self.holder}
        mismatch = self.model_mismatch(heartbeats)
        if mismatch is not None:  # another model's fleet: touch nothing
            report["skipped"], report["detail"] = mismatch
            return self._finish(report, record)
        inventory = self.inventory()
        self.reconciler.devices = inventory.by_id()  # how to start a worker for each device
        records = self.worker_records(heartbeats)
        self._poll_restarts(records)
        current = self.placement()
        if current is None and self._seen_generation and self._store_settled():
            self._store_ok_since = time.monotonic()  # the store lost its data: give workers time to heartbeat again
            self._seen_generation = ""
        if current is None:
            if not self._store_settled():  # workers have not had time to heartbeat into the store yet
                report["skipped"] = "waiting for workers to report what they hold"
                self.last_report = report
                self.set_status(*step_state(report))
                return report
            if not self._recoverable(records):  # a fleet still starting its workers, not a store that lost its table
                report["skipped"] = "waiting for workers to report what they hold"
                report["detail"] = "the live workers do not hold every expert yet, and no placement is published"
                self.last_report = report
                self.set_status(*step_state(report))
                return report
            current = self.recover_placement(records, inventory) or Placement()  # empty: a fleet with nothing placed yet
        self._seen_generation = current.generation or self._seen_generation
        report["placement_version"] = current.version
        # liveness and repair
        down = self.find_down(current, records) if current.assignments else set()
        if down - self.down:
            log.warning("worker(s) down: %s", sorted(down - self.down))
            self.emit("worker_down", {"devices": sorted(down - self.down)})
        self.down = down
        report["down"] = sorted(down)
        unusable = down | set(self._restarting) | set(self._retry) | self.lost  # no running worker: takes no experts
        if self.config.local:
            # local devices are this machine's workers: one without a live worker is restarted, not planned on
            idle_dead = {d.device_id for d in inventory.devices if d.device_id not in records and d.device_id not in current.assignments}
            unusable |= idle_dead
            down_or_idle = down | idle_dead
        else:
            down_or_idle = down
        devices = [self._cap_if_full(d, current) for d in inventory.devices if d.device_id not in unusable]
        # finish or roll back what a previous leader left half-done
        pending = self.store.get_record("rebalance") or {}
        if pending.get("phase") and pending.get("holder") != self.holder:
            what = "completing" if pending["phase"] == "published" else "rolling back"
            log.warning("%s a rebalance left at phase %r by %s", what, pending["phase"], pending.get("holder"))
            self.emit("rebalance_resumed", {"action": what, **pending})
        if current.version and not down:
            live_held = {d: keys for d, info in records.items()
                         if d not in unusable and (keys := held_experts(info)) is not None}
            diff = self.reconciler.converge(current, live_held)
            if pending.get("phase") and pending.get("holder") != self.holder and not diff.removes and not diff.adds:
                self.store.put_record("rebalance", {"phase": None, "at": now, "holder": self.holder}, fence=self.fence)
        report["min_replicas"] = min_replicas(Inventory(devices=devices), self.config.planner, expert_bytes=self.expert_bytes,
                                              shape=(len(self.layers), self.spec.layer.num_experts))
        depths = self.queue_depths(records) if self.config.autoscaling is not None else None
        served, served_load, served_window_s = self.served(now, records)
        decision = decide(
            self.config, record, devices, current, self.load(now), depths, now,
            expert_bytes=self.expert_bytes, layers=self.layers, down=down,
            served=served, served_load=served_load, served_window_s=served_window_s,
        )
        report.update(decision.report)
        if report.get("skipped") == "no live device" and not current.assignments and not inventory.devices:
            report["skipped"] = "no fleet yet"  # a deploy in progress: its application starts workers, then publishes
            report["detail"] = "no placement is published and no device is known yet"
        elif report.get("skipped") == "no live device":
            report["detail"] = no_device_detail(inventory.devices, unusable)
        record = decision.record
        result: Plan | None = decision.plan
        if result is not None and result.apply:
            reason = f"repair: {sorted(down)} down" if down else ("repair" if result.repaired else f"gain {result.gain:.3f}")
            t0 = time.monotonic()
            try:
                published = self.reconciler.apply(result.target, reason=reason, skip=down)
                report["applied_version"] = published.version
                seconds = time.monotonic() - t0
                record = record_apply_seconds(record, decision.cost_s, seconds)
                pending = record.get("pending_prediction")
                if pending is not None:  # the placement serves from now on (the store's clock)
                    record["pending_prediction"] = {**pending, "version": published.version,
                                                    "switched_at": now + seconds}
            except LoadFailedError as e:
                # the step was undone; a device that refused its loads takes no new experts for a while
                log.warning("%s", e)
                report["apply_error"] = str(e)
                record.pop("pending_prediction", None)
                for d in e.errors:
                    self._full_until[d] = time.monotonic() + self.full_cooldown_s
            report["apply_seconds"] = time.monotonic() - t0
        self._restart(down_or_idle, records)
        report["lost"] = sorted(self.lost)
        return self._finish(report, record)

    def _finish(self, report: dict, record: dict) -> dict:
        """Store the step's report and the controller's state (with why); emit ``plan_skipped``, ``prediction_miss``
        and the ``plan`` event, under the lease."""
        if getattr(self, "_step_t0", None) is not None:  # the step's seconds so far (its publish of the record aside)
            report["step_s"] = time.perf_counter() - self._step_t0
        record["last_report"] = report
        record["status"] = self.set_status(*step_state(report))
        self.store.put_record(RECORD, record, fence=self.fence)
        if "plan_skipped" in report:
            self.emit("plan_skipped", {"at": report["at"], "placement_version": report.get("placement_version"),
                                       **report["plan_skipped"]})
        prediction = report.get("prediction")
        if prediction is not None and prediction.get("miss"):
            log.warning("prediction missed after v%s: measured balancedness %.3f, predicted %.3f",
                        prediction["version"], prediction["measured"], prediction["predicted"])
            self.emit("prediction_miss", prediction)
        self.emit("plan", report)
        self.last_report = report
        return report

    def _store_status(self) -> None:
        """Best effort: put the controller's state into its record outside a step (a step that raised)."""
        if not self.leader:
            return
        try:
            record = self.store.get_record(RECORD) or {}
            record["status"] = self.status
            self.store.put_record(RECORD, record, fence=self.fence)
        except Exception as e:  # the store is down: the state shows once it answers
            log.debug("could not store the controller's state: %s", e)

    def run(self, stop: threading.Event) -> None:
        """Step every ``interval_s`` (at once when a worker dies) until ``stop`` is set; followers poll for the lease."""
        from moefleet.core.state import StateStoreUnavailable

        c = self.config
        store_down = False
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                if self._store_ok_since is None and self.store.ping():
                    self._store_ok_since = time.monotonic()
                due = t0 - self._last_step >= c.interval_s
                if not due and self.leader:
                    due = self.health()
                if due:
                    self._last_step = t0
                    self.step()
                if store_down:
                    log.info("%s: the store answers again; resuming", self.holder)
                store_down = False
            except LeaseLostError as e:  # a fenced write found the lease gone: follow from here
                self._lost_lease(str(e))
            except StateStoreUnavailable as e:
                if not store_down:
                    log.warning("%s: the store is unreachable (%s); pausing until it answers", self.holder, e)
                store_down = True
                self.leader = False  # cannot renew: stop acting as leader
                self.reconciler.fence = None
                self._store_ok_since = None
            except Exception as e:  # a failed step is logged with its cause (once while it repeats) and retried
                if self.status.get("reason") != "step failed":
                    log.exception("controller step failed")
                self.set_status("failing", "step failed", f"{type(e).__name__}: {e}")
                self._store_status()
            stop.wait(max(0.0, c.health_interval_s - (time.monotonic() - t0)))
        if self.leader:
            try:
                self.store.release_lease(self.holder)
            except Exception as e:  # it lapses by itself
                log.warning("%s: could not release the lease: %s", self.holder, e)


BLOCKING_REASONS = ("no live device", "no checkpoint", "checkpoint mismatch")
"""Reasons a controller cannot plan at all until someone acts (its state is then ``blocked``)."""


def step_state(report: dict) -> tuple[str, str, str]:
    """(state, reason, detail) of a step's report, for ``status`` and the log. Pure.

    States: ``blocked`` (cannot plan: no live device, another model's fleet), ``waiting`` (for a fleet,
    for workers to report, for load), ``failing`` (a rebalance was undone), ``repairing`` (workers down),
    ``rebalanced`` (this step applied a plan) and ``steady`` (planned; no move pays).
    """
    detail = str(report.get("detail") or "")
    skipped = report.get("skipped")
    if skipped:
        return ("blocked" if skipped in BLOCKING_REASONS else "waiting"), str(skipped), detail
    if report.get("apply_error"):
        return "failing", "rebalance undone", str(report["apply_error"])
    if report.get("down"):
        return "repairing", "workers down", ", ".join(report["down"])
    if report.get("applied_version"):
        gain = report.get("gain")
        return "rebalanced", f"placement v{report['applied_version']}", "" if gain is None else f"gain {gain:.3f}"
    held = report.get("plan_skipped")
    if held:  # a plan with a gain, held back by the gate (cost, cooldown, confirming)
        return "steady", f"plan held: {held.get('reason')}", (
            f"gain {held.get('gain', 0):.3f} x horizon {held.get('horizon_s', 0):.0f}s vs cost {held.get('cost_s', 0):.1f}s"
        )
    gain = report.get("gain")
    return "steady", "no move pays", "" if gain is None else f"best gain {gain:.3f}"


def no_device_detail(devices: list[DeviceSpec], unusable: set[str]) -> str:
    """Why a step found no live device: none in the inventory, or every one down or restarting."""
    if not devices:
        return ("the inventory is empty: no node declares a GPU or a CPU-tier slot (moefleet_cpu_tier), and no worker "
                "of the fleet is recorded (moe-fleet deploy records the workers it starts; see deploy/README.md)")
    return f"every device is down or restarting: {', '.join(sorted(unusable))}"


def controller_actor_class():
    """The controller as a Ray actor (its loop runs in a thread of the actor)."""
    import ray

    @ray.remote(num_cpus=0, max_concurrency=4, max_restarts=-1)
    class ControllerActor:
        """``autorun``: step every interval in a thread; otherwise step only when ``step()`` is called."""

        def __init__(self, config: dict, holder: str, autorun: bool = True):
            # Each incarnation is its own lease holder: one Ray restarted after a crash waits for the
            # old lease to lapse and leads under a new fencing token, never under the dead one's.
            incarnation = ray.get_runtime_context().was_current_actor_reconstructed
            self.controller = Controller(ControllerConfig(**config), holder=f"{holder}-{uuid.uuid4().hex[:6]}" if incarnation else holder)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.controller.run, args=(self.stop,), daemon=True)
            if autorun:
                self.thread.start()

        def step(self) -> dict | None:
            return self.controller.step()

        def release(self) -> None:
            self.controller.store.release_lease(self.controller.holder)

        def is_leader(self) -> bool:
            return self.controller.leader

        def last_report(self) -> dict:
            return self.controller.last_report

        def pid(self) -> int:
            import os

            return os.getpid()

        def wall_clock(self) -> float:
            """This process's wall clock (``time.time()``): how far a host's clock is off shows here."""
            return time.time()

        def shutdown(self) -> None:
            self.stop.set()
            if self.thread.is_alive():
                self.thread.join(timeout=30)

    return ControllerActor


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description="MoE Fleet controller")
    ap.add_argument("--config", required=True, help="YAML file with a ControllerConfig")
    ap.add_argument("--http-port", type=int, default=None,
                    help="serve /metrics, the dashboard and /api/state on this port (overrides http_port; 0: any free port)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ControllerConfig(**(yaml.safe_load(Path(args.config).read_text()) or {}))
    if args.http_port is not None:
        config = config.model_copy(update={"http_port": args.http_port})
    if config.ray_address:
        import ray

        ray.init(address=config.ray_address, namespace=config.namespace, log_to_driver=False)
    controller = Controller(config)
    http = None
    if config.http_port is not None:
        from .http import TelemetryServer

        http = TelemetryServer(controller.store, config.telemetry, config.http_host, config.http_port)
        log.info("telemetry endpoint on http://%s (/metrics, /, /api/state)", http.start())
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        controller.run(stop)
    finally:
        if http is not None:
            http.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
