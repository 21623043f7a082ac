"""Node types and the inventory: what a Ray node declares, and the devices the planner sees in it.

This module is the one source of truth for node types. The KubeRay manifests
(``deploy/kuberay/``), the cluster-launcher config (``deploy/ray-cluster.yaml``)
and the bare ``ray start`` commands in ``deploy/README.md`` declare exactly what
``node_resources``, ``node_labels`` and ``ray_start_params`` render here; the
unit tests check each of them against these functions. Pure: no Ray import.

Names MoE Fleet reads from a node (``ray.nodes()`` entries)
-----------------------------------------------------------
Ray's own (set by Ray when it detects an NVIDIA GPU; declared too, so the
autoscaler knows them before a node exists):

* label ``ray.io/accelerator-type`` (``ACCELERATOR_TYPE_LABEL``), e.g. ``"H100"``;
* resource ``accelerator_type:<TYPE>`` (``ACCELERATOR_TYPE_RESOURCE_PREFIX``), quantity 1;
* resource ``GPU``: the number of GPUs; each is one device.

MoE Fleet's own (integers: the cluster-launcher schema and the KubeRay
autoscaler only accept integer resource quantities):

* ``moefleet_gpu_memory_gb`` -- memory of *one* GPU of the node, in GiB
  (needed because Ray reports ``"A100"`` for both the 40 GB and the 80 GB card);
* ``moefleet_speed`` -- relative expert throughput of one device of the node
  x ``SPEED_SCALE`` (1000), H100 = 1000;
* ``moefleet_cpu_tier`` -- 1 on a CPU node that hosts cold experts: one CPU-tier
  worker slot (a worker that requests it, as ``worker_resources`` and the Serve
  app's starting worker do, is the only one of its kind on the node);
* ``moefleet_cpu_tier_memory_gb`` -- memory for expert weights on that slot, GiB;
* label ``moefleet.io/node-type`` -- the ``NodeType.name`` (for label selectors
  and ``status`` output; the inventory does not need it).

These resources describe a node; nothing requests ``moefleet_gpu_memory_gb``
or ``moefleet_speed``.

Device ids
----------
``f"{node_id[:8]}/gpu{i}"`` for GPU ``i`` of a node and ``f"{node_id[:8]}/cpu0"``
for its CPU-tier slot; ``DeviceSpec.node_id`` holds the full Ray node id (for
``NodeAffinitySchedulingStrategy``).

Memory arithmetic (what a node type must be given)
--------------------------------------------------
A device's ``memory_bytes`` is all of its memory for expert weights; the
planner keeps ``PlannerKnobs.headroom`` (10 %) of it free, so it places at most
``0.9 * memory_bytes``. GPU experts live in GPU memory; the host only runs the
worker process (``worker_runtime_gib`` per GPU: Python, torch, CUDA context,
staging buffers; weights stream from the memory-mapped checkpoint). A CPU-tier
slot holds its experts in host memory, so

    cpu_tier_memory_gib = memory_gib - worker_runtime_gib
    container memory    = memory_gib + object_store_memory_gib + ray_system_gib

where ``memory_gib`` is Ray's ``memory`` resource (heap for actors),
``object_store_memory_gib`` Ray's shared-memory object store and
``ray_system_gib`` the raylet, dashboard agent and log monitor.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moefleet.core.placement import FLEET_DEVICES_RECORD, DeviceSpec, Inventory  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

GIB = 1 << 30

# -- Ray's own names (tests check them against the installed Ray) -----------------------------
ACCELERATOR_TYPE_LABEL = "ray.io/accelerator-type"
"""Node label Ray sets to the detected accelerator type (``ray._raylet.RAY_NODE_ACCELERATOR_TYPE_KEY``)."""
ACCELERATOR_TYPE_RESOURCE_PREFIX = "accelerator_type:"
"""Ray's accelerator resource is ``accelerator_type:<TYPE>`` = 1 (``ray._common.utils.RESOURCE_CONSTRAINT_PREFIX``)."""
HEAD_NODE_RESOURCE = "node:__internal_head__"
"""Resource only the head node carries (``ray._common.constants.HEAD_NODE_RESOURCE_NAME``)."""

