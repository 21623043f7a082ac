"""Expert placement planner: ``plan(load, inventory, current, knobs) -> Plan``. Pure.

Plain functions over plain data: no Ray, no Redis, no clock. The controller
feeds it the decayed load window, the fleet's devices and the placement now
in force, and hands the returned target to the reconciler.

Load model (what "balanced" means here)
---------------------------------------
* ``load[i, e]`` is the (decayed) token count routed to expert ``e`` of the
  i-th MoE layer; row ``i`` is layer ``layers[i]`` (``layers`` defaults to
  ``range(L)``), so the placement's ``ExpertKey`` is ``(layers[i], e)``.
* Routing: the router sends each token of an expert to one of its replicas
  with probability proportional to the speed of the replica's device. With
  ``S[i, e]`` the sum of the speeds of the devices holding expert ``(i, e)``,
  a replica on device ``d`` gets ``load * speed[d] / S`` tokens and spends
  ``load / S`` time on them: every replica of an expert takes the same time.
* Device time per layer: ``T[i, d] = sum over experts on d of load / S``
  (time = tokens / speed). A MoE layer call waits for its slowest device (the
  router dispatches one layer at a time), so a layer costs ``max_d T[i, d]``
  and the **step time** is ``sum_i max_d T[i, d]`` over all devices, CPU ones
  included: a cold expert offloaded to a slow CPU device must not become the
  layer's bottleneck.
* **Balancedness** = ``sum_i mean_{GPU d} T[i, d] / step time`` (in (0, 1];
  1.0 is perfect). With one layer and no CPU bottleneck it is the mean/max of
  GPU device time. The predicted **gain** of a plan is the relative cut in
  step time, ``1 - after / before``.
* Memory: a device holds at most ``memory_bytes * (1 - headroom)`` bytes of
  expert weights; a replica costs ``expert_bytes`` (one value or one per
  expert). A device holds at most one replica of an expert (a second copy on
  the same device cannot take traffic off it).
* Assumed, not modelled: the cost of a weight copy beyond counting it, the
  routers' per-replica batching effects, and network transfer time.

How it plans
------------
From scratch (``current`` holds nothing on the inventory's devices): coldest
experts to the CPU tier if GPU memory cannot hold every expert once; then
redundant replicas, one at a time, to the expert with the most load per
replica until free GPU memory runs out (so the redundancy follows from the
memory actually free); then the replicas, hottest per replica first, to the
least loaded GPUs with room (longest-processing-time packing with per-layer
memory quotas). This is built twice, letting the hottest replicas of any
layer take the free memory and splitting it between layers as DeepSeek EPLB
does; each is improved by the search below, uncapped, and the faster kept.

Incrementally (``current`` non-empty): start from ``current``; repair it
(drop replicas on devices that left or may not host, evacuate overfull
devices, place experts that have no replica, even past the copy cap); then
improve it with a local search:

1. Greedy moves. For each layer's bottleneck device and the experts on it:
   add a replica on another GPU with room; move the replica; drop a redundant
   replica of a cold expert on the target (any layer, or trade one of this
   layer) to make room; offload the target's coldest single-replica expert to
   a CPU device to make room (``cpu_tier="auto"``); swap with an expert of a
   lightly loaded device; or, when the bottleneck is a CPU device, swap a hot
   expert there with a cold one on a GPU. A candidate must cut the
   bottleneck's time (every device whose time changes ends below the old
   bottleneck) and must not raise another layer's step time. The best by
   relief per weight copy wins (ties: the more even result). New replicas go
   to GPUs only: CPU devices take cold experts, never redundant copies.
2. When no greedy move pays, re-pack one layer on the same per-device slot
   counts (replica counts recomputed, LPT packing that favours devices
   already holding an expert); kept if its relief per copy pays.

Stop when the copy budget is spent or nothing relieves a bottleneck by more
than ``hysteresis`` x the mean layer time per copy. Every input order and tie
is resolved by index, so equal inputs give equal plans.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moefleet.core.placement import DeviceId, ExpertKey, Inventory, Placement

__all__ = ["Move", "Plan", "PlannerKnobs", "PlanningError", "PlacementStats", "plan", "predict"]


class PlanningError(ValueError):
    """The inputs admit no valid placement (e.g. too little memory for every expert once)."""


class PlannerKnobs(BaseModel):
    """Tuning of the placement planner; every field has a safe default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_moves_per_step: int = Field(
        default=32,
        ge=0,
        description=(
            "Most weight copies (replica adds) one plan may make on a running placement. Removals copy "
            "nothing and are not counted. Repairs (placing experts that lost every replica) are made even "
            "past the cap. An initial placement (current holds nothing) is not capped."
        ),
    )
    hysteresis: float = Field(
        default=0.002,
        ge=0,
        lt=1,
        description=(
            "A candidate move is made only if it relieves a layer's bottleneck device by more than this "
            "fraction of the mean per-layer step time, per weight copy."
        ),
    )
    min_gain: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description=(
            "A plan is marked apply=True only if its predicted step-time cut (1 - after/before) is at least "
            "this; repairs are always applied."
        ),
    )
    headroom: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of each device's memory_bytes kept free of expert weights."
    )
    cpu_tier: Literal["off", "overflow", "auto"] = Field(
        default="overflow",
        description=(
            "'off': never place experts on CPU devices. 'overflow': only the coldest experts that GPU memory "
            "cannot hold go to CPU devices. 'auto': also offload cold experts to CPU devices when that frees "
            "GPU memory for replicas that improve balance."
        ),
    )
    max_search_steps: int = Field(
        default=4000, ge=1, description="Safety cap on improvement steps of one plan (each step is one move)."
    )
    min_replicas: int = Field(
        default=1,
        ge=1,
        description=(
            "Replicas every expert keeps on distinct GPU devices when GPU memory can hold every expert this many "
            "times (else 1). 2 trades memory for zero loss when a worker dies: its experts keep serving elsewhere. "
            "Capped at the number of GPU devices. Restoring the floor is a repair (made past the copy cap)."
        ),
    )


