"""Faults without holes: fencing against the lease in Redis, a deposed leader that writes nothing, speeds
that survive a store reset, liveness beside busy forwards, stalled workers, restarts retried until the
device is declared lost, a router cut off from the store, and the Serve ingress under a leader.

Real Redis throughout; the tests that start workers use the session's real Ray. A stalled worker is a
real process stopped with SIGSTOP; a router cut off from the store is a real router actor whose
connection to Redis runs through a TCP relay this test closes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from moefleet import MoEModel
from moefleet.controller.main import Controller, ControllerConfig
from moefleet.core.calls import WorkerCall, WorkerReply
from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig
from moefleet.core.placement import DeviceSpec, Placement, spread_placement
from moefleet.core.state import LeaseLostError, StateStore
from moefleet.expert_workers.group import ExpertGroupCore, StaleCommandError
from moefleet.kernels.permute import permute
from tests import hf_models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-faults")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    model.save_pretrained(path)
    return str(path)


def wait_for(predicate, timeout_s: float, step_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


def _devices(*speeds: float) -> list[DeviceSpec]:
    return [DeviceSpec(device_id=f"d{i}", node_id="local", kind="gpu", accelerator_type="local-cpu", memory_bytes=1 << 30,
                       speed=s) for i, s in enumerate(speeds)]


def _controller(store, checkpoint, holder: str, devices, **over) -> Controller:
    cfg = ControllerConfig(**{"checkpoint": checkpoint, "namespace": store.namespace, "ray_address": None, "devices": devices,
                              "min_tokens": 1e12, "local": True, **over})
    return Controller(cfg, holder=holder, store=store)


def _heartbeat(store, placement: Placement) -> None:
    """What the placement's workers report holding (their heartbeat records, as the workers write them)."""
    for d, keys in placement.assignments.items():
        store.register_worker(f"worker:{d}", {"kind": "worker", "worker_id": d, "experts": [list(k) for k in keys]}, None, 60)


# ------------------------------------------------------------------ store only


def test_a_worker_refuses_a_deposed_leaders_command_whatever_tokens_it_has_seen(store, checkpoint):
    """The worker checks each command's token against the lease in Redis: a leader whose lease lapsed is refused
    even by a worker that never heard from its successor (its token is still the highest this worker saw)."""
    worker = ExpertGroupCore("w", checkpoint, [(0, 0)], backend="torch", require_fence=True)
    worker.fence_check = store.check_fence
    token_a = store.try_acquire_lease("leader-a", ttl_s=0.3)
    worker.load([(0, 1)], token=token_a)  # the current leader is obeyed
    assert wait_for(lambda: store.lease() is None, 3)  # A stalls; its lease lapses; B leads
    token_b = store.try_acquire_lease("leader-b", ttl_s=30)
    with pytest.raises(StaleCommandError, match="not the lease's current token"):
        worker.unload([(0, 0), (0, 1)], token=token_a)  # A wakes up with its stale plan
    with pytest.raises(StaleCommandError, match="without a fencing token"):
        worker.unload([(0, 0)])
    assert worker.experts() == [(0, 0), (0, 1)]
    worker.unload([(0, 0)], token=token_b)
    worker.load([(0, 2)], token=token_b)  # the same step's token again
    assert worker.experts() == [(0, 1), (0, 2)]


def test_the_placement_recovered_after_a_store_reset_carries_the_devices_speeds(store, checkpoint):
    """Without the speeds, dispatch splits an expert's rows evenly between an H100 and an L4 until experts move."""
    spec = MoEModel.from_pretrained(checkpoint).spec
    held = spread_placement(list(spec.moe_layers), 8, ["d0", "d1"])
    _heartbeat(store, held)  # the workers outlived the table: the store came back empty
    ctl = _controller(store, checkpoint, "ctl", _devices(1.0, 0.25), planner={"min_replicas": 1})  # no floor to restore
    report = ctl.step()
    recovered = store.get_placement()
    assert report["placement_version"] == 1 and recovered.assignments == held.assignments
    assert recovered.speeds == {"d0": 1.0, "d1": 0.25}
    assert [e.kind for e in store.events()].count("placement_recovered") == 1
    assert report["min_replicas"] == {"setting": 1, "replicas": 1, "why": "min_replicas 1"}


