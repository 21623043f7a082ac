"""Placement vocabulary shared by routers, workers and the controller.

Glossary
--------
logical expert
    One ``(layer, expert)`` pair of the model: ``ExpertKey``. A model with L MoE
    layers of E routed experts has ``L * E`` logical experts.
device
    One slot that runs one ``ExpertGroup`` worker: a GPU, or a share of a
    CPU-only node for cold experts (``DeviceSpec``). Devices have memory for
    expert weights and a relative speed.
replica (physical expert)
    One copy of a logical expert's weights on one device. Every logical expert
    has at least one replica; hot ones have more (redundant experts).
placement
    Which device holds which replicas (``Placement``), versioned so routers can
    follow changes. Worked example: 2 layers x 8 experts = 16 logical experts on
    4 devices with room for 5 experts each gives 20 physical slots, so 4
    redundant replicas go to the 4 hottest experts.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .emulation import EmulatedDevice

ExpertKey = tuple[int, int]
"""A logical expert: ``(layer index, expert index)``."""

DeviceId = str
"""A device (worker slot) id, unique in the fleet, e.g. ``"node-1/gpu0"``."""

WORKER_PREFIX = "moefleet-worker:"
"""Workers are named Ray actors ``moefleet-worker:<device id>`` in the fleet's namespace."""


def worker_actor_name(device_id: DeviceId) -> str:
    return WORKER_PREFIX + device_id


FLEET_DEVICES_RECORD = "fleet_devices"
"""Store record of the workers a deployment started where Ray placed them (the Serve application's
starting workers): ``{"devices": {device_id: entry}}``, each entry ``node_id`` (the Ray node it runs
on), ``num_cpus``, ``num_gpus``, ``resources`` (what it reserves) and ``accelerator`` (the worker's
own ``{"name", "memory_bytes"}``). The controller counts each as a device of its inventory
(``controller.inventory.cluster_inventory``) and restarts it as it was started."""


class DeviceSpec(BaseModel):
    """One device that can host an ``ExpertGroup`` worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: DeviceId = Field(description="Unique id of the device, e.g. 'node-1/gpu0'.")
    node_id: str = Field(description="Id of the node (machine) the device is on.")
    kind: Literal["gpu", "cpu"] = Field(description="'gpu' for an accelerator, 'cpu' for a CPU-tier worker.")
    accelerator_type: str | None = Field(
        default=None, description="Accelerator model as Ray names it ('H100', 'L4'); None for CPU workers."
    )
    memory_bytes: int = Field(gt=0, description="Memory available for expert weights on this device, in bytes.")
    speed: float = Field(
        default=1.0, gt=0, description="Relative expert throughput (tokens/s) against a reference device of 1.0."
    )
    cpus: tuple[int, ...] | None = Field(
        default=None,
        description="Local mode: the CPU cores this device's worker owns (pinned, as many torch threads); None on GPU "
        "nodes and Ray-scheduled CPU workers.",
    )
    emulated: EmulatedDevice | None = Field(
        default=None,
        description="An emulated device (``--emulate``): its worker computes on this machine's CPU, owns no cores, and "
        "takes the modelled device's time per call.",
    )


class Inventory(BaseModel):
    """The devices the fleet may place experts on."""

    model_config = ConfigDict(extra="forbid")

    devices: list[DeviceSpec] = Field(default_factory=list)

    @field_validator("devices")
    @classmethod
    def _unique_ids(cls, devices: list[DeviceSpec]) -> list[DeviceSpec]:
        seen: set[str] = set()
        for d in devices:
            if d.device_id in seen:
                raise ValueError(f"devices: duplicate device_id {d.device_id!r}")
            seen.add(d.device_id)
        return devices

    def by_id(self) -> dict[DeviceId, DeviceSpec]:
        return {d.device_id: d for d in self.devices}


class Placement(BaseModel):
    """Versioned map of devices to the logical experts they hold a replica of."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(default=0, ge=0, description="Monotonic version within a generation; routers follow the highest.")
    generation: str = Field(
        default="", description="Id of the placement table this version belongs to (a reset table starts a new one)."
    )
    assignments: dict[DeviceId, list[ExpertKey]] = Field(
        default_factory=dict, description="Device id -> (layer, expert) pairs it holds, one replica each."
    )
    speeds: dict[DeviceId, float] = Field(
        default_factory=dict,
        description="Relative speed of each device as the planner assumed it; routers split an expert's rows among "
        "its replicas in proportion (absent: 1.0).",
    )

    def speed(self, device_id: DeviceId) -> float:
        return float(self.speeds.get(device_id, 1.0))

    def newer_than(self, other: "Placement") -> bool:
        """Whether a holder of ``other`` should switch to this one: a later version, or another generation."""
        return self.generation != other.generation or self.version > other.version

    def replicas(self) -> dict[ExpertKey, list[DeviceId]]:
        """Logical expert -> devices holding a replica, devices in sorted order."""
        out: dict[ExpertKey, list[DeviceId]] = {}
        for device_id in sorted(self.assignments):
            for key in self.assignments[device_id]:
                out.setdefault((int(key[0]), int(key[1])), []).append(device_id)
        return out

    def experts(self) -> set[ExpertKey]:
        """All logical experts that have at least one replica."""
        return {(int(k[0]), int(k[1])) for keys in self.assignments.values() for k in keys}


