"""Apply a target placement to the running fleet without losing or pausing a request.

The order of a step (each part safe to repeat):

1. start workers for new devices and load the experts each device gains,
   while the old placement keeps serving (workers hold old and new experts);
2. publish the target placement as the next version (compare-and-set in Redis,
   fenced by the leader lease); routers switch by swapping one reference, so
   no request waits;
3. drain: wait until every router reports that nothing it dispatched under
   an older version is still in flight (renewing the lease while waiting);
4. unload the experts each device lost, and retire devices left empty.

Every command to a worker carries the leader's fencing token, and the lease
is checked (renewed under its token) before each publish and unload: a leader
that lost its lease stops there, and workers refuse a command whose token is
not the lease's current one (checked in Redis). Every write the leader makes
(placement, records, events, counters) is fenced by the same token.

Drains count every router that may still dispatch: those heartbeating, and
those whose heartbeat lapsed while their process lives (a router cut off from
the store keeps serving from the placement it holds). When such a router has
not drained by the drain timeout, the step leaves its unloads to
``converge``, which makes them once every router has drained.

``converge`` makes the workers hold what the published placement says, from
what they report holding: experts a crashed leader loaded but never published,
or unpublished-then-abandoned, are unloaded; experts a placement names that a
worker lacks are loaded. It is how a new leader completes or rolls back a
rebalance its predecessor died in.

A router that still dispatches to a replica already gone (a stale placement)
gets ``ExpertNotLoadedError`` back and re-dispatches on the new placement, so
even a missed drain loses no request.

``placement_diff``, ``routers_drained`` and ``worker_diff`` are the pure part;
``Reconciler`` is the thin shell over Ray and the state store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moefleet.core.config import WorkerConfig
from moefleet.core.placement import DeviceId, DeviceSpec, ExpertKey, Placement, worker_actor_name
from moefleet.core.state import LeaseLostError, StateStore

ROUTER_GRACE_S = 600.0
"""How long after its last heartbeat a router whose process still lives counts in drains (a router cut off
from the store); the registry forgets entries lapsed longer (``StateStore.worker_forget_after_s``)."""


class LoadFailedError(RuntimeError):
    """A step's loads failed on some devices (out of memory, worker error); nothing was published."""

    def __init__(self, errors: dict[DeviceId, str]):
        self.errors = dict(errors)
        super().__init__("loads failed, step undone: " + "; ".join(f"{d}: {e}" for d, e in sorted(self.errors.items())))

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


def _inflight_drained(r: dict, version: int, generation: str | None) -> bool:
    oldest = r.get("oldest_inflight")
    if oldest is not None:  # [generation, version] of the oldest call in flight: a call of another table is older
        gen, ver = oldest
        return (generation is None or gen == generation) and int(ver) >= version
    return r.get("oldest_inflight_version", -1) >= version


def routers_drained(routers: dict[str, dict], version: int, generation: str | None = None) -> bool:
    """True when every live router serves ``version`` (of ``generation``) or later and has nothing older in flight.

    No router reporting is not drained: routers that cannot reach the store
    (or have not yet said anything) may still have old calls in flight.
    In-flight calls count by (generation, version): after a store reset a
    call still running on version 7 of the old table is older than version 1
    of the new one.
    """
    if not routers:
        return False
    return all(
        (generation is None or r.get("placement_generation") == generation)
        and r.get("placement_version", -1) >= version
        and _inflight_drained(r, version, generation)
        for r in routers.values()
    )


