"""The controller's pure decision: autoscaling's memory floor, the cost-benefit gate, cooldown, confirmation,
hot-set horizons and predicted-against-measured checks."""

import numpy as np
import pytest

from moefleet.controller.autoscale import AutoscalingConfig
from moefleet.controller.decide import decide, moves_alike
from moefleet.controller.main import ControllerConfig
from moefleet.controller.planner import PlannerKnobs
from moefleet.controller.planner.gate import HotSetTracker, LinkSpeeds, move_cost, passes
from moefleet.core.placement import DeviceSpec, Placement, spread_placement

FAST = LinkSpeeds(copy_bytes_per_s=1e12, load_bytes_per_s=1e12, overhead_s=0.01)
SLOW = LinkSpeeds(copy_bytes_per_s=1.0, load_bytes_per_s=1e12, overhead_s=0.01)  # a byte a second


def gpus(n: int, memory: int) -> list[DeviceSpec]:
    return [DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=memory) for i in range(n)]


def config(**kw) -> ControllerConfig:
    base = dict(ray_address=None, min_tokens=0, planner=PlannerKnobs(headroom=0.0, min_gain=0.02, min_replicas=1), kappa=2.0,
                horizon_s=60.0, cooldown_s=0.0, confirm_steps=1)
    base.update(kw)
    return ControllerConfig(**base)


def hot_load(hot: list[int], num_experts: int = 8, heat: float = 8.0) -> np.ndarray:
    load = np.full((1, num_experts), 100.0)
    load[0, hot] *= heat
    return load


def step(cfg, record, devices, current, load, now, queue_depths=None, **kw):
    return decide(cfg, record, devices, current, load, queue_depths, now, expert_bytes=10, layers=[0], **kw)


# --------------------------------------------------------------------------- autoscaling


def test_autoscaling_stops_at_the_devices_memory_needs_with_the_default_headroom():
    # 24 experts of 1 byte on devices of 12 bytes: with the default headroom (0.1) a device takes 10, so three are
    # needed; without the headroom two would do, and planning on two would fail
    devices = [DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=12) for i in range(4)]
    cfg = ControllerConfig(
        ray_address=None, min_tokens=0,
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4, target_queue_depth=100.0, downscale_delay_s=0),
    )
    assert cfg.planner.headroom == 0.1
    current = spread_placement([0], 24, [d.device_id for d in devices])
    decision = decide(cfg, {"active_devices": 4}, devices, current, np.ones((1, 24)), {d.device_id: 0.0 for d in devices},
                      0.0, expert_bytes=1, layers=[0])  # idle queues ask for one device
    assert decision.report["active_devices"] == 3
    assert decision.plan is not None and set(decision.plan.target.assignments) == {"d0", "d1", "d2"}


def test_a_fleet_below_its_replica_floor_is_repaired_before_any_traffic():
    """min_replicas auto comes to 2 on devices that hold every expert twice: a fresh fleet with one copy of each
    expert is planned up to two at once, without waiting for min_tokens of load; at the floor, little load skips."""
    devices = [DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=20) for i in range(3)]
    config = ControllerConfig(ray_address=None, min_tokens=100)  # planner min_replicas: auto
    one_copy = spread_placement([0], 8, [d.device_id for d in devices]).model_copy(update={"version": 1})
    idle = np.zeros((1, 8))
    decision = decide(config, {}, devices, one_copy, idle, None, 0.0, expert_bytes=1, layers=[0])
    assert "skipped" not in decision.report and decision.plan.apply and decision.plan.repaired
    assert all(len(ws) >= 2 for ws in decision.plan.target.replicas().values())
    at_floor = decision.plan.target.model_copy(update={"version": 2})
    assert decide(config, {}, devices, at_floor, idle, None, 1.0, expert_bytes=1, layers=[0]).report["skipped"]


# --------------------------------------------------------------------------- the cost of a move


