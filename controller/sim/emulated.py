"""The simulator's model of an emulated fleet, and its check against one on runs it was not calibrated on.

An emulated device (``moefleet.core.emulation``) takes ``slowdown`` times its
modelled device time per call -- ``device_service_s``, the function
``SimDevice.service_s`` charges -- so the simulator's device model is the
emulated worker's by construction. What the simulator does not know is what
the serving path adds around it on the machine that runs the fleet, and that
is what a calibration on a small *static* emulated fleet fits
(``fit_emulation_costs`` over ``EmulationPhase`` s; ``EmulationCosts``):

* ``device_call_s``: busy seconds a device spends per call beyond its
  modelled time (receiving the call, returning its partials): from phases
  where several clients keep the devices saturated (seconds per call less the
  slowest device's modelled time);
* ``call_s`` and ``worker_call_s``: latency a call spends outside the devices
  (client, gRPC, the router's gate, dispatch and combine), fixed and per
  device the call touches: from single-client phases touching one and two
  devices (latency less the slowest device's time), a least-squares fit with
  no negative cost.

``emulated_sim_devices(specs, costs)`` turns the fleet's own ``DeviceSpec`` s
(``emulated_specs``, what ``LocalFleet`` starts) into simulated devices on
the fleet's wall clock (modelled times times the slowdown, plus
``device_call_s``), and ``EmulationCosts.sim_config`` the ``SimConfig`` that
adds the call latency. Then ``simulate`` predicts a held-out run of the
fleet with the controller's own ``decide()``.

The check's traces are per-token expert choices (``choice_trace``), so the
fleet routes exactly the counts the simulator replays: a ``shifting`` Zipf
hot set (``shifting_popularity``) and the ``drift:`` model
(``traffic.DriftTraffic.popularity``). ``holdout_rows`` and
``ratio_rows`` compare predicted with measured figures.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moefleet.core.placement import DeviceSpec
from moefleet.core.trace import Trace

from .devices import SimDevice
from .local import _nonnegative_fit

__all__ = [
    "EmulationCosts",
    "EmulationPhase",
    "HOLDOUT_FIGURES",
    "choice_trace",
    "drift_popularity",
    "emulated_sim_devices",
    "fit_emulation_costs",
    "holdout_rows",
    "placement_changes",
    "ratio_rows",
    "relative_error",
    "run_key",
    "shifting_popularity",
    "worst",
]


@dataclass(frozen=True)
class EmulationPhase:
    """One calibration phase on a static emulated fleet: ``clients`` closed-loop callers, every call alike.

    calls: calls completed over ``wall_s``; latency_s: the median call's latency at the client;
    device_s: per device a call touches, its modelled wall seconds for the call (``emulated_call_s``).
    """

    clients: int
    calls: int
    wall_s: float
    latency_s: float
    device_s: Mapping[str, float]

    @property
    def slowest_s(self) -> float:
        return max(self.device_s.values())


@dataclass(frozen=True)
class EmulationCosts:
    """What the serving path adds around the emulated devices' modelled time (seconds on the fleet's clock)."""

    call_s: float
    worker_call_s: float
    device_call_s: float

    def sim_config(self, **fields):
        """A ``SimConfig`` charging these costs' latency per call (``router_call_s``, ``router_worker_call_s``)."""
        from .engine import SimConfig

        return SimConfig(router_call_s=self.call_s, router_worker_call_s=self.worker_call_s, **fields)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_emulation_costs(phases: Sequence[EmulationPhase]) -> EmulationCosts:
    """Fit ``EmulationCosts`` (module docstring) to a static fleet's phases.

    Needs at least one saturated phase (``clients > 1``) and single-client phases touching at least two
    different numbers of devices. Raises ``ValueError`` naming what is missing."""
    phases = list(phases)
    for p in phases:
        if p.calls <= 0 or p.wall_s <= 0 or not p.device_s:
            raise ValueError(f"phases: a phase needs calls, wall seconds and devices, got {p}")
    saturated = [p for p in phases if p.clients > 1]
    single = [p for p in phases if p.clients == 1]
    if not saturated:
        raise ValueError("phases: no saturated phase (clients > 1) to measure a device's time per call")
    touched = {len(p.device_s) for p in single}
    if len(touched) < 2:
        raise ValueError("phases: single-client phases must touch at least two different numbers of devices "
                         f"(got {sorted(touched)})")
    device_call_s = max(0.0, statistics.median(p.wall_s / p.calls - p.slowest_s for p in saturated))
    outside = [p.latency_s - p.slowest_s - device_call_s for p in single]
    coef = _nonnegative_fit([[1.0] * len(single), [float(len(p.device_s)) for p in single]], outside)
    return EmulationCosts(call_s=float(coef[0]), worker_call_s=float(coef[1]), device_call_s=float(device_call_s))


