"""The simulator's model of an emulated fleet (``controller/sim/emulated.py``): calibration fit, devices, traces,
and the held-out comparison. Pure: no Ray, no Redis."""

from __future__ import annotations

import numpy as np
import pytest

from moefleet.controller.sim import SimConfig, simulate
from moefleet.controller.sim.devices import ExpertShape, emulated_specs
from moefleet.controller.sim.emulated import (
    EmulationCosts,
    EmulationPhase,
    choice_trace,
    drift_popularity,
    emulated_sim_devices,
    fit_emulation_costs,
    holdout_rows,
    placement_changes,
    ratio_rows,
    relative_error,
    shifting_popularity,
    worst,
)
from moefleet.core.emulation import emulated_call_s
from moefleet.core.placement import DeviceSpec, Placement
from moefleet.core.trace import Trace

SHAPE = ExpertShape(3584, 2560, moe_layers=28)


def specs(text="h100:2", slowdown=100.0):
    return emulated_specs(text, SHAPE, simulated_layers=1, fleet_expert_bytes=6144, slowdown=slowdown)


def phase_from_sim(devices, costs, counts_by_device, clients, calls=40):
    """Run the simulator itself on a calibration-shaped trace: every call gives each listed device one expert's
    rows; returns the phase as the benchmark would measure it."""
    experts = sum(len(v) for v in counts_by_device.values())
    row = np.zeros(experts, dtype=np.int64)
    assign, e = {}, 0
    for d, rows in counts_by_device.items():
        assign[d] = []
        for r in rows:
            row[e] = r
            assign[d].append((0, e))
            e += 1
    trace = Trace(t=np.arange(calls) * 0.01, layer=np.zeros(calls, dtype=np.int64), counts=np.tile(row, (calls, 1)))
    placement = Placement(version=1, assignments=assign)
    used = [d for d in devices if d.device_id in counts_by_device]
    r = simulate(trace, used, expert_bytes=6144, elastic=False, initial=placement,
                 config=costs.sim_config(mode="closed", concurrency=clients, top_k=1))
    by_id = {d.device_id: d for d in used}
    modelled = {d: by_id[d].service_s(rows) - costs.device_call_s for d, rows in counts_by_device.items()}
    # steady state: calls per second from the makespan, the median latency
    return EmulationPhase(clients, calls, r.makespan_s, r.p50_latency_ms / 1000, modelled)


def test_the_fit_recovers_the_costs_the_simulator_was_run_with():
    truth = EmulationCosts(call_s=0.031, worker_call_s=0.004, device_call_s=0.006)
    devices = emulated_sim_devices(specs(), truth)
    one = {"h100-0": [512, 512]}
    two = {"h100-0": [512], "h100-1": [512]}
    phases = [phase_from_sim(devices, truth, one, 1), phase_from_sim(devices, truth, two, 1),
              phase_from_sim(devices, truth, one, 6, calls=400), phase_from_sim(devices, truth, two, 6, calls=400)]
    fit = fit_emulation_costs(phases)
    assert fit.device_call_s == pytest.approx(truth.device_call_s, rel=0.05)
    assert fit.worker_call_s == pytest.approx(truth.worker_call_s, rel=0.05)
    assert fit.call_s == pytest.approx(truth.call_s, rel=0.05)


def test_the_fit_refuses_phases_that_cannot_separate_the_costs():
    one = EmulationPhase(1, 10, 5.0, 0.5, {"a": 0.4})
    two = EmulationPhase(1, 10, 5.0, 0.55, {"a": 0.4, "b": 0.4})
    busy = EmulationPhase(4, 20, 8.5, 1.7, {"a": 0.4})
    with pytest.raises(ValueError, match="saturated"):
        fit_emulation_costs([one, two])
    with pytest.raises(ValueError, match="two different numbers of devices"):
        fit_emulation_costs([one, busy])
    with pytest.raises(ValueError, match="calls"):
        fit_emulation_costs([EmulationPhase(1, 0, 5.0, 0.5, {"a": 0.4}), two, busy])
    fit = fit_emulation_costs([one, two, busy])
    assert fit.device_call_s == pytest.approx(8.5 / 20 - 0.4)
    assert fit.worker_call_s == pytest.approx(0.05) and fit.call_s == pytest.approx(0.5 - 0.4 - 0.025 - 0.05)


