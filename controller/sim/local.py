"""The simulator's model of local mode: N CPU workers, each owning one core, timed by a calibration.

To check the simulator against reality, the same trace runs on a local fleet
(``moefleet.local.LocalFleet`` with its controller) and here:

1. ``calibrate_cpu(hidden, intermediate)`` times this machine's expert FFN
   (``kernels.experts.grouped_ffn``, torch path, one thread -- what a worker
   owning one core runs) at 1 row and at ``rows`` rows: the per-row cost and
   the least cost of an expert (its weights streamed once);
2. ``fit_local_costs(phases, calibration)`` fits what else the fleet spends,
   from CPU seconds measured per process on a *static* fleet in a few
   phases (``PhaseCpu``: idle; calls on two experts of one worker; calls on
   one expert of each; calls giving each worker half the tokens on two of its
   experts): each worker call's CPU beyond the FFN (the Ray task, indexing),
   per output row it returns (summing, serialising), how much faster or
   slower the FFN runs in a worker than in the calibration, and the host's CPU
   (clients, router, raylet, GCS, Redis) per call, per worker call, per
   output row moved and with no traffic (``LocalCosts``);
3. ``local_devices(n, calibration, costs=...)`` makes ``n`` simulated workers
   with those costs, ids ``worker-0 ..`` and memory as local mode gives them
   (``local_memory_bytes``: every expert twice over the other workers), and
   ``LocalCosts.host_cpu()`` the ``HostCpu`` that queues the host's work on
   the workers' cores (``host``);
4. ``predict_local(trace, ...)`` replays the trace in closed mode (``clients``
   callers back to back, as the benchmark's clients) and returns the
   predicted elastic / static throughput ratio.

Not modelled: the kernel's time-slicing (cores are FIFO queues, see
``host``), weight loads competing with serving for the worker's core,
other tenants of the machine beyond what the idle phase saw, and a worker's
FFN speed depending on how its rows split among experts beyond the
calibration's per-row and per-expert costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moefleet.core.placement import DeviceSpec, Placement
from moefleet.core.trace import Trace

from ..main import ControllerConfig
from .devices import SimDevice, returned_rows
from .host import HostCpu
from .engine import SimConfig, compare, simulate

__all__ = [
    "CpuCalibration",
    "LocalCosts",
    "PhaseCpu",
    "calibrate_cpu",
    "fit_local_costs",
    "local_devices",
    "local_memory_bytes",
    "predict_local",
]


@dataclass(frozen=True)
class CpuCalibration:
    """Measured expert FFN cost on one core: ``row_s`` per row at ``rows`` rows, ``floor_s`` for one row."""

    hidden: int
    intermediate: int
    rows: int
    row_s: float
    floor_s: float
    threads: int

    def expert_s(self, rows: int) -> float:
        """FFN seconds of one expert given ``rows`` rows in one call."""
        return max(rows * self.row_s, self.floor_s) if rows > 0 else 0.0


def calibrate_cpu(hidden: int, intermediate: int, *, gated: bool = True, rows: int = 256, repeats: int = 7,
                  threads: int = 1, seed: int = 0) -> CpuCalibration:
    """Time one fp32 expert FFN (torch path) on ``threads`` threads at 1 and ``rows`` rows (medians of ``repeats``)."""
    import torch

    from moefleet.kernels.experts import ExpertStack, grouped_ffn

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        width = 2 * intermediate if gated else intermediate
        stack = ExpertStack(
            w13=torch.randn(1, width, hidden, generator=g) * 0.02,
            w2=torch.randn(1, hidden, intermediate, generator=g) * 0.02,
            gated=gated, activation="silu",
        )

        def timed(n: int) -> float:
            x = torch.randn(n, hidden, generator=g)
            offsets = torch.tensor([0, n])
            grouped_ffn(x, offsets, stack, backend="torch")  # warm-up
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                grouped_ffn(x, offsets, stack, backend="torch")
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

        one, many = timed(1), timed(rows)
    finally:
        torch.set_num_threads(previous)
    return CpuCalibration(hidden, intermediate, rows, row_s=many / rows, floor_s=one, threads=threads)


def local_memory_bytes(num_workers: int, num_logical: int, expert_bytes: int, min_replicas: int = 1) -> int:
    """Expert memory per worker as ``LocalFleet.local_devices`` sets it: every expert twice (or ``min_replicas``
    times) over the other workers, at least four experts."""
    total = num_logical * expert_bytes
    return max(int(max(2, min_replicas) * total / max(num_workers - 1, 1) / 0.9) + expert_bytes, expert_bytes * 4)


@dataclass(frozen=True)
class PhaseCpu:
    """CPU seconds measured on a static local fleet over one phase: calls all alike, or none (idle).

    wall_s: the phase's length; calls: layer calls completed in it;
    worker_rows: per worker a call touches, the rows of each of its experts in
    one call (``{"worker-0": [512, 512]}``: two experts, 512 rows each; each
    worker returns ``devices.returned_rows`` of them, as the simulator counts);
    worker_cpu_s: CPU of the worker processes; host_cpu_s: CPU of every other
    process of the fleet (clients, router, raylet, GCS, Redis, controller);
    other_cpu_s: CPU of the machine's other tenants (every process not of the fleet).
    """

    wall_s: float
    calls: int
    worker_rows: Mapping[str, Sequence[int]]
    worker_cpu_s: float
    host_cpu_s: float
    other_cpu_s: float = 0.0

    @classmethod
    def from_processes(cls, wall_s: float, calls: int, worker_rows: Mapping[str, Sequence[int]],
                       cpu_s: Mapping[str, float], other_cpu_s: float = 0.0) -> "PhaseCpu":
        """From CPU seconds per process group: groups named ``worker-..`` are workers, the rest the host."""
        workers = sum(v for k, v in cpu_s.items() if k.startswith("worker-"))
        host = sum(v for k, v in cpu_s.items() if not k.startswith("worker-"))
        return cls(wall_s, calls, dict(worker_rows), workers, host, other_cpu_s)

    @property
    def worker_calls(self) -> int:
        return self.calls * len(self.worker_rows)

    @property
    def returned_rows(self) -> int:
        """Output rows the workers returned over the phase."""
        return self.calls * sum(returned_rows(rows) for rows in self.worker_rows.values())

    def kernel_s(self, calibration: CpuCalibration) -> float:
        """FFN seconds of the phase's expert rows at the calibrated speed."""
        return self.calls * sum(calibration.expert_s(int(r)) for rows in self.worker_rows.values() for r in rows)


