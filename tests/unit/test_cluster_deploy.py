"""The cluster path's pure parts: what a deploy asks of a cluster and why an actor waits, the deploy's workers as
devices, the controller's state and reason, the Serve config with the controller beside the fleet."""

from __future__ import annotations

import pytest

from moefleet.controller.inventory import (
    CPU_TIER_MEMORY_RESOURCE,
    CPU_TIER_RESOURCE,
    CPU_TIER_SPEED,
    GIB,
    NODE_TYPES,
    cluster_inventory,
    fleet_cpu_memory_bytes,
    fleet_worker_options,
    node_dict,
)
from moefleet.controller.main import step_state
from moefleet.controller.telemetry import FleetInputs, TelemetryConfig, build_snapshot, controller_status
from moefleet.deploy_check import (
    HEAD_NODE_RESOURCE,
    actor_resources,
    deployment_demands,
    free_resources,
    pending_report,
    shortfall,
)

INGRESS = actor_resources(0.5, resources={HEAD_NODE_RESOURCE: 0.001})
CONTROLLER = actor_resources(0, resources={HEAD_NODE_RESOURCE: 0.001})
HEAD = "8be4206088b3c1a50e896906c08f3498847e880f2d04ef5df2e4ed51"


def _node(node_id=HEAD, cpus=2.0, head=True, **resources):
    total = {"CPU": cpus, "memory": 8 * GIB, **resources}
    if head:
        total[HEAD_NODE_RESOURCE] = 1.0
    return {"node_id": node_id, "node_ip": "127.0.0.1", "is_head_node": head, "state": "ALIVE", "resources_total": total}


def _actor(name, state="ALIVE", node=HEAD, namespace="moefleet", cls="ExpertGroupActor", **resources):
    return {"name": name, "state": state, "node_id": node, "ray_namespace": namespace, "class_name": cls,
            "required_resources": resources}


# -- what a deploy asks, what the cluster has ---------------------------------------------------------------------
def test_two_workers_and_the_ingress_on_a_two_cpu_head_are_refused_naming_the_shortfall():
    demands = deployment_demands(2, actor_resources(1), INGRESS, CONTROLLER)
    said = shortfall(demands, free_resources([_node(cpus=2)], []))
    assert said == ("needs 2.5 CPUs for the ingress and 2 workers; the cluster has 2 free "
                    "(node 8be42060 (head, 127.0.0.1): 2 of 2 CPUs free)")
    assert shortfall(demands, free_resources([_node(cpus=3)], [])) is None  # 2.5 fit in 3
    assert shortfall(deployment_demands(2, actor_resources(0.5), INGRESS), free_resources([_node(cpus=2)], [])) is None


def test_what_other_actors_hold_is_not_free_but_the_fleets_own_actors_are_reused():
    nodes = [_node(cpus=5)]
    others = [_actor("someone-else", namespace="other", cls="Foo", CPU=2.0),
              _actor("moefleet-worker:worker-0", CPU=1.0), _actor("moefleet-worker:worker-1", CPU=1.0)]
    demands = deployment_demands(2, actor_resources(1), INGRESS)
    assert "the cluster has 1 free" in shortfall(demands, free_resources(nodes, others))
    ours = lambda a: a["ray_namespace"] == "moefleet" and a["name"].startswith("moefleet-worker:")  # noqa: E731
    assert shortfall(demands, free_resources(nodes, others, reusable=ours)) is None
    # a pending actor holds nothing
    pending = [_actor("someone-else", state="PENDING_CREATION", namespace="other", CPU=4.0)]
    assert shortfall(demands, free_resources(nodes, pending)) is None


def test_a_resource_no_node_declares_is_named():
    demands = deployment_demands(1, actor_resources(1, resources={CPU_TIER_RESOURCE: 1}), INGRESS)
    said = shortfall(demands, free_resources([_node(cpus=8)], []))
    assert said.startswith(f"needs 1 of {CPU_TIER_RESOURCE} for 1 worker; the cluster has 0 free")
    assert f"no {CPU_TIER_RESOURCE}" in said


def test_enough_in_sum_but_no_node_with_room_for_one_worker_names_the_worker():
    nodes = [_node(cpus=1.5), _node("a" * 56, cpus=1.5, head=False)]
    said = shortfall(deployment_demands(1, actor_resources(2), INGRESS), free_resources(nodes, []))
    assert said.startswith("worker-0 needs 2 CPUs on one node; no node has that free")


def test_the_ingress_needs_the_head_node():
    nodes = [_node("a" * 56, cpus=8, head=False)]
    said = shortfall(deployment_demands(1, actor_resources(1), INGRESS), free_resources(nodes, []))
    assert "needs a head node" in said


