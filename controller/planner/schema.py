"""The planner's inputs and answers: its knobs, a move, the predicted load of a placement, a plan."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moefleet.core.placement import DeviceId, ExpertKey, Placement

__all__ = ["Move", "Plan", "PlacementStats", "PlannerKnobs", "PlanningError"]


class PlanningError(ValueError):
    """The inputs admit no valid placement (e.g. too little memory for every expert once)."""


class PlannerKnobs(BaseModel):
    """Tuning of the placement planner; every field has a safe default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_moves_per_step: int = Field(
        default=32,
        ge=0,
        description=(
            "Most weight copies (replica adds) one plan may make on a running placement. Removals copy "
            "nothing and are not counted. Repairs (placing experts that lost every replica) are made even "
            "past the cap. An initial placement (current holds nothing) is not capped."
        ),
    )
    hysteresis: float = Field(
        default=0.002,
        ge=0,
        lt=1,
        description=(
            "A candidate move is made only if it relieves a layer's bottleneck device by more than this "
            "fraction of the mean per-layer step time, per weight copy."
        ),
    )
    min_gain: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description=(
            "A plan is marked apply=True only if its predicted step-time cut (1 - after/before) is at least "
            "this; repairs are always applied."
        ),
    )
    headroom: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of each device's memory_bytes kept free of expert weights."
    )
    cpu_tier: Literal["off", "overflow", "auto"] = Field(
        default="overflow",
        description=(
            "'off': never place experts on CPU devices. 'overflow': only the coldest experts that GPU memory "
            "cannot hold go to CPU devices. 'auto': also offload cold experts to CPU devices when that frees "
            "GPU memory for replicas that improve balance."
        ),
    )
    max_search_steps: int = Field(
        default=4000, ge=1, description="Safety cap on improvement steps of one plan (each step is one move)."
    )
    min_replicas: int | Literal["auto"] = Field(
        default=1,
        description=(
            "Replicas every expert keeps on distinct GPU devices when GPU memory can hold every expert this many "
            "times (else 1). 2 trades memory for zero loss when a worker dies: its experts keep serving elsewhere. "
            "'auto': 2 where the GPU devices' memory, less the headroom, holds two copies of every expert, else 1 "
            "(a fleet's controller plans with 'auto' unless told otherwise: ``ControllerConfig.planner``). "
            "Capped at the number of GPU devices. Restoring the floor is a repair (made past the copy cap)."
        ),
    )

    @field_validator("min_replicas")
    @classmethod
    def _min_replicas(cls, v):
        if v != "auto" and int(v) < 1:
            raise ValueError(f"min_replicas: must be 'auto' or an integer >= 1, got {v!r}")
        return v


class Move(BaseModel):
    """One change of the placement: add copies an expert's weights to a device; remove frees them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["add", "remove"]
    device_id: DeviceId
    expert: ExpertKey


class PlacementStats(BaseModel):
    """Predicted load of a placement under the planner's load model."""

    model_config = ConfigDict(extra="forbid")

    step_time: float = Field(description="sum over layers of the slowest device's time (tokens / speed).")
    balancedness: float = Field(description="sum over layers of mean GPU time / step_time; 1.0 is perfect.")
    layer_time: list[float] = Field(description="Per layer (load row), the slowest device's time.")
    device_time: dict[DeviceId, float] = Field(description="Per device, its time summed over layers.")


class Plan(BaseModel):
    """The planner's answer: a target placement and how to get there."""

    model_config = ConfigDict(extra="forbid")

    target: Placement
    moves: list[Move] = Field(
        description="Adds first (make before break), then removes; in inventory device order, then by expert."
    )
    copies: int = Field(description="Number of 'add' moves: weight copies the reconciler must make.")
    balancedness_before: float | None = Field(description="None when current is not a valid placement.")
    balancedness_after: float
    step_time_before: float | None = Field(description="None when current is not a valid placement.")
    step_time_after: float
    gain: float = Field(description="Predicted step-time cut, 1 - after/before; 1.0 when current was invalid.")
    repaired: bool = Field(description="Current was not a valid placement (experts missing, devices gone, overfull).")
    apply: bool = Field(description="Target differs and (repaired or gain >= knobs.min_gain).")
    stats: PlacementStats = Field(description="Predicted load of the target.")
