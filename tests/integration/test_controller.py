"""The controller on a live fleet: rebalancing under load loses nothing; a follower takes over a dead leader."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import ray
import torch

from moefleet import MoEModel
from moefleet.controller.main import Controller, controller_actor_class
from moefleet.controller.planner import PlannerKnobs
from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig
from moefleet.core.state import StateStore
from moefleet.demo import skewed_hidden
from moefleet.local import LocalFleet
from moefleet.router_service.client import FleetClient, FleetError
from tests import hf_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(ray_cluster, redis_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-ctl")
    model, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    model.save_pretrained(path)
    cfg = FleetConfig(
        checkpoint=str(path), num_workers=3, redis_url=redis_server.url, namespace=f"ctl-{uuid.uuid4().hex[:8]}",
        worker=WorkerConfig(num_cpus=0.5), router=RouterConfig(telemetry_interval_s=0.2, load_window_s=1.0),
        static=True,  # these tests drive their own controllers
    )
    f = LocalFleet(cfg)
    f.start()
    f.client = FleetClient(f.address)
    f.client.wait_ready(60)
    yield f
    f.client.close()
    f.stop()


def _traffic(fleet, model, hot, stop, out, failures, seed):
    g = torch.Generator().manual_seed(seed)
    i = 0
    while not stop.is_set() and i < 2000:  # bounded in count and time
        layer = model.moe_layers[i % len(model.moe_layers)]
        hidden = skewed_hidden(model.layer(layer).gate.weight, 16, hot, 3.0, g)
        try:
            out.append((layer, hidden, fleet.client.forward(layer, hidden)))
        except FleetError as e:
            failures.append(e)
        i += 1


def test_rebalance_under_load_loses_no_request_and_replicates_hot_experts(fleet):
    model = MoEModel.from_pretrained(fleet.checkpoint)
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace)
    one_copy = PlannerKnobs(min_replicas=1, min_gain=0.05)  # replicas past one follow the load alone
    ctl = Controller(fleet.controller_config(load_windows=10, load_half_life_s=5.0, min_tokens=10, planner=one_copy),
                     holder="solo", store=store)
    stop, out, failures = threading.Event(), [], []
    t = threading.Thread(target=_traffic, args=(fleet, model, [0, 1], stop, out, failures, 0))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait for telemetry to show the skew
            load = store.read_load(time.time(), 1.0, 10, 5.0)
            if sum(load.values()) > 500:
                break
            time.sleep(0.2)
        v0 = store.placement_version()
        first = ctl.step()  # the plan must win confirm_steps steps in a row: held the first time, as an event says
        assert not first["apply"] and first["plan_skipped"]["reason"] == "confirming", first
        skipped = [e.data for e in store.events(50) if e.kind == "plan_skipped"]
        assert skipped and skipped[-1]["reason"] == "confirming" and skipped[-1]["gain"] == first["gain"]
        report = first
        for _ in range(ctl.config.confirm_steps + 2):
            time.sleep(0.5)
            report = ctl.step()
            if report["apply"]:
                break
        assert report["apply"], report
        assert report["applied_version"] == v0 + 1
        assert report["balancedness_after"] > report["balancedness_before"]
        # then the balancedness the devices measure is checked against the prediction, and exported
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "prediction" not in (store.get_record("controller") or {}):
            time.sleep(1.0)
            ctl.step()
        outcome = (store.get_record("controller") or {}).get("prediction")
        assert outcome is not None and outcome["version"] == v0 + 1, outcome
        assert outcome["error"] == pytest.approx(outcome["measured"] - outcome["predicted"])
        assert abs(outcome["error"]) < 0.25, outcome
    finally:
        stop.set()
        t.join(timeout=60)
        store.release_lease("solo")
    assert not failures, failures[:3]
    assert len(out) > 20
    for layer, hidden, got in out:
        assert (got - model.layer(layer)(hidden)).abs().max().item() <= 1e-5
    placement = store.get_placement()
    reps = placement.replicas()
    hot_layer = model.moe_layers[0]
    assert max(len(reps[(hot_layer, e)]) for e in (0, 1)) >= 2, "a hot expert got a second replica"
    # workers hold exactly what the placement says (old replicas unloaded after the drain)
    stats = fleet.worker_stats()
    for device, keys in placement.assignments.items():
        assert sorted(tuple(k) for k in stats[device]["experts"]) == sorted(tuple(k) for k in keys)


def test_follower_takes_over_when_the_leader_dies(fleet):
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace)
    cfg = fleet.controller_config(interval_s=0.3, lease_ttl_s=1.5, load_windows=3, load_half_life_s=1.0, min_tokens=10)
    cls = controller_actor_class()
    a = cls.options(namespace=fleet.config.namespace).remote(cfg.model_dump(), "ctl-a")
    b = cls.options(namespace=fleet.config.namespace).remote(cfg.model_dump(), "ctl-b")
    try:
        deadline = time.monotonic() + 20
        while store.lease_holder() not in ("ctl-a", "ctl-b") and time.monotonic() < deadline:
            time.sleep(0.1)
        leader_name = store.lease_holder()
        assert leader_name in ("ctl-a", "ctl-b")
        leader, follower = (a, b) if leader_name == "ctl-a" else (b, a)
        assert ray.get(leader.is_leader.remote()) and not ray.get(follower.is_leader.remote())
        ray.kill(leader)  # a crash: the lease is not released
        t_kill = time.monotonic()
        while store.lease_holder() in (None, leader_name) and time.monotonic() - t_kill < 10:
            time.sleep(0.05)
        took_over = time.monotonic() - t_kill
        assert store.lease_holder() not in (None, leader_name)
        assert took_over <= cfg.lease_ttl_s + cfg.interval_s + 1.0
        # placement continues under the new leader: shift the load and watch a new version appear
        v = store.placement_version()
        hot = {(layer, e): 5000 for layer in MoEModel.from_pretrained(fleet.checkpoint).moe_layers for e in (6, 7)}
        deadline = time.monotonic() + 20
        while store.placement_version() == v and time.monotonic() < deadline:
            store.record_load(hot, time.time())
            time.sleep(0.2)
        assert store.placement_version() > v
        assert ray.get(follower.is_leader.remote())
        reps = store.get_placement().replicas()
        assert any(len(reps[k]) >= 2 for k in hot)
    finally:
        for actor in (a, b):
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # the killed leader is gone; nothing to stop
                pass
            ray.kill(actor)


def test_autoscaling_adds_a_worker_when_queues_grow(fleet):
    """Queue depth above target: the active devices grow, and the reconciler starts a worker for the new one."""
    from moefleet.core.placement import DeviceSpec
    from moefleet.core.placement import worker_actor_name

    model = MoEModel.from_pretrained(fleet.checkpoint)
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace)
    base = fleet.controller_config(load_windows=5, load_half_life_s=3.0, min_tokens=10)
    extra = DeviceSpec(device_id="worker-extra", node_id="local", kind="gpu", accelerator_type="local-cpu",
                       memory_bytes=base.devices[0].memory_bytes)
    from moefleet.controller.main import ControllerConfig

    cfg = ControllerConfig(**{
        **base.model_dump(),
        "devices": [d.model_dump() for d in (*base.devices, extra)],
        "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_queue_depth": 0.25, "upscale_delay_s": 0,
                        "downscale_delay_s": 3600, "metrics_interval_s": 1},
    })
    ctl = Controller(cfg, holder="scaler", store=store)
    stop, out, failures = threading.Event(), [], []
    threads = [threading.Thread(target=_traffic, args=(fleet, model, [2, 3, 4, 5], stop, out, failures, s)) for s in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 40
        report = {}
        while time.monotonic() < deadline:
            time.sleep(1.0)
            report = ctl.step()
            if "worker-extra" in (store.get_placement().assignments or {}):
                break
        assert report.get("active_devices", 0) >= 4, report
        assert "worker-extra" in store.get_placement().assignments
        extra_worker = ray.get_actor(worker_actor_name("worker-extra"), namespace=fleet.config.namespace)
        served = lambda: sum(ray.get(extra_worker.stats.remote())["tokens_served"].values())  # noqa: E731
        deadline = time.monotonic() + 20  # the router follows the new placement, then routes rows to it
        while served() == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served() > 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        store.release_lease("scaler")
        try:
            ray.kill(ray.get_actor(worker_actor_name("worker-extra"), namespace=fleet.config.namespace))
        except ValueError:
            pass
    assert not failures, failures[:3]


def test_controller_places_workers_by_node_type_on_a_heterogeneous_cluster(ray_cluster, redis_server, tmp_path_factory):
    """Inventory from the Ray nodes (2 fake H100s, 1 fake L4, a CPU tier): workers land on their nodes,
    the faster GPUs carry more of the skewed load, and the fleet still computes the model's layer."""
    from moefleet.controller.main import ControllerConfig
    from moefleet.core.placement import worker_actor_name

    path = tmp_path_factory.mktemp("mixtral-het")
    hf, _ = hf_models.build("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    hf.save_pretrained(path)
    model = MoEModel.from_pretrained(path)
    ns = f"het-{uuid.uuid4().hex[:8]}"
    store = StateStore(redis_server.url, namespace=ns)
    hot = {(layer, e): (4000 if e < 2 else 100) for layer in model.moe_layers for e in range(8)}
    store.record_load(hot, time.time())
    cfg = ControllerConfig(checkpoint=str(path), redis_url=redis_server.url, namespace=ns, ray_address=None,
                           worker=WorkerConfig(num_cpus=0.25), min_tokens=0)
    ctl = Controller(cfg, holder="het", store=store)
    inventory = ctl.inventory()
    kinds = sorted((d.kind, d.accelerator_type) for d in inventory.devices)
    assert kinds == [("cpu", None), ("gpu", "H100"), ("gpu", "H100"), ("gpu", "L4")]
    fleet = None
    try:
        report = ctl.step()
        assert report["applied_version"] == 1, report
        placement = store.get_placement()
        by_id = inventory.by_id()
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
        for device in placement.assignments:
            actor = ray.get_actor(worker_actor_name(device), namespace=ns)
            resources = ray.get(actor.node_resources.remote())
            want = nodes[by_id[device].node_id]
            assert resources == want, f"{device} runs on the wrong node"
        from moefleet.controller.planner import predict

        # under the planner's load model (replicas share an expert's tokens in proportion to device speed)
        stats = predict(ctl.load(time.time()), inventory, placement, layers=model.moe_layers)
        tokens = {d: stats.device_time.get(d, 0.0) * by_id[d].speed for d in by_id}
        h100 = [d for d in by_id if by_id[d].accelerator_type == "H100"]
        l4 = [d for d in by_id if by_id[d].accelerator_type == "L4"]
        assert min(tokens[d] for d in h100) > 2 * max(tokens[d] for d in l4), tokens
        store.release_lease("het")  # the fleet is started by hand, outside the leader's step
        fleet = LocalFleet(FleetConfig(checkpoint=str(path), redis_url=redis_server.url, namespace=ns, static=True))
        fleet.start(placement)
        with FleetClient(fleet.address) as client:
            client.wait_ready(60)
            hidden = torch.randn(9, model.spec.layer.hidden_size)
            for layer in model.moe_layers:
                assert (client.forward(layer, hidden) - model.layer(layer)(hidden)).abs().max().item() <= 1e-5
    finally:
        if fleet is not None:
            fleet.stop()
        for device in (store.get_placement() or placement).assignments:
            try:
                ray.kill(ray.get_actor(worker_actor_name(device), namespace=ns))
            except ValueError:
                pass


def test_controller_replays_a_recorded_load_trace(fleet, tmp_path):
    """With ``trace`` set, the planner's load comes from the recorded steps by elapsed time, not from Redis."""
    import json

    from moefleet.controller.main import ControllerConfig

    model = MoEModel.from_pretrained(fleet.checkpoint)
    e = model.spec.layer.num_experts
    first = [[100.0 if x == 0 else 1.0 for x in range(e)] for _ in model.moe_layers]
    second = [[100.0 if x == e - 1 else 1.0 for x in range(e)] for _ in model.moe_layers]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"steps": [{"t": 0, "load": first}, {"t": 5, "load": second}]}))
    cfg = ControllerConfig(**{**fleet.controller_config().model_dump(), "trace": str(trace)})
    ctl = Controller(cfg, holder="trace", store=StateStore(fleet.redis_url, namespace=f"trace-{uuid.uuid4().hex[:6]}"))
    assert ctl.load(1000.0).tolist() == first
    assert ctl.load(1003.0).tolist() == first
    assert ctl.load(1006.0).tolist() == second
