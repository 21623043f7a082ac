"""Replica-count autoscaling by queue depth, in the manner of Ray Serve's ``autoscaling_policy.py``. Pure.

Two pieces, both plain functions:

* ``calculate_desired_num_replicas(config, total_queue_depth, current_num_replicas)``
  says how many replicas would bring the queue depth per replica back to
  ``config.target_queue_depth``, with the up/down smoothing factors. No
  bounds, no delays: it computes "desired" only.
* ``autoscale_step(config, metrics, current_num_replicas, policy_state, now)``
  is the guard rail around it: a scale-up (scale-down) happens only after
  desired has stayed above (below) current for ``upscale_delay_s``
  (``downscale_delay_s``), and the result is clamped to ``[min_replicas,
  max_replicas]`` once, at the end. The state it needs between calls (when
  the current run of same-direction decisions began) is returned, never kept
  on an object: the controller stores it with its record, so a restarted
  controller resumes the same delays. The clock is an argument.

Metrics are queue depths (ongoing + queued requests) per replica, each
already averaged over the last ``metrics_interval_s`` by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["AutoscalingConfig", "autoscale_step", "calculate_desired_num_replicas"]

UPSCALE_SINCE = "upscale_since"
"""policy_state key: time the current run of scale-up decisions began, or None."""
DOWNSCALE_SINCE = "downscale_since"
"""policy_state key: time the current run of scale-down decisions began, or None."""


class AutoscalingConfig(BaseModel):
    """How a group's replica count follows its queue depth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 allows scaling to zero.")
    max_replicas: int = Field(default=8, ge=1, description="Most replicas.")
    target_queue_depth: float = Field(
        default=2.0, gt=0, description="Ongoing plus queued requests per replica that the policy aims for."
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="Desired must stay above current this long before scaling up."
    )
    downscale_delay_s: float = Field(
        default=600.0, ge=0, description="Desired must stay below current this long before scaling down."
    )
    upscaling_factor: float = Field(
        default=1.0, gt=0, description="Multiplies the distance to the target when scaling up (<1 is gentler)."
    )
    downscaling_factor: float = Field(
        default=1.0, gt=0, description="Multiplies the distance to the target when scaling down (<1 is gentler)."
    )
    metrics_interval_s: float = Field(
        default=10.0, gt=0, description="How often replicas report queue depth; each report is averaged over it."
    )

    @model_validator(mode="after")
    def _min_not_above_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


def calculate_desired_num_replicas(
    config: AutoscalingConfig, total_queue_depth: float, current_num_replicas: int
) -> int:
    """Replicas that would bring the queue depth per replica to the target, smoothed.

    Args:
        config: the group's autoscaling config.
        total_queue_depth: sum over running replicas of their queue depth,
            each already time-averaged over ``config.metrics_interval_s``.
        current_num_replicas: replicas running now, ``>= 1`` (scaling up from
            zero is ``autoscale_step``'s business).

    Returns:
        The desired count, not clamped to the config's bounds (may be 0).

    The error ratio ``total / (target * current)`` is >= 1 when replicas are
    over target; its distance to 1 is multiplied by ``upscaling_factor`` (or
    ``downscaling_factor``), then ``desired = ceil(current * smoothed)``. When
    smoothing alone keeps a due downscale at ``current``, it still steps down
    by one (Ray Serve does the same).
    """
    if current_num_replicas < 1:
        raise ValueError(f"current_num_replicas: must be >= 1, got {current_num_replicas}")
    if not math.isfinite(total_queue_depth) or total_queue_depth < 0:
        raise ValueError(f"total_queue_depth: must be finite and >= 0, got {total_queue_depth}")
    error_ratio = total_queue_depth / (config.target_queue_depth * current_num_replicas)
    factor = config.upscaling_factor if error_ratio >= 1 else config.downscaling_factor
    smoothed = 1 + (error_ratio - 1) * factor
    desired = math.ceil(current_num_replicas * smoothed)
    if desired == current_num_replicas and math.ceil(current_num_replicas * error_ratio) < current_num_replicas:
        desired -= 1
    return max(desired, 0)


def autoscale_step(
    config: AutoscalingConfig,
    metrics: Mapping[str, float],
    current_num_replicas: int,
    policy_state: Mapping[str, Any] | None,
    now: float,
) -> tuple[int, dict[str, Any]]:
    """One control-loop decision: the replica count to run, and the state to pass next time.

    Args:
        config: the group's autoscaling config.
        metrics: replica id -> its queue depth averaged over the last
            ``metrics_interval_s``; replicas that did not report are absent.
            Queued requests with no replica to report them may be given
            under any key.
        current_num_replicas: replicas running (or being started) now.
        policy_state: what the previous call returned (``None`` or ``{}`` at
            first); not modified.
        now: the controller's clock, in seconds.

    Returns:
        ``(num_replicas, policy_state)``: the count to converge to, already
        within ``[min_replicas, max_replicas]``, and the new state.
    """
    if current_num_replicas < 0:
        raise ValueError(f"current_num_replicas: must be >= 0, got {current_num_replicas}")
    for replica_id, depth in metrics.items():
        if not math.isfinite(depth) or depth < 0:
            raise ValueError(f"metrics[{replica_id!r}]: queue depth must be finite and >= 0, got {depth}")
    state = {UPSCALE_SINCE: None, DOWNSCALE_SINCE: None}
    state.update(policy_state or {})
    total = float(sum(metrics.values()))

    decision = current_num_replicas
    if current_num_replicas == 0:
        # Cold start: requests are waiting and nothing can serve them; no delay.
        if total > 0:
            decision = max(1, math.ceil(config.upscaling_factor))
        state[UPSCALE_SINCE] = state[DOWNSCALE_SINCE] = None
    else:
        desired = calculate_desired_num_replicas(config, total, current_num_replicas)
        if desired > current_num_replicas:
            state[DOWNSCALE_SINCE] = None
            since = state[UPSCALE_SINCE] if state[UPSCALE_SINCE] is not None else now
            state[UPSCALE_SINCE] = since
            if now - since >= config.upscale_delay_s:
                decision, state[UPSCALE_SINCE] = desired, None
        elif desired < current_num_replicas:
            state[UPSCALE_SINCE] = None
            since = state[DOWNSCALE_SINCE] if state[DOWNSCALE_SINCE] is not None else now
            state[DOWNSCALE_SINCE] = since
            if now - since >= config.downscale_delay_s:
                decision, state[DOWNSCALE_SINCE] = desired, None
        else:
            state[UPSCALE_SINCE] = state[DOWNSCALE_SINCE] = None
    return _apply_bounds(config, decision), state


def _apply_bounds(config: AutoscalingConfig, num_replicas: int) -> int:
    """The one place bounds apply, around every policy decision."""
    return min(config.max_replicas, max(config.min_replicas, num_replicas))
