"""Routing traces of a running fleet: record them from the store, replay them through the planner.

The file format is ``moefleet.core.trace`` (JSONL, one line per window and
layer: ``{"t": seconds, "layer": L, "counts": [E ints]}``); SGLang / vLLM
expert-count dumps are read into the same ``Trace`` by
``moefleet.core.expert_stats``.

``record_windows(store, ...)`` follows the routers' load windows in the store
and hands each complete window over as trace lines (thin: store reads and a
clock). ``replay(trace, ...)`` is pure: it feeds the trace, window by window,
into the controller's decision as ``Controller.step`` makes it — the decayed
load estimate over the last windows, the ``min_tokens`` gate, ``planner.plan``
against the placement the previous steps left — and reports what the
controller would have done in each window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from moefleet.core.decay import window_weights
from moefleet.core.placement import Inventory, Placement, spread_placement
from moefleet.core.trace import Trace, TraceLine

from .decide import decide

if TYPE_CHECKING:
    from .main import ControllerConfig

__all__ = ["ReplayStep", "record_windows", "replay", "trace_windows"]


# --------------------------------------------------------------------------- record


def record_windows(
    store,
    duration_s: float,
    layers: list[int],
    num_experts: int,
    *,
    window_s: float = 1.0,
    settle_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[list[TraceLine]]:
    """Yield the trace lines of each load window that completes in the next ``duration_s`` seconds.

    Windows are those the routers write (``window_s`` wide, on the store's
    clock); the first is the one starting after the call. A window is read
    once ``settle_s`` has passed after its end, so routers (which flush every
    ``telemetry_interval_s``) have added to it. Each yield is one window:
    a line per layer, ``t`` counted from the first window's start. Windows
    are read as they complete, so a recording longer than the store keeps
    windows loses nothing.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s: must be > 0, got {duration_s}")
    start = store.time()
    first = int(start // window_s) + 1
    end = max(first + 1, int((start + duration_s) // window_s))  # windows [first, end)
    row = {layer: i for i, layer in enumerate(layers)}
    nxt = first
    while nxt < end:
        now = store.time()
        ready = min(end, int((now - settle_s) // window_s))  # windows before this one are complete and settled
        if ready <= nxt:
            sleep(min(0.25, max(0.01, (nxt + 1) * window_s + settle_s - now)))
            continue
        windows = store.read_windows(now, window_s, int(now // window_s) - nxt + 1)
        for w_start, counts in windows:
            i = int(round(w_start / window_s))
            if not nxt <= i < ready:
                continue
            m = [[0] * num_experts for _ in layers]
            for (layer, expert), n in counts.items():
                if layer in row and 0 <= expert < num_experts:
                    m[row[layer]][expert] += int(n)
            t = round((i - first) * window_s, 6)
            yield [TraceLine(t, layer, tuple(m[row[layer]])) for layer in layers]
        nxt = ready


# --------------------------------------------------------------------------- replay


@dataclass
class ReplayStep:
    """What the controller would have done in one window of a trace."""

    t: float  # window start, seconds from the trace's start
    tokens: int  # routed in this window
    load: list[list[int]]  # [L][E] this window's counts, rows in ``layers`` order
    estimate_tokens: float  # the decayed estimate the decision used
    decision: str  # 'applied', 'kept' (plan below min_gain), 'skipped: <why>'
    balancedness_before: float | None = None  # predicted by the planner for the placement in force
    balancedness_after: float | None = None  # predicted for the target
    gain: float | None = None
    copies: int = 0  # weight copies (moves that add a replica)
    removes: int = 0
    bytes: int = 0  # copies x expert bytes
    version: int = 0  # placement version after this window

    def to_dict(self) -> dict:
        return asdict(self)


def trace_windows(trace: Trace, window_s: float | None = None) -> tuple[float, list[tuple[float, np.ndarray]]]:
    """The trace cut into windows: ``(window_s, [(t_start, load [L, E]), ...])``, empty windows included.

    ``window_s`` defaults to the smallest gap between the trace's distinct
    times (1 s for a trace with one time).
    """
    times = np.unique(trace.t)
    if window_s is None:
        gaps = np.diff(times)
        window_s = round(float(gaps[gaps > 0].min()), 6) if np.any(gaps > 0) else 1.0
    if not window_s > 0:
        raise ValueError(f"window_s: must be > 0, got {window_s}")
    index = np.floor(trace.t / window_s + 1e-6).astype(np.int64)  # a line at k * window_s belongs to window k
    row = np.searchsorted(trace.layers, trace.layer)
    loads = np.zeros((int(index.max()) + 1, len(trace.layers), trace.num_experts), dtype=np.int64)
    np.add.at(loads, (index, row), trace.counts)
    return window_s, [(k * window_s, loads[k]) for k in range(loads.shape[0])]


def replay(
    trace: Trace,
    inventory: Inventory,
    *,
    expert_bytes: float,
    config: ControllerConfig | None = None,
    window_s: float | None = None,
    start: Placement | None = None,
) -> list[ReplayStep]:
    """Replay ``trace`` through the controller's decision, one step per window (see the module docstring).

    config: the controller's settings (``load_windows``, ``load_half_life_s``,
    ``min_tokens``, ``planner``, ``autoscaling``; default ``ControllerConfig()``),
    read as if each trace window were one of the routers' load windows.
    inventory: the devices to place on; start: the placement in force before
    the first window (default: each layer's experts spread over the devices,
    as a fresh fleet starts).
    """
    from .main import ControllerConfig

    config = config or ControllerConfig()
    layers = trace.layers
    window_s, windows = trace_windows(trace, window_s)
    devices = [d.device_id for d in inventory.devices]
    current = start or spread_placement(layers, trace.num_experts, devices)
    record: dict = {}
    steps = []
    for k, (t0, load) in enumerate(windows):
        recent = windows[max(0, k - config.load_windows + 1): k + 1]
        weights = window_weights(t0 + window_s, window_s, [start for start, _ in recent], config.load_half_life_s)
        est = sum(weight * w for weight, (_, w) in zip(weights, recent))
        queue = {d: 0.0 for d in devices} if config.autoscaling is not None else None
        decision = decide(config, record, inventory.devices, current, est, queue, t0, expert_bytes=expert_bytes, layers=layers)
        record = decision.record
        step = ReplayStep(t=round(t0, 6), tokens=int(load.sum()), load=load.astype(int).tolist(),
                          estimate_tokens=float(est.sum()), decision="", version=current.version)
        result = decision.plan
        if result is None:
            step.decision = f"skipped: {decision.report.get('skipped', '')}"
        else:
            step.balancedness_before, step.balancedness_after = result.balancedness_before, result.balancedness_after
            step.gain = result.gain
            if result.apply:
                step.copies = result.copies
                step.removes = len(result.moves) - result.copies
                step.bytes = int(result.copies * expert_bytes)
                current = result.target.model_copy(update={"version": current.version + 1})
                step.decision = "applied"
            elif "plan_skipped" in decision.report:
                step.decision = f"held: {decision.report['plan_skipped']['reason']}"
            else:
                step.decision = "kept"
        step.version = current.version
        steps.append(step)
    return steps
