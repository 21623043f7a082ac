"""How the fleet's serving processes run under Ray.

Ray starts every worker process at a lower CPU priority (its ``worker_niceness``
setting, nice 15 by default), meant for background tasks. Expert workers and
routers are the fleet's serving path: at nice 15, anything else on the node
at normal priority (a model runner beside them, other jobs, Ray's own
daemons) takes their CPU first, and a call's latency follows whatever else
runs. Measured on a 2-core machine shared with other work, the same expert
FFN ran 10-30% slower inside a nice-15 worker than in a normal process
(``benchmarks/RESULTS.md``, serving cost). So workers and routers are started
with ``SERVING_RUNTIME_ENV``: Ray's own per-process setting, no privileges
needed. (Weight loading inside a worker still drops its own thread's priority:
``expert_workers.group.background_priority``.)
"""

from __future__ import annotations

from typing import Any

SERVING_ENV_VARS = {"RAY_worker_niceness": "0"}
"""Environment of a serving process: Ray leaves it at normal CPU priority."""


def serving_runtime_env(runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """``runtime_env`` (Ray actor option) with the serving environment variables added (the caller's win)."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**SERVING_ENV_VARS, **(env.get("env_vars") or {})}
    return env