class Move(BaseModel):
    """One change of the placement: add copies an expert's weights to a device; remove frees them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["add", "remove"]
    device_id: DeviceId
    expert: ExpertKey


class PlacementStats(BaseModel):
    """Predicted load of a placement under the planner's load model."""

    model_config = ConfigDict(extra="forbid")

    step_time: float = Field(description="sum over layers of the slowest device's time (tokens / speed).")
    balancedness: float = Field(description="sum over layers of mean GPU time / step_time; 1.0 is perfect.")
    layer_time: list[float] = Field(description="Per layer (load row), the slowest device's time.")
    device_time: dict[DeviceId, float] = Field(description="Per device, its time summed over layers.")


class Plan(BaseModel):
    """The planner's answer: a target placement and how to get there."""

    model_config = ConfigDict(extra="forbid")

    target: Placement
    moves: list[Move] = Field(
        description="Adds first (make before break), then removes; in inventory device order, then by expert."
    )
    copies: int = Field(description="Number of 'add' moves: weight copies the reconciler must make.")
    balancedness_before: float | None = Field(description="None when current is not a valid placement.")
    balancedness_after: float
    step_time_before: float | None = Field(description="None when current is not a valid placement.")
    step_time_after: float
    gain: float = Field(description="Predicted step-time cut, 1 - after/before; 1.0 when current was invalid.")
    repaired: bool = Field(description="Current was not a valid placement (experts missing, devices gone, overfull).")
    apply: bool = Field(description="Target differs and (repaired or gain >= knobs.min_gain).")
    stats: PlacementStats = Field(description="Predicted load of the target.")


# --------------------------------------------------------------------------- inputs


class _Fleet:
    """The static side of one planning problem, as arrays indexed by device d, layer row l, expert e."""

    def __init__(self, load, inventory: Inventory, knobs: PlannerKnobs, expert_bytes, layers):
        w = np.asarray(load, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
            raise ValueError(f"load: expected a non-empty [L, E] array, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("load: token counts must be finite and >= 0")
        num_layers, num_experts = w.shape
        self.w = w
        self.layers = list(range(num_layers)) if layers is None else [int(x) for x in layers]
        if len(self.layers) != num_layers or len(set(self.layers)) != num_layers:
            raise ValueError(f"layers: need {num_layers} distinct layer indices (one per load row), got {layers!r}")
        nbytes = np.asarray(expert_bytes)
        if nbytes.ndim == 0:
            nbytes = np.full(w.shape, nbytes)
        if nbytes.shape != w.shape or not np.all(np.isfinite(nbytes)) or np.any(nbytes <= 0):
            raise ValueError(f"expert_bytes: expected a positive number or a positive [L, E] = {w.shape} array")
        self.nbytes = np.ceil(nbytes).astype(np.int64)
        if not inventory.devices:
            raise PlanningError("inventory: no devices to place experts on")
        devs = inventory.devices
        self.ids = [d.device_id for d in devs]
        self.speed = np.array([d.speed for d in devs], dtype=np.float64)
        self.gpu = np.array([d.kind == "gpu" for d in devs])
        self.cap = np.array([int(d.memory_bytes * (1.0 - knobs.headroom)) for d in devs], dtype=np.int64)
        cpu_on = knobs.cpu_tier != "off"
        self.host = self.gpu | cpu_on  # may hold replicas at all
        self.cpu_host = ~self.gpu & cpu_on
        self.row_of = {layer: i for i, layer in enumerate(self.layers)}
        # replicas every expert keeps: min_replicas where GPU memory holds every expert that often
        gpu_cap = int(self.cap[self.gpu].sum())
        floor = min(knobs.min_replicas, int(self.gpu.sum()))
        self.floor = floor if floor > 1 and int(self.nbytes.sum()) * floor <= gpu_cap else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.ids), *self.w.shape)

    def matrix(self, placement: Placement) -> tuple[np.ndarray, bool, list[tuple[DeviceId, ExpertKey]]]:
        """Placement -> bool ``[D, L, E]`` over inventory devices.

        Also returns whether anything had to be left out (devices not in the
        inventory, unknown experts, CPU devices with the CPU tier off,
        duplicates) and the left-out replicas on inventory devices, which the
        plan removes.
        """
        x = np.zeros(self.shape, dtype=bool)
        index = {d: i for i, d in enumerate(self.ids)}
        dropped = False
        stale: list[tuple[DeviceId, ExpertKey]] = []
        for device_id, keys in placement.assignments.items():
            d = index.get(device_id)
            if d is None:
                dropped = dropped or bool(keys)
                continue
            for layer, e in keys:
                row = self.row_of.get(int(layer))
                if row is None or not 0 <= int(e) < self.w.shape[1] or not self.host[d]:
                    dropped = True
                    stale.append((device_id, (int(layer), int(e))))
                elif x[d, row, int(e)]:
                    dropped = True  # listed twice
                else:
                    x[d, row, int(e)] = True
        return x, dropped, stale

    def placement(self, x: np.ndarray, version: int) -> Placement:
        out: dict[DeviceId, list[ExpertKey]] = {}
        for d, device_id in enumerate(self.ids):
            rows, experts = np.nonzero(x[d])
            if len(rows):
                out[device_id] = [(self.layers[r], int(e)) for r, e in zip(rows, experts)]
        speeds = {device_id: float(self.speed[d]) for d, device_id in enumerate(self.ids) if device_id in out}
        return Placement(version=version, assignments=out, speeds=speeds)


# --------------------------------------------------------------------------- state


