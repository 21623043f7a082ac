"""Expert placement planner: ``plan(load, inventory, current, knobs) -> Plan``. Pure.

Plain functions over plain data: no Ray, no Redis, no clock. The controller
feeds it the decayed load window, the fleet's devices and the placement now
in force, and hands the returned target to the reconciler.

One module per concern:

* ``schema``: the knobs (``PlannerKnobs``) and the answers (``Plan``,
  ``Move``, ``PlacementStats``, ``PlanningError``);
* ``model``: the load and fleet model (what "balanced" means; ``Fleet``,
  ``PlacementState``);
* ``construction``: a placement from scratch;
* ``repair``: a valid placement from a broken one;
* ``search``: the local search that improves it;
* this module: the API, ``plan`` and ``predict``.

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

from collections.abc import Sequence

import numpy as np

from moefleet.core.placement import Inventory, Placement

from .construction import construct
from .model import Fleet, PlacementState, placement_stats, replica_floor
from .repair import repair
from .schema import Move, PlacementStats, Plan, PlannerKnobs, PlanningError
from .search import search

__all__ = ["Move", "Plan", "PlannerKnobs", "PlanningError", "PlacementStats", "min_replicas", "plan", "predict"]


def min_replicas(inventory: Inventory, knobs: PlannerKnobs, *, expert_bytes, shape: tuple[int, int]) -> dict:
    """What ``knobs.min_replicas`` comes to on ``inventory``: ``{"setting", "replicas", "why"}``.

    expert_bytes: one replica's bytes (a number or ``[L, E]``); shape: ``(L, E)``.
    """
    sizes = np.ceil(np.broadcast_to(np.asarray(expert_bytes, dtype=float), shape)).astype(np.int64)
    capacities = [int(d.memory_bytes * (1.0 - knobs.headroom)) for d in inventory.devices if d.kind == "gpu"]
    floor, why = replica_floor(knobs.min_replicas, capacities, sizes)
    return {"setting": knobs.min_replicas, "replicas": floor, "why": why}


def predict(load, inventory: Inventory, placement: Placement, *, layers: Sequence[int] | None = None) -> PlacementStats:
    """Predicted load of ``placement`` under the planner's load model (see the module docstring).

    ``load`` is ``[L, E]``; row ``i`` is layer ``layers[i]`` (default ``range(L)``).
    Replicas on devices not in ``inventory`` or of experts outside ``load`` are ignored.
    """
    fleet = Fleet(load, inventory, PlannerKnobs(headroom=0.0, cpu_tier="overflow"), 1, layers)
    held, _, _ = fleet.matrix(placement)
    return placement_stats(fleet, PlacementState(fleet, held, held).device_time)


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
    fleet = Fleet(load, inventory, knobs, expert_bytes, layers)
    start, dropped, stale = fleet.matrix(current)
    initial = not start.any()
    before_state = PlacementState(fleet, start, start.copy())
    broken = (
        dropped
        or bool((before_state.replicas < fleet.replica_floor).any())
        or bool((before_state.replicas == 0).any())
        or bool((before_state.used > fleet.capacity).any())
    )
    if initial:  # two constructions, each improved; keep the faster (the first on ties)
        state = None
        for per_layer in (False, True):
            trial = PlacementState(fleet, start, construct(fleet, per_layer))
            repair(trial)
            search(trial, knobs, None)
            if state is None or trial.device_time.max(axis=1).sum() < state.device_time.max(axis=1).sum():
                state = trial
    else:
        state = PlacementState(fleet, start, start.copy())
        repair(state)
        search(state, knobs, max(knobs.max_moves_per_step, state.copies))

    after = placement_stats(fleet, state.device_time)
    before = None if broken else placement_stats(fleet, before_state.device_time)
    if before is None:
        gain = 1.0
    elif before.step_time > 0:
        gain = 1.0 - after.step_time / before.step_time
    else:
        gain = 0.0
    adds, removes = state.held & ~start, start & ~state.held
    moves = []
    for kind, mat in (("add", adds), ("remove", removes)):
        for d, l, e in zip(*np.nonzero(mat)):
            moves.append(Move(kind=kind, device_id=fleet.device_ids[d], expert=(fleet.layers[l], int(e))))
    moves += [Move(kind="remove", device_id=device_id, expert=key) for device_id, key in stale]
    changed = bool(moves) or dropped
    target = fleet.placement(state.held, current.version + 1 if changed else current.version)
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