# -- MoE Fleet's names -------------------------------------------------------------------------
GPU_MEMORY_RESOURCE = "moefleet_gpu_memory_gb"
SPEED_RESOURCE = "moefleet_speed"
SPEED_SCALE = 1000
"""``moefleet_speed`` = round(speed * SPEED_SCALE); speeds are kept to 1/1000 of an H100."""
CPU_TIER_RESOURCE = "moefleet_cpu_tier"
CPU_TIER_MEMORY_RESOURCE = "moefleet_cpu_tier_memory_gb"
NODE_TYPE_LABEL = "moefleet.io/node-type"

MOEFLEET_RESOURCES = (GPU_MEMORY_RESOURCE, SPEED_RESOURCE, CPU_TIER_RESOURCE, CPU_TIER_MEMORY_RESOURCE)


class InventoryError(ValueError):
    """A live node cannot be turned into devices; the message names the node and what is missing."""


# -- Known accelerators -----------------------------------------------------------------------
REFERENCE_BF16_TFLOPS = 989.4
"""H100 SXM dense BF16 tensor TFLOP/s (NVIDIA H100 datasheet: 1,979 with 2:4 sparsity). Speed 1.0."""


@dataclass(frozen=True)
class AcceleratorSpec:
    """Public figures of one accelerator type, keyed by the name Ray reports for it.

    ``memory_gib``: floor of ``nvidia-smi --query-gpu=memory.total`` (MiB / 1024)
    of the card; ``bf16_tflops``: dense BF16 tensor TFLOP/s from NVIDIA's
    datasheet (the "with sparsity" figure halved). ``speed`` is their ratio to
    the H100 SXM, rounded to 1/1000: expert FFNs are GEMMs, compute-bound at
    serving batch sizes per expert. At tiny batches they are memory-bandwidth
    bound instead (H200 vs H100: 4.8 vs 3.35 TB/s); declare ``moefleet_speed``
    on the node to override, ideally from a measurement.
    """

    name: str
    memory_gib: int
    bf16_tflops: float
    source: str

    @property
    def speed(self) -> float:
        return round(self.bf16_tflops / REFERENCE_BF16_TFLOPS, 3)


ACCELERATORS: dict[str, AcceleratorSpec] = {
    a.name: a
    for a in (
        AcceleratorSpec("H100", 79, 989.4, "H100 SXM5 80GB HBM3: 81559 MiB; 1,979 TFLOP/s BF16 sparse"),
        AcceleratorSpec("H200", 140, 989.4, "H200 SXM 141GB HBM3e: 143771 MiB; same tensor cores as H100"),
        AcceleratorSpec(
            "A100", 40, 312.0, "Ray reports 'A100' for the 40 GB and the 80 GB card: the smaller one; 624 sparse"
        ),
        AcceleratorSpec("A100-40G", 40, 312.0, "A100 40GB: 40960 MiB; 624 TFLOP/s BF16 sparse"),
        AcceleratorSpec("A100-80G", 80, 312.0, "A100 80GB: 81920 MiB; 624 TFLOP/s BF16 sparse"),
        AcceleratorSpec("L40S", 44, 362.05, "L40S 48GB: 46068 MiB; 733 TFLOP/s BF16 sparse"),
        AcceleratorSpec("L4", 22, 121.0, "L4 24GB: 23034 MiB; 242 TFLOP/s BF16 sparse"),
        AcceleratorSpec(
            "A10G", 22, 125.0, "A10G 24GB: 23028 MiB; NVIDIA publishes no A10G sheet: the A10's 250 sparse, assumed"
        ),
    )
}

CPU_TIER_SPEED = 0.001
"""Default speed of a CPU-tier slot. The dev machine does fp32 GEMMs at ~40 GFLOP/s on 2 cores
(DESIGN.md); 30 cores make ~0.6 TFLOP/s, ~0.0006 of an H100: rounded up to the smallest
``moefleet_speed`` (1/1000). Measure and declare ``moefleet_speed`` for real CPU nodes."""