class _State:
    """A placement being edited, with its derived load: ``S[l,e]``, ``c[l,e] = w/S``, ``T[l,d]``."""

    def __init__(self, fleet: _Fleet, x0: np.ndarray, x: np.ndarray):
        self.f = fleet
        self.x0 = x0
        self.x = x
        self.used = np.einsum("dle,le->d", x.astype(np.int64), fleet.nbytes)
        self.copies = int((x & ~x0).sum())  # weight copies: replicas in x that x0 lacks
        num_layers = fleet.w.shape[0]
        self.cnt = np.zeros(fleet.w.shape, dtype=np.int64)
        self.S = np.zeros(fleet.w.shape)
        self.c = np.zeros(fleet.w.shape)
        self.T = np.zeros((num_layers, len(fleet.ids)))
        for l in range(num_layers):
            self._refresh(l)

    def _refresh(self, l: int) -> None:
        col = self.x[:, l, :]
        self.cnt[l] = col.sum(0)
        self.S[l] = self.f.speed @ col
        self.c[l] = np.divide(self.f.w[l], self.S[l], out=np.zeros_like(self.S[l]), where=self.S[l] > 0)
        self.T[l] = col @ self.c[l]

    def apply(self, ops) -> None:
        for sign, d, l, e in ops:
            self.x[d, l, e] = sign > 0
            self.used[d] += sign * self.f.nbytes[l, e]
            self.copies += sign * (not self.x0[d, l, e])
        for l in {op[2] for op in ops}:
            self._refresh(l)

    def evaluate(self, ops, focus: int, tstar: float) -> tuple[float, int, float] | None:
        """Exact effect of ``ops`` (list of ``(+1 add | -1 drop, d, l, e)``).

        Returns ``(relief, copies, spread)`` where relief is how far the highest
        new time among the focus layer's changed devices stays below ``tstar``
        (the bottleneck) and spread is the sum of squares of the changed
        devices' new times (a tie-breaker: lower is more even); None when the
        ops are invalid, give no relief, or raise another layer's step time.
        """
        f = self.f
        cols: dict[tuple[int, int], np.ndarray] = {}
        mem: dict[int, int] = {}
        cost = 0
        for sign, d, l, e in ops:
            col = cols.get((l, e))
            if col is None:
                col = cols[(l, e)] = self.x[:, l, e].copy()
            if sign > 0:
                if col[d] or not f.host[d]:
                    return None
                col[d] = True
                cost += not self.x0[d, l, e]
            else:
                if not col[d]:
                    return None
                col[d] = False
                cost -= not self.x0[d, l, e]
            mem[d] = mem.get(d, 0) + sign * int(f.nbytes[l, e])
        for d, delta in mem.items():
            if delta > 0 and self.used[d] + delta > f.cap[d]:
                return None
        delta_t: dict[int, np.ndarray] = {}
        touched: dict[int, np.ndarray] = {}
        for (l, e), col in cols.items():
            if not col.any():
                return None
            c_new = f.w[l, e] / f.speed[col].sum()
            old = self.x[:, l, e]
            delta_t[l] = delta_t.get(l, 0.0) + col * c_new - old * self.c[l, e]
            touched[l] = touched.get(l, False) | (col != old)
        relief, spread = None, 0.0
        for l, dt in delta_t.items():
            new_t = self.T[l] + dt
            # devices whose time changes (a swap of equal-speed replicas leaves other holders alone)
            changed = touched[l] | (np.abs(dt) > 1e-12 * max(float(self.T[l].max()), 1e-300))
            spread += float((new_t[changed] ** 2).sum())
            if l == focus:
                relief = tstar - new_t[changed].max()
                if relief <= 0:
                    return None
            else:
                up = changed & (new_t > self.T[l])
                if up.any() and new_t[up].max() >= self.T[l].max():
                    return None
        if relief is None:
            return None
        return relief, cost, spread


def _stats(fleet: _Fleet, t: np.ndarray) -> PlacementStats:
    layer_time = t.max(axis=1)
    step = float(layer_time.sum())
    gpu = fleet.gpu if fleet.gpu.any() else np.ones_like(fleet.gpu)
    mean = float(t[:, gpu].mean(axis=1).sum())
    return PlacementStats(
        step_time=step,
        balancedness=1.0 if step <= 0 else mean / step,
        layer_time=[float(v) for v in layer_time],
        device_time={device_id: float(v) for device_id, v in zip(fleet.ids, t.sum(axis=0))},
    )


# --------------------------------------------------------------------------- construction


def _grow(w: np.ndarray, nbytes: np.ndarray, count: np.ndarray, free: int, max_count: int) -> int:
    """Add replicas in place to the expert with the most load per replica while ``free`` bytes last.

    Experts with count 0 (CPU tier) or no load get none. Returns the bytes left.
    """
    heap = [(-w.flat[i] / count.flat[i], i) for i in range(w.size) if count.flat[i] > 0 and w.flat[i] > 0]
    heapq.heapify(heap)
    min_bytes = int(nbytes.min())
    while heap and free >= min_bytes:
        _, i = heapq.heappop(heap)
        if count.flat[i] >= max_count or nbytes.flat[i] > free:
            continue
        count.flat[i] += 1
        free -= int(nbytes.flat[i])
        heapq.heappush(heap, (-w.flat[i] / count.flat[i], i))
    return free


def _construct(fleet: _Fleet, per_layer: bool) -> np.ndarray:
    """From-scratch placement: tier split, replica counts from free memory, LPT packing.

    ``per_layer``: split the free GPU memory between layers in proportion to
    their experts' bytes (as DeepSeek EPLB gives every layer the same slots)
    instead of letting the hottest replicas of any layer take it.
    """
    num_devices, num_layers, num_experts = fleet.shape
    w, nbytes = fleet.w, fleet.nbytes
    x = np.zeros(fleet.shape, dtype=bool)
    gpus = np.flatnonzero(fleet.gpu)
    gpu_cap = int(fleet.cap[gpus].sum())

    # 1. Coldest experts to the CPU tier while GPU memory cannot hold every expert once.
    on_cpu = np.zeros(w.shape, dtype=bool)
    excess = int(nbytes.sum()) - gpu_cap
    if excess > 0:
        for flat in np.argsort(w.ravel(), kind="stable"):
            if excess <= 0:
                break
            on_cpu.flat[flat] = True
            excess -= int(nbytes.flat[flat])

    # 2. Redundant replicas, one at a time, to the most load per replica, while memory is free
    #    (every GPU expert starts at the floor of replicas).
    count = np.where(on_cpu, 0, fleet.floor if not on_cpu.any() else 1).astype(np.int64)
    free = gpu_cap - int((nbytes * count).sum())
    if per_layer:
        share = nbytes.sum(axis=1) / nbytes.sum()
        for l in range(num_layers):  # count[l:l+1] is a view: grown in place
            _grow(w[l:l + 1], nbytes[l:l + 1], count[l:l + 1], int(free * share[l]), len(gpus))
        free = gpu_cap - int((nbytes * count).sum())
    _grow(w, nbytes, count, free, len(gpus))

    # 3. Pack replicas, hottest per replica first, onto the least loaded GPUs with room.
    t = np.zeros((num_layers, num_devices))
    used = np.zeros(num_devices, dtype=np.int64)
    layer_used = np.zeros((num_layers, num_devices), dtype=np.int64)
    planned = nbytes * count
    total = max(int(planned.sum()), 1)
    quota = planned.sum(axis=1)[:, None] * fleet.cap[None, :] / total  # per-layer share of each device
    order = np.lexsort((np.arange(w.size), -(w / np.maximum(count, 1)).ravel()))
    for flat in order:
        l, e = divmod(int(flat), num_experts)
        k, b = int(count[l, e]), int(nbytes[l, e])
        if k == 0:
            continue
        room = fleet.gpu & (used + b <= fleet.cap)
        cand = np.flatnonzero(room)
        if len(cand) == 0:
            continue  # left for the repair pass
        over = layer_used[l, cand] + b > quota[l, cand] + b / 2
        keys = np.lexsort((cand, -fleet.speed[cand], t[l, cand], over))
        chosen = cand[keys[:k]]
        x[chosen, l, e] = True
        t[l, chosen] += w[l, e] / fleet.speed[chosen].sum()
        used[chosen] += b
        layer_used[l, chosen] += b

    # 4. The CPU tier, hottest first, to the CPU device that ends least loaded.
    cpus = np.flatnonzero(fleet.cpu_host)
    for flat in np.lexsort((np.arange(w.size), -w.ravel())):
        l, e = divmod(int(flat), num_experts)
        if not on_cpu[l, e] or len(cpus) == 0:
            continue
        b = int(nbytes[l, e])
        cand = cpus[used[cpus] + b <= fleet.cap[cpus]]
        if len(cand) == 0:
            continue
        d = cand[np.argmin(t[l, cand] + w[l, e] / fleet.speed[cand])]
        x[d, l, e] = True
        t[l, d] += w[l, e] / fleet.speed[d]
        used[d] += b
    return x