@dataclass(frozen=True)
class LocalCosts:
    """What a local fleet spends besides the calibrated FFN, fitted by ``fit_local_costs`` (CPU seconds, cores).

    worker_call_s: a worker's CPU per call beyond its FFN; worker_row_out_s: per
    output row it returns; kernel_factor: the worker's FFN time over the
    calibration's; host_call_s, host_worker_call_s and host_row_out_s: host CPU
    per layer call, per worker call and per output row returned;
    background_cores: CPU used with no traffic, on the shared cores (the
    fleet's own processes, workers' heartbeats included); other_cores: the
    machine's other tenants, seen in the same idle time.
    """

    worker_call_s: float
    worker_row_out_s: float
    kernel_factor: float
    host_call_s: float
    host_worker_call_s: float
    host_row_out_s: float
    background_cores: float
    other_cores: float = 0.0

    def host_cpu(self, *, spare_cores: int = 0, controller_step_s: float = 0.0, include_other: bool = True) -> HostCpu:
        """The ``HostCpu`` of a run on these costs (``include_other``: the other tenants' CPU as background too)."""
        return HostCpu(call_s=self.host_call_s, worker_call_s=self.host_worker_call_s, returned_row_s=self.host_row_out_s,
                       background_cores=self.background_cores + (self.other_cores if include_other else 0.0),
                       controller_step_s=controller_step_s, spare_cores=spare_cores)


def _nonnegative_fit(columns: Sequence[Sequence[float]], y: Sequence[float]) -> np.ndarray:
    """Least squares ``X @ coef ~ y`` with ``coef >= 0``: the best of the unconstrained fits over subsets of the
    columns (the others held at 0) whose coefficients are all nonnegative. A few columns only."""
    x = np.asarray(columns, dtype=np.float64).T
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[1]
    best = (float(np.sum(y**2)), np.zeros(n))
    for mask in range(1, 2**n):
        cols = [j for j in range(n) if mask >> j & 1]
        sub = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
        if (sub < 0).any():
            continue
        coef = np.zeros(n)
        coef[cols] = sub
        resid = float(np.sum((x @ coef - y) ** 2))
        if resid < best[0] - 1e-15:
            best = (resid, coef)
    return best[1]