# -- Node types -------------------------------------------------------------------------------
class NodeType(BaseModel):
    """One kind of Ray node: what it declares to Ray and the devices it brings.

    A GPU node type brings ``gpus`` devices of ``gpu_memory_gib`` each; a
    ``cpu_tier`` node type brings one CPU-tier slot of ``cpu_tier_memory_gib``;
    a type with neither (the head) brings none.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="Node type name: KubeRay group name, cluster-launcher node type, moefleet.io/node-type label.",
    )
    description: str = Field(default="", description="Where such a node comes from (instance types).")
    accelerator_type: str | None = Field(
        default=None, description="Accelerator type as Ray names it ('H100', 'L4'); None for CPU-only types."
    )
    gpus: int = Field(default=0, ge=0, description="GPUs per node; each is one device.")
    gpu_memory_gib: int | None = Field(default=None, gt=0, description="Memory of one GPU, GiB.")
    speed: float | None = Field(
        default=None, gt=0, description="Relative expert throughput of one device (H100 = 1.0); None without devices."
    )
    cpu_tier: bool = Field(default=False, description="The node hosts one CPU-tier slot for cold experts.")
    cpus: int = Field(ge=0, description="Ray CPU resource (and the container's CPU request).")
    memory_gib: int = Field(gt=0, description="Ray 'memory' resource: heap for actors, GiB.")
    object_store_memory_gib: int = Field(gt=0, description="Ray object store, GiB.")
    worker_runtime_gib: int = Field(
        default=8, gt=0, description="Host memory one worker process needs besides CPU-tier weights, GiB."
    )
    ray_system_gib: int = Field(default=4, gt=0, description="Raylet, dashboard agent, log monitor, GiB.")

    @model_validator(mode="after")
    def _consistent(self) -> "NodeType":
        if self.gpus:
            missing = [n for n in ("accelerator_type", "gpu_memory_gib", "speed") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"{self.name}: a GPU node type needs {', '.join(missing)}")
            need = self.gpus * self.worker_runtime_gib
            if self.memory_gib < need:
                raise ValueError(
                    f"memory_gib: {self.name} has {self.memory_gib} GiB for {self.gpus} GPU workers of "
                    f"{self.worker_runtime_gib} GiB each (needs {need})"
                )
        elif self.accelerator_type is not None or self.gpu_memory_gib is not None:
            raise ValueError(f"gpus: {self.name} names an accelerator but has 0 GPUs")
        if self.cpu_tier:
            if self.speed is None:
                raise ValueError(f"speed: {self.name} is a CPU-tier node type without a speed")
            if self.memory_gib <= self.worker_runtime_gib:
                raise ValueError(
                    f"memory_gib: {self.name} leaves no CPU-tier memory after the worker's "
                    f"{self.worker_runtime_gib} GiB runtime"
                )
        if not self.gpus and not self.cpu_tier and self.speed is not None:
            raise ValueError(f"speed: {self.name} brings no device, so it has no speed")
        if self.speed is not None and round(self.speed * SPEED_SCALE) < 1:
            raise ValueError(f"speed: {self.speed} is below 1/{SPEED_SCALE}, the smallest declarable speed")
        return self

    @property
    def cpu_tier_memory_gib(self) -> int | None:
        """Memory for expert weights on the CPU-tier slot (None if not a CPU-tier type)."""
        return self.memory_gib - self.worker_runtime_gib if self.cpu_tier else None

    @property
    def container_memory_gib(self) -> int:
        """What the node's container (pod) must be given: Ray heap + object store + Ray's own processes."""
        return self.memory_gib + self.object_store_memory_gib + self.ray_system_gib

    @property
    def devices_per_node(self) -> int:
        return self.gpus + (1 if self.cpu_tier else 0)


def _gpu_type(
    name: str, accelerator: str, *, gpus: int, cpus: int, memory_gib: int, object_store_gib: int, description: str
) -> NodeType:
    """A GPU node type whose GPU memory and speed are the accelerator table's."""
    spec = ACCELERATORS[accelerator]
    return NodeType(
        name=name,
        description=description,
        accelerator_type=accelerator,
        gpus=gpus,
        gpu_memory_gib=spec.memory_gib,
        speed=spec.speed,
        cpus=cpus,
        memory_gib=memory_gib,
        object_store_memory_gib=object_store_gib,
    )


