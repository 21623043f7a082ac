"""Simulator benchmark: elastic vs static placement on simulated mixed fleets, up to 512 devices.

    python benchmarks/bench_sim.py [--quick] [--repeats 3]

1. **The claim** (issue 13): ``moe-fleet plan --baseline first`` (elastic
   against the planner's first plan kept -- the weak baseline; the fair one,
   EPLB on history at a p99 SLO, is ``bench_baselines.py``) on a Zipf 1.2
   trace whose hot set moves every 15 s, 16 H100 + 16 L4, DeepSeek-V3's expert shape (4 of its
   58 MoE layers simulated, each device offering them 4/58 of its memory),
   offered above capacity so tokens/s is what each placement sustains. Goals:
   elastic >= 1.5x static tokens/s in every repeat (seeds), and a lower
   max/mean device busy time.
2. **Latency** at a load the elastic fleet sustains (``load=0.12`` of the
   ideal balanced capacity): p50..p99.9 and balancedness over time, plotted.
3. **Scale**: 512 devices (256 H100, 128 H200, 128 L4); wall time of the run.
4. **Local mode, predicted**: a calibration of this machine's expert FFN on
   one core, then the predicted elastic/static ratio for the elasticity
   benchmark's setups (``bench_sim_reality.py`` measures one against a local
   fleet).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402
from common import RESULTS_DIR, goal, single, spread, write_result  # noqa: E402

from moefleet.cli import main as cli_main  # noqa: E402
from moefleet.controller.main import ControllerConfig  # noqa: E402
from moefleet.controller.sim import (  # noqa: E402
    MODEL_SHAPES,
    SimConfig,
    ZipfTraffic,
    balanced_capacity,
    calibrate_cpu,
    compare,
    fleet_devices,
    local_devices,
    local_memory_bytes,
    parse_fleet,
    predict_local,
)

FLEET = "h100:16,l4:16"
SCALE_FLEET = "h100:256,h200:128,l4:128"


def claim_trace(seed: int, duration: float, load: float) -> str:
    return f"zipf:s=1.2,experts=256,layers=4,top_k=8,duration={duration:g},shift=15,tokens=65536,load={load:g},seed={seed}"


def plan_json(argv: list[str]) -> dict:
    """``moe-fleet plan ... --json`` in this process; its parsed output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["plan", *argv, "--json"])
    if rc != 0:
        raise RuntimeError(f"moe-fleet plan {' '.join(argv)} exited {rc}")
    return json.loads(buf.getvalue())


