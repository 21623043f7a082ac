"""The control plane at 32 devices: an emulated fleet (``--emulate h100:16,l4:16``) over a DeepSeek-V3-shaped
expert table (58 MoE layers x 256 experts, top-8; tiny weights, hidden 16, ffn 32) on this machine.

Measures: seconds from start to every device serving exact outputs; the controller's step time without the
planner's search and the planner's time; Redis operations and bytes per second at steady state (INFO stats
deltas); the placement's size and publish time; a worker heartbeat's size; how long routers take to follow a
placement change; the snapshot, ``status`` and ``/api/state`` render times with that table.

    python benchmarks/bench_emulated_fleet.py [--emulate h100:16,l4:16] [--slowdown 50] [--steady-s 20]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import threading
import time
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis_traffic  # noqa: E402
from common import goal, single, spread, write_result  # noqa: E402

DSV3_TINY = {
    "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 32, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
}
"""DeepSeek-V3's expert table (61 layers, the first 3 dense: 58 MoE layers of 256 routed experts, top-8 in 4 of 8
groups, one shared expert) with tiny experts."""


def redis_stats(url: str) -> dict:
    import redis

    r = redis.Redis.from_url(url)
    try:
        info = r.info("stats")
    finally:
        r.close()
    return {k: int(info[k]) for k in ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes")}


def redis_commandstats(url: str) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``; commands scripts run included)."""
    import redis

    r = redis.Redis.from_url(url)
    try:
        info = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def cpu_by_command(before: dict | None = None) -> dict:
    """CPU seconds of this process's tree grouped by process name (Ray names its workers ``ray::<Actor>``), and the
    whole machine's; with ``before`` (an earlier call's ``_raw``) the seconds used since."""
    from proc_cpu import descendants, machine_cpu

    procs = descendants(os.getpid())
    machine = machine_cpu()
    if before is None:
        return {"_raw": (procs, machine)}
    old, old_machine = before["_raw"]
    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    for pid, (comm, cpu) in procs.items():
        out[comm] = out.get(comm, 0.0) + cpu - (old[pid][1] if pid in old else 0.0)
        counts[comm] = counts.get(comm, 0) + 1
    res = {f"{k} (x{counts[k]})" if counts[k] > 1 else k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    res["machine (all processes)"] = (machine["normal"] + machine["niced"]) - (old_machine["normal"] + old_machine["niced"])
    res["other processes (not this run's)"] = max(0.0, res["machine (all processes)"] - sum(out.values()))
    return res


def state_scripts() -> dict[str, str]:
    """The store's Lua scripts by name (``moefleet.core.state.scripts``): how the breakdown names an EVALSHA."""
    from moefleet.core.state import scripts

    return {n.lower(): v for n, v in vars(scripts).items() if n.isupper() and not n.startswith("_") and isinstance(v, str)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emulate", default="h100:16,l4:16")
    ap.add_argument("--slowdown", type=float, default=50.0)
    ap.add_argument("--steady-s", type=float, default=20.0, help="seconds of steady traffic for step times and Redis rates")
    ap.add_argument("--monitor-s", type=float, default=4.0, help="seconds of MONITOR sample for the Redis breakdown")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request of the steady traffic")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t_begin = time.perf_counter()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("MOEFLEET_HTTP_PORT", "0")

    import ray
    import torch

    from moefleet import MoEModel
    from moefleet.controller.main import Controller
    from moefleet.controller.telemetry import TelemetryConfig, build_snapshot, read_inputs
    from moefleet.core.config import FleetConfig
    from moefleet.core.default_model import default_model_dir
    from moefleet.core.state import StateStore
    from moefleet.local import LocalFleet, init_local_ray
    from moefleet.router_service.client import FleetClient
    from moefleet.views import status_view

    ckpt = str(default_model_dir(DSV3_TINY))
    model = MoEModel.from_pretrained(ckpt, backend="torch")
    spec = model.spec
    layers = list(spec.moe_layers)
    figures: dict = {}
    details: dict = {"emulate": args.emulate, "slowdown": args.slowdown, "layers": len(layers),
                     "experts": spec.layer.num_experts, "top_k": spec.layer.top_k, "hidden": spec.layer.hidden_size}

    # -- 1. start to every device serving exact outputs ------------------------------------------------
    cpu_before = cpu_by_command()
    t0 = time.perf_counter()
    init_local_ray(num_cpus=2)
    t_ray = time.perf_counter() - t0
    cfg = FleetConfig(checkpoint=ckpt, emulate=args.emulate, emulate_model="deepseek-v3", emulate_slowdown=args.slowdown,
                      static=True, namespace=f"emu-{uuid.uuid4().hex[:6]}", http_port=0)
    fleet = LocalFleet(cfg)
    try:
        address = fleet.start()
        t_started = time.perf_counter() - t0
        start_cpu = cpu_by_command(cpu_before)
        client = FleetClient(address)
        client.wait_ready(120)
        g = torch.Generator().manual_seed(0)
        handles = dict(fleet.workers)

        def served() -> dict[str, int]:
            """Calls with rows each device has served so far (asked of every worker at once)."""
            infos = ray.get([h.heartbeat_info.remote() for h in handles.values()], timeout=60)
            return {d: int(info["calls"]) for d, info in zip(handles, infos)}

        # every device serving exact outputs: layer calls of 256 tokens (each device holds experts of every layer, so
        # a call reaches most of them), each compared with the in-process layer, until every device has served rows
        worst, checked, t_serving = 0.0, [], None
        for layer in layers:
            x = torch.randn(256, spec.layer.hidden_size, generator=g)
            worst = max(worst, (client.forward(layer, x) - model.layer(layer)(x)).abs().max().item())
            checked.append(layer)
            if worst <= 1e-5 and all(n > 0 for n in served().values()):
                t_serving = time.perf_counter() - t0
                break
        # then every other layer, as before: all 58 answered exactly
        for layer in layers:
            if layer not in checked:
                x = torch.randn(16, spec.layer.hidden_size, generator=g)
                worst = max(worst, (client.forward(layer, x) - model.layer(layer)(x)).abs().max().item())
        t_exact = time.perf_counter() - t0
        calls = served()
        serving = sum(1 for n in calls.values() if n > 0)
        devices = len(fleet.devices)
        exact = worst <= 1e-5
        print(f"{devices} emulated devices: Ray {t_ray:.1f}s, fleet started {t_started:.1f}s, every device served exact "
              f"outputs at {t_serving if t_serving is not None else float('nan'):.1f}s ({len(checked)} layer calls of 256 "
              f"tokens), every layer exact (max |diff| {worst:.2e}) at {t_exact:.1f}s; {serving}/{devices} devices served calls")
        figures["start_to_exact_s"] = single(t_serving if exact else None, "s",
                                             f"from Ray's start to every one of the {devices} emulated devices having served "
                                             f"rows of layer calls whose outputs matched the in-process layer (max |diff| "
                                             f"<= 1e-5)")
        figures["start_to_all_layers_exact_s"] = single(t_exact if exact else None, "s",
                                                        f"from Ray's start to all {len(layers)} layers answered exactly")
        figures["ray_start_s"] = single(t_ray, "s", "Ray's start (local, 2 CPUs)")
        figures["fleet_start_s"] = single(t_started, "s", "Ray's start to LocalFleet.start() returning (workers loaded)")
        figures["start_worker_cpu_s"] = single(sum(v for k, v in start_cpu.items() if k.startswith("ray::ExpertGrou")), "s",
                                               "CPU seconds the 32 worker processes used from Ray's start to the fleet up")
        figures["start_other_cpu_s"] = single(start_cpu["other processes (not this run's)"], "s",
                                              "CPU seconds other processes on the machine (not this run's) used meanwhile")
        details["serving_check_layer_calls"] = len(checked)
        details["start_cpu_s"] = start_cpu
        print("CPU seconds from Ray's start to the fleet started, by process: "
              + ", ".join(f"{k} {v:.1f}" for k, v in start_cpu.items()))
        details.update(max_abs_diff=worst, devices_serving=serving, devices=devices,
                       held={d: len(k) for d, k in fleet.placement.assignments.items()})

        store: StateStore = fleet.store
        # -- 2. sizes: placement, heartbeat --------------------------------------------------------------
        placement = store.get_placement()
        payload = placement.model_dump_json(exclude={"generation"})
        scratch = StateStore(fleet.redis_url, namespace=f"scratch-{uuid.uuid4().hex[:6]}")
        pub = []
        for i in range(5):
            t = time.perf_counter()
            scratch.publish_placement(placement, expected_version=i)
            pub.append(time.perf_counter() - t)
        get = []
        for _ in range(5):
            t = time.perf_counter()
            store.get_placement()
            get.append(time.perf_counter() - t)
        figures["placement_bytes"] = single(len(payload), "bytes", "the placement's JSON as published")
        figures["placement_publish_s"] = spread(pub, "s", "one publish (Lua script: table, version, history, announcement)")
        figures["placement_read_s"] = spread(get, "s", "one read and parse of the placement")
        beats = store.workers()
        sizes = sorted(len(json.dumps(info)) for info in beats.values())
        figures["heartbeat_bytes"] = spread(sizes, "bytes", "one worker heartbeat's record (every 0.25 s per worker)")
        print(f"placement {len(payload) / 1e3:.0f} kB, publish {statistics.median(pub) * 1e3:.1f} ms; heartbeat "
              f"{statistics.median(sizes) / 1e3:.1f} kB (max {sizes[-1] / 1e3:.1f})")

        # -- 3. steady state: traffic, the controller's steps, Redis rates ---------------------------------------
        ccfg = fleet.controller_config(interval_s=1.0)
        controller = Controller(ccfg, holder="bench-controller")
        stop = threading.Event()
        sent = [0]
        failures = [0]

        def traffic():
            rng = np.random.default_rng(1)
            with FleetClient(address) as c:
                while not stop.is_set():
                    layer = int(rng.choice(layers))
                    try:
                        c.forward(layer, torch.from_numpy(rng.standard_normal((args.tokens, spec.layer.hidden_size),
                                                                               dtype=np.float32)))
                        sent[0] += 1
                    except Exception:
                        failures[0] += 1

        th = threading.Thread(target=traffic, daemon=True)
        th.start()
        halt = threading.Event()
        ct = threading.Thread(target=controller.run, args=(halt,), daemon=True)  # as the controller actor runs it
        ct.start()
        time.sleep(4.0)  # the lease, the first load windows
        before, cs_before, t_b = redis_stats(fleet.redis_url), redis_commandstats(fleet.redis_url), time.perf_counter()
        steps, planner, reports, last_at = [], [], [], None
        while time.perf_counter() - t_b < args.steady_s:
            report = dict(controller.last_report or {})
            if report.get("at") is not None and report.get("at") != last_at and "step_s" in report:
                last_at = report["at"]
                reports.append({k: report.get(k) for k in ("step_s", "planner_s", "skipped", "apply", "applied_version",
                                                              "apply_seconds", "gain")})
                p = float(report.get("planner_s") or 0.0)
                a = float(report.get("apply_seconds") or 0.0)
                steps.append(float(report["step_s"]) - p - a)
                planner.append(p)
            time.sleep(0.05)
        after, cs_after, t_a = redis_stats(fleet.redis_url), redis_commandstats(fleet.redis_url), time.perf_counter()
        # where the traffic goes: a MONITOR sample after the window (its own stream is output too), traffic still on
        traffic_groups = redis_traffic.measure(fleet.redis_url, args.monitor_s, namespace=cfg.namespace, scripts=state_scripts())
        halt.set()
        ct.join(30)
        span = t_a - t_b
        ops = (after["total_commands_processed"] - before["total_commands_processed"]) / span
        inb = (after["total_net_input_bytes"] - before["total_net_input_bytes"]) / span
        outb = (after["total_net_output_bytes"] - before["total_net_output_bytes"]) / span
        figures["controller_step_s"] = spread(steps, "s", "one controller step less its planner search and any "
                                              "rebalance it applied, at steady traffic")
        figures["planner_s"] = spread(planner, "s", "the planner's search in one step")
        figures["redis_ops_per_s"] = single(ops, "ops/s", "Redis commands per second at steady traffic (INFO stats)")
        figures["redis_bytes_per_s"] = single(inb + outb, "B/s", "Redis network bytes in + out per second")
        figures["redis_in_bytes_per_s"] = single(inb, "B/s", "of which into Redis")
        figures["redis_out_bytes_per_s"] = single(outb, "B/s", "of which out of Redis")
        figures["steady_requests_per_s"] = single(sent[0] / max(span, 1e-9), "req/s", "requests answered during the window")
        details["steady"] = {"failures": failures[0], "sent": sent[0], "reports": reports}
        details["redis_commandstats_per_s"] = dict(sorted(
            ((c, (n - cs_before.get(c, 0)) / span) for c, n in cs_after.items() if n > cs_before.get(c, 0)), key=lambda kv: -kv[1]))
        details["redis_traffic"] = traffic_groups
        print(f"Redis commands per second (INFO commandstats, script commands included): "
              + ", ".join(f"{c} {n:.0f}" for c, n in list(details["redis_commandstats_per_s"].items())[:8]))
        print(f"Redis traffic by command and key ({traffic_groups['seconds']:.1f} s MONITOR sample): calls/s, kB/s in, kB/s out")
        for g, e in list(traffic_groups["groups"].items())[:15]:
            print(f"  {g:48s} {e['calls_per_s']:8.1f} {e['in_bytes_per_s'] / 1e3:8.1f} {e['out_bytes_per_s'] / 1e3:8.1f}")
        print(f"steady {span:.0f}s: step {statistics.median(steps) * 1e3:.0f} ms (planner {statistics.median(planner) * 1e3:.0f} ms), "
              f"Redis {ops:.0f} ops/s, {(inb + outb) / 1e6:.2f} MB/s (in {inb / 1e6:.2f}); {sent[0]} requests, "
              f"{failures[0]} failed")

        # -- 4. a placement change followed by the routers ----------------------------------------------------
        import redis as redis_lib

        current = store.get_placement()
        h100s = [d.device_id for d in fleet.devices if d.accelerator_type == "H100"]
        target_assign = {d: list(k) for d, k in current.assignments.items()}
        for i, layer in enumerate(layers[:4]):  # one more replica of an expert of four layers, on an H100 with room
            key = next(k for d, ks in current.assignments.items() if d not in h100s[:1] for k in ks if k[0] == layer)
            target_assign[h100s[0]] = target_assign[h100s[0]] + [tuple(key)]
        target = current.model_copy(update={"assignments": target_assign})
        announced: list[float] = []
        sub = redis_lib.Redis.from_url(fleet.redis_url).pubsub(ignore_subscribe_messages=True)
        sub.subscribe(store.keys.placement_channel)
        sub.get_message(timeout=1.0)

        def listen():
            while not announced:
                if sub.get_message(timeout=0.5) is not None:
                    announced.append(time.perf_counter())

        lt = threading.Thread(target=listen, daemon=True)
        lt.start()
        seen: dict[int, float] = {}

        def follow():
            want = current.version + 1
            deadline = time.perf_counter() + 60
            while len(seen) < len(fleet.routers) and time.perf_counter() < deadline:
                for i, r in enumerate(fleet.routers):
                    if i not in seen and ray.get(r.stats.remote())["placement_version"] >= want:
                        seen[i] = time.perf_counter()
                time.sleep(0.005)

        ft = threading.Thread(target=follow, daemon=True)
        ft.start()
        controller.step()  # the lease again (the run loop released it)
        controller.reconciler.apply(target, reason="bench: four replicas added")
        ft.join(70)
        lt.join(5)
        sub.close()
        if announced and len(seen) == len(fleet.routers):
            follow_s = max(seen.values()) - announced[0]
            figures["router_follow_s"] = single(follow_s, "s", "from the new placement's announcement to every router "
                                                              "serving it (polled every 5 ms)")
            print(f"routers followed a placement change in {follow_s * 1e3:.0f} ms")
        else:
            figures["router_follow_s"] = single(None, "s", "not seen")
        stop.set()
        th.join(30)

        # -- 5. dashboard and status with the whole table ------------------------------------------------------
        tcfg = TelemetryConfig()
        snaps, renders = [], []
        from rich.console import Console

        for _ in range(3):
            t = time.perf_counter()
            snap = build_snapshot(read_inputs(store, tcfg), tcfg)
            snaps.append(time.perf_counter() - t)
            t = time.perf_counter()
            Console(file=io.StringIO(), width=160).print(status_view(snap))
            renders.append(time.perf_counter() - t)
        api, api_bytes = [], 0
        for _ in range(3):
            t = time.perf_counter()
            with urllib.request.urlopen(f"http://{fleet.http_address}/api/state", timeout=30) as resp:
                api_bytes = len(resp.read())
            api.append(time.perf_counter() - t)
        figures["snapshot_s"] = spread(snaps, "s", "the fleet snapshot from the store (what status and the dashboard draw)")
        figures["status_render_s"] = spread(renders, "s", "status's terminal view of that snapshot")
        figures["api_state_s"] = spread(api, "s", "GET /api/state (the dashboard's JSON)")
        figures["api_state_bytes"] = single(api_bytes, "bytes", "the dashboard's JSON")
        details["snapshot_devices"] = len(snap["devices"])
        print(f"snapshot {statistics.median(snaps) * 1e3:.0f} ms, status render {statistics.median(renders) * 1e3:.0f} ms, "
              f"/api/state {statistics.median(api) * 1e3:.0f} ms ({api_bytes / 1e3:.0f} kB), {len(snap['devices'])} devices")
        client.close()
    finally:
        fleet.stop()
        ray.shutdown()

    goals = [
        goal("start_to_exact", figures["start_to_exact_s"], "<=", 60, unit="s",
             description=f"{details['devices']} emulated devices up and serving exact outputs"),
        goal("controller_step", figures["controller_step_s"], "<=", 0.2, unit="s",
             description="controller step excluding the planner's search (median)"),
        goal("redis_traffic", figures["redis_bytes_per_s"], "<=", 1e6, unit="B/s", description="Redis bytes per second at steady state"),
        goal("router_follow", figures["router_follow_s"], "<=", 1.0, unit="s", description="a placement change followed by every router"),
    ]
    traffic = details.get("redis_traffic") or {"groups": {}, "seconds": 0}
    groups = list(traffic["groups"].items())
    rows = [[g, e["calls_per_s"], e["in_bytes_per_s"], e["out_bytes_per_s"], e["reply_bytes"], e["clients"]] for g, e in groups[:14]]
    if len(groups) > 14:
        rest = [e for _, e in groups[14:]]
        rows.append([f"{len(rest)} others", sum(e["calls_per_s"] for e in rest), sum(e["in_bytes_per_s"] for e in rest),
                     sum(e["out_bytes_per_s"] for e in rest), "", ""])
    if traffic.get("seconds"):
        rows.append(["the MONITOR sample in all", traffic["calls_per_s"], traffic["in_bytes_per_s"], traffic["out_bytes_per_s"],
                     "", ""])
        rows.append(["INFO stats over the steady window", figures["redis_ops_per_s"]["value"],
                     figures["redis_in_bytes_per_s"]["value"], figures["redis_out_bytes_per_s"]["value"], "", ""])
    tables = {
        f"Redis traffic by command and key ({traffic['seconds']:.0f} s MONITOR sample at steady traffic; replies of reads "
        f"measured by re-running one, writes and scripts counted at {redis_traffic.SMALL_REPLY_BYTES} bytes)": {
            "columns": ["command and key (or script)", "calls", "bytes in", "bytes out", "reply", "connections"],
            "units": ["", "/s", "B/s", "B/s", "B", ""], "rows": rows},
        "Redis commands per second (INFO commandstats over the steady window; commands run by scripts included)": {
            "columns": ["command", "calls"], "units": ["", "/s"],
            "rows": [[c, n] for c, n in list((details.get("redis_commandstats_per_s") or {}).items())[:12]]},
    }
    write_result(
        "emulated_fleet",
        title="The control plane at 32 emulated devices, DeepSeek-V3-shaped expert table",
        question="Does the control plane (controller, Redis, heartbeats, placement, routers, status) hold at 32 devices "
                 "and 58 x 256 experts?",
        command=f"python benchmarks/bench_emulated_fleet.py --emulate {args.emulate} --slowdown {args.slowdown:g} "
                f"--steady-s {args.steady_s:g}",
        figures=figures, goals=goals, details=details, elapsed_s=time.perf_counter() - t_begin,
        results_dir=None if args.out is None else Path(args.out), tables=tables,
    )


if __name__ == "__main__":
    main()