NODE_TYPES: dict[str, NodeType] = {
    t.name: t
    for t in (
        NodeType(
            name="head",
            description="Ray head: GCS, Serve controller and proxies, router replicas. AWS m7i.4xlarge.",
            cpus=8,
            memory_gib=24,
            object_store_memory_gib=4,
        ),
        _gpu_type(
            "h100", "H100", gpus=8, cpus=64, memory_gib=128, object_store_gib=32,
            description="8x H100 80GB: AWS p5.48xlarge, GCP a3-highgpu-8g. One Ray node (pod) per machine.",
        ),
        _gpu_type(
            "l4", "L4", gpus=1, cpus=6, memory_gib=16, object_store_gib=4,
            description="1x L4 24GB: AWS g6.2xlarge, GCP g2-standard-8.",
        ),
        NodeType(
            name="cpu",
            description="CPU tier for cold experts: AWS r7i.8xlarge (32 vCPU, 256 GiB), GCP n2-highmem-32.",
            cpu_tier=True,
            speed=CPU_TIER_SPEED,
            cpus=30,
            memory_gib=192,
            object_store_memory_gib=16,
        ),
        # Development cluster (deploy/kuberay/raycluster-dev.yaml): fits a laptop's kind/minikube.
        NodeType(
            name="dev-head",
            description="Head of the development RayCluster.",
            cpus=2,
            memory_gib=2,
            object_store_memory_gib=1,
            ray_system_gib=1,
        ),
        NodeType(
            name="dev-cpu",
            description="CPU-tier worker of the development RayCluster (the built-in default model fits).",
            cpu_tier=True,
            speed=CPU_TIER_SPEED,
            cpus=2,
            memory_gib=3,
            object_store_memory_gib=1,
            worker_runtime_gib=1,
            ray_system_gib=1,
        ),
    )
}


# -- What a node of a type declares -----------------------------------------------------------
def custom_resources(node_type: NodeType) -> dict[str, int]:
    """The node's non-default Ray resources (``ray start --resources``)."""
    out: dict[str, int] = {}
    if node_type.gpus:
        out[ACCELERATOR_TYPE_RESOURCE_PREFIX + node_type.accelerator_type] = 1
        out[GPU_MEMORY_RESOURCE] = node_type.gpu_memory_gib
    if node_type.cpu_tier:
        out[CPU_TIER_RESOURCE] = 1
        out[CPU_TIER_MEMORY_RESOURCE] = node_type.cpu_tier_memory_gib
    if node_type.speed is not None:
        out[SPEED_RESOURCE] = round(node_type.speed * SPEED_SCALE)
    return out


def node_resources(node_type: NodeType) -> dict[str, int]:
    """Every Ray resource the node declares, in the cluster launcher's form (integers; memories in bytes).

    ``CPU``, ``GPU`` (GPU types only), ``memory``, ``object_store_memory`` and
    ``custom_resources``. KubeRay takes all but ``object_store_memory`` in a
    group's top-level ``resources`` and that one as the ``object-store-memory``
    rayStartParam (Ray rejects it as a custom resource).
    """
    out: dict[str, int] = {"CPU": node_type.cpus}
    if node_type.gpus:
        out["GPU"] = node_type.gpus
    out["memory"] = node_type.memory_gib * GIB
    out["object_store_memory"] = node_type.object_store_memory_gib * GIB
    out.update(custom_resources(node_type))
    return out


def node_labels(node_type: NodeType) -> dict[str, str]:
    """The node's Ray labels: its type, and for GPU types Ray's accelerator label (same value Ray detects)."""
    labels = {NODE_TYPE_LABEL: node_type.name}
    if node_type.accelerator_type:
        labels[ACCELERATOR_TYPE_LABEL] = node_type.accelerator_type
    return labels


def ray_start_params(node_type: NodeType) -> dict[str, str]:
    """``ray start`` flags (without dashes) that make a bare machine a node of this type.

    Values are strings, as in KubeRay's ``rayStartParams``; ``resources`` is the
    JSON Ray expects and ``labels`` the ``key=value,...`` form (Ray's JSON form
    for labels is deprecated and refuses ``ray.io/`` keys).
    """
    params = {"num-cpus": str(node_type.cpus)}
    if node_type.gpus:
        params["num-gpus"] = str(node_type.gpus)
    params["memory"] = str(node_type.memory_gib * GIB)
    params["object-store-memory"] = str(node_type.object_store_memory_gib * GIB)
    custom = custom_resources(node_type)
    if custom:
        params["resources"] = json.dumps(custom, sort_keys=True, separators=(",", ":"))
    params["labels"] = ",".join(f"{k}={v}" for k, v in sorted(node_labels(node_type).items()))
    return params


def ray_start_command(node_type: NodeType, address: str | None = None, *, head_port: int = 6379) -> str:
    """The ``ray start`` command line for a node of this type: joining ``address``, or a head if None."""
    head = ["--head", f"--port={head_port}"] if address is None else [f"--address={address}"]
    flags = [shlex.quote(f"--{flag}={value}") for flag, value in ray_start_params(node_type).items()]
    return " ".join(["ray", "start", *head, *flags])  # the address unquoted: "$HEAD_IP:6379" expands


