"""Autoscaling policy: plain data and a fake clock, no Ray."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moefleet.controller.autoscale import (
    DOWNSCALE_SINCE,
    UPSCALE_SINCE,
    AutoscalingConfig,
    autoscale_step,
    calculate_desired_num_replicas,
)


def _metrics(*depths: float) -> dict[str, float]:
    return {f"replica-{i}": d for i, d in enumerate(depths)}


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def test_desired_matches_queue_depth_over_target():
    config = AutoscalingConfig(target_queue_depth=2)
    assert calculate_desired_num_replicas(config, total_queue_depth=8, current_num_replicas=2) == 4
    assert calculate_desired_num_replicas(config, total_queue_depth=4, current_num_replicas=2) == 2
    assert calculate_desired_num_replicas(config, total_queue_depth=2, current_num_replicas=4) == 1
    assert calculate_desired_num_replicas(config, total_queue_depth=0, current_num_replicas=4) == 0


def test_desired_is_not_clamped_to_bounds():
    config = AutoscalingConfig(min_replicas=2, max_replicas=3, target_queue_depth=1)
    assert calculate_desired_num_replicas(config, 10, 2) == 10
    assert calculate_desired_num_replicas(config, 0, 2) == 0


def test_upscaling_factor_smooths_the_step_up():
    config = AutoscalingConfig(target_queue_depth=1, upscaling_factor=0.5)
    # error ratio 3 -> smoothed 1 + 2 * 0.5 = 2 -> 2 * 2 = 4 replicas (not 6)
    assert calculate_desired_num_replicas(config, 6, 2) == 4


def test_downscaling_factor_still_steps_down_by_one_when_stuck():
    config = AutoscalingConfig(target_queue_depth=1, downscaling_factor=0.01)
    # error ratio 0.5 would halve; smoothing keeps ceil(4 * 0.995) = 4, so step down by one
    assert calculate_desired_num_replicas(config, 2, 4) == 3


def test_desired_rejects_zero_current_replicas():
    with pytest.raises(ValueError, match="current_num_replicas"):
        calculate_desired_num_replicas(AutoscalingConfig(), 1, 0)


@settings(max_examples=200, deadline=None)
@given(
    total=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    current=st.integers(min_value=1, max_value=1000),
    target=st.floats(min_value=0.1, max_value=100),
)
def test_desired_moves_towards_target_direction(total, current, target):
    config = AutoscalingConfig(target_queue_depth=target, max_replicas=1000)
    desired = calculate_desired_num_replicas(config, total, current)
    per_replica = total / current
    if per_replica > target * (1 + 1e-9):
        assert desired >= current
    if per_replica < target * (1 - 1e-9) and current > 0:
        assert desired <= current


def test_upscale_waits_for_upscale_delay():
    config = AutoscalingConfig(target_queue_depth=1, upscale_delay_s=30, max_replicas=10)
    clock = FakeClock()
    n, state = autoscale_step(config, _metrics(4, 4), 2, None, clock.t)
    assert n == 2 and state[UPSCALE_SINCE] == clock.t
    n, state = autoscale_step(config, _metrics(4, 4), 2, state, clock.advance(29.9))
    assert n == 2
    n, state = autoscale_step(config, _metrics(4, 4), 2, state, clock.advance(0.1))
    assert n == 8
    assert state[UPSCALE_SINCE] is None


def test_downscale_waits_for_downscale_delay():
    config = AutoscalingConfig(target_queue_depth=2, downscale_delay_s=600, min_replicas=1)
    clock = FakeClock()
    state = None
    for _ in range(60):  # t = 0 .. 590 s after the first low reading
        n, state = autoscale_step(config, _metrics(0.5, 0.5, 0.5, 0.5), 4, state, clock.t)
        assert n == 4
        clock.advance(10)
    n, state = autoscale_step(config, _metrics(0.5, 0.5, 0.5, 0.5), 4, state, clock.t)
    assert n == 1
    assert state[DOWNSCALE_SINCE] is None


def test_a_reversal_restarts_the_delay():
    config = AutoscalingConfig(target_queue_depth=1, upscale_delay_s=30, downscale_delay_s=30)
    clock = FakeClock()
    n, state = autoscale_step(config, _metrics(5, 5), 2, None, clock.t)
    n, state = autoscale_step(config, _metrics(0, 0), 2, state, clock.advance(20))  # now wants down
    assert n == 2 and state[UPSCALE_SINCE] is None and state[DOWNSCALE_SINCE] == clock.t
    n, state = autoscale_step(config, _metrics(5, 5), 2, state, clock.advance(20))  # up again: restarts
    assert n == 2 and state[UPSCALE_SINCE] == clock.t
    n, state = autoscale_step(config, _metrics(5, 5), 2, state, clock.advance(29))
    assert n == 2
    n, state = autoscale_step(config, _metrics(5, 5), 2, state, clock.advance(1))
    assert n == 8


def test_steady_load_clears_pending_decisions():
    config = AutoscalingConfig(target_queue_depth=1, upscale_delay_s=30)
    clock = FakeClock()
    _, state = autoscale_step(config, _metrics(3, 3), 2, None, clock.t)
    n, state = autoscale_step(config, _metrics(1, 1), 2, state, clock.advance(10))
    assert n == 2 and state == {UPSCALE_SINCE: None, DOWNSCALE_SINCE: None}


def test_bounds_apply_to_every_decision():
    config = AutoscalingConfig(target_queue_depth=1, min_replicas=2, max_replicas=5, upscale_delay_s=0,
                               downscale_delay_s=0)
    assert autoscale_step(config, _metrics(100, 100), 2, None, 0.0)[0] == 5
    assert autoscale_step(config, _metrics(0, 0, 0, 0), 4, None, 0.0)[0] == 2
    # a count outside the bounds (the config changed) is pulled back at once
    assert autoscale_step(config, _metrics(1), 1, None, 0.0)[0] == 2
    assert autoscale_step(config, _metrics(*[1.0] * 9), 9, None, 0.0)[0] == 5


def test_scale_from_zero_is_immediate_when_requests_wait():
    config = AutoscalingConfig(min_replicas=0, upscale_delay_s=300)
    assert autoscale_step(config, {"queued": 3.0}, 0, None, 0.0)[0] == 1
    assert autoscale_step(config, {}, 0, None, 0.0)[0] == 0


def test_policy_state_is_returned_not_mutated():
    config = AutoscalingConfig(target_queue_depth=1, upscale_delay_s=30)
    before = {UPSCALE_SINCE: None, DOWNSCALE_SINCE: None}
    _, after = autoscale_step(config, _metrics(5), 1, before, 7.0)
    assert before == {UPSCALE_SINCE: None, DOWNSCALE_SINCE: None}
    assert after[UPSCALE_SINCE] == 7.0


def test_restarted_controller_resumes_the_delay_from_stored_state():
    config = AutoscalingConfig(target_queue_depth=1, upscale_delay_s=30)
    _, state = autoscale_step(config, _metrics(5), 1, None, 100.0)
    stored = dict(state)  # e.g. written to Redis and read back by a new leader
    assert autoscale_step(config, _metrics(5), 1, stored, 130.0)[0] == 5


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("min_replicas", {"min_replicas": -1}),
        ("max_replicas", {"max_replicas": 0}),
        ("target_queue_depth", {"target_queue_depth": 0}),
        ("upscale_delay_s", {"upscale_delay_s": -1}),
        ("downscale_delay_s", {"downscale_delay_s": float("nan")}),
        ("upscaling_factor", {"upscaling_factor": 0}),
        ("downscaling_factor", {"downscaling_factor": -0.5}),
        ("metrics_interval_s", {"metrics_interval_s": 0}),
        ("min_replicas", {"min_replicas": 4, "max_replicas": 3}),
        ("extra_field", {"extra_field": 1}),
    ],
)
def test_bad_config_names_the_field(field, kwargs):
    with pytest.raises(ValidationError, match=field):
        AutoscalingConfig(**kwargs)


def test_bad_metrics_are_rejected_with_the_replica_named():
    with pytest.raises(ValueError, match="replica-1"):
        autoscale_step(AutoscalingConfig(), _metrics(1.0, -2.0), 2, None, 0.0)
