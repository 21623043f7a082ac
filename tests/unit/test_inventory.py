"""Node types and the inventory: ray.nodes() entries -> devices; node types -> what a node declares."""

from __future__ import annotations

import json

import pytest

from moefleet.controller.inventory import (
    ACCELERATOR_TYPE_LABEL,
    ACCELERATOR_TYPE_RESOURCE_PREFIX,
    ACCELERATORS,
    CPU_TIER_MEMORY_RESOURCE,
    CPU_TIER_RESOURCE,
    CPU_TIER_SPEED,
    GIB,
    GPU_MEMORY_RESOURCE,
    HEAD_NODE_RESOURCE,
    NODE_TYPES,
    SPEED_RESOURCE,
    InventoryError,
    NodeType,
    custom_resources,
    inventory_from_nodes,
    node_dict,
    node_labels,
    node_resources,
    ray_start_command,
    ray_start_params,
    worker_resources,
)

HEAD_ID = "713866bb74e175085317cdaa2b2103f8f1ef8889c03e293482663982"
GPU_ID = "2fabb52caed5c16fbd5feb80626636f19f4f6afc1d47a32da985c149"

# What Ray 2.60's ray.nodes() returned for a ray.cluster_utils.Cluster with a plain head and a
# node started with num_gpus=2, resources={"accelerator_type:H100": 1, "moefleet_gpu_memory_gb":
# 80, "moefleet_speed": 100}, labels={"ray.io/accelerator-type": "H100", ...}; then the same node
# after it was removed (ports and socket paths left out).
RAY_260_NODES = [
    {
        "NodeID": HEAD_ID,
        "Alive": True,
        "NodeManagerAddress": "127.0.0.1",
        "NodeManagerHostname": "vm",
        "NodeName": "127.0.0.1",
        "DeathReason": 0,
        "DeathReasonMessage": "",
        "alive": True,
        "Resources": {
            "node:__internal_head__": 1.0,
            "CPU": 1.0,
            "node:127.0.0.1": 1.0,
            "memory": 24638210048.0,
            "object_store_memory": 157286400.0,
        },
        "Labels": {"ray.io/node-id": HEAD_ID},
    },
    {
        "NodeID": GPU_ID,
        "Alive": True,
        "NodeManagerAddress": "127.0.0.1",
        "NodeManagerHostname": "vm",
        "NodeName": "127.0.0.1",
        "DeathReason": 0,
        "DeathReasonMessage": "",
        "alive": True,
        "Resources": {
            "node:127.0.0.1": 1.0,
            "object_store_memory": 157286400.0,
            "GPU": 2.0,
            "CPU": 1.0,
            "accelerator_type:H100": 1.0,
            "memory": 24394862592.0,
            "moefleet_speed": 100.0,
            "moefleet_gpu_memory_gb": 80.0,
        },
        "Labels": {
            "moefleet.io/node-type": "h100",
            "ray.io/node-id": GPU_ID,
            "ray.io/accelerator-type": "H100",
        },
    },
]
DEAD_GPU_NODE = {
    **RAY_260_NODES[1],
    "Alive": False,
    "alive": False,
    "DeathReason": 1,
    "DeathReasonMessage": "received SIGTERM",
    "Resources": {},
}