def node_dict(node_type: NodeType, node_id: str, *, alive: bool = True, head: bool = False) -> dict[str, Any]:
    """A ``ray.nodes()``-shaped entry for a node that declares exactly this type (what-if planning, tests)."""
    resources: dict[str, float] = {k: float(v) for k, v in node_resources(node_type).items()}
    if head:
        resources[HEAD_NODE_RESOURCE] = 1.0
    return {
        "NodeID": node_id,
        "Alive": alive,
        "Resources": resources if alive else {},
        "Labels": {"ray.io/node-id": node_id, **node_labels(node_type)},
    }


# -- From live nodes to devices ---------------------------------------------------------------
def _accelerator_type(resources: Mapping[str, float], labels: Mapping[str, str]) -> str | None:
    label = labels.get(ACCELERATOR_TYPE_LABEL)
    if label:
        return label
    prefix = ACCELERATOR_TYPE_RESOURCE_PREFIX
    found = sorted(k[len(prefix) :] for k in resources if k.startswith(prefix))
    return found[0] if found else None


def _speed(resources: Mapping[str, float], fallback: float | None, node_id: str, what: str) -> float:
    declared = resources.get(SPEED_RESOURCE)
    if declared:
        return declared / SPEED_SCALE
    if fallback is None:
        raise InventoryError(f"node {node_id}: {what} has no speed: declare the {SPEED_RESOURCE!r} resource")
    return fallback


def _node_devices(
    node: Mapping[str, Any],
    *,
    cpu_slot_memory_bytes: int | None,
    cpu_speed: float | None,
    accelerators: Mapping[str, AcceleratorSpec],
) -> list[DeviceSpec]:
    node_id = str(node["NodeID"])
    resources: Mapping[str, float] = node.get("Resources") or {}
    labels: Mapping[str, str] = node.get("Labels") or {}
    short = node_id[:8]
    devices: list[DeviceSpec] = []

    gpus = int(math.floor(resources.get("GPU", 0.0)))
    if gpus:
        accel = _accelerator_type(resources, labels)
        spec = accelerators.get(accel) if accel else None
        mem_gib = resources.get(GPU_MEMORY_RESOURCE) or (spec.memory_gib if spec else None)
        if not mem_gib:
            raise InventoryError(
                f"node {node_id}: {gpus} GPU(s) of unknown type {accel!r}: declare the {GPU_MEMORY_RESOURCE!r} resource"
            )
        speed = _speed(resources, spec.speed if spec else None, node_id, f"GPU type {accel!r}")
        for i in range(gpus):
            devices.append(
                DeviceSpec(
                    device_id=f"{short}/gpu{i}",
                    node_id=node_id,
                    kind="gpu",
                    accelerator_type=accel,
                    memory_bytes=int(mem_gib * GIB),
                    speed=speed,
                )
            )

    if resources.get(CPU_TIER_RESOURCE, 0.0) >= 1:
        mem_gib = resources.get(CPU_TIER_MEMORY_RESOURCE)
        memory_bytes = int(mem_gib * GIB) if mem_gib else cpu_slot_memory_bytes
        if not memory_bytes:
            raise InventoryError(
                f"node {node_id}: CPU-tier node without {CPU_TIER_MEMORY_RESOURCE!r}; "
                "declare it or pass cpu_slot_memory_bytes"
            )
        devices.append(
            DeviceSpec(
                device_id=f"{short}/cpu0",
                node_id=node_id,
                kind="cpu",
                memory_bytes=memory_bytes,
                speed=_speed(resources, cpu_speed, node_id, "the CPU tier"),
            )
        )
    return devices