def test_simulated_emulated_devices_take_the_workers_time_plus_the_fitted_extra():
    costs = EmulationCosts(call_s=0.0, worker_call_s=0.0, device_call_s=0.003)
    fleet = specs("h100:1,l4:1", slowdown=250.0)
    devices = emulated_sim_devices(fleet, costs, copy_bytes_per_s=5e8)
    for spec, dev in zip(fleet, devices):
        for rows in ([1], [300, 7], [2048, 2048, 5]):
            assert dev.service_s(rows) == pytest.approx(emulated_call_s(spec.emulated, rows) + 0.003)
        assert dev.copy_bytes_per_s == 5e8 and dev.spec.emulated is None and dev.spec.memory_bytes == spec.memory_bytes
    assert devices[1].service_s([512]) > 4 * devices[0].service_s([512])
    with pytest.raises(ValueError, match="not an emulated device"):
        emulated_sim_devices([DeviceSpec(device_id="w", node_id="n", kind="gpu", memory_bytes=10)])


def test_a_calls_latency_carries_the_router_costs_per_call_and_per_device_touched():
    devices = emulated_sim_devices(specs(), None)
    trace = Trace(t=np.array([0.0]), layer=np.array([0]), counts=np.array([[100, 100, 0]]))
    split = Placement(version=1, assignments={"h100-0": [(0, 0), (0, 2)], "h100-1": [(0, 1)]})
    together = Placement(version=1, assignments={"h100-0": [(0, 0), (0, 1)], "h100-1": [(0, 2)]})
    cfg = SimConfig(router_call_s=0.02, router_worker_call_s=0.005)
    a = simulate(trace, devices, expert_bytes=1, elastic=False, initial=split, config=cfg)
    b = simulate(trace, devices, expert_bytes=1, elastic=False, initial=together, config=cfg)
    assert a.p99_latency_ms / 1000 == pytest.approx(devices[0].service_s([100]) + 0.02 + 2 * 0.005)
    assert b.p99_latency_ms / 1000 == pytest.approx(devices[0].service_s([100, 100]) + 0.02 + 0.005)


def test_choice_traces_route_exactly_their_counts_with_distinct_experts_per_token():
    pop = shifting_popularity(16, 2, s=1.2, phases=4, seed=3)
    choices, trace = choice_trace(pop, lines=40, layers=[1, 5], tokens=64, top_k=4, seconds_per_line=0.5, seed=7)
    assert choices.shape == (40, 64, 4)
    assert list(trace.layer[:4]) == [1, 5, 1, 5] and trace.t[-1] == pytest.approx(19.5)
    for i in range(40):
        assert all(len(set(tok)) == 4 for tok in choices[i].tolist())
        assert (np.bincount(choices[i].ravel(), minlength=16) == trace.counts[i]).all()
    assert (trace.counts.sum(axis=1) == 64 * 4).all()
    again, _ = choice_trace(pop, lines=40, layers=[1, 5], tokens=64, top_k=4, seconds_per_line=0.5, seed=7)
    assert (again == choices).all()
    # the hot expert of layer 1 moves between the first and last quarter, as the popularity says
    first, last = trace.counts[0:10:2].sum(axis=0), trace.counts[30:40:2].sum(axis=0)
    assert first.argmax() == pop[0, 0].argmax() and last.argmax() == pop[3, 0].argmax()
    assert pop[0, 0].argmax() != pop[3, 0].argmax()
    with pytest.raises(ValueError, match="popularity"):
        choice_trace(pop, lines=4, layers=[0], tokens=4, top_k=2, seconds_per_line=1, seed=0)


def test_drift_popularity_is_the_drift_traces_and_moves_over_its_duration():
    pop = drift_popularity(32, 2, 4, 600.0, seed=1)
    assert pop.shape == (600, 2, 32)
    assert np.allclose(pop.sum(axis=2), 1.0)
    assert np.abs(pop[0] - pop[-1]).sum() > 0.1


def test_the_comparison_reports_each_runs_errors_and_the_elastic_static_ratio():
    pred = {"h/s/static": {"tokens_per_s": 100.0, "p99_ms": 50.0, "bytes_moved": 0, "rebalances": 0},
            "h/s/elastic": {"tokens_per_s": 150.0, "p99_ms": 40.0, "bytes_moved": 10, "rebalances": 2}}
    meas = {"h/s/static": {"tokens_per_s": 80.0, "p99_ms": 50.0, "bytes_moved": 0, "rebalances": 0},
            "h/s/elastic": {"tokens_per_s": 160.0, "p99_ms": 50.0, "bytes_moved": 20, "rebalances": 3}}
    rows = {r["run"]: r for r in holdout_rows(pred, meas)}
    assert rows["h/s/static"]["tokens_per_s_error"] == pytest.approx(0.25)
    assert rows["h/s/elastic"]["p99_ms_error"] == pytest.approx(0.2)
    assert rows["h/s/elastic"]["bytes_moved_error"] == pytest.approx(0.5)
    assert rows["h/s/static"]["rebalances_error"] == 0.0
    assert worst(list(rows.values()), "tokens_per_s_error") == pytest.approx(0.25)
    (ratio,) = ratio_rows(pred, meas)
    assert ratio["ratio_predicted"] == pytest.approx(1.5) and ratio["ratio_measured"] == pytest.approx(2.0)
    assert ratio["ratio_error"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="differ"):
        holdout_rows(pred, {"h/s/static": meas["h/s/static"]})
    assert relative_error(1.0, 0.0) is None and relative_error(None, 1.0) is None and relative_error(0.0, 0.0) == 0.0