def emulated_sim_devices(specs: Sequence[DeviceSpec], costs: EmulationCosts | None = None, *,
                         copy_bytes_per_s: float = 1e9) -> list[SimDevice]:
    """The fleet's emulated devices as the simulator's, on the fleet's clock: each ``spec.emulated``'s modelled
    timing times its slowdown, plus ``costs.device_call_s`` per call. ``copy_bytes_per_s``: how fast a weight
    copy reaches a device (the fleet's controller's ``copy_bytes_per_s``). Raises ``ValueError`` for a spec
    that is not emulated."""
    out = []
    extra = 0.0 if costs is None else costs.device_call_s
    for spec in specs:
        emu = spec.emulated
        if emu is None:
            raise ValueError(f"devices: {spec.device_id} is not an emulated device")
        s = emu.slowdown
        out.append(SimDevice(spec=spec.model_copy(update={"emulated": None}), type_name=emu.type_name,
                             row_s=emu.row_s * s, floor_s=emu.floor_s * s, act_row_s=0.0,
                             overhead_s=emu.overhead_s * s + extra, copy_bytes_per_s=copy_bytes_per_s,
                             out_row_s=emu.out_row_s * s))
    return out


# --------------------------------------------------------------------------- traces of per-token choices
def shifting_popularity(experts: int, layers: int, *, s: float = 1.2, phases: int = 4, seed: int = 0) -> np.ndarray:
    """``[phases, layers, experts]`` pick probabilities: Zipf(``s``) over a fresh random order of the experts in
    each phase and layer (the hot set moves at each phase)."""
    if experts < 1 or layers < 1 or phases < 1:
        raise ValueError("experts, layers and phases must be >= 1")
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, experts + 1, dtype=np.float64) ** -s
    ranks /= ranks.sum()
    out = np.empty((phases, layers, experts))
    for p in range(phases):
        for layer in range(layers):
            out[p, layer, rng.permutation(experts)] = ranks
    return out


def drift_popularity(experts: int, layers: int, top_k: int, duration_s: float, seed: int = 0, **fields) -> np.ndarray:
    """``[seconds, layers, experts]``: the ``drift:`` trace's popularity (``traffic.DriftTraffic``) second by second."""
    from .traffic import DriftTraffic

    return DriftTraffic(experts=experts, layers=layers, top_k=top_k, duration_s=duration_s, seed=seed, rate=1.0,
                        **fields).popularity()


