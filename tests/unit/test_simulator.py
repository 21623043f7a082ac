"""The fleet simulator on small fleets whose answers are known."""

import numpy as np
import pytest

from moefleet.controller.main import ControllerConfig
from moefleet.controller.planner import PlannerKnobs, PlanningError
from moefleet.controller.sim import SimConfig, ZipfTraffic, compare, initial_placement, simulate
from moefleet.core.trace import Trace

from tests.sim_helpers import EXPERT_BYTES, devices, steady_trace

HOT = [512] + [64] * 15  # expert 0 carries 8x the load of each other expert


def test_uniform_load_on_a_homogeneous_fleet_is_balanced_for_both_placements():
    runs = compare(steady_trace([64] * 16, 50, 20), devices(8, 3), expert_bytes=EXPERT_BYTES)
    for result in runs.values():
        assert result.max_over_mean <= 1.05


def test_one_hot_expert_with_enough_replicas_is_balanced():
    trace = steady_trace(HOT, 50, 20)
    fleet = devices(8, 4)  # 32 slots for 16 experts: room for the hot expert's replicas (when no floor takes them)
    config = SimConfig(controller=ControllerConfig(ray_address=None, planner={"min_replicas": 1}))
    first = initial_placement(trace, fleet, EXPERT_BYTES, config)
    assert len(first.replicas()[(0, 0)]) >= 4
    runs = compare(trace, fleet, expert_bytes=EXPERT_BYTES, config=config)
    for result in runs.values():
        assert result.max_over_mean <= 1.1


def test_one_hot_expert_without_room_for_replicas_overloads_its_device():
    runs = compare(steady_trace(HOT, 50, 20), devices(8, 2), expert_bytes=EXPERT_BYTES)  # 16 slots: one copy each
    for result in runs.values():
        assert result.max_over_mean > 1.5


def test_a_fleet_too_small_for_the_load_has_a_p99_that_grows_with_the_trace():
    # 2 devices serve 2 x 10,000 rows/s; the trace offers 50 calls/s x 1024 rows = 51,200 rows/s
    fleet = devices(2, 16)
    short = simulate(steady_trace([64] * 16, 50, 10), fleet, expert_bytes=EXPERT_BYTES, elastic=True)
    long = simulate(steady_trace([64] * 16, 50, 20), fleet, expert_bytes=EXPERT_BYTES, elastic=True)
    assert long.p99_ms > 1.8 * short.p99_ms > 0
    p99 = [x for x in long.timeline["p99_latency_ms"] if x is not None]
    assert p99[-1] > 5 * p99[0]


def test_a_fleet_large_enough_keeps_p99_flat_as_the_trace_grows():
    fleet = devices(16, 4)
    short = simulate(steady_trace([64] * 16, 50, 10), fleet, expert_bytes=EXPERT_BYTES, elastic=True)
    long = simulate(steady_trace([64] * 16, 50, 20), fleet, expert_bytes=EXPERT_BYTES, elastic=True)
    assert long.p99_ms == pytest.approx(short.p99_ms, abs=1.0)
    assert long.tokens_per_s == pytest.approx(50 * 1024, rel=0.02)  # it serves what is offered


def test_one_call_takes_its_rows_in_then_overhead_and_compute_then_its_partials_back():
    """A device on another node: its tokens' rows arrive, it computes, its partials leave (the product's path, the
    cost model's bytes); the transfer is latency, not the device's busy time. The router's own time adds to it."""
    from dataclasses import replace

    (dev,) = devices(1, 4, row_s=1e-3, floor_s=0.05, overhead_s=0.01)
    dev = replace(dev, act_row_s=2e-3)  # per token, in and out
    trace = Trace(t=np.array([0.0]), layer=np.array([0]), counts=np.array([[100, 10, 0, 0]]))
    result = simulate(trace, [dev], expert_bytes=EXPERT_BYTES, elastic=False, config=SimConfig(router_call_s=0.003))
    compute = max(100 * 1e-3, 0.05) + max(10 * 1e-3, 0.05)  # 0.15 s
    transfer = 100 * 2e-3  # tokens (the largest expert's rows: the trace has no token ids) x per-token time
    assert result.p50_latency_ms == pytest.approx(1000 * (0.01 + compute + transfer + 0.003))
    assert result.max_over_mean == pytest.approx(1.0)
    local = simulate(trace, [devices(1, 4, row_s=1e-3, floor_s=0.05, overhead_s=0.01)[0]], expert_bytes=EXPERT_BYTES,
                     elastic=False)
    assert local.p50_latency_ms == pytest.approx(1000 * (0.01 + compute))  # on the router's node: read in place


