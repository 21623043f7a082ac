"""How long a worker should take, from its own recent calls: the router's budget for a call, and stalled workers.

Pure (plain data, a clock passed in). The router learns each worker's speed
from the stage times every reply carries (its gather, expert FFN and combine
for so many rows) and gives each call a budget: ``factor`` times what the
worker's recent speed says the call and the rows queued before it should take,
plus a floor for the fixed costs. A worker that has not answered within its
budget is **stalled**: the router re-dispatches the rows it can serve elsewhere
(hedging), keeps waiting for the rest, and **quarantines** the worker — no new
rows while another replica can take them — until the worker answers again
(its late reply, discarded where a duplicate already served those rows).

A worker the router has never heard from gets ``unknown_budget_s``: its first
calls may pay for loading code and warming caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkerHealth:
    """Per-worker speed estimates and the quarantine (module docstring).

    min_budget_s: the least budget of any call (the fixed costs of a hop and a small call);
    factor: how many times its expected time a call may take; alpha: weight of the newest
    observation in the moving average; unknown_budget_s: the budget of a worker never observed.
    """

    min_budget_s: float = 0.3
    factor: float = 4.0
    alpha: float = 0.2
    unknown_budget_s: float = 5.0
    seconds_per_row: dict[str, float] = field(default_factory=dict)
    quarantined: dict[str, float] = field(default_factory=dict)  # worker -> when (monotonic) it was found stalled
    stalls: int = 0

    def observe(self, worker: str, rows: int, seconds: float) -> None:
        """A reply: the worker computed ``rows`` rows in ``seconds`` of its own time."""
        if rows <= 0 or seconds < 0:
            return
        rate = seconds / rows
        old = self.seconds_per_row.get(worker)
        self.seconds_per_row[worker] = rate if old is None else (1 - self.alpha) * old + self.alpha * rate

    def budget(self, worker: str, rows: int, queued_rows: float = 0.0) -> float:
        """Seconds a call of ``rows`` rows may take at ``worker``, with ``queued_rows`` ahead of it there."""
        rate = self.seconds_per_row.get(worker)
        if rate is None:
            return self.unknown_budget_s
        return self.min_budget_s + self.factor * rate * (max(rows, 0) + max(queued_rows, 0.0))

    def stalled(self, worker: str, now: float) -> None:
        if worker not in self.quarantined:
            self.stalls += 1
            self.quarantined[worker] = now

    def answered(self, worker: str) -> bool:
        """The worker answered: out of quarantine. Returns whether it was quarantined."""
        return self.quarantined.pop(worker, None) is not None

    def is_quarantined(self, worker: str) -> bool:
        return worker in self.quarantined


def avoid(replicas: dict[int, list[str]], quarantined, dead) -> dict[int, list[str]]:
    """Each expert's replicas without dead workers, and without quarantined ones where another replica is left.

    A dead worker cannot serve at all; a quarantined one is only slow, so an expert whose every live replica is
    quarantined keeps them (its rows wait rather than fail).
    """
    out = {}
    for e, ws in replicas.items():
        live = [w for w in ws if w not in dead]
        healthy = [w for w in live if w not in quarantined]
        out[e] = healthy or live
    return out
