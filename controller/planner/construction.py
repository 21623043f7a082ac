"""Placement from scratch: tier split, replica counts from free memory, longest-processing-time packing."""

from __future__ import annotations

import heapq

import numpy as np

from .model import Fleet

__all__ = ["construct", "grow_replicas"]


def grow_replicas(load: np.ndarray, nbytes: np.ndarray, count: np.ndarray, free: int, max_count: int) -> int:
    """Add replicas in place to the expert with the most load per replica while ``free`` bytes last.

    Experts with count 0 (CPU tier) or no load get none. Returns the bytes left.
    """
    heap = [(-load.flat[i] / count.flat[i], i) for i in range(load.size) if count.flat[i] > 0 and load.flat[i] > 0]
    heapq.heapify(heap)
    min_bytes = int(nbytes.min())
    while heap and free >= min_bytes:
        _, i = heapq.heappop(heap)
        if count.flat[i] >= max_count or nbytes.flat[i] > free:
            continue
        count.flat[i] += 1
        free -= int(nbytes.flat[i])
        heapq.heappush(heap, (-load.flat[i] / count.flat[i], i))
    return free


def construct(fleet: Fleet, per_layer: bool) -> np.ndarray:
    """From-scratch placement: tier split, replica counts from free memory, LPT packing.

    ``per_layer``: split the free GPU memory between layers in proportion to
    their experts' bytes (as DeepSeek EPLB gives every layer the same slots)
    instead of letting the hottest replicas of any layer take it.
    """
    num_devices, num_layers, num_experts = fleet.shape
    load, nbytes = fleet.load, fleet.replica_bytes
    held = np.zeros(fleet.shape, dtype=bool)
    gpus = np.flatnonzero(fleet.is_gpu)
    gpu_cap = int(fleet.capacity[gpus].sum())

    # 1. Coldest experts to the CPU tier while GPU memory cannot hold every expert once.
    on_cpu = np.zeros(load.shape, dtype=bool)
    excess = int(nbytes.sum()) - gpu_cap
    if excess > 0:
        for flat in np.argsort(load.ravel(), kind="stable"):
            if excess <= 0:
                break
            on_cpu.flat[flat] = True
            excess -= int(nbytes.flat[flat])

    # 2. Redundant replicas, one at a time, to the most load per replica, while memory is free
    #    (every GPU expert starts at the floor of replicas).
    count = np.where(on_cpu, 0, fleet.replica_floor if not on_cpu.any() else 1).astype(np.int64)
    free = gpu_cap - int((nbytes * count).sum())
    if per_layer:
        share = nbytes.sum(axis=1) / nbytes.sum()
        for l in range(num_layers):  # count[l:l+1] is a view: grown in place
            grow_replicas(load[l:l + 1], nbytes[l:l + 1], count[l:l + 1], int(free * share[l]), len(gpus))
        free = gpu_cap - int((nbytes * count).sum())
    grow_replicas(load, nbytes, count, free, len(gpus))

    # 3. Pack replicas, hottest per replica first, onto the least loaded GPUs with room.
    device_time = np.zeros((num_layers, num_devices))
    used = np.zeros(num_devices, dtype=np.int64)
    layer_used = np.zeros((num_layers, num_devices), dtype=np.int64)
    planned = nbytes * count
    total = max(int(planned.sum()), 1)
    quota = planned.sum(axis=1)[:, None] * fleet.capacity[None, :] / total  # per-layer share of each device
    order = np.lexsort((np.arange(load.size), -(load / np.maximum(count, 1)).ravel()))
    for flat in order:
        l, e = divmod(int(flat), num_experts)
        k, b = int(count[l, e]), int(nbytes[l, e])
        if k == 0:
            continue
        room = fleet.is_gpu & (used + b <= fleet.capacity)
        cand = np.flatnonzero(room)
        if len(cand) == 0:
            continue  # left for the repair pass
        over = layer_used[l, cand] + b > quota[l, cand] + b / 2
        keys = np.lexsort((cand, -fleet.speed[cand], device_time[l, cand], over))
        chosen = cand[keys[:k]]
        held[chosen, l, e] = True
        device_time[l, chosen] += load[l, e] / fleet.speed[chosen].sum()
        used[chosen] += b
        layer_used[l, chosen] += b

    # 4. The CPU tier, hottest first, to the CPU device that ends least loaded.
    cpus = np.flatnonzero(fleet.cpu_tier)
    for flat in np.lexsort((np.arange(load.size), -load.ravel())):
        l, e = divmod(int(flat), num_experts)
        if not on_cpu[l, e] or len(cpus) == 0:
            continue
        b = int(nbytes[l, e])
        cand = cpus[used[cpus] + b <= fleet.capacity[cpus]]
        if len(cand) == 0:
            continue
        d = cand[np.argmin(device_time[l, cand] + load[l, e] / fleet.speed[cand])]
        held[d, l, e] = True
        device_time[l, d] += load[l, e] / fleet.speed[d]
        used[d] += b
    return held
