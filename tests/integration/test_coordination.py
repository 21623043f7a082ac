"""Coordination faults: a deposed leader, a controller killed mid-rebalance, clock skew, the Serve
ingress's drain report, and how the transport tells a dead worker from a failed call.

Each runs against the session's real Ray and Redis with real workers; the
controller's phases are driven through its own reconciler and workers, and a
"dead" leader is one that simply stops (its lease lapses in Redis).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import ray
import torch

from moefleet import MoEModel
from moefleet.controller.main import Controller
from moefleet.controller.reconciler import Reconciler, routers_drained
from moefleet.core.config import FleetConfig, RouterConfig
from moefleet.core.placement import Placement
from moefleet.core.state import LeaseLostError, StateStore
from moefleet.local import LocalFleet
from moefleet.router_service.client import FleetClient
from tests import hf_models
from tests.integration.test_self_healing import Traffic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-coord")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def fleet(ray_cluster, redis_server, checkpoint):
    """A fleet without its own controller: the tests play the leaders."""
    cfg = FleetConfig(checkpoint=checkpoint, num_workers=2, redis_url=redis_server.url, static=True, min_replicas=1,
                      namespace=f"coord-{uuid.uuid4().hex[:8]}", router=RouterConfig(telemetry_interval_s=0.25))
    f = LocalFleet(cfg)
    f.start()
    with FleetClient(f.address) as c:
        c.wait_ready(60)
    f.store = StateStore(f.redis_url, namespace=cfg.namespace)
    f.model = MoEModel.from_pretrained(checkpoint)
    yield f
    f.stop()


def _held(fleet) -> dict[str, set]:
    return {d: {tuple(k) for k in s["experts"]} for d, s in fleet.worker_stats().items()}


def _reconciler(fleet, holder: str, ttl: float) -> Reconciler:
    store = fleet.store
    token = store.try_acquire_lease(holder, ttl)
    assert token
    rec = Reconciler(store, fleet.checkpoint, fleet.config.namespace, devices={d.device_id: d for d in fleet.devices},
                     local=True, redis_url=fleet.redis_url, drain_timeout_s=10)
    rec.fence = (holder, token)
    rec.keepalive = lambda: bool(store.renew_lease(holder, ttl, token=token))
    return rec


def _replicate_all_on_worker_1(placement: Placement) -> Placement:
    moved = {**placement.assignments, "worker-1": sorted({*map(tuple, placement.assignments["worker-1"]),
                                                            *map(tuple, placement.assignments["worker-0"])})}
    return Placement(assignments=moved)


def test_a_deposed_leader_can_neither_publish_nor_command_workers(fleet):
    store = fleet.store
    a = _reconciler(fleet, "leader-a", ttl=0.3)
    token_a = a.fence[1]
    current = store.get_placement()
    assert wait_for(lambda: store.lease() is None, 5)  # A stalls (a long GC pause, a partition): its lease lapses
    b = _reconciler(fleet, "leader-b", ttl=10)
    target = _replicate_all_on_worker_1(current)
    published = b.apply(target, reason="leader b")
    assert published.version == current.version + 1
    # A wakes up and carries on with its stale plan
    with pytest.raises(LeaseLostError):
        a.apply(Placement(assignments={"worker-0": current.assignments["worker-0"] + current.assignments["worker-1"]}))
    assert store.get_placement().version == published.version
    from moefleet.expert_workers.group import StaleCommandError

    with pytest.raises(StaleCommandError):  # even a command that skips the lease check is refused by the worker
        try:
            ray.get(fleet.worker("worker-1").unload.remote([list(k) for k in current.assignments["worker-1"]], token_a))
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause()
    assert _held(fleet)["worker-1"] == {tuple(k) for k in target.assignments["worker-1"]}
    store.release_lease("leader-b")


@pytest.mark.parametrize("died_after", ["loading", "publishing"])
def test_the_next_leader_finishes_or_rolls_back_a_rebalance_whose_leader_died(fleet, died_after):
    store = fleet.store
    traffic = Traffic(fleet.address, fleet.model).start()
    try:
        assert wait_for(lambda: traffic.answered() > 20, 30)
        current = store.get_placement()
        target = _replicate_all_on_worker_1(current)
        target.assignments["worker-0"] = current.assignments["worker-0"][: len(current.assignments["worker-0"]) // 2]
        a = _reconciler(fleet, "leader-a", ttl=3.0)
        # leader A runs the rebalance's first phases by the book, then its process dies
        a._record("loading", from_version=current.version)
        adds = {tuple(k) for k in target.assignments["worker-1"]} - {tuple(k) for k in current.assignments["worker-1"]}
        ray.get(fleet.worker("worker-1").load.remote([list(k) for k in adds], a.fence[1]))
        if died_after == "publishing":
            published = store.publish_placement(target, current.version, fence=a.fence)
            a._record("published", version=published.version)
        expected = store.get_placement()
        assert all(store.get_placement().replicas().get(k) for k in current.replicas())
        # B takes over once A's lease lapses, and converges the workers to the published placement
        ctl = Controller(fleet.controller_config(min_tokens=1e12), holder="leader-b", store=store)  # repairs only
        assert wait_for(lambda: ctl.step() is not None, 10, 0.2)
        assert wait_for(lambda: (ctl.step(), _held(fleet) == {d: set(map(tuple, k)) for d, k in expected.assignments.items()})[1], 20, 0.3), \
            (_held(fleet), expected.assignments)
        action = [e.data["action"] for e in store.events(200) if e.kind == "rebalance_resumed"]
        assert action and action[0] == ("completing" if died_after == "publishing" else "rolling back")
        n = traffic.answered()
        assert wait_for(lambda: traffic.answered() > n + 20, 30)
    finally:
        traffic.stop()
        store.release_lease("leader-b")
    assert traffic.wrong == 0 and traffic.failures() == []


def test_a_killed_controller_process_is_restarted_and_serving_never_stops(ray_cluster, redis_server, checkpoint):
    """The local controller's process is SIGKILLed under traffic whose hot experts keep moving: Ray restarts it,
    it takes the lease again, and no request fails; every expert keeps a replica throughout."""
    cfg = FleetConfig(checkpoint=checkpoint, num_workers=2, redis_url=redis_server.url,
                      namespace=f"ctlkill-{uuid.uuid4().hex[:8]}", router=RouterConfig(telemetry_interval_s=0.25))
    fleet = LocalFleet(cfg)
    fleet.start()
    store = StateStore(fleet.redis_url, namespace=cfg.namespace)
    model = MoEModel.from_pretrained(checkpoint)
    traffic = Traffic(fleet.address, model, clients=2).start()
    every = {(layer, e) for layer in model.moe_layers for e in range(8)}
    missing = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            p = store.get_placement()
            if set(p.replicas()) != every:
                missing.append(p.version)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert wait_for(lambda: store.lease_holder(), 20)
        first = store.lease()
        pid = ray.get(fleet.controller.pid.remote())
        os.kill(pid, signal.SIGKILL)
        # a new incarnation leads under a larger fencing token
        assert wait_for(lambda: (store.lease() is not None and store.lease().token > first.token), 30)
        assert wait_for(lambda: ray.get(fleet.controller.pid.remote(), timeout=5) != pid, 30)
        n = traffic.answered()
        assert wait_for(lambda: traffic.answered() > n + 30, 30)
    finally:
        watching.set()
        watcher.join(timeout=5)
        traffic.stop()
        fleet.stop()
    assert not missing, f"placements without some expert: {missing}"
    assert traffic.wrong == 0 and traffic.failures() == []


def test_a_controller_whose_clock_is_10s_ahead_judges_liveness_and_drains_correctly(fleet):
    """Liveness and drains use the store's clock: a controller host 10 s ahead sees live workers live
    and drained routers drained (on its own clock, every heartbeat would look 10 s stale)."""
    store = fleet.store
    traffic = Traffic(fleet.address, fleet.model).start()
    try:
        assert wait_for(lambda: traffic.answered() > 20, 30)
        ctl = Controller(fleet.controller_config(), holder="skewed", store=store, clock=lambda: time.time() + 10)
        report = ctl.step()
        assert report["down"] == []
        target = _replicate_all_on_worker_1(store.get_placement())
        target.assignments["worker-0"] = target.assignments["worker-0"][:4]
        ctl.reconciler.apply(target, reason="skew test")
        assert ctl.reconciler.last_apply["drained"] is True  # not a 10 s timeout
        report = ctl.step()
        assert report["down"] == []
    finally:
        traffic.stop()
        store.release_lease("skewed")
    assert traffic.wrong == 0 and traffic.failures() == []


def test_the_serve_ingress_reports_what_it_has_in_flight_and_holds_up_the_drain(ray_cluster, redis_server, checkpoint):
    """The Serve ingress (its class, driven without Serve's proxies, which bind all interfaces) heartbeats like a
    router: a call it still has in flight on an old placement keeps that placement from counting as drained."""
    from moefleet.router_service import codec
    from moefleet.router_service.proto import fleet_pb2 as pb
    from moefleet.router_service.serve_app import FleetIngress

    ns = f"ingress-{uuid.uuid4().hex[:8]}"
    store = StateStore(redis_server.url, namespace=ns)
    model = MoEModel.from_pretrained(checkpoint)
    assert not routers_drained({}, 1)  # no router reporting is not drained

    async def scenario():
        ingress = FleetIngress.func_or_class({"checkpoint": checkpoint, "num_workers": 2, "redis_url": redis_server.url,
                                               "namespace": ns, "worker": {"num_cpus": 0}})
        hidden = torch.randn(5, model.spec.layer.hidden_size)
        reply = await ingress.Forward(pb.ForwardRequest(layer=model.moe_layers[0], hidden=codec.encode(hidden)))
        assert (codec.decode(reply.output, "output") - model.layer(model.moe_layers[0])(hidden)).abs().max() <= 1e-5
        routers = lambda: {k: v for k, v in store.workers().items() if k.startswith("router:")}  # noqa: E731
        assert await asyncio.to_thread(wait_for, lambda: routers(), 5)
        (key, info), = routers().items()
        assert info["kind"] == "ingress" and key == f"router:{ingress.ingress_id}"
        old = store.get_placement()
        table = (old.generation, old.version)
        ingress.core._inflight_by_version[table] += 1  # a call dispatched on the old placement, not yet back
        new = store.publish_placement(Placement(assignments=old.assignments), old.version)
        await asyncio.sleep(0.5)
        assert ingress.core.placement.version == new.version
        assert not routers_drained(routers(), new.version, new.generation)
        ingress.core._inflight_by_version[table] -= 1
        del ingress.core._inflight_by_version[table]
        await asyncio.sleep(0.5)
        assert routers_drained(routers(), new.version, new.generation)
        await ingress.runtime.stop()
        await ingress.server.stop(0)  # in its own loop: a grpc.aio server left to the collector after the loop closed
        return list(old.assignments)  # shuts gRPC's poller down from a finaliser, where it can hang the process

    devices = asyncio.run(scenario())
    from moefleet.controller.main import ControllerConfig
    from moefleet.core.placement import FLEET_DEVICES_RECORD, worker_actor_name

    # the workers it started are the fleet's devices: recorded where Ray placed them, counted by a controller
    # of the cluster (not only its nodes' GPUs and CPU-tier slots), and restarted as they were started
    recorded = store.get_record(FLEET_DEVICES_RECORD)["devices"]
    assert sorted(recorded) == sorted(devices) == ["worker-0", "worker-1"]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert all(e["node_id"] in alive and e["num_cpus"] == 0 and e["accelerator"]["name"] == "cpu" for e in recorded.values())
    ctl = Controller(ControllerConfig(checkpoint=checkpoint, redis_url=redis_server.url, namespace=ns, ray_address=None),
                     holder="ingress-test", store=store)
    by_id = ctl.inventory().by_id()
    for d in devices:
        assert by_id[d].kind == "cpu" and by_id[d].node_id == recorded[d]["node_id"]
        assert by_id[d].memory_bytes * 0.9 >= sum(ctl._replica_bytes(k) for k in store.get_placement().assignments[d])
        assert ctl.reconciler.start_options[d]["num_cpus"] == 0
    assert len(by_id) == len(devices) + 4  # beside the session cluster's own devices (2 H100s, an L4, a CPU tier)

    for d in devices:
        ray.kill(ray.get_actor(worker_actor_name(d), namespace=ns))


def test_the_serve_ingress_fails_naming_the_workers_it_waited_for_past_its_deadline(ray_cluster, redis_server, checkpoint):
    """Workers that cannot be placed (a resource no node has) fail the ingress's start at its deadline, naming
    them and what each asks, instead of leaving the replica in its constructor for ever."""
    from moefleet.core.placement import worker_actor_name
    from moefleet.router_service.serve_app import FleetIngress

    ns = f"ingress-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError) as e:
        FleetIngress.func_or_class({"checkpoint": checkpoint, "num_workers": 2, "redis_url": redis_server.url,
                                    "namespace": ns, "start_timeout_s": 1.0,
                                    "worker": {"num_cpus": 0, "resources": {"no_such_node_type": 1}}})
    said = str(e.value)
    assert "workers ['worker-0', 'worker-1'] did not start within 1s" in said
    assert "no_such_node_type: 1" in said and "no_such_node_type: 0} free" in said
    for d in ("worker-0", "worker-1"):
        ray.kill(ray.get_actor(worker_actor_name(d), namespace=ns))


def test_a_worker_side_value_error_is_a_failed_call_not_a_dead_worker(ray_cluster):
    """Ray wraps a worker's exception in a type that also derives from the exception's own: a ValueError
    raised inside a live worker must not be taken for "no such actor" (and the worker excluded)."""
    from moefleet.core.placement import worker_actor_name
    from moefleet.router_service.dispatch import WorkerBatch
    from moefleet.router_service.router import WorkerCallError
    from moefleet.router_service.transport import RayTransport

    @ray.remote
    class Failing:
        def serve(self, *args, **kwargs):
            raise ValueError("bad rows")

    ns = f"tr-{uuid.uuid4().hex[:8]}"
    actor = Failing.options(name=worker_actor_name("w0"), namespace=ns).remote()
    transport = RayTransport(ns, compiled_graphs=False)

    async def call(worker):
        batch = WorkerBatch(worker, np.zeros(1, np.int64), np.ones(1, np.float32), [0], [1], np.zeros(1, np.int64), np.zeros(1, np.int64))
        (e,) = await transport.run(transport.prepare(0, torch.zeros(1, 4), [batch], None), [batch])
        assert isinstance(e, WorkerCallError)
        return e

    e = asyncio.run(call("w0"))
    assert isinstance(e.cause, ValueError) and not e.dead and not e.retryable
    gone = asyncio.run(call("nobody"))
    assert gone.dead and gone.retryable
    ray.kill(actor)
    assert wait_for(lambda: asyncio.run(call("w0")).dead, 10)


def test_a_step_whose_loads_a_worker_refuses_is_undone_and_nothing_is_published(fleet):
    """The planner's arithmetic says a device has room, its worker's memory budget says no (slot stacks,
    quarantine): the step takes back every load it made, publishes nothing, records why, and serving goes on."""
    from moefleet.controller.reconciler import LoadFailedError
    from moefleet.core.model import MoECheckpoint
    from moefleet.core.placement import DeviceSpec
    from moefleet.expert_workers.launch import start_worker

    store = fleet.store
    ckpt = MoECheckpoint(fleet.checkpoint)
    layer = ckpt.spec.moe_layers[0]
    per_expert = ckpt.expert_bytes(layer, "float32")
    small = start_worker("worker-small", fleet.checkpoint, [], fleet.config.namespace, fleet.worker_config(None),
                         redis_url=fleet.redis_url, memory_bytes=5 * per_expert)  # one stack of 4 fits, 8 do not
    ray.get(small.experts.remote())
    rec = _reconciler(fleet, "leader-mem", ttl=10)
    rec.devices["worker-small"] = DeviceSpec(device_id="worker-small", node_id="local", kind="gpu",
                                             accelerator_type="local-cpu", memory_bytes=100 * per_expert)
    traffic = Traffic(fleet.address, fleet.model).start()
    try:
        assert wait_for(lambda: traffic.answered() > 10, 30)
        current = store.get_placement()
        held_before = _held(fleet)
        target = Placement(assignments={**current.assignments,
                                        "worker-small": [(layer, e) for e in range(ckpt.spec.layer.num_experts)]})
        with pytest.raises(LoadFailedError) as err:
            rec.apply(target, reason="more than the worker's budget")
        assert set(err.value.errors) == {"worker-small"} and "no room" in err.value.errors["worker-small"]
        assert store.get_placement().version == current.version
        assert ray.get(small.experts.remote()) == []  # what it loaded before running out was taken back
        assert {d: h for d, h in _held(fleet).items() if d in held_before} == held_before
        failed = [e.data for e in store.events(50) if e.kind == "rebalance_failed"]
        assert failed and failed[0]["devices"] == ["worker-small"]
        assert (store.get_record("rebalance") or {}).get("phase") is None  # no half-done rebalance left behind
        n = traffic.answered()
        assert wait_for(lambda: traffic.answered() > n + 10, 30)
    finally:
        traffic.stop()
        store.release_lease("leader-mem")
        ray.kill(small)
    assert traffic.wrong == 0 and traffic.failures() == []