def _node(node_id: str, resources: dict, labels: dict | None = None, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": resources, "Labels": labels or {}}


# -- Ray's names ------------------------------------------------------------------------------
def test_ray_names_are_the_ones_the_installed_ray_uses():
    import ray._raylet
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME
    from ray._common.utils import RESOURCE_CONSTRAINT_PREFIX

    assert ACCELERATOR_TYPE_LABEL == ray._raylet.RAY_NODE_ACCELERATOR_TYPE_KEY
    assert ACCELERATOR_TYPE_RESOURCE_PREFIX == RESOURCE_CONSTRAINT_PREFIX
    assert HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME


def test_known_accelerators_are_named_as_ray_detects_them():
    import ray.util.accelerators.accelerators as ray_accelerators
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    ray_names = {v for k, v in vars(ray_accelerators).items() if k.startswith("NVIDIA_") and isinstance(v, str)}
    assert set(ACCELERATORS) <= ray_names
    # What Ray makes of the names the cards report (nvidia-smi's product names).
    detect = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type
    assert detect("NVIDIA H100 80GB HBM3") == "H100"
    assert detect("NVIDIA H200") == "H200"
    assert detect("NVIDIA L4") == "L4"
    assert detect("NVIDIA A10G") == "A10G"
    # Both A100 sizes are "A100" to Ray: the table assumes the smaller, nodes declare the memory.
    assert detect("NVIDIA A100-SXM4-80GB") == detect("NVIDIA A100-SXM4-40GB") == "A100"
    assert ACCELERATORS["A100"].memory_gib == ACCELERATORS["A100-40G"].memory_gib


def test_accelerator_speeds_are_bf16_dense_tflops_relative_to_h100():
    assert ACCELERATORS["H100"].speed == 1.0
    assert ACCELERATORS["H200"].speed == 1.0
    assert ACCELERATORS["L4"].speed == pytest.approx(121 / 989.4, abs=1e-3)
    assert ACCELERATORS["A100"].speed == pytest.approx(312 / 989.4, abs=1e-3)
    assert all(0 < a.speed <= 1.0 for a in ACCELERATORS.values())


# -- ray.nodes() -> devices -------------------------------------------------------------------
def test_nodes_from_ray_260_give_one_device_per_gpu_and_ignore_the_head():
    inv = inventory_from_nodes(RAY_260_NODES)
    assert [d.device_id for d in inv.devices] == ["2fabb52c/gpu0", "2fabb52c/gpu1"]
    for d in inv.devices:
        assert d.node_id == GPU_ID
        assert d.kind == "gpu"
        assert d.accelerator_type == "H100"
        assert d.memory_bytes == 80 * GIB  # declared moefleet_gpu_memory_gb wins over the table's 79
        assert d.speed == pytest.approx(0.1)  # declared moefleet_speed 100 / 1000


def test_dead_nodes_bring_no_devices():
    assert inventory_from_nodes([RAY_260_NODES[0], DEAD_GPU_NODE]).devices == []


def test_a_head_with_gpus_brings_its_gpus():
    head = _node("aaaaaaaaffff", {HEAD_NODE_RESOURCE: 1.0, "CPU": 8.0, "GPU": 1.0, "accelerator_type:L4": 1.0})
    (device,) = inventory_from_nodes([head]).devices
    assert device.device_id == "aaaaaaaa/gpu0"
    assert device.memory_bytes == ACCELERATORS["L4"].memory_gib * GIB


def test_gpu_memory_and_speed_fall_back_to_the_accelerator_table():
    node = _node("bbbbbbbb0000", {"GPU": 4.0, "accelerator_type:H200": 1.0})
    inv = inventory_from_nodes([node])
    assert len(inv.devices) == 4
    assert {d.memory_bytes for d in inv.devices} == {140 * GIB}
    assert {d.speed for d in inv.devices} == {1.0}


def test_accelerator_label_is_preferred_to_the_resource():
    node = _node("cccccccc0000", {"GPU": 1.0, "accelerator_type:A100": 1.0}, {ACCELERATOR_TYPE_LABEL: "A100-80G"})
    (device,) = inventory_from_nodes([node]).devices
    assert device.accelerator_type == "A100-80G"
    assert device.memory_bytes == 80 * GIB


def test_unknown_gpu_without_declared_memory_is_an_error_naming_the_node():
    node = _node("dddddddd0000", {"GPU": 1.0, "accelerator_type:MI300X": 1.0})
    with pytest.raises(InventoryError, match=r"dddddddd0000.*MI300X.*moefleet_gpu_memory_gb"):
        inventory_from_nodes([node])
    assert inventory_from_nodes([node], strict=False).devices == []


def test_unknown_gpu_with_declared_memory_but_no_speed_is_an_error():
    node = _node("dddddddd0000", {"GPU": 1.0, GPU_MEMORY_RESOURCE: 192.0})
    with pytest.raises(InventoryError, match="moefleet_speed"):
        inventory_from_nodes([node])
    node["Resources"][SPEED_RESOURCE] = 1300.0
    (device,) = inventory_from_nodes([node]).devices
    assert (device.accelerator_type, device.memory_bytes, device.speed) == (None, 192 * GIB, 1.3)


def test_cpu_tier_node_gives_one_cpu_device_with_its_declared_memory_and_speed():
    resources = {"CPU": 30.0, CPU_TIER_RESOURCE: 1.0, CPU_TIER_MEMORY_RESOURCE: 184.0, SPEED_RESOURCE: 2.0}
    node = _node("eeeeeeee0000", resources)
    (device,) = inventory_from_nodes([node]).devices
    assert device.device_id == "eeeeeeee/cpu0"
    assert device.kind == "cpu" and device.accelerator_type is None
    assert device.memory_bytes == 184 * GIB
    assert device.speed == pytest.approx(0.002)


def test_cpu_tier_memory_comes_from_the_argument_when_the_node_does_not_declare_it():
    node = _node("ffffffff0000", {"CPU": 4.0, CPU_TIER_RESOURCE: 1.0})
    with pytest.raises(InventoryError, match="moefleet_cpu_tier_memory_gb"):
        inventory_from_nodes([node])
    (device,) = inventory_from_nodes([node], cpu_slot_memory_bytes=3 * GIB).devices
    assert device.memory_bytes == 3 * GIB
    assert device.speed == CPU_TIER_SPEED


def test_cpu_only_node_without_the_cpu_tier_resource_brings_nothing():
    assert inventory_from_nodes([_node("1111111100", {"CPU": 64.0, "memory": 1e11})]).devices == []


def test_devices_come_in_node_id_order_gpus_before_the_cpu_slot():
    both = _node(
        "bbbb0000", {"GPU": 2.0, "accelerator_type:L4": 1.0, CPU_TIER_RESOURCE: 1.0, CPU_TIER_MEMORY_RESOURCE: 8.0}
    )
    other = _node("aaaa0000", {"GPU": 1.0, "accelerator_type:L4": 1.0})
    ids = [d.device_id for d in inventory_from_nodes([both, other]).devices]
    assert ids == ["aaaa0000/gpu0", "bbbb0000/gpu0", "bbbb0000/gpu1", "bbbb0000/cpu0"]


def test_worker_resources_reserve_one_gpu_or_the_cpu_tier_slot():
    gpu_node = _node("aaaa0000", {"GPU": 1.0, "accelerator_type:L4": 1.0})
    cpu_node = _node("bbbb0000", {CPU_TIER_RESOURCE: 1.0, CPU_TIER_MEMORY_RESOURCE: 8.0})
    gpu, cpu = inventory_from_nodes([gpu_node, cpu_node]).devices
    assert worker_resources(gpu) == {"num_gpus": 1}
    assert worker_resources(cpu) == {"num_gpus": 0, "resources": {CPU_TIER_RESOURCE: 1}}


# -- node types -> declarations -> devices ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(NODE_TYPES))
def test_a_node_declaring_its_type_gives_the_types_devices(name):
    t = NODE_TYPES[name]
    inv = inventory_from_nodes([node_dict(t, "0123456789abcdef")])
    assert len(inv.devices) == t.devices_per_node
    gpus = [d for d in inv.devices if d.kind == "gpu"]
    cpus = [d for d in inv.devices if d.kind == "cpu"]
    assert len(gpus) == t.gpus
    assert all(d.memory_bytes == t.gpu_memory_gib * GIB for d in gpus)
    assert all(d.accelerator_type == t.accelerator_type for d in gpus)
    assert len(cpus) == (1 if t.cpu_tier else 0)
    assert all(d.memory_bytes == t.cpu_tier_memory_gib * GIB for d in cpus)
    assert all(d.speed == pytest.approx(t.speed) for d in inv.devices)


def test_node_types_follow_the_memory_arithmetic():
    for t in NODE_TYPES.values():
        assert t.container_memory_gib == t.memory_gib + t.object_store_memory_gib + t.ray_system_gib
        if t.cpu_tier:
            assert t.cpu_tier_memory_gib == t.memory_gib - t.worker_runtime_gib
        if t.gpus:
            assert t.memory_gib >= t.gpus * t.worker_runtime_gib


def test_a_gpu_node_type_needs_accelerator_memory_and_speed():
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        NodeType(name="x", gpus=1, accelerator_type="L4", speed=0.1, cpus=4, memory_gib=16, object_store_memory_gib=2)


def test_a_gpu_node_type_needs_host_memory_for_its_workers():
    with pytest.raises(ValueError, match="memory_gib"):
        NodeType(
            name="x", gpus=8, accelerator_type="H100", gpu_memory_gib=79, speed=1.0, cpus=8, memory_gib=16,
            object_store_memory_gib=2,
        )


def test_a_cpu_tier_type_needs_memory_beyond_the_worker_runtime():
    with pytest.raises(ValueError, match="no CPU-tier memory"):
        NodeType(name="x", cpu_tier=True, speed=0.001, cpus=4, memory_gib=8, object_store_memory_gib=2)


def test_node_type_names_must_be_kubernetes_names():
    with pytest.raises(ValueError, match="name"):
        NodeType(name="H100_Group", cpus=1, memory_gib=1, object_store_memory_gib=1)


def test_a_speed_below_one_thousandth_cannot_be_declared():
    with pytest.raises(ValueError, match="smallest"):
        NodeType(name="x", cpu_tier=True, speed=0.0001, cpus=4, memory_gib=16, object_store_memory_gib=2)


def test_custom_resources_are_integers_and_never_ray_defaults():
    for t in NODE_TYPES.values():
        custom = custom_resources(t)
        assert not {"CPU", "GPU", "memory", "object_store_memory"} & set(custom)
        assert all(isinstance(v, int) and v >= 1 for v in node_resources(t).values())


def test_ray_start_params_are_accepted_by_ray_start():
    from ray._private.label_utils import parse_node_labels_string
    from ray._private.parameter import RayParams
    from ray.scripts.scripts import start

    for t in NODE_TYPES.values():
        params = ray_start_params(t)
        argv = ["--address=10.0.0.1:6379", *(f"--{k}={v}" for k, v in params.items())]
        parsed = start.make_context("start", argv).params  # click parses and type-checks every flag
        assert parsed["num_cpus"] == t.cpus
        assert parsed["num_gpus"] == (t.gpus or None)
        assert parsed["memory"] == t.memory_gib * GIB
        assert parsed["object_store_memory"] == t.object_store_memory_gib * GIB
        resources = json.loads(parsed["resources"]) if parsed["resources"] else {}
        labels = parse_node_labels_string(parsed["labels"])
        assert resources == custom_resources(t)
        assert labels == node_labels(t)
        RayParams(resources=resources, labels=labels)  # Ray's own checks: no default resource as custom


def test_ray_start_command_renders_the_params():
    cmd = ray_start_command(NODE_TYPES["l4"], "$HEAD_IP:6379")
    assert cmd.startswith("ray start --address=$HEAD_IP:6379 --num-cpus=6 --num-gpus=1 ")
    assert """'--resources={"accelerator_type:L4":1,"moefleet_gpu_memory_gb":22,"moefleet_speed":122}'""" in cmd
    assert ray_start_command(NODE_TYPES["head"]).startswith("ray start --head --port=6379 ")
