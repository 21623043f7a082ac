"""The simulator's model of local mode: N CPU workers, each owning one core, timed by a calibration.

To check the simulator against reality, the same trace runs on a local fleet
(``moefleet.local.LocalFleet`` with its controller) and here:

1. ``calibrate_cpu(hidden, intermediate)`` times this machine's expert FFN
   (``kernels.experts.grouped_ffn``, torch path, one thread -- what a worker
   owning one core runs) at 1 row and at ``rows`` rows: the per-row cost and
   the least cost of an expert (its weights streamed once);
2. ``local_devices(n, calibration, ...)`` makes ``n`` simulated workers with
   those costs, ids ``worker-0 ..`` and memory as local mode gives them
   (``local_memory_bytes``: every expert twice over the other workers);
3. ``predict_local(trace, ...)`` replays the trace in closed mode (``clients``
   callers back to back, as the benchmark's clients) and returns the
   predicted elastic / static throughput ratio.

Not modelled: the router's and the clients' own CPU time (on a 2-core machine
they share the workers' cores), Ray's per-call cost beyond ``call_overhead_s``,
and weight loads competing with serving for the worker's core.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from moefleet.core.placement import DeviceSpec
from moefleet.core.trace import Trace

from .main import ControllerConfig
from .sim_devices import SimDevice
from .simulator import SimConfig, compare

__all__ = ["CpuCalibration", "calibrate_cpu", "local_devices", "local_memory_bytes", "predict_local"]


@dataclass(frozen=True)
class CpuCalibration:
    """Measured expert FFN cost on one core: ``row_s`` per row at ``rows`` rows, ``floor_s`` for one row."""

    hidden: int
    intermediate: int
    rows: int
    row_s: float
    floor_s: float
    threads: int


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


def local_devices(num_workers: int, calibration: CpuCalibration, *, memory_bytes: int, call_overhead_s: float = 0.005,
                  copy_bytes_per_s: float = 1e9) -> list[SimDevice]:
    """``num_workers`` equal CPU workers (one core each) as local mode declares them to the planner."""
    return [
        SimDevice(
            spec=DeviceSpec(device_id=f"worker-{i}", node_id="local", kind="gpu", accelerator_type="local-cpu",
                            memory_bytes=memory_bytes),
            type_name="local-cpu", row_s=calibration.row_s, floor_s=calibration.floor_s, act_row_s=0.0,
            overhead_s=call_overhead_s, copy_bytes_per_s=copy_bytes_per_s,
        )
        for i in range(num_workers)
    ]


def predict_local(trace: Trace, devices: list[SimDevice], *, expert_bytes: int, top_k: int, clients: int,
                  controller: ControllerConfig | None = None) -> dict:
    """Predicted elastic and static figures for a local fleet driven by ``clients`` closed-loop callers."""
    config = SimConfig(controller=controller or ControllerConfig(ray_address=None), mode="closed",
                       concurrency=clients, top_k=top_k)
    runs = compare(trace, devices, expert_bytes=expert_bytes, config=config)
    return {
        "elastic": runs["elastic"].summary(),
        "static": runs["static"].summary(),
        "ratio_elastic_over_static": runs["elastic"].tokens_per_s / runs["static"].tokens_per_s,
        "runs": runs,
    }