def choice_trace(popularity: np.ndarray, *, lines: int, layers: Sequence[int], tokens: int, top_k: int,
                 seconds_per_line: float, seed: int = 0) -> tuple[np.ndarray, Trace]:
    """Per-token expert choices for ``lines`` layer calls and their ``Trace``.

    popularity: ``[P, L, E]``; line ``i`` (at ``i x seconds_per_line``) uses period ``min(i * P // lines, P - 1)``
    and layer index ``i % L``; each of its ``tokens`` tokens picks ``top_k`` distinct experts with probability
    in proportion to the popularity (Gumbel top-k). Returns (choices ``[lines, tokens, top_k]`` uint16, trace
    whose counts are the choices' bincounts, ``layer`` the model layer numbers)."""
    popularity = np.asarray(popularity, dtype=np.float64)
    if popularity.ndim != 3 or popularity.shape[1] != len(layers):
        raise ValueError(f"popularity: expected [periods, {len(layers)}, experts], got {popularity.shape}")
    periods, _, experts = popularity.shape
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k: must be in [1, {experts}], got {top_k}")
    if lines < 1 or tokens < 1:
        raise ValueError("lines and tokens must be >= 1")
    rng = np.random.default_rng(seed)
    logp = np.log(np.clip(popularity, 1e-300, None))
    choices = np.empty((lines, tokens, top_k), dtype=np.uint16)
    counts = np.zeros((lines, experts), dtype=np.int64)
    layer_index = np.arange(lines) % len(layers)
    for i in range(lines):
        period = min(i * periods // lines, periods - 1)
        keys = logp[period, layer_index[i]][None, :] + rng.gumbel(size=(tokens, experts))
        picked = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        choices[i] = picked
        counts[i] = np.bincount(picked.ravel(), minlength=experts)
    t = np.arange(lines) * float(seconds_per_line)
    return choices, Trace(t=t, layer=np.asarray(layers, dtype=np.int64)[layer_index], counts=counts)


# --------------------------------------------------------------------------- predicted against measured
HOLDOUT_FIGURES = ("tokens_per_s", "p99_ms", "bytes_moved", "rebalances")
"""What each held-out run reports, predicted and measured: model tokens/s, p99 call latency (ms), weight bytes
copied onto devices by rebalances, rebalances applied."""


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """``|predicted / measured - 1|``; 0 when both are 0; None when either is missing or only measured is 0."""
    if predicted is None or measured is None or not (math.isfinite(predicted) and math.isfinite(measured)):
        return None
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return abs(predicted / measured - 1.0)


def holdout_rows(predicted: Mapping[str, Mapping[str, float]], measured: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """Per run present in both (keys ``fleet/trace/mode``): each figure predicted, measured and their relative
    error (``<figure>_error``). A run measured but not predicted (or the reverse) raises ``ValueError``."""
    if set(predicted) != set(measured):
        raise ValueError(f"runs: predicted {sorted(predicted)} and measured {sorted(measured)} differ")
    rows = []
    for run in sorted(predicted):
        row: dict = {"run": run}
        for f in HOLDOUT_FIGURES:
            p, m = predicted[run].get(f), measured[run].get(f)
            row[f"{f}_predicted"], row[f"{f}_measured"], row[f"{f}_error"] = p, m, relative_error(p, m)
        rows.append(row)
    return rows


def ratio_rows(predicted: Mapping[str, Mapping[str, float]], measured: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """Per ``fleet/trace`` with both modes: the elastic / static tokens/s ratio predicted and measured, and the
    relative error of the predicted ratio."""
    pairs = sorted({run.rsplit("/", 1)[0] for run in predicted})
    rows = []
    for pair in pairs:
        e, s = f"{pair}/elastic", f"{pair}/static"
        if not all(k in d for d in (predicted, measured) for k in (e, s)):
            continue
        p = predicted[e]["tokens_per_s"] / predicted[s]["tokens_per_s"]
        m = measured[e]["tokens_per_s"] / measured[s]["tokens_per_s"]
        rows.append({"pair": pair, "ratio_predicted": p, "ratio_measured": m, "ratio_error": relative_error(p, m)})
    return rows


def placement_changes(log: Sequence[tuple[float, int, Mapping[str, set]]], since: float, until: float,
                      expert_bytes: int) -> tuple[int, int]:
    """(placements published in ``(since, until]``, weight bytes they added) from a log of ``(time, version,
    {device: {(layer, expert), ...}})`` whose first entry is the placement in force before: bytes are the
    replicas new on a device times ``expert_bytes``, as the simulator counts a plan's copies."""
    changes, added = 0, 0
    for (_, _, old), (t, _, new) in zip(log, log[1:]):
        if since < t <= until:
            changes += 1
            added += sum(len(set(keys) - set(old.get(d, ()))) for d, keys in new.items())
    return changes, added * expert_bytes


def worst(rows: Sequence[Mapping], key: str) -> float | None:
    """The largest ``key`` over ``rows`` (None entries skipped; None when none)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def run_key(fleet: str, trace: str, mode: str) -> str:
    return f"{fleet}/{trace}/{mode}"



