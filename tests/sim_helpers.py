"""Small simulated fleets with round numbers, for the simulator's tests."""

from __future__ import annotations

import numpy as np

from moefleet.controller.sim import SimDevice
from moefleet.core.placement import DeviceSpec
from moefleet.core.trace import Trace

EXPERT_BYTES = 1000
HEADROOM = 0.1  # PlannerKnobs().headroom


def devices(n: int, slots: int, *, speed: float = 1.0, row_s: float = 1e-4, floor_s: float = 0.0,
            overhead_s: float = 0.0, copy_bytes_per_s: float = 1e9, prefix: str = "d") -> list[SimDevice]:
    """``n`` equal devices, each with room for ``slots`` experts of EXPERT_BYTES after the planner's headroom."""
    memory = int(np.ceil(slots * EXPERT_BYTES / (1 - HEADROOM))) + 1
    return [
        SimDevice(
            spec=DeviceSpec(device_id=f"{prefix}{i}", node_id=f"n{i}", kind="gpu", memory_bytes=memory, speed=speed),
            type_name=prefix, row_s=row_s, floor_s=floor_s, act_row_s=0.0, overhead_s=overhead_s,
            copy_bytes_per_s=copy_bytes_per_s,
        )
        for i in range(n)
    ]


def steady_trace(counts: list[int], calls_per_s: float, duration_s: float, layers: int = 1) -> Trace:
    """Evenly spaced calls with the same counts, layers in turn."""
    t = np.arange(0.0, duration_s, 1.0 / calls_per_s)
    return Trace(t=t, layer=np.arange(len(t)) % layers, counts=np.tile(np.asarray(counts), (len(t), 1)))