def inventory_from_nodes(
    nodes: Iterable[Mapping[str, Any]],
    *,
    cpu_slot_memory_bytes: int | None = None,
    cpu_speed: float | None = CPU_TIER_SPEED,
    accelerators: Mapping[str, AcceleratorSpec] = ACCELERATORS,
    strict: bool = True,
) -> Inventory:
    """The devices of the live nodes, from ``ray.nodes()`` entries.

    Args:
        nodes: dicts as Ray 2.60's ``ray.nodes()`` returns them; read are
            ``NodeID`` (hex str), ``Alive`` (bool), ``Resources`` (name -> total,
            floats; ``{}`` for dead nodes) and ``Labels`` (str -> str).
        cpu_slot_memory_bytes: memory of a CPU-tier slot whose node does not
            declare ``moefleet_cpu_tier_memory_gb``; None makes that an error.
        cpu_speed: speed of a CPU-tier slot whose node does not declare
            ``moefleet_speed``; None makes that an error.
        accelerators: known accelerator types (GPU memory and speed of a GPU
            node that does not declare them).
        strict: raise ``InventoryError`` for a live node that cannot be read
            (unknown GPU type without declarations, ...); False skips it with a
            warning in the log.

    One device per GPU (``"<node_id[:8]>/gpu<i>"``, ``memory_bytes`` = the GPU's
    whole memory: the planner keeps its headroom) and one per CPU-tier node
    (``"<node_id[:8]>/cpu0"``). Dead nodes are skipped; a node with neither GPUs
    nor the CPU-tier resource (normally the head) brings no device. Devices come
    in node id order, GPUs before the CPU slot.
    """
    devices: list[DeviceSpec] = []
    for node in sorted(nodes, key=lambda n: str(n.get("NodeID", ""))):
        if not node.get("Alive", False):
            continue
        try:
            devices += _node_devices(
                node, cpu_slot_memory_bytes=cpu_slot_memory_bytes, cpu_speed=cpu_speed, accelerators=accelerators
            )
        except InventoryError as e:
            if strict:
                raise
            log.warning("inventory: skipping node: %s", e)
    return Inventory(devices=devices)


def worker_resources(device: DeviceSpec) -> dict[str, Any]:
    """Ray actor options that reserve ``device`` for one ExpertGroup worker (pin the node separately,
    with ``NodeAffinitySchedulingStrategy(device.node_id, soft=False)``)."""
    if device.kind == "gpu":
        return {"num_gpus": 1}
    return {"num_gpus": 0, "resources": {CPU_TIER_RESOURCE: 1}}


# -- The fleet's own workers as devices --------------------------------------------------------
# FLEET_DEVICES_RECORD (moefleet.core.placement): the workers a deployment started, which the controller counts as devices


def fleet_cpu_memory_bytes(total_expert_bytes: int, expert_bytes: int, num_workers: int,
                           node_memory_bytes: float | None = None, workers_on_node: int = 1) -> int:
    """Memory for expert weights of a CPU worker a deployment started (not on a CPU-tier slot).

    Room for every expert twice over the fleet's CPU workers (as local mode gives its workers:
    replicas, or a dead worker's experts on the survivors), at most the node's Ray ``memory``
    divided among the fleet's workers on it, and never less than the worker's share of one copy
    of every expert (what the starting placement gives it).
    """
    n = max(1, num_workers)
    twice = int(2 * total_expert_bytes / max(n - 1, 1) / 0.9) + expert_bytes
    share = int(total_expert_bytes / n / 0.9) + 2 * expert_bytes
    memory = max(twice, 4 * expert_bytes)
    if node_memory_bytes:
        memory = min(memory, int(node_memory_bytes / max(1, workers_on_node)))
    return max(memory, share)


def _fleet_device(device_id: str, entry: Mapping[str, Any], node: Mapping[str, Any] | None, cpu_memory_bytes: int,
                  accelerators: Mapping[str, AcceleratorSpec]) -> DeviceSpec:
    resources: Mapping[str, float] = (node or {}).get("Resources") or {}
    labels: Mapping[str, str] = (node or {}).get("Labels") or {}
    node_id = str(entry.get("node_id") or (node or {}).get("NodeID") or "")
    reported = entry.get("accelerator") or {}
    if float(entry.get("num_gpus") or 0) >= 1:
        accel = _accelerator_type(resources, labels) or reported.get("name")
        spec = accelerators.get(accel) if accel else None
        mem_gib = resources.get(GPU_MEMORY_RESOURCE) or (spec.memory_gib if spec else None)
        memory = int(mem_gib * GIB) if mem_gib else int(reported.get("memory_bytes") or 0)
        if memory <= 0:
            raise InventoryError(f"worker {device_id}: a GPU of unknown type {accel!r} and unknown memory: "
                                 f"declare the {GPU_MEMORY_RESOURCE!r} resource on node {node_id}")
        declared = resources.get(SPEED_RESOURCE)
        speed = declared / SPEED_SCALE if declared else (spec.speed if spec else 1.0)
        return DeviceSpec(device_id=device_id, node_id=node_id, kind="gpu", accelerator_type=accel, memory_bytes=memory,
                          speed=speed)
    on_tier_slot = float((entry.get("resources") or {}).get(CPU_TIER_RESOURCE, 0)) >= 1
    tier_gib = resources.get(CPU_TIER_MEMORY_RESOURCE) if on_tier_slot else None
    declared = resources.get(SPEED_RESOURCE) if on_tier_slot else None
    return DeviceSpec(device_id=device_id, node_id=node_id, kind="cpu",
                      memory_bytes=int(tier_gib * GIB) if tier_gib else int(cpu_memory_bytes),
                      speed=declared / SPEED_SCALE if declared else CPU_TIER_SPEED)