def direct_runs(fleet: str, traffic: ZipfTraffic, load: float, **config) -> dict:
    """Elastic and static runs with their timelines (the CLI's inputs, built here)."""
    shape, _, _ = MODEL_SHAPES["deepseek-v3"]
    devices = fleet_devices(parse_fleet(fleet), shape, simulated_layers=traffic.layers)
    rate = load * balanced_capacity(devices, traffic.top_k, traffic.layers)
    trace = traffic.trace(rate)
    return compare(trace, devices, expert_bytes=shape.weight_bytes, config=SimConfig(top_k=traffic.top_k, **config))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter traces, one repeat, no 512-device run")
    ap.add_argument("--repeats", type=int, default=3, help="seeds of the claim's trace")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of the claim's trace")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration = 1, 30.0
    t_start = time.perf_counter()
    figures, goals, details, plot_files = {}, [], {}, []

    # 1. the claim, through the command line
    claim = []
    for seed in range(args.repeats):
        argv = ["--trace", claim_trace(seed, args.duration, 1.25), "--fleet", FLEET, "--baseline", "first"]
        t0 = time.perf_counter()
        out = plan_json(argv)
        e, s = out["elastic"], out["static"]
        claim.append({"seed": seed, "command": "moe-fleet plan " + " ".join(argv) + " --json", "elastic": e, "static": s,
                      "ratio": e["tokens_per_s"] / s["tokens_per_s"], "wall_s": time.perf_counter() - t0})
        print(f"claim seed {seed}: elastic {e['tokens_per_s']:,.0f} vs static {s['tokens_per_s']:,.0f} tokens/s "
              f"({claim[-1]['ratio']:.2f}x); max/mean {e['max_over_mean']:.2f} vs {s['max_over_mean']:.2f}", flush=True)
    details["claim"] = claim
    figures["claim_ratio"] = spread([c["ratio"] for c in claim], "x", "elastic / static tokens/s, h100:16,l4:16")
    figures["claim_elastic_tokens_per_s"] = spread([c["elastic"]["tokens_per_s"] for c in claim], "tokens/s")
    figures["claim_static_tokens_per_s"] = spread([c["static"]["tokens_per_s"] for c in claim], "tokens/s")
    figures["claim_elastic_max_over_mean"] = spread([c["elastic"]["max_over_mean"] for c in claim], "")
    figures["claim_static_max_over_mean"] = spread([c["static"]["max_over_mean"] for c in claim], "")
    figures["claim_elastic_bytes_moved"] = spread([c["elastic"]["bytes_moved"] for c in claim], "bytes")
    goals.append(goal("elastic >= 1.5x static tokens/s (every seed)", min(c["ratio"] for c in claim), ">=", 1.5, unit="x",
                      description="Zipf 1.2, hot set moving every 15 s, 16 H100 + 16 L4 (moe-fleet plan)"))
    goals.append(goal("elastic max/mean busy time below static's (every seed)",
                      max(c["elastic"]["max_over_mean"] / c["static"]["max_over_mean"] for c in claim), "<", 1.0,
                      unit="x", description="worst elastic/static ratio of max/mean device busy time"))

    # 2. latency at a load the elastic placement sustains, with timelines
    traffic = ZipfTraffic(s=1.2, experts=256, layers=4, top_k=8, duration_s=args.duration, shift_s=15,
                          tokens_per_call=65536, seed=0)
    runs = direct_runs(FLEET, traffic, 0.12)
    for name, r in runs.items():
        figures[f"sustained_{name}_tokens_per_s"] = single(r.tokens_per_s, "tokens/s")
        figures[f"sustained_{name}_p99_queueing_ms"] = single(r.p99_ms, "ms")
        figures[f"sustained_{name}_p99_latency_ms"] = single(r.p99_latency_ms, "ms")
        figures[f"sustained_{name}_max_over_mean"] = single(r.max_over_mean, "")
    details["sustained"] = {name: r.to_dict() for name, r in runs.items()}
    plot_files.append(plots.balancedness_over_time(
        RESULTS_DIR / "sim_balancedness.png", {k: r.timeline for k, r in runs.items()},
        f"simulated {FLEET}, Zipf 1.2, hot set moves every 15 s (dotted), load 0.12 of ideal", shift_s=15))
    plot_files.append(plots.latency_percentiles(
        RESULTS_DIR / "sim_latency.png", {k: r.latency_percentiles_ms for k, r in runs.items()},
        f"simulated {FLEET}: call latency percentiles at load 0.12 of ideal"))
    print(f"sustained: p99 queueing elastic {runs['elastic'].p99_ms:,.1f} ms vs static {runs['static'].p99_ms:,.1f} ms", flush=True)

    # 3. scale
    if not args.quick:
        t0 = time.perf_counter()
        big = direct_runs(SCALE_FLEET, ZipfTraffic(s=1.2, experts=256, layers=4, top_k=8, duration_s=30, shift_s=10,
                                                    tokens_per_call=262144, seed=0), 0.3)
        wall = time.perf_counter() - t0
        figures["scale_512_wall_s"] = single(wall, "s", f"{SCALE_FLEET}: trace generation + both runs")
        figures["scale_512_ratio"] = single(big["elastic"].tokens_per_s / big["static"].tokens_per_s, "x")
        figures["scale_512_decide_wall_s"] = spread([r["decide_wall_s"] for r in big["elastic"].reports if "decide_wall_s" in r],
                                                    "s", "one controller decision (autoscale + plan) at 512 devices, this machine")
        details["scale_512"] = {k: r.to_dict(timeline=False) for k, r in big.items()}
        goals.append(goal("512-device simulation (both placements) within 120 s", wall, "<=", 120, unit="s",
                          description="trace generation, the first plan, both runs (the elastic one re-plans every 2 s)"))
        print(f"512 devices: {wall:.1f} s, ratio {figures['scale_512_ratio']['value']:.2f}", flush=True)

    # 4. local mode, predicted
    cal = calibrate_cpu(512, 1536)
    expert_bytes = 3 * 512 * 1536 * 4
    local = []
    for workers, clients, moves in ((2, 4, 4), (4, 6, 8)):
        trace = ZipfTraffic(s=1.2, experts=16, layers=2, top_k=2, duration_s=60, shift_s=15, tokens_per_call=64,
                            arrivals="uniform").trace(rate=1e5)  # closed mode: lines in order, the rate only orders them
        ctl = ControllerConfig(ray_address=None, interval_s=1.0, load_windows=3, load_half_life_s=1.5, min_tokens=10,
                               planner={"max_moves_per_step": moves, "min_gain": 0.02})
        devs = local_devices(workers, cal, memory_bytes=local_memory_bytes(workers, 32, expert_bytes), call_overhead_s=0.009)
        p = predict_local(trace, devs, expert_bytes=expert_bytes, top_k=2, clients=clients, controller=ctl)
        local.append({"workers": workers, "clients": clients, "max_moves": moves, "elastic": p["elastic"],
                      "static": p["static"], "predicted_ratio": p["ratio_elastic_over_static"]})
        figures[f"local_{workers}w_predicted_ratio"] = single(p["ratio_elastic_over_static"], "x",
                                                              f"{workers} workers, {clients} clients (bench_elastic's setups)")
    details["local_prediction"] = {"calibration": cal.__dict__, "runs": local}
    figures["local_calibration_rows_per_s"] = single(1 / cal.row_s, "rows/s", "one expert H=512 F=1536 fp32, one core")
    print(f"local prediction: {[round(x['predicted_ratio'], 2) for x in local]}", flush=True)

    write_result(
        "sim", title="Fleet simulator: elastic vs static at scale",
        question="Does elastic placement beat the first plan kept, on mixed fleets of tens to hundreds of GPUs?",
        command="python benchmarks/bench_sim.py" + (" --quick" if args.quick else ""),
        figures=figures, goals=goals, plots=[str(p.relative_to(RESULTS_DIR.parent)) for p in plot_files],
        details=details, elapsed_s=time.perf_counter() - t_start,
    )


if __name__ == "__main__":
    main()