def test_move_cost_is_the_slowest_receiving_device_plus_overhead():
    devices = gpus(3, 100)
    current = Placement(version=1, assignments={"d0": [(0, 0), (0, 1)], "d1": [(0, 2)], "d2": [(0, 3)]})
    target = Placement(version=2, assignments={"d0": [(0, 0)], "d1": [(0, 2), (0, 0), (0, 1)], "d2": [(0, 3), (0, 0)]})
    links = {"d0": FAST, "d1": LinkSpeeds(10.0, 20.0, 0.5), "d2": LinkSpeeds(100.0, 1e12, 0.5)}
    cost = move_cost(current, target, devices, lambda key: 10, links)
    assert cost.copies == 3 and cost.bytes_moved == 30
    assert cost.seconds == pytest.approx(0.5 + 20 / 10 + 20 / 20)  # d1 receives 20 bytes: 2 s on the link, 1 s to load
    assert cost.transient_bytes == 0 and cost.stages == 1
    assert move_cost(current, current, devices, lambda key: 10, links).seconds == 0.0


def test_move_cost_counts_a_stage_when_a_device_must_make_room_first():
    devices = gpus(2, 20)  # each holds two experts of 10 bytes
    current = Placement(version=1, assignments={"d0": [(0, 0), (0, 1)], "d1": [(0, 2), (0, 3)]})
    target = Placement(version=2, assignments={"d0": [(0, 0), (0, 2)], "d1": [(0, 1), (0, 3)]})
    cost = move_cost(current, target, devices, lambda key: 10, LinkSpeeds(1e12, 1e12, 1.0))
    assert cost.transient_bytes == 10 and cost.stages == 2
    assert cost.seconds == pytest.approx(2.0)


def test_passes_is_gain_over_the_horizon_against_kappa_times_the_cost():
    assert passes(0.1, 60.0, 2.9, kappa=2.0)  # 6 s saved > 5.8 s
    assert not passes(0.1, 60.0, 3.1, kappa=2.0)
    assert not passes(0.0, 60.0, 0.0, kappa=2.0)


# --------------------------------------------------------------------------- the gate in decide


def _imbalanced():
    devices = gpus(4, 40)  # room for 4 experts each: redundancy possible
    current = spread_placement([0], 8, [d.device_id for d in devices])
    return devices, current.model_copy(update={"version": 1}), hot_load([0, 1])


def test_a_plan_that_does_not_pay_for_its_move_is_skipped_and_says_why():
    devices, current, load = _imbalanced()
    slow = step(config(), {}, devices, current, load, 10.0, links=SLOW)
    assert slow.plan is not None and slow.plan.moves and slow.plan.gain > 0.1
    assert not slow.plan.apply
    skipped = slow.report["plan_skipped"]
    assert skipped["reason"] == "cost"
    assert skipped["gain"] == pytest.approx(slow.plan.gain)
    assert skipped["benefit_s"] == pytest.approx(slow.plan.gain * 60.0)
    assert skipped["cost_s"] > skipped["benefit_s"] / 2.0  # kappa x cost > benefit
    assert skipped["bytes_moved"] == 10 * slow.plan.copies
    fast = step(config(), {}, devices, current, load, 10.0, links=FAST)
    assert fast.plan.apply and "plan_skipped" not in fast.report


def test_kappa_scales_what_a_move_must_pay():
    devices, current, load = _imbalanced()
    links = LinkSpeeds(copy_bytes_per_s=100.0, load_bytes_per_s=1e12, overhead_s=0.0)
    gain = step(config(), {}, devices, current, load, 10.0, links=FAST).plan.gain
    seconds = step(config(), {}, devices, current, load, 10.0, links=links).report["cost"]["seconds"]
    at_edge = gain * 60.0 / seconds  # the kappa at which benefit equals kappa x cost
    assert step(config(kappa=0.9 * at_edge), {}, devices, current, load, 10.0, links=links).plan.apply
    assert not step(config(kappa=1.1 * at_edge), {}, devices, current, load, 10.0, links=links).plan.apply


def test_no_plan_is_applied_during_the_cooldown_after_one():
    devices, current, load = _imbalanced()
    cfg = config(cooldown_s=30.0)
    first = step(cfg, {}, devices, current, load, 10.0, links=FAST)
    assert first.plan.apply
    after = first.plan.target
    again = step(cfg, first.record, devices, after, hot_load([4, 5]), 20.0, links=FAST)  # the hot set moved
    assert again.plan.moves and not again.plan.apply
    assert again.report["plan_skipped"]["reason"] == "cooldown"
    later = step(cfg, again.record, devices, after, hot_load([4, 5]), 10.0 + first.cost_s + 30.0 + 0.1, links=FAST)
    assert later.plan.apply


