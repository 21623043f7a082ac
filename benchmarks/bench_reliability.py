"""Reliability table: what a client sees when parts of the fleet fail (worker, router, controller, Redis).

    python benchmarks/bench_reliability.py

The slot for the failure scenarios' figures: each scenario, once written,
appends a row to ``SCENARIOS`` -- a function that runs it against a local
fleet and returns its measurements -- and a goal (e.g. failed requests when a
worker with replicas elsewhere dies: 0; time to re-place a dead worker's
experts). Until a scenario exists the result says so ("not run"), and
``benchmarks/RESULTS.md`` shows the table as not yet measured.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

# name -> function returning {"figures": {...}, "goals": [...], "details": {...}} (common.single / common.goal)
SCENARIOS: dict[str, Callable[[], dict]] = {}


def main() -> None:
    t0 = time.perf_counter()
    figures, goals, details = {}, [], {}
    for name, run in SCENARIOS.items():
        out = run()
        figures.update({f"{name}: {k}": v for k, v in out.get("figures", {}).items()})
        goals += out.get("goals", [])
        details[name] = out.get("details", {})
    status = "ok" if SCENARIOS else "not run: no failure scenario written yet"
    write_result("reliability", title="Reliability under failures",
                 question="What does a client see when a worker, router, controller or Redis fails under load?",
                 command="python benchmarks/bench_reliability.py", status=status, figures=figures, goals=goals,
                 details=details, elapsed_s=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
