"""What one control step decides, pure: the active devices, then the plan, then whether it pays. No Ray, no Redis, no clock.

``Controller.step`` (``main.py``) reads its inputs from Redis and Ray, calls
``decide`` and hands the plan to the reconciler; the fleet simulator
(``controller/sim/``) calls the same function with simulated inputs, so both
make the same decision from the same inputs:

1. autoscaling (when ``config.autoscaling`` is set): the number of active
   devices follows the workers' queue depth (``autoscale.autoscale_step``);
   the active devices are the first ``desired`` of the live ones;
2. hot sets: the load's hot set is tracked; its measured lifetimes give the
   horizon a plan's gain is counted over (``planner.gate.HotSetTracker``);
3. predicted against measured: after an applied plan, the balancedness the
   devices measured is compared with the model's prediction for the same
   load (``prediction.py``); a miss corrects the devices' speeds as the
   planner sees them;
4. planning: skipped when no device is live, or when the load window saw
   fewer than ``config.min_tokens`` tokens, a placement exists, no worker is
   down and every expert has the replicas ``min_replicas`` comes to (a fleet
   below that floor is repaired before any traffic arrives); otherwise ``planner.plan`` from the load (all ones when nothing
   was measured yet, so a repair after a fresh start treats experts alike),
   the active devices and the current placement;
5. the decision: a repair is applied at once, and so is a plan that fills
   devices autoscaling just added (uncapped by ``max_moves_per_step``: new
   capacity that takes no load helps no one). Any other plan the planner
   marks ``apply`` (its gain at least ``min_gain``) is applied only when it
   pays for itself -- ``gain x horizon > kappa x cost`` (``planner.gate``) --,
   no plan was applied within ``cooldown_s``, and the same plan (moves at
   least 80% alike) has passed ``confirm_steps`` steps in a row. Otherwise the
   plan's ``apply`` is turned off and the report says why (``plan_skipped``).

State between steps (hot sets, cooldown, the plan being confirmed, the
prediction being checked, the learned corrections) lives in the controller's
record, which ``decide`` takes and returns: the decision is a function of its
inputs.
"""

from __future__ import annotations

import time

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moefleet.core.placement import DeviceSpec, Inventory, Placement

from .autoscale import autoscale_step
from .planner import Move, Plan, min_replicas, plan, predict
from .planner.gate import HotSetTracker, LinkSpeeds, move_cost, passes
from .prediction import apply_speed_factors, compare, update_speed_factors

if TYPE_CHECKING:
    from .main import ControllerConfig

__all__ = ["Decision", "decide", "moves_alike", "record_apply_seconds"]

SAME_PLAN = 0.8
"""Two plans are the same plan when their move sets overlap this much (Jaccard): ``confirm_steps`` counts them."""


@dataclass
class Decision:
    """The outcome of one control step.

    report: what the step saw and decided (stored with the controller's record
        and emitted as a ``plan`` event): ``at``, ``placement_version``,
        ``active_devices`` (with autoscaling), ``tokens``, ``horizon_s``, then
        either ``skipped`` or the plan's ``balancedness_before/after``,
        ``gain``, ``copies``, ``apply``, ``repaired``, and ``cost`` (the
        move's ``seconds``, ``bytes_moved``, ...) and ``benefit_s``; a plan
        with moves that is not applied adds ``plan_skipped`` (``reason``:
        ``min_gain``, ``cost``, ``cooldown`` or ``confirming``, with gain and
        cost); a finished check of a prediction adds ``prediction``
        (``measured``, ``predicted``, ``error``, ``miss``).
    record: the controller's record to store (a new dict; the input is not
        modified): ``active_devices`` and ``autoscale_state`` with autoscaling;
        ``hot_set``, ``cooldown_until``, ``candidate``, ``pending_prediction``,
        ``prediction``, ``model`` (``speed`` factors, ``cost_factor``).
    plan: the plan, or None when planning was skipped; its ``apply`` is the
        decision (turned off when the gate, cooldown or confirmation held it).
    devices: the active devices the plan was made for (speeds as the planner saw them).
    cost_s: the predicted seconds of the move when the plan is applied (else None).
    """

    report: dict[str, Any]
    record: dict[str, Any]
    plan: Plan | None
    devices: list[DeviceSpec]
    cost_s: float | None = None


def _memory_floor(devices: Sequence[DeviceSpec], load, expert_bytes, headroom: float) -> int:
    """Fewest of ``devices`` (in order) whose memory holds every expert once: autoscaling never goes below it."""
    need = float(np.sum(np.broadcast_to(np.asarray(expert_bytes, dtype=float), np.shape(load))))
    have = 0.0
    for i, d in enumerate(devices, 1):
        have += d.memory_bytes * (1.0 - headroom)
        if have >= need:
            return i
    return len(devices)