def stage_transition(
    current: Placement,
    target: Placement,
    expert_bytes: Callable[[ExpertKey], int],
    capacity: dict[DeviceId, int],
    max_stages: int = 16,
) -> list[Placement]:
    """The placements to publish in turn, ending with ``target``, so that no device outgrows its memory.

    A step loads what a device gains before it unloads what it loses (make
    before break), so a device momentarily holds both. When that does not fit
    in ``capacity`` (bytes per device; absent: unbounded), the move is staged:
    each stage adds what fits beside what the device holds now and drops what
    still has a replica elsewhere in the stage, freeing room for the next.
    Every stage is a complete placement (every expert keeps a replica).
    Returns ``[target]`` when one step fits; raises ``ValueError`` naming the
    device when no staging can make room (the plan then waits).
    """
    cur = {d: {tuple(k) for k in keys} for d, keys in current.assignments.items()}
    tgt = {d: {tuple(k) for k in keys} for d, keys in target.assignments.items()}
    devices = sorted(set(cur) | set(tgt))

    def used(keys) -> int:
        return sum(expert_bytes(k) for k in keys)

    def fits(a: dict, b: dict) -> bool:
        return all(used(a.get(d, set()) | b.get(d, set())) <= capacity.get(d, float("inf")) for d in devices)

    stages: list[Placement] = []
    for _ in range(max_stages):
        if fits(cur, tgt):
            return stages + [target]
        nxt = {d: set(keys) for d, keys in cur.items()}
        for d in devices:  # add what fits beside what the device holds
            room = capacity.get(d, float("inf")) - used(cur.get(d, set()))
            for k in sorted(tgt.get(d, set()) - cur.get(d, set())):
                b = expert_bytes(k)
                if b <= room:
                    nxt.setdefault(d, set()).add(k)
                    room -= b
        for d in devices:  # drop what the target drops and still has a replica elsewhere in this stage
            for k in sorted(cur.get(d, set()) - tgt.get(d, set())):
                if any(k in nxt.get(o, set()) for o in devices if o != d):
                    nxt[d].discard(k)
        if nxt == cur:
            over = [d for d in devices if used(cur.get(d, set()) | tgt.get(d, set())) > capacity.get(d, float("inf"))]
            raise ValueError(f"capacity: cannot stage the move within device memory (devices {over} stay over)")
        stages.append(Placement(assignments={d: sorted(k) for d, k in nxt.items() if k}, speeds=target.speeds))
        cur = nxt
    raise ValueError(f"capacity: the move needs more than {max_stages} stages")


def worker_diff(placement: Placement, held: dict[DeviceId, list[ExpertKey]]) -> PlacementDiff:
    """What each live worker must load and unload to hold exactly what ``placement`` assigns it.

    held: experts each live worker reports holding (devices absent here are
    not live and get nothing). Devices the placement does not name must hold
    nothing.
    """
    assigned = {d: keys for d, keys in placement.assignments.items() if d in held}
    actual = Placement(assignments={d: [tuple(k) for k in keys] for d, keys in held.items()})
    diff = placement_diff(actual, Placement(assignments=assigned))
    diff.new_devices, diff.retired_devices = [], []  # workers are not started or retired here
    return diff


