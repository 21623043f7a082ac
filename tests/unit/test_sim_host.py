"""Local mode in the simulator: host CPU on the workers' cores, and costs fitted from a static fleet's CPU."""

import pytest

from moefleet.controller.main import ControllerConfig
from moefleet.controller.sim import (
    Cores,
    CpuCalibration,
    HostCpu,
    LocalCosts,
    PhaseCpu,
    SimConfig,
    fit_local_costs,
    local_devices,
    predict_local,
    simulate,
)
from moefleet.core.placement import Placement, spread_placement

from tests.sim_helpers import EXPERT_BYTES, devices, steady_trace

ROW_S = 1e-3
ROWS = 10  # rows per expert per call: 10 ms of a device
START = Placement(version=1, assignments={"d0": [(0, 0), (0, 1)], "d1": [(0, 2), (0, 3)]})


def _closed(host: HostCpu | None, clients: int = 4) -> SimConfig:
    return SimConfig(mode="closed", concurrency=clients, top_k=2, host_cpu=host)


def _static(counts, host, calls=400):
    return simulate(steady_trace(counts, 100, calls / 100), devices(2, 4, row_s=ROW_S), expert_bytes=EXPERT_BYTES,
                    config=_closed(host), elastic=False, initial=START)


# --- the host's work on the cores ------------------------------------------------------------------------------


def test_a_core_runs_work_in_the_order_handed_out_and_lends_its_idle_time_to_later_work():
    cores = Cores(2, first_spare=2)
    assert cores.place(0, 1.0, 1.0) == [(1.0, 2.0)]
    assert cores.place(0, 3.0, 1.0) == [(3.0, 4.0)]
    assert cores.place(0, 0.5, 2.0) == [(0.5, 1.0), (2.0, 3.0), (4.0, 4.5)]  # fills the gaps, then after the end
    assert cores.busy[0] == [(0.5, 4.5)]
    assert cores.finish(0, 0.0, 1.0) == pytest.approx(5.0) and cores.finish(1, 0.0, 1.0) == 1.0
    cores.forget_before(4.5)
    assert cores.busy[0] == [] and cores.place(0, 5.0, 0.0) == [(5.0, 5.0)]
    with pytest.raises(ValueError, match="seconds"):
        cores.place(0, 6.0, -1.0)


def test_host_work_goes_to_the_core_that_finishes_it_first_and_spare_cores_win_ties():
    cores = Cores(3, first_spare=2)  # two device cores, one spare
    cores.place(0, 0.0, 5.0)
    assert cores.host_core(1.0, 0.5) == 2  # core 1 and the spare are both idle: the spare
    cores.place(2, 0.0, 3.0)
    assert cores.host_core(1.0, 0.5) == 1
    cores.place(1, 0.0, 4.0)
    assert cores.host_core(1.0, 0.5) == 2  # the spare frees first (3.0)
    assert Cores(2, first_spare=2).host_core(0.0, 1.0) == 0  # no spare, all idle: the lowest


def test_host_cpu_is_free_while_the_other_core_idles():
    # both experts of every call on d0 (static): d0 works 2 x 10 ms a call; the host's 5 ms go to d1's idle core
    without = _static([ROWS, ROWS, 0, 0], None)
    with_host = _static([ROWS, ROWS, 0, 0], HostCpu(call_s=0.005))
    assert without.tokens_per_s == pytest.approx(ROWS / (2 * ROWS * ROW_S), rel=0.01)
    assert with_host.tokens_per_s == pytest.approx(without.tokens_per_s, rel=0.01)
    assert with_host.host_cpu_s == pytest.approx(400 * 0.005)


def test_host_cpu_costs_the_workers_its_time_when_every_core_is_busy():
    # one expert on each device: 10 ms on each core a call, plus 5 ms of host work on one of them
    without = _static([ROWS, 0, ROWS, 0], None)
    with_host = _static([ROWS, 0, ROWS, 0], HostCpu(call_s=0.005))
    assert without.tokens_per_s == pytest.approx(ROWS / (ROWS * ROW_S), rel=0.01)
    # two cores give 2 s a second to calls costing 2 x 10 + 5 ms each
    assert with_host.tokens_per_s == pytest.approx(ROWS * 2 / (2 * ROWS * ROW_S + 0.005), rel=0.03)


