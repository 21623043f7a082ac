"""Latency while the controller rebalances under continuous load: p99 of requests in flight during rebalances vs steady.

    python benchmarks/bench_rebalance.py [--duration 60] [--shift 5] [--clients 4] [--out FILE]

A local fleet with its controller (the default: 2 workers, each owning a
core) serves traffic whose hot experts move every ``--shift`` seconds, so
the controller rebalances again and again (loads replicas, publishes,
drains, unloads). Every request in flight at any moment of any rebalance
counts as "during" (the reconciler records each rebalance's start and end on
the store's clock); the rest, past a warm-up, is steady state. Reported:
rebalances, requests during them (goal: at least 200), p99 during / p99
steady (goal <= 1.2), failed requests (goal 0), and the largest difference
from the in-process layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, single, spread, write_json, write_mixtral_checkpoint, write_result  # noqa: E402
from traffic import Traffic, p99_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--shift", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--before-s", type=float, default=1.0, help="the matched baseline: seconds just before each rebalance")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    from moefleet import MoEModel
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.redis_server import RedisServer
    from moefleet.core.state import StateStore
    from moefleet.local import LocalFleet

    experts = 8
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=512, ffn=1536, experts=experts, top_k=2, layers=2))
        model = MoEModel.from_pretrained(path, backend="torch")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        ns = f"rebal-{uuid.uuid4().hex[:6]}"
        fleet = LocalFleet(FleetConfig(checkpoint=path, num_workers=args.workers, redis_url=redis.url, namespace=ns,
                                       router=RouterConfig(telemetry_interval_s=0.25)))
        fleet.start()
        store = StateStore(redis.url, namespace=ns)
        skew = store.time() - time.time()

        def hot_at(t: float) -> list[int]:
            k = int(t // args.shift)
            return [(3 * k) % experts, (3 * k + 1) % experts]

        traffic = Traffic(fleet.address, model, hot_at, clients=args.clients, tokens=args.tokens).start()
        time.sleep(args.duration)
        traffic.stop()
        events = [e for e in store.events(1000) if e.kind == "rebalance"]
        fleet.stop()
        ray.shutdown()
        redis.stop()

    windows = [(e.data["started_at"] - skew, e.data["ended_at"] - skew) for e in events]
    t0 = traffic.start_time + args.warmup
    ok = traffic.ok(t0)
    during = [b - a for a, b in ok if any(a <= w1 and b >= w0 for w0, w1 in windows)]
    steady = [b - a for a, b in ok if not any(a <= w1 and b >= w0 for w0, w1 in windows)]
    # Matched baseline: each rebalance follows a shift of the hot set, when load is most uneven, so "steady"
    # (mostly balanced time) also measures imbalance; the second of traffic just before each rebalance has
    # the same hot set and the same imbalance, without a rebalance in flight.
    before = [b - a for a, b in ok
              if any(w0 - args.before_s <= a and b < w0 for w0, _ in windows)
              and not any(a <= w1 and b >= w0 for w0, w1 in windows)]
    failed = traffic.failed()
    result = {
        "args": vars(args), "rebalances": len(events), "rebalance_seconds": [w1 - w0 for w0, w1 in windows],
        "weight_copies": sum(e.data["loads"] for e in events), "requests": len(traffic.log), "failed_requests": len(failed),
        "requests_during_rebalances": len(during), "requests_steady": len(steady),
        "p99_during_ms": p99_ms(during), "p99_steady_ms": p99_ms(steady),
        "requests_just_before_rebalances": len(before), "p99_just_before_ms": p99_ms(before),
        "max_abs_error_vs_in_process": traffic.max_abs_error, "wrong_outputs": traffic.wrong,
    }
    result["p99_ratio_during_over_steady"] = (result["p99_during_ms"] / result["p99_steady_ms"]) if during and steady else None
    result["p99_ratio_during_over_just_before"] = (result["p99_during_ms"] / result["p99_just_before_ms"]) if during and before else None
    secs = result["rebalance_seconds"]
    print(f"{len(events)} rebalances ({result['weight_copies']} weight copies), each {min(secs, default=0):.2f}-{max(secs, default=0):.2f} s")
    print(f"requests {len(traffic.log)}, failed {len(failed)}, max abs error vs in-process {traffic.max_abs_error:.1e}")
    print(f"p99 steady {result['p99_steady_ms']:.1f} ms ({len(steady)} requests), during rebalances "
          f"{result['p99_during_ms']:.1f} ms ({len(during)} requests): ratio {result['p99_ratio_during_over_steady']:.2f} "
          f"(goal <= 1.2 over >= 200 requests)")
    if before:
        print(f"p99 in the {args.before_s:.0f} s before each rebalance (same hot set, no rebalance in flight) "
              f"{result['p99_just_before_ms']:.1f} ms ({len(before)} requests): during / just before "
              f"{result['p99_ratio_during_over_just_before']:.2f}")
    write_json("rebalance", result, args.out)
    figures = {
        "rebalances": single(len(events), "rebalances"),
        "p99 steady": single(result["p99_steady_ms"], "ms", f"{len(steady)} requests"),
        "p99 during rebalances": single(result["p99_during_ms"], "ms", f"{len(during)} requests"),
        "weight copies": single(result["weight_copies"], "copies"),
        "p99 just before rebalances": single(result["p99_just_before_ms"], "ms",
                                             f"{len(before)} requests in the {args.before_s:.0f} s before each rebalance"),
        "p99 during / just before": single(result["p99_ratio_during_over_just_before"], "x"),
    }
    if secs:
        figures["rebalance seconds"] = spread(secs, "s", "load -> publish -> drain -> unload, each rebalance")
    goals = [
        goal("p99 during rebalances <= 1.2x steady", result["p99_ratio_during_over_steady"], "<=", 1.2, unit="x"),
        goal("requests during rebalances >= 200", len(during), ">=", 200, unit="requests"),
        goal("no request fails", len(failed), "==", 0, unit="requests"),
        goal("outputs = in-process layer (max abs error)", traffic.max_abs_error, "<=", 1e-4),
    ]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    write_result("rebalance", title="Rebalances under continuous load",
                 question="Does rebalancing again and again under shifting load lose or stall requests?",
                 command=f"python benchmarks/bench_rebalance.py {flags}", figures=figures, goals=goals, details=result)


if __name__ == "__main__":
    main()
