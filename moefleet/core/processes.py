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

The same environment raises Ray's inline limit in those processes
(``max_direct_call_object_size``, 100 KiB by default): arguments and results up
to ``INLINE_BYTES`` travel inside the call rather than through the object
store, which costs a put, a seal and a fetch each way. A 128 KiB argument and
result (32 tokens at H=1024, fp32) round-trip in 1.9 ms inline against 3.7 ms
through the store here; at 1 MiB the two are even, so larger arrays keep the
store (one put shared by every worker of a call).

And it keeps glibc from handing a call's tensors back to the kernel
(``MALLOC_ENV_VARS``). By default an allocation over the dynamic mmap
threshold (at most 32 MiB) gets fresh pages from the kernel and returns them
when freed, so every call of a large batch faults its intermediate tensors in
again: 19,000 minor page faults per 4096-token call in a worker. With the
threshold at 1 GiB and trimming at 4 GiB, freed memory stays in the heap for
the next call: 2,400 faults per call, the expert FFN 12% faster, the
worker's combine twice as fast (``benchmarks/RESULTS.md``, serving cost). A
worker's resident memory then stays at its peak call's, which it reaches
again on the next large call anyway.
"""

from __future__ import annotations

from typing import Any

INLINE_BYTES = 512 << 10
"""Arguments and results up to this size ride inside a serving process's Ray calls."""

MALLOC_ENV_VARS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
"""glibc malloc settings of a serving process: freed tensor memory is kept for the next call."""

SERVING_ENV_VARS = {"RAY_worker_niceness": "0", "RAY_max_direct_call_object_size": str(INLINE_BYTES), **MALLOC_ENV_VARS}
"""Environment of a serving process: normal CPU priority, Ray's inline limit at ``INLINE_BYTES``, ``MALLOC_ENV_VARS``."""


def inline_limit() -> int:
    """Ray's inline limit in this process: its ``RAY_max_direct_call_object_size``, else Ray's default (100 KiB)."""
    import os

    try:
        return int(os.environ.get("RAY_max_direct_call_object_size", 100 << 10))
    except ValueError:
        return 100 << 10


def serving_runtime_env(runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """``runtime_env`` (Ray actor option) with the serving environment variables added (the caller's win)."""
    import os

    env = dict(runtime_env or {})
    passed = {k: os.environ[k] for k in ("MOEFLEET_POLL_PRIORITY",) if k in os.environ}  # this process's choice
    env["env_vars"] = {**SERVING_ENV_VARS, **passed, **(env.get("env_vars") or {})}
    return env


def polling_thread(policy: str | None = None) -> str:
    """Run the calling thread only on CPU time nothing else wants (``SCHED_IDLE``; nice 19 where that is refused).

    A compiled graph's channels are polled, not waited on: Ray 2.60's shared-memory read spins (with
    ``sched_yield``) until the writer seals the next value, so every thread waiting on a graph — a worker's
    graph loop between calls, a router's reader while its workers compute — keeps a core busy. At normal
    priority that spin takes CPU from the expert math beside it (a worker's own cores, a caller's model);
    in the idle class it runs only on cycles no one else wants, which is also when its answer matters.
    policy: "idle" (default), "nice19" or "normal" (leave the thread as it is); ``$MOEFLEET_POLL_PRIORITY``
    overrides the default. Returns the policy set ("idle", "nice19" or "unchanged").
    """
    import os
    import threading

    policy = policy or os.environ.get("MOEFLEET_POLL_PRIORITY", "idle")
    if policy == "normal":
        return "unchanged"
    try:
        if policy == "nice19":
            raise OSError("nice 19 asked for")
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread on Linux
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return "nice19"
    except (AttributeError, OSError):
        return "unchanged"
