"""The fixed cost of a layer call: one token, two workers, on every path a caller can take.

    python benchmarks/bench_hot_path.py [--calls 300] [--rounds 3] [--out FILE]

A tiny Mixtral layer (H=64, F=128, E=8, top-2: the experts' math is a few
microseconds, so a call's time is its fixed cost), two ExpertGroup workers each
owning one core, a static fleet. Paths, alternating in rounds so drift hits all:

* ``embedded``: the router core in this process, its calls on its compiled graph
  (``compiled_graphs="on"``; the default, ``auto``, compiles graphs over GPU
  workers only);
* ``embedded, plain calls``: the same router with ``compiled_graphs="off"``
  (one Ray actor call per worker per layer call: what ``auto`` gives CPU workers);
* ``grpc``: the gRPC router actor (its own compiled graph, ``on``) called over loopback.

Reported per path: p50 / p90 of a call's time, and the mean overhead the
router measured (``moefleet_call_overhead_seconds``: the call less its slowest
worker's compute). Goal (issue 16): embedded p50 at T=1 with 2 workers <= 1.5 ms.

Also measured: what the graphs' polling costs the rest of the machine. Ray 2.60
compiled-graph reads spin; the fleet runs those threads in the idle class
(``moefleet.core.processes.polling_thread``). A fixed torch workload on both
cores is timed with the fleet idle and both routers' graphs up, against the
same workload after the graphs are torn down (ratio ~1.0: polling takes no
CPU from other work).
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
# the embedded router's process with the serving processes' inline limit, as moefleet.connect(embedded=True) sets it
from moefleet.core.processes import INLINE_BYTES  # noqa: E402

os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, percentiles, single, spread, wait_until, write_json, write_mixtral_checkpoint, write_result  # noqa: E402

GOAL_MS = 1.5


def busy_work(seconds_hint: float = 0.5) -> float:
    """Seconds a fixed torch workload (matmuls on this process's threads) takes."""
    a = torch.randn(512, 512)
    t0 = time.perf_counter()
    for _ in range(40):
        a = torch.tanh(a @ a * 1e-3)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300, help="calls per path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.rounds = 50, 1
    t_start = time.perf_counter()

    import ray

    from moefleet import MoEModel
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.redis_server import RedisServer
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient
    from moefleet.router_service.embedded import EmbeddedRouter

    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=64, ffn=128, experts=8, top_k=2))
        model = MoEModel.from_pretrained(path)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        cfg = FleetConfig(checkpoint=path, num_workers=2, static=True, redis_url=redis.url, http_port=None,
                          namespace=f"hot-{uuid.uuid4().hex[:6]}", router=RouterConfig(compiled_graphs="on"))
        fleet = LocalFleet(cfg)
        fleet.start()
        client = FleetClient(fleet.address, timeout=60)
        client.wait_ready(60)
        graph_router = EmbeddedRouter(path, redis.url, cfg.namespace, compiled_graphs="on")
        plain_router = EmbeddedRouter(path, redis.url, cfg.namespace, compiled_graphs="off")
        for r in (graph_router, plain_router):
            r.wait_ready(60)
        wait_until(lambda: graph_router.core.transport_report().get("graph"), 60)
        wait_until(lambda: fleet.router_stats()[0]["transport"].get("graph"), 60)
        time.sleep(1.0)
        paths = {
            "embedded": lambda x: graph_router.forward(0, x),
            "embedded, plain calls": lambda x: plain_router.forward(0, x),
            "grpc": lambda x: client.forward(0, x),
        }
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
        want = model.layer(0)(x)
        results["max_abs_error"] = {name: float((fn(x) - want).abs().max()) for name, fn in paths.items()}
        samples: dict[str, list[float]] = {name: [] for name in paths}
        per_round: dict[str, list[float]] = {name: [] for name in paths}
        overhead0 = {"embedded": graph_router.core.stages.totals().get("call_overhead", (0.0, 0)),
                     "embedded, plain calls": plain_router.core.stages.totals().get("call_overhead", (0.0, 0))}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                for _ in range(20):
                    fn(x)
                this = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    fn(x)
                    this.append(time.perf_counter() - t0)
                samples[name].extend(this)
                per_round[name].append(1000 * float(np.median(this)))
        overhead1 = {"embedded": graph_router.core.stages.totals()["call_overhead"],
                     "embedded, plain calls": plain_router.core.stages.totals()["call_overhead"]}
        results["paths"] = {name: percentiles(v) for name, v in samples.items()}
        for name in paths:
            p = results["paths"][name]
            p["p90_ms"] = 1000 * float(np.percentile(samples[name], 90))
            if name in overhead1:
                s = overhead1[name][0] - overhead0[name][0]
                n = overhead1[name][1] - overhead0[name][1]
                p["overhead_mean_ms"] = 1000 * s / n if n else None
            print(f"{name:24s} p50 {p['p50_ms']:7.3f} ms  p90 {p['p90_ms']:7.3f} ms"
                  + (f"  router overhead mean {p['overhead_mean_ms']:.3f} ms" if p.get("overhead_mean_ms") else ""), flush=True)
        results["transport"] = {"embedded": graph_router.core.transport_report(), "grpc": fleet.router_stats()[0]["transport"]}

        # polling: a fixed workload with the idle fleet's graphs up, then without
        busy_work()
        with_graphs = [busy_work() for _ in range(5)]
        graph_router.close()
        plain_router.close()
        client.close()
        fleet.stop()
        time.sleep(1.0)
        without = [busy_work() for _ in range(5)]
        results["polling"] = {"with_graphs_s": with_graphs, "without_s": without,
                              "ratio": float(np.median(with_graphs) / np.median(without))}
        print(f"a fixed workload beside an idle fleet with graphs: {np.median(with_graphs):.3f} s, "
              f"without: {np.median(without):.3f} s ({results['polling']['ratio']:.3f}x)")
        ray.shutdown()
        redis.stop()
    write_json("hot_path", results, args.out)

    figures = {}
    for name, p in results["paths"].items():
        figures[f"{name} p50 @T=1"] = spread(per_round[name], "ms", "median of each round's calls")
        figures[f"{name} p90 @T=1"] = single(p["p90_ms"], "ms")
        if p.get("overhead_mean_ms") is not None:
            figures[f"{name} router call overhead (mean)"] = single(p["overhead_mean_ms"], "ms",
                                                                     "a call less its slowest worker's compute")
    figures["workload beside idle graphs / without"] = single(results["polling"]["ratio"], "x")
    goals = [
        goal(f"embedded p50 @T=1, 2 workers <= {GOAL_MS} ms", figures["embedded p50 @T=1"], "<=", GOAL_MS, unit="ms"),
        goal("embedded output = in-process (max abs error)", results["max_abs_error"]["embedded"], "<=", 1e-5),
        goal("idle graphs take no CPU from other work (workload ratio)", results["polling"]["ratio"], "<=", 1.1, unit="x"),
    ]
    write_result("hot_path", title="The fixed cost of a layer call: one token, two workers",
                 question="What does a one-token layer call cost on each path (embedded on a compiled graph, embedded on "
                          "plain actor calls, gRPC), and does an idle fleet's graph polling take CPU from other work?",
                 command=f"python benchmarks/bench_hot_path.py --calls {args.calls} --rounds {args.rounds}"
                 + (" --quick" if args.quick else ""),
                 figures=figures, goals=goals, details=results, elapsed_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