def test_a_leader_that_loses_its_lease_mid_step_writes_nothing(store, checkpoint):
    """Leader A's step is under way when its lease lapses and B takes over (a long pause, a partition): from
    then on A's writes (records, the rebalance phase, events) land nowhere."""
    spec = MoEModel.from_pretrained(checkpoint).spec
    placement = store.publish_placement(spread_placement(list(spec.moe_layers), 8, ["d0", "d1"]), 0)
    _heartbeat(store, placement)
    a = _controller(store, checkpoint, "leader-a", _devices(1.0, 1.0), lease_ttl_s=0.3)
    b = _controller(store, checkpoint, "leader-b", _devices(1.0, 1.0), lease_ttl_s=30)
    inventory = a.inventory

    def paused_inventory():  # A is paused here, past its lease; B takes over meanwhile
        assert wait_for(lambda: store.lease() is None, 3)
        assert b.hold_lease()
        b.store.put_record("rebalance", {"phase": None, "holder": "leader-b"}, fence=b.fence)
        return inventory()

    a.inventory = paused_inventory
    with pytest.raises(LeaseLostError):
        a.step()
    assert store.get_record("controller") is None  # A's step record (autoscaling state, report) never landed
    assert store.get_record("rebalance") == {"phase": None, "holder": "leader-b"}
    with pytest.raises(LeaseLostError):
        a.reconciler._record("loading", from_version=placement.version)
    assert store.get_record("rebalance") == {"phase": None, "holder": "leader-b"}
    assert [e.data.get("holder") for e in store.events() if e.kind == "leader"] == ["leader-a", "leader-b"]
    assert not any(e.kind == "plan" for e in store.events())
    assert b.step() is not None and store.get_record("controller")["last_report"]["holder"] == "leader-b"


# ------------------------------------------------------------------ with Ray


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """Wider experts, so a worker's forwards take long enough to keep every thread of its default group busy."""
    path = tmp_path_factory.mktemp("mixtral-faults-wide")
    model, _ = hf_models.build("mixtral", num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
                               hidden_size=256, intermediate_size=1024)
    model.save_pretrained(path)
    return str(path)


def _batch(model, layer: int, tokens: int):
    hidden = torch.randn(tokens, model.spec.layer.hidden_size, generator=torch.Generator().manual_seed(tokens))
    _, routing = model.layer(layer)(hidden, return_routing=True)
    perm = permute(routing.topk_ids, model.spec.layer.num_experts)
    rows = perm.token_index.numpy()
    counts = perm.counts().numpy()
    experts = [int(e) for e in np.flatnonzero(counts)]
    uniq, inverse = np.unique(rows, return_inverse=True)
    weights = routing.topk_weights.reshape(-1)[perm.slot_index].numpy().astype(np.float32)
    call = WorkerCall(layer, rows, weights, tuple(experts), tuple(int(counts[e]) for e in experts), inverse, len(uniq),
                      token_index=uniq)
    return call, hidden.numpy()


@pytest.mark.slow
def test_liveness_is_answered_beside_busy_forwards_and_a_stalled_worker_is_not_taken_for_dead(
    ray_cluster, redis_server, big_checkpoint
):
    """``ready`` runs in the worker's liveness concurrency group: with every thread of the default group busy
    with forwards it still answers at once. A worker stopped for a while (SIGSTOP) is stalled, not dead: the
    controller does not kill it before ``stalled_down_s``, and it serves again when it resumes."""
    import ray

    from moefleet.expert_workers.launch import start_worker

    ns = f"live-{uuid.uuid4().hex[:8]}"
    store = StateStore(redis_server.url, namespace=ns)
    model = MoEModel.from_pretrained(big_checkpoint)
    layer = model.moe_layers[0]
    keys = [(layer, e) for e in range(4)]
    w = start_worker("d0", big_checkpoint, keys, ns, WorkerConfig(num_cpus=0, max_concurrency=1), redis_url=redis_server.url)
    try:
        ray.get(w.ready.remote(), timeout=60)
        args = _batch(model, layer, 2048)
        assert isinstance(ray.get(w.serve.remote(*args)), WorkerReply)
        long = w.serve.remote(*_batch(model, layer, 32768))  # seconds of work on the worker's one thread
        assert wait_for(lambda: store.workers().get("worker:d0", {}).get("queue_depth", 0) >= 1, 30, 0.01)  # it runs
        assert ray.get(w.ready.remote(), timeout=60)
        answered = time.time()
        with pytest.raises(StaleCommandError, match="without a fencing token"):
            try:
                ray.get(w.unload.remote([list(keys[0])]))
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause()
        times = ray.get(long).times
        assert answered < times["end"], "ready waited for the forward to end"  # one machine: one wall clock

        ctl = _controller(store, big_checkpoint, "ctl", _devices(1.0))
        placement = Placement(assignments={"d0": keys})
        assert ctl.find_down(placement, ctl.worker_records()) == set()
        pid = ray.get(w.pid.remote())
        os.kill(pid, signal.SIGSTOP)
        try:
            assert wait_for(lambda: "d0" not in ctl.worker_records(), 5)  # its heartbeats stopped
            assert ctl.find_down(placement, ctl.worker_records()) == set()  # stalled, not dead: not killed
            assert ctl._ray_alive("d0") is None
            ctl.config.stalled_down_s = 0.5
            assert wait_for(lambda: ctl.find_down(placement, ctl.worker_records()) == {"d0"}, 5)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_for(lambda: ctl._ray_alive("d0") is True, 10)
        reply = ray.get(w.serve.remote(*args), timeout=60)
        assert isinstance(reply, WorkerReply) and reply.partial.shape[0] > 0
    finally:
        ray.kill(w)
        store.close()