def test_closed_mode_with_one_client_never_queues():
    fleet = devices(2, 16)
    result = simulate(steady_trace([64] * 16, 50, 4), fleet, expert_bytes=EXPERT_BYTES, elastic=False,
                      config=SimConfig(mode="closed", concurrency=1))
    assert result.p99_ms == 0.0
    # each call: 16 experts of 64 rows over 2 devices, 8 experts each in parallel: 8 * 64 * 1e-4 s
    assert result.p50_latency_ms == pytest.approx(1000 * 8 * 64 * 1e-4)


def _drift(duration_s=30.0, shift_s=6.0):
    return ZipfTraffic(s=1.2, experts=16, layers=1, top_k=2, duration_s=duration_s, shift_s=shift_s,
                       tokens_per_call=512, seed=3)


def _following(**kw) -> ControllerConfig:
    """A controller that follows a hot set moving every 6 s: steps each second, short cooldown."""
    kw.setdefault("planner", PlannerKnobs(min_replicas=1))  # replicas follow the load alone
    return ControllerConfig(ray_address=None, interval_s=1.0, load_windows=3, cooldown_s=2.0, confirm_steps=2, **kw)


def test_elastic_beats_static_when_the_hot_set_moves_and_pays_in_bytes_moved():
    fleet = devices(8, 4)
    trace = _drift().trace(rate=12000)  # ~24,000 rows/s offered; the 8 devices serve 80,000 when balanced
    config = SimConfig(top_k=2, controller=_following())
    runs = compare(trace, fleet, expert_bytes=EXPERT_BYTES, config=config)
    elastic, static = runs["elastic"], runs["static"]
    assert static.bytes_moved == 0 and static.plans_applied == 0
    assert elastic.plans_applied > 0
    assert elastic.bytes_moved == elastic.copies * EXPERT_BYTES
    assert elastic.max_over_mean < static.max_over_mean
    # most seconds are faster (a shift right after a rebalance may catch either placement out for a few seconds)
    seconds = [(e, s) for e, s in zip(elastic.timeline["p99_latency_ms"], static.timeline["p99_latency_ms"]) if e and s]
    assert np.median([e for e, _ in seconds]) < np.median([s for _, s in seconds])
    assert np.nanmean(np.array(elastic.timeline["balancedness"], dtype=float)) > \
        np.nanmean(np.array(static.timeline["balancedness"], dtype=float)) + 0.1


def test_a_saturated_fleet_serves_as_much_elastic_as_on_the_best_static_placement_when_nothing_moves():
    # closed loop: clients send back to back, so tokens/s is what the placement lets the fleet sustain; 24 slots for
    # 16 experts, so where the replicas go matters
    fleet = devices(8, 3)
    trace = _drift(shift_s=0).trace(rate=12000)
    # every plan that passes the gate is applied at once (confirm_steps=1): elastic's plans alone decide
    controller = ControllerConfig(ray_address=None, confirm_steps=1)
    config = SimConfig(top_k=2, static_from="mean", mode="closed", concurrency=16, controller=controller)
    runs = compare(trace, fleet, expert_bytes=EXPERT_BYTES, config=config)
    assert runs["elastic"].tokens_per_s == pytest.approx(runs["static"].tokens_per_s, rel=0.02)
    assert runs["elastic"].max_over_mean <= runs["static"].max_over_mean * 1.02
    assert runs["elastic"].plans_applied <= 1  # at most one plan's bytes on a load that does not move


def test_a_plan_whose_copies_outlast_its_horizon_is_not_applied():
    # copies at a byte per millisecond take far longer than the gain could repay: the gate holds every plan
    fleet = devices(8, 4, copy_bytes_per_s=1e-3)
    trace = _drift().trace(rate=12000)
    runs = compare(trace, fleet, expert_bytes=EXPERT_BYTES, config=SimConfig(top_k=2, controller=_following()))
    elastic = runs["elastic"]
    assert elastic.plans_applied == 0 and elastic.bytes_moved == 0
    skipped = [r["plan_skipped"] for r in elastic.reports if "plan_skipped" in r]
    assert skipped and elastic.plans_skipped == len(skipped)
    assert {s["reason"] for s in skipped} == {"cost"}
    assert all(s["gain"] * s["horizon_s"] <= s["kappa"] * s["cost_s"] for s in skipped)