def test_a_waiting_actor_is_named_with_what_it_asks_and_why_it_waits():
    nodes = free_resources([_node(cpus=2)], [_actor("moefleet-worker:worker-0", CPU=1.0),
                                            _actor("SERVE_REPLICA::moefleet#FleetIngress#x", namespace="serve",
                                                   cls="ServeReplica:moefleet:FleetIngress", CPU=0.5)])
    actors = [_actor("moefleet-worker:worker-1", state="PENDING_CREATION", CPU=1.0),
              _actor("moefleet-worker:worker-2", state="PENDING_CREATION", **{CPU_TIER_RESOURCE: 1.0}),
              _actor("moefleet-worker:worker-3", state="PENDING_CREATION", CPU=0.5),
              _actor("unrelated", state="PENDING_CREATION", namespace="other", CPU=9.0)]
    ours = lambda a: a["ray_namespace"] == "moefleet"  # noqa: E731
    lines = pending_report(actors, nodes, ours)
    assert lines == [
        "moefleet-worker:worker-1: PENDING_CREATION, asks 1 CPU: no node has that free "
        "(node 8be42060 (head, 127.0.0.1): 0.5 of 2 CPUs free)",
        f"moefleet-worker:worker-2: PENDING_CREATION, asks 1 of {CPU_TIER_RESOURCE}: no node declares {CPU_TIER_RESOURCE}",
        "moefleet-worker:worker-3: PENDING_CREATION, asks 0.5 CPUs: a node has room for it: Ray has not placed it yet "
        "(its process is starting, or waits on a dependency)",
    ]


# -- the deploy's workers are devices -----------------------------------------------------------------------------
def _ray_node(node_type: str, node_id: str, head=False):
    return node_dict(NODE_TYPES[node_type], node_id, head=head)


def _fleet(node_id, **over):
    return {"node_id": node_id, "num_cpus": 1.0, "num_gpus": 0.0, "resources": {}, "accelerator": {"name": "cpu"}, **over}


def test_cpu_workers_of_a_head_only_cluster_are_cpu_tier_devices_with_memory_for_every_expert_twice():
    head = _ray_node("head", HEAD, head=True)
    total, one = 16 * 1000, 1000
    inv = cluster_inventory([head], {"worker-0": _fleet(HEAD), "worker-1": _fleet(HEAD)}, total_expert_bytes=total,
                            expert_bytes=one)
    assert [d.device_id for d in inv.devices] == ["worker-0", "worker-1"]
    for d in inv.devices:
        assert d.kind == "cpu" and d.node_id == HEAD and d.speed == CPU_TIER_SPEED
        assert d.memory_bytes == fleet_cpu_memory_bytes(total, one, 2, 24 * GIB, 2) == int(2 * total / 0.9) + one
        assert d.memory_bytes * 0.9 >= total  # one worker holds every expert once: a dead one's experts fit beside
    # without the record the same cluster has no device at all: what left the controller idle
    assert cluster_inventory([head], {}).devices == []


def test_cpu_worker_memory_is_capped_by_its_nodes_memory_but_never_below_its_starting_share():
    assert fleet_cpu_memory_bytes(100 * GIB, GIB, 2, node_memory_bytes=128 * GIB, workers_on_node=2) == 64 * GIB
    share = fleet_cpu_memory_bytes(100 * GIB, GIB, 2, node_memory_bytes=8 * GIB, workers_on_node=2)
    assert share == int(100 * GIB / 2 / 0.9) + 2 * GIB


def test_a_gpu_worker_is_its_nodes_gpu_type_and_takes_one_of_the_nodes_gpu_devices():
    gpu_node = "c" * 56
    nodes = [_ray_node("head", HEAD, head=True), _ray_node("h100", gpu_node)]
    inv = cluster_inventory(nodes, {"worker-0": _fleet(gpu_node, num_gpus=1.0)}, total_expert_bytes=10, expert_bytes=1)
    ids = [d.device_id for d in inv.devices]
    assert ids[0] == "worker-0" and len(ids) == 8  # the worker and 7 of the node's 8 GPUs
    w = inv.devices[0]
    assert (w.kind, w.accelerator_type, w.memory_bytes, w.speed) == ("gpu", "H100", 79 * GIB, 1.0)
    assert f"{gpu_node[:8]}/gpu7" not in ids and f"{gpu_node[:8]}/gpu0" in ids


def test_a_cpu_worker_on_a_cpu_tier_slot_is_that_slot():
    cpu_node = "d" * 56
    nodes = [_ray_node("head", HEAD, head=True), _ray_node("cpu", cpu_node)]
    entry = _fleet(cpu_node, resources={CPU_TIER_RESOURCE: 1})
    inv = cluster_inventory(nodes, {"worker-0": entry}, total_expert_bytes=10, expert_bytes=1)
    assert [d.device_id for d in inv.devices] == ["worker-0"]  # not also the node's own cpu0 slot, which it holds
    tier_gib = nodes[1]["Resources"][CPU_TIER_MEMORY_RESOURCE]
    assert inv.devices[0].memory_bytes == tier_gib * GIB
    assert fleet_worker_options(entry) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {CPU_TIER_RESOURCE: 1},
                                           "node_id": cpu_node}


