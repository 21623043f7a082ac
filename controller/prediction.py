"""Predicted against measured: how balanced the fleet is after a rebalance, and what the controller learns from it. Pure.

After an applied plan the controller compares, over the next steps, the
balancedness the devices measured (rows each served per layer over its last
few seconds, from the workers' heartbeats) with what the planner's load model
predicts for the placement in force on the load the routers counted over the
same seconds. Both use the planner's definition (``planner/model.py``):
``sum over layers of the mean device time / sum over layers of the slowest``,
a device's time being its rows over its speed. The difference (measured minus
predicted) is the model's error: the router's split of a replicated expert,
noise, a device slower than declared -- not a change of load, which both
sides see alike.

A **miss** (``|error| > prediction_miss``) corrects the model: each device's
speed as the planner sees it is scaled by how much more (or less) of the load
it took than predicted (square root of the ratio, each factor kept within
[0.5, 2]), so the next plan places load on what the devices did. The cost of
a move is corrected from every rebalance: the measured seconds over the
predicted ones, smoothed (``update_cost_factor``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from moefleet.core.placement import DeviceSpec, Inventory, Placement

from .planner import predict

__all__ = ["apply_speed_factors", "compare", "measured_balancedness", "update_cost_factor", "update_speed_factors"]

SPEED_FACTOR_RANGE = (0.5, 2.0)
COST_FACTOR_RANGE = (0.1, 10.0)


def measured_balancedness(
    served: Mapping[str, Mapping[int, float]], devices: Sequence[DeviceSpec], layers: Sequence[int]
) -> float | None:
    """The planner's balancedness of rows served: per layer each device's rows over its speed; None with no rows."""
    if not devices:
        return None
    times = np.array([[float(served.get(d.device_id, {}).get(int(layer), 0.0)) / d.speed for d in devices]
                      for layer in layers])
    slowest = float(times.max(axis=1).sum())
    if slowest <= 0:
        return None
    return float(times.mean(axis=1).sum()) / slowest


def compare(
    served: Mapping[str, Mapping[int, float]],
    served_load: np.ndarray,
    devices: Sequence[DeviceSpec],
    placement: Placement,
    layers: Sequence[int],
) -> dict | None:
    """Measured and predicted balancedness of ``placement`` over one window, and each device's share of the rows.

    ``served``: device id -> layer -> rows the device served in the window;
    ``served_load``: ``[L, E]`` token counts the routers sent in the same
    window (row i is ``layers[i]``). ``devices``: the placement's devices.
    Returns None when either side saw nothing.
    """
    held = [d for d in devices if d.device_id in placement.assignments]
    measured = measured_balancedness(served, held, layers)
    if measured is None or float(np.sum(served_load)) <= 0:
        return None
    stats = predict(served_load, Inventory(devices=held), placement, layers=list(layers))
    predicted_rows = {d.device_id: stats.device_time.get(d.device_id, 0.0) * d.speed for d in held}
    measured_rows = {d.device_id: float(sum(served.get(d.device_id, {}).values())) for d in held}
    total_p, total_m = sum(predicted_rows.values()), sum(measured_rows.values())
    return {
        "measured": measured,
        "predicted": stats.balancedness,
        "predicted_share": {d: v / total_p for d, v in predicted_rows.items()} if total_p > 0 else {},
        "measured_share": {d: v / total_m for d, v in measured_rows.items()} if total_m > 0 else {},
    }


def update_speed_factors(factors: Mapping[str, float], predicted_share: Mapping[str, float],
                         measured_share: Mapping[str, float]) -> dict[str, float]:
    """Scale each device's factor by sqrt(measured share / predicted share), kept within ``SPEED_FACTOR_RANGE``."""
    lo, hi = SPEED_FACTOR_RANGE
    out = dict(factors)
    for d, p in predicted_share.items():
        m = measured_share.get(d, 0.0)
        if p <= 0 or m <= 0:
            continue
        out[d] = min(hi, max(lo, out.get(d, 1.0) * math.sqrt(m / p)))
    return out


def apply_speed_factors(devices: Sequence[DeviceSpec], factors: Mapping[str, float]) -> list[DeviceSpec]:
    """The devices with their speeds scaled by the learned factors (absent: 1)."""
    return [d if factors.get(d.device_id, 1.0) == 1.0 else d.model_copy(update={"speed": d.speed * factors[d.device_id]})
            for d in devices]


def update_cost_factor(factor: float, predicted_s: float, measured_s: float, weight: float = 0.5) -> float:
    """Smoothed measured/predicted seconds of rebalances (geometric mean step), kept within ``COST_FACTOR_RANGE``."""
    if not (predicted_s > 0 and measured_s > 0 and math.isfinite(measured_s)):
        return factor
    lo, hi = COST_FACTOR_RANGE
    return min(hi, max(lo, math.exp((1 - weight) * math.log(factor) + weight * math.log(measured_s / predicted_s))))