def _below_floor(current: Placement, devices, config, expert_bytes, shape, layers) -> bool:
    """Whether some expert of ``current`` has fewer replicas than ``min_replicas`` comes to on ``devices``."""
    floor = min_replicas(Inventory(devices=list(devices)), config.planner, expert_bytes=expert_bytes, shape=shape)["replicas"]
    if floor <= 1:
        return False
    live = {d.device_id for d in devices}
    counts = {}
    for device, keys in current.assignments.items():
        if device in live:
            for k in keys:
                counts[tuple(k)] = counts.get(tuple(k), 0) + 1
    want = {(int(layer), e) for layer in layers for e in range(shape[1])}
    return any(counts.get(k, 0) < floor for k in want)


def _move_keys(result: Plan) -> list[list]:
    return sorted([m.kind, m.device_id, int(m.expert[0]), int(m.expert[1])] for m in result.moves)


def moves_alike(a: Sequence, b: Sequence, threshold: float = SAME_PLAN) -> bool:
    """Do two move lists (``[kind, device, layer, expert]`` each) overlap at least ``threshold`` (Jaccard)?"""
    sa, sb = {tuple(x) for x in a}, {tuple(x) for x in b}
    if not sa and not sb:
        return True
    return len(sa & sb) / len(sa | sb) >= threshold


def record_apply_seconds(record: Mapping[str, Any], predicted_s: float | None, measured_s: float | None) -> dict:
    """The record with the cost correction updated from one rebalance's predicted and measured seconds."""
    from .prediction import update_cost_factor

    record = dict(record)
    model = dict(record.get("model") or {})
    if predicted_s and measured_s:
        model["cost_factor"] = update_cost_factor(float(model.get("cost_factor", 1.0)), predicted_s, measured_s)
        record["model"] = model
    return record


def _replica_bytes(expert_bytes, layers: Sequence[int]):
    if np.ndim(expert_bytes) == 0:
        size = int(np.ceil(float(expert_bytes)))
        return lambda key: size
    table = np.ceil(np.asarray(expert_bytes, dtype=float)).astype(np.int64)
    row = {int(layer): i for i, layer in enumerate(layers)}
    return lambda key: int(table[row[int(key[0])], int(key[1])])


def _check_prediction(config, record: dict, report: dict, current: Placement, devices: Sequence[DeviceSpec],
                      layers: Sequence[int], now: float, served, served_load, served_window_s: float) -> None:
    pending = record.get("pending_prediction")
    if not pending:
        return
    if current.version != pending.get("version"):
        record.pop("pending_prediction", None)  # another placement took over before the check finished
        return
    if served is None or served_load is None or now - served_window_s < pending.get("switched_at", 0.0):
        return  # the devices' window still reaches back before the new placement served
    result = compare(served, np.asarray(served_load, dtype=float), devices, current, layers)
    if result is None:
        return
    checks = list(pending.get("checks", [])) + [result]
    if len(checks) < config.prediction_checks:
        record["pending_prediction"] = {**pending, "checks": checks}
        return
    measured = float(np.mean([c["measured"] for c in checks]))
    predicted = float(np.mean([c["predicted"] for c in checks]))
    error = measured - predicted
    miss = abs(error) > config.prediction_miss
    outcome = {"at": now, "version": current.version, "measured": measured, "predicted": predicted, "error": error,
               "planned": pending.get("planned"), "miss": miss, "checks": len(checks)}
    if miss:
        keys = set().union(*(c["predicted_share"] for c in checks))
        predicted_share = {d: float(np.mean([c["predicted_share"].get(d, 0.0) for c in checks])) for d in keys}
        measured_share = {d: float(np.mean([c["measured_share"].get(d, 0.0) for c in checks])) for d in keys}
        model = dict(record.get("model") or {})
        model["speed"] = update_speed_factors(model.get("speed") or {}, predicted_share, measured_share)
        record["model"] = model
        outcome["speed_factors"] = model["speed"]
    record.pop("pending_prediction", None)
    record["prediction"] = outcome
    report["prediction"] = outcome


def _target_of(current: Placement, moves: Sequence, devices: Sequence[DeviceSpec]) -> Placement:
    """``current`` with ``moves`` (``[kind, device, layer, expert]``) made: the candidate's target."""
    held = {d: {tuple(k) for k in keys} for d, keys in current.assignments.items()}
    for kind, device, layer, expert in moves:
        keys = held.setdefault(device, set())
        (keys.add if kind == "add" else keys.discard)((int(layer), int(expert)))
    assignments = {d: sorted(keys) for d, keys in held.items() if keys}
    speeds = {d.device_id: d.speed for d in devices if d.device_id in assignments}
    return Placement(version=current.version + 1, assignments=assignments, speeds=speeds)


