"""The smallest fleet mix that meets a p99 target for a trace ("what fleet do I need for this traffic").

``search_fleet(trace, entries, build, target_p99_ms, config)`` simulates
elastic placement on sub-fleets of ``entries`` (the largest counts allowed per
type) and returns the smallest that meets the target:

1. the whole fleet first; if it misses, the answer is "not met";
2. a binary search on one scale ``f`` applied to every type's count
   (``ceil(f x count)``), keeping the mix's proportions;
3. then devices are taken away one at a time -- each step tries one fewer of
   each type and keeps, among those still meeting the target, the one with
   the lowest total speed -- until none can go.

"Smallest" is fewest devices, then least total speed. Each candidate is one
simulation; a candidate whose memory cannot hold every expert once misses.
It assumes more devices never raise p99 (monotone), as the binary search
needs; the final trim checks each step by simulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moefleet.core.trace import Trace

from ..planner import PlanningError
from .devices import FleetEntry, SimDevice, format_fleet
from .engine import SimConfig, SimResult, simulate

__all__ = ["Candidate", "FleetSearch", "search_fleet"]


@dataclass
class Candidate:
    """One simulated fleet: its counts, elastic p99 queueing delay (ms; None if it cannot hold the model), met."""

    fleet: str
    devices: int
    p99_ms: float | None
    met: bool
    note: str = ""


@dataclass
class FleetSearch:
    """The answer: the smallest fleet meeting the target (None if even the whole fleet misses) and every candidate."""

    target_p99_ms: float
    best: list[FleetEntry] | None
    best_result: SimResult | None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.best is not None


def search_fleet(
    trace: Trace,
    entries: Sequence[FleetEntry],
    build: Callable[[list[FleetEntry]], list[SimDevice]],
    target_p99_ms: float,
    *,
    expert_bytes: float,
    config: SimConfig | None = None,
    max_candidates: int = 40,
) -> FleetSearch:
    """Smallest sub-fleet of ``entries`` whose elastic p99 queueing delay is at most ``target_p99_ms``.

    build: turns fleet entries into simulated devices (``devices.fleet_devices`` with the model's shape).
    """
    if not target_p99_ms > 0:
        raise ValueError(f"target_p99_ms: must be > 0, got {target_p99_ms}")
    config = config or SimConfig()
    entries = [e for e in entries if e.count > 0]
    cache: dict[tuple[int, ...], tuple[bool, SimResult | None]] = {}
    out = FleetSearch(target_p99_ms=target_p99_ms, best=None, best_result=None)

    def with_counts(counts: Sequence[int]) -> list[FleetEntry]:
        return [FleetEntry(e.device_type, c) for e, c in zip(entries, counts)]

    def evaluate(counts: tuple[int, ...]) -> tuple[bool, SimResult | None]:
        if counts in cache:
            return cache[counts]
        fleet = with_counts(counts)
        if sum(counts) == 0 or len(cache) >= max_candidates:
            return False, None
        try:
            result = simulate(trace, build(fleet), expert_bytes=expert_bytes, config=config, elastic=True)
        except PlanningError as e:
            cache[counts] = (False, None)
            out.candidates.append(Candidate(format_fleet(fleet), sum(counts), None, False, f"cannot hold the model: {e}"))
            return cache[counts]
        met = result.p99_ms <= target_p99_ms
        cache[counts] = (met, result)
        out.candidates.append(Candidate(format_fleet(fleet), sum(counts), result.p99_ms, met))
        return cache[counts]

    full = tuple(e.count for e in entries)
    if not evaluate(full)[0]:
        return out
    best = full
    lo, hi = 0.0, 1.0  # f = hi meets
    steps = max(1, math.ceil(math.log2(max(full) + 1)))
    for _ in range(steps):
        mid = (lo + hi) / 2
        counts = tuple(math.ceil(mid * c) for c in full)
        if counts == best:
            hi = mid
            continue
        if evaluate(counts)[0]:
            hi, best = mid, counts
        else:
            lo = mid
    speeds = [e.device_type.speed for e in entries]
    while True:
        options = []
        for i, c in enumerate(best):
            if c == 0:
                continue
            counts = best[:i] + (c - 1,) + best[i + 1 :]
            if evaluate(counts)[0]:
                options.append((sum(n * s for n, s in zip(counts, speeds)), counts))
        if not options:
            break
        best = min(options)[1]
    out.best = with_counts(best)
    out.best_result = cache[best][1]
    return out
