"""Starting ``ExpertGroup`` workers: one function for local mode, the reconciler and the Serve app.

A worker is a named Ray actor (``moefleet-worker:<device id>`` in the fleet's
namespace), so routers find it by name and a restarted one takes its place.
Workers are not restarted by Ray (``max_restarts=0``): a dead worker's process
is gone with its weights; the controller decides where its experts go and
starts a fresh worker for the device.
"""

from __future__ import annotations

from typing import Any

from moefleet.core.config import WorkerConfig
from moefleet.core.placement import ExpertKey, worker_actor_name
from moefleet.core.processes import serving_runtime_env


def worker_options(
    device_id: str,
    namespace: str,
    worker: WorkerConfig,
    *,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    node_id: str | None = None,
    detached: bool = True,
) -> dict[str, Any]:
    """Ray actor options of the worker for ``device_id``.

    num_gpus / resources: what the device's node type reserves for one worker
    (default the ``WorkerConfig``'s); node_id: pin the worker to that node (a
    prefix of the Ray node id is enough).
    """
    import ray

    opts: dict[str, Any] = dict(
        name=worker_actor_name(device_id), namespace=namespace, get_if_exists=True, max_restarts=0,
        num_cpus=worker.num_cpus, num_gpus=worker.num_gpus if num_gpus is None else num_gpus,
        max_concurrency=worker.max_concurrency, resources={**worker.resources, **(resources or {})},
        runtime_env=serving_runtime_env(),  # normal CPU priority: Ray starts workers at nice 15
    )
    if detached:
        opts["lifetime"] = "detached"
    if node_id:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = next((n["NodeID"] for n in ray.nodes() if n["NodeID"].startswith(node_id) and n["Alive"]), None)
        if node is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return opts


def start_worker(
    device_id: str,
    checkpoint: str,
    experts: list[ExpertKey],
    namespace: str,
    worker: WorkerConfig,
    *,
    cpus: list[int] | tuple[int, ...] | None = None,
    redis_url: str | None = None,
    memory_bytes: int | None = None,
    emulate=None,
    **options,
):
    """Start (or find, if it runs) the worker of ``device_id``; returns its handle without waiting for it.

    cpus: local mode, the cores it owns. redis_url: where it heartbeats.
    memory_bytes: the device's memory for expert weights (the worker refuses loads past it).
    emulate: an emulated device's ``EmulatedDevice`` (the worker computes on the CPU and takes its modelled time).
    options: ``worker_options`` keywords (num_gpus, resources, node_id, detached).
    """
    from .group import expert_group_actor_class

    opts = worker_options(device_id, namespace, worker, **options)
    return expert_group_actor_class().options(**opts).remote(
        device_id, checkpoint, [tuple(k) for k in experts], dtype=worker.dtype, backend=worker.backend,
        cpus=list(cpus) if cpus else None, redis_url=redis_url, namespace=namespace, memory_budget_bytes=memory_bytes,
        emulate=emulate,
    )
