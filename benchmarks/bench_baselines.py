"""Elastic placement against EPLB planned on history, at a p99 SLO and equal memory, and in volume (simulator).

    python benchmarks/bench_baselines.py [--sections capacity,volume] [--quick] [--out FILE]

1. **Capacity** (``moe-fleet plan``'s ``--slo-p99``, ``--baseline eplb``): for
   each trace -- ``stable`` (Zipf 1.2, the hot set never moves), ``drift``
   (``drift:`` with its published-statistics defaults), ``shifting`` (Zipf 1.2,
   the hot set redrawn every 15 s) -- and each fleet -- homogeneous (32 H100)
   and mixed (16 H100 + 16 L4) -- DeepSeek-V3's expert shape, 4 of its 58 MoE
   layers simulated (each device offering them 4/58 of its memory): EPLB's
   ``rebalance_experts`` run once on the first ``history_s`` seconds with the
   slots the same memory allows, against elastic placement starting from the
   planner's plan on the same seconds; both measured on the rest of the trace.
   The figure is each strategy's capacity: the highest load scale whose p99
   call latency meets the SLO, times the trace's rate. Goals: elastic never
   below 0.99x EPLB's capacity, at least 1.15x on the shifting trace, at most
   one plan's bytes moved on the stable trace.
2. **Volume**: a ``diurnal:`` trace (peak 5x the trough, one period over the
   trace) over a ``drift:`` trace, Qwen2-57B-A14B's expert shape on 16 H100;
   elastic with the controller's group autoscaling (queue depth) and the
   planner, against the whole fleet provisioned for the peak all the time.
   Goals: elastic meets the p99 SLO in at least 99% of windows, with at most
   0.65x the static fleet's device-hours.

The controller runs with its defaults (``ControllerConfig()``) unless
``--controller`` gives overrides (JSON); what was used is in the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, single, write_json, write_result  # noqa: E402

from moefleet.controller.autoscale import AutoscalingConfig  # noqa: E402
from moefleet.controller.main import ControllerConfig  # noqa: E402
from moefleet.controller.sim import (  # noqa: E402
    MODEL_SHAPES,
    Diurnal,
    DriftTraffic,
    ExpertShape,
    SimConfig,
    ZipfTraffic,
    after_history,
    balanced_capacity,
    baseline_placement,
    capacity_at_slo,
    fleet_devices,
    parse_fleet,
    simulate,
    slo_met_fraction,
)

FLEETS = {"homogeneous": "h100:32", "mixed": "h100:16,l4:16"}


def traces(duration: float, tokens: int, seed: int = 0) -> dict:
    common = dict(experts=256, layers=4, top_k=8, duration_s=duration, tokens_per_call=tokens, seed=seed)
    return {
        "stable": ZipfTraffic(s=1.2, shift_s=0, **common),
        "drift": DriftTraffic(**common),
        "shifting": ZipfTraffic(s=1.2, shift_s=15, **common),
    }


def capacity_case(fleet: str, traffic, args, controller: ControllerConfig) -> dict:
    shape, _, _ = MODEL_SHAPES["deepseek-v3"]
    devices = fleet_devices(parse_fleet(fleet), shape, simulated_layers=4)
    rate = args.load * balanced_capacity(devices, 8, 4)
    trace = traffic.trace(rate)
    config = SimConfig(top_k=8, controller=controller)
    initial = baseline_placement("history", trace, devices, shape.weight_bytes, config, args.history_s)
    eplb = baseline_placement("eplb", trace, devices, shape.weight_bytes, config, args.history_s)
    served = after_history(trace, args.history_s)
    out = {"fleet": fleet, "rate_tokens_per_s": rate, "calls": len(served)}
    for name, start, elastic in (("elastic", initial, True), ("eplb", eplb, False)):
        runs = {}

        def run(scale, start=start, elastic=elastic, runs=runs):
            if scale not in runs:
                runs[scale] = simulate(served, devices, expert_bytes=shape.weight_bytes, elastic=elastic, initial=start,
                                       config=config.model_copy(update={"load_scale": scale}))
            return runs[scale]

        cap = capacity_at_slo(run, rate, args.slo_ms, steps=args.bisect)
        at_volume = run(1.0)
        at_capacity = runs.get(cap["scale"])
        out[name] = {
            "capacity_tokens_per_s": cap["capacity_tokens_per_s"], "capacity_load_scale": cap["scale"],
            "runs": cap["runs"], "at_trace_volume": at_volume.summary(),
            "slo_met_fraction": slo_met_fraction(at_volume, args.slo_ms),
            "at_capacity": None if at_capacity is None else at_capacity.summary(),
        }
    out["ratio"] = (out["elastic"]["capacity_tokens_per_s"] / out["eplb"]["capacity_tokens_per_s"]
                    if out["eplb"]["capacity_tokens_per_s"] else None)
    return out


def volume_case(args, controller: ControllerConfig) -> dict:
    base, _, top_k = MODEL_SHAPES["qwen2-57b-a14b"]
    shape = ExpertShape(base.hidden, base.intermediate, moe_layers=base.moe_layers)
    devices = fleet_devices(parse_fleet(args.volume_fleet), shape, simulated_layers=4)
    peak = args.volume_peak * balanced_capacity(devices, top_k, 4)
    drift = DriftTraffic(experts=64, layers=4, top_k=top_k, duration_s=args.volume_s, tokens_per_call=args.volume_tokens,
                         seed=0)
    trace = Diurnal(ratio=5.0).apply(drift.trace(peak))
    autoscaling = {"min_replicas": 1, "max_replicas": len(devices), "target_queue_depth": args.target_queue_depth,
                   "upscale_delay_s": 0.0, "downscale_delay_s": args.downscale_delay_s, "metrics_interval_s": 1.0,
                   "downscaling_factor": args.downscaling_factor}
    elastic_ctl = controller.model_copy(update={"autoscaling": AutoscalingConfig(**autoscaling)})
    config = SimConfig(top_k=top_k, controller=elastic_ctl, bin_s=args.window_s)
    initial = baseline_placement("history", trace, devices, shape.weight_bytes, config, args.history_s)
    elastic = simulate(trace, devices, expert_bytes=shape.weight_bytes, elastic=True, initial=initial, config=config)
    static = simulate(trace, devices, expert_bytes=shape.weight_bytes, elastic=False, initial=initial,
                      config=SimConfig(top_k=top_k, controller=controller, bin_s=args.window_s))
    active = [(r["at"], r["active_devices"]) for r in elastic.reports if "active_devices" in r]
    return {
        "fleet": args.volume_fleet, "peak_tokens_per_s": peak, "calls": len(trace), "autoscaling": autoscaling,
        "elastic": {**elastic.summary(), "slo_met_fraction": slo_met_fraction(elastic, args.slo_volume_ms)},
        "static": {**static.summary(), "slo_met_fraction": slo_met_fraction(static, args.slo_volume_ms)},
        "device_hours_ratio": elastic.device_hours / static.device_hours,
        "active_devices": active[:: max(1, len(active) // 120)],
        "timeline_p99_ms": elastic.timeline["p99_latency_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="capacity,volume")
    ap.add_argument("--quick", action="store_true", help="shorter traces")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of each capacity trace")
    ap.add_argument("--history-s", type=float, default=30.0)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per layer call of the capacity traces")
    ap.add_argument("--load", type=float, default=0.3, help="the traces' rate as a share of the ideal balanced capacity")
    ap.add_argument("--slo-ms", type=float, default=200.0, help="p99 call latency SLO of the capacity section")
    ap.add_argument("--volume-fleet", default="h100:16")
    ap.add_argument("--volume-s", type=float, default=600.0)
    ap.add_argument("--volume-tokens", type=int, default=16384)
    ap.add_argument("--volume-peak", type=float, default=0.5, help="peak rate as a share of the fleet's ideal capacity")
    ap.add_argument("--slo-volume-ms", type=float, default=100.0)
    ap.add_argument("--window-s", type=float, default=5.0, help="windows the SLO is judged in (volume)")
    ap.add_argument("--target-queue-depth", type=float, default=3.0,
                    help="autoscaling's target calls in flight per device (a call fans out to every device it touches)")
    ap.add_argument("--downscale-delay-s", type=float, default=30.0)
    ap.add_argument("--downscaling-factor", type=float, default=0.3)
    ap.add_argument("--controller", default="{}", help="JSON overrides of ControllerConfig")
    ap.add_argument("--cases", default="", help="only these capacity cases, e.g. shifting/homogeneous,stable/mixed")
    ap.add_argument("--bisect", type=int, default=7, help="bisection steps of the capacity search (resolution 2^-steps)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.volume_s = 60.0, 300.0
    controller = ControllerConfig(ray_address=None, **json.loads(args.controller))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    t_start = time.perf_counter()
    figures, goals, details = {}, [], {"controller": controller.model_dump(mode="json", exclude={"devices"})}

    if "capacity" in sections:
        cases = {}
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
        for fleet_name, fleet in FLEETS.items():
            for trace_name, traffic in traces(args.duration, args.tokens).items():
                if wanted and f"{trace_name}/{fleet_name}" not in wanted:
                    continue
                t0 = time.perf_counter()
                case = capacity_case(fleet, traffic, args, controller)
                case["wall_s"] = time.perf_counter() - t0
                cases[f"{trace_name} / {fleet_name}"] = case
                e, s = case["elastic"], case["eplb"]
                print(f"{trace_name:8s} {fleet_name:11s}: capacity elastic {e['capacity_tokens_per_s']:,.0f} vs EPLB "
                      f"{s['capacity_tokens_per_s']:,.0f} tokens/s ({case['ratio'] or 0:.2f}x); elastic moved "
                      f"{e['at_trace_volume']['bytes_moved'] / 1e9:.1f} GB in {e['at_trace_volume']['plans_applied']} "
                      f"plans ({case['wall_s']:.0f} s)", flush=True)
                figures[f"{trace_name} / {fleet_name}: elastic / EPLB capacity"] = single(case["ratio"], "x")
                figures[f"{trace_name} / {fleet_name}: elastic capacity"] = single(e["capacity_tokens_per_s"], "tokens/s")
                figures[f"{trace_name} / {fleet_name}: EPLB capacity"] = single(s["capacity_tokens_per_s"], "tokens/s")
                figures[f"{trace_name} / {fleet_name}: elastic plans applied"] = single(
                    e["at_trace_volume"]["plans_applied"], "plans", "at the trace's volume")
        details["capacity"] = cases
        ratios = [c["ratio"] for c in cases.values() if c["ratio"] is not None]
        goals.append(goal("elastic capacity >= 0.99x EPLB-on-history on every trace and fleet", min(ratios) if ratios
                          else None, ">=", 0.99, unit="x"))
        shifting = [c["ratio"] for k, c in cases.items() if k.startswith("shifting") and c["ratio"] is not None]
        goals.append(goal("elastic capacity >= 1.15x EPLB-on-history on the shifting trace (every fleet)",
                          min(shifting) if shifting else None, ">=", 1.15, unit="x"))
        stable = [c["elastic"]["at_trace_volume"]["plans_applied"] for k, c in cases.items() if k.startswith("stable")]
        if stable:
            goals.append(goal("stable trace: at most one plan's bytes moved (plans applied, every fleet)", max(stable),
                              "<=", 1, unit="plans"))

    if "volume" in sections:
        v = volume_case(args, controller)
        details["volume"] = v
        e, s = v["elastic"], v["static"]
        print(f"volume: device-hours elastic {e['device_hours']:.3f} vs static {s['device_hours']:.3f} "
              f"({v['device_hours_ratio']:.2f}x); windows meeting p99 <= {args.slo_volume_ms:g} ms: elastic "
              f"{e['slo_met_fraction']:.1%}, static {s['slo_met_fraction']:.1%}", flush=True)
        figures["volume: elastic / static device-hours"] = single(v["device_hours_ratio"], "x")
        figures["volume: elastic windows meeting the SLO"] = single(e["slo_met_fraction"], "",
                                                                  f"p99 <= {args.slo_volume_ms:g} ms in {args.window_s:g}-s windows")
        figures["volume: static windows meeting the SLO"] = single(s["slo_met_fraction"], "")
        goals.append(goal("diurnal (peak 5x trough): elastic meets the p99 SLO in >= 99% of windows", e["slo_met_fraction"],
                          ">=", 0.99))
        goals.append(goal("diurnal: elastic device-hours <= 0.65x static provisioned for the peak", v["device_hours_ratio"],
                          "<=", 0.65, unit="x"))

    for g in goals:
        print(f"{'MET ' if g['met'] else 'MISS' if g['met'] is False else '--  '} {g['name']}: {g['measured']}")
    write_json("baselines", details, args.out)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if v not in (None, False, "") and k not in ("out", "controller"))
    if args.controller != "{}":
        flags += f" --controller '{args.controller}'"
    write_result("baselines", title="Elastic against EPLB on history at a p99 SLO, and in volume (simulator)",
                 question="At equal memory and a latency SLO, does re-planning sustain more than EPLB planned once on "
                          "history, and does following volume save device-hours?",
                 command=f"python benchmarks/bench_baselines.py {flags}", figures=figures, goals=goals, details=details,
                 elapsed_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