def _rejudge(candidate: Mapping, current: Placement, devices: Sequence[DeviceSpec], load: np.ndarray,
             layers: Sequence[int], fresh: Plan, config, horizon: float, links, replica_bytes,
             cost_factor: float) -> dict | None:
    """The candidate plan judged again on this step's load: ``{plan, gain, seconds, cost}`` if it still wins, else None."""
    if fresh.step_time_before is None or fresh.step_time_before <= 0:
        return None
    target = _target_of(current, candidate["moves"], devices)
    stats = predict(load, Inventory(devices=list(devices)), target, layers=list(layers))
    gain = 1.0 - stats.step_time / fresh.step_time_before
    cost = move_cost(current, target, devices, replica_bytes, links)
    seconds = cost.seconds * cost_factor
    if gain < config.planner.min_gain or not passes(gain, horizon, seconds, config.kappa):
        return None
    moves = [Move(kind=k, device_id=d, expert=(int(layer), int(e))) for k, d, layer, e in candidate["moves"]]
    plan_ = fresh.model_copy(update={
        "target": target, "moves": moves, "copies": sum(m.kind == "add" for m in moves), "gain": gain,
        "balancedness_after": stats.balancedness, "step_time_after": stats.step_time, "stats": stats, "apply": True,
    })
    return {"plan": plan_, "gain": gain, "seconds": seconds, "cost": cost}


