"""What one control step decides, pure: the active devices, then the plan. No Ray, no Redis, no clock.

``Controller.step`` (``main.py``) reads its inputs from Redis and Ray, calls
``decide`` and hands the plan to the reconciler; the fleet simulator
(``controller/sim/``) calls the same function with simulated inputs, so both
make the same decision from the same inputs:

1. autoscaling (when ``config.autoscaling`` is set): the number of active
   devices follows the workers' queue depth (``autoscale.autoscale_step``);
   the active devices are the first ``desired`` of the live ones;
2. planning: skipped when no device is live, or when the load window saw
   fewer than ``config.min_tokens`` tokens, a placement exists, no worker is
   down and every expert has the replicas ``min_replicas`` comes to (a fleet
   below that floor is repaired before any traffic arrives); otherwise
   ``planner.plan`` from the load (all ones when nothing
   was measured yet, so a repair after a fresh start treats experts alike),
   the active devices and the current placement. Whether the plan is applied
   is the plan's ``apply`` (gain at least ``min_gain``, or a repair).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moefleet.core.placement import DeviceSpec, Inventory, Placement

from .autoscale import autoscale_step
from .planner import Plan, min_replicas, plan

if TYPE_CHECKING:
    from .main import ControllerConfig

__all__ = ["Decision", "decide"]


@dataclass
class Decision:
    """The outcome of one control step.

    report: what the step saw and decided (stored with the controller's record
        and emitted as a ``plan`` event): ``at``, ``placement_version``,
        ``active_devices`` (with autoscaling), ``tokens``, then either
        ``skipped`` or the plan's ``balancedness_before/after``, ``gain``,
        ``copies``, ``apply``, ``repaired``.
    record: the controller's record to store (a new dict; the input is not
        modified): ``active_devices`` and ``autoscale_state`` with autoscaling.
    plan: the plan, or None when planning was skipped.
    devices: the active devices the plan was made for.
    """

    report: dict[str, Any]
    record: dict[str, Any]
    plan: Plan | None
    devices: list[DeviceSpec]


def _memory_floor(devices: Sequence[DeviceSpec], load, expert_bytes, headroom: float) -> int:
    """Fewest of ``devices`` (in order) whose memory holds every expert once: autoscaling never goes below it."""
    need = float(np.sum(np.broadcast_to(np.asarray(expert_bytes, dtype=float), np.shape(load))))
    have = 0.0
    for i, d in enumerate(devices, 1):
        have += d.memory_bytes * (1.0 - headroom)
        if have >= need:
            return i
    return len(devices)


def _below_floor(current: Placement, devices, config, expert_bytes, shape, layers) -> bool:
    """Whether some expert of ``current`` has fewer replicas than ``min_replicas`` comes to on ``devices``."""
    floor = min_replicas(Inventory(devices=list(devices)), config.planner, expert_bytes=expert_bytes, shape=shape)["replicas"]
    if floor <= 1:
        return False
    live = {d.device_id for d in devices}
    counts = {}
    for device, keys in current.assignments.items():
        if device in live:
            for k in keys:
                counts[tuple(k)] = counts.get(tuple(k), 0) + 1
    want = {(int(layer), e) for layer in layers for e in range(shape[1])}
    return any(counts.get(k, 0) < floor for k in want)


def decide(
    config: ControllerConfig,
    record: Mapping[str, Any],
    devices: Sequence[DeviceSpec],
    current: Placement,
    load: np.ndarray,
    queue_depths: Mapping[str, float] | None,
    now: float,
    *,
    expert_bytes,
    layers: Sequence[int],
    down: Collection[str] = (),
) -> Decision:
    """One control step's decision.

    Args:
        config: the controller's settings (``autoscaling``, ``min_tokens``, ``planner``).
        record: the controller's stored record (``{}`` at first).
        devices: the live devices (the inventory's, less those down or restarting), in inventory order.
        current: the placement in force.
        load: ``[L, E]`` decayed token counts; row ``i`` is layer ``layers[i]``.
        queue_depths: device id -> in-flight calls, read only with autoscaling
            (None otherwise).
        now: the controller's clock, seconds.
        expert_bytes: weight bytes of one replica (number or ``[L, E]``).
        layers: the model layer of each load row.
        down: device ids of workers found down (planning then repairs even on little load).
    """
    record = dict(record)
    active = list(devices)
    report: dict[str, Any] = {"at": now, "placement_version": current.version}
    if config.autoscaling is not None:
        count = int(record.get("active_devices") or len(current.assignments) or len(active))
        desired, policy_state = autoscale_step(
            config.autoscaling, queue_depths or {}, count, record.get("autoscale_state"), now
        )
        desired = max(1, _memory_floor(active, load, expert_bytes, config.planner.headroom), min(desired, len(active)))
        desired = min(desired, len(active))
        record["active_devices"], record["autoscale_state"] = desired, policy_state
        report["active_devices"] = desired
        active = active[:desired]
    load = np.asarray(load, dtype=float)
    report["tokens"] = float(load.sum())
    result: Plan | None = None
    if not active:
        report["skipped"] = "no live device"
    elif load.sum() < config.min_tokens and current.version > 0 and not down and not _below_floor(
        current, active, config, expert_bytes, load.shape, layers
    ):
        report["skipped"] = "too little load to plan from"
    else:
        if load.sum() == 0:
            load = np.ones_like(load)  # nothing measured yet (a repair after a fresh start): treat experts alike
        result = plan(load, Inventory(devices=active), current, config.planner, expert_bytes=expert_bytes, layers=layers)
        report.update(
            balancedness_before=result.balancedness_before, balancedness_after=result.balancedness_after,
            gain=result.gain, copies=result.copies, apply=result.apply, repaired=result.repaired,
        )
    return Decision(report=report, record=record, plan=result, devices=active)
