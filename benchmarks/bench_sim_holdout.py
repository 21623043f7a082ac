"""The simulator against emulated fleets it was not calibrated on: predictions written before the runs.

    python benchmarks/bench_sim_holdout.py [--slowdown 500] [--clients 8] [--run-s 40] [--quick]
    python benchmarks/bench_sim_holdout.py --fleets homogeneous --traces shifting      # a subset of the held-out runs

Four phases, in this order:

1. **Calibration**: a static fleet of two emulated H100s (``--emulate h100:2``,
   the same checkpoint, modelled expert shape, slowdown and router settings as
   the held-out fleets) serves calls aimed at one device and at both, from one
   client and from ``--clients`` clients. ``sim.emulated.fit_emulation_costs``
   fits what the serving path adds around the emulated devices' modelled time
   (a device's extra busy time per call; a call's latency outside the devices,
   fixed and per device touched). Emulated devices, not CPU workers: the
   held-out fleets are emulated, so this measures the path they serve on,
   while the device time itself (``device_service_s``) is the simulator's by
   construction and is not fitted at all.
2. **Predictions**: for every held-out run -- a 16-device homogeneous fleet
   (``h100:16``) and a 32-device mixed one (``h100:16,l4:16``), each static and
   elastic, on a ``shifting`` trace (Zipf 1.2 hot set redrawn each quarter)
   and a ``drift`` trace (``sim.traffic.DriftTraffic``'s 600 s of popularity
   compressed onto the run) -- the simulator replays the very request stream
   the fleet will get (the fleet's own devices, starting placement and
   controller config, closed loop with ``--clients`` callers) and the
   predictions go to a JSON file, flushed and fsynced, with its write time,
   before the first held-out request is sent. The result records its path and
   SHA-256, and each run's first request time.
3. **Held-out runs**: per (fleet, trace) one fleet starts static, serves the
   stream, waits until its load windows age out, starts its controller (as
   ``moe-fleet up`` does), waits for the controller's first step (on no load:
   the repair to its replica floor) and that step's cooldown, and serves the
   same stream elastic. The simulator's elastic run starts where that first
   step leaves the placement (``decide()`` on no load, computed in phase 2).
   The router serves emulated workers as it serves any worker without a GPU:
   through plain actor calls (``RouterConfig.compiled_graphs="auto"``). Measured at the
   clients: tokens/s (model tokens, first request to last answer), p99 call
   latency; from the fleet's store (its placement, watched): placements the
   controller published while requests were being sent, and the weight bytes
   they added (replicas new on a device); the fleet's own rebalance counters
   beside them.
4. **Comparison**: per run the relative error of tokens/s and p99, per
   (fleet, trace) the error of the elastic/static ratio; bytes moved and
   rebalances side by side. Goals: tokens/s and p99 within 15 %, ratio within
   10 %, every run.

Times are the fleet's wall clock; figures in device time divide latencies by the
slowdown and multiply tokens/s by it (relative errors are the same either way).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, ClosedLoopClients, goal, single, spread, write_mixtral_checkpoint, write_result  # noqa: E402

FLEETS = {"homogeneous": "h100:16", "mixed": "h100:16,l4:16"}
TRACES = ("shifting", "drift")
MODES = ("static", "elastic")
MODEL = "qwen2-57b-a14b"  # 64 routed experts, the checkpoint's count; each device timed and sized for its experts
HIDDEN, FFN = 16, 32  # tiny experts: the CPU's true result costs little, the emulated device's time dominates


# --------------------------------------------------------------------------- requests and clients
def logits_for(choices: np.ndarray, experts: int) -> torch.Tensor:
    """Router logits ``[T, E]`` whose top-k is exactly ``choices`` ``[T, K]``."""
    logits = torch.full((choices.shape[0], experts), -8.0)
    logits.scatter_(1, torch.from_numpy(choices.astype(np.int64)), 8.0)
    return logits


# --------------------------------------------------------------------------- phase 1: calibration
def calibration_phases(fleet, args, layer: int) -> list[dict]:
    """Calls aimed at one device and at both, one client and ``args.clients``; ``rounds`` times each."""
    from moefleet.core.emulation import emulated_call_s

    held = {d: sorted(e for (lay, e) in keys if lay == layer) for d, keys in fleet.placement.assignments.items()}
    devices = sorted(held)
    emu = {d.device_id: d.emulated for d in fleet.devices}
    T, K = args.tokens, args.top_k

    def aimed(groups: list[list[int]]) -> np.ndarray:  # token j takes K experts, K / len(groups) from each group
        per = K // len(groups)
        rows = []
        for j in range(T):
            picks = []
            for g in groups:
                picks += [g[(j * per + m) % len(g)] for m in range(per)]
            rows.append(picks)
        return np.asarray(rows)

    shapes = {"one device": aimed([held[devices[0]]]), "two devices": aimed([held[devices[0]], held[devices[1]]])}
    out = []
    for rnd in range(args.rounds):
        for name, choices in shapes.items():
            counts = np.bincount(choices.ravel(), minlength=args.experts)
            device_s = {}
            for d in devices:
                rows = [int(counts[e]) for e in held[d] if counts[e] > 0]
                if rows:
                    device_s[d] = emulated_call_s(emu[d], rows)
            logits = logits_for(choices, args.experts)
            for clients in (1, args.clients):
                runner = ClosedLoopClients(fleet.address, clients, T, HIDDEN)
                box: dict = {}
                th = threading.Thread(target=lambda: box.update(runner.run(lambda i: (layer, logits),
                                                                           stop_after_s=args.calib_s)))
                th.start()
                th.join()
                # steady state: completions after the first (every client in its loop); a saturated device
                # completes one call every its-time-per-call, a single client one every latency
                done = sorted(box["done"], key=lambda c: c[2])[1:]
                if len(done) < 3:
                    raise RuntimeError(f"calibration {name} x{clients}: only {len(done) + 1} calls finished; raise --calib-s")
                wall = done[-1][2] - done[0][2]
                lat = [e - s for _, s, e in done]
                phase = {"phase": name, "round": rnd, "clients": clients, "calls": len(done) - 1, "wall_s": wall,
                         "latency_s": statistics.median(lat), "device_s": device_s, "failed": len(box["failed"])}
                out.append(phase)
                print(f"  calibration {name:11s} x{clients}: {(len(done) - 1) / wall:6.2f} calls/s, median latency "
                      f"{1000 * phase['latency_s']:7.1f} ms, modelled slowest device {1000 * max(device_s.values()):7.1f} ms",
                      flush=True)
    return out


# --------------------------------------------------------------------------- phase 2: the requests and the predictions
def fleet_config(args, ckpt: str, redis_url: str, emulate: str, tag: str):
    from moefleet.core.config import FleetConfig, RouterConfig

    return FleetConfig(checkpoint=ckpt, emulate=emulate, emulate_model=MODEL, emulate_slowdown=args.slowdown, static=True,
                       redis_url=redis_url, namespace=f"holdout-{tag}-{uuid.uuid4().hex[:6]}", http_port=None,
                       router=RouterConfig(batch_window_ms=0, telemetry_interval_s=0.25))


def start_fleet(cfg, tries: int = 3):
    """A started ``LocalFleet``; tries again when a port it picked was taken meanwhile (a shared machine)."""
    from moefleet.local import LocalFleet

    for attempt in range(tries):
        fleet = LocalFleet(cfg)
        try:
            fleet.start()
            return fleet
        except Exception as e:
            fleet.stop()
            if attempt == tries - 1 or "bind" not in str(e):
                raise
            print(f"  fleet start: {str(e).splitlines()[-1][:120]}; again", flush=True)


def make_trace(kind: str, args, layers: list[int], lines: int, seed: int):
    from moefleet.controller.sim.emulated import choice_trace, drift_popularity, shifting_popularity

    if kind == "shifting":
        pop = shifting_popularity(args.experts, len(layers), s=1.2, phases=4, seed=seed)
    else:
        pop = drift_popularity(args.experts, len(layers), args.top_k, 600.0, seed=seed)
    return choice_trace(pop, lines=lines, layers=layers, tokens=args.tokens, top_k=args.top_k,
                        seconds_per_line=args.run_s / lines, seed=seed)


def predict_pair(fleet_name: str, trace_kind: str, args, ckpt: str, redis_url: str, costs, seed: int) -> dict:
    """The simulator's static and elastic runs of one (fleet, trace), and the request stream both will serve."""
    from moefleet.controller.decide import decide
    from moefleet.controller.sim import emulated_sim_devices, simulate
    from moefleet.core.model import MoECheckpoint
    from moefleet.core.placement import proportional_placement
    from moefleet.local import LocalFleet

    cfg = fleet_config(args, ckpt, redis_url, FLEETS[fleet_name], f"{fleet_name}-{trace_kind}")
    lf = LocalFleet(cfg)  # nothing started: its devices, starting placement and controller config as start() makes them
    spec = MoECheckpoint(ckpt).spec
    specs = lf.local_devices()
    lf.devices = specs
    held = spec.layer.expert_params * 4
    layers = list(spec.moe_layers)
    start = proportional_placement(layers, spec.layer.num_experts, specs, held)
    ctl = lf.controller_config()
    devices = emulated_sim_devices(ctl.devices, costs, copy_bytes_per_s=ctl.copy_bytes_per_s)
    sim_cfg = costs.sim_config(controller=ctl, mode="closed", concurrency=args.clients, top_k=args.top_k,
                               reconcile_overhead_s=ctl.rebalance_overhead_s, checkpoint_bytes_per_s=ctl.copy_bytes_per_s)

    # the elastic fleet's controller starts before its traffic: its first step, on no load, repairs the placement to
    # its replica floor (decide() itself), and the traffic begins once that step's cooldown has passed
    first = decide(ctl, {}, [d.spec for d in devices], start, np.zeros((len(layers), spec.layer.num_experts)), None, 0.0,
                   expert_bytes=held, layers=layers)
    elastic_start = first.plan.target if first.plan is not None and first.plan.apply else start

    def run(trace, elastic):
        return simulate(trace, devices, expert_bytes=held, config=sim_cfg, elastic=elastic,
                        initial=elastic_start if elastic else start)

    # size the stream so the static run takes about --run-s (a model-only estimate from a short stream)
    probe_lines = 120
    _, probe = make_trace(trace_kind, args, layers, probe_lines, seed)
    per_line = run(probe, False).makespan_s / probe_lines
    lines = int(min(args.max_lines, max(args.min_lines, round(args.run_s / per_line))))
    choices, trace = make_trace(trace_kind, args, layers, lines, seed)
    out = {"fleet": FLEETS[fleet_name], "lines": lines, "expert_bytes": held, "layers": layers, "seed": seed, "choices": choices,
           "config": cfg, "start": start, "elastic_start": elastic_start, "runs": {}}
    for mode in MODES:
        t = time.perf_counter()
        r = run(trace, mode == "elastic")
        out["runs"][mode] = {"tokens_per_s": r.tokens_per_s, "p99_ms": r.p99_latency_ms, "bytes_moved": r.bytes_moved,
                             "rebalances": r.plans_applied, "makespan_s": r.makespan_s, "calls": r.calls,
                             "p50_ms": r.p50_latency_ms, "copies": r.copies, "sim_wall_s": time.perf_counter() - t,
                             "applied_at_s": [round(rep["applied_at"] - float(trace.t[0]), 3) for rep in r.reports
                                              if "applied_at" in rep],
                             "timeline_tokens_per_s": [round(x, 1) for x in r.timeline["tokens_per_s"]]}
    return out


