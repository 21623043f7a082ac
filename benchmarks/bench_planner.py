"""Planner benchmark: balance against "greedy replicate, then pack", and moves under drifting load.

Two questions, on Zipf-skewed loads (a random permutation of rank^-s per layer):

1. **Balance from scratch.** For each case (skew s, experts E, GPUs G, flat or
   hierarchical baseline) the baseline is DeepSeek-EPLB-style
   ``rebalance_experts`` with ``R = G * ceil(1.25 E / G)`` physical slots per
   layer; our planner plans from scratch on G equal GPUs whose memory holds
   the same number of slots (``R / G`` per layer, ``L`` layers, no headroom).
   The figure is max/mean GPU load, summed over layers (sum of per-layer
   maxima over sum of per-layer means; each layer is one dispatch), with
   each replica taking an equal share of its expert's load. Goal: ours
   within 1% of the baseline or better in every case. Our planner has no
   notion of expert groups: the hierarchical rows compare the same plan of
   ours with the baseline's group-to-node constrained one.
2. **Drift.** Load is multiplied by lognormal noise (sigma 0.1, about 10%)
   each step. The incremental planner starts from the placement in force
   (and the controller applies its plan only when ``plan.apply``); the
   reference plans from scratch every step. Moves are weight copies: replicas
   in a placement that the previous one lacked (the symmetric difference is
   reported too). Goals: incremental copies <= 1/4 of from-scratch copies,
   balancedness (mean/max, as the planner predicts it) within 5% of
   from-scratch on average over the steps.

Usage::

    python benchmarks/bench_planner.py [--quick] [--out benchmarks/out/planner.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moefleet.controller.eplb import rebalance_experts
from moefleet.controller.planner import PlannerKnobs, plan, predict
from moefleet.core.placement import DeviceSpec, Inventory, Placement

SKEWS = (0.6, 1.0, 1.2)
EXPERTS = (8, 64, 256)
GPUS = (4, 16, 64)
DRIFT_CASES = ((8, 4), (64, 16), (64, 64), (256, 64))


def zipf_load(num_layers: int, num_experts: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``[L, E]`` token counts: rank^-s, experts shuffled per layer, 1e4 tokens per layer in all."""
    ranks = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
    rows = np.stack([rng.permutation(ranks) for _ in range(num_layers)])
    return rows / rows.sum(axis=1, keepdims=True) * 1e4


def slots_per_gpu(num_experts: int, num_gpus: int) -> int:
    return max(1, math.ceil(1.25 * num_experts / num_gpus))