def decide(
    config: ControllerConfig,
    record: Mapping[str, Any],
    devices: Sequence[DeviceSpec],
    current: Placement,
    load: np.ndarray,
    queue_depths: Mapping[str, float] | None,
    now: float,
    *,
    expert_bytes,
    layers: Sequence[int],
    down: Collection[str] = (),
    links: Mapping[str, LinkSpeeds] | LinkSpeeds | None = None,
    served: Mapping[str, Mapping[int, float]] | None = None,
    served_load: np.ndarray | None = None,
    served_window_s: float = 0.0,
) -> Decision:
    """One control step's decision.

    Args:
        config: the controller's settings (``autoscaling``, ``min_tokens``, ``planner``, the gate's knobs).
        record: the controller's stored record (``{}`` at first).
        devices: the live devices (the inventory's, less those down or restarting), in inventory order.
        current: the placement in force.
        load: ``[L, E]`` decayed token counts; row ``i`` is layer ``layers[i]``.
        queue_depths: device id -> in-flight calls, read only with autoscaling
            (None otherwise).
        now: the controller's clock, seconds.
        expert_bytes: weight bytes of one replica (number or ``[L, E]``).
        layers: the model layer of each load row.
        down: device ids of workers found down (planning then repairs even on little load).
        links: how fast weights reach each device (default: the config's
            ``copy_bytes_per_s``, ``load_bytes_per_s``, ``rebalance_overhead_s``).
        served: device id -> layer -> rows the device served over its last
            few seconds (the workers' own count), for checking predictions;
            None skips the check.
        served_load: ``[L, E]`` tokens the routers sent over the same seconds.
        served_window_s: how far back ``served`` reaches: a check counts only
            once that window began after the new placement took over.
    """
    record = dict(record)
    active = list(devices)
    report: dict[str, Any] = {"at": now, "placement_version": current.version}
    if config.autoscaling is not None:
        count = int(record.get("active_devices") or len(current.assignments) or len(active))
        desired, policy_state = autoscale_step(
            config.autoscaling, queue_depths or {}, count, record.get("autoscale_state"), now
        )
        desired = max(1, _memory_floor(active, load, expert_bytes, config.planner.headroom), min(desired, len(active)))
        desired = min(desired, len(active))
        record["active_devices"], record["autoscale_state"] = desired, policy_state
        report["active_devices"] = desired
        active = active[:desired]
    load = np.asarray(load, dtype=float)
    report["tokens"] = float(load.sum())

    tracker = HotSetTracker(record.get("hot_set"), hot_fraction=config.hot_fraction)
    if load.sum() >= config.min_tokens and tracker.observe(load, now):
        report["hot_set_moved"] = True
    record["hot_set"] = tracker.state()
    horizon = tracker.horizon(config.horizon_s, config.max_horizon_s)
    report["horizon_s"] = horizon

    _check_prediction(config, record, report, current, devices, layers, now, served, served_load, served_window_s)
    model = record.get("model") or {}
    planned_on = apply_speed_factors(active, model.get("speed") or {})

    result: Plan | None = None
    cost_s: float | None = None
    if not active:
        report["skipped"] = "no live device"
    elif load.sum() < config.min_tokens and current.version > 0 and not down and not _below_floor(
        current, active, config, expert_bytes, load.shape, layers
    ):
        report["skipped"] = "too little load to plan from"
    else:
        if load.sum() == 0:
            load = np.ones_like(load)  # nothing measured yet (a repair after a fresh start): treat experts alike
        # devices autoscaling just added hold nothing: filling them is a capacity action, made at once and uncapped
        added = [d.device_id for d in planned_on if d.device_id not in current.assignments] \
            if config.autoscaling is not None and current.assignments else []
        knobs = config.planner
        if added:
            report["scaled_up"] = added
            knobs = knobs.model_copy(update={"max_moves_per_step": max(knobs.max_moves_per_step, int(load.size))})
        t_plan = time.perf_counter()
        result = plan(load, Inventory(devices=planned_on), current, knobs, expert_bytes=expert_bytes, layers=layers)
        report["planner_s"] = time.perf_counter() - t_plan
        report.update(
            balancedness_before=result.balancedness_before, balancedness_after=result.balancedness_after,
            gain=result.gain, copies=result.copies, apply=result.apply, repaired=result.repaired,
        )
        if links is None:
            links = LinkSpeeds(config.copy_bytes_per_s, config.load_bytes_per_s, config.rebalance_overhead_s)
        replica_bytes = _replica_bytes(expert_bytes, layers)
        cost_factor = float(model.get("cost_factor", 1.0))
        cost = move_cost(current, result.target, planned_on, replica_bytes, links)
        seconds = cost.seconds * cost_factor
        benefit = result.gain * horizon
        report["cost"] = {**cost.to_dict(), "seconds": seconds}
        report["benefit_s"] = benefit
        ids = [d.device_id for d in planned_on]
        candidate = record.pop("candidate", None)
        reason = None
        if result.repaired or not result.moves:
            pass  # a repair is applied at once; no move, nothing to decide
        elif added and result.apply:
            pass  # new devices take load at once
        elif now < float(record.get("cooldown_until", -np.inf)):
            reason = "cooldown"
        else:
            fresh_ok = result.apply and passes(result.gain, horizon, seconds, config.kappa)
            kept = None  # the candidate, re-judged on this step's load
            if candidate and candidate.get("version") == current.version and candidate.get("devices") == ids:
                kept = _rejudge(candidate, current, planned_on, load, layers, result, config, horizon, links,
                                replica_bytes, cost_factor)
            if kept is not None and not (fresh_ok and result.gain > kept["gain"] + config.planner.min_gain):
                candidate = {**candidate, "streak": int(candidate["streak"]) + 1}
                chosen = kept
            elif fresh_ok:
                candidate = {"moves": _move_keys(result), "streak": 1, "version": current.version, "devices": ids}
                chosen = {"plan": result, "gain": result.gain, "seconds": seconds, "cost": cost}
            else:
                candidate, chosen = None, None
                reason = "min_gain" if not result.apply else "cost"
            if chosen is not None:
                if candidate["streak"] >= config.confirm_steps:
                    result, seconds, cost, benefit = chosen["plan"], chosen["seconds"], chosen["cost"], chosen["gain"] * horizon
                    report.update(gain=result.gain, balancedness_after=result.balancedness_after, copies=result.copies,
                                  cost={**cost.to_dict(), "seconds": seconds}, benefit_s=benefit)
                else:
                    reason = "confirming"
                    record["candidate"] = candidate
                    result = chosen["plan"]
                    seconds, cost, benefit = chosen["seconds"], chosen["cost"], chosen["gain"] * horizon
        if reason is not None:
            report["apply"] = False
            report["plan_skipped"] = {
                "reason": reason, "gain": result.gain, "benefit_s": benefit, "cost_s": seconds, "horizon_s": horizon,
                "copies": cost.copies, "bytes_moved": cost.bytes_moved, "kappa": config.kappa,
            }
            if reason == "confirming":
                report["plan_skipped"]["streak"] = record["candidate"]["streak"]
            result = result.model_copy(update={"apply": False})
        elif result.moves or result.repaired:
            result = result.model_copy(update={"apply": True})
            report["apply"] = True
            cost_s = seconds
            record["cooldown_until"] = now + seconds + config.cooldown_s
            record["pending_prediction"] = {
                "version": result.target.version, "planned": result.balancedness_after, "applied_at": now,
                "switched_at": now + seconds, "checks": [],
            }
    return Decision(report=report, record=record, plan=result, devices=planned_on, cost_s=cost_s)