def write_predictions(path: Path, doc: dict) -> str:
    """Write, flush and fsync ``doc``; returns its SHA-256."""
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- phase 3: the held-out runs
def counters(store) -> dict:
    """The fleet's rebalance counters, and its placement events (when, version, reason, loads)."""
    from moefleet.controller.telemetry import TelemetryConfig, build_snapshot, read_inputs

    cfg = TelemetryConfig(expert_metrics=False)
    inputs = read_inputs(store, cfg)
    rb = build_snapshot(inputs, cfg)["rebalances"]
    events = [{"at": e["at"], **{k: e["data"].get(k) for k in ("version", "reason", "loads")}}
              for e in inputs.events if e["kind"] == "placement"]
    return {"rebalances": int(rb["total"]), "bytes_moved": int(rb["bytes_moved"]), "events": events}


def watch_placement(store, stop: threading.Event, log: list) -> None:
    """Record (monotonic time, version, {device: {(layer, expert)}}) whenever the published placement changes."""
    last = None
    while not stop.wait(0.05):
        p = store.get_placement()
        if p is not None and p.version != last:
            last = p.version
            log.append((time.monotonic(), p.version, {d: {tuple(k) for k in keys} for d, keys in p.assignments.items()}))


def wait_for_graph(fleet, timeout_s: float = 180.0) -> float:
    """With ``compiled_graphs="on"``, wait until the router's compiled graph is up over every worker the published
    placement uses (until then calls go through plain actor calls); returns the seconds waited. Under the default
    ``auto`` a router serves emulated workers (they compute on the CPU) through plain actor calls only."""
    if fleet.config.router.compiled_graphs != "on":  # emulated workers compute on the CPU: plain actor calls
        return 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        placement = fleet.store.get_placement()
        want = {d for d, keys in placement.assignments.items() if keys}
        graph = fleet.router_stats()[0]["transport"].get("graph") or {}
        if graph.get("alive") and set(graph.get("workers") or ()) == want:
            return time.monotonic() - t0
        time.sleep(0.25)
    raise RuntimeError(f"the router's compiled graph did not cover the placement's workers within {timeout_s:.0f} s")


