"""What elastic placement is compared with, and the figures of the comparison at an SLO.

Baselines (``baseline_placement``), each planned once and kept for the whole run:

* ``first``: the planner's plan from the trace's first ``interval_s`` of load
  (the controller's first plan, never revisited);
* ``history``: the planner's plan from the first ``history_s`` seconds;
* ``eplb``: DeepSeek EPLB's ``rebalance_experts`` (``controller/eplb.py``, the
  entry vLLM and SGLang call) run once on the first ``history_s`` seconds, with
  as many slots as the memory elastic placement may use allows -- equal memory:
  a GPU holds ``capacity // (bytes x layers)`` slots per layer, ``capacity``
  being its memory less the planner's ``headroom``. EPLB gives every rank the
  same number of slots: on a homogeneous fleet a rank is a GPU; on a mixed one
  each GPU is cut into ranks of the largest size that still uses 90% of the
  slots (``eplb_slots``), so a larger GPU counts as several ranks and takes
  their share of the load. The global policy (one group, one node); two slots of one
  expert on one GPU (EPLB allows it) are one replica here, as they would serve
  as one. EPLB places on GPUs only and knows no device speeds.

The elastic run starts from the ``history`` plan: the same information the
baselines were planned on, so what differs is re-planning alone. Both are
measured on the trace after the history window (``after_history``): the
history is the past they were planned on, not part of the comparison.

Figures at an SLO (``capacity_at_slo``, ``slo_met_fraction``): the highest
load scale whose p99 call latency meets the SLO, times the trace's rate (the
fleet's sustainable tokens/s for this placement strategy), and the fraction of
timeline windows (``interval_s`` each) whose p99 latency meets it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from moefleet.core.placement import Inventory, Placement
from moefleet.core.trace import Trace

from ..eplb import rebalance_experts
from ..planner import PlanningError, plan
from .devices import SimDevice
from .engine import SimConfig, SimResult

__all__ = ["BASELINES", "baseline_placement", "capacity_at_slo", "compare_strategies", "eplb_placement", "eplb_slots",
           "slo_met_fraction"]

BASELINES = ("first", "history", "eplb")


def eplb_slots(slots_per_device: Sequence[int], keep: float = 0.9) -> int:
    """Slots per EPLB rank: the largest size whose ranks use at least ``keep`` of the devices' slots.

    On a homogeneous fleet it is every device's slot count (one rank per GPU, EPLB as deployed); on a mixed
    one a larger device is cut into several ranks of that size. Larger ranks let EPLB's packing balance
    within a GPU; smaller ones waste fewer slots.
    """
    total = sum(slots_per_device)
    for size in range(max(slots_per_device), 0, -1):
        if sum(size * (n // size) for n in slots_per_device) >= keep * total:
            return size
    return 1


def eplb_placement(load: np.ndarray, devices: Sequence[SimDevice], expert_bytes: float, headroom: float,
                   layers: Sequence[int]) -> Placement:
    """EPLB's placement of ``load [L, E]`` on the GPUs of ``devices`` at equal memory (module docstring)."""
    gpus = [d for d in devices if d.spec.kind == "gpu"]
    num_layers, num_experts = load.shape
    if not gpus:
        raise PlanningError("eplb: no GPU devices (EPLB places experts on GPUs only)")
    per_device = [int(d.spec.memory_bytes * (1.0 - headroom)) // int(math.ceil(expert_bytes * num_layers)) for d in gpus]
    size = eplb_slots(per_device) if max(per_device) > 0 else 0
    ranks = [] if size == 0 else [g for g, n in enumerate(per_device) for _ in range(n // size)]
    num_replicas = size * len(ranks)
    if num_replicas < num_experts:
        raise PlanningError(f"eplb: {len(gpus)} GPUs with {sum(per_device)} slots per layer ({len(ranks)} ranks of "
                            f"{size}) cannot hold {num_experts} experts once")
    phy2log, _, _ = rebalance_experts(torch.from_numpy(np.asarray(load, dtype=np.float64)), num_replicas, 1, 1,
                                      len(ranks))
    assignments: dict[str, set] = {}
    for row, layer in enumerate(layers):
        for slot, expert in enumerate(phy2log[row].tolist()):
            assignments.setdefault(gpus[ranks[slot // size]].device_id, set()).add((int(layer), int(expert)))
    speeds = {d.device_id: d.spec.speed for d in gpus if d.device_id in assignments}
    return Placement(version=1, assignments={d: sorted(k) for d, k in assignments.items()}, speeds=speeds)


def baseline_placement(kind: Literal["first", "history", "eplb"], trace: Trace, devices: Sequence[SimDevice],
                       expert_bytes: float, config: SimConfig, history_s: float) -> Placement:
    """The baseline's placement (module docstring). Raises ``PlanningError`` when memory cannot hold the model."""
    if kind not in BASELINES:
        raise ValueError(f"baseline: unknown {kind!r} (known: {', '.join(BASELINES)})")
    if not history_s > 0:
        raise ValueError(f"history_s: must be > 0, got {history_s}")
    t0 = float(trace.t[0])
    window = config.controller.interval_s if kind == "first" else history_s
    load = trace.load(t0, t0 + window) * config.load_scale
    if kind == "eplb":
        return eplb_placement(load, devices, expert_bytes, config.controller.planner.headroom, trace.layers)
    specs = [d.spec for d in devices]
    return plan(load, Inventory(devices=specs), Placement(), config.controller.planner, expert_bytes=expert_bytes,
                layers=trace.layers).target


def slo_met_fraction(result: SimResult, slo_ms: float) -> float | None:
    """Fraction of the timeline's windows (with calls) whose p99 call latency is at most ``slo_ms``."""
    p99 = [x for x in result.timeline.get("p99_latency_ms", []) if x is not None]
    return sum(x <= slo_ms for x in p99) / len(p99) if p99 else None


def capacity_at_slo(run: Callable[[float], SimResult], rate: float, slo_ms: float, *, hi: float = 64.0,
                    steps: int = 5) -> dict:
    """The highest load scale whose run meets ``p99 latency <= slo_ms``, and it times ``rate`` (tokens/s).

    ``run(scale)`` simulates the strategy at that load scale. Scales are
    bracketed by doubling from 1 (or halving) and then bisected ``steps``
    times; returns ``{"scale", "capacity_tokens_per_s", "runs"}`` (``scale``
    0 when even the smallest tried misses).
    """
    tried: dict[float, bool] = {}

    def meets(scale: float) -> bool:
        if scale not in tried:
            tried[scale] = run(scale).p99_latency_ms <= slo_ms
        return tried[scale]

    lo, up = 0.0, 1.0
    if meets(1.0):
        lo = 1.0
        while lo < hi and meets(lo * 2):
            lo *= 2
        up = lo * 2
    else:
        up = 1.0
        while up > 1 / hi and not meets(up / 2):
            up /= 2
        lo = up / 2 if meets(up / 2) else 0.0
    if lo > 0:
        for _ in range(steps):
            mid = (lo + up) / 2
            if meets(mid):
                lo = mid
            else:
                up = mid
    return {"scale": lo, "capacity_tokens_per_s": lo * rate, "runs": len(tried)}


def compare_strategies(
    trace: Trace,
    devices: Sequence[SimDevice],
    *,
    expert_bytes: float,
    config: SimConfig,
    baseline: Literal["first", "history", "eplb"] = "eplb",
    history_s: float = 30.0,
) -> dict[str, SimResult]:
    """``{"elastic": ..., "static": ...}``: elastic from the ``history`` plan, static kept on ``baseline``'s."""
    from .engine import simulate

    initial = baseline_placement("history", trace, devices, expert_bytes, config, history_s)
    static = initial if baseline == "history" else baseline_placement(baseline, trace, devices, expert_bytes, config,
                                                                     history_s)
    served = after_history(trace, history_s)
    return {
        "elastic": simulate(served, devices, expert_bytes=expert_bytes, config=config, elastic=True, initial=initial),
        "static": simulate(served, devices, expert_bytes=expert_bytes, config=config, elastic=False, initial=static),
    }


def after_history(trace: Trace, history_s: float) -> Trace:
    """The part of ``trace`` after its first ``history_s`` seconds: what the strategies are measured on (the history
    is the past they were planned on). The whole trace when the history covers it (then it is no longer history)."""
    keep = trace.t >= float(trace.t[0]) + history_s
    if not keep.any():
        return trace
    return Trace(t=trace.t[keep], layer=trace.layer[keep], counts=trace.counts[keep])