# -- the controller's state and reason ----------------------------------------------------------------------------
@pytest.mark.parametrize("report, state, reason", [
    ({"skipped": "no live device", "detail": "the inventory is empty"}, "blocked", "no live device"),
    ({"skipped": "no checkpoint", "detail": "the fleet serves mixtral"}, "blocked", "no checkpoint"),
    ({"skipped": "too little load to plan from"}, "waiting", "too little load to plan from"),
    ({"skipped": "no fleet yet"}, "waiting", "no fleet yet"),
    ({"apply_error": "loads failed"}, "failing", "rebalance undone"),
    ({"down": ["worker-1"], "gain": 0.5, "applied_version": 4}, "repairing", "workers down"),
    ({"gain": 0.4, "applied_version": 4}, "rebalanced", "placement v4"),
    ({"gain": 0.01, "apply": False}, "steady", "no move pays"),
    ({"gain": 0.2, "apply": False, "plan_skipped": {"reason": "cooldown", "gain": 0.2, "horizon_s": 60, "cost_s": 3.0}},
     "steady", "plan held: cooldown"),
])
def test_each_step_report_maps_to_a_state_and_a_reason(report, state, reason):
    assert step_state(report)[:2] == (state, reason)


def test_status_shows_the_controllers_state_and_reason_and_none_without_a_leader():
    from rich.console import Console

    from moefleet.views import status_view

    record = {"status": {"state": "blocked", "reason": "no live device", "detail": "the inventory is empty"}}
    assert controller_status("ctl", record) == {"state": "blocked", "reason": "no live device",
                                                "detail": "the inventory is empty"}
    assert controller_status(None, record)["state"] == "none"
    snap = build_snapshot(FleetInputs(now=1.0, controller=record, leader="ctl"), TelemetryConfig())
    console = Console(width=160, record=True)
    console.print(status_view(snap))
    assert "controller blocked: no live device — the inventory is empty" in console.export_text()


# -- the Serve config: the controller beside the fleet --------------------------------------------------------------
def test_deploy_config_runs_the_controller_as_a_second_application_with_the_fleets_checkpoint():
    from moefleet.controller.serve_app import build_app as build_controller
    from moefleet.deploy_config import ServeConfigError, serve_config

    config = serve_config({"checkpoint": "/models/m", "worker": {"num_cpus": 0.5}}, controller={"http_port": 8470},
                          host="127.0.0.1")
    fleet, ctl = config["applications"]
    assert fleet["args"]["router"]["host"] == "127.0.0.1" and config["http_options"]["host"] == "127.0.0.1"
    assert ctl["name"] == "moefleet-controller" and ctl["route_prefix"] is None
    assert ctl["import_path"] == "moefleet.controller.serve_app:build_app"
    assert ctl["args"] == {"http_port": 8470, "checkpoint": "/models/m", "namespace": "moefleet", "worker": {"num_cpus": 0.5}}
    build_controller(ctl["args"])  # the builder accepts what the config says
    assert len(serve_config({"checkpoint": "/models/m"})["applications"]) == 1  # static: no controller
    with pytest.raises(ServeConfigError, match="controller.checkpoint"):
        serve_config({"checkpoint": "/models/m"}, controller={"checkpoint": "/models/other"})
    with pytest.raises(ServeConfigError, match="controller.redis_url: holds a password"):
        serve_config({}, controller={"redis_url": "redis://:secret@host:6379/0"})
    with pytest.raises(ServeConfigError, match="interval_s"):
        serve_config({}, controller={"interval_s": -1})


# -- the guide's own text ------------------------------------------------------------------------------------------
def test_the_guides_controller_yaml_is_a_controller_config_naming_a_checkpoint():
    import yaml

    from moefleet.controller.main import ControllerConfig
    from tests.guide_walk import guide_steps

    lang, body = guide_steps()["controller-config"]
    cfg = ControllerConfig(**yaml.safe_load(body))
    assert lang == "yaml" and cfg.checkpoint == "/models/mixtral-8x7b-v0.1" and cfg.ray_address == "auto"


def test_the_guides_deploy_command_makes_the_fleet_and_its_controller(tmp_path, monkeypatch, capsys):
    import shlex

    import yaml

    from moefleet.cli import main
    from tests.guide_walk import commands, guide_steps

    (tmp_path / "controller.yaml").write_text(guide_steps()["controller-config"][1])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    deploy, = commands(guide_steps()["deploy"][1])
    argv = shlex.split(deploy.replace("\\\n", " ").replace("~", str(tmp_path)))
    assert argv[0] == "moe-fleet"
    assert main(argv[1:] + ["--dry-run"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    fleet, ctl = config["applications"]
    assert fleet["args"]["num_workers"] == 2 and fleet["args"]["router"]["port"] == 9000
    assert fleet["args"]["router"]["tls_cert"] == f"{tmp_path}/.config/moefleet/tls/tls.crt"
    assert ctl["args"]["checkpoint"] == fleet["args"]["checkpoint"] == "/models/mixtral-8x7b-v0.1"
    assert ctl["args"]["http_port"] == 8470 and "ray_address" not in ctl["args"]
    assert main(argv[1:] + ["--dry-run", "--static"]) == 0  # the opt-out: the fleet alone
    assert [a["name"] for a in yaml.safe_load(capsys.readouterr().out)["applications"]] == ["moefleet"]
