"""Simulator inputs: device types and fleet strings, synthetic Zipf traffic, the controller's pure decision."""

import numpy as np
import pytest

from moefleet.controller.decide import decide
from moefleet.controller.inventory import ACCELERATORS, GIB
from moefleet.controller.main import ControllerConfig
from moefleet.controller.sim import (
    DEVICE_TYPES,
    ExpertShape,
    FleetError,
    MODEL_SHAPES,
    ZipfTraffic,
    fleet_devices,
    inclusion_probabilities,
    parse_fleet,
    parse_traffic,
)
from moefleet.core.placement import DeviceSpec, Placement
from moefleet.core.trace import TraceError

# --- devices ---------------------------------------------------------------------------------------------------


def test_device_types_take_speed_and_memory_from_the_inventory_table():
    for name, accel in (("h100", "H100"), ("h200", "H200"), ("a100", "A100"), ("l4", "L4")):
        assert DEVICE_TYPES[name].speed == ACCELERATORS[accel].speed
        assert DEVICE_TYPES[name].memory_gib == ACCELERATORS[accel].memory_gib


def test_fleet_string_with_an_override():
    entries = parse_fleet("h100:16, l4:4:network_gbps=100:speed=0.2")
    assert [(e.device_type.name, e.count) for e in entries] == [("h100", 16), ("l4", 4)]
    assert entries[1].device_type.network_gbps == 100 and entries[1].device_type.speed == 0.2
    assert entries[1].device_type.memory_gib == DEVICE_TYPES["l4"].memory_gib


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "fleet: empty"),
        ("x100:4", "unknown device type 'x100'"),
        ("h100:many", "count in 'h100:many' must be an integer"),
        ("h100", "needs TYPE:COUNT"),
        ("h100:4:speed=fast", "speed in 'h100:4:speed=fast' must be a number"),
        ("h100:4:colour=red", "is not field=value"),
        ("h100:4,h100:2", "listed twice"),
        ("h100:0", "no devices"),
    ],
)
def test_a_bad_fleet_string_names_the_field(text, message):
    with pytest.raises(FleetError, match=message):
        parse_fleet(text)


def test_measured_speed_follows_the_slower_of_compute_and_network():
    shape = ExpertShape(4096, 14336)
    devs = fleet_devices(parse_fleet("h100:1,l4:1"), shape, simulated_layers=1)
    h100, l4 = devs
    assert h100.spec.speed == 1.0
    assert l4.spec.speed == pytest.approx(h100.effective_row_s / l4.effective_row_s, abs=1e-3)
    spec = fleet_devices(parse_fleet("l4:1"), shape, simulated_layers=1, planner_speed="spec")[0]
    assert spec.spec.speed == ACCELERATORS["L4"].speed
    local = fleet_devices(parse_fleet("l4:1"), shape, simulated_layers=1, remote_activations=False)[0]
    assert local.act_row_s == 0 and local.spec.speed == pytest.approx(ACCELERATORS["L4"].speed, abs=1e-3)


def test_only_devices_off_the_routers_node_pay_the_network_and_with_the_cost_models_bytes():
    from moefleet.controller.sim.devices import token_transfer_s

    shape = ExpertShape(7168, 2048)
    devs = fleet_devices(parse_fleet("h100:16"), shape, simulated_layers=1)
    on_router_node = [d for d in devs if d.spec.node_id == devs[0].spec.node_id]
    assert len(on_router_node) == 8 and all(d.act_row_s == 0 for d in on_router_node)  # CUDA IPC: nothing moves
    remote = [d for d in devs if d.spec.node_id != devs[0].spec.node_id]
    assert remote and all(d.act_row_s == pytest.approx(2 * 7168 * 2 / (400e9 / 8)) for d in remote)
    assert token_transfer_s(shape, 400) == remote[0].act_row_s


def test_simulated_layers_get_their_share_of_device_memory():
    shape, _, _ = MODEL_SHAPES["deepseek-v3"]
    (dev,) = fleet_devices(parse_fleet("h100:1"), shape, simulated_layers=4)
    assert dev.spec.memory_bytes == int(ACCELERATORS["H100"].memory_gib * GIB * 4 / 58)


# --- traffic ---------------------------------------------------------------------------------------------------


def test_inclusion_probabilities_sum_to_top_k_and_cap_at_one():
    rng = np.random.default_rng(0)
    w = np.arange(1, 17, dtype=float) ** -1.2
    pi = inclusion_probabilities(w / w.sum(), 4, 20000, rng)
    assert pi.sum() == pytest.approx(4.0)
    assert pi.max() <= 1.0 and np.all(np.diff(pi) <= 0.02)  # hotter ranks are included more often