def hierarchy(num_experts: int, num_gpus: int) -> tuple[int, int]:
    """(num_groups, num_nodes) for the hierarchical baseline: 8 groups, 8 GPUs a node (at least 2 nodes)."""
    return min(8, num_experts), max(2, num_gpus // 8)


def fleet(num_gpus: int, slots: int, num_nodes: int) -> Inventory:
    per_node = max(1, num_gpus // num_nodes)
    return Inventory(devices=[
        DeviceSpec(device_id=f"node{i // per_node}/gpu{i % per_node}", node_id=f"node{i // per_node}", kind="gpu",
                   accelerator_type="H100", memory_bytes=slots)
        for i in range(num_gpus)
    ])


def baseline_max_over_mean(load: np.ndarray, num_replicas: int, groups: int, nodes: int, num_gpus: int) -> float:
    phy2log, _, logcnt = rebalance_experts(torch.from_numpy(load), num_replicas, groups, nodes, num_gpus)
    phy2log, logcnt = phy2log.numpy(), logcnt.numpy()
    total_max = total_mean = 0.0
    for layer in range(load.shape[0]):
        per_slot = load[layer, phy2log[layer]] / logcnt[layer, phy2log[layer]]
        per_gpu = per_slot.reshape(num_gpus, -1).sum(axis=1)  # slot r on GPU r // (R / G)
        total_max += per_gpu.max()
        total_mean += per_gpu.mean()
    return total_max / total_mean


def pairs(placement: Placement) -> set:
    return {(d, (int(k[0]), int(k[1]))) for d, keys in placement.assignments.items() for k in keys}


def static_case(s: float, num_experts: int, num_gpus: int, num_layers: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, int(s * 10), num_experts, num_gpus])
    load = zipf_load(num_layers, num_experts, s, rng)
    spg = slots_per_gpu(num_experts, num_gpus)
    num_replicas = spg * num_gpus
    groups, nodes = hierarchy(num_experts, num_gpus)
    inventory = fleet(num_gpus, spg * num_layers, nodes)
    t0 = time.perf_counter()
    ours = plan(load, inventory, Placement(), PlannerKnobs(headroom=0.0), expert_bytes=1)
    ours_s = time.perf_counter() - t0
    ours_ratio = 1.0 / ours.balancedness_after
    rows = []
    for mode, (g, n) in (("flat", (1, 1)), ("hier", (groups, nodes))):
        t0 = time.perf_counter()
        base = baseline_max_over_mean(load, num_replicas, g, n, num_gpus)
        rows.append({
            "s": s, "experts": num_experts, "gpus": num_gpus, "layers": num_layers, "mode": mode,
            "groups": g, "nodes": n, "slots_per_gpu_per_layer": spg, "physical_per_layer": num_replicas,
            "ours_max_over_mean": float(ours_ratio), "baseline_max_over_mean": float(base),
            "ours_over_baseline": float(ours_ratio / base), "goal_met": bool(ours_ratio <= base * 1.01),
            "ours_plan_s": ours_s, "baseline_s": time.perf_counter() - t0,
        })
    return rows


def drift_case(s: float, num_experts: int, num_gpus: int, num_layers: int, steps: int, sigma: float,
               move_budget: float, seed: int) -> dict:
    rng = np.random.default_rng([seed, 7, int(s * 10), num_experts, num_gpus])
    load = zipf_load(num_layers, num_experts, s, rng)
    spg = slots_per_gpu(num_experts, num_gpus)
    inventory = fleet(num_gpus, spg * num_layers, hierarchy(num_experts, num_gpus)[1])
    physical = spg * num_gpus * num_layers
    knobs = PlannerKnobs(headroom=0.0, max_moves_per_step=max(1, math.ceil(move_budget * physical)))
    scratch_knobs = PlannerKnobs(headroom=0.0)
    start = plan(load, inventory, Placement(), scratch_knobs, expert_bytes=1).target
    inc, prev_scratch = start, start
    inc_copies = inc_changed = scr_copies = scr_changed = applied = 0
    bal_ratios, inc_bal, scr_bal = [], [], []
    inc_s = scr_s = 0.0
    for _ in range(steps):
        load = load * rng.lognormal(0.0, sigma, load.shape)
        t0 = time.perf_counter()
        step = plan(load, inventory, inc, knobs, expert_bytes=1)
        inc_s += time.perf_counter() - t0
        if step.apply:
            before, after = pairs(inc), pairs(step.target)
            inc_copies += len(after - before)
            inc_changed += len(after ^ before)
            inc, applied = step.target, applied + 1
        t0 = time.perf_counter()
        scratch = plan(load, inventory, Placement(), scratch_knobs, expert_bytes=1).target
        scr_s += time.perf_counter() - t0
        before, after = pairs(prev_scratch), pairs(scratch)
        scr_copies += len(after - before)
        scr_changed += len(after ^ before)
        prev_scratch = scratch
        b_inc = predict(load, inventory, inc).balancedness
        b_scr = predict(load, inventory, scratch).balancedness
        inc_bal.append(b_inc)
        scr_bal.append(b_scr)
        bal_ratios.append(b_inc / b_scr)
    moves_ratio = inc_copies / max(scr_copies, 1)
    balance_ratio = float(np.mean(bal_ratios))
    return {
        "s": s, "experts": num_experts, "gpus": num_gpus, "layers": num_layers, "steps": steps, "sigma": sigma,
        "physical_replicas": physical, "max_moves_per_step": knobs.max_moves_per_step,
        "hysteresis": knobs.hysteresis, "min_gain": knobs.min_gain, "plans_applied": applied,
        "incremental_copies": inc_copies, "scratch_copies": scr_copies,
        "incremental_changed": inc_changed, "scratch_changed": scr_changed,
        "moves_ratio": moves_ratio,
        "incremental_balancedness_mean": float(np.mean(inc_bal)),
        "scratch_balancedness_mean": float(np.mean(scr_bal)),
        "balance_ratio_mean": balance_ratio, "balance_ratio_worst_step": float(np.min(bal_ratios)),
        "goal_met": bool(moves_ratio <= 0.25 and balance_ratio >= 0.95),
        "incremental_plan_s_per_step": inc_s / steps, "scratch_plan_s_per_step": scr_s / steps,
    }


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = [title for title, _, _ in columns]
    body = [[format(r[key], fmt) if fmt else str(r[key]) for _, key, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and drift steps (a smoke run)")
    parser.add_argument("--out", default="benchmarks/out/planner.json", help="JSON results path")
    parser.add_argument("--layers", type=int, default=4, help="MoE layers L")
    parser.add_argument("--steps", type=int, default=8, help="drift steps per case")
    parser.add_argument("--sigma", type=float, default=0.1, help="lognormal drift per step")
    parser.add_argument("--move-budget", type=float, default=0.15,
                        help="incremental max_moves_per_step as a fraction of the physical replicas")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    experts, gpus, drift_cases, steps = EXPERTS, GPUS, DRIFT_CASES, args.steps
    if args.quick:
        experts, gpus, drift_cases, steps = (8, 64), (4, 16), ((8, 4), (64, 16)), min(steps, 4)
    t_start = time.perf_counter()
    static = [row for s in SKEWS for e in experts for g in gpus
              for row in static_case(s, e, g, args.layers, args.seed)]
    print(f"== balance from scratch: max/mean GPU load, L={args.layers} (lower is better; goal ours/base <= 1.01)")
    print(_table(static, [("s", "s", ".1f"), ("E", "experts", "d"), ("G", "gpus", "d"), ("mode", "mode", ""),
                          ("R/G", "slots_per_gpu_per_layer", "d"), ("ours", "ours_max_over_mean", ".4f"),
                          ("baseline", "baseline_max_over_mean", ".4f"), ("ours/base", "ours_over_baseline", ".4f"),
                          ("goal", "goal_met", ""), ("plan_s", "ours_plan_s", ".2f")]))

    drift = [drift_case(s, e, g, args.layers, steps, args.sigma, args.move_budget, args.seed)
             for e, g in drift_cases for s in SKEWS]
    print(f"\n== drift: {steps} steps of lognormal(0, {args.sigma}) noise, incremental vs from scratch every step")
    print("   (copies = replicas added; goals: copies ratio <= 0.25, balancedness ratio >= 0.95)")
    print(_table(drift, [("s", "s", ".1f"), ("E", "experts", "d"), ("G", "gpus", "d"),
                         ("cap", "max_moves_per_step", "d"), ("applied", "plans_applied", "d"),
                         ("inc_copies", "incremental_copies", "d"), ("scr_copies", "scratch_copies", "d"),
                         ("ratio", "moves_ratio", ".3f"), ("inc_bal", "incremental_balancedness_mean", ".4f"),
                         ("scr_bal", "scratch_balancedness_mean", ".4f"), ("bal_ratio", "balance_ratio_mean", ".4f"),
                         ("worst", "balance_ratio_worst_step", ".4f"), ("goal", "goal_met", ""),
                         ("inc_s", "incremental_plan_s_per_step", ".2f")]))

    elapsed = time.perf_counter() - t_start
    summary = {
        "static_cases": len(static), "static_goal_met": sum(r["goal_met"] for r in static),
        "static_worst_ours_over_baseline": max(r["ours_over_baseline"] for r in static),
        "static_best_ours_over_baseline": min(r["ours_over_baseline"] for r in static),
        "drift_cases": len(drift), "drift_goal_met": sum(r["goal_met"] for r in drift),
        "drift_worst_moves_ratio": max(r["moves_ratio"] for r in drift),
        "drift_worst_balance_ratio_mean": min(r["balance_ratio_mean"] for r in drift),
        "elapsed_s": elapsed,
    }
    print(f"\nstatic: goal met in {summary['static_goal_met']}/{summary['static_cases']} cases "
          f"(ours/baseline from {summary['static_best_ours_over_baseline']:.4f} "
          f"to {summary['static_worst_ours_over_baseline']:.4f}); "
          f"drift: goal met in {summary['drift_goal_met']}/{summary['drift_cases']} "
          f"(worst copies ratio {summary['drift_worst_moves_ratio']:.3f}, "
          f"worst balance ratio {summary['drift_worst_balance_ratio_mean']:.4f}); {elapsed:.0f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "python": sys.version.split()[0], "platform": platform.platform(),
        "cpus": os.cpu_count(), "static": static, "drift": drift, "summary": summary,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    _write_schema(static, drift, summary, args)
    return 0


def _write_schema(static: list[dict], drift: list[dict], summary: dict, args) -> None:
    """benchmarks/results/planner.json in the common schema, and the balance-vs-moves plot."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plots
    from common import RESULTS_DIR, goal, single, spread, write_result

    flat = [r for r in static if r["mode"] == "flat"]
    figures = {
        "ours / baseline max-over-mean, flat": spread([r["ours_over_baseline"] for r in flat], "x",
                                                      "greedy replicate-then-pack (DeepSeek EPLB, global policy)"),
        "ours / baseline max-over-mean, hierarchical": spread(
            [r["ours_over_baseline"] for r in static if r["mode"] == "hier"], "x", "baseline constrained to groups per node"),
        "incremental / from-scratch copies": spread([r["moves_ratio"] for r in drift], "x"),
        "incremental / from-scratch balancedness": spread([r["balance_ratio_mean"] for r in drift], "x"),
        "incremental plan time per step": spread([r["incremental_plan_s_per_step"] for r in drift], "s"),
        "elapsed": single(summary["elapsed_s"], "s"),
    }
    goals = [
        goal("balance from scratch within 1% of the baseline, every case", summary["static_worst_ours_over_baseline"],
             "<=", 1.01, unit="x", description=f"{summary['static_goal_met']} of {summary['static_cases']} cases met"),
        goal("drift: incremental copies <= 1/4 of from scratch, every case", summary["drift_worst_moves_ratio"], "<=", 0.25,
             unit="x"),
        goal("drift: balancedness within 5% of from scratch, every case", summary["drift_worst_balance_ratio_mean"],
             ">=", 0.95, unit="x"),
    ]
    png = plots.planner_balance_vs_moves(RESULTS_DIR / "planner_moves.png", drift,
                                         "planner under drift: balance vs weight copies")
    write_result("planner", title="Planner vs greedy and DeepSeek EPLB",
                 question="Does the planner balance as well as greedy replicate-then-pack, with far fewer moves under drift?",
                 command="python benchmarks/bench_planner.py" + (" --quick" if args.quick else ""), figures=figures,
                 goals=goals, plots=[str(png.relative_to(RESULTS_DIR.parent))],
                 details={"static": static, "drift": drift, "summary": summary}, elapsed_s=summary["elapsed_s"])


if __name__ == "__main__":
    sys.exit(main())
