"""Emulated devices: a real worker that computes on this machine's CPU and takes the time a modelled device would.

``moe-fleet up --emulate h100:16,l4:16`` starts one ``ExpertGroup`` worker per
emulated device. Each holds real weights in real slots, serves exact results,
heartbeats, obeys fencing and is bounded by its device type's memory; after
computing a call it waits until the modelled device time of that call
(:func:`device_service_s`, the function the simulator charges its calls with),
times the slowdown factor, has passed since the call began. The controller sees
the device's type, memory and modelled speed, so it plans a heterogeneous fleet.

Plain data in, plain data out (no Ray, no torch): the device catalogue and the
model shape are applied by the face (``moefleet/local.py``) with the
simulator's ``controller/sim/devices.py``; a worker receives an
:class:`EmulatedDevice` and only calls :func:`emulated_call_s`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

EMULATED_TYPES = ("h100", "h200", "a100", "a100-80g", "l40s", "l4", "a10g", "cpu")
"""Device types ``--emulate`` accepts: the simulator's catalogue (``controller.sim.devices.DEVICE_TYPES``)."""

EMULATED_MODELS = ("deepseek-v3", "mixtral-8x7b", "qwen2-57b-a14b")
"""Expert shapes ``emulate_model`` accepts: the simulator's ``controller.sim.devices.MODEL_SHAPES``."""


class EmulateSpecError(ValueError):
    """An ``--emulate`` string that cannot be read; the message names the field and the entry."""


def parse_emulate(text: str, field: str = "emulate") -> list[tuple[str, int]]:
    """``"h100:16,l4:16"`` -> ``[("h100", 16), ("l4", 16)]``: device types of the catalogue, each count >= 1.

    Raises ``EmulateSpecError`` whose message starts with ``field``."""
    if not isinstance(text, str) or not text.strip():
        raise EmulateSpecError(f"{field}: empty; expected TYPE:COUNT[,TYPE:COUNT...], e.g. 'h100:16,l4:16'")
    out: list[tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip()
        name, sep, count = item.partition(":")
        name = name.strip().lower()
        if not sep or ":" in count:
            raise EmulateSpecError(f"{field}: {item!r} is not TYPE:COUNT, e.g. 'h100:16'")
        if name not in EMULATED_TYPES:
            raise EmulateSpecError(f"{field}: unknown device type {item.partition(':')[0]!r} in {item!r} "
                                   f"(known: {', '.join(EMULATED_TYPES)})")
        if any(name == n for n, _ in out):
            raise EmulateSpecError(f"{field}: device type {name!r} listed twice")
        try:
            n = int(count)
        except ValueError:
            raise EmulateSpecError(f"{field}: count in {item!r} must be an integer, got {count!r}") from None
        if n < 1:
            raise EmulateSpecError(f"{field}: count in {item!r} must be >= 1, got {n}")
        out.append((name, n))
    return out


def device_service_s(rows_per_expert: Iterable[int], row_s: float, floor_s: float, overhead_s: float,
                     out_row_s: float = 0.0) -> float:
    """Seconds a device is busy with one call bringing ``rows_per_expert`` (one entry per expert it runs).

    Each expert costs its rows at ``row_s`` each, but at least ``floor_s`` (its weights read once);
    ``overhead_s`` per call; ``out_row_s`` per output row returned (one per token: the largest expert's rows).
    The simulator's ``SimDevice.service_s`` and an emulated worker's wait are this function."""
    compute = 0.0
    top = 0
    for r in rows_per_expert:
        compute += max(r * row_s, floor_s)
        top = max(top, r)
    return overhead_s + compute + top * out_row_s


class EmulatedDevice(BaseModel):
    """What an emulated worker needs to take a modelled device's time: its type and its timing.

    Timing as the simulator's ``SimDevice`` for the modelled expert shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type_name: str = Field(description="Device type of the catalogue ('h100', 'l4', ...).")
    accelerator_type: str | None = Field(default=None, description="Accelerator as Ray names it ('H100'); None: CPU tier.")
    row_s: float = Field(ge=0, description="Modelled seconds per row (one token at one expert).")
    floor_s: float = Field(ge=0, description="Modelled least seconds per expert per call (its weights read once).")
    overhead_s: float = Field(ge=0, description="Modelled fixed seconds per call.")
    out_row_s: float = Field(default=0.0, ge=0, description="Modelled seconds per output row returned.")
    slowdown: float = Field(default=1.0, gt=0, description="Time dilation: the worker takes slowdown x the modelled time.")

    @property
    def label(self) -> str:
        return f"{self.accelerator_type or self.type_name.upper()} (emulated)"


def emulated_call_s(device: EmulatedDevice, rows_per_expert: Iterable[int]) -> float:
    """Wall seconds an emulated device takes for one call: its modelled service time times the slowdown."""
    s = device_service_s(rows_per_expert, device.row_s, device.floor_s, device.overhead_s, device.out_row_s) * device.slowdown
    return s if math.isfinite(s) else 0.0