def fit_local_costs(phases: Iterable[PhaseCpu], calibration: CpuCalibration) -> LocalCosts:
    """Fit ``LocalCosts`` to CPU measured on a static fleet: at least one idle phase, and busy phases that vary
    the workers a call touches and the rows each returns independently (say: two experts on one worker; one
    expert on each of two workers; half the tokens on two experts of each worker).

    Idle phases give the background. Over the busy ones, less the background:
    worker CPU = worker calls x ``worker_call_s`` + rows returned x ``worker_row_out_s`` + ``kernel_factor`` x
    the calibrated FFN seconds, and host CPU = calls x ``host_call_s`` + worker calls x ``host_worker_call_s`` +
    rows returned x ``host_row_out_s``; least squares, no negative cost. Raises ``ValueError`` naming what is missing.
    """
    phases = list(phases)
    idle = [p for p in phases if p.calls == 0]
    busy = [p for p in phases if p.calls > 0]
    if not idle:
        raise ValueError("phases: no idle phase (calls == 0) to measure the background")
    shapes = {(p.worker_calls / p.calls, p.returned_rows / p.calls) for p in busy}
    design = np.array([[1.0, a, b] for a, b in shapes])
    if len(shapes) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError("phases: need busy phases that vary the workers a call touches and the rows they return "
                         f"independently (got (worker calls, rows returned) per call: {sorted(shapes)})")
    idle_s = sum(p.wall_s for p in idle)
    bg_workers = sum(p.worker_cpu_s for p in idle) / idle_s
    bg_host = sum(p.host_cpu_s for p in idle) / idle_s
    other = sum(p.other_cpu_s for p in idle) / idle_s
    worker = _nonnegative_fit(
        [[p.worker_calls for p in busy], [p.returned_rows for p in busy], [p.kernel_s(calibration) for p in busy]],
        [p.worker_cpu_s - bg_workers * p.wall_s for p in busy])
    host = _nonnegative_fit(
        [[p.calls for p in busy], [p.worker_calls for p in busy], [p.returned_rows for p in busy]],
        [p.host_cpu_s - bg_host * p.wall_s for p in busy])
    return LocalCosts(worker_call_s=float(worker[0]), worker_row_out_s=float(worker[1]), kernel_factor=float(worker[2]),
                      host_call_s=float(host[0]), host_worker_call_s=float(host[1]), host_row_out_s=float(host[2]),
                      background_cores=bg_workers + bg_host, other_cores=other)


def local_devices(num_workers: int, calibration: CpuCalibration, *, memory_bytes: int, call_overhead_s: float = 0.005,
                  copy_bytes_per_s: float = 1e9, costs: LocalCosts | None = None) -> list[SimDevice]:
    """``num_workers`` equal CPU workers (one core each) as local mode declares them to the planner.

    costs: fitted costs (``fit_local_costs``): the FFN scaled by ``kernel_factor``, ``worker_call_s`` per call
    (``call_overhead_s`` is then unused) and ``worker_row_out_s`` per output row.
    """
    factor = 1.0 if costs is None else costs.kernel_factor
    overhead = call_overhead_s if costs is None else costs.worker_call_s
    out_row_s = 0.0 if costs is None else costs.worker_row_out_s
    return [
        SimDevice(
            spec=DeviceSpec(device_id=f"worker-{i}", node_id="local", kind="gpu", accelerator_type="local-cpu",
                            memory_bytes=memory_bytes),
            type_name="local-cpu", row_s=calibration.row_s * factor, floor_s=calibration.floor_s * factor, act_row_s=0.0,
            overhead_s=overhead, copy_bytes_per_s=copy_bytes_per_s, out_row_s=out_row_s,
        )
        for i in range(num_workers)
    ]


def predict_local(trace: Trace, devices: list[SimDevice], *, expert_bytes: int, top_k: int, clients: int,
                  controller: ControllerConfig | None = None, host_cpu: HostCpu | None = None,
                  initial: Placement | None = None) -> dict:
    """Predicted elastic and static figures for a local fleet driven by ``clients`` closed-loop callers.

    host_cpu: the host's work on the workers' cores (``LocalCosts.host_cpu()``); None leaves it out.
    initial: the starting placement of both runs (local mode starts from ``spread_placement``); default the
    planner's first plan (``engine.initial_placement``).
    """
    config = SimConfig(controller=controller or ControllerConfig(ray_address=None), mode="closed",
                       concurrency=clients, top_k=top_k, host_cpu=host_cpu)
    if initial is None:
        runs = compare(trace, devices, expert_bytes=expert_bytes, config=config)
    else:
        runs = {mode: simulate(trace, devices, expert_bytes=expert_bytes, config=config, elastic=mode == "elastic",
                               initial=initial) for mode in ("elastic", "static")}
    return {
        "elastic": runs["elastic"].summary(),
        "static": runs["static"].summary(),
        "ratio_elastic_over_static": runs["elastic"].tokens_per_s / runs["static"].tokens_per_s,
        "runs": runs,
    }