def test_a_repair_is_applied_at_once_whatever_the_gate_cooldown_or_confirmation_say():
    devices, current, load = _imbalanced()
    cfg = config(cooldown_s=1e6, confirm_steps=5, kappa=1e9)
    record = {"cooldown_until": 1e9}
    survivors = devices[1:]  # d0's worker died: its experts have no replica
    decision = step(cfg, record, survivors, current, load, 10.0, links=SLOW, down={"d0"})
    assert decision.plan.repaired and decision.plan.apply


def test_a_plan_is_applied_only_after_it_kept_winning_for_confirm_steps():
    devices, current, load = _imbalanced()
    cfg = config(confirm_steps=3)
    record: dict = {}
    applied_at = None
    for k in range(5):
        decision = step(cfg, record, devices, current, load, 10.0 + k, links=FAST)
        record = decision.record
        if decision.plan.apply:
            applied_at = k
            break
        assert decision.report["plan_skipped"]["reason"] == "confirming"
        assert decision.report["plan_skipped"]["streak"] == k + 1
    assert applied_at == 2


def test_plans_that_change_from_step_to_step_never_confirm():
    # each step's load favours other experts (noise): no plan wins twice, so none is applied
    devices, current, _ = _imbalanced()
    cfg = config(confirm_steps=2)
    record: dict = {}
    for k, hot in enumerate(([0, 1], [2, 3], [4, 5], [6, 7], [0, 1], [2, 3])):
        decision = step(cfg, record, devices, current, hot_load(hot), 10.0 + k, links=FAST)
        record = decision.record
        assert decision.plan.moves and not decision.plan.apply, k
        assert decision.report["plan_skipped"]["reason"] == "confirming"


def test_a_plan_below_min_gain_is_skipped_as_such():
    devices, current, _ = _imbalanced()
    load = hot_load([0, 1], heat=1.5)  # the best plan cuts the step time by 22%
    cfg = config(planner=PlannerKnobs(headroom=0.0, min_gain=0.3, hysteresis=0.0, min_replicas=1))
    decision = step(cfg, {}, devices, current, load, 10.0, links=FAST)
    assert decision.plan.moves and 0 < decision.plan.gain < 0.3 and not decision.plan.apply
    assert decision.report["plan_skipped"]["reason"] == "min_gain"


def test_moves_alike_is_a_jaccard_threshold():
    a = [["add", "d0", 0, 1], ["add", "d1", 0, 2], ["remove", "d2", 0, 3], ["add", "d3", 0, 4], ["add", "d3", 0, 5]]
    assert moves_alike(a, a[:4])  # 4 of 5 alike
    assert not moves_alike(a, a[:3])


# --------------------------------------------------------------------------- hot sets and the horizon