@pytest.mark.slow
def test_a_failed_restart_is_retried_with_backoff_until_the_device_is_declared_lost(ray_cluster, redis_server, checkpoint):
    """The dead worker's device cannot take a fresh worker (the resource it asks for is gone): starts are tried
    again, each after a longer wait, and after ``restart_attempts`` the device is declared lost, an event."""
    import ray

    from moefleet.expert_workers.launch import start_worker

    ns = f"restart-{uuid.uuid4().hex[:8]}"
    store = StateStore(redis_server.url, namespace=ns)
    spec = MoEModel.from_pretrained(checkpoint).spec
    placement = spread_placement(list(spec.moe_layers), 8, ["d0", "d1"])
    handles = {d: start_worker(d, checkpoint, keys, ns, WorkerConfig(num_cpus=0), redis_url=redis_server.url)
               for d, keys in placement.assignments.items()}
    ray.get([h.ready.remote() for h in handles.values()], timeout=120)
    store.publish_placement(placement, 0)
    ctl = _controller(store, checkpoint, "ctl", _devices(1.0, 1.0), redis_url=redis_server.url, local=False,
                      worker=WorkerConfig(num_cpus=0, resources={"moefleet-test-absent": 1}),
                      restart_attempts=3, restart_backoff_s=1.0, restart_timeout_s=1.0)  # waits of 1 s then 2 s: past a loaded step's noise
    try:
        assert ctl.step() is not None
        ray.kill(handles["d0"], no_restart=True)
        lost = wait_for(lambda: (ctl.step(), [e for e in store.events(500) if e.kind == "device_lost"])[1], 60, 0.2)
        assert lost and lost[0].data["device"] == "d0" and lost[0].data["attempts"] == 3
        restarts = [e for e in store.events(500) if e.kind == "worker_restart" and e.data["device"] == "d0"]
        assert [e.data["attempt"] for e in restarts] == [1, 2, 3]
        gaps = np.diff([e.at for e in restarts])
        assert gaps[1] > gaps[0]  # the backoff doubles
        assert ctl.step()["lost"] == ["d0"]
        assert "d0" not in store.get_placement().assignments  # its experts were re-placed on d1
        assert sum(e.kind == "worker_restart" for e in store.events(500)) == 3  # no further starts once lost
    finally:
        store.release_lease("ctl")
        for d in ("d0", "d1"):
            try:
                ray.kill(ray.get_actor(f"moefleet-worker:{d}", namespace=ns), no_restart=True)
            except ValueError:
                pass
        store.close()