def test_zipf_traffic_shifts_its_hot_set_and_offers_the_rate():
    traffic = ZipfTraffic(s=1.2, experts=32, layers=2, top_k=2, duration_s=40, shift_s=10, tokens_per_call=2048, seed=1)
    trace = traffic.trace(rate=20000)
    assert trace.layers == [0, 1] and trace.num_experts == 32
    tokens = trace.counts.sum() / (2 * 2)  # top-2, each token passes both layers
    assert tokens / 40 == pytest.approx(20000, rel=0.1)
    hot = [int(trace.load(p * 10, (p + 1) * 10)[0].argmax()) for p in range(4)]
    assert len(set(hot)) > 1
    assert np.array_equal(trace.counts, traffic.trace(rate=20000).counts)  # seeded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zipf:s=-1", "s must be >= 0"),
        ("zipf:top_k=9,experts=8", "top_k must be in"),
        ("zipf:speed=3", "zipf field 'speed=3'"),
        ("zipf:experts=many", "experts must be int"),
        ("zipf:rate=5,load=1", "not both"),
        ("uniform:s=1", "not a synthetic trace"),
    ],
)
def test_a_bad_zipf_spec_names_the_field(text, message):
    with pytest.raises(TraceError, match=message):
        parse_traffic(text)


def test_zipf_defaults_to_a_load_relative_to_the_fleet():
    assert parse_traffic("zipf").load == 1.25
    assert parse_traffic("zipf:rate=1000").load is None


# --- the controller's decision ---------------------------------------------------------------------------------


def _devices(n):
    return [DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=10_000) for i in range(n)]


def test_decide_plans_from_scratch_on_every_device_without_autoscaling():
    decision = decide(ControllerConfig(ray_address=None), {}, _devices(4), Placement(), np.ones((1, 8)) * 100, None, 0.0,
                      expert_bytes=1000, layers=[0])
    assert decision.plan is not None and decision.plan.apply
    assert set(decision.plan.target.assignments) == {"d0", "d1", "d2", "d3"}
    assert "active_devices" not in decision.record


def test_decide_skips_planning_on_too_little_load_once_a_placement_exists():
    current = Placement(version=3, assignments={"d0": [(0, e) for e in range(8)]})
    config = ControllerConfig(ray_address=None, min_tokens=100, planner={"min_replicas": 1})  # no floor to restore
    decision = decide(config, {}, _devices(2), current, np.ones((1, 8)), None, 5.0, expert_bytes=1000, layers=[0])
    assert decision.plan is None and decision.report["skipped"]


def test_decide_scales_active_devices_by_queue_depth_and_returns_the_policy_state():
    config = ControllerConfig(ray_address=None, autoscaling={"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0,
                                                            "target_queue_depth": 1.0})
    current = Placement(version=1, assignments={"d0": [(0, e) for e in range(8)]})
    record = {"active_devices": 1}
    decision = decide(config, record, _devices(4), current, np.ones((1, 8)) * 100, {"d0": 3.0}, 10.0,
                      expert_bytes=1000, layers=[0])
    assert decision.record["active_devices"] == 3 and "autoscale_state" in decision.record
    assert [d.device_id for d in decision.devices] == ["d0", "d1", "d2"]
    assert set(decision.plan.target.assignments) <= {"d0", "d1", "d2"}
    assert record == {"active_devices": 1}  # the input record is not modified


# --- local mode's model ----------------------------------------------------------------------------------------


def test_cpu_calibration_measures_a_per_row_cost_and_a_floor_and_restores_threads():
    import torch

    from moefleet.controller.sim import calibrate_cpu

    before = torch.get_num_threads()
    cal = calibrate_cpu(64, 128, rows=64, repeats=3)
    assert cal.row_s > 0 and cal.floor_s > 0 and cal.threads == 1
    assert cal.floor_s < 64 * cal.row_s * 10  # one row costs less than ten full batches
    assert torch.get_num_threads() == before


def test_local_devices_predict_equal_ratios_when_nothing_drifts():
    from moefleet.controller.sim import CpuCalibration, ZipfTraffic, local_devices, local_memory_bytes, predict_local

    cal = CpuCalibration(hidden=64, intermediate=128, rows=64, row_s=1e-4, floor_s=1e-4, threads=1)
    memory = local_memory_bytes(2, 16, 1000)
    assert memory == int(2 * 16 * 1000 / 1 / 0.9) + 1000  # every expert twice over the other worker
    devs = local_devices(2, cal, memory_bytes=memory, call_overhead_s=0.001)
    assert [d.device_id for d in devs] == ["worker-0", "worker-1"]
    trace = ZipfTraffic(s=1.2, experts=8, layers=2, top_k=2, duration_s=10, shift_s=0, tokens_per_call=64,
                        arrivals="uniform").trace(rate=2000)
    out = predict_local(trace, devs, expert_bytes=1000, top_k=2, clients=2)
    assert out["ratio_elastic_over_static"] == pytest.approx(1.0, abs=0.05)