class Reconciler:
    """Converges the running workers to a target placement (see the module docstring).

    fence: ``(holder, token)`` of the lease the commands are made under; with
    ``keepalive`` (renews the lease, returns False once it is lost) the lease is
    checked before each publish and unload and kept alive while draining.
    """

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
        redis_url: str | None = None,
        expert_bytes: Callable[[ExpertKey], int] | None = None,
        clock=time.time,
    ):
        self.store = store
        self.expert_bytes = expert_bytes  # bytes one replica holds (staging moves within device memory); None: unstaged
        self.checkpoint = checkpoint
        self.namespace = namespace
        self.worker = worker or WorkerConfig()
        self.devices = devices or {}
        self.drain_timeout_s = drain_timeout_s
        self.local = local  # local mode: devices are CPU workers on this node (no GPU request, no node affinity)
        self.redis_url = redis_url
        self.clock = clock
        self.fence: tuple[str, int] | None = None
        # devices whose worker starts as the deployment started it (inventory.fleet_worker_options), not as its node type
        self.start_options: dict[DeviceId, dict] = {}
        self.keepalive = None
        self.last_apply: dict = {}
        self.router_grace_s = ROUTER_GRACE_S
        self.command_timeout_s = 300.0  # longest wait for workers' loads and unloads
        self.cut_off_routers: list[str] = []  # routers alive but not heartbeating at the last drain check

    # -- Ray -------------------------------------------------------------
    def handle(self, device: DeviceId, experts: list[ExpertKey] = ()):
        """The worker actor of ``device``, started (detached, named) if it is not running."""
        from moefleet.expert_workers.launch import start_worker

        spec = self.devices.get(device)
        options: dict = {}
        cpus = None
        worker = self.worker
        if spec is not None and spec.emulated is not None:  # computes on this machine's CPU and owns no core
            worker = worker.model_copy(update={"num_cpus": 0})
        elif spec is not None and self.local:
            cpus = spec.cpus
        elif device in self.start_options:
            options = dict(self.start_options[device])
            worker = worker.model_copy(update={"num_cpus": options.pop("num_cpus")})
        elif spec is not None:
            from .inventory import worker_resources

            need = worker_resources(spec)
            options = dict(num_gpus=need.get("num_gpus"), resources=need.get("resources"), node_id=spec.node_id or None)
        return start_worker(
            device, self.checkpoint, list(experts), self.namespace, worker, cpus=cpus, redis_url=self.redis_url,
            memory_bytes=None if spec is None else spec.memory_bytes, emulate=None if spec is None else spec.emulated,
            **options,
        )

    def running(self, device: DeviceId):
        """The worker actor of ``device`` if one is registered (never starts one), else None."""
        import ray

        try:
            return ray.get_actor(worker_actor_name(device), namespace=self.namespace)
        except ValueError:
            return None

    def retire(self, device: DeviceId) -> None:
        import ray

        try:
            ray.kill(ray.get_actor(worker_actor_name(device), namespace=self.namespace))
        except ValueError:
            pass  # already gone

    def emit(self, kind: str, data: dict) -> None:
        """An event written under the leader's fence (``LeaseLostError`` once the lease is lost)."""
        self.store.emit_event(kind, data, fence=self.fence)

    def _count(self, seconds: float | None, loads: int, bytes_moved: int) -> None:
        """Add a rebalance (``seconds``; None: copies made converging) to the fleet's counters (best effort)."""
        from .telemetry import REBALANCE_COUNTERS, rebalance_increments

        if seconds is None and not loads:
            return
        try:
            self.store.add_counters(REBALANCE_COUNTERS, rebalance_increments(seconds, loads, bytes_moved), fence=self.fence)
        except LeaseLostError:
            raise
        except Exception as e:  # telemetry must not stop a rebalance
            log.warning("could not count the rebalance: %s", e)

    # -- routers -----------------------------------------------------------
    def live_routers(self) -> dict[str, dict]:
        """Every router that may still dispatch: heartbeating, or lapsed while its process lives (cut off from the store).

        A lapsed router's entry is its last report, marked ``"lapsed": True``;
        whether its process lives is asked of Ray (the actor id it reported).
        """
        records = self.store.worker_records(lapsed_within_s=self.router_grace_s)
        now = self.store.time()
        out, cut_off = {}, []
        for key, rec in records.items():
            if not key.startswith("router:"):
                continue
            if now < rec.expires_at:
                out[key] = rec.info
            elif _actor_alive(rec.info.get("actor_id")):
                out[key] = {**rec.info, "lapsed": True}
                cut_off.append(key)
        self.cut_off_routers = sorted(cut_off)
        return out

    def _store_time(self) -> float:
        try:
            return self.store.time()
        except Exception:  # reporting only: fall back to this host's clock
            return time.time()

    def _bytes(self, diff: PlacementDiff) -> int:
        """Weight bytes a step copies (0 when the reconciler does not know replica sizes)."""
        if self.expert_bytes is None:
            return 0
        return int(sum(self.expert_bytes(k) for keys in diff.adds.values() for k in keys))

    def _token(self) -> int | None:
        return None if self.fence is None else self.fence[1]

    def _wait(self, refs: list, what: str) -> list:
        """``ray.get(refs)``, renewing the lease while waiting (loads on a worker that is starting take seconds)."""
        import ray

        from moefleet.expert_workers.group import StaleCommandError

        pending = list(refs)
        deadline = time.monotonic() + self.command_timeout_s
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if pending:
                self._check_lease(what)
                if time.monotonic() > deadline:  # a worker that never started (no resources) or hangs
                    raise TimeoutError(f"{len(pending)} worker command(s) unfinished after {self.command_timeout_s:.0f}s "
                                       f"before {what}")
        try:
            return ray.get(list(refs))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.as_instanceof_cause(), StaleCommandError):  # a worker knows a newer leader
                raise LeaseLostError(f"a worker refused the command before {what}: {e.as_instanceof_cause()}") from e
            raise

    def _wait_loads(self, pending: dict, diff: PlacementDiff, token) -> None:
        """Wait for a step's loads; when any fails, take back what the step loaded and raise ``LoadFailedError``.

        Nothing is published before every load succeeded, so undoing the loads
        leaves the fleet serving the current placement, untouched. A worker that
        refused the command as not the current leader's means the lease is lost:
        ``LeaseLostError`` (the next leader converges).
        """
        import ray

        from moefleet.expert_workers.group import StaleCommandError

        try:
            self._wait(list(pending.values()), "the loads end")
            return
        except LeaseLostError:
            raise
        except Exception:
            pass
        failed: dict[DeviceId, str] = {}
        for d, ref in pending.items():
            try:
                ray.get(ref, timeout=0)  # the wait ended: a load still running counts as failed
            except Exception as e:  # noqa: BLE001 - reported with the device it came from
                cause = e.as_instanceof_cause() if isinstance(e, ray.exceptions.RayTaskError) else e
                if isinstance(cause, StaleCommandError):
                    raise LeaseLostError(f"worker of {d} refused the step's loads: {cause}") from e
                failed[d] = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        undo = [self.handle(d).unload.remote([list(k) for k in diff.adds[d]], token) for d in pending]
        try:
            ray.get(undo, timeout=30)
        except Exception as e:  # noqa: BLE001 - the next step converges workers to the placement anyway
            log.warning("could not take back every load of a failed step: %s", e)
        self._record(None)
        try:
            self.emit("rebalance_failed", {"devices": sorted(failed), "errors": failed})
        except LeaseLostError:
            raise
        except Exception as e:  # reporting only
            log.warning("could not record the failed rebalance: %s", e)
        raise LoadFailedError(failed)

    def _check_lease(self, what: str) -> None:
        if self.keepalive is not None and not self.keepalive():
            raise LeaseLostError(f"lease lost before {what}: stopping this rebalance (the next leader converges)")

    def _record(self, phase: str | None, **data) -> None:
        """The rebalance in progress, for the next leader and for operators (best effort, but fenced:
        a leader that lost its lease writes nothing and stops)."""
        try:
            rec = {"phase": phase, "at": self.clock(), "holder": None if self.fence is None else self.fence[0], **data}
            self.store.put_record("rebalance", rec, fence=self.fence)
        except LeaseLostError:
            raise
        except Exception as e:  # never let bookkeeping stop a rebalance
            log.warning("could not record the rebalance phase %s: %s", phase, e)

    # -- one step --------------------------------------------------------
    def apply(self, target: Placement, *, reason: str = "", skip: set[DeviceId] | frozenset = frozenset()) -> Placement:
        """Converge to ``target``; returns the placement as published last (the target).

        When a device cannot hold what it gains beside what it loses, the move
        is made in stages (``stage_transition``), each published and drained
        before the next, so no worker outgrows its memory mid-rebalance.

        skip: devices whose workers are dead: nothing is loaded on, unloaded
        from or retired on them (a restarted worker may already hold the name).
        """
        current = self.store.get_placement() or Placement()
        stages = [target]
        if self.expert_bytes is not None:
            capacity = {d: spec.memory_bytes for d, spec in self.devices.items()}
            live = Placement(assignments={d: k for d, k in current.assignments.items() if d not in skip})
            stages = stage_transition(live, target, self.expert_bytes, capacity)
        published = current
        for i, stage in enumerate(stages):
            why = reason if i == len(stages) - 1 else f"{reason} (stage {i + 1} of {len(stages)}: room first)"
            published = self._apply_step(stage, reason=why, skip=skip)
        return published

    def _apply_step(self, target: Placement, *, reason: str, skip) -> Placement:
        current = self.store.get_placement() or Placement()
        diff = placement_diff(current, target)
        if diff.empty:
            return current
        import ray  # noqa: F401  (the steps below drive workers through Ray)

        t0 = self.clock()
        started_at = self._store_time()
        token = self._token()
        self._record("loading", from_version=current.version, loads=diff.num_loads, reason=reason,
                     devices=sorted(d for d in diff.adds if d not in skip))
        # 1. load what each device gains (new devices start with their experts)
        pending: dict[DeviceId, object] = {}
        for d, keys in diff.adds.items():
            if d in skip:
                continue
            h = self.handle(d, keys if d in diff.new_devices else [])
            pending[d] = h.load.remote([list(k) for k in keys], token)
        self._wait_loads(pending, diff, token)
        # 2. publish: routers switch without waiting
        self._check_lease("publish")
        published = self.store.publish_placement(target, expected_version=current.version, fence=self.fence)
        self._record("published", version=published.version, generation=published.generation)
        self.emit("placement", {"version": published.version, "loads": diff.num_loads, "bytes": self._bytes(diff), "reason": reason})
        # 3. drain what was dispatched under older versions (nothing to wait for when nothing is unloaded)
        removing = any(d not in skip for d in diff.removes)
        drained = self.wait_drained(published.version, published.generation) if removing else True
        # 4. unload and retire; a router cut off from the store may still use what would go: converge unloads later
        self._check_lease("unload")
        if not drained and self.cut_off_routers:
            log.warning("placement v%d: routers %s are cut off from the store and may still use the old replicas; "
                        "their unloads wait until they drain", published.version, self.cut_off_routers)
            self.emit("unload_deferred", {"version": published.version, "routers": self.cut_off_routers})
        else:
            unloads = [
                self.handle(d).unload.remote([list(k) for k in keys], token)
                for d, keys in diff.removes.items()
                if d not in diff.retired_devices and d not in skip
            ]
            self._wait(unloads, "the unloads end")
            for d in diff.retired_devices:
                if d not in skip:
                    self.retire(d)
        self._record(None, version=published.version)
        elapsed = self.clock() - t0
        self._count(elapsed, diff.num_loads, self._bytes(diff))
        try:
            self.emit("rebalance", {
                "version": published.version, "started_at": started_at, "ended_at": self._store_time(), "loads": diff.num_loads,
                "unloads": sum(len(v) for d, v in diff.removes.items() if d not in skip), "bytes_moved": self._bytes(diff),
                "drained": drained, "reason": reason,
            })
        except LeaseLostError:
            raise
        except Exception as e:  # reporting only
            log.warning("could not record the rebalance: %s", e)
        self.last_apply = {"version": published.version, "loads": diff.num_loads, "seconds": elapsed, "drained": drained}
        log.info(
            "placement v%d applied: %d loads, %d devices started, %d retired, drained=%s, %.2fs (%s)",
            published.version, diff.num_loads, len(diff.new_devices), len([d for d in diff.retired_devices if d not in skip]),
            drained, elapsed, reason,
        )
        return published

    def converge(self, placement: Placement, held: dict[DeviceId, list[ExpertKey]]) -> PlacementDiff:
        """Make live workers hold what ``placement`` assigns them (``held``: what they report holding).

        Missing experts are loaded at once; extra ones are unloaded only once
        every router has drained ``placement`` (no call in flight may still use them).
        Returns what it did.
        """
        diff = worker_diff(placement, held)
        if diff.empty:
            return diff
        token = self._token()
        handles = {d: self.running(d) for d in set(diff.adds) | set(diff.removes)}  # a worker gone since its report: skipped
        diff.adds = {d: keys for d, keys in diff.adds.items() if handles[d] is not None}
        diff.removes = {d: keys for d, keys in diff.removes.items() if handles[d] is not None}
        loads = [handles[d].load.remote([list(k) for k in keys], token) for d, keys in diff.adds.items()]
        self._wait(loads, "the loads end")
        if diff.removes:
            if not routers_drained(self.live_routers(), placement.version, placement.generation):
                diff.removes = {}  # next step
            else:
                self._check_lease("unload")
                self._wait([handles[d].unload.remote([list(k) for k in keys], token) for d, keys in diff.removes.items()],
                           "the unloads end")
        self._count(None, diff.num_loads, self._bytes(diff))
        if diff.adds or diff.removes:
            log.info("converged workers to placement v%d: loaded %s, unloaded %s", placement.version, diff.adds, diff.removes)
            self.emit("converge", {"version": placement.version, "loaded": diff.num_loads,
                                   "unloaded": sum(len(v) for v in diff.removes.values())})
        return diff

    def wait_drained(self, version: int, generation: str | None = None, poll_s: float = 0.05) -> bool:
        deadline = time.monotonic() + self.drain_timeout_s
        last_renew = time.monotonic()
        while time.monotonic() < deadline:
            if routers_drained(self.live_routers(), version, generation):
                return True
            if self.keepalive is not None and time.monotonic() - last_renew > 0.5:
                self._check_lease("the drain ends")
                last_renew = time.monotonic()
            time.sleep(poll_s)
        if not self.cut_off_routers:
            log.warning("placement v%d: routers did not drain within %.0fs; unloading anyway (stale calls re-dispatch)",
                        version, self.drain_timeout_s)
        return False


def _actor_alive(actor_id: str | None) -> bool:
    """Whether Ray's actor table says the actor ``actor_id`` (hex) is alive; False when unknown or unreadable."""
    if not actor_id:
        return False
    try:
        import ray
        from ray._private import state

        if not ray.is_initialized():
            return False
        info = state.actors(actor_id=actor_id)
    except Exception as e:  # no Ray here, or its table unreadable: count the router as gone (the drain timeout bounds it)
        log.debug("actor %s: state unknown: %s", actor_id, e)
        return False
    return bool(info) and info.get("State") == "ALIVE"