class Relay:
    """A TCP relay on 127.0.0.1 to a target port; ``cut()`` closes every connection and refuses new ones."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open = True
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.open = False
        with self._lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.server.close()


@pytest.mark.slow
def test_a_router_cut_off_from_the_store_keeps_the_experts_it_uses(ray_cluster, redis_server, checkpoint):
    """A second router reaches Redis through a relay that is cut: its heartbeats lapse, it keeps serving from its
    placement. A rebalance that drops replicas it still uses publishes, but leaves their unloads until that
    router drains: its traffic never fails. Once it reaches the store again, converging makes the unloads."""
    import ray

    from moefleet.controller.reconciler import Reconciler
    from moefleet.local import LocalFleet
    from moefleet.router_service.actor import router_actor_class
    from moefleet.router_service.client import FleetClient
    from tests.integration.test_self_healing import Traffic

    cfg = FleetConfig(checkpoint=checkpoint, num_workers=2, redis_url=redis_server.url, static=True,
                      namespace=f"cut-{uuid.uuid4().hex[:8]}", router=RouterConfig(telemetry_interval_s=0.25))
    fleet = LocalFleet(cfg)
    fleet.start()
    store = StateStore(fleet.redis_url, namespace=cfg.namespace)
    relay = Relay(redis_server.port)
    relayed_url = redis_server.url.replace(f":{redis_server.port}/", f":{relay.port}/")
    cut_router = router_actor_class().options(name="moefleet-router:cut", namespace=cfg.namespace, num_cpus=0).remote(
        checkpoint, RouterConfig(telemetry_interval_s=0.25).model_dump(), relayed_url, cfg.namespace, "router-cut")
    model = MoEModel.from_pretrained(checkpoint)
    traffic = None
    try:
        address = ray.get(cut_router.start.remote(), timeout=60)
        with FleetClient(address) as c:
            c.wait_ready(60)
        assert wait_for(lambda: "router:router-cut" in store.workers(), 10)
        traffic = Traffic(address, model).start()
        assert wait_for(lambda: traffic.answered() > 10, 30)
        relay.cut()
        assert wait_for(lambda: "router:router-cut" not in store.workers(), 10)  # its heartbeat lapsed
        token = store.try_acquire_lease("leader", 60)
        rec = Reconciler(store, checkpoint, cfg.namespace, devices={d.device_id: d for d in fleet.devices}, local=True,
                         redis_url=fleet.redis_url, drain_timeout_s=2)
        rec.fence = ("leader", token)
        current = store.get_placement()
        everything = sorted({tuple(k) for keys in current.assignments.values() for k in keys})
        kept = sorted(map(tuple, current.assignments["worker-0"]))[:4]
        target = Placement(assignments={"worker-0": kept, "worker-1": everything})
        n = traffic.answered()
        published = rec.apply(target, reason="rebalance while a router is cut off")
        assert rec.last_apply["drained"] is False and rec.cut_off_routers == ["router:router-cut"]
        assert any(e.kind == "unload_deferred" for e in store.events(50))
        held0 = {tuple(k) for k in ray.get(fleet.worker("worker-0").experts.remote())}
        assert held0 == {tuple(k) for k in current.assignments["worker-0"]}  # nothing it may still use was unloaded
        assert wait_for(lambda: traffic.answered() > n + 20, 30)
        relay.restore()  # the router reaches the store again, follows the placement, drains
        assert wait_for(lambda: store.workers().get("router:router-cut", {}).get("placement_version") == published.version, 20)
        held = {d: [tuple(k) for k in s["experts"]] for d, s in fleet.worker_stats().items()}
        assert wait_for(lambda: rec.converge(published, held).removes, 10)
        assert {tuple(k) for k in ray.get(fleet.worker("worker-0").experts.remote())} == set(kept)
        n = traffic.answered()
        assert wait_for(lambda: traffic.answered() > n + 10, 30)
    finally:
        if traffic is not None:
            traffic.stop()
        store.release_lease("leader")
        try:
            ray.get(cut_router.stop.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - killed next either way
            pass
        ray.kill(cut_router)
        relay.close()
        fleet.stop()
        store.close()
    assert traffic.wrong == 0 and traffic.failures() == []


@pytest.mark.slow
def test_the_serve_ingress_publishes_nothing_over_a_leader_and_guards_getplacement_with_the_token(
    ray_cluster, redis_server, checkpoint, tmp_path
):
    """A replica starting while a controller leads (the store lost its table meanwhile) leaves the publish to the
    leader; a GetPlacement through a DeploymentHandle (no gRPC context, so no token) is refused like Forward."""
    import ray

    from moefleet.core.placement import worker_actor_name
    from moefleet.router_service.proto import fleet_pb2 as pb
    from moefleet.router_service.router import RequestError
    from moefleet.router_service.serve_app import FleetIngress

    ns = f"ingress-lead-{uuid.uuid4().hex[:8]}"
    store = StateStore(redis_server.url, namespace=ns)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-value\n")
    token_file.chmod(0o600)
    store.try_acquire_lease("controller-x", 60)

    async def scenario():
        ingress = FleetIngress.func_or_class({"checkpoint": checkpoint, "num_workers": 2, "redis_url": redis_server.url,
                                               "namespace": ns, "worker": {"num_cpus": 0}, "serve_grpc": False,
                                               "router": {"auth_token_file": str(token_file)}})
        assert store.placement_version() == 0  # the leader's table is the leader's to publish
        with pytest.raises(RequestError) as refused:
            await ingress.GetPlacement(pb.GetPlacementRequest(), None)
        import grpc

        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        reply = await ingress.Forward(pb.ForwardRequest(layer=1), None)
        assert reply.error_code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        if ingress.runtime is not None:
            await ingress.runtime.stop()

    try:
        asyncio.run(scenario())
    finally:
        store.release_lease("controller-x")
        for d in ("worker-0", "worker-1"):
            try:
                ray.kill(ray.get_actor(worker_actor_name(d), namespace=ns))
            except ValueError:
                pass
        store.close()
