"""Chaos under steady load: what a client sees when any part of the fleet fails.

    python benchmarks/bench_chaos.py [--only NAME ...] [--quick] [--out FILE]

Each scenario starts a local fleet with its controller (the default) on a
small Mixtral-like model, runs steady client traffic (every answer compared
with the in-process layer), injects one fault by signal or command to the
process the fleet reports, and accounts for every request:

* failed: answered with an error status;
* wrong: answered with an output that differs from the in-process layer;
* lost: accepted and never answered (the client's own deadline fired, or the
  call was still open when the scenario ended);
* time to full service: from the fault until the end of the last request that
  failed, was lost or took longer than ``--slow-s`` (0 when none did).

Scenarios:
  worker_sigkill          3 workers, min_replicas 1: a worker SIGKILLed
  worker_sigkill_min2     3 workers, min_replicas 2: a worker SIGKILLed
  worker_sigstop_5s       3 workers, min_replicas 2: a worker SIGSTOPped for 5 s, then continued
  router_sigkill          the router actor's process SIGKILLed (Ray restarts it on the same port)
  controller_sigkill      the controller's process SIGKILLed while a rebalance loads weights
  worker_sigkill_transfer 3 workers, min_replicas 2: a worker SIGKILLed while weights are copied onto it
  redis_flushall          Redis FLUSHALL (placement, lease, registry and load windows gone at once)
  redis_restart           redis-server SIGKILLed (local mode starts it again, empty)
  clock_skew_10s          the controller runs 10 s ahead (libfaketime) while hot experts move and a worker dies

Goals (the project's issue on faults): 0 wrong and 0 lost in every scenario;
0 failed in the worker-level scenarios with min_replicas 2 (the stall's goal,
and its p99 of 1 s for requests started during the stall, need the router to
hedge around a stalled worker); with min_replicas 1, full service back within
3 s of a worker's SIGKILL and no failed request whose experts had a live replica.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, single, write_json, write_mixtral_checkpoint, write_result  # noqa: E402
from traffic import aimed_hidden  # noqa: E402

EXPERTS = 8
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
CLIENT_DEADLINE_MESSAGE = "Deadline Exceeded"  # what gRPC says when the client's own deadline fires


# --------------------------------------------------------------------------- steady load, every request accounted


@dataclass
class Call:
    start: float
    end: float | None = None
    code: str | None = None  # None: answered
    message: str = ""
    experts: frozenset = frozenset()  # (layer, expert) pairs the request routes to
    wrong: bool = False


@dataclass
class Load:
    """Client threads sending layer calls aimed at ``hot_at(t)``'s experts; every answer checked, every call kept.

    A client that gets an error waits ``backoff_s`` before its next call (as a real client would), so the count of
    failed requests measures an outage's length, not how fast a loop can spin on a refusing port.
    """

    address: str
    model: object
    hot_at: object = None
    clients: int = 3
    tokens: int = 32
    timeout_s: float = 20.0
    backoff_s: float = 0.05
    calls: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        self._expected: dict = {}
        self.t0 = time.time()

    def _sample(self, layer: int, hot: tuple, i: int, g) -> tuple:
        key = (layer, hot, i)
        if key not in self._expected:
            gate = self.model.layer(layer).gate.weight.float()
            hidden = aimed_hidden(gate, self.tokens, list(hot), g)
            out, routing = self.model.layer(layer)(hidden, return_routing=True)
            experts = frozenset((layer, int(e)) for e in routing.topk_ids.unique().tolist() if e >= 0)
            self._expected[key] = (hidden, out, experts)
        return self._expected[key]

    def _run(self, seed: int) -> None:
        from moefleet.router_service.client import FleetClient, FleetError

        g = torch.Generator().manual_seed(seed)
        layers = list(self.model.moe_layers)
        client = FleetClient(self.address, timeout=self.timeout_s)
        i = 0
        while not self._stop.is_set():
            layer = layers[i % len(layers)]
            hot = tuple(self.hot_at(time.time() - self.t0)) if self.hot_at else tuple(range(EXPERTS))
            with self._lock:
                hidden, want, experts = self._sample(layer, hot, i % 8, g)
            i += 1
            call = Call(start=time.time(), experts=experts)
            with self._lock:
                self.calls.append(call)
            try:
                out = client.forward(layer, hidden)
                call.wrong = bool((out - want).abs().max().item() > 1e-4)
            except FleetError as e:
                call.code, call.message = e.code.name, e.message
            call.end = time.time()
            if call.code is not None:
                self._stop.wait(self.backoff_s)
        client.close()

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop sending; wait for every open call to end (answered, failed, or its client deadline)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 10)

    def answered(self, since: float = 0.0) -> int:
        return sum(1 for c in list(self.calls) if c.end is not None and c.code is None and c.start >= since)

    def summary(self, fault_at: float, slow_s: float, window: tuple[float, float] | None = None) -> dict:
        calls = list(self.calls)
        lost = [c for c in calls if c.end is None or (c.code == "DEADLINE_EXCEEDED" and c.message == CLIENT_DEADLINE_MESSAGE)]
        failed = [c for c in calls if c.end is not None and c.code is not None and c not in lost]
        wrong = [c for c in calls if c.wrong]
        slow = [c for c in calls if c.end is not None and c.code is None and c.end - c.start > slow_s]
        bad = [c for c in failed + lost + slow if (c.end or time.time()) >= fault_at]
        back = max(((c.end or time.time()) for c in bad), default=fault_at) - fault_at
        ok = [c.end - c.start for c in calls if c.end is not None and c.code is None]
        out = {
            "requests": len(calls), "answered": len(ok), "failed": len(failed), "wrong": len(wrong), "lost": len(lost),
            "slow": len(slow), "failed_codes": sorted({c.code for c in failed}),
            "failed_latency_ms_max": max(((c.end - c.start) * 1000 for c in failed), default=None),
            "full_service_back_s": max(0.0, back),
            "p50_ms": float(np.percentile(ok, 50) * 1000) if ok else None,
            "p99_ms": float(np.percentile(ok, 99) * 1000) if ok else None,
            "answered_after_fault": sum(1 for c in calls if c.start >= fault_at and c.code is None and c.end is not None),
        }
        if window is not None:
            during = [c for c in calls if window[0] <= c.start <= window[1]]
            lat = [(c.end or time.time()) - c.start for c in during]
            out.update(started_in_window=len(during), failed_in_window=sum(1 for c in during if c.code is not None),
                       p99_in_window_ms=float(np.percentile(lat, 99) * 1000) if lat else None)
        return out


# --------------------------------------------------------------------------- fleets and faults


def _fleet(path: str, **over):
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.state import StateStore
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient

    cfg = dict(checkpoint=path, num_workers=3, namespace=f"chaos-{uuid.uuid4().hex[:6]}",
               router=RouterConfig(telemetry_interval_s=0.25, metrics_port=None))
    cfg.update(over)
    fleet = LocalFleet(FleetConfig(**cfg))
    fleet.start()
    with FleetClient(fleet.address) as c:
        c.wait_ready(60)
    return fleet, StateStore(fleet.redis_url, namespace=fleet.config.namespace, socket_timeout_s=1.0)


def _wait(pred, timeout_s: float, step_s: float = 0.05):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            v = pred()
        except Exception:  # noqa: BLE001 - the store may be down mid-scenario: keep polling
            v = None
        if v:
            return v
        time.sleep(step_s)
    return None


def _replicated(store, n: int) -> bool:
    p = store.get_placement()
    return p is not None and len(p.replicas()) == 2 * EXPERTS and all(len(w) >= n for w in p.replicas().values())


def _worker_pid(fleet, device: str) -> int:
    import ray

    return ray.get(fleet.worker(device).stats.remote(), timeout=30)["pid"]


def _moving(period_s: float = 2.0):
    """Hot experts that move every ``period_s``: the controller keeps rebalancing."""
    def hot_at(t: float) -> list[int]:
        k = int(t // period_s)
        return [(2 * k) % EXPERTS, (2 * k + 1) % EXPERTS]
    return hot_at


@dataclass
class Scenario:
    name: str
    fleet: dict
    hot_moving: bool = False
    needs: str | None = None  # a tool the scenario needs (None: nothing beyond the fleet)


def _run(path, model, args, sc: Scenario, inject) -> dict:
    """Start the fleet, run the load, ``inject(fleet, store, load) -> (fault_at, info)``, account for every call."""
    fleet, store = _fleet(path, **sc.fleet)
    load = None
    try:
        if sc.fleet.get("min_replicas", 1) > 1 and not _wait(lambda: _replicated(store, sc.fleet["min_replicas"]), 60):
            raise RuntimeError("the controller did not replicate every expert in 60 s")
        load = Load(fleet.address, model, _moving() if sc.hot_moving else None, clients=args.clients, tokens=args.tokens,
                    timeout_s=args.client_timeout_s).start()
        time.sleep(args.before)
        fault_at, info = inject(fleet, store, load)
        time.sleep(args.after)
        load.stop()
        out = load.summary(fault_at, args.slow_s, info.pop("window", None))
        only_there = info.pop("_only_there", None)
        if only_there is not None:  # failed although every expert they needed had a replica on a live worker
            out["failed_needing_only_live_experts"] = sum(
                1 for c in load.calls if c.code is not None and c.start >= fault_at - args.slow_s and not (c.experts & only_there))
        out.update(info)
        return out
    finally:
        if load is not None:
            load.stop()
        fleet.stop()


def worker_sigkill(fleet, store, load, args):
    placement = store.get_placement()
    victim = "worker-1"
    only_there = {k for k, ws in placement.replicas().items() if ws == [victim]}
    pid = _worker_pid(fleet, victim)
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    repaired = _wait(lambda: victim not in store.get_placement().assignments, 60, 0.01)  # its experts re-placed
    repaired_at = time.time()
    back = _wait(lambda: store.workers().get(f"worker:{victim}", {}).get("pid") not in (None, pid), 60)  # a fresh worker
    return fault_at, {"victim": victim, "experts_only_on_victim": len(only_there),
                      "repaired_after_s": repaired_at - fault_at if repaired else None,
                      "fresh_worker_after_s": time.time() - fault_at if back else None, "_only_there": only_there}


def worker_sigstop(fleet, store, load, args):
    victim = "worker-1"
    pid = _worker_pid(fleet, victim)
    fault_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    time.sleep(args.stall_s)
    os.kill(pid, signal.SIGCONT)
    return fault_at, {"victim": victim, "stall_s": args.stall_s, "window": (fault_at, fault_at + args.stall_s)}


def router_sigkill(fleet, store, load, args):
    import ray

    pid = fleet.router_stats()[0]["pid"]
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)

    def serving_again():
        stats = ray.get(fleet.routers[0].stats.remote(), timeout=5)
        return stats["pid"] != pid and load.answered(time.time() - 0.5)

    back = _wait(serving_again, 60, 0.2)
    return fault_at, {"router_back_after_s": time.time() - fault_at if back else None}


def controller_sigkill(fleet, store, load, args):
    import ray

    first = _wait(lambda: store.lease(), 20)
    pid = ray.get(fleet.controller.pid.remote())
    phase = _wait(lambda: (store.get_record("rebalance") or {}).get("phase") == "loading", 60, 0.01)
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    new = _wait(lambda: (le := store.lease()) is not None and first is not None and le.token > first.token, 60)
    return fault_at, {"killed_while_loading": bool(phase), "new_leader_after_s": time.time() - fault_at if new else None}


def worker_sigkill_transfer(fleet, store, load, args):
    pids = {d: _worker_pid(fleet, d) for d in fleet.workers}
    rec = _wait(lambda: (r := store.get_record("rebalance") or {}).get("phase") == "loading" and r.get("devices") and r, 90, 0.005)
    if not rec:
        raise RuntimeError("no rebalance loaded weights within 90 s")
    victim = rec["devices"][0]
    fault_at = time.time()
    os.kill(pids[victim], signal.SIGKILL)
    repaired = _wait(lambda: store.workers().get(f"worker:{victim}", {}).get("pid") not in (None, pids[victim]), 60)
    return fault_at, {"victim": victim, "loads_in_flight": rec.get("loads"),
                      "worker_back_after_s": time.time() - fault_at if repaired else None}


def _redis_cli(fleet, *argv: str) -> None:
    env = dict(os.environ, REDISCLI_AUTH=fleet.redis.password or "")
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(fleet.redis.port), "--no-auth-warning", *argv],
                   env=env, check=True, capture_output=True, timeout=10)


def redis_flushall(fleet, store, load, args):
    gen = store.get_placement().generation
    fault_at = time.time()
    _redis_cli(fleet, "FLUSHALL")
    recovered = _wait(lambda: (p := store.get_placement()) is not None and p.generation != gen, 60)
    followed = recovered and _wait(lambda: all(r["placement_generation"] == store.get_placement().generation
                                              for r in fleet.router_stats()), 30)
    return fault_at, {"placement_republished_after_s": time.time() - fault_at if recovered else None,
                      "routers_followed": bool(followed)}


def redis_restart(fleet, store, load, args):
    gen = store.get_placement().generation
    pid = fleet.redis.pid
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    restarted = _wait(lambda: fleet.redis.pid != pid and fleet.redis.is_running(), 30)
    restarted_at = time.time()
    recovered = _wait(lambda: (p := store.get_placement()) is not None and p.generation != gen, 60)
    return fault_at, {"redis_back_after_s": restarted_at - fault_at if restarted else None,
                      "placement_republished_after_s": time.time() - fault_at if recovered else None}


def clock_skew(fleet, store, load, args):
    """The controller is replaced by one whose process runs 10 s ahead (libfaketime); then a worker dies under it."""
    import ray

    from moefleet.controller.main import controller_actor_class
    from moefleet.local import CONTROLLER_NAME

    ray.kill(fleet.controller, no_restart=True)  # its lease lapses; the skewed controller takes it
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"+{args.skew_s:g}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    cfg = fleet.controller_config()
    fleet.controller = controller_actor_class().options(
        name=CONTROLLER_NAME, namespace=fleet.config.namespace, runtime_env={"env_vars": env}
    ).remote(cfg.model_dump(mode="json"), f"skewed-{uuid.uuid4().hex[:6]}")
    skew = ray.get(fleet.controller.wall_clock.remote(), timeout=60) - time.time()
    _wait(lambda: (le := store.lease()) is not None and le.holder.startswith("skewed"), 30)
    time.sleep(args.before)
    rebalances_before = sum(e.kind == "rebalance" for e in store.events(500))
    victim = "worker-1"
    pid = _worker_pid(fleet, victim)
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    repaired = _wait(lambda: victim not in store.get_placement().assignments, 60, 0.01)
    time.sleep(args.after)
    events = store.events(500)
    drains = [e.data.get("drained") for e in events if e.kind == "rebalance"]
    return fault_at, {"controller_clock_ahead_s": skew, "repaired_after_s": time.time() - fault_at if repaired else None,
                      "rebalances": len(drains) - rebalances_before, "rebalances_not_drained": drains.count(False),
                      "worker_down_events": sum(e.kind == "worker_down" for e in events)}


SCENARIOS = {
    "worker_sigkill": (Scenario("worker_sigkill", dict(min_replicas=1)), worker_sigkill),
    "worker_sigkill_min2": (Scenario("worker_sigkill_min2", dict(min_replicas=2)), worker_sigkill),
    "worker_sigstop_5s": (Scenario("worker_sigstop_5s", dict(min_replicas=2)), worker_sigstop),
    "router_sigkill": (Scenario("router_sigkill", dict(min_replicas=2)), router_sigkill),
    "controller_sigkill": (Scenario("controller_sigkill", dict(min_replicas=2), hot_moving=True), controller_sigkill),
    "worker_sigkill_transfer": (Scenario("worker_sigkill_transfer", dict(min_replicas=2), hot_moving=True),
                                worker_sigkill_transfer),
    "redis_flushall": (Scenario("redis_flushall", dict(min_replicas=2)), redis_flushall),
    "redis_restart": (Scenario("redis_restart", dict(min_replicas=2)), redis_restart),
    "clock_skew_10s": (Scenario("clock_skew_10s", dict(min_replicas=2), hot_moving=True, needs="libfaketime"), clock_skew),
}
WORKER_LEVEL = ("worker_sigkill_min2", "worker_sigstop_5s", "worker_sigkill_transfer", "clock_skew_10s")


def run_scenario(name: str, path: str, model, args) -> dict:
    sc, inject = SCENARIOS[name]
    if sc.needs == "libfaketime" and not Path(LIBFAKETIME).is_file():
        return {"not_run": f"needs libfaketime ({LIBFAKETIME}; apt-get install libfaketime)"}
    if name == "redis_flushall" and shutil.which("redis-cli") is None:
        return {"not_run": "needs redis-cli"}
    return _run(path, model, args, sc, lambda fleet, store, load: inject(fleet, store, load, args))


def checkpoint(tmp: str, hidden: int = 512, ffn: int = 1536) -> str:
    return str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=hidden, ffn=ffn, experts=EXPERTS, top_k=2, layers=2))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS))
    ap.add_argument("--before", type=float, default=5, help="seconds of load before the fault")
    ap.add_argument("--after", type=float, default=8, help="seconds of load after the fault's handling")
    ap.add_argument("--stall-s", type=float, default=5.0, help="how long the stalled worker stays stopped")
    ap.add_argument("--skew-s", type=float, default=10.0, help="how far ahead the skewed controller's clock runs")
    ap.add_argument("--slow-s", type=float, default=1.0, help="an answer slower than this is not full service")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--client-timeout-s", type=float, default=20.0, help="the clients' deadline: a call past it is lost")
    ap.add_argument("--quick", action="store_true", help="shorter windows (a smoke run)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.quick:
        args.before, args.after = 3, 4
    return args


def main() -> None:
    args = parse_args()
    import ray

    from moefleet import MoEModel

    results = {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(tmp)
        model = MoEModel.from_pretrained(path, backend="torch")
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            for name in args.only or SCENARIOS:
                try:
                    results[name] = run_scenario(name, path, model, args)
                except Exception as e:  # noqa: BLE001 - reported as the scenario's result, the others still run
                    results[name] = {"error": f"{type(e).__name__}: {e}"}
                print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[name].items()}, flush=True)
        finally:
            ray.shutdown()
    write_json("chaos", {"args": vars(args), **results}, args.out)
    _write_schema(results, args, time.time() - t_start)


def _write_schema(results: dict, args, elapsed: float) -> None:
    figures, goals = {}, []
    for name, r in results.items():
        if "not_run" in r or "error" in r:
            continue
        for key, unit in (("requests", ""), ("failed", ""), ("wrong", ""), ("lost", ""), ("full_service_back_s", "s"),
                          ("p99_in_window_ms", "ms"), ("failed_needing_only_live_experts", "")):
            if r.get(key) is not None:
                figures[f"{name}: {key}"] = single(r[key], unit)
    for name, r in results.items():
        if "not_run" in r or "error" in r:
            why = r.get("not_run") or r.get("error")
            goals.append(goal(f"{name}: 0 wrong, 0 lost", None, "==", 0, note=why))
            continue
        goals.append(goal(f"{name}: 0 wrong", r["wrong"], "==", 0, unit="requests"))
        goals.append(goal(f"{name}: 0 lost", r["lost"], "==", 0, unit="requests"))
    for name in WORKER_LEVEL:
        r = results.get(name)
        if r and "failed" in r:
            goals.append(goal(f"{name}: 0 failed (min_replicas 2)", r["failed"], "==", 0, unit="requests"))
    r = results.get("worker_sigstop_5s")
    if r and "p99_in_window_ms" in r:
        goals.append(goal("worker_sigstop_5s: p99 of requests started during the stall", r["p99_in_window_ms"], "<=", 1000,
                          unit="ms"))
    r = results.get("worker_sigkill")
    if r and "failed" in r:
        goals.append(goal("worker_sigkill (min_replicas 1): full service back", r["full_service_back_s"], "<=", 3, unit="s"))
        goals.append(goal("worker_sigkill (min_replicas 1): no failed request whose experts had a live replica",
                          r.get("failed_needing_only_live_experts"), "==", 0, unit="requests"))
    flags = f"--before {args.before:g} --after {args.after:g} --clients {args.clients} --tokens {args.tokens}"
    write_result("chaos", title="Chaos under steady load",
                 question="Under steady load, what does a client see when a worker, the router, the controller or Redis "
                          "fails, or a clock is off: failed, wrong and lost requests, and time to full service?",
                 command=f"python benchmarks/bench_chaos.py {flags}", figures=figures, goals=goals, details=results,
                 elapsed_s=elapsed)


if __name__ == "__main__":
    main()
