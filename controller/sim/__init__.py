"""The fleet simulator: 8 to 512 devices serving a routing trace, re-planned by the real controller's decisions.

One entry point, this package: ``simulate`` / ``compare`` replay a trace
(``moefleet.core.trace``) on simulated devices with the controller's own
``decide()`` and ``planner.plan`` (imported from ``moefleet.controller``, not
copied). Its modules:

* ``engine``: the discrete-event run (``SimConfig``, ``SimResult``,
  ``simulate``, ``compare``); what is and is not modelled is its docstring;
* ``devices``: device types from spec sheets, fleet strings, each device's timing;
* ``traffic``: synthetic routing traces (``zipf:``, ``drift:``) and the ``diurnal:`` volume curve;
* ``baselines``: what elastic placement is compared with (the first plan, a
  plan on history, EPLB on history at equal memory) and capacity at an SLO;
* ``host``: local mode's host CPU on the workers' own cores;
* ``local``: the model of a local CPU fleet, timed by a calibration;
* ``emulated``: the model of an emulated fleet (``--emulate``), its calibration on a small static fleet, the
  per-token traces and the predicted-against-measured comparison of ``benchmarks/bench_sim_holdout.py``;
* ``search``: the smallest fleet mix that meets a p99 target.
"""

from .baselines import (
    BASELINES,
    after_history,
    baseline_placement,
    capacity_at_slo,
    compare_strategies,
    eplb_placement,
    eplb_slots,
    slo_met_fraction,
)
from .devices import (
    DEVICE_TYPES,
    MODEL_SHAPES,
    DeviceType,
    ExpertShape,
    FleetEntry,
    FleetError,
    SimDevice,
    fleet_devices,
    format_fleet,
    parse_fleet,
    returned_rows,
)
from .engine import SimConfig, SimResult, balanced_capacity, compare, initial_placement, simulate
from .emulated import (
    EmulationCosts,
    EmulationPhase,
    choice_trace,
    emulated_sim_devices,
    fit_emulation_costs,
    holdout_rows,
    ratio_rows,
)
from .host import Cores, HostCpu
from .local import (
    CpuCalibration,
    LocalCosts,
    PhaseCpu,
    calibrate_cpu,
    fit_local_costs,
    local_devices,
    local_memory_bytes,
    predict_local,
)
from .search import Candidate, FleetSearch, search_fleet
from .traffic import (
    MAX_LINES,
    Diurnal,
    DriftTraffic,
    ZipfTraffic,
    inclusion_probabilities,
    parse_diurnal,
    parse_traffic,
    topk_inclusion,
)

__all__ = [
    "BASELINES", "after_history", "Candidate", "Cores", "CpuCalibration", "DEVICE_TYPES", "DeviceType", "Diurnal", "DriftTraffic",
    "EmulationCosts", "EmulationPhase", "ExpertShape", "FleetEntry", "FleetError", "FleetSearch", "HostCpu", "LocalCosts", "MAX_LINES", "MODEL_SHAPES",
    "PhaseCpu", "SimConfig", "SimDevice", "SimResult", "ZipfTraffic", "balanced_capacity", "baseline_placement", "choice_trace", "emulated_sim_devices", "fit_emulation_costs",
    "holdout_rows", "ratio_rows",
    "calibrate_cpu", "capacity_at_slo", "compare", "compare_strategies", "eplb_placement", "eplb_slots", "fit_local_costs",
    "fleet_devices", "format_fleet", "inclusion_probabilities", "initial_placement", "local_devices",
    "local_memory_bytes", "parse_diurnal", "parse_fleet", "parse_traffic", "predict_local", "returned_rows",
    "search_fleet", "simulate", "slo_met_fraction", "topk_inclusion",
]