def test_host_cpu_counts_the_devices_a_call_touches_and_the_rows_they_return():
    per_call = _static([ROWS, 0, ROWS, 0], HostCpu(call_s=0.002, worker_call_s=0.0015, returned_row_s=1e-4))
    assert per_call.host_cpu_s == pytest.approx(400 * (0.002 + 2 * 0.0015 + 2 * ROWS * 1e-4))
    one_device = _static([ROWS, ROWS, 0, 0], HostCpu(call_s=0.002, worker_call_s=0.0015, returned_row_s=1e-4))
    assert one_device.host_cpu_s == pytest.approx(400 * (0.002 + 0.0015 + ROWS * 1e-4))  # one row per token


def test_background_cpu_takes_its_share_of_two_busy_cores():
    without = _static([ROWS, 0, ROWS, 0], None)
    loaded = _static([ROWS, 0, ROWS, 0], HostCpu(background_cores=0.5))
    assert loaded.tokens_per_s == pytest.approx(without.tokens_per_s * (2 - 0.5) / 2, rel=0.03)


def test_controller_cpu_is_charged_at_each_step_of_an_elastic_run_only():
    host = HostCpu(controller_step_s=0.1)
    trace = steady_trace([ROWS, 0, ROWS, 0], 100, 4)
    cfg = _closed(host).model_copy(update={"controller": ControllerConfig(ray_address=None, interval_s=1.0)})
    runs = {e: simulate(trace, devices(2, 4, row_s=ROW_S), expert_bytes=EXPERT_BYTES, config=cfg, elastic=e,
                        initial=START) for e in (True, False)}
    assert runs[False].host_cpu_s == 0
    assert runs[True].host_cpu_s == pytest.approx(0.1 * runs[True].steps) and runs[True].steps >= 2


def test_host_cpu_config_rejects_negative_costs():
    with pytest.raises(ValueError, match="call_s"):
        HostCpu(call_s=-1)


# --- costs fitted from a static fleet ---------------------------------------------------------------------------

CAL = CpuCalibration(hidden=64, intermediate=128, rows=256, row_s=1e-4, floor_s=2e-3, threads=1)
TRUE = LocalCosts(worker_call_s=0.012, worker_row_out_s=2e-5, kernel_factor=1.15, host_call_s=0.009,
                  host_worker_call_s=0.004, host_row_out_s=1e-5, background_cores=0.05, other_cores=0.1)
ONE = {"worker-0": [512, 512]}  # both experts of every token on worker-0
TWO = {"worker-0": [512], "worker-1": [512]}  # one expert on each worker
HALF = {"worker-0": [256, 256], "worker-1": [256, 256]}  # half the tokens on two experts of each worker


def _phase(rows: dict, calls: int, wall: float = 5.0) -> PhaseCpu:
    """What a fleet with the TRUE costs would measure over one phase."""
    if not calls:
        return PhaseCpu(wall, 0, {}, worker_cpu_s=0.02 * wall, host_cpu_s=0.03 * wall, other_cpu_s=0.1 * wall)
    p = PhaseCpu(wall, calls, rows, 0.0, 0.0)
    worker = (p.worker_calls * TRUE.worker_call_s + p.returned_rows * TRUE.worker_row_out_s
              + TRUE.kernel_factor * p.kernel_s(CAL) + 0.02 * wall)
    host = (calls * TRUE.host_call_s + p.worker_calls * TRUE.host_worker_call_s + p.returned_rows * TRUE.host_row_out_s
            + 0.03 * wall)
    return PhaseCpu(wall, calls, rows, worker, host, 0.1 * wall)


def test_returned_rows_and_kernel_time_of_a_phase():
    p = PhaseCpu(5.0, 10, HALF, 0.0, 0.0)
    assert (p.worker_calls, p.returned_rows) == (20, 10 * (256 + 256))
    assert p.kernel_s(CAL) == pytest.approx(10 * 4 * 256 * CAL.row_s)
    assert PhaseCpu(5.0, 10, {"worker-0": [3]}, 0.0, 0.0).kernel_s(CAL) == pytest.approx(10 * CAL.floor_s)


def test_fit_local_costs_recovers_the_costs_that_made_the_measurements():
    phases = [_phase({}, 0), _phase(ONE, 50), _phase(TWO, 60), _phase(HALF, 70), _phase(ONE, 48)]
    fit = fit_local_costs(phases, CAL)
    for name in TRUE.__dataclass_fields__:
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name


