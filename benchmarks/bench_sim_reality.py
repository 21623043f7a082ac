"""The simulator checked against reality: predicted vs measured elastic/static throughput of a local fleet.

    python benchmarks/bench_sim_reality.py [--scenarios hot-start,shifting] [--repeats 3] [--clients 4] [--quick]
    python benchmarks/bench_sim_reality.py --predict-from benchmarks/out/sim_reality_measured.json   # the model only

One trace, two worlds, per scenario:

* **measured**: a local fleet (``moefleet.local.LocalFleet``: 2 workers each
  owning one core, a router, Redis; the client threads, the router, Ray and
  Redis share the same two cores) serves the trace twice -- static (no
  controller, the starting placement kept) and elastic (the local controller
  running, as ``moe-fleet up`` starts it). ``--clients`` callers take the
  trace's lines in order, back to back; each line's tokens carry router logits
  that pick exactly the line's experts, so the fleet routes the counts the
  trace holds (with logits the router serves each request as its own batch);
* **predicted**: ``controller/sim/local.py`` replays the same lines in closed
  mode from the same starting placement with the same controller config. Its
  costs are calibrated on the *static* fleet before the trace (never on the
  elastic run): the expert FFN timed on one core, then three phases on the
  fleet -- idle, calls whose experts are all on one worker, calls that touch
  both workers -- give each worker's CPU per call and per row and the CPU the
  host processes (clients, router, raylet, GCS, Redis) spend per call, per
  worker call and when idle; ``sim.local.fit_local_costs`` turns them into
  devices and a ``HostCpu`` (work queued on the cores the workers own).

Scenarios (``--scenarios``):

* ``hot-start`` -- the core-ownership benchmark's traffic: H 512, F 4096, 8
  experts, top-2, 512-token calls whose two experts (0 and 1) both start on
  worker-0; static keeps worker-1 idle, elastic replicates them;
* ``shifting`` -- the same shape, the hot pair moving every quarter of the
  trace between pairs that each start on one worker: (0,1), (4,5), (2,3), (6,7);
* ``zipf`` -- Zipf 1.2 over 16 experts, top-2, 2 layers, 64-token calls, the
  hot set redrawn every 10 s of trace (where elasticity gains nothing here).

Goal: in every repeat, the predicted elastic/static ratio within 20% of the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, ClosedLoopClients, goal, single, spread, write_mixtral_checkpoint, write_result  # noqa: E402
from proc_cpu import CpuMeter  # noqa: E402

TOP_K = 2


@dataclass(frozen=True)
class Scenario:
    """One trace's shape: hidden ``H``, intermediate ``F``, ``E`` experts, ``L`` layers, ``T`` tokens a call."""

    name: str
    hidden: int
    ffn: int
    experts: int
    layers: int
    tokens: int
    calls: int
    description: str
    hot_pairs: tuple[tuple[int, int], ...] = ()  # hot-start / shifting: every token's two experts, phase by phase
    zipf: float = 0.0
    shift_s: float = 10.0
    rate: float = 40.0  # lines a second of trace time (orders the lines; the clients go back to back)

    def make(self, seed: int = 0):
        """The calls ``[(layer, choices [T, K])]`` and their ``Trace``."""
        from moefleet.core.trace import Trace

        t = np.arange(self.calls) / self.rate
        layer = np.arange(self.calls) % self.layers
        counts = np.zeros((self.calls, self.experts), dtype=np.int64)
        calls = []
        if self.hot_pairs:
            per_phase = -(-self.calls // len(self.hot_pairs))
            for i in range(self.calls):
                choices = np.tile(np.asarray(self.hot_pairs[i // per_phase]), (self.tokens, 1))
                calls.append((int(layer[i]), choices))
                counts[i] = np.bincount(choices.ravel(), minlength=self.experts)
            return calls, Trace(t=t, layer=layer, counts=counts)
        rng = np.random.default_rng(seed)
        weights = np.arange(1, self.experts + 1, dtype=np.float64) ** -self.zipf
        perms: dict[tuple[int, int], np.ndarray] = {}
        for i in range(self.calls):
            key = (int(t[i] // self.shift_s), int(layer[i]))
            if key not in perms:
                perms[key] = rng.permutation(self.experts)
            w = np.empty(self.experts)
            w[perms[key]] = weights  # rank r -> expert perm[r]
            keys = np.log(w)[None, :] + rng.gumbel(size=(self.tokens, self.experts))
            choices = np.argsort(-keys, axis=1)[:, :TOP_K]  # K distinct experts a token (Gumbel top-k)
            calls.append((int(layer[i]), choices))
            counts[i] = np.bincount(choices.ravel(), minlength=self.experts)
        return calls, Trace(t=t, layer=layer, counts=counts)


SCENARIOS = {
    "hot-start": Scenario(
        "hot-start", 512, 4096, 8, 1, 512, 600, hot_pairs=((0, 1),),
        description="core-ownership traffic: 512-token calls, both top-2 experts (0, 1) start on worker-0"),
    "shifting": Scenario(
        "shifting", 512, 4096, 8, 1, 512, 800, hot_pairs=((0, 1), (4, 5), (2, 3), (6, 7)),
        description="the hot pair moves every quarter of the trace: (0,1) (4,5) (2,3) (6,7), each starting on one worker"),
    "zipf": Scenario(
        "zipf", 512, 1536, 16, 2, 64, 1600, zipf=1.2, shift_s=10.0,
        description="Zipf 1.2 over 16 experts, 2 layers, 64-token calls, hot set redrawn every 10 s of trace"),
}


# --------------------------------------------------------------------------- the measured world
def logits_for(choices: np.ndarray, experts: int) -> torch.Tensor:
    """Router logits [T, E] whose top-k is exactly ``choices`` [T, K]."""
    logits = torch.full((choices.shape[0], experts), -8.0)
    logits.scatter_(1, torch.from_numpy(choices), 8.0)
    return logits


def fleet_meter(fleet, redis, controller: bool) -> CpuMeter:
    import ray

    groups = {d: s["pid"] for d, s in fleet.worker_stats().items()}
    groups["router"] = fleet.router_stats()[0]["pid"]
    groups["clients (this process)"] = os.getpid()
    if redis.pid:
        groups["redis"] = redis.pid
    if controller and fleet.controller is not None:
        groups["controller"] = ray.get(fleet.controller.pid.remote())
    return CpuMeter(groups)


def worker_names(cpu: dict[str, float]) -> list[str]:
    return sorted(k for k in cpu if k.startswith("worker-"))


def calibrate(fleet, meter: CpuMeter, scn: Scenario, clients: int, seconds: float, rounds: int = 2) -> list[dict]:
    """Phases on the static fleet: idle, then ``rounds`` times in turn: calls on two experts of one worker; on one
    expert of each worker; half the tokens on two experts of one worker, half on two of the other.

    Each records wall seconds, calls, expert rows per worker per call, CPU seconds per process group, and the
    machine's other tenants' CPU (``others``).
    """
    layer = 0
    held = {d: sorted(e for (lay, e) in keys if lay == layer) for d, keys in fleet.placement.assignments.items()}
    w0, w1 = held["worker-0"], held["worker-1"]
    half = scn.tokens // 2
    split = np.array([[w0[0], w0[1]]] * half + [[w1[0], w1[1]]] * (scn.tokens - half))
    shapes = {"one worker": (np.tile([w0[0], w0[1]], (scn.tokens, 1)), {"worker-0": [scn.tokens, scn.tokens]}),
              "two workers": (np.tile([w0[0], w1[0]], (scn.tokens, 1)), {"worker-0": [scn.tokens], "worker-1": [scn.tokens]}),
              "halves": (split, {"worker-0": [half, half], "worker-1": [scn.tokens - half] * 2})}
    phases = []
    before, t0 = meter.snapshot(), time.monotonic()
    time.sleep(seconds)
    after = meter.snapshot()
    cpu = meter.used(before, after)
    phases.append({"phase": "idle", "wall_s": time.monotonic() - t0, "calls": 0, "worker_rows": {}, "cpu": cpu,
                   "others": meter.others(before, after, cpu)})
    for _ in range(rounds):
        for name, (choices, rows) in shapes.items():
            logits = logits_for(choices, scn.experts)
            runner = ClosedLoopClients(fleet.address, clients, scn.tokens, scn.hidden, timeout_s=120)
            box = {}
            th = threading.Thread(target=lambda: box.update(runner.run(lambda i: (layer, logits), stop_after_s=seconds + 1.5)))
            th.start()
            time.sleep(1.0)  # warm: every client in its loop
            before, t0 = meter.snapshot(), time.monotonic()
            time.sleep(seconds)
            after, t1 = meter.snapshot(), time.monotonic()
            th.join()
            calls = sum(1 for _, _, e in box["done"] if t0 <= e <= t1)
            cpu = meter.used(before, after)
            phases.append({"phase": name, "wall_s": t1 - t0, "calls": calls, "worker_rows": rows, "cpu": cpu,
                           "others": meter.others(before, after, cpu), "failed": len(box["failed"])})
    for p in phases:
        print(f"  calibration {p['phase']:11s}: {p['calls'] / p['wall_s']:5.1f} calls/s; cores "
              + ", ".join(f"{k} {v / p['wall_s']:.2f}" for k, v in {**p["cpu"], **p["others"]}.items() if v / p["wall_s"] >= 0.005),
              flush=True)
    return phases


def watch_placement(store, stop: threading.Event, log: list, start: float) -> None:
    """Record (seconds since start, version, {worker: [[layer, expert], ...]}) whenever the placement changes."""
    last = None
    while not stop.wait(0.2):
        p = store.get_placement()
        if p is not None and p.version != last:
            last = p.version
            log.append((time.monotonic() - start, p.version, {d: sorted(map(list, k)) for d, k in p.assignments.items()}))


def measure_once(scn: Scenario, path: str, redis, args, requests) -> dict:
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.state import StateStore
    from moefleet.local import LocalFleet

    out: dict = {}
    for mode in ("static", "elastic"):
        cfg = FleetConfig(checkpoint=path, num_workers=2, redis_url=redis.url, static=mode == "static",
                          namespace=f"reality-{scn.name}-{mode}-{uuid.uuid4().hex[:6]}",
                          router=RouterConfig(batch_window_ms=0, telemetry_interval_s=0.25))
        fleet = LocalFleet(cfg)
        fleet.start()
        try:
            meter = fleet_meter(fleet, redis, controller=mode == "elastic")
            if mode == "static":
                out["devices"] = [d.model_dump(mode="json") for d in fleet.devices]
                out["placement"] = fleet.placement.model_dump(mode="json")
                out["controller_config"] = fleet.controller_config().model_dump(mode="json")
                out["calibration"] = calibrate(fleet, meter, scn, args.clients, args.calib_s)
            store = StateStore(redis.url, namespace=cfg.namespace)
            stop, placements = threading.Event(), []
            start = time.monotonic()
            watcher = threading.Thread(target=watch_placement, args=(store, stop, placements, start), daemon=True)
            watcher.start()
            before = meter.snapshot()
            run = ClosedLoopClients(fleet.address, args.clients, scn.tokens, scn.hidden, timeout_s=120).run(requests)
            after = meter.snapshot()
            cpu = meter.used(before, after)
            others = meter.others(before, after, cpu)
            stop.set()
            watcher.join()
        finally:
            fleet.stop()
        makespan = run["makespan_s"]
        done = sorted(e - run["start"] for _, _, e in run["done"])
        out[mode] = {
            "tokens_per_s": len(run["done"]) * scn.tokens / scn.layers / makespan, "makespan_s": makespan,
            "calls": len(run["done"]), "failed": len(run["failed"]),
            "cpu_s": cpu, "cpu_cores": {k: v / makespan for k, v in cpu.items()},
            "others_cores": {k: v / makespan for k, v in others.items()},
            "completions_s": [round(x, 4) for x in done], "placements": placements,
        }
        cores = ", ".join(f"{k} {v:.2f}" for k, v in {**out[mode]["cpu_cores"], **out[mode]["others_cores"]}.items()
                          if v >= 0.005)
        print(f"  measured {mode}: {out[mode]['tokens_per_s']:,.0f} tokens/s over {makespan:.1f} s, "
              f"{run['failed']} failed; cores used: {cores}", flush=True)
    return out


def measure(scenarios: list[Scenario], args) -> dict:
    import ray

    from moefleet.controller.sim import calibrate_cpu
    from moefleet.core.redis_server import RedisServer

    kernel = {s.name: asdict(calibrate_cpu(s.hidden, s.ffn, rows=s.tokens // 2)) for s in scenarios}  # before Ray starts
    out = {"args": vars(args), "kernel": kernel, "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        redis = RedisServer()
        try:
            for scn in scenarios:
                path = str(write_mixtral_checkpoint(Path(tmp) / scn.name, hidden=scn.hidden, ffn=scn.ffn,
                                                    experts=scn.experts, top_k=TOP_K, layers=scn.layers))
                calls, _ = scn.make()
                cache: dict[bytes, torch.Tensor] = {}
                requests = []
                for layer, choices in calls:  # identical lines share one logits tensor
                    key = choices.tobytes()
                    if key not in cache:
                        cache[key] = logits_for(choices, scn.experts)
                    requests.append((layer, cache[key]))
                runs = []
                for r in range(args.repeats):
                    print(f"{scn.name}: repeat {r + 1} of {args.repeats}", flush=True)
                    runs.append(measure_once(scn, path, redis, args, requests))
                out["scenarios"][scn.name] = {"scenario": asdict(scn), "runs": runs}
        finally:
            ray.shutdown()
            redis.stop()
    return out


# --------------------------------------------------------------------------- the predicted world
def predict(scn: Scenario, run: dict, kernel: dict, clients: int) -> dict:
    """The simulator's elastic and static runs of the scenario's trace, costs fitted from ``run['calibration']``."""
    from moefleet.controller.main import ControllerConfig
    from moefleet.controller.sim import CpuCalibration, PhaseCpu, SimConfig, fit_local_costs, local_devices, simulate
    from moefleet.core.placement import DeviceSpec, Placement

    cal = CpuCalibration(**kernel)
    phases = [PhaseCpu.from_processes(p["wall_s"], p["calls"], p["worker_rows"], p["cpu"], p.get("others", {}).get("other", 0.0))
              for p in run["calibration"]]
    costs = fit_local_costs(phases, cal)
    specs = [DeviceSpec(**d) for d in run["devices"]]
    devices = local_devices(len(specs), cal, memory_bytes=specs[0].memory_bytes, costs=costs)
    ctl = ControllerConfig(**run["controller_config"])
    config = SimConfig(controller=ctl, mode="closed", concurrency=clients, top_k=TOP_K, host_cpu=costs.host_cpu())
    _, trace = scn.make()
    start = Placement(**run["placement"])
    expert_bytes = 3 * scn.hidden * scn.ffn * 4
    runs = {mode: simulate(trace, devices, expert_bytes=expert_bytes, config=config, elastic=mode == "elastic",
                           initial=start) for mode in ("static", "elastic")}
    return {"costs": asdict(costs), "static": runs["static"].to_dict(timeline=False),
            "elastic": runs["elastic"].to_dict(timeline=False),
            "ratio": runs["elastic"].tokens_per_s / runs["static"].tokens_per_s,
            "applied_at_s": [r["applied_at"] - float(trace.t[0]) for r in runs["elastic"].reports if "applied_at" in r]}


def compare_all(measured: dict) -> dict:
    """Per scenario and repeat: measured and predicted ratios and the relative error."""
    out = {}
    clients = measured["args"]["clients"]
    for name, block in measured["scenarios"].items():
        scn = Scenario(**{k: tuple(map(tuple, v)) if k == "hot_pairs" else v for k, v in block["scenario"].items()})
        rows = []
        for run in block["runs"]:
            p = predict(scn, run, measured["kernel"][name], clients)
            m = run["elastic"]["tokens_per_s"] / run["static"]["tokens_per_s"]
            rows.append({"measured_ratio": m, "predicted_ratio": p["ratio"], "error": abs(p["ratio"] / m - 1),
                         "measured": {k: run[k]["tokens_per_s"] for k in ("static", "elastic")},
                         "predicted": {k: p[k]["tokens_per_s"] for k in ("static", "elastic")},
                         "failed": run["static"]["failed"] + run["elastic"]["failed"], "model": p})
            c = p["costs"]
            first_real = next((t for t, v, _ in run["elastic"]["placements"] if v > 1), None)
            first_sim = p["applied_at_s"][0] if p["applied_at_s"] else None
            print(f"{name}: fitted worker {1000 * c['worker_call_s']:.1f} ms/call + {1e6 * c['worker_row_out_s']:.1f} us/row "
                  f"returned, FFN x{c['kernel_factor']:.2f}; host {1000 * c['host_call_s']:.1f} ms/call + "
                  f"{1000 * c['host_worker_call_s']:.1f} ms/worker call + {1e6 * c['host_row_out_s']:.1f} us/row returned, "
                  f"background {c['background_cores']:.2f} + other {c['other_cores']:.2f} cores; first re-placement "
                  f"measured {first_real and round(first_real, 2)} s, simulated {first_sim and round(first_sim, 2)} s", flush=True)
            print(f"{name}: elastic/static measured {m:.3f}, predicted {p['ratio']:.3f} "
                  f"(error {rows[-1]['error']:.1%}); tokens/s static {run['static']['tokens_per_s']:,.0f} vs "
                  f"{p['static']['tokens_per_s']:,.0f}, elastic {run['elastic']['tokens_per_s']:,.0f} vs "
                  f"{p['elastic']['tokens_per_s']:,.0f}", flush=True)
        out[name] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="hot-start,shifting", help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--repeats", type=int, default=3, help="static + elastic runs per scenario (ratios' spread)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--calib-s", type=float, default=5.0, help="seconds of each calibration phase")
    ap.add_argument("--calls", type=int, help="trace lines per scenario (default: each scenario's own)")
    ap.add_argument("--quick", action="store_true", help="one repeat, a third of the lines")
    ap.add_argument("--predict-from", help="a measured JSON written by an earlier run: redo only the prediction")
    ap.add_argument("--no-write", action="store_true", help="print, do not write benchmarks/results/sim_reality.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.predict_from:
        measured = json.loads(Path(args.predict_from).read_text())
    else:
        names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown or not names:
            ap.error(f"--scenarios: unknown {unknown} (known: {', '.join(SCENARIOS)})")
        if args.quick:
            args.repeats = 1
        scenarios = []
        for n in names:
            calls = args.calls or (SCENARIOS[n].calls // 3 if args.quick else SCENARIOS[n].calls)
            scenarios.append(Scenario(**{**asdict(SCENARIOS[n]), "calls": calls}))
        measured = measure(scenarios, args)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        raw = OUT_DIR / "sim_reality_measured.json"
        raw.write_text(json.dumps(measured))
        print(f"wrote {raw}")
    compared = compare_all(measured)
    if args.no_write:
        return
    figures, goals = {}, []
    for name, rows in compared.items():
        figures[f"{name}: measured elastic / static"] = spread([r["measured_ratio"] for r in rows], "x")
        figures[f"{name}: predicted elastic / static"] = spread([r["predicted_ratio"] for r in rows], "x")
        figures[f"{name}: relative error"] = spread([100 * r["error"] for r in rows], "%")
        for mode in ("static", "elastic"):
            figures[f"{name}: measured {mode} tokens/s"] = spread([r["measured"][mode] for r in rows], "tokens/s")
            figures[f"{name}: predicted {mode} tokens/s"] = spread([r["predicted"][mode] for r in rows], "tokens/s")
        desc = measured["scenarios"][name]["scenario"]["description"]
        goals.append(goal(f"{name}: predicted elastic/static within 20% of measured (every repeat)",
                          max(r["error"] for r in rows), "<=", 0.2, description=f"2 workers owning one core each, "
                          f"{measured['args']['clients']} clients; {desc}"))
    goals.append(goal("no failed request", sum(r["failed"] for rows in compared.values() for r in rows), "==", 0,
                      unit="requests"))
    a = measured["args"]
    flags = f"--scenarios {','.join(compared)} --repeats {a['repeats']} --clients {a['clients']} --calib-s {a['calib_s']:g}"
    if a.get("calls"):
        flags += f" --calls {a['calls']}"
    write_result("sim_reality", title="Simulator vs a measured local fleet",
                 question="Does the simulator predict the local fleet's elastic/static throughput ratio within 20%?",
                 command=f"python benchmarks/bench_sim_reality.py {flags}", figures=figures, goals=goals,
                 details={"compared": {n: [{k: v for k, v in r.items() if k != "model"} | {
                     "costs": r["model"]["costs"],
                     "predicted_runs": {m: {k: r["model"][m][k] for k in ("tokens_per_s", "makespan_s", "plans_applied",
                                                                           "copies", "max_over_mean")}
                                        for m in ("static", "elastic")}} for r in rows] for n, rows in compared.items()},
                          "measured_cpu_cores": {n: [{m: run[m]["cpu_cores"] for m in ("static", "elastic")}
                                                     for run in measured["scenarios"][n]["runs"]] for n in compared},
                          "calibration": {n: [run["calibration"] for run in measured["scenarios"][n]["runs"]]
                                          for n in compared},
                          "kernel": measured["kernel"]},
                 elapsed_s=time.perf_counter() - t_start if not args.predict_from else None)


if __name__ == "__main__":
    main()
