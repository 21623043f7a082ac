"""Repair: make a placement valid (evacuate overfull devices, place experts without a replica, restore the floor).

Also the per-device choices the search shares with repair: which redundant
replica a device can drop with least harm, its coldest single-replica expert.
"""

from __future__ import annotations

import numpy as np

from .model import PlacementState
from .schema import PlanningError

__all__ = ["coldest_singletons", "drop_choices", "make_room", "repair"]


def _per_device_best(d: np.ndarray, score: np.ndarray, flat: np.ndarray, num_devices: int):
    """For entries ``(device d, score, flat)``, the highest score per device (ties: first entry)."""
    has = np.zeros(num_devices, dtype=bool)
    best_flat = np.zeros(num_devices, dtype=np.int64)
    best = np.full(num_devices, -np.inf)
    if len(d):
        order = np.lexsort((np.arange(len(d)), -score, d))
        devices, first = np.unique(d[order], return_index=True)
        pick = order[first]
        has[devices], best_flat[devices], best[devices] = True, flat[pick], score[pick]
    return has, best_flat, best


def drop_choices(state: PlacementState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per device, the redundant replica whose removal hurts least.

    Returns ``has [D]`` bool, ``flat [D]`` (index into ``[L*E]``) and ``slack [D]``:
    how far the highest time among the expert's other holders stays below its
    layer's step time after the drop; drops that would raise it are left out.
    """
    fleet = state.fleet
    num_devices, _, num_experts = fleet.shape
    red_flat = np.flatnonzero(state.replicas.ravel() > fleet.replica_floor)  # experts with a redundant replica
    d, col = np.nonzero(state.held.reshape(num_devices, -1)[:, red_flat])  # one entry per their replicas
    key = red_flat[col]
    l = key // num_experts
    t = state.device_time[l, d]
    order = np.lexsort((-t, key))  # grouped by expert, busiest holder first
    head = np.ones(len(order), dtype=bool)
    head[1:] = key[order][1:] != key[order][:-1]
    top1 = np.full(state.replicas.size, -np.inf)
    top1[key[order][head]] = t[order][head]
    second = np.zeros(len(order), dtype=bool)
    second[1:] = ~head[1:] & head[:-1]
    top2 = np.full(state.replicas.size, -np.inf)
    top2[key[order][second]] = t[order][second]
    is_top = np.zeros(len(order), dtype=bool)
    is_top[order[head]] = True
    other = np.where(is_top, top2[key], top1[key])  # busiest other holder of the same expert
    time_after = fleet.load.ravel()[key] / (state.holder_speed.ravel()[key] - fleet.speed[d])
    slack = state.device_time.max(axis=1)[l] - (other + time_after - state.replica_time.ravel()[key])
    ok = slack > 0
    return _per_device_best(d[ok], slack[ok], key[ok], num_devices)


def coldest_singletons(state: PlacementState) -> tuple[np.ndarray, np.ndarray]:
    """Per GPU device, its coldest expert that has no other replica: ``has [D]``, ``flat [D]``."""
    fleet = state.fleet
    num_experts = fleet.shape[2]
    d, l, e = np.nonzero(state.held & (state.replicas == 1)[None] & fleet.is_gpu[:, None, None])
    key = l * num_experts + e
    has, flat, _ = _per_device_best(d, -fleet.load.ravel()[key], key, fleet.shape[0])
    return has, flat


def _place_unplaced(state: PlacementState) -> None:
    """Give every expert without a replica one, hottest first; raise PlanningError if memory is short."""
    fleet = state.fleet
    num_experts = fleet.shape[2]
    missing = np.flatnonzero((state.replicas == 0).ravel())
    for flat in missing[np.lexsort((missing, -fleet.load.ravel()[missing]))]:
        l, e = divmod(int(flat), num_experts)
        b, e_load = int(fleet.replica_bytes[l, e]), fleet.load[l, e]
        room = fleet.capacity - state.used
        gpu_fit = np.flatnonzero(fleet.is_gpu & (room >= b))
        if len(gpu_fit):  # a GPU with room
            d = gpu_fit[np.argmin(state.device_time[l, gpu_fit] + e_load / fleet.speed[gpu_fit])]
            state.apply([(1, int(d), l, e)])
            continue
        bytes_flat = fleet.replica_bytes.ravel()
        d = make_room(state, fleet.is_gpu, b)
        if d is not None:  # redundant replicas on a GPU made way
            state.apply([(1, d, l, e)])
            continue
        room = fleet.capacity - state.used
        cpus = np.flatnonzero(fleet.cpu_tier)
        if len(cpus):
            has_s, sflat = coldest_singletons(state)
            colder = has_s & (fleet.load.ravel()[sflat] < e_load) & (room + bytes_flat[sflat] >= b)
            for d in np.flatnonzero(colder)[np.argsort(fleet.load.ravel()[sflat[colder]], kind="stable")]:
                hl, he = divmod(int(sflat[d]), num_experts)
                k_fit = cpus[room[cpus] >= bytes_flat[sflat[d]]]
                if len(k_fit):  # a colder GPU expert makes way, to the CPU tier
                    k = k_fit[np.argmin(state.device_time[hl, k_fit] + fleet.load[hl, he] / fleet.speed[k_fit])]
                    state.apply([(-1, int(d), hl, he), (1, int(k), hl, he), (1, int(d), l, e)])
                    break
            else:
                k_fit = cpus[room[cpus] >= b]
                if len(k_fit):
                    k = k_fit[np.argmin(state.device_time[l, k_fit] + e_load / fleet.speed[k_fit])]
                    state.apply([(1, int(k), l, e)])
                else:
                    k = make_room(state, fleet.cpu_tier, b)
                    if k is not None:
                        state.apply([(1, k, l, e)])
            if state.replicas[l, e] > 0:
                continue
        key = (fleet.layers[l], e)
        raise PlanningError(
            f"inventory: not enough device memory to hold expert {key} ({b} bytes) with every other expert "
            f"placed once (cpu_tier and headroom limit where experts may go)"
        )


def make_room(state: PlacementState, mask: np.ndarray, b: int) -> int | None:
    """Free ``b`` bytes on a device in ``mask`` by dropping redundant replicas, coldest per replica first.

    Picks the device where the dropped replicas carry the least load (ties:
    lower index); returns it, or None if no device can make room.
    """
    fleet = state.fleet
    best = None
    for d in np.flatnonzero(mask):
        room = int(fleet.capacity[d] - state.used[d])
        redundant = np.argwhere(state.held[d] & (state.replicas > fleet.replica_floor))
        order = np.argsort(state.replica_time[redundant[:, 0], redundant[:, 1]], kind="stable") if len(redundant) else []
        drops, lost = [], 0.0
        for i in order:
            if room >= b:
                break
            l, e = (int(v) for v in redundant[i])
            drops.append((-1, int(d), l, e))
            room += int(fleet.replica_bytes[l, e])
            lost += state.replica_time[l, e]
        if room >= b and (best is None or lost < best[0]):
            best = (lost, int(d), drops)
    if best is None:
        return None
    state.apply(best[2])
    return best[1]


def repair(state: PlacementState) -> None:
    """Evacuate overfull devices (redundant replicas first, coldest first), then place missing experts."""
    fleet = state.fleet
    num_experts = fleet.shape[2]
    for d in np.flatnonzero(state.used > fleet.capacity):
        while state.used[d] > fleet.capacity[d]:
            held = np.flatnonzero(state.held[d].ravel())
            redundant = held[state.replicas.ravel()[held] > fleet.replica_floor]
            pool = redundant if len(redundant) else held
            per_replica = state.replica_time.ravel()[pool] if len(redundant) else fleet.load.ravel()[pool]
            l, e = divmod(int(pool[np.argmin(per_replica)]), num_experts)
            state.apply([(-1, int(d), l, e)])
    _place_unplaced(state)
    _restore_floor(state)


def _restore_floor(state: PlacementState) -> None:
    """Give every expert below the replica floor more replicas, hottest first, on the least loaded GPUs with room."""
    fleet = state.fleet
    if fleet.replica_floor <= 1:
        return
    num_experts = fleet.shape[2]
    short = np.flatnonzero((state.replicas < fleet.replica_floor).ravel())
    for flat in short[np.lexsort((short, -fleet.load.ravel()[short]))]:
        l, e = divmod(int(flat), num_experts)
        while state.replicas[l, e] < fleet.replica_floor:
            b = fleet.replica_bytes[l, e]
            fit = np.flatnonzero(fleet.is_gpu & ~state.held[:, l, e] & (fleet.capacity - state.used >= b))
            if len(fit):
                d = fit[np.argmin(state.device_time[l, fit] + fleet.load[l, e] / (state.holder_speed[l, e] + fleet.speed[fit]))]
                state.apply([(1, int(d), l, e)])
                continue
            ops = _floor_shuffle(state, l, e)
            if ops is None:
                break  # memory is short here: left at fewer replicas
            state.apply(ops)


def _floor_shuffle(state: PlacementState, l: int, e: int):
    """Room for another replica of (l, e) where only its own holders have room: move a replica
    (l2, e2) from a full device that lacks (l, e) to a holder with room that lacks (l2, e2), then add."""
    fleet = state.fleet
    b = fleet.replica_bytes[l, e]
    room = fleet.capacity - state.used
    for src in np.flatnonzero(fleet.is_gpu & state.held[:, l, e] & (room > 0)):
        for dst in np.flatnonzero(fleet.is_gpu & ~state.held[:, l, e]):
            for l2, e2 in np.argwhere(state.held[dst] & ~state.held[src]):
                b2 = fleet.replica_bytes[l2, e2]
                if room[src] >= b2 and room[dst] + b2 >= b:
                    return [(-1, int(dst), int(l2), int(e2)), (1, int(src), int(l2), int(e2)), (1, int(dst), l, e)]
    return None
