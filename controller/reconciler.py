"""Apply a target placement to the running fleet without losing or pausing a request.

The order of a step (each part safe to repeat):

1. start workers for new devices and load the experts each device gains,
   while the old placement keeps serving (workers hold old and new experts);
2. publish the target placement as the next version (compare-and-set in Redis);
   routers switch by swapping one reference, so no request waits;
3. drain: wait until every live router reports that nothing it dispatched under
   an older version is still in flight;
4. unload the experts each device lost, and retire devices left empty.

A router that still dispatches to a replica already gone (a stale placement)
gets ``ExpertNotLoadedError`` back and re-dispatches on the new placement, so
even a missed drain loses no request.

``placement_diff`` is the pure part; ``Reconciler`` is the thin shell over Ray
and the state store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from moefleet.core.config import WorkerConfig
from moefleet.core.placement import DeviceId, DeviceSpec, ExpertKey, Placement
from moefleet.core.state import StateStore

log = logging.getLogger(__name__)


@dataclass
class PlacementDiff:
    """What changes from one placement to the next, per device."""

    adds: dict[DeviceId, list[ExpertKey]] = field(default_factory=dict)
    removes: dict[DeviceId, list[ExpertKey]] = field(default_factory=dict)
    new_devices: list[DeviceId] = field(default_factory=list)
    retired_devices: list[DeviceId] = field(default_factory=list)

    @property
    def num_loads(self) -> int:
        """Expert weight copies this step makes (the planner's 'moves')."""
        return sum(len(v) for v in self.adds.values())

    @property
    def empty(self) -> bool:
        return not (self.adds or self.removes or self.new_devices or self.retired_devices)


def placement_diff(current: Placement, target: Placement) -> PlacementDiff:
    """Per-device experts to load and unload to go from ``current`` to ``target``."""
    diff = PlacementDiff()
    cur = {d: {tuple(k) for k in keys} for d, keys in current.assignments.items()}
    tgt = {d: {tuple(k) for k in keys} for d, keys in target.assignments.items()}
    for d in sorted(set(cur) | set(tgt)):
        a, b = cur.get(d, set()), tgt.get(d, set())
        if b - a:
            diff.adds[d] = sorted(b - a)
        if a - b:
            diff.removes[d] = sorted(a - b)
        if d not in cur and b:
            diff.new_devices.append(d)
        if d in cur and not b:
            diff.retired_devices.append(d)
    return diff


def routers_drained(routers: dict[str, dict], version: int) -> bool:
    """True when every live router serves ``version`` or later and has nothing older in flight."""
    return all(
        r.get("placement_version", -1) >= version and r.get("oldest_inflight_version", -1) >= version for r in routers.values()
    )


class Reconciler:
    """Converges the running workers to a target placement (see the module docstring)."""

    def __init__(
        self,
        store: StateStore,
        checkpoint: str,
        namespace: str,
        worker: WorkerConfig | None = None,
        devices: dict[DeviceId, DeviceSpec] | None = None,
        *,
        drain_timeout_s: float = 30.0,
        local: bool = False,
        clock=time.time,
    ):
        self.store = store
        self.checkpoint = checkpoint
        self.namespace = namespace
        self.worker = worker or WorkerConfig()
        self.devices = devices or {}
        self.drain_timeout_s = drain_timeout_s
        self.local = local  # local mode: devices are CPU workers on this node (no GPU request, no node affinity)
        self.clock = clock

    # -- Ray -------------------------------------------------------------
    def handle(self, device: DeviceId, experts: list[ExpertKey] = ()):
        """The worker actor of ``device``, started (detached, named) if it is not running."""
        import ray

        from moefleet.expert_workers.group import expert_group_actor_class
        from moefleet.router_service.transport import worker_actor_name

        opts = dict(
            name=worker_actor_name(device), namespace=self.namespace, lifetime="detached", get_if_exists=True,
            num_cpus=self.worker.num_cpus, num_gpus=self.worker.num_gpus, max_concurrency=self.worker.max_concurrency,
            resources=dict(self.worker.resources),
        )
        spec = self.devices.get(device)
        if spec is not None and not self.local:
            from .inventory import worker_resources

            need = worker_resources(spec)
            opts["num_gpus"] = need.get("num_gpus", opts["num_gpus"])
            opts["resources"].update(need.get("resources", {}))
            if spec.node_id:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                node = next((n["NodeID"] for n in ray.nodes() if n["NodeID"].startswith(spec.node_id) and n["Alive"]), None)
                if node is not None:
                    opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        cls = expert_group_actor_class()
        return cls.options(**opts).remote(
            device, self.checkpoint, [tuple(k) for k in experts], dtype=self.worker.dtype, backend=self.worker.backend
        )

    def retire(self, device: DeviceId) -> None:
        import ray

        from moefleet.router_service.transport import worker_actor_name

        try:
            ray.kill(ray.get_actor(worker_actor_name(device), namespace=self.namespace))
        except ValueError:
            pass  # already gone

    # -- one step --------------------------------------------------------
    def apply(self, target: Placement, *, reason: str = "") -> Placement:
        """Converge to ``target``; returns the placement as published (its version is the next one)."""
        import ray

        current = self.store.get_placement() or Placement()
        diff = placement_diff(current, target)
        if diff.empty:
            return current
        t0 = self.clock()
        # 1. load what each device gains (new devices start with their experts)
        pending = []
        for d, keys in diff.adds.items():
            h = self.handle(d, keys if d in diff.new_devices else [])
            pending.append(h.load.remote([list(k) for k in keys]))
        ray.get(pending)
        # 2. publish: routers switch without waiting
        published = self.store.publish_placement(target, expected_version=current.version)
        self.store.emit_event(
            "placement", {"version": published.version, "loads": diff.num_loads, "reason": reason}, self.clock()
        )
        # 3. drain what was dispatched under older versions
        drained = self.wait_drained(published.version)
        # 4. unload and retire
        unloads = [self.handle(d).unload.remote([list(k) for k in keys]) for d, keys in diff.removes.items() if d not in diff.retired_devices]
        ray.get(unloads)
        for d in diff.retired_devices:
            self.retire(d)
        log.info(
            "placement v%d applied: %d loads, %d devices started, %d retired, drained=%s, %.2fs",
            published.version, diff.num_loads, len(diff.new_devices), len(diff.retired_devices), drained, self.clock() - t0,
        )
        return published

    def wait_drained(self, version: int, poll_s: float = 0.05) -> bool:
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline:
            routers = {k: v for k, v in self.store.workers(self.clock()).items() if k.startswith("router:")}
            if routers_drained(routers, version):
                return True
            time.sleep(poll_s)
        log.warning("placement v%d: routers did not drain within %.0fs; unloading anyway (stale calls re-dispatch)", version, self.drain_timeout_s)
        return False