def test_the_horizon_is_how_long_hot_sets_lasted():
    tracker = HotSetTracker(None, hot_fraction=0.25)
    moved = []
    for t in range(60):
        hot = [(t // 10) * 2 % 8, ((t // 10) * 2 + 1) % 8]  # the hot pair moves every 10 s
        moved.append(tracker.observe(hot_load(hot), float(t)))
    assert [t for t, m in enumerate(moved) if m] == [10, 20, 30, 40, 50]
    assert tracker.lifetimes == [10.0] * 5
    assert tracker.horizon(default_s=60.0, max_s=600.0) == 10.0
    assert HotSetTracker(None).horizon(default_s=60.0, max_s=30.0) == 30.0  # nothing measured: the default, capped


def test_noise_does_not_move_the_hot_set():
    tracker = HotSetTracker(None, hot_fraction=0.25)
    rng = np.random.default_rng(0)
    for t in range(200):
        assert not tracker.observe(hot_load([2, 5]) * rng.lognormal(0, 0.2, (1, 8)), float(t))


def test_a_short_horizon_makes_the_same_move_not_worth_it():
    devices, current, load = _imbalanced()
    links = LinkSpeeds(copy_bytes_per_s=100.0, load_bytes_per_s=1e12, overhead_s=0.0)
    cfg = config()
    long = step(cfg, {"hot_set": {"lifetimes": [600.0]}}, devices, current, load, 10.0, links=links)
    short = step(cfg, {"hot_set": {"lifetimes": [0.5]}}, devices, current, load, 10.0, links=links)
    assert long.report["horizon_s"] == 600.0 and long.plan.apply
    assert short.report["horizon_s"] == 0.5 and not short.plan.apply
    assert short.report["plan_skipped"]["reason"] == "cost"


# --------------------------------------------------------------------------- predicted against measured


def _applied():
    devices, current, load = _imbalanced()
    cfg = config(prediction_checks=2, prediction_miss=0.1)
    first = step(cfg, {}, devices, current, load, 10.0, links=FAST)
    assert first.plan.apply
    return cfg, devices, first.plan.target, first.record, load


def _served_as_predicted(placement: Placement, load: np.ndarray, devices, skew: dict | None = None):
    """Rows each device serves when every replica takes an equal share (the model), times an optional skew."""
    rows = {d.device_id: 0.0 for d in devices}
    for (layer, expert), holders in placement.replicas().items():
        for h in holders:
            rows[h] += load[0, expert] / len(holders)
    if skew:
        rows = {d: v * skew.get(d, 1.0) for d, v in rows.items()}
    return {d: {0: v} for d, v in rows.items()}


def test_a_prediction_that_held_has_no_error_and_no_miss():
    cfg, devices, placement, record, load = _applied()
    served = _served_as_predicted(placement, load, devices)
    assert "prediction" not in step(cfg, record, devices, placement, load, 10.5, served=served, served_load=load,
                                    served_window_s=5.0).report  # the window reaches back before the switch
    reports = []
    for k in range(2):
        d = step(cfg, record, devices, placement, load, 20.0 + k, served=served, served_load=load, served_window_s=5.0)
        record = d.record
        reports.append(d.report)
    assert "prediction" not in reports[0]
    outcome = reports[1]["prediction"]
    assert outcome["error"] == pytest.approx(0.0, abs=1e-9) and not outcome["miss"]
    assert record["prediction"]["error"] == pytest.approx(0.0, abs=1e-9)
    assert "pending_prediction" not in record


def test_a_miss_is_reported_and_corrects_the_devices_speeds():
    cfg, devices, placement, record, load = _applied()
    holders = {h for hs in placement.replicas().values() for h in hs}
    busy = sorted(holders)[0]
    served = _served_as_predicted(placement, load, devices, skew={busy: 1.6})  # one device took far more
    for k in range(2):
        d = step(cfg, record, devices, placement, load, 20.0 + k, served=served, served_load=load, served_window_s=5.0)
        record = d.record
    outcome = d.report["prediction"]
    assert outcome["miss"] and outcome["error"] < -0.1
    factors = record["model"]["speed"]
    assert factors[busy] > 1.0 and all(f <= 1.0 for dev, f in factors.items() if dev != busy)
    # the next plan sees the corrected speeds
    nxt = step(cfg, record, devices, placement, load, 30.0, links=FAST)
    assert {d.device_id: d.speed for d in nxt.devices}[busy] == pytest.approx(factors[busy])


def test_a_new_placement_before_the_check_drops_it():
    cfg, devices, placement, record, load = _applied()
    other = placement.model_copy(update={"version": placement.version + 1})
    served = _served_as_predicted(placement, load, devices)
    d = step(cfg, record, devices, other, load, 20.0, served=served, served_load=load, served_window_s=5.0)
    assert "pending_prediction" not in d.record and "prediction" not in d.report


def test_devices_autoscaling_adds_take_load_at_once_past_the_cooldown_and_the_copy_cap():
    devices = gpus(3, 80)
    current = spread_placement([0], 8, ["d0", "d1"]).model_copy(update={"version": 4})
    cfg = config(cooldown_s=1e6, confirm_steps=5, planner=PlannerKnobs(headroom=0.0, max_moves_per_step=1),
                 autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=3, target_queue_depth=1.0,
                                               upscale_delay_s=0, metrics_interval_s=1))
    record = {"active_devices": 2, "cooldown_until": 1e9}
    decision = step(cfg, record, devices, current, hot_load([0, 1]), 10.0, links=FAST,
                    queue_depths={"d0": 6.0, "d1": 6.0})
    assert decision.report["active_devices"] == 3 and decision.report["scaled_up"] == ["d2"]
    assert decision.plan.apply and "plan_skipped" not in decision.report
    assert decision.plan.copies > 1  # uncapped by max_moves_per_step
    assert decision.plan.target.assignments.get("d2")
