"""The controller: one leader at a time turns load into placement, step by step.

Each step of the leader (every ``interval_s``):

1. read the decayed per-expert load from Redis (or from a recorded trace);
2. autoscaling: the number of active devices follows the workers' queue depth
   (pure policy in ``autoscale.py``; its state is returned and stored in Redis);
3. plan (pure, ``planner.plan``) from load, the active devices and the current
   placement; the plan's predicted gain is recorded whether or not it is applied;
4. if the plan says so, the reconciler applies it without pausing requests.

Leadership: a lease in Redis. A follower polls for it; when the leader dies
its lease lapses (Redis expiry) and the follower takes over within the lease
time, continuing from the placement and records in Redis.

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
from pydantic import BaseModel, ConfigDict, Field

from moefleet.core.config import WorkerConfig
from moefleet.core.model import MoECheckpoint
from moefleet.core.placement import DeviceSpec, Inventory, Placement
from moefleet.core.state import StateStore, resolve_redis_url
from moefleet.kernels.experts import packed_kind

from .autoscale import AutoscalingConfig, autoscale_step
from .planner import Plan, PlannerKnobs, plan
from .reconciler import Reconciler

log = logging.getLogger(__name__)

RECORD = "controller"


class ControllerConfig(BaseModel):
    """The controller's settings (the ConfigMap's ``controller.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(default=None, description="Checkpoint the fleet serves; None for the built-in model.")
    redis_url: str | None = Field(default=None, description="Redis URL; default MOEFLEET_REDIS_URL.")
    namespace: str = Field(default="moefleet", description="Ray namespace and Redis key prefix.")
    ray_address: str | None = Field(default="auto", description="Ray cluster to join ('auto', an address, or None for none).")
    interval_s: float = Field(default=2.0, gt=0, description="Seconds between control steps.")
    lease_ttl_s: float = Field(default=5.0, gt=0, description="Leader lease; a dead leader is replaced within this.")
    load_window_s: float = Field(default=1.0, gt=0, description="Width of the routers' load windows.")
    load_windows: int = Field(default=30, gt=0, description="Windows of load the planner looks at.")
    load_half_life_s: float = Field(default=10.0, gt=0, description="Half-life of the decayed load estimate.")
    min_tokens: float = Field(default=100.0, ge=0, description="Plan only when the window saw at least this many tokens.")
    planner: PlannerKnobs = Field(default_factory=PlannerKnobs)
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
        self.store = store or StateStore(resolve_redis_url(config.redis_url), namespace=config.namespace)
        self.checkpoint = str(config.checkpoint or default_model_dir())
        ckpt = MoECheckpoint(self.checkpoint)
        self.spec = ckpt.spec
        self.layers = list(self.spec.moe_layers)
        self.expert_bytes = held_expert_bytes(ckpt, self.layers, config.worker, local=config.local)
        self.clock = clock
        self.leader = False
        self._trace = json.loads(Path(config.trace).read_text()) if config.trace else None
        self._trace_start: float | None = None
        self.reconciler = Reconciler(
            self.store, self.checkpoint, config.namespace, config.worker, {d.device_id: d for d in config.devices},
            drain_timeout_s=config.drain_timeout_s, local=config.local, clock=clock,
        )
        self.last_report: dict = {}

    # -- inputs ----------------------------------------------------------
    def inventory(self) -> Inventory:
        if self.config.devices:
            return Inventory(devices=self.config.devices)
        import ray

        from .inventory import inventory_from_nodes

        return inventory_from_nodes(ray.nodes())

    def load(self, now: float) -> np.ndarray:
        c = self.config
        if self._trace is not None:
            if self._trace_start is None:
                self._trace_start = now
            t = now - self._trace_start
            entries = self._trace["steps"]
            step = max((s for s in entries if s["t"] <= t), key=lambda s: s["t"], default=entries[0])
            return np.asarray(step["load"], dtype=float)
        raw = self.store.read_load(now, c.load_window_s, c.load_windows, c.load_half_life_s)
        return load_matrix(raw, self.layers, self.spec.layer.num_experts)

    def queue_depths(self) -> dict[str, float]:
        """Workers' queue depth (in-flight calls), by device id."""
        import ray

        from moefleet.router_service.transport import worker_actor_name

        current = self.store.get_placement() or Placement()
        out = {}
        for d in current.assignments:
            try:
                out[d] = float(ray.get(ray.get_actor(worker_actor_name(d), namespace=self.config.namespace).stats.remote(), timeout=5)["queue_depth"])
            except Exception as e:  # an unreachable worker reports nothing this round
                log.warning("queue depth of %s unavailable: %s", d, e)
        return out

    # -- leadership ------------------------------------------------------
    def hold_lease(self, now: float) -> bool:
        ttl = self.config.lease_ttl_s
        if self.leader:
            self.leader = self.store.renew_lease(self.holder, ttl, now)
            if not self.leader:
                log.warning("%s lost the leader lease", self.holder)
        if not self.leader:
            self.leader = self.store.try_acquire_lease(self.holder, ttl, now)
            if self.leader:
                log.info("%s is the leader", self.holder)
                self.store.emit_event("leader", {"holder": self.holder}, now)
        return self.leader

    # -- one step --------------------------------------------------------
    def step(self, now: float | None = None) -> dict | None:
        """One control step if leader; returns the report (also stored in Redis), or None as follower."""
        now = self.clock() if now is None else now
        if not self.hold_lease(now):
            return None
        record = self.store.get_record(RECORD) or {}
        inventory = self.inventory()
        devices = inventory.devices
        self.reconciler.devices = inventory.by_id()  # how to start a worker for each device
        current = self.store.get_placement() or Placement()
        report: dict = {"at": now, "holder": self.holder, "placement_version": current.version}
        if self.config.autoscaling is not None:
            active = int(record.get("active_devices") or len(current.assignments) or len(devices))
            desired, policy_state = autoscale_step(
                self.config.autoscaling, self.queue_depths(), active, record.get("autoscale_state"), now
            )
            desired = max(1, min(desired, len(devices)))
            record["active_devices"], record["autoscale_state"] = desired, policy_state
            report["active_devices"] = desired
            devices = devices[:desired]
        load = self.load(now)
        report["tokens"] = float(load.sum())
        if load.sum() < self.config.min_tokens and current.version > 0:
            report["skipped"] = "too little load to plan from"
        else:
            result: Plan = plan(
                load, Inventory(devices=devices), current, self.config.planner, expert_bytes=self.expert_bytes, layers=self.layers
            )
            report.update(
                balancedness_before=result.balancedness_before, balancedness_after=result.balancedness_after,
                gain=result.gain, copies=result.copies, apply=result.apply,
            )
            if result.apply and self.store.renew_lease(self.holder, self.config.lease_ttl_s, self.clock()):
                published = self.reconciler.apply(result.target, reason=f"gain {result.gain:.3f}")
                report["applied_version"] = published.version
        record["last_report"] = report
        self.store.put_record(RECORD, record)
        self.store.emit_event("plan", report, now)
        self.last_report = report
        return report

    def run(self, stop: threading.Event) -> None:
        """Step every ``interval_s`` until ``stop`` is set (followers poll for the lease at the same pace)."""
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                self.step()
            except Exception:  # a failed step is logged with its cause and retried next interval
                log.exception("controller step failed")
            stop.wait(max(0.0, self.config.interval_s - (time.monotonic() - t0)))
        if self.leader:
            self.store.release_lease(self.holder)


def controller_actor_class():
    """The controller as a Ray actor (its loop runs in a thread of the actor)."""
    import ray

    @ray.remote(num_cpus=0, max_concurrency=4)
    class ControllerActor:
        """``autorun``: step every interval in a thread; otherwise step only when ``step()`` is called."""

        def __init__(self, config: dict, holder: str, autorun: bool = True):
            self.controller = Controller(ControllerConfig(**config), holder=holder)
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

        def shutdown(self) -> None:
            self.stop.set()
            if self.thread.is_alive():
                self.thread.join(timeout=30)

    return ControllerActor


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description="MoE Fleet controller")
    ap.add_argument("--config", required=True, help="YAML file with a ControllerConfig")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ControllerConfig(**(yaml.safe_load(Path(args.config).read_text()) or {}))
    if config.ray_address:
        import ray

        ray.init(address=config.ray_address, namespace=config.namespace, log_to_driver=False)
    controller = Controller(config)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    controller.run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
