"""Per-layer latency and throughput: in-process layer vs this fleet (2 workers) vs a naive Ray Serve fan-out.

    python benchmarks/bench_fleet.py [--quick] [--serve-ingress] [--out FILE]

- in-process: ``MoEModel.layer(0)`` in this process (all cores).
- fleet: ``LocalFleet`` with 2 ExpertGroup workers (1 CPU each), called over gRPC.
- naive: one Ray Serve deployment per expert (fractional CPUs so all fit), this
  process runs the gate and fans out one ``DeploymentHandle`` call per expert.
- with ``--serve-ingress``: the fleet's API through Ray Serve's gRPC proxy
  (``serve_app.FleetIngress``) on the same workers, beside the grpc.aio router.

Latency: sequential calls at T = 1, 32, 256 tokens (p50/p99). Throughput:
T = 4096 tokens per call. Ratios are from this one run.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentiles, timed, write_json, write_mixtral_checkpoint  # noqa: E402


def measure(call, hidden_size: int, lat_tokens, lat_n: int, thr_tokens: int, thr_n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for t in lat_tokens:
        x = torch.randn(t, hidden_size, generator=g)
        out[f"latency_{t}"] = percentiles(timed(lambda: call(x), lat_n, warmup=2))
    x = torch.randn(thr_tokens, hidden_size, generator=g)
    times = timed(lambda: call(x), thr_n, warmup=1)
    out[f"throughput_{thr_tokens}"] = {"tokens_per_s": thr_tokens / float(np.median(times)), "n": thr_n}
    return out


def naive_serve(path: str, num_experts: int):
    """One deployment per expert; returns a callable doing gate + per-expert fan-out + combine."""
    from ray import serve

    from moefleet.core.model import MoECheckpoint
    from moefleet.kernels.layer import GateWeights, fused_route

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Expert:
        def __init__(self, path: str, expert: int):
            w = MoECheckpoint(path).expert(0, expert)
            torch.set_num_threads(1)
            self.w1, self.w3, self.w2 = w["w1"], w["w3"], w["w2"]

        def __call__(self, x: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(x)
            h = torch.nn.functional.silu(x @ self.w1.T) * (x @ self.w3.T)
            return (h @ self.w2.T).numpy()

    handles = [serve.run(Expert.bind(path, e), name=f"naive-expert-{e}", route_prefix=None) for e in range(num_experts)]
    ckpt = MoECheckpoint(path)
    spec = ckpt.spec.layer_spec(0)
    gate = GateWeights(**ckpt.gate(0))

    def call(x: torch.Tensor) -> torch.Tensor:
        r = fused_route(gate.logits(x), spec, gate, "torch")
        ids, w = r.topk_ids, r.topk_weights
        futures = []
        for e in range(num_experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if len(tok):
                futures.append((tok, w[tok, slot], handles[e].remote(x[tok].numpy())))
        out = torch.zeros_like(x)
        for tok, wt, f in futures:
            out.index_add_(0, tok, torch.from_numpy(f.result()) * wt[:, None])
        return out

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller layer and fewer calls")
    ap.add_argument("--serve-ingress", action="store_true", help="also measure Serve's gRPC proxy as the router host")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    shape = dict(hidden=1024, ffn=2816, experts=8, top_k=2)
    lat_n, thr_tokens, thr_n = 30, 4096, 5
    if args.quick:
        shape, lat_n, thr_tokens, thr_n = dict(hidden=256, ffn=512, experts=8, top_k=2), 10, 1024, 3
    lat_tokens = (1, 32, 256)

    import ray

    from moefleet import MoEModel
    from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig
    from moefleet.core.redis_server import RedisServer
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient

    results: dict = {"shape": shape}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", **shape))
        model = MoEModel.from_pretrained(path, backend="torch")
        layer = model.layer(0)
        print("measuring in-process layer, before Ray starts ...", flush=True)
        results["in_process_no_ray"] = measure(lambda x: layer(x), shape["hidden"], lat_tokens, lat_n, thr_tokens, thr_n)

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        ns = f"bench-{uuid.uuid4().hex[:6]}"
        cfg = FleetConfig(checkpoint=path, num_workers=2, redis_url=redis.url, namespace=ns,
                          worker=WorkerConfig(num_cpus=1), router=RouterConfig(batch_window_ms=0))
        fleet = LocalFleet(cfg)
        fleet.start()
        client = FleetClient(fleet.address)
        client.wait_ready(60)
        # The baseline: the same layer in this process, under the same background (Ray's daemons run here too;
        # multi-threaded MKL loses about half its speed to them on a 2-core machine).
        print("measuring in-process layer, Ray running ...", flush=True)
        results["in_process"] = measure(lambda x: layer(x), shape["hidden"], lat_tokens, lat_n, thr_tokens, thr_n)
        print("measuring fleet (grpc.aio router in a Ray actor) ...", flush=True)
        results["fleet"] = measure(lambda x: client.forward(0, x), shape["hidden"], lat_tokens, lat_n, thr_tokens, thr_n)

        if args.serve_ingress:
            from ray import serve
            from ray.serve.config import gRPCOptions

            from moefleet.router_service.serve_app import SERVICER_FUNCTION, build_app

            serve.start(grpc_options=gRPCOptions(port=9000, grpc_servicer_functions=[SERVICER_FUNCTION]),
                        http_options={"host": "127.0.0.1", "port": 8000})
            serve.run(build_app({"checkpoint": path, "num_workers": 2, "redis_url": redis.url, "namespace": ns,
                                 "router": {"batch_window_ms": 0}, "worker": {"num_cpus": 1}}), name="moefleet", route_prefix="/moefleet")
            serve_client = FleetClient("127.0.0.1:9000", metadata=(("application", "moefleet"),))

            def serve_call(x):
                return serve_client.forward(0, x)

            deadline = time.monotonic() + 60  # the proxy learns of the application asynchronously
            while True:
                try:
                    serve_call(torch.randn(1, shape["hidden"]))
                    break
                except Exception as e:
                    if time.monotonic() > deadline:
                        raise
                    print(f"waiting for the Serve gRPC proxy: {e}", flush=True)
                    time.sleep(1)
            print("measuring fleet through Ray Serve's gRPC proxy ...", flush=True)
            results["fleet_serve_ingress"] = measure(serve_call, shape["hidden"], lat_tokens, lat_n, thr_tokens, thr_n)
            serve.delete("moefleet")

        if not args.skip_naive:
            print("measuring naive Serve fan-out ...", flush=True)
            call = naive_serve(path, shape["experts"])
            results["naive_serve"] = measure(call, shape["hidden"], lat_tokens, lat_n, thr_tokens, thr_n)

        rs = fleet.router_stats()[0]
        results["router_telemetry_share"] = rs["telemetry_s"] / max(rs["forward_s"], 1e-9)
        # sanity: the fleet's answer is the in-process layer's
        x = torch.randn(64, shape["hidden"])
        results["fleet_max_abs_error"] = float((client.forward(0, x) - layer(x)).abs().max())
        client.close()
        fleet.stop()
        ray.shutdown()
        redis.stop()

    ip, fl = results["in_process"], results["fleet"]
    ratios = {
        "fleet_p50_256_over_in_process": fl["latency_256"]["p50_ms"] / ip["latency_256"]["p50_ms"],
        f"fleet_throughput_{thr_tokens}_over_in_process": fl[f"throughput_{thr_tokens}"]["tokens_per_s"] / ip[f"throughput_{thr_tokens}"]["tokens_per_s"],
    }
    if "naive_serve" in results:
        nv = results["naive_serve"]
        ratios["fleet_p50_32_over_naive"] = fl["latency_32"]["p50_ms"] / nv["latency_32"]["p50_ms"]
        ratios[f"fleet_throughput_{thr_tokens}_over_naive"] = fl[f"throughput_{thr_tokens}"]["tokens_per_s"] / nv[f"throughput_{thr_tokens}"]["tokens_per_s"]
    if "fleet_serve_ingress" in results:
        sv = results["fleet_serve_ingress"]
        for t in lat_tokens:
            ratios[f"serve_ingress_p50_{t}_over_grpc_aio"] = sv[f"latency_{t}"]["p50_ms"] / fl[f"latency_{t}"]["p50_ms"]
    results["ratios"] = ratios
    print(f"\n{'config':22s} {'p50@1':>8s} {'p50@32':>8s} {'p99@32':>8s} {'p50@256':>8s} {'p99@256':>8s} {'tok/s@' + str(thr_tokens):>12s}")
    for name in ("in_process_no_ray", "in_process", "fleet", "fleet_serve_ingress", "naive_serve"):
        if name in results:
            r = results[name]
            print(f"{name:22s} {r['latency_1']['p50_ms']:8.1f} {r['latency_32']['p50_ms']:8.1f} {r['latency_32']['p99_ms']:8.1f} "
                  f"{r['latency_256']['p50_ms']:8.1f} {r['latency_256']['p99_ms']:8.1f} {r[f'throughput_{thr_tokens}']['tokens_per_s']:12,.0f}")
    for k, v in ratios.items():
        print(f"{k:45s} {v:6.2f}")
    print(f"fleet max abs error vs in-process: {results['fleet_max_abs_error']:.2e}")
    print(f"router time spent on telemetry (count + flush to Redis): {100 * results['router_telemetry_share']:.2f}%")
    write_json("fleet", results, args.out)
    _write_schema(results, ratios, thr_tokens, args)


def _write_schema(results: dict, ratios: dict, thr_tokens: int, args) -> None:
    """benchmarks/results/fleet.json in the common schema."""
    from common import goal, single, write_result

    figures = {}
    for name in ("in_process_no_ray", "in_process", "fleet", "fleet_serve_ingress", "naive_serve"):
        if name in results:
            r = results[name]
            for t in (1, 32, 256):
                figures[f"{name} p50@{t}"] = single(r[f"latency_{t}"]["p50_ms"], "ms")
                figures[f"{name} p99@{t}"] = single(r[f"latency_{t}"]["p99_ms"], "ms")
            figures[f"{name} tokens/s@{thr_tokens}"] = single(r[f"throughput_{thr_tokens}"]["tokens_per_s"], "tokens/s")
    naive = "naive_serve" in results
    goals = [
        goal("fleet p50@32 <= 1/3 of naive", ratios.get("fleet_p50_32_over_naive"), "<=", 1 / 3, unit="x",
             note="" if naive else "not run: --skip-naive"),
        goal(f"fleet throughput@{thr_tokens} >= 1.2x naive", ratios.get(f"fleet_throughput_{thr_tokens}_over_naive"),
             ">=", 1.2, unit="x", note="" if naive else "not run: --skip-naive"),
        goal(f"fleet throughput@{thr_tokens} >= 0.9x in-process", ratios[f"fleet_throughput_{thr_tokens}_over_in_process"],
             ">=", 0.9, unit="x"),
        goal("fleet p50@256 <= 1.25x in-process", ratios["fleet_p50_256_over_in_process"], "<=", 1.25, unit="x"),
        goal("router time spent on telemetry < 2%", results["router_telemetry_share"], "<", 0.02),
        goal("fleet output = in-process output (max abs error)", results["fleet_max_abs_error"], "<=", 1e-5),
    ]
    flags = [f for f, on in (("--quick", args.quick), ("--serve-ingress", args.serve_ingress), ("--skip-naive", args.skip_naive)) if on]
    write_result("fleet", title="Fleet vs in-process vs naive Ray Serve",
                 question="What does serving a layer through the fleet cost against the in-process layer and a naive Serve fan-out?",
                 command=" ".join(["python benchmarks/bench_fleet.py", *flags]), figures=figures, goals=goals,
                 details={"results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
