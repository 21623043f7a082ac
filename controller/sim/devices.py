"""Devices for the fleet simulator: spec-sheet figures per type, fleet strings, and each device's timing.

Device types
------------
Speed (dense BF16 tensor TFLOP/s relative to the H100 SXM) and memory come
from ``inventory.ACCELERATORS`` and ``inventory.CPU_TIER_SPEED`` -- the same
figures the controller's inventory uses -- so a simulated H100 is what the
controller would see. Added here, per device:

* ``network_gbps``: bandwidth to other nodes (one device's share of its
  node's NIC), from the cloud instance the node type names;
* ``memory_bw_gbs``: HBM (or DRAM) bandwidth, which bounds how fast an
  expert's weights can be read once per call.

All overridable per fleet entry: ``"h100:16,l4:16:network_gbps=25"``.

Timing of one device (``SimDevice``)
------------------------------------
For an expert of ``ExpertShape`` (hidden ``H``, intermediate ``F``, gated or
not, bytes per weight), at ``efficiency`` (fraction of the tensor-core peak
an expert GEMM reaches):

* compute per row (one token at one expert): ``flops_per_row / (speed x
  989.4 TFLOP/s x efficiency)``;
* weight floor per expert per call: ``weight_bytes / memory_bw`` (a call
  that gives an expert few rows still reads all its weights);
* activations over the path the product takes to the device
  (``moefleet.core.cost_model``, the function the router counts its bytes
  with): a device on the router's node reads the call's batch in place
  (shared memory / CUDA IPC, nothing moves); a device on another node gets
  only its tokens' rows and returns a partial row per token: ``2 H x bytes``
  per token over its network link (``act_row_s``, per token). The rows arrive
  before the device computes and the partials leave after, so they add to the
  call's latency, not to the device's busy time (its NIC is not its compute);
  at large batches a device's throughput is the slower of the two;
* a weight copy (rebalance) costs ``weight_bytes / network`` on the
  receiving device.

The planner's ``DeviceSpec.speed`` is by default the device's *measured*
speed under this model (its rows/s over an H100's for the same expert), what
an operator declares with ``moefleet_speed`` after measuring; ``"spec"``
gives the spec-sheet ratio instead (what the inventory assumes when nothing
is declared).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from moefleet.core.emulation import device_service_s
from moefleet.core.placement import DeviceSpec

from ..inventory import ACCELERATORS, CPU_TIER_SPEED, GIB, NODE_TYPES, REFERENCE_BF16_TFLOPS, SPEED_SCALE

__all__ = [
    "DEVICE_TYPES",
    "returned_rows",
    "MODEL_SHAPES",
    "DeviceType",
    "ExpertShape",
    "FleetError",
    "FleetEntry",
    "SimDevice",
    "fleet_devices",
    "emulated_specs",
    "parse_fleet",
]


class FleetError(ValueError):
    """A fleet description that cannot be read; the message names the entry and field."""


@dataclass(frozen=True)
class DeviceType:
    """One kind of device: what it computes, holds and moves.

    speed: relative dense BF16 throughput (H100 SXM = 1.0); memory_gib: memory
    for expert weights; network_gbps: Gbit/s to other nodes per device;
    memory_bw_gbs: GB/s of device memory bandwidth; per_node: devices per node.
    """

    name: str
    kind: Literal["gpu", "cpu"]
    accelerator_type: str | None
    speed: float
    memory_gib: float
    network_gbps: float
    memory_bw_gbs: float
    per_node: int
    source: str

    def with_overrides(self, fields: Mapping[str, float]) -> DeviceType:
        return replace(self, **dict(fields))


def _gpu(name: str, accelerator: str, network_gbps: float, memory_bw_gbs: float, per_node: int, source: str) -> DeviceType:
    spec = ACCELERATORS[accelerator]
    return DeviceType(
        name=name, kind="gpu", accelerator_type=accelerator, speed=spec.speed, memory_gib=spec.memory_gib,
        network_gbps=network_gbps, memory_bw_gbs=memory_bw_gbs, per_node=per_node, source=source,
    )


DEVICE_TYPES: dict[str, DeviceType] = {
    t.name: t
    for t in (
        _gpu("h100", "H100", 400, 3350, 8,
             "H100 SXM: 3.35 TB/s HBM3; p5.48xlarge / a3-highgpu-8g: 3,200 Gbps for 8 GPUs"),
        _gpu("h200", "H200", 400, 4800, 8,
             "H200 SXM: 4.8 TB/s HBM3e; p5e.48xlarge: 3,200 Gbps for 8 GPUs"),
        _gpu("a100", "A100", 50, 1555, 8,
             "A100 40GB SXM: 1,555 GB/s HBM2; p4d.24xlarge: 400 Gbps for 8 GPUs"),
        _gpu("a100-80g", "A100-80G", 50, 2039, 8,
             "A100 80GB SXM: 2,039 GB/s HBM2e; p4de.24xlarge: 400 Gbps for 8 GPUs"),
        _gpu("l40s", "L40S", 20, 864, 1, "L40S: 864 GB/s GDDR6; g6e.2xlarge: up to 20 Gbps"),
        _gpu("l4", "L4", 10, 300, 1, "L4: 300 GB/s GDDR6; g6.2xlarge: up to 10 Gbps"),
        _gpu("a10g", "A10G", 10, 600, 1, "A10G: 600 GB/s GDDR6; g5.2xlarge: up to 10 Gbps"),
        DeviceType(
            name="cpu", kind="cpu", accelerator_type=None, speed=CPU_TIER_SPEED,
            memory_gib=float(NODE_TYPES["cpu"].cpu_tier_memory_gib), network_gbps=12.5, memory_bw_gbs=100, per_node=1,
            source="CPU tier (inventory 'cpu' node type): r7i.8xlarge, 12.5 Gbps; 100 GB/s DRAM assumed for 32 vCPUs",
        ),
    )
}

_OVERRIDABLE = {"speed": "speed", "memory_gib": "memory_gib", "network_gbps": "network_gbps", "memory_bw_gbs": "memory_bw_gbs"}


@dataclass(frozen=True)
class ExpertShape:
    """One routed expert: hidden ``H``, intermediate ``F``, gated (3 matrices) or not (2), bytes per weight."""

    hidden: int
    intermediate: int
    gated: bool = True
    dtype_bytes: int = 2
    moe_layers: int | None = None
    """MoE layers of the whole model (its experts share device memory); None: only the simulated ones."""

    def __post_init__(self):
        for name in ("hidden", "intermediate", "dtype_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.moe_layers is not None and self.moe_layers <= 0:
            raise ValueError(f"moe_layers: must be > 0, got {self.moe_layers}")

    @property
    def params(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.intermediate

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def flops_per_row(self) -> float:
        return 2.0 * self.params

    @property
    def activation_bytes_per_row(self) -> int:
        """Hidden state to the device and the partial output back."""
        return 2 * self.hidden * self.dtype_bytes


MODEL_SHAPES: dict[str, tuple[ExpertShape, int, int]] = {
    # name: (expert shape in bf16, routed experts, top-k) from each model's config.json
    "deepseek-v3": (ExpertShape(7168, 2048, moe_layers=58), 256, 8),
    "mixtral-8x7b": (ExpertShape(4096, 14336, moe_layers=32), 8, 2),
    "qwen2-57b-a14b": (ExpertShape(3584, 2560, moe_layers=28), 64, 8),
}
"""Expert shapes of public models: DeepSeek-V3 (H 7168, moe_intermediate 2048, 61 layers of which 58 MoE,
256 routed experts, top-8), Mixtral-8x7B (H 4096, F 14336, 32 layers, 8 experts, top-2), Qwen2-57B-A14B
(H 3584, moe_intermediate 2560, 28 layers, 64 experts, top-8)."""


@dataclass(frozen=True)
class SimDevice:
    """One simulated device: what the planner sees (``spec``) and how long its work takes.

    row_s: compute seconds per row (token at one expert); floor_s: least seconds
    per expert per call (its weights read once); act_row_s: network seconds per
    row of activations (0: none); overhead_s: fixed seconds per call;
    copy_bytes_per_s: bandwidth for weight copies into this device;
    out_row_s: seconds per output row the device returns (one per token it
    served, ``returned_rows``: allocating, summing over its experts and sending
    the partial outputs -- what a CPU worker pays; 0 for GPUs, where it hides
    under the compute).
    """

    spec: DeviceSpec
    type_name: str
    row_s: float
    floor_s: float
    act_row_s: float  # seconds per token of activations to and from the device (0: on the router's node)
    overhead_s: float
    copy_bytes_per_s: float
    out_row_s: float = 0.0

    @property
    def device_id(self) -> str:
        return self.spec.device_id

    @property
    def effective_row_s(self) -> float:
        """Seconds per row at large batches: compute and activation transfer overlap."""
        return max(self.row_s, self.act_row_s)

    def service_s(self, rows_per_expert) -> float:
        """Seconds this device is busy with one call that brings ``rows_per_expert`` (rows, one entry per expert)."""
        return device_service_s(rows_per_expert, self.row_s, self.floor_s, self.overhead_s, self.out_row_s)

    def transfer_s(self, rows_per_expert) -> tuple[float, float]:
        """(seconds for the call's rows to reach the device, seconds for its partials to come back)."""
        half = returned_rows(rows_per_expert) * self.act_row_s / 2
        return half, half


def returned_rows(rows_per_expert) -> int:
    """Output rows a device returns for one call: one per token it served, taken as its largest expert's rows.

    Exact when every token of the call picks the same experts and replicas split
    each expert's rows in token order (the router's ``plan_dispatch``): the hot-set
    traces of the local checks. A lower bound otherwise (tokens spread over the
    device's experts return up to the sum of their rows over top-k).
    """
    return max(rows_per_expert, default=0)


@dataclass(frozen=True)
class FleetEntry:
    """``count`` devices of ``device_type`` (after overrides)."""

    device_type: DeviceType
    count: int


def parse_fleet(text: str, types: Mapping[str, DeviceType] = DEVICE_TYPES) -> list[FleetEntry]:
    """``"h100:16,l4:16"`` -> entries; ``TYPE:COUNT[:field=value]...`` with fields speed, memory_gib,
    network_gbps, memory_bw_gbs. Raises ``FleetError`` naming the entry and field."""
    if not isinstance(text, str) or not text.strip():
        raise FleetError("fleet: empty; expected e.g. 'h100:16,l4:16'")
    entries = []
    seen = set()
    for item in text.split(","):
        item = item.strip()
        parts = item.split(":")
        if len(parts) < 2:
            raise FleetError(f"fleet: {item!r} needs TYPE:COUNT, e.g. 'h100:16'")
        name = parts[0].strip().lower()
        if name not in types:
            raise FleetError(f"fleet: unknown device type {parts[0]!r} in {item!r} (known: {', '.join(types)})")
        if name in seen:
            raise FleetError(f"fleet: device type {name!r} listed twice")
        seen.add(name)
        try:
            count = int(parts[1])
        except ValueError:
            raise FleetError(f"fleet: count in {item!r} must be an integer, got {parts[1]!r}") from None
        if count < 0:
            raise FleetError(f"fleet: count in {item!r} must be >= 0, got {count}")
        overrides: dict[str, float] = {}
        for field in parts[2:]:
            key, sep, value = field.partition("=")
            key = key.strip()
            if not sep or key not in _OVERRIDABLE:
                raise FleetError(f"fleet: {field!r} in {item!r} is not field=value with a field of {', '.join(_OVERRIDABLE)}")
            try:
                number = float(value)
            except ValueError:
                raise FleetError(f"fleet: {key} in {item!r} must be a number, got {value!r}") from None
            if not math.isfinite(number) or number <= 0:
                raise FleetError(f"fleet: {key} in {item!r} must be > 0, got {value!r}")
            overrides[_OVERRIDABLE[key]] = number
        entries.append(FleetEntry(types[name].with_overrides(overrides), count))
    if not any(e.count for e in entries):
        raise FleetError("fleet: no devices (every count is 0)")
    return entries


def format_fleet(entries: list[FleetEntry]) -> str:
    """Entries back to ``"h100:16,l4:16"`` (counts only)."""
    return ",".join(f"{e.device_type.name}:{e.count}" for e in entries)


def token_transfer_s(shape: ExpertShape, network_gbps: float) -> float:
    """Seconds one token's hidden state out and partial back take over a ``network_gbps`` link, with the bytes
    the cost model says a ``rows`` worker moves per token (``moefleet.core.cost_model.call_bytes``)."""
    from moefleet.core.cost_model import WorkerPart, call_bytes

    moved = call_bytes(1, shape.hidden, shape.dtype_bytes, shape.dtype_bytes, [WorkerPart("d", 1, 1, "rows")])
    return (moved.total_to + moved.total_from) / (network_gbps * 1e9 / 8)


def _timing(t: DeviceType, shape: ExpertShape, efficiency: float, remote_activations: bool) -> tuple[float, float, float]:
    row_s = shape.flops_per_row / (t.speed * REFERENCE_BF16_TFLOPS * 1e12 * efficiency)
    floor_s = shape.weight_bytes / (t.memory_bw_gbs * 1e9)
    act_row_s = token_transfer_s(shape, t.network_gbps) if remote_activations else 0.0
    return row_s, floor_s, act_row_s


def fleet_devices(
    entries: list[FleetEntry],
    shape: ExpertShape,
    *,
    simulated_layers: int,
    efficiency: float = 0.5,
    overhead_s: float = 50e-6,
    remote_activations: bool = True,
    planner_speed: Literal["measured", "spec"] = "measured",
) -> list[SimDevice]:
    """The devices of a fleet, in entry order, with timing for ``shape``.

    simulated_layers: MoE layers in the trace. When ``shape.moe_layers`` is
    set, each device offers the simulated layers ``simulated_layers /
    moe_layers`` of its memory (the model's other layers hold the rest).
    efficiency: fraction of the tensor-core peak an expert GEMM reaches.
    overhead_s: fixed cost of one call on a device (launch, dispatch).
    remote_activations: charge activation transfer over the network to devices on nodes other than the
        router's (the first entry's first node; devices there read the batch in place); False: none anywhere.
    The planner's measured speed counts the network of a remote device (its throughput bound).
    planner_speed: the ``DeviceSpec.speed`` the planner sees (see the module docstring).
    """
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency: must be in (0, 1], got {efficiency}")
    if simulated_layers <= 0:
        raise ValueError(f"simulated_layers: must be > 0, got {simulated_layers}")
    share = 1.0
    if shape.moe_layers is not None:
        share = min(1.0, simulated_layers / shape.moe_layers)
    ref_row, _, ref_act = _timing(DEVICE_TYPES["h100"], shape, efficiency, remote_activations)
    ref_effective = max(ref_row, ref_act)
    devices: list[SimDevice] = []
    router_node = None
    for entry in entries:
        t = entry.device_type
        row_s, floor_s, act_row_s = _timing(t, shape, efficiency, remote_activations)
        if planner_speed == "measured":
            speed = max(1, round(ref_effective / max(row_s, act_row_s) * SPEED_SCALE)) / SPEED_SCALE
        else:
            speed = t.speed
        for i in range(entry.count):
            node = f"{t.name}-node{i // t.per_node}"
            router_node = router_node or node  # the router runs on the fleet's first node
            spec = DeviceSpec(
                device_id=f"{t.name}-{i}", node_id=node, kind=t.kind, accelerator_type=t.accelerator_type,
                memory_bytes=max(1, int(t.memory_gib * GIB * share)), speed=speed,
            )
            devices.append(SimDevice(
                spec=spec, type_name=t.name, row_s=row_s, floor_s=floor_s, act_row_s=0.0 if node == router_node else act_row_s,
                overhead_s=overhead_s, copy_bytes_per_s=t.network_gbps * 1e9 / 8,
            ))
    return devices


def emulated_specs(
    text: str,
    shape: ExpertShape,
    *,
    simulated_layers: int,
    fleet_expert_bytes: int,
    slowdown: float = 1.0,
    efficiency: float = 0.5,
    overhead_s: float = 50e-6,
) -> list[DeviceSpec]:
    """The devices of ``--emulate TEXT`` as the controller sees them, each with its worker's emulation.

    Timing and memory as this module's ``fleet_devices`` gives the simulator for ``shape`` (every device on the
    router's machine: activations read in place). fleet_expert_bytes: one expert's bytes as the fleet's workers
    hold it; when the modelled shape is another (a tiny checkpoint timed as a real model), each device's memory is
    scaled by their ratio, so it holds as many of the fleet's experts as the real device would hold of the model's.
    """
    from moefleet.core.emulation import EmulatedDevice, parse_emulate

    parse_emulate(text)  # the stricter reading of a fleet string: counts >= 1, no field overrides
    if fleet_expert_bytes <= 0:
        raise ValueError(f"fleet_expert_bytes: must be > 0, got {fleet_expert_bytes}")
    devices = fleet_devices(parse_fleet(text), shape, simulated_layers=simulated_layers, efficiency=efficiency,
                            overhead_s=overhead_s, remote_activations=False)
    scale = fleet_expert_bytes / shape.weight_bytes
    out = []
    for d in devices:
        emu = EmulatedDevice(type_name=d.type_name, accelerator_type=d.spec.accelerator_type, row_s=d.row_s,
                             floor_s=d.floor_s, overhead_s=d.overhead_s, out_row_s=d.out_row_s, slowdown=slowdown)
        memory = max(fleet_expert_bytes, int(d.spec.memory_bytes * scale))
        out.append(d.spec.model_copy(update={"memory_bytes": memory, "emulated": emu}))
    return out