# --------------------------------------------------------------------------- repair


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


def _drop_choices(st: _State) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per device, the redundant replica whose removal hurts least.

    Returns ``has [D]`` bool, ``flat [D]`` (index into ``[L*E]``) and ``slack [D]``:
    how far the highest time among the expert's other holders stays below its
    layer's step time after the drop; drops that would raise it are left out.
    """
    f = st.f
    num_devices, _, num_experts = f.shape
    red_flat = np.flatnonzero(st.cnt.ravel() > f.floor)  # experts with a redundant replica
    d, col = np.nonzero(st.x.reshape(num_devices, -1)[:, red_flat])  # one entry per their replicas
    key = red_flat[col]
    l = key // num_experts
    t = st.T[l, d]
    order = np.lexsort((-t, key))  # grouped by expert, busiest holder first
    head = np.ones(len(order), dtype=bool)
    head[1:] = key[order][1:] != key[order][:-1]
    top1 = np.full(st.cnt.size, -np.inf)
    top1[key[order][head]] = t[order][head]
    second = np.zeros(len(order), dtype=bool)
    second[1:] = ~head[1:] & head[:-1]
    top2 = np.full(st.cnt.size, -np.inf)
    top2[key[order][second]] = t[order][second]
    is_top = np.zeros(len(order), dtype=bool)
    is_top[order[head]] = True
    other = np.where(is_top, top2[key], top1[key])  # busiest other holder of the same expert
    c_after = f.w.ravel()[key] / (st.S.ravel()[key] - f.speed[d])
    slack = st.T.max(axis=1)[l] - (other + c_after - st.c.ravel()[key])
    ok = slack > 0
    return _per_device_best(d[ok], slack[ok], key[ok], num_devices)


def _coldest_singletons(st: _State) -> tuple[np.ndarray, np.ndarray]:
    """Per GPU device, its coldest expert that has no other replica: ``has [D]``, ``flat [D]``."""
    f = st.f
    num_experts = f.shape[2]
    d, l, e = np.nonzero(st.x & (st.cnt == 1)[None] & f.gpu[:, None, None])
    key = l * num_experts + e
    has, flat, _ = _per_device_best(d, -f.w.ravel()[key], key, f.shape[0])
    return has, flat


def _place_unplaced(st: _State) -> None:
    """Give every expert without a replica one, hottest first; raise PlanningError if memory is short."""
    f = st.f
    num_experts = f.shape[2]
    missing = np.flatnonzero((st.cnt == 0).ravel())
    for flat in missing[np.lexsort((missing, -f.w.ravel()[missing]))]:
        l, e = divmod(int(flat), num_experts)
        b, we = int(f.nbytes[l, e]), f.w[l, e]
        room = f.cap - st.used
        gpu_fit = np.flatnonzero(f.gpu & (room >= b))
        if len(gpu_fit):  # a GPU with room
            d = gpu_fit[np.argmin(st.T[l, gpu_fit] + we / f.speed[gpu_fit])]
            st.apply([(1, int(d), l, e)])
            continue
        nb = f.nbytes.ravel()
        d = _make_room(st, f.gpu, b)
        if d is not None:  # redundant replicas on a GPU made way
            st.apply([(1, d, l, e)])
            continue
        room = f.cap - st.used
        cpus = np.flatnonzero(f.cpu_host)
        if len(cpus):
            has_s, sflat = _coldest_singletons(st)
            colder = has_s & (f.w.ravel()[sflat] < we) & (room + nb[sflat] >= b)
            for d in np.flatnonzero(colder)[np.argsort(f.w.ravel()[sflat[colder]], kind="stable")]:
                hl, he = divmod(int(sflat[d]), num_experts)
                k_fit = cpus[room[cpus] >= nb[sflat[d]]]
                if len(k_fit):  # a colder GPU expert makes way, to the CPU tier
                    k = k_fit[np.argmin(st.T[hl, k_fit] + f.w[hl, he] / f.speed[k_fit])]
                    st.apply([(-1, int(d), hl, he), (1, int(k), hl, he), (1, int(d), l, e)])
                    break
            else:
                k_fit = cpus[room[cpus] >= b]
                if len(k_fit):
                    k = k_fit[np.argmin(st.T[l, k_fit] + we / f.speed[k_fit])]
                    st.apply([(1, int(k), l, e)])
                else:
                    k = _make_room(st, f.cpu_host, b)
                    if k is not None:
                        st.apply([(1, k, l, e)])
            if st.cnt[l, e] > 0:
                continue
        key = (f.layers[l], e)
        raise PlanningError(
            f"inventory: not enough device memory to hold expert {key} ({b} bytes) with every other expert "
            f"placed once (cpu_tier and headroom limit where experts may go)"
        )


def _make_room(st: _State, mask: np.ndarray, b: int) -> int | None:
    """Free ``b`` bytes on a device in ``mask`` by dropping redundant replicas, coldest per replica first.

    Picks the device where the dropped replicas carry the least load (ties:
    lower index); returns it, or None if no device can make room.
    """
    f = st.f
    best = None
    for d in np.flatnonzero(mask):
        room = int(f.cap[d] - st.used[d])
        redundant = np.argwhere(st.x[d] & (st.cnt > f.floor))
        order = np.argsort(st.c[redundant[:, 0], redundant[:, 1]], kind="stable") if len(redundant) else []
        drops, lost = [], 0.0
        for i in order:
            if room >= b:
                break
            l, e = (int(v) for v in redundant[i])
            drops.append((-1, int(d), l, e))
            room += int(f.nbytes[l, e])
            lost += st.c[l, e]
        if room >= b and (best is None or lost < best[0]):
            best = (lost, int(d), drops)
    if best is None:
        return None
    st.apply(best[2])
    return best[1]


def _repair(st: _State) -> None:
    """Evacuate overfull devices (redundant replicas first, coldest first), then place missing experts."""
    f = st.f
    num_experts = f.shape[2]
    for d in np.flatnonzero(st.used > f.cap):
        while st.used[d] > f.cap[d]:
            held = np.flatnonzero(st.x[d].ravel())
            redundant = held[st.cnt.ravel()[held] > f.floor]
            pool = redundant if len(redundant) else held
            per_replica = st.c.ravel()[pool] if len(redundant) else f.w.ravel()[pool]
            l, e = divmod(int(pool[np.argmin(per_replica)]), num_experts)
            st.apply([(-1, int(d), l, e)])
    _place_unplaced(st)
    _restore_floor(st)


def _restore_floor(st: _State) -> None:
    """Give every expert below the replica floor more replicas, hottest first, on the least loaded GPUs with room."""
    f = st.f
    if f.floor <= 1:
        return
    num_experts = f.shape[2]
    short = np.flatnonzero((st.cnt < f.floor).ravel())
    for flat in short[np.lexsort((short, -f.w.ravel()[short]))]:
        l, e = divmod(int(flat), num_experts)
        while st.cnt[l, e] < f.floor:
            b = f.nbytes[l, e]
            fit = np.flatnonzero(f.gpu & ~st.x[:, l, e] & (f.cap - st.used >= b))
            if len(fit):
                d = fit[np.argmin(st.T[l, fit] + f.w[l, e] / (st.S[l, e] + f.speed[fit]))]
                st.apply([(1, int(d), l, e)])
                continue
            ops = _floor_shuffle(st, l, e)
            if ops is None:
                break  # memory is short here: left at fewer replicas
            st.apply(ops)


def _floor_shuffle(st: _State, l: int, e: int):
    """Room for another replica of (l, e) where only its own holders have room: move a replica
    (l2, e2) from a full device that lacks (l, e) to a holder with room that lacks (l2, e2), then add."""
    f = st.f
    b = f.nbytes[l, e]
    room = f.cap - st.used
    for src in np.flatnonzero(f.gpu & st.x[:, l, e] & (room > 0)):
        for dst in np.flatnonzero(f.gpu & ~st.x[:, l, e]):
            for l2, e2 in np.argwhere(st.x[dst] & ~st.x[src]):
                b2 = f.nbytes[l2, e2]
                if room[src] >= b2 and room[dst] + b2 >= b:
                    return [(-1, int(dst), int(l2), int(e2)), (1, int(src), int(l2), int(e2)), (1, int(dst), l, e)]
    return None


# --------------------------------------------------------------------------- search

_ADD, _MOVE, _REPLACE, _REPLACE_MOVE, _OFFLOAD, _SWAP, _XSWAP, _TRADE = range(8)
_NOMINAL = {_ADD: 1, _MOVE: 1, _REPLACE: 1, _REPLACE_MOVE: 1, _OFFLOAD: 2, _SWAP: 2, _XSWAP: 2, _TRADE: 1}
_EXPERTS_TRIED = 8  # experts on the bottleneck device considered, hottest per replica first
_SWAP_EXPERTS = 4
_SWAP_PARTNERS = 16  # least loaded devices considered as swap partners
_EVALS_PER_LAYER = 24  # exact evaluations per layer and step, best prescores first
_VALID_PER_LAYER = 3


class _Context:
    """Per-step precomputation shared by the layers' candidate generators."""

    def __init__(self, st: _State, auto: bool):
        f = st.f
        self.room = f.cap - st.used
        self.drop_has, self.drop_flat, slack = _drop_choices(st)
        # the highest time among the dropped expert's other holders, after the drop
        self.drop_peak = np.where(self.drop_has, st.T.max(axis=1)[self.drop_flat // f.shape[2]] - slack, 0.0)
        num_devices = f.shape[0]
        cpus = np.flatnonzero(f.cpu_host)
        # coldest singletons feed offloads (auto) and swaps off a CPU bottleneck
        if (auto and len(cpus)) or (st.used[cpus] > 0).any():
            self.single_has, self.single_flat = _coldest_singletons(st)
        else:
            self.single_has, self.single_flat = np.zeros(num_devices, bool), np.zeros(num_devices, np.int64)
        self.off_has = np.zeros(num_devices, dtype=bool)
        self.off_to = np.zeros(num_devices, dtype=np.int64)
        if auto and len(cpus):
            num_experts = f.shape[2]
            layer_max = st.T.max(axis=1)
            for d in np.flatnonzero(self.single_has):
                hl, he = divmod(int(self.single_flat[d]), num_experts)
                fit = cpus[self.room[cpus] >= f.nbytes[hl, he]]
                if len(fit) == 0:
                    continue
                new_t = st.T[hl, fit] + f.w[hl, he] / f.speed[fit]
                k = int(np.argmin(new_t))
                if new_t[k] < layer_max[hl]:
                    self.off_has[d], self.off_to[d] = True, fit[k]


def _layer_candidates(st: _State, ctx: _Context, l: int, out: list) -> None:
    """Append ``(prescore per copy, kind, l, e, d, extra)`` candidates relieving layer l's bottleneck."""
    f = st.f
    num_devices, _, num_experts = f.shape
    t_l = st.T[l]
    dstar = int(np.argmax(t_l))
    tstar = t_l[dstar]
    if tstar <= 0:
        return
    on = np.flatnonzero(st.x[dstar, l])
    on = on[np.argsort(-st.c[l, on], kind="stable")][:_EXPERTS_TRIED]
    room = ctx.room
    nb_flat, w_flat, c_flat = f.nbytes.ravel(), f.w.ravel(), st.c.ravel()
    drop_l = ctx.drop_flat // num_experts
    drop_same = np.where(ctx.drop_has & (drop_l == l), c_flat[ctx.drop_flat], 0.0)
    drop_peak = np.where(ctx.drop_has & (drop_l == l), ctx.drop_peak, -np.inf)  # g's holders, same layer
    drop_b = np.where(ctx.drop_has, nb_flat[ctx.drop_flat], 0)
    single_l = ctx.single_flat // num_experts
    single_same = np.where(ctx.single_has & (single_l == l), c_flat[ctx.single_flat], 0.0)
    single_b = np.where(ctx.single_has, nb_flat[ctx.single_flat], 0)
    light = np.argsort(t_l, kind="stable")[:_SWAP_PARTNERS]
    light = light[light != dstar]
    holders_other = st.x[:, l, :].copy()
    holders_other[dstar] = False
    # Trading a redundant replica g of this layer for e: g's other holders take up its share.
    red_cols = np.flatnonzero(st.cnt[l] > f.floor)  # [G] experts of layer l with a redundant replica
    if len(red_cols):
        x_g = st.x[:, l, red_cols]  # [D, G]
        holder_t = np.where(x_g, t_l[:, None], -np.inf)
        top_d = holder_t.argmax(axis=0)
        cols = np.arange(len(red_cols))
        top1 = holder_t[top_d, cols]
        holder_t[top_d, cols] = -np.inf
        g_other = np.where(np.arange(num_devices)[:, None] == top_d[None, :], holder_t.max(axis=0)[None], top1[None])
        g_c = st.c[l, red_cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            g_rise = np.where(x_g, f.w[l, red_cols][None] / (st.S[l, red_cols][None] - f.speed[:, None]) - g_c, 0.0)
        g_on_star = np.where(x_g[dstar][None, :], g_rise, 0.0)
        g_fits_b = room[:, None] + f.nbytes[l, red_cols][None, :]

    def push(score, mask, kind, e, extra=None):
        idx = np.flatnonzero(mask)
        if len(idx):
            out.append((score[idx] / _NOMINAL[kind], kind, l, e, idx, None if extra is None else extra[idx], tstar))

    for rank, e in enumerate(on):
        e = int(e)
        ce, we, be, se = st.c[l, e], f.w[l, e], int(f.nbytes[l, e]), st.S[l, e]
        holders = st.x[:, l, e]
        free_dev = f.gpu & ~holders  # new replicas go to GPUs; CPUs only take offloads
        c_add = we / (se + f.speed)
        keep_star = tstar - (ce - c_add)
        fits = room >= be
        push(tstar - np.maximum(keep_star, t_l + c_add), free_dev & fits, _ADD, e)
        s_mv = se - f.speed[dstar] + f.speed
        c_mv = we / s_mv
        others = t_l[holders_other[:, e]]
        other_max = others.max() if len(others) else -np.inf
        mv_new = np.maximum(np.maximum(tstar - ce, t_l + c_mv), other_max + c_mv - ce)
        push(tstar - mv_new, free_dev & fits, _MOVE, e)
        need = free_dev & ~fits
        not_self = ctx.drop_flat != l * num_experts + e
        rep = need & ctx.drop_has & not_self & (room + drop_b >= be)
        rep_add = np.maximum(np.maximum(keep_star, t_l - drop_same + c_add), drop_peak)
        push(tstar - rep_add, rep, _REPLACE, e)
        rep_mv = np.maximum(np.maximum(tstar - ce, t_l - drop_same + c_mv), drop_peak)
        push(tstar - rep_mv, rep, _REPLACE_MOVE, e)
        off = need & ctx.off_has & f.gpu & (room + single_b >= be)
        push(tstar - np.maximum(keep_star, t_l - single_same + c_add), off, _OFFLOAD, e)
        if rank < _SWAP_EXPERTS and len(red_cols):
            trade = x_g & need[:, None] & (g_fits_b >= be) & (red_cols != e)[None, :]
            star_new = tstar - (ce - c_add[:, None]) + g_on_star
            new_max = np.maximum(np.maximum(star_new, (t_l + c_add)[:, None] - g_c[None]), g_other + g_rise)
            score = np.where(trade, tstar - new_max, -np.inf)
            best_g = score.argmax(axis=1)
            best = score[np.arange(num_devices), best_g]
            mask = np.isfinite(best) & (best > 0)
            if mask.any():
                out.append((best[mask], _TRADE, l, e, np.flatnonzero(mask), red_cols[best_g[mask]], tstar))
        if not f.gpu[dstar] and f.host[dstar]:
            xs = f.gpu & ~holders & ctx.single_has & (w_flat[ctx.single_flat] < we)
            xs &= (room + single_b >= be) & (room[dstar] + be >= single_b)
            h_on_star = np.where(single_l == l, w_flat[ctx.single_flat] / f.speed[dstar], 0.0)
            push(tstar - np.maximum(tstar - ce + h_on_star, t_l - single_same + c_mv), xs, _XSWAP, e)
        if rank < _SWAP_EXPERTS and len(light):
            # swap e (on dstar) with f (on a light device p); speeds taken as equal for the prescore
            part = light[~holders[light] & f.host[light]]
            if len(part) == 0:
                continue
            cand_f = st.x[part, l, :] & ~st.x[dstar, l, :][None, :]
            cand_f &= (room[part, None] + f.nbytes[l][None, :] >= be) & (room[dstar] + be >= f.nbytes[l][None, :])
            cl = st.c[l][None, :]
            new_max = np.maximum(tstar - ce + cl, t_l[part, None] - cl + ce)
            score = np.where(cand_f, tstar - new_max, -np.inf)
            best_f = score.argmax(axis=1)
            best = score[np.arange(len(part)), best_f]
            mask = np.isfinite(best) & (best > 0)
            if mask.any():
                out.append((best[mask] / 2, _SWAP, l, e, part[mask], best_f[mask], tstar))


def _ops(st: _State, ctx: _Context, kind: int, l: int, e: int, d: int, extra) -> list[tuple[int, int, int, int]]:
    num_experts = st.f.shape[2]
    dstar = int(np.argmax(st.T[l]))
    if kind == _ADD:
        return [(1, d, l, e)]
    if kind == _MOVE:
        return [(-1, dstar, l, e), (1, d, l, e)]
    if kind in (_REPLACE, _REPLACE_MOVE):
        gl, ge = divmod(int(ctx.drop_flat[d]), num_experts)
        head = [(-1, d, gl, ge)]
        return head + ([(1, d, l, e)] if kind == _REPLACE else [(-1, dstar, l, e), (1, d, l, e)])
    hl, he = divmod(int(ctx.single_flat[d]), num_experts)
    if kind == _OFFLOAD:
        return [(-1, d, hl, he), (1, int(ctx.off_to[d]), hl, he), (1, d, l, e)]
    if kind == _XSWAP:
        return [(-1, dstar, l, e), (1, d, l, e), (-1, d, hl, he), (1, dstar, hl, he)]
    if kind == _TRADE:
        return [(-1, d, l, int(extra)), (1, d, l, e)]
    fe = int(extra)  # _SWAP
    return [(-1, dstar, l, e), (1, d, l, e), (-1, d, l, fe), (1, dstar, l, fe)]


def _search(st: _State, knobs: PlannerKnobs, budget: int | None) -> None:
    """Greedy moves until stuck, then a layer re-pack if one pays for its copies; repeat."""
    steps = knobs.max_search_steps
    while steps > 0:
        steps -= _greedy(st, knobs, budget, steps)
        if steps <= 0 or (budget is not None and st.copies >= budget) or not _repack_round(st, knobs, budget):
            return
        steps -= 1


_REPACK_STICKINESS = (0.0, 0.25, 0.5, 1.0, 2.0)  # x the layer's mean replica time


def _repack_layer(st: _State, l: int, stickiness: float) -> list[tuple[int, int, int, int]] | None:
    """Re-plan layer l's replicas on the same per-device slot counts (memory neutral).

    Replica counts from the layer's slots (most load per replica first), then
    LPT packing where a device that already holds the expert looks
    ``stickiness`` x the mean replica time lighter, so fewer copies change.
    Only for layers on GPU devices with one expert size. Returns the ops or None.
    """
    f = st.f
    cur = st.x[:, l, :]
    if (cur & ~f.gpu[:, None]).any() or np.ptp(f.nbytes[l]) != 0:
        return None
    slots = cur.sum(axis=1)
    hosts = int((slots > 0).sum())
    count = np.full(f.shape[2], min(f.floor, hosts), dtype=np.int64)
    w_l = f.w[l]
    heap = [(-w_l[e], e) for e in range(len(w_l))]
    heapq.heapify(heap)
    for _ in range(int(slots.sum()) - len(w_l)):
        while heap and count[heap[0][1]] >= hosts:
            heapq.heappop(heap)
        if not heap:
            return None
        _, e = heapq.heappop(heap)
        count[e] += 1
        heapq.heappush(heap, (-w_l[e] / count[e], e))
    bonus = stickiness * float(st.c[l][st.cnt[l] > 0].mean()) if stickiness else 0.0
    t = np.zeros(len(slots))
    left = slots.copy()
    new = np.zeros_like(cur)
    for e in np.lexsort((np.arange(len(w_l)), -w_l / count)):
        cand = np.flatnonzero(left > 0)
        k = int(count[e])
        if len(cand) < k:
            return None
        chosen = cand[np.lexsort((cand, t[cand] - bonus * cur[cand, e]))[:k]]
        new[chosen, e] = True
        t[chosen] += w_l[e] / f.speed[chosen].sum()
        left[chosen] -= 1
    adds, drops = np.argwhere(new & ~cur), np.argwhere(cur & ~new)
    return [(1, int(d), l, int(e)) for d, e in adds] + [(-1, int(d), l, int(e)) for d, e in drops]


def _repack_round(st: _State, knobs: PlannerKnobs, budget: int | None) -> bool:
    """Try re-packing each layer, worst balanced first; apply the first that pays. True if applied."""
    num_layers = st.f.shape[1]
    layer_max = st.T.max(axis=1)
    threshold = knobs.hysteresis * layer_max.sum() / num_layers
    mean = st.T.mean(axis=1)
    for l in np.lexsort((np.arange(num_layers), -(layer_max - mean))):
        best, best_value = None, threshold
        for stickiness in _REPACK_STICKINESS:
            ops = _repack_layer(st, int(l), stickiness)
            if not ops:
                continue
            cost = sum((1 if sign > 0 else -1) * (not st.x0[d, ll, e]) for sign, d, ll, e in ops)
            if budget is not None and st.copies + cost > budget:
                continue
            gain = layer_max[l] - _layer_time_after(st, l, ops).max()
            value = gain / max(cost, 1)
            if gain > 0 and value > best_value:
                best, best_value = ops, value
        if best is not None:
            st.apply(best)
            return True
    return False


def _layer_time_after(st: _State, l: int, ops) -> np.ndarray:
    """``T[l]`` after ops that touch layer l only."""
    x_l = st.x[:, l, :].copy()
    for sign, d, _, e in ops:
        x_l[d, e] = sign > 0
    s_l = st.f.speed @ x_l
    c_l = np.divide(st.f.w[l], s_l, out=np.zeros_like(s_l), where=s_l > 0)
    return x_l @ c_l


def _better(a: tuple | None, b: tuple | None) -> bool:
    """Is ``a = (value, spread, ...)`` better than ``b``: more value, or as much and a lower spread."""
    if a is None:
        return False
    if b is None:
        return True
    tol = 1e-9 * max(abs(a[0]), abs(b[0]))
    return a[0] > b[0] + tol or (a[0] >= b[0] - tol and a[1] < b[1])


def _best_for_layer(st: _State, ctx: _Context, l: int, budget: int | None, floor: float):
    """The best valid candidate for layer l's bottleneck: ``(ops, (value, spread, copies))`` or ``(None, None)``.

    Value is relief per copy and must beat ``floor``.
    """
    blocks: list = []
    _layer_candidates(st, ctx, l, blocks)
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
        _, kind, _, e, ds, extra, tstar = blocks[owner[i]]
        j = pos[i]
        ops = _ops(st, ctx, kind, l, e, int(ds[j]), None if extra is None else extra[j])
        score = _value(st, ops, l, tstar, budget)
        if score is None or score[0] <= floor:
            continue
        valid += 1
        if _better(score, best_score):
            best, best_score = ops, score
    return best, best_score


def _value(st: _State, ops, l: int, tstar: float, budget: int | None) -> tuple[float, float, int] | None:
    """``(relief per copy, spread, copies)`` of ops for layer l, or None if invalid or over the copy budget."""
    result = st.evaluate(ops, l, tstar)
    if result is None:
        return None
    relief, cost, spread = result
    if budget is not None and st.copies + cost > budget:
        return None
    return relief / max(cost, 1), spread, cost


def _greedy(st: _State, knobs: PlannerKnobs, budget: int | None, max_steps: int) -> int:
    """Greedy moves until no candidate beats the hysteresis or the copy budget is spent; returns steps made.

    Each layer's best candidate is kept between steps and only re-checked while
    the layer is untouched; every layer is searched afresh before giving up.
    """
    num_layers = st.f.shape[1]
    auto = knobs.cpu_tier == "auto"
    cached: dict[int, list | None] = {}
    scores: dict[int, tuple[float, float] | None] = {}
    dirty = set(range(num_layers))
    moved_layers: set[int] = set()
    moved_devices: set[int] = set()
    step = 0
    while step < max_steps:
        if budget is not None and st.copies >= budget:
            return step
        layer_max = st.T.max(axis=1)
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
                    untouched = st.copies + scores[l][2] <= budget
                if not untouched:
                    scores[l] = _value(st, ops, l, layer_max[l], budget)
                if scores[l] is not None and scores[l][0] <= threshold:
                    scores[l] = None
            if l in dirty or (ops is not None and scores[l] is None):
                ctx = ctx or _Context(st, auto)
                cached[l], scores[l] = _best_for_layer(st, ctx, l, budget, threshold)
                dirty.add(l)
            if cached.get(l) is not None and _better(scores[l], best_score):
                best, best_score = cached[l], scores[l]
        if best is None:
            if len(dirty) == num_layers:
                return step
            dirty = set(range(num_layers))  # search every layer afresh before stopping
            continue
        st.apply(best)
        moved_layers = {op[2] for op in best}
        moved_devices = {op[1] for op in best}
        dirty = set(moved_layers)
        step += 1
    return step


# --------------------------------------------------------------------------- API


def predict(load, inventory: Inventory, placement: Placement, *, layers: Sequence[int] | None = None) -> PlacementStats:
    """Predicted load of ``placement`` under the planner's load model (see the module docstring).

    ``load`` is ``[L, E]``; row ``i`` is layer ``layers[i]`` (default ``range(L)``).
    Replicas on devices not in ``inventory`` or of experts outside ``load`` are ignored.
    """
    fleet = _Fleet(load, inventory, PlannerKnobs(headroom=0.0, cpu_tier="overflow"), 1, layers)
    x, _, _ = fleet.matrix(placement)
    return _stats(fleet, _State(fleet, x, x).T)


def plan(
    load,
    inventory: Inventory,
    current: Placement,
    knobs: PlannerKnobs | None = None,
    *,
    expert_bytes,
    layers: Sequence[int] | None = None,
) -> Plan:
    """Turn the load window, the fleet and the current placement into a target placement.

    Args:
        load: ``[L, E]`` float, decayed token count per (layer row, expert);
            anything ``numpy.asarray`` accepts (numpy, lists, CPU tensors).
        inventory: the devices experts may live on (GPU and CPU kinds, memory, speed).
        current: the placement in force; empty to plan from scratch.
        knobs: tuning (``PlannerKnobs()`` defaults when None).
        expert_bytes: weight size of one replica, one number or ``[L, E]``.
        layers: the model layer index of each load row (default ``range(L)``);
            the target's keys are ``(layers[i], e)``.

    Returns:
        A ``Plan``; deterministic for equal inputs.

    Raises:
        ValueError: malformed inputs. ``PlanningError`` (a ValueError) when
        memory cannot hold every expert once.
    """
    knobs = knobs or PlannerKnobs()
    fleet = _Fleet(load, inventory, knobs, expert_bytes, layers)
    x0, dropped, stale = fleet.matrix(current)
    initial = not x0.any()
    before_state = _State(fleet, x0, x0.copy())
    broken = (
        dropped
        or bool((before_state.cnt < fleet.floor).any())
        or bool((before_state.cnt == 0).any())
        or bool((before_state.used > fleet.cap).any())
    )
    if initial:  # two constructions, each improved; keep the faster (the first on ties)
        st = None
        for per_layer in (False, True):
            trial = _State(fleet, x0, _construct(fleet, per_layer))
            _repair(trial)
            _search(trial, knobs, None)
            if st is None or trial.T.max(axis=1).sum() < st.T.max(axis=1).sum():
                st = trial
    else:
        st = _State(fleet, x0, x0.copy())
        _repair(st)
        _search(st, knobs, max(knobs.max_moves_per_step, st.copies))

    after = _stats(fleet, st.T)
    before = None if broken else _stats(fleet, before_state.T)
    if before is None:
        gain = 1.0
    elif before.step_time > 0:
        gain = 1.0 - after.step_time / before.step_time
    else:
        gain = 0.0
    adds, removes = st.x & ~x0, x0 & ~st.x
    moves = []
    for kind, mat in (("add", adds), ("remove", removes)):
        for d, l, e in zip(*np.nonzero(mat)):
            moves.append(Move(kind=kind, device_id=fleet.ids[d], expert=(fleet.layers[l], int(e))))
    moves += [Move(kind="remove", device_id=device_id, expert=key) for device_id, key in stale]
    changed = bool(moves) or dropped
    target = fleet.placement(st.x, current.version + 1 if changed else current.version)
    return Plan(
        target=target,
        moves=moves,
        copies=int(adds.sum()),
        balancedness_before=None if before is None else before.balancedness,
        balancedness_after=after.balancedness,
        step_time_before=None if before is None else before.step_time,
        step_time_after=after.step_time,
        gain=gain,
        repaired=broken,
        apply=changed and (broken or gain >= knobs.min_gain),
        stats=after,
    )
