"""Faults under load: a worker SIGKILLed, Redis unreachable and killed, the controller killed mid-rebalance.

    python benchmarks/bench_faults.py [--only NAME ...] [--out FILE]

Each scenario starts a local fleet with its controller (the default) on a
small Mixtral-like model, runs client traffic, injects the fault by signal to
the process the fleet reports, and reads what the fleet did from its own
events. Reported per scenario: failed requests and how fast each failed, the
seconds until full service was back, and the checks of every 10th answer
against the in-process layer.

Scenarios (goals from the project's issue on self-healing):
  worker_kill        3 workers, one replica per expert: full service back within 10 s,
                     each failed request failed fast (UNAVAILABLE, well under a second)
  worker_kill_min2   2 workers, min_replicas=2: 0 failed
  redis_outage       redis-server paused (SIGSTOP) for 10 s, then killed (local mode starts
                     it again, empty): 0 failed; placement republished and telemetry resumed
  controller_kill    the controller's process killed while a rebalance is in progress:
                     0 failed, a new leader within the lease time, no expert ever without a replica
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, single, write_result, write_json, write_mixtral_checkpoint  # noqa: E402
from traffic import Traffic  # noqa: E402

EXPERTS = 8


def _fleet(path, **over):
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.state import StateStore
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient

    cfg = dict(checkpoint=path, num_workers=3, namespace=f"faults-{uuid.uuid4().hex[:6]}", router=RouterConfig(telemetry_interval_s=0.25))
    cfg.update(over)
    fleet = LocalFleet(FleetConfig(**cfg))
    fleet.start()
    with FleetClient(fleet.address) as c:
        c.wait_ready(60)
    return fleet, StateStore(fleet.redis_url, namespace=fleet.config.namespace, socket_timeout_s=1.0)


def _wait(pred, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return pred()


def _summary(traffic: Traffic, fault_at: float) -> dict:
    failed = traffic.failed()
    lat = [b - a for a, b, _ in failed]
    after = [a for a, b, e in traffic.log if a >= fault_at]
    last_fail = max((a for a, _, _ in failed), default=None)
    back = None if last_fail is None else last_fail - fault_at
    return {
        "requests": len(traffic.log), "failed": len(failed), "failed_codes": sorted({e for _, _, e in failed}),
        "failed_latency_ms_p50": float(np.median(lat) * 1000) if lat else None,
        "failed_latency_ms_max": float(max(lat) * 1000) if lat else None,
        "full_service_back_after_s": 0.0 if back is None else back, "requests_after_fault": len(after),
        "max_abs_error_vs_in_process": traffic.max_abs_error, "wrong_outputs": traffic.wrong,
    }


def worker_kill(path, model, args, min_replicas=1, workers=3):
    import ray

    fleet, store = _fleet(path, num_workers=workers, min_replicas=min_replicas)
    if min_replicas > 1:
        _wait(lambda: all(len(w) >= min_replicas for w in store.get_placement().replicas().values()), 30)
    traffic = Traffic(fleet.address, model, lambda t: list(range(EXPERTS)), clients=args.clients, tokens=args.tokens).start()
    time.sleep(args.before)
    victim = "worker-1" if workers > 2 else "worker-0"
    pid = ray.get(fleet.worker(victim).stats.remote())["pid"]
    skew = store.time() - time.time()
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: f"worker:{victim}" in store.workers() and any(e.kind == "worker_restart" for e in store.events(300)), 60)
    back_at = time.time()
    time.sleep(args.after)
    traffic.stop()
    events = {e.kind: e.at - skew - fault_at for e in reversed(store.events(500)) if e.at - skew >= fault_at}
    fleet.stop()
    out = _summary(traffic, fault_at)
    out.update(victim=victim, min_replicas=min_replicas, workers=workers,
               noticed_after_s=events.get("worker_down"), repaired_after_s=events.get("placement"),
               fresh_worker_heartbeating_after_s=back_at - fault_at)
    return out


def redis_outage(path, model, args):
    fleet, store = _fleet(path)
    gen0 = store.get_placement().generation
    traffic = Traffic(fleet.address, model, lambda t: list(range(EXPERTS)), clients=args.clients, tokens=args.tokens).start()
    time.sleep(args.before)
    pid = fleet.redis.pid
    paused_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    time.sleep(args.outage)
    os.kill(pid, signal.SIGCONT)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    restarted = _wait(lambda: fleet.redis.pid != pid and fleet.redis.is_running(), 30) and time.time()
    recovered = _wait(lambda: (p := store.get_placement()) is not None and p.generation != gen0, 30) and time.time()
    gen = store.get_placement().generation
    followed = _wait(lambda: all(r["placement_generation"] == gen for r in fleet.router_stats()), 30) and time.time()
    telemetry = _wait(lambda: sum(store.read_load(None, 1.0, 3, 1e9).values()) > 0, 30) and time.time()
    time.sleep(args.after)
    traffic.stop()
    fleet.stop()
    out = _summary(traffic, paused_at)
    out.update(
        outage_s=args.outage,
        failed_during_outage=len(traffic.failed(paused_at, killed_at)),
        redis_restarted_after_kill_s=restarted - killed_at if restarted else None,
        placement_republished_after_kill_s=recovered - killed_at if recovered else None,
        routers_followed_after_kill_s=followed - killed_at if followed else None,
        telemetry_resumed_after_kill_s=telemetry - killed_at if telemetry else None,
    )
    return out


def controller_kill(path, model, args):
    import ray

    fleet, store = _fleet(path, num_workers=2)
    every = {(layer, e) for layer in model.moe_layers for e in range(EXPERTS)}
    missing: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if set(store.get_placement().replicas()) != every:
                missing.append(store.get_placement().version)
            time.sleep(0.02)

    def hot_at(t):
        k = int(t // 2)
        return [(2 * k) % EXPERTS, (2 * k + 1) % EXPERTS]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    traffic = Traffic(fleet.address, model, hot_at, clients=args.clients, tokens=args.tokens).start()
    _wait(lambda: store.lease(), 20)
    first = store.lease()
    pid = ray.get(fleet.controller.pid.remote())
    phase = _wait(lambda: (store.get_record("rebalance") or {}).get("phase"), 60)  # a rebalance is under way
    fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    new_leader = _wait(lambda: (le := store.lease()) is not None and le.token > first.token, 60) and time.time()
    resumed = _wait(lambda: [e.data for e in store.events(500) if e.kind == "rebalance_resumed"], 30)
    time.sleep(args.after)
    traffic.stop()
    stop.set()
    watcher.join(timeout=5)
    fleet.stop()
    out = _summary(traffic, fault_at)
    out.update(killed_in_phase=phase, new_leader_after_s=new_leader - fault_at if new_leader else None,
               next_leader_action=resumed[0]["action"] if resumed else None,
               placements_missing_an_expert=len(missing))
    return out


SCENARIOS = {
    "worker_kill": worker_kill,
    "worker_kill_min2": lambda path, model, args: worker_kill(path, model, args, min_replicas=2, workers=2),
    "redis_outage": redis_outage,
    "controller_kill": controller_kill,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS))
    ap.add_argument("--before", type=float, default=6, help="seconds of traffic before the fault")
    ap.add_argument("--after", type=float, default=6, help="seconds of traffic after recovery")
    ap.add_argument("--outage", type=float, default=10, help="seconds redis-server stays paused")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    from moefleet import MoEModel

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=512, ffn=1536, experts=EXPERTS, top_k=2, layers=2))
        model = MoEModel.from_pretrained(path, backend="torch")
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            for name in args.only or SCENARIOS:
                results[name] = SCENARIOS[name](path, model, args)
                print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[name].items()}, flush=True)
        finally:
            ray.shutdown()
    write_json("faults", {"args": vars(args), **results}, args.out)
    _write_schema(results, args)


def _write_schema(results: dict, args) -> None:
    """benchmarks/results/faults.json in the common schema: the reliability table, one goal per scenario's promise."""
    figures, goals = {}, []
    for name, r in results.items():
        for key in ("requests", "failed", "failed_latency_ms_max", "full_service_back_after_s", "new_leader_after_s",
                    "placement_republished_after_kill_s", "telemetry_resumed_after_kill_s", "repaired_after_s"):
            if r.get(key) is not None:
                figures[f"{name}: {key}"] = single(r[key], "s" if key.endswith("_s") else ("ms" if key.endswith("_ms_max") else ""))
        goals.append(goal(f"{name}: answers equal the in-process layer", r.get("wrong_outputs"), "==", 0, unit="wrong"))
    if "worker_kill" in results:
        r = results["worker_kill"]
        goals.append(goal("worker_kill: full service back within 10 s", r["full_service_back_after_s"], "<=", 10, unit="s"))
        goals.append(goal("worker_kill: each failed request fails fast", r["failed_latency_ms_max"], "<", 1000, unit="ms",
                          note="no request failed" if not r["failed"] else ""))
    for name in ("worker_kill_min2", "redis_outage", "controller_kill"):
        if name in results:
            goals.append(goal(f"{name}: no failed request", results[name]["failed"], "==", 0, unit="requests"))
    if "controller_kill" in results:
        r = results["controller_kill"]
        goals.append(goal("controller_kill: no placement leaves an expert without a replica",
                          r["placements_missing_an_expert"], "==", 0))
    flags = " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k not in ("out", "only"))
    write_result("faults", title="Reliability under failures",
                 question="What does a client see when a worker, Redis or the controller fails under load?",
                 command=f"python benchmarks/bench_faults.py {flags}", figures=figures, goals=goals, details=results)


if __name__ == "__main__":
    main()