@pytest.mark.parametrize("source", ["peer", "checkpoint"])
def test_a_new_placement_serves_only_after_its_weights_arrive(source):
    # loads so slow that no applied plan finishes within the trace (kappa 0: the gate lets it through):
    # elastic routes exactly as static
    fleet = devices(8, 4, copy_bytes_per_s=1e-3 if source == "peer" else 1e9)
    trace = _drift().trace(rate=12000)
    config = SimConfig(top_k=2, controller=_following(kappa=0.0), weight_source=source,
                       checkpoint_bytes_per_s=1e-3 if source == "checkpoint" else 2e9)
    runs = compare(trace, fleet, expert_bytes=EXPERT_BYTES, config=config)
    assert runs["elastic"].plans_applied >= 1
    assert runs["elastic"].bytes_moved > 0
    assert runs["elastic"].p99_ms == runs["static"].p99_ms
    assert runs["elastic"].tokens_per_s == runs["static"].tokens_per_s
    # and the controller stepped no more once a reconcile began: it waits for it, as Controller.run does
    reports = runs["elastic"].reports
    assert reports[-1]["apply"] and sum(bool(r.get("apply")) for r in reports) == 1


def test_predictions_are_checked_against_what_the_devices_served():
    fleet = devices(8, 4)
    trace = _drift(duration_s=40.0, shift_s=20.0).trace(rate=12000)
    runs = compare(trace, fleet, expert_bytes=EXPERT_BYTES, config=SimConfig(top_k=2, controller=_following()))
    elastic = runs["elastic"]
    assert elastic.plans_applied >= 1
    assert elastic.prediction_errors, "no prediction was checked after a rebalance"
    checks = [r["prediction"] for r in elastic.reports if "prediction" in r]
    assert all(abs(c["measured"] - c["predicted"]) == pytest.approx(abs(c["error"])) for c in checks)
    assert float(np.median(np.abs(elastic.prediction_errors))) < 0.05


def test_device_hours_count_the_devices_in_use():
    trace = steady_trace([8] * 16, 5, 15)
    fleet = devices(8, 16)
    static = simulate(trace, fleet, expert_bytes=EXPERT_BYTES, elastic=False)
    assert static.device_hours == pytest.approx(8 * static.makespan_s / 3600)  # the whole fleet, all the time
    config = SimConfig(controller=ControllerConfig(
        ray_address=None, interval_s=1.0, min_tokens=0,
        autoscaling={"min_replicas": 1, "max_replicas": 8, "target_queue_depth": 2.0, "downscale_delay_s": 2.0},
    ))
    elastic = simulate(trace, fleet, expert_bytes=EXPERT_BYTES, elastic=True, config=config)
    assert elastic.device_hours < 0.5 * static.device_hours


def test_too_little_load_skips_planning():
    trace = steady_trace([1] * 16, 5, 10)  # 80 rows/s: under min_tokens once decayed
    config = SimConfig(controller=ControllerConfig(ray_address=None, min_tokens=10_000))
    result = simulate(trace, devices(4, 8), expert_bytes=EXPERT_BYTES, elastic=True, config=config)
    assert result.steps > 0
    assert all(r.get("skipped") for r in result.reports)


def test_autoscaling_shrinks_an_idle_fleet_through_the_controller_policy():
    config = SimConfig(controller=ControllerConfig(
        ray_address=None, interval_s=1.0, min_tokens=0,
        autoscaling={"min_replicas": 1, "max_replicas": 8, "target_queue_depth": 2.0, "downscale_delay_s": 2.0},
    ))
    trace = steady_trace([8] * 16, 5, 15)  # light load: queues stay near empty
    # each device can hold all 16 experts, so the fleet may shrink to one
    result = simulate(trace, devices(8, 16), expert_bytes=EXPERT_BYTES, elastic=True, config=config)
    active = [r["active_devices"] for r in result.reports if "active_devices" in r]
    assert active[0] == 8 and active[-1] == 1
    assert result.failed_steps == 0


def test_a_fleet_that_cannot_hold_every_expert_once_is_a_planning_error():
    with pytest.raises(PlanningError):
        simulate(steady_trace([64] * 16, 10, 2), devices(2, 4), expert_bytes=EXPERT_BYTES, elastic=False)


def test_replicas_on_devices_of_different_speeds_finish_together():
    # one expert on a fast and a slow device: the router's split gives each rows in proportion to its speed
    fast = devices(1, 1, row_s=1e-4, speed=1.0, prefix="fast")
    slow = devices(1, 1, row_s=4e-4, speed=0.25, prefix="slow")
    trace = steady_trace([1000], 20, 10)
    result = simulate(trace, fast + slow, expert_bytes=EXPERT_BYTES, elastic=False)
    assert result.busy_s_by_type["slow"] == pytest.approx(result.busy_s_by_type["fast"], rel=0.05)
    assert result.max_over_mean <= 1.05
