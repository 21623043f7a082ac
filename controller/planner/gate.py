"""Does a plan pay for itself? The cost of a move, the horizon it pays over, and the gate. Pure.

A plan's **cost** is what applying it takes (``move_cost``): every weight copy
crosses the receiving device's link and is then loaded into its memory, all
receiving devices in parallel, so the move lasts

    overhead + max over receiving devices d of (bytes_d / link_d + bytes_d / load_d)

plus one more ``overhead`` for each extra stage the reconciler needs when a
device cannot hold what it gains beside what it loses (make before break
holds both: the **transient memory**, ``transient_bytes``).

Its **benefit** is the step time it saves while the load it was planned for
lasts: ``gain x horizon_s`` seconds, with ``gain = 1 - after / before`` the
planner's predicted cut and the **horizon** how long recent hot sets have
lasted (``HotSetTracker``: measured, not assumed). The gate passes a plan when

    gain x horizon_s > kappa x cost_s

(``kappa`` > 1 asks a plan to pay for itself several times over, since both
figures are predictions).

Hot sets. Per layer the hot set is the ``hot_fraction`` of experts with the
most load (at least two). The tracker keeps the hot sets of the current
*epoch*, the share of the load they carried and the time it began; when they
carry less than half that share (averaged over layers), the hot set has
moved: the epoch's length is recorded as one lifetime and a new epoch begins.
The horizon is the median of the recent lifetimes; until one has been
measured, the configured default; never more than ``max_horizon_s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moefleet.core.placement import DeviceId, DeviceSpec, ExpertKey, Placement

__all__ = ["HotSetTracker", "LinkSpeeds", "MoveCost", "hot_sets", "move_cost", "passes"]


@dataclass(frozen=True)
class LinkSpeeds:
    """How fast weights reach one device: over its link, then into its memory; and the fixed cost of a step."""

    copy_bytes_per_s: float
    load_bytes_per_s: float
    overhead_s: float = 0.0


@dataclass(frozen=True)
class MoveCost:
    """What applying a plan takes."""

    copies: int
    bytes_moved: int
    seconds: float
    transient_bytes: int  # the most any device holds beyond max(before, after) mid-move
    stages: int  # placements published in turn (1 unless a device must make room first)

    def to_dict(self) -> dict:
        return {"copies": self.copies, "bytes_moved": self.bytes_moved, "seconds": self.seconds,
                "transient_bytes": self.transient_bytes, "stages": self.stages}


def move_cost(
    current: Placement,
    target: Placement,
    devices: Sequence[DeviceSpec],
    replica_bytes: Callable[[ExpertKey], int],
    links: Mapping[DeviceId, LinkSpeeds] | LinkSpeeds,
) -> MoveCost:
    """The cost of moving from ``current`` to ``target`` (see the module docstring).

    ``links``: one ``LinkSpeeds`` for every device, or one per device id (a
    device missing from the mapping takes the slowest link given).
    """
    specs = {d.device_id: d for d in devices}
    cur = {d: {tuple(k) for k in keys} for d, keys in current.assignments.items()}
    tgt = {d: {tuple(k) for k in keys} for d, keys in target.assignments.items()}
    if isinstance(links, LinkSpeeds):
        default = links
        per_device: Mapping[DeviceId, LinkSpeeds] = {}
    else:
        per_device = links
        default = min(links.values(), key=lambda s: s.copy_bytes_per_s) if links else LinkSpeeds(1e9, 1e9)
    copies, moved, slowest, transient, overhead = 0, 0, 0.0, 0, default.overhead_s
    staged = False
    for d in sorted(set(cur) | set(tgt)):
        before, after = cur.get(d, set()), tgt.get(d, set())
        gained = after - before
        gained_bytes = sum(int(replica_bytes(k)) for k in gained)
        link = per_device.get(d, default)
        overhead = max(overhead, link.overhead_s)
        if gained:
            copies += len(gained)
            moved += gained_bytes
            slowest = max(slowest, gained_bytes / link.copy_bytes_per_s + gained_bytes / link.load_bytes_per_s)
        both = sum(int(replica_bytes(k)) for k in before | after)
        held = max(sum(int(replica_bytes(k)) for k in before), sum(int(replica_bytes(k)) for k in after))
        transient = max(transient, both - held)
        spec = specs.get(d)
        if spec is not None and both > spec.memory_bytes:
            staged = True
    stages = 2 if staged else 1
    seconds = 0.0 if cur == tgt else overhead * stages + slowest
    return MoveCost(copies=copies, bytes_moved=moved, seconds=seconds, transient_bytes=transient, stages=stages)


def passes(gain: float, horizon_s: float, cost_s: float, kappa: float) -> bool:
    """The gate: ``gain x horizon_s > kappa x cost_s`` (a plan with no gain never passes)."""
    return gain > 0 and gain * horizon_s > kappa * cost_s


def hot_sets(load: np.ndarray, hot_fraction: float) -> list[list[int]]:
    """Per layer row, the ``ceil(hot_fraction x E)`` experts (at least 2, at most E) with the most load, sorted."""
    load = np.asarray(load, dtype=float)
    num_experts = load.shape[1]
    k = min(num_experts, max(2, math.ceil(hot_fraction * num_experts)))
    out = []
    for row in load:
        order = np.lexsort((np.arange(num_experts), -row))[:k]
        out.append(sorted(int(e) for e in order))
    return out


class HotSetTracker:
    """Hot-set epochs and their measured lifetimes, kept in a plain dict (the controller's record).

    State (``state``, JSON-ready): ``since`` (the epoch's start), ``hot`` (its
    hot sets, per layer row), ``mass`` (the share of each layer's load they
    carried when the epoch began) and ``lifetimes`` (the last ``keep`` epochs'
    lengths, seconds). The hot set has moved when, averaged over layers, the
    epoch's hot experts carry less than half the share of the load they
    carried at its start.
    """

    def __init__(self, state: Mapping | None, *, hot_fraction: float = 0.125, keep: int = 8):
        state = dict(state or {})
        self.since: float | None = state.get("since")
        self.hot: list[list[int]] | None = state.get("hot")
        self.mass: list[float] | None = state.get("mass")
        self.lifetimes: list[float] = [float(x) for x in state.get("lifetimes", [])]
        self.hot_fraction = hot_fraction
        self.keep = keep

    @staticmethod
    def _mass(load: np.ndarray, hot: list[list[int]]) -> list[float]:
        totals = load.sum(axis=1)
        return [float(row[h].sum() / t) if t > 0 else 0.0 for row, h, t in zip(load, hot, totals)]

    def observe(self, load: np.ndarray, now: float) -> bool:
        """Feed the current load estimate; True when the hot set moved (a new epoch began)."""
        load = np.asarray(load, dtype=float)
        if float(load.sum()) <= 0:
            return False
        if self.hot is None or self.since is None or self.mass is None or len(self.hot) != load.shape[0]:
            self._begin(load, now)
            return False
        kept = [m / m0 for m, m0 in zip(self._mass(load, self.hot), self.mass) if m0 > 0]
        if not kept or float(np.mean(kept)) >= 0.5:
            return False
        self.lifetimes = (self.lifetimes + [now - self.since])[-self.keep:]
        self._begin(load, now)
        return True

    def _begin(self, load: np.ndarray, now: float) -> None:
        self.hot = hot_sets(load, self.hot_fraction)
        self.mass = self._mass(load, self.hot)
        self.since = now

    def horizon(self, default_s: float, max_s: float) -> float:
        """Median of the measured lifetimes (``default_s`` before any), capped at ``max_s``."""
        value = float(np.median(self.lifetimes)) if self.lifetimes else default_s
        return min(value, max_s)

    def state(self) -> dict:
        return {"since": self.since, "hot": self.hot, "mass": self.mass, "lifetimes": self.lifetimes}
