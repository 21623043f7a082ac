"""Latency during a rebalance under continuous load: p99 while the controller moves experts vs steady state.

    python benchmarks/bench_rebalance.py [--steady 10] [--after 8] [--out FILE]

Skewed traffic runs against a 3-worker fleet; after ``--steady`` seconds the
controller plans and applies one rebalance (loads replicas, publishes, drains,
unloads). Reported: failed requests (goal 0), outputs checked against the
in-process layer, and p99 during the rebalance window over the steady-state p99.
"""

from __future__ import annotations

import argparse
import os
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
from common import write_json, write_mixtral_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steady", type=float, default=10)
    ap.add_argument("--after", type=float, default=8)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    from moefleet import MoEModel
    from moefleet.controller.main import controller_actor_class
    from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig
    from moefleet.core.redis_server import RedisServer
    from moefleet.core.state import StateStore
    from moefleet.demo import skewed_hidden
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient, FleetError

    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=512, ffn=1536, experts=8, top_k=2, layers=2))
        model = MoEModel.from_pretrained(path, backend="torch")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        ns = f"rebal-{uuid.uuid4().hex[:6]}"
        fleet = LocalFleet(FleetConfig(checkpoint=path, num_workers=3, redis_url=redis.url, namespace=ns,
                                       worker=WorkerConfig(num_cpus=0.5), router=RouterConfig(telemetry_interval_s=0.25)))
        fleet.start()
        store = StateStore(redis.url, namespace=ns)
        stop = threading.Event()
        log: list = []
        samples: list = []

        def client(seed):
            g = torch.Generator().manual_seed(seed)
            c = FleetClient(fleet.address, timeout=60)
            i = 0
            while not stop.is_set():
                layer = model.moe_layers[i % 2]
                i += 1
                h = skewed_hidden(model.layer(layer).gate.weight, args.tokens, [0, 1], 3.0, g)
                t0 = time.monotonic()
                try:
                    out = c.forward(layer, h)
                    log.append((t0, time.monotonic() - t0, None))
                    if i % 10 == 0:
                        samples.append((layer, h, out))
                except FleetError as e:
                    log.append((t0, time.monotonic() - t0, e.code.name))
            c.close()

        # the controller runs in a process of its own, as it does in a deployment, started before the traffic
        cfg = fleet.controller_config(load_windows=5, load_half_life_s=3.0, min_tokens=10)
        ctl = controller_actor_class().remote(cfg.model_dump(), "bench", autorun=False)
        ray.get(ctl.release.remote())
        threads = [threading.Thread(target=client, args=(s,)) for s in range(args.clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.steady)
        r0 = time.monotonic()
        report = ray.get(ctl.step.remote())
        r1 = time.monotonic()
        time.sleep(args.after)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        fleet.stop()
        for d in store.get_placement().assignments:  # the controller's detached workers
            from moefleet.core.placement import worker_actor_name

            try:
                ray.kill(ray.get_actor(worker_actor_name(d), namespace=ns))
            except ValueError:
                pass
        ray.shutdown()
        redis.stop()

    ok = [(t0, dt) for t0, dt, e in log if e is None]
    failed = [e for _, _, e in log if e is not None]
    steady = [dt for t0, dt in ok if start + 2 <= t0 < r0]
    during = [dt for t0, dt in ok if t0 <= r1 and t0 + dt >= r0]  # every request in flight at some point of the rebalance
    err = max(float((out - model.layer(layer)(h)).abs().max()) for layer, h, out in samples)
    result = {
        "report": report, "rebalance_s": r1 - r0, "requests": len(log), "failed_requests": len(failed),
        "steady_p99_ms": float(np.percentile(steady, 99) * 1000), "rebalance_p99_ms": float(np.percentile(during, 99) * 1000),
        "rebalance_requests": len(during), "max_abs_error_vs_in_process": err,
    }
    result["p99_ratio_rebalance_over_steady"] = result["rebalance_p99_ms"] / result["steady_p99_ms"]
    print(f"rebalance: v{report.get('placement_version')} -> v{report.get('applied_version')}, {report.get('copies')} copies, "
          f"{result['rebalance_s']:.2f}s, balancedness {report.get('balancedness_before'):.3f} -> {report.get('balancedness_after'):.3f}")
    print(f"requests {result['requests']}, failed {result['failed_requests']}, max abs error vs in-process {err:.1e}")
    print(f"p99 steady {result['steady_p99_ms']:.1f} ms, during rebalance {result['rebalance_p99_ms']:.1f} ms "
          f"({result['rebalance_requests']} requests): ratio {result['p99_ratio_rebalance_over_steady']:.2f}")
    write_json("rebalance", result, args.out)


if __name__ == "__main__":
    main()