def same_assignments(a, b) -> bool:
    """Whether two placements put the same experts on the same devices (versions aside)."""
    def norm(p):
        return {d: sorted(map(tuple, k)) for d, k in p.assignments.items() if k}
    return norm(a) == norm(b)


def measure_pair(pair: dict, args) -> dict:
    import ray

    from moefleet.controller.sim.emulated import placement_changes

    cfg = pair["config"]
    layers, choices = pair["layers"], pair["choices"]
    lines = pair["lines"]
    out: dict = {}
    t_up = time.perf_counter()
    fleet = start_fleet(cfg)
    try:
        out["fleet_start_s"] = time.perf_counter() - t_up
        out["start_placement_as_predicted"] = same_assignments(fleet.placement, pair["start"])
        cache: dict[int, torch.Tensor] = {}

        def request(i):
            x = cache.get(i)
            if x is None:
                x = cache[i] = logits_for(choices[i], args.experts)
            return layers[i % len(layers)], x

        for i in range(min(lines, 64)):  # build the first requests' logits before the clock starts
            request(i)
        for mode in MODES:
            if mode == "elastic":
                time.sleep(args.settle_s)  # the static run's load windows and served rows age out
                fleet.start_controller()
                ray.get(fleet.controller.pid.remote())
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # its first step (on no load: the replica floor's repair)
                    report = ray.get(fleet.controller.last_report.remote()) or {}
                    if "step_s" in report:
                        break
                    time.sleep(0.1)
                if report.get("apply"):
                    time.sleep(fleet.controller_config().cooldown_s + 1.0)  # that step's cooldown passes
                out["elastic_start_as_predicted"] = same_assignments(fleet.store.get_placement(), pair["elastic_start"])
                out["first_step"] = {k: report.get(k) for k in ("apply", "repaired", "copies", "skipped", "step_s")}
            out[f"{mode}_graph_wait_s"] = wait_for_graph(fleet)
            before = counters(fleet.store)
            stop, log = threading.Event(), []
            watcher = threading.Thread(target=watch_placement, args=(fleet.store, stop, log), daemon=True)
            watcher.start()
            while not log:
                time.sleep(0.01)
            run = ClosedLoopClients(fleet.address, args.clients, args.tokens, HIDDEN).run(request, total=lines)
            last_sent = max(s for _, s, _ in run["done"])
            time.sleep(args.grace_s)  # a rebalance decided before the last request finishes and is counted
            stop.set()
            watcher.join()
            after = counters(fleet.store)
            router = fleet.router_stats()[0]
            rebalances, moved = placement_changes(log, run["start"], last_sent, pair["expert_bytes"])
            lat = [e - s for _, s, e in run["done"]]
            tokens = len(run["done"]) * args.tokens / len(layers)
            out[mode] = {"tokens_per_s": tokens / run["makespan_s"], "p99_ms": float(np.percentile(lat, 99) * 1000),
                         "p50_ms": float(np.percentile(lat, 50) * 1000), "makespan_s": run["makespan_s"],
                         "calls": len(run["done"]), "failed": len(run["failed"]), "failures": sorted(set(run["failed"])),
                         "rebalances": rebalances, "bytes_moved": moved,
                         "counted_rebalances": after["rebalances"] - before["rebalances"],
                         "counted_bytes_moved": after["bytes_moved"] - before["bytes_moved"],
                         "placements_at_s": [round(t - run["start"], 3) for t, _, _ in log[1:]],
                         "placement_events": [e for e in after["events"] if e not in before["events"]],
                         "router": {k: v for k, v in router.items() if k not in ("stages", "pid", "metrics_port")},
                         "calls_at_s": [[round(s - run["start"], 3), round(e - run["start"], 3)] for _, s, e in run["done"]],
                         "first_request_at": run["start_wall"]}
            m = out[mode]
            print(f"  measured {mode}: {m['tokens_per_s']:,.1f} tokens/s (wall) over {m['makespan_s']:.1f} s, p99 "
                  f"{m['p99_ms']:.0f} ms, {m['rebalances']} rebalances at {m['placements_at_s']} s, {m['bytes_moved']:,} "
                  f"bytes moved (the fleet counted {m['counted_rebalances']}, {m['counted_bytes_moved']:,}), "
                  f"{m['failed']} failed", flush=True)
    finally:
        fleet.stop()
    return out


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleets", default="homogeneous,mixed", help=f"comma-separated, of {', '.join(FLEETS)}")
    ap.add_argument("--traces", default=",".join(TRACES), help=f"comma-separated, of {', '.join(TRACES)}")
    ap.add_argument("--slowdown", type=float, default=500.0, help="emulated devices' time dilation")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop callers (calibration's saturated phases too)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per layer call")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--run-s", type=float, default=40.0, help="predicted length of each static run (sizes the stream)")
    ap.add_argument("--min-lines", type=int, default=60)
    ap.add_argument("--max-lines", type=int, default=2000)
    ap.add_argument("--calib-s", type=float, default=12.0, help="seconds of each calibration phase")
    ap.add_argument("--rounds", type=int, default=2, help="calibration rounds")
    ap.add_argument("--settle-s", type=float, default=8.0, help="idle seconds between a fleet's static and elastic runs")
    ap.add_argument("--grace-s", type=float, default=3.0, help="seconds after a run for a rebalance to be counted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="short runs: 15 s streams, 6 s calibration phases, one round")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write the result JSON")
    args = ap.parse_args()
    if args.quick:
        args.run_s, args.calib_s, args.rounds = 15.0, 6.0, 1
    fleets = [f.strip() for f in args.fleets.split(",") if f.strip()]
    traces = [t.strip() for t in args.traces.split(",") if t.strip()]
    if not fleets or any(f not in FLEETS for f in fleets):
        ap.error(f"--fleets: expected some of {', '.join(FLEETS)}, got {args.fleets!r}")
    if not traces or any(t not in TRACES for t in traces):
        ap.error(f"--traces: expected some of {', '.join(TRACES)}, got {args.traces!r}")
    if args.top_k < 1 or args.top_k % 2 or args.top_k > args.experts // 2:
        ap.error("--top-k: must be even (the calibration splits each token's experts over two devices) and <= experts / 2")
    t_begin = time.perf_counter()

    from moefleet.controller.sim import EmulationPhase, fit_emulation_costs
    from moefleet.controller.sim.emulated import holdout_rows, ratio_rows, run_key, worst
    from moefleet.core.redis_server import RedisServer
    from moefleet.local import init_local_ray

    import ray

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=HIDDEN, ffn=FFN, experts=args.experts,
                                            top_k=args.top_k, layers=args.layers))
        init_local_ray(num_cpus=4)
        redis = RedisServer()
        try:
            # 1. calibration: two emulated H100s, static
            print("calibration: h100:2, static", flush=True)
            cal_fleet = start_fleet(fleet_config(args, ckpt, redis.url, "h100:2", "calibration"))
            try:
                phases = calibration_phases(cal_fleet, args, layer=0)
            finally:
                cal_fleet.stop()
            costs = fit_emulation_costs([EmulationPhase(p["clients"], p["calls"], p["wall_s"], p["latency_s"], p["device_s"])
                                         for p in phases])
            print(f"fitted: call {1000 * costs.call_s:.1f} ms + {1000 * costs.worker_call_s:.2f} ms per device touched "
                  f"(latency), device {1000 * costs.device_call_s:.1f} ms per call beyond its modelled time", flush=True)

            # 2. predictions, written before any held-out request
            pairs = {}
            for i, fleet_name in enumerate(fleets):
                for j, trace_kind in enumerate(traces):
                    seed = args.seed + 10 * i + j
                    pairs[(fleet_name, trace_kind)] = predict_pair(fleet_name, trace_kind, args, ckpt, redis.url, costs, seed)
            predicted = {run_key(f, t, m): pairs[(f, t)]["runs"][m] for (f, t) in pairs for m in MODES}
            written_at = time.time()
            pred_doc = {
                "written_at": datetime.datetime.fromtimestamp(written_at, datetime.timezone.utc).isoformat(),
                "written_at_unix": written_at, "costs": costs.to_dict(), "slowdown": args.slowdown,
                "streams": {f"{f}/{t}": {"fleet": p["fleet"], "lines": p["lines"], "seed": p["seed"],
                                         "choices_sha256": hashlib.sha256(p["choices"].tobytes()).hexdigest()}
                            for (f, t), p in pairs.items()},
                "runs": predicted,
            }
            pred_path = OUT_DIR / f"sim_holdout_predictions_{time.strftime('%Y%m%dT%H%M%S', time.gmtime(written_at))}.json"
            pred_sha = write_predictions(pred_path, pred_doc)
            print(f"predictions written to {pred_path} (sha256 {pred_sha[:16]}...)", flush=True)
            for k, v in predicted.items():
                print(f"  predicted {k}: {v['tokens_per_s']:,.1f} tokens/s (wall), p99 {v['p99_ms']:.0f} ms, "
                      f"{v['rebalances']} rebalances at {v['applied_at_s']} s, {v['bytes_moved']:,} bytes moved "
                      f"({v['calls']} calls)", flush=True)

            # 3. the held-out runs
            measured, runs_detail = {}, {}
            for (f, t), pair in pairs.items():
                print(f"held-out: {f} ({pair['fleet']}) on {t}, {pair['lines']} calls", flush=True)
                m = measure_pair(pair, args)
                runs_detail[f"{f}/{t}"] = {k: v for k, v in m.items() if k not in MODES}
                for mode in MODES:
                    measured[run_key(f, t, mode)] = m[mode]
        finally:
            ray.shutdown()
            redis.stop()

    # 4. comparison
    rows = holdout_rows(predicted, {k: {f: v[f] for f in ("tokens_per_s", "p99_ms", "bytes_moved", "rebalances")}
                                    for k, v in measured.items()})
    ratios = ratio_rows(predicted, measured)
    before_first = all(m["first_request_at"] > written_at for m in measured.values())
    for r in rows:
        print(f"{r['run']}: tokens/s predicted {r['tokens_per_s_predicted']:,.1f} measured {r['tokens_per_s_measured']:,.1f} "
              f"(error {r['tokens_per_s_error']:.1%}); p99 {r['p99_ms_predicted']:.0f} vs {r['p99_ms_measured']:.0f} ms "
              f"(error {r['p99_ms_error']:.1%}); rebalances {r['rebalances_predicted']} vs {r['rebalances_measured']}; "
              f"bytes {r['bytes_moved_predicted']:,} vs {r['bytes_moved_measured']:,}")
    for r in ratios:
        print(f"{r['pair']}: elastic/static predicted {r['ratio_predicted']:.3f}, measured {r['ratio_measured']:.3f} "
              f"(error {r['ratio_error']:.1%})")
    if args.no_write:
        return
    s = args.slowdown
    figures = {}
    for r in rows:
        figures[f"{r['run']}: tokens/s predicted"] = single(r["tokens_per_s_predicted"] * s, "tokens/s", "device time")
        figures[f"{r['run']}: tokens/s measured"] = single(r["tokens_per_s_measured"] * s, "tokens/s", "device time")
        figures[f"{r['run']}: p99 predicted"] = single(r["p99_ms_predicted"] / s, "ms", "device time")
        figures[f"{r['run']}: p99 measured"] = single(r["p99_ms_measured"] / s, "ms", "device time")
        figures[f"{r['run']}: rebalances predicted / measured"] = single(r["rebalances_predicted"], "plans",
                                                                         f"measured {r['rebalances_measured']}")
        figures[f"{r['run']}: bytes moved predicted / measured"] = single(r["bytes_moved_predicted"], "bytes",
                                                                          f"measured {r['bytes_moved_measured']:,}")
    for r in ratios:
        figures[f"{r['pair']}: elastic/static predicted"] = single(r["ratio_predicted"], "x")
        figures[f"{r['pair']}: elastic/static measured"] = single(r["ratio_measured"], "x")
    figures["tokens/s error"] = spread([100 * r["tokens_per_s_error"] for r in rows], "%")
    figures["p99 error"] = spread([100 * r["p99_ms_error"] for r in rows], "%")
    figures["elastic/static ratio error"] = spread([100 * r["ratio_error"] for r in ratios], "%")
    desc = (f"{len(rows)} held-out runs ({', '.join(f'{f} {FLEETS[f]}' for f in fleets)}; {', '.join(traces)}; "
            f"static and elastic), calibrated on h100:2 static")
    goals = [
        goal("tokens/s within 15% (every held-out run)", worst(rows, "tokens_per_s_error"), "<=", 0.15, description=desc),
        goal("p99 latency within 15% (every held-out run)", worst(rows, "p99_ms_error"), "<=", 0.15, description=desc),
        goal("elastic/static ratio within 10% (every fleet and trace)", worst(ratios, "ratio_error"), "<=", 0.10,
             description=desc),
        goal("predictions written before the first held-out request", int(before_first), "==", 1,
             description=f"{pred_path.name}, sha256 {pred_sha}"),
        goal("no failed request", sum(m["failed"] for m in measured.values()), "==", 0, unit="requests"),
    ]
    flags = (f"--fleets {','.join(fleets)} --traces {','.join(traces)} --slowdown {s:g} --clients {args.clients} "
             f"--tokens {args.tokens} --top-k {args.top_k} --run-s {args.run_s:g} --calib-s {args.calib_s:g} "
             f"--rounds {args.rounds}")
    write_result(
        "sim_holdout", title="Simulator against emulated fleets on held-out runs",
        question="Calibrated on a 2-device static emulated fleet, does the simulator predict 16- and 32-device emulated "
                 "fleets' tokens/s and p99 within 15% and their elastic/static ratio within 10%?",
        command=f"python benchmarks/bench_sim_holdout.py {flags}", figures=figures, goals=goals,
        details={"predictions_file": str(pred_path), "predictions_sha256": pred_sha, "predictions_written_at": written_at,
                 "costs": costs.to_dict(), "calibration": phases, "rows": rows, "ratios": ratios, "measured": measured,
                 "predicted": predicted, "runs": runs_detail,
                 "setup": {"model": MODEL, "hidden": HIDDEN, "ffn": FFN, "experts": args.experts, "layers": args.layers,
                           "top_k": args.top_k, "tokens": args.tokens, "clients": args.clients, "slowdown": s}},
        elapsed_s=time.perf_counter() - t_begin, results_dir=None if args.out is None else Path(args.out),
    )


if __name__ == "__main__":
    main()