def test_fit_local_costs_keeps_every_cost_nonnegative():
    # a second worker call that saves the host CPU (noise): its cost is 0, not negative
    idle = PhaseCpu(5.0, 0, {}, 0.0, 0.0)
    one = PhaseCpu(5.0, 50, ONE, 5.0, 1.0)
    two = PhaseCpu(5.0, 50, TWO, 5.5, 0.8)
    half = PhaseCpu(5.0, 50, HALF, 5.2, 0.6)
    fit = fit_local_costs([idle, one, two, half], CAL)
    assert min(fit.host_call_s, fit.host_worker_call_s, fit.host_row_out_s) == 0.0
    assert fit.host_call_s + fit.host_worker_call_s + fit.host_row_out_s > 0
    assert all(getattr(fit, k) >= 0 for k in TRUE.__dataclass_fields__)


def test_fit_local_costs_needs_an_idle_phase_and_independent_shapes_of_calls():
    with pytest.raises(ValueError, match="idle"):
        fit_local_costs([_phase(ONE, 50), _phase(TWO, 60), _phase(HALF, 70)], CAL)
    with pytest.raises(ValueError, match="independently"):
        fit_local_costs([_phase({}, 0), _phase(ONE, 50), _phase(TWO, 60)], CAL)


def test_phase_cpu_from_processes_splits_workers_from_the_host():
    p = PhaseCpu.from_processes(4.0, 10, {"worker-0": [8]}, {"worker-0": 3.0, "worker-1": 0.1, "router": 0.5,
                                                              "raylet": 0.2}, other_cpu_s=0.3)
    assert (p.worker_cpu_s, p.host_cpu_s, p.other_cpu_s, p.worker_calls) == (pytest.approx(3.1), pytest.approx(0.7), 0.3, 10)


def test_local_devices_take_the_fitted_worker_costs_and_host_cpu_the_background():
    devs = local_devices(2, CAL, memory_bytes=10**6, costs=TRUE)
    assert devs[0].row_s == pytest.approx(CAL.row_s * 1.15) and devs[0].floor_s == pytest.approx(CAL.floor_s * 1.15)
    assert devs[1].service_s([512, 100]) == pytest.approx(0.012 + 612 * CAL.row_s * 1.15 + 512 * 2e-5)
    host = TRUE.host_cpu()
    assert (host.call_s, host.worker_call_s, host.returned_row_s, host.background_cores) == (
        0.009, 0.004, 1e-5, pytest.approx(0.15))
    assert host.call_cpu_s(2, 1000) == pytest.approx(0.009 + 2 * 0.004 + 1000 * 1e-5)
    assert TRUE.host_cpu(include_other=False).background_cores == pytest.approx(0.05)


def test_host_cpu_lowers_the_gain_of_spreading_hot_experts_that_start_on_one_worker():
    # every call's two experts start on worker-0; elastic replicates them on worker-1 (memory for every expert twice)
    cal = CpuCalibration(hidden=64, intermediate=128, rows=256, row_s=ROW_S, floor_s=0.0, threads=1)
    devs = local_devices(2, cal, memory_bytes=20 * EXPERT_BYTES, call_overhead_s=0.0)
    trace = steady_trace([ROWS, ROWS, 0, 0, 0, 0, 0, 0], 100, 20)
    ctl = ControllerConfig(ray_address=None, interval_s=1.0, load_window_s=1.0, load_windows=3, load_half_life_s=1.0,
                           min_tokens=10)
    start = spread_placement([0], 8, ["worker-0", "worker-1"])
    free = predict_local(trace, devs, expert_bytes=EXPERT_BYTES, top_k=2, clients=4, controller=ctl, initial=start)
    busy = predict_local(trace, devs, expert_bytes=EXPERT_BYTES, top_k=2, clients=4, controller=ctl, initial=start,
                         host_cpu=HostCpu(call_s=0.006))
    assert free["ratio_elastic_over_static"] > 1.6  # nearly both cores' worth once replicated
    # with the host's 6 ms a call the static fleet still runs at worker-0's speed; the elastic one pays for it
    assert busy["static"]["tokens_per_s"] == pytest.approx(free["static"]["tokens_per_s"], rel=0.02)
    assert busy["ratio_elastic_over_static"] < free["ratio_elastic_over_static"] - 0.2