def test_placement_changes_count_publishes_in_the_window_and_the_replicas_they_added():
    log = [(0.0, 1, {"a": {(0, 0), (0, 1)}, "b": {(0, 2)}}),
           (1.0, 2, {"a": {(0, 0), (0, 1)}, "b": {(0, 2), (0, 0)}}),  # one copy added on b
           (2.0, 3, {"a": {(0, 0)}, "b": {(0, 2), (0, 0), (0, 1)}, "c": {(0, 1), (0, 2)}}),  # three added, one dropped
           (9.0, 4, {"a": {(0, 0), (0, 2)}, "b": {(0, 2)}})]  # after the window
    assert placement_changes(log, 0.5, 5.0, 100) == (2, 400)
    assert placement_changes(log, 1.5, 5.0, 100) == (1, 300)
    assert placement_changes(log, 0.5, 10.0, 10) == (3, 50)
    assert placement_changes(log[:1], 0.0, 10.0, 100) == (0, 0)


def test_in_order_completion_makes_a_fast_call_wait_for_the_slow_call_before_it():
    """A compiled graph returns outputs in submission order: the second call (on an idle fast device) completes
    only after the first (on a slow device); with plain calls it completes on its own."""
    devices = emulated_sim_devices(specs("h100:1,l4:1", slowdown=100.0), None)
    trace = Trace(t=np.array([0.0, 0.001]), layer=np.array([0, 0]), counts=np.array([[0, 2048], [64, 0]]))
    placement = Placement(version=1, assignments={"h100-0": [(0, 0)], "l4-0": [(0, 1)]})
    slow, fast = devices[1].service_s([2048]), devices[0].service_s([64])
    runs = {flag: simulate(trace, devices, expert_bytes=1, elastic=False, initial=placement,
                           config=SimConfig(mode="open", in_order=flag)) for flag in (False, True)}
    # two calls: p50 is the mean of their latencies
    assert runs[False].latency_percentiles_ms["p50"] / 1000 == pytest.approx((slow + fast) / 2, rel=1e-6)
    assert runs[True].makespan_s == pytest.approx(runs[False].makespan_s) == pytest.approx(slow)
    # in order, the fast call's latency is the slow call's finish less its own arrival
    assert runs[True].latency_percentiles_ms["p50"] / 1000 == pytest.approx((slow + slow - 0.001) / 2, rel=1e-6)


def test_the_dispatcher_counts_a_calls_rows_until_all_its_outputs_are_in_as_the_router_does():
    """Call A: expert 0 split between h100-0 and l4-0, 1000 rows of expert 2 on h100-0 alone, 2000 rows of
    expert 1 on l4-1 (slow). Call B arrives once h100-0 and l4-0 are done but l4-1 is not: the router still
    counts call A's rows on h100-0 (``_absorb`` drops a call's rows when all its outputs are in), so water-filling
    sends most of B's expert-0 rows to l4-0; counted only until each device's own end, they would go by speed."""
    from moefleet.controller.sim.engine import _Run
    from moefleet.router_service.dispatch import split_rows

    devices = emulated_sim_devices(specs("h100:1,l4:2", slowdown=100.0), None)
    placement = Placement(version=1, assignments={"h100-0": [(0, 0), (0, 2)], "l4-0": [(0, 0)], "l4-1": [(0, 1)]},
                          speeds={"h100-0": 1.0, "l4-0": 0.122, "l4-1": 0.122})
    t_b = devices[0].service_s([200, 1000]) + 0.01
    assert t_b < devices[2].service_s([2000])
    trace = Trace(t=np.array([0.0, t_b]), layer=np.array([0, 0]), counts=np.array([[200, 2000, 1000], [200, 0, 0]]))
    run = _Run(trace, devices, 1.0, SimConfig(mode="open"), placement, elastic=False)
    run.run()
    served = sum(run.served_windows.values())  # [device, layer] rows, both calls
    a = split_rows(200, ["h100-0", "l4-0"], placement.speeds, {}, np.random.default_rng(0))
    b = split_rows(200, ["h100-0", "l4-0"], placement.speeds, {"h100-0": a[0] + 1000, "l4-0": a[1]},
                   np.random.default_rng(0))
    assert b[1] > 100 > 3 * a[1]  # B's expert 0 mostly to the L4
    assert served[1, 0] == pytest.approx(a[1] + b[1], abs=2)  # rounding: one row either way per split