def spread_placement(layers: list[int], num_experts: int, device_ids: list[DeviceId], version: int = 1) -> Placement:
    """Each layer's experts in contiguous blocks over the devices, one replica each (a starting placement)."""
    if not device_ids:
        raise ValueError("device_ids: at least one device is needed")
    n = len(device_ids)
    assignments: dict[DeviceId, list[ExpertKey]] = {d: [] for d in device_ids}
    for layer in layers:
        for e in range(num_experts):
            assignments[device_ids[e * n // num_experts]].append((layer, e))
    return Placement(version=version, assignments=assignments)


def proportional_placement(
    layers: list[int], num_experts: int, devices: list[DeviceSpec], expert_bytes: int, *, fill: float = 0.9, version: int = 1
) -> Placement:
    """Each layer's experts in contiguous blocks over the devices, one replica each, a device's share of every layer
    in proportion to its speed but within ``fill`` of its memory (a starting placement for a heterogeneous fleet:
    a slow device with little memory gets fewer experts). Raises ``ValueError`` when the devices cannot hold one
    copy of every expert."""
    if not devices:
        raise ValueError("devices: at least one device is needed")
    total = len(layers) * num_experts
    cap = [max(0.0, fill * d.memory_bytes / expert_bytes / total) for d in devices]  # most of a layer each may hold
    if sum(cap) < 1.0:
        raise ValueError(f"devices: {len(devices)} devices hold {sum(cap) * total:.0f} of {total} experts at {fill:.0%} "
                         "of their memory")
    share = [0.0] * len(devices)
    free = list(range(len(devices)))
    left = 1.0
    while free and left > 1e-12:  # water-filling: speed-proportional, capped by memory, the rest to the others
        speed = sum(devices[i].speed for i in free)
        over = [i for i in free if share[i] + left * devices[i].speed / speed > cap[i]]
        if not over:
            for i in free:
                share[i] += left * devices[i].speed / speed
            left = 0.0
            break
        for i in over:
            left -= cap[i] - share[i]
            share[i] = cap[i]
        free = [i for i in free if i not in over]
    cum = [0.0]
    for sh in share:
        cum.append(cum[-1] + sh)
    assignments: dict[DeviceId, list[ExpertKey]] = {d.device_id: [] for d in devices}
    for j, layer in enumerate(layers):
        # a layer's block edges rounded with a phase that moves from layer to layer, so that rounding averages out
        # over the layers (each device holds its share of the whole table, within an expert or two)
        phase = (j * 0.6180339887) % 1.0
        bounds = [min(num_experts, max(0, math.floor(c * num_experts + phase))) for c in cum]
        bounds[0], bounds[-1] = 0, num_experts
        for i, d in enumerate(devices):
            assignments[d.device_id].extend((layer, e) for e in range(bounds[i], bounds[i + 1]))
    return Placement(version=version, assignments=assignments)


def expert_runs(keys) -> dict[str, list[list[int]]]:
    """Experts as runs per layer, ``{"layer": [[first, stop), ...]}``: what a worker's heartbeat lists (held experts
    come in blocks, so a DeepSeek-V3 device's hundreds of experts take a few dozen runs)."""
    by_layer: dict[int, list[int]] = {}
    for layer, e in keys:
        by_layer.setdefault(int(layer), []).append(int(e))
    out: dict[str, list[list[int]]] = {}
    for layer in sorted(by_layer):
        runs: list[list[int]] = []
        for e in sorted(set(by_layer[layer])):
            if runs and runs[-1][1] == e:
                runs[-1][1] = e + 1
            else:
                runs.append([e, e + 1])
        out[str(layer)] = runs
    return out


def held_experts(info: dict) -> list[ExpertKey] | None:
    """The experts a worker's heartbeat says it holds (``expert_runs``, or a list of pairs ``experts``); None when
    it says nothing of them."""
    if "expert_runs" in info:
        return [(int(layer), e) for layer, runs in info["expert_runs"].items() for a, b in runs for e in range(int(a), int(b))]
    if "experts" in info:
        return [(int(k[0]), int(k[1])) for k in info["experts"]]
    return None


def assign_cores(num_workers: int, cores: list[int]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Disjoint cores for each local worker, and the cores left for routers and the controller.

    Each worker gets ``len(cores) // num_workers`` cores (at least one), in
    order. With more workers than cores, workers share cores round-robin (then
    they no longer own a device: imbalance costs less than on GPUs). What no
    worker owns is left to the rest of the fleet; when every core is owned, the
    routers and the controller run on all of them.

    >>> assign_cores(2, [0, 1, 2, 3, 4])
    ([(0, 1), (2, 3)], (4,))
    >>> assign_cores(3, [0, 1])
    ([(0,), (1,), (0,)], (0, 1))
    """
    if num_workers < 1:
        raise ValueError(f"num_workers: must be >= 1, got {num_workers}")
    if not cores:
        raise ValueError("cores: no CPU cores to assign")
    if num_workers > len(cores):
        return [(cores[i % len(cores)],) for i in range(num_workers)], tuple(cores)
    each = len(cores) // num_workers
    owned = [tuple(cores[i * each : (i + 1) * each]) for i in range(num_workers)]
    rest = tuple(cores[num_workers * each :])
    return owned, rest or tuple(cores)
