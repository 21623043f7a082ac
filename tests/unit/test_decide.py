"""The controller's pure decision: autoscaling never shrinks the fleet below what holds every expert once."""

import numpy as np

from moefleet.controller.autoscale import AutoscalingConfig
from moefleet.controller.decide import decide
from moefleet.controller.main import ControllerConfig
from moefleet.core.placement import DeviceSpec, spread_placement


def test_autoscaling_stops_at_the_devices_memory_needs():
    devices = [DeviceSpec(device_id=f"d{i}", node_id="n", kind="gpu", memory_bytes=10) for i in range(4)]
    config = ControllerConfig(
        ray_address=None, min_tokens=0, planner={"headroom": 0.0},
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4, target_queue_depth=100.0, downscale_delay_s=0),
    )
    current = spread_placement([0], 24, [d.device_id for d in devices])
    load = np.ones((1, 24))
    # idle queues ask for one device; 24 experts of 1 byte need three devices of 10
    decision = decide(config, {"active_devices": 4}, devices, current, load, {d.device_id: 0.0 for d in devices}, 0.0,
                      expert_bytes=1, layers=[0])
    assert decision.report["active_devices"] == 3
    assert decision.plan is not None and set(decision.plan.target.assignments) <= {"d0", "d1", "d2"}


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
