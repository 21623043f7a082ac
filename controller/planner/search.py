"""Local search: greedy moves on each layer's bottleneck device, then layer re-packs, while they pay.

See the package docstring for the moves tried and when the search stops.
"""

from __future__ import annotations

import heapq

import numpy as np

from .model import PlacementState
from .repair import coldest_singletons, drop_choices
from .schema import PlannerKnobs

__all__ = ["search"]


_ADD, _MOVE, _REPLACE, _REPLACE_MOVE, _OFFLOAD, _SWAP, _XSWAP, _TRADE = range(8)
_NOMINAL = {_ADD: 1, _MOVE: 1, _REPLACE: 1, _REPLACE_MOVE: 1, _OFFLOAD: 2, _SWAP: 2, _XSWAP: 2, _TRADE: 1}
_EXPERTS_TRIED = 8  # experts on the bottleneck device considered, hottest per replica first
_SWAP_EXPERTS = 4
_SWAP_PARTNERS = 16  # least loaded devices considered as swap partners
_EVALS_PER_LAYER = 24  # exact evaluations per layer and step, best prescores first
_VALID_PER_LAYER = 3


class _Context:
    """Per-step precomputation shared by the layers' candidate generators."""

    def __init__(self, state: PlacementState, auto: bool):
        fleet = state.fleet
        self.room = fleet.capacity - state.used
        self.drop_has, self.drop_flat, slack = drop_choices(state)
        # the highest time among the dropped expert's other holders, after the drop
        self.drop_peak = np.where(self.drop_has, state.device_time.max(axis=1)[self.drop_flat // fleet.shape[2]] - slack, 0.0)
        num_devices = fleet.shape[0]
        cpus = np.flatnonzero(fleet.cpu_tier)
        # coldest singletons feed offloads (auto) and swaps off a CPU bottleneck
        if (auto and len(cpus)) or (state.used[cpus] > 0).any():
            self.single_has, self.single_flat = coldest_singletons(state)
        else:
            self.single_has, self.single_flat = np.zeros(num_devices, bool), np.zeros(num_devices, np.int64)
        self.off_has = np.zeros(num_devices, dtype=bool)
        self.off_to = np.zeros(num_devices, dtype=np.int64)
        if auto and len(cpus):
            num_experts = fleet.shape[2]
            layer_max = state.device_time.max(axis=1)
            for d in np.flatnonzero(self.single_has):
                hl, he = divmod(int(self.single_flat[d]), num_experts)
                fit = cpus[self.room[cpus] >= fleet.replica_bytes[hl, he]]
                if len(fit) == 0:
                    continue
                new_t = state.device_time[hl, fit] + fleet.load[hl, he] / fleet.speed[fit]
                k = int(np.argmin(new_t))
                if new_t[k] < layer_max[hl]:
                    self.off_has[d], self.off_to[d] = True, fit[k]


def _layer_candidates(state: PlacementState, ctx: _Context, l: int, out: list) -> None:
    """Append ``(prescore per copy, kind, l, e, d, extra)`` candidates relieving layer l's bottleneck."""
    fleet = state.fleet
    num_devices, _, num_experts = fleet.shape
    layer_times = state.device_time[l]
    bottleneck = int(np.argmax(layer_times))
    bottleneck_time = layer_times[bottleneck]
    if bottleneck_time <= 0:
        return
    on = np.flatnonzero(state.held[bottleneck, l])
    on = on[np.argsort(-state.replica_time[l, on], kind="stable")][:_EXPERTS_TRIED]
    room = ctx.room
    bytes_flat, load_flat, replica_time_flat = fleet.replica_bytes.ravel(), fleet.load.ravel(), state.replica_time.ravel()
    drop_l = ctx.drop_flat // num_experts
    drop_same = np.where(ctx.drop_has & (drop_l == l), replica_time_flat[ctx.drop_flat], 0.0)
    drop_peak = np.where(ctx.drop_has & (drop_l == l), ctx.drop_peak, -np.inf)  # g's holders, same layer
    drop_b = np.where(ctx.drop_has, bytes_flat[ctx.drop_flat], 0)
    single_l = ctx.single_flat // num_experts
    single_same = np.where(ctx.single_has & (single_l == l), replica_time_flat[ctx.single_flat], 0.0)
    single_b = np.where(ctx.single_has, bytes_flat[ctx.single_flat], 0)
    light = np.argsort(layer_times, kind="stable")[:_SWAP_PARTNERS]
    light = light[light != bottleneck]
    holders_other = state.held[:, l, :].copy()
    holders_other[bottleneck] = False
    # Trading a redundant replica g of this layer for e: g's other holders take up its share.
    red_cols = np.flatnonzero(state.replicas[l] > fleet.replica_floor)  # [G] experts of layer l with a redundant replica
    if len(red_cols):
        g_held = state.held[:, l, red_cols]  # [D, G]
        holder_t = np.where(g_held, layer_times[:, None], -np.inf)
        top_d = holder_t.argmax(axis=0)
        cols = np.arange(len(red_cols))
        top1 = holder_t[top_d, cols]
        holder_t[top_d, cols] = -np.inf
        g_other = np.where(np.arange(num_devices)[:, None] == top_d[None, :], holder_t.max(axis=0)[None], top1[None])
        g_time = state.replica_time[l, red_cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            g_rise = np.where(g_held, fleet.load[l, red_cols][None] / (state.holder_speed[l, red_cols][None] - fleet.speed[:, None]) - g_time, 0.0)
        g_on_star = np.where(g_held[bottleneck][None, :], g_rise, 0.0)
        g_fits_b = room[:, None] + fleet.replica_bytes[l, red_cols][None, :]

    def push(score, mask, kind, e, extra=None):
        idx = np.flatnonzero(mask)
        if len(idx):
            out.append((score[idx] / _NOMINAL[kind], kind, l, e, idx, None if extra is None else extra[idx], bottleneck_time))

    for rank, e in enumerate(on):
        e = int(e)
        e_time, e_load, e_bytes, e_speed = state.replica_time[l, e], fleet.load[l, e], int(fleet.replica_bytes[l, e]), state.holder_speed[l, e]
        holders = state.held[:, l, e]
        free_dev = fleet.is_gpu & ~holders  # new replicas go to GPUs; CPUs only take offloads
        time_if_added = e_load / (e_speed + fleet.speed)
        keep_star = bottleneck_time - (e_time - time_if_added)
        fits = room >= e_bytes
        push(bottleneck_time - np.maximum(keep_star, layer_times + time_if_added), free_dev & fits, _ADD, e)
        speed_if_moved = e_speed - fleet.speed[bottleneck] + fleet.speed
        time_if_moved = e_load / speed_if_moved
        others = layer_times[holders_other[:, e]]
        other_max = others.max() if len(others) else -np.inf
        mv_new = np.maximum(np.maximum(bottleneck_time - e_time, layer_times + time_if_moved), other_max + time_if_moved - e_time)
        push(bottleneck_time - mv_new, free_dev & fits, _MOVE, e)
        need = free_dev & ~fits
        not_self = ctx.drop_flat != l * num_experts + e
        rep = need & ctx.drop_has & not_self & (room + drop_b >= e_bytes)
        rep_add = np.maximum(np.maximum(keep_star, layer_times - drop_same + time_if_added), drop_peak)
        push(bottleneck_time - rep_add, rep, _REPLACE, e)
        rep_mv = np.maximum(np.maximum(bottleneck_time - e_time, layer_times - drop_same + time_if_moved), drop_peak)
        push(bottleneck_time - rep_mv, rep, _REPLACE_MOVE, e)
        off = need & ctx.off_has & fleet.is_gpu & (room + single_b >= e_bytes)
        push(bottleneck_time - np.maximum(keep_star, layer_times - single_same + time_if_added), off, _OFFLOAD, e)
        if rank < _SWAP_EXPERTS and len(red_cols):
            trade = g_held & need[:, None] & (g_fits_b >= e_bytes) & (red_cols != e)[None, :]
            star_new = bottleneck_time - (e_time - time_if_added[:, None]) + g_on_star
            new_max = np.maximum(np.maximum(star_new, (layer_times + time_if_added)[:, None] - g_time[None]), g_other + g_rise)
            score = np.where(trade, bottleneck_time - new_max, -np.inf)
            best_g = score.argmax(axis=1)
            best = score[np.arange(num_devices), best_g]
            mask = np.isfinite(best) & (best > 0)
            if mask.any():
                out.append((best[mask], _TRADE, l, e, np.flatnonzero(mask), red_cols[best_g[mask]], bottleneck_time))
        if not fleet.is_gpu[bottleneck] and fleet.may_host[bottleneck]:
            xs = fleet.is_gpu & ~holders & ctx.single_has & (load_flat[ctx.single_flat] < e_load)
            xs &= (room + single_b >= e_bytes) & (room[bottleneck] + e_bytes >= single_b)
            h_on_star = np.where(single_l == l, load_flat[ctx.single_flat] / fleet.speed[bottleneck], 0.0)
            push(bottleneck_time - np.maximum(bottleneck_time - e_time + h_on_star, layer_times - single_same + time_if_moved), xs, _XSWAP, e)
        if rank < _SWAP_EXPERTS and len(light):
            # swap e (on bottleneck) with f (on a light device p); speeds taken as equal for the prescore
            part = light[~holders[light] & fleet.may_host[light]]
            if len(part) == 0:
                continue
            cand_f = state.held[part, l, :] & ~state.held[bottleneck, l, :][None, :]
            cand_f &= (room[part, None] + fleet.replica_bytes[l][None, :] >= e_bytes) & (room[bottleneck] + e_bytes >= fleet.replica_bytes[l][None, :])
            layer_replica_time = state.replica_time[l][None, :]
            new_max = np.maximum(bottleneck_time - e_time + layer_replica_time, layer_times[part, None] - layer_replica_time + e_time)
            score = np.where(cand_f, bottleneck_time - new_max, -np.inf)
            best_f = score.argmax(axis=1)
            best = score[np.arange(len(part)), best_f]
            mask = np.isfinite(best) & (best > 0)
            if mask.any():
                out.append((best[mask] / 2, _SWAP, l, e, part[mask], best_f[mask], bottleneck_time))


def _ops(state: PlacementState, ctx: _Context, kind: int, l: int, e: int, d: int, extra) -> list[tuple[int, int, int, int]]:
    num_experts = state.fleet.shape[2]
    bottleneck = int(np.argmax(state.device_time[l]))
    if kind == _ADD:
        return [(1, d, l, e)]
    if kind == _MOVE:
        return [(-1, bottleneck, l, e), (1, d, l, e)]
    if kind in (_REPLACE, _REPLACE_MOVE):
        gl, ge = divmod(int(ctx.drop_flat[d]), num_experts)
        head = [(-1, d, gl, ge)]
        return head + ([(1, d, l, e)] if kind == _REPLACE else [(-1, bottleneck, l, e), (1, d, l, e)])
    hl, he = divmod(int(ctx.single_flat[d]), num_experts)
    if kind == _OFFLOAD:
        return [(-1, d, hl, he), (1, int(ctx.off_to[d]), hl, he), (1, d, l, e)]
    if kind == _XSWAP:
        return [(-1, bottleneck, l, e), (1, d, l, e), (-1, d, hl, he), (1, bottleneck, hl, he)]
    if kind == _TRADE:
        return [(-1, d, l, int(extra)), (1, d, l, e)]
    fe = int(extra)  # _SWAP
    return [(-1, bottleneck, l, e), (1, d, l, e), (-1, d, l, fe), (1, bottleneck, l, fe)]


def search(state: PlacementState, knobs: PlannerKnobs, budget: int | None) -> None:
    """Greedy moves until stuck, then a layer re-pack if one pays for its copies; repeat."""
    steps = knobs.max_search_steps
    while steps > 0:
        steps -= _greedy(state, knobs, budget, steps)
        if steps <= 0 or (budget is not None and state.copies >= budget) or not _repack_round(state, knobs, budget):
            return
        steps -= 1


_REPACK_STICKINESS = (0.0, 0.25, 0.5, 1.0, 2.0)  # x the layer's mean replica time


def _repack_layer(state: PlacementState, l: int, stickiness: float) -> list[tuple[int, int, int, int]] | None:
    """Re-plan layer l's replicas on the same per-device slot counts (memory neutral).

    Replica counts from the layer's slots (most load per replica first), then
    LPT packing where a device that already holds the expert looks
    ``stickiness`` x the mean replica time lighter, so fewer copies change.
    Only for layers on GPU devices with one expert size. Returns the ops or None.
    """
    fleet = state.fleet
    cur = state.held[:, l, :]
    if (cur & ~fleet.is_gpu[:, None]).any() or np.ptp(fleet.replica_bytes[l]) != 0:
        return None
    slots = cur.sum(axis=1)
    hosts = int((slots > 0).sum())
    count = np.full(fleet.shape[2], min(fleet.replica_floor, hosts), dtype=np.int64)
    layer_load = fleet.load[l]
    heap = [(-layer_load[e], e) for e in range(len(layer_load))]
    heapq.heapify(heap)
    for _ in range(int(slots.sum()) - len(layer_load)):
        while heap and count[heap[0][1]] >= hosts:
            heapq.heappop(heap)
        if not heap:
            return None
        _, e = heapq.heappop(heap)
        count[e] += 1
        heapq.heappush(heap, (-layer_load[e] / count[e], e))
    bonus = stickiness * float(state.replica_time[l][state.replicas[l] > 0].mean()) if stickiness else 0.0
    t = np.zeros(len(slots))
    left = slots.copy()
    new = np.zeros_like(cur)
    for e in np.lexsort((np.arange(len(layer_load)), -layer_load / count)):
        cand = np.flatnonzero(left > 0)
        k = int(count[e])
        if len(cand) < k:
            return None
        chosen = cand[np.lexsort((cand, t[cand] - bonus * cur[cand, e]))[:k]]
        new[chosen, e] = True
        t[chosen] += layer_load[e] / fleet.speed[chosen].sum()
        left[chosen] -= 1
    adds, drops = np.argwhere(new & ~cur), np.argwhere(cur & ~new)
    return [(1, int(d), l, int(e)) for d, e in adds] + [(-1, int(d), l, int(e)) for d, e in drops]


def _repack_round(state: PlacementState, knobs: PlannerKnobs, budget: int | None) -> bool:
    """Try re-packing each layer, worst balanced first; apply the first that pays. True if applied."""
    num_layers = state.fleet.shape[1]
    layer_max = state.device_time.max(axis=1)
    threshold = knobs.hysteresis * layer_max.sum() / num_layers
    mean = state.device_time.mean(axis=1)
    for l in np.lexsort((np.arange(num_layers), -(layer_max - mean))):
        best, best_value = None, threshold
        for stickiness in _REPACK_STICKINESS:
            ops = _repack_layer(state, int(l), stickiness)
            if not ops:
                continue
            cost = sum((1 if sign > 0 else -1) * (not state.start[d, ll, e]) for sign, d, ll, e in ops)
            if budget is not None and state.copies + cost > budget:
                continue
            gain = layer_max[l] - _layer_time_after(state, l, ops).max()
            value = gain / max(cost, 1)
            if gain > 0 and value > best_value:
                best, best_value = ops, value
        if best is not None:
            state.apply(best)
            return True
    return False


def _layer_time_after(state: PlacementState, l: int, ops) -> np.ndarray:
    """``device_time[l]`` after ops that touch layer l only."""
    layer_held = state.held[:, l, :].copy()
    for sign, d, _, e in ops:
        layer_held[d, e] = sign > 0
    layer_speed = state.fleet.speed @ layer_held
    layer_replica_time = np.divide(state.fleet.load[l], layer_speed, out=np.zeros_like(layer_speed), where=layer_speed > 0)
    return layer_held @ layer_replica_time


def _better(a: tuple | None, b: tuple | None) -> bool:
    """Is ``a = (value, spread, ...)`` better than ``b``: more value, or as much and a lower spread."""
    if a is None:
        return False
    if b is None:
        return True
    tol = 1e-9 * max(abs(a[0]), abs(b[0]))
    return a[0] > b[0] + tol or (a[0] >= b[0] - tol and a[1] < b[1])


def _best_for_layer(state: PlacementState, ctx: _Context, l: int, budget: int | None, floor: float):
    """The best valid candidate for layer l's bottleneck: ``(ops, (value, spread, copies))`` or ``(None, None)``.

    Value is relief per copy and must beat ``floor``.
    """
    blocks: list = []
    _layer_candidates(state, ctx, l, blocks)
    best, best_score = None, None
    if not blocks:
        return best, best_score
    scores = np.concatenate([b[0] for b in blocks])
    owner = np.concatenate([np.full(len(b[0]), i) for i, b in enumerate(blocks)])
    pos = np.concatenate([np.arange(len(b[0])) for b in blocks])
    valid = 0
    for i in np.lexsort((np.arange(len(scores)), -scores))[:_EVALS_PER_LAYER]:
        bar = floor if best_score is None else best_score[0] * (1 - 1e-9)
        if scores[i] <= bar or valid >= _VALID_PER_LAYER:
            break
        _, kind, _, e, ds, extra, bottleneck_time = blocks[owner[i]]
        j = pos[i]
        ops = _ops(state, ctx, kind, l, e, int(ds[j]), None if extra is None else extra[j])
        score = _value(state, ops, l, bottleneck_time, budget)
        if score is None or score[0] <= floor:
            continue
        valid += 1
        if _better(score, best_score):
            best, best_score = ops, score
    return best, best_score


def _value(state: PlacementState, ops, l: int, bottleneck_time: float, budget: int | None) -> tuple[float, float, int] | None:
    """``(relief per copy, spread, copies)`` of ops for layer l, or None if invalid or over the copy budget."""
    result = state.evaluate(ops, l, bottleneck_time)
    if result is None:
        return None
    relief, cost, spread = result
    if budget is not None and state.copies + cost > budget:
        return None
    return relief / max(cost, 1), spread, cost


def _greedy(state: PlacementState, knobs: PlannerKnobs, budget: int | None, max_steps: int) -> int:
    """Greedy moves until no candidate beats the hysteresis or the copy budget is spent; returns steps made.

    Each layer's best candidate is kept between steps and only re-checked while
    the layer is untouched; every layer is searched afresh before giving up.
    """
    num_layers = state.fleet.shape[1]
    auto = knobs.cpu_tier == "auto"
    cached: dict[int, list | None] = {}
    scores: dict[int, tuple[float, float] | None] = {}
    dirty = set(range(num_layers))
    moved_layers: set[int] = set()
    moved_devices: set[int] = set()
    step = 0
    while step < max_steps:
        if budget is not None and state.copies >= budget:
            return step
        layer_max = state.device_time.max(axis=1)
        if layer_max.sum() <= 0:
            return step
        threshold = knobs.hysteresis * layer_max.sum() / num_layers
        ctx = None
        best, best_score = None, None
        for l in range(num_layers):
            ops = cached.get(l)
            if l not in dirty and ops is not None:
                # Untouched by the last move (its layers and devices): the score still holds.
                untouched = not ({op[2] for op in ops} & moved_layers or {op[1] for op in ops} & moved_devices)
                if untouched and scores[l] is not None and budget is not None:
                    untouched = state.copies + scores[l][2] <= budget
                if not untouched:
                    scores[l] = _value(state, ops, l, layer_max[l], budget)
                if scores[l] is not None and scores[l][0] <= threshold:
                    scores[l] = None
            if l in dirty or (ops is not None and scores[l] is None):
                ctx = ctx or _Context(state, auto)
                cached[l], scores[l] = _best_for_layer(state, ctx, l, budget, threshold)
                dirty.add(l)
            if cached.get(l) is not None and _better(scores[l], best_score):
                best, best_score = cached[l], scores[l]
        if best is None:
            if len(dirty) == num_layers:
                return step
            dirty = set(range(num_layers))  # search every layer afresh before stopping
            continue
        state.apply(best)
        moved_layers = {op[2] for op in best}
        moved_devices = {op[1] for op in best}
        dirty = set(moved_layers)
        step += 1
    return step