def cluster_inventory(
    nodes: Iterable[Mapping[str, Any]],
    fleet_devices: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    total_expert_bytes: int = 0,
    expert_bytes: int = 1,
    accelerators: Mapping[str, AcceleratorSpec] = ACCELERATORS,
    strict: bool = False,
) -> Inventory:
    """The devices of a cluster: its nodes' (``inventory_from_nodes``) and the fleet's own workers'.

    ``fleet_devices``: the ``FLEET_DEVICES_RECORD`` entries by device id. Each is a device: a GPU
    worker as its node's GPU type (memory and speed as the node declares them or the accelerator
    table gives them), a CPU worker as a CPU-tier device whose memory is its CPU-tier slot's when
    it reserved one, else ``fleet_cpu_memory_bytes`` (from ``total_expert_bytes``, the bytes of one
    replica of every expert, and ``expert_bytes``, of one). A node slot a fleet worker holds (a GPU,
    the CPU-tier slot) is not a second device. Fleet devices come first, in id order.
    """
    nodes = list(nodes)
    fleet_devices = dict(fleet_devices or {})
    by_node = {str(n.get("NodeID")): n for n in nodes if n.get("Alive", False)}
    cpu_workers = [d for d, e in fleet_devices.items() if float(e.get("num_gpus") or 0) < 1]
    devices: list[DeviceSpec] = []
    gpus_held: dict[str, int] = {}
    tier_held: set[str] = set()
    for device_id in sorted(fleet_devices):
        entry = fleet_devices[device_id]
        node_id = str(entry.get("node_id") or "")
        node = by_node.get(node_id)
        on_node = sum(1 for d in cpu_workers if str(fleet_devices[d].get("node_id") or "") == node_id)
        node_memory = ((node or {}).get("Resources") or {}).get("memory")
        cpu_memory = fleet_cpu_memory_bytes(total_expert_bytes, expert_bytes, len(cpu_workers), node_memory, on_node)
        try:
            devices.append(_fleet_device(device_id, entry, node, cpu_memory, accelerators))
        except InventoryError as e:
            if strict:
                raise
            log.warning("inventory: skipping a fleet worker: %s", e)
            continue
        if float(entry.get("num_gpus") or 0) >= 1:
            gpus_held[node_id] = gpus_held.get(node_id, 0) + int(float(entry["num_gpus"]))
        if float((entry.get("resources") or {}).get(CPU_TIER_RESOURCE, 0)) >= 1:
            tier_held.add(node_id)
    held_ids: set[str] = set()
    node_devices = inventory_from_nodes(nodes, accelerators=accelerators, strict=strict).devices
    for node_id, count in gpus_held.items():
        gpus = [d for d in node_devices if d.node_id == node_id and d.kind == "gpu"]
        held_ids |= {d.device_id for d in gpus[len(gpus) - min(count, len(gpus)):]}
    held_ids |= {d.device_id for d in node_devices if d.node_id in tier_held and d.kind == "cpu"}
    taken = {d.device_id for d in devices}
    devices += [d for d in node_devices if d.device_id not in held_ids and d.device_id not in taken]
    return Inventory(devices=devices)


def fleet_worker_options(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What a fresh worker for a fleet device reserves (as the deployment started it): num_cpus, num_gpus,
    resources, and its node (a hint: a worker whose node is gone starts where Ray finds room)."""
    return {"num_cpus": float(entry.get("num_cpus") or 0), "num_gpus": float(entry.get("num_gpus") or 0),
            "resources": dict(entry.get("resources") or {}), "node_id": entry.get("node_id") or None}
