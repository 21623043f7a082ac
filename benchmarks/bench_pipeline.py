"""Pipelined layer calls: a multi-layer model whose 8 concurrent sequences keep many calls in flight, vs one call at a time.

    python benchmarks/bench_pipeline.py [--sequences 8] [--tokens 32] [--rounds 3] [--layers 4] [--out FILE]

A ``transformers`` Mixtral (random weights, H=1024, F=2816, E=8, top-2 by
default, ``--layers`` layers) is saved as the fleet's checkpoint and ``attach()``-ed
to the fleet: attention runs here, every MoE block in the fleet. Two workers,
each owning one core, a static placement (the experts of every layer spread
over both). Three ways to reach it: the **embedded** router in this process
(``moefleet.connect(embedded=True)``: calls from every sequence's thread in
flight together; plain actor calls to these CPU workers under the default
``compiled_graphs: auto``, a compiled graph with ``--compiled-graphs on``), and the gRPC router over a
``FleetClient``'s ``ForwardStream``, with its micro-batching and without.

- *one in flight*: one thread runs the sequences one after another, so one
  layer call is in flight at any time and the workers idle while the client,
  gRPC and the router handle it;
- *N sequences*: N threads each run their own sequence through the same
  attached model, so calls of different sequences and layers overlap on the
  one stream; the router serves them side by side and batches those that
  meet at a layer.

Both through the router with its default micro-batching, and again through a
second router on the same workers with micro-batching off (overlap alone).
Reported: tokens/s (sequence tokens through the whole model), the ratio
(goal >= 1.6 with micro-batching), the workers' busy share and the router's
CPU, and the largest difference from the model run in process.
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
# the embedded router's process with the serving processes' inline limit, as moefleet.connect(embedded=True) sets it
from moefleet.core.processes import INLINE_BYTES  # noqa: E402

os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, single, write_json, write_result  # noqa: E402

GOAL = 1.6


def build_model(layers: int, hidden: int, ffn: int, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.MixtralConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=512)
    model = T.MixtralForCausalLM(cfg).eval()
    for p in model.parameters():  # keep activations O(1) through the layers
        p.data.mul_(0.5)
    return model


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mode(model, seqs, rounds: int, concurrent: bool, fleet, router_pid: int) -> dict:
    """Run every sequence ``rounds`` times through ``model``; concurrently (a thread each) or one after another."""
    stats0 = fleet.worker_stats()
    c0 = cpu_s(router_pid)
    t0 = time.perf_counter()
    if concurrent:
        errors = []

        def one(ids):
            try:
                with torch.no_grad():
                    for _ in range(rounds):
                        model(ids)
            except Exception as e:  # reported below, not swallowed
                errors.append(e)

        threads = [threading.Thread(target=one, args=(ids,)) for ids in seqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    else:
        with torch.no_grad():
            for _ in range(rounds):
                for ids in seqs:
                    model(ids)
    wall = time.perf_counter() - t0
    stats1 = fleet.worker_stats()
    tokens = rounds * sum(int(ids.shape[1]) for ids in seqs)
    busy = {w: (stats1[w]["busy_s"] - stats0[w]["busy_s"]) / wall for w in stats1}
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens, "worker_busy_share": busy,
            "router_cores": (cpu_s(router_pid) - c0) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per sequence (one forward pass each round)")
    ap.add_argument("--rounds", type=int, default=3, help="forward passes per sequence")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--compiled-graphs", choices=["auto", "on", "off"], default="auto",
                    help="the routers' compiled_graphs policy (auto: graphs over GPU workers only, so none here)")
    ap.add_argument("--quick", action="store_true", help="a small model and one round (a smoke run)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.ffn, args.rounds = 2, 256, 512, 1
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # the client's attention: one core's worth, as a model runner beside the fleet would

    import copy

    import ray

    from moefleet import attach
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.processes import serving_runtime_env
    from moefleet.core.redis_server import RedisServer
    from moefleet.local import LocalFleet
    from moefleet.router_service.actor import router_actor_class
    from moefleet.router_service.client import FleetClient
    from moefleet.router_service.embedded import EmbeddedRouter

    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        print("building the model ...", flush=True)
        local = build_model(args.layers, args.hidden, args.ffn)
        local.save_pretrained(tmp, safe_serialization=True)
        g = torch.Generator().manual_seed(1)
        seqs = [torch.randint(0, 256, (1, args.tokens), generator=g) for _ in range(args.sequences)]
        with torch.no_grad():
            want = [local(ids).logits for ids in seqs[:2]]
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        ns = f"pipe-{uuid.uuid4().hex[:6]}"
        fleet = LocalFleet(FleetConfig(checkpoint=tmp, num_workers=2, static=True, redis_url=redis.url, namespace=ns,
                                       router=RouterConfig(compiled_graphs=args.compiled_graphs)))
        fleet.start()
        routers = {"batching": (fleet.address, fleet.router_stats()[0]["pid"])}
        nobatch = router_actor_class().options(namespace=ns, num_cpus=0, runtime_env=serving_runtime_env()).remote(
            tmp, RouterConfig(batch_window_ms=0, compiled_graphs=args.compiled_graphs).model_dump(), redis.url, ns, "router-nobatch")
        address = ray.get(nobatch.start.remote())
        routers["no_batching"] = (address, ray.get(nobatch.stats.remote())["pid"])
        routers["embedded"] = (None, os.getpid())  # the router core in this process: no gRPC hop
        cores = {d: s.get("cpus") for d, s in fleet.worker_stats().items()}
        print(f"worker cores: {cores}", flush=True)
        for name, (addr, pid) in routers.items():
            if addr is None:
                client = EmbeddedRouter(tmp, redis.url, ns, compiled_graphs=args.compiled_graphs)
                client.wait_ready(60)
                deadline = time.monotonic() + (60 if args.compiled_graphs == "on" else 0)
                while not client.core.transport_report().get("graph") and time.monotonic() < deadline:
                    time.sleep(0.1)
            else:
                client = FleetClient(addr, timeout=300)
                client.wait_ready(60)
            remote = copy.deepcopy(local)
            attach(remote, client)
            with torch.no_grad():
                err = max((remote(ids).logits - w).abs().max().item() for ids, w in zip(seqs, want))
            run_mode(remote, seqs[:2], 1, True, fleet, pid)  # warm
            serial = run_mode(remote, seqs, args.rounds, False, fleet, pid)
            overlapped = run_mode(remote, seqs, args.rounds, True, fleet, pid)
            results[name] = {"one_in_flight": serial, f"{args.sequences}_sequences": overlapped,
                             "ratio": overlapped["tokens_per_s"] / serial["tokens_per_s"], "max_abs_diff_vs_local": err}
            print(f"{name:12s} one in flight {serial['tokens_per_s']:8.1f} tokens/s, {args.sequences} sequences "
                  f"{overlapped['tokens_per_s']:8.1f} tokens/s: {results[name]['ratio']:.2f}x; workers busy "
                  f"{', '.join(f'{v:.2f}' for v in serial['worker_busy_share'].values())} -> "
                  f"{', '.join(f'{v:.2f}' for v in overlapped['worker_busy_share'].values())}; "
                  f"router cores {serial['router_cores']:.2f} -> {overlapped['router_cores']:.2f}; max |diff| {err:.1e}",
                  flush=True)
            client.close()
        ray.get(nobatch.stop.remote())
        fleet.stop()
        ray.shutdown()
        redis.stop()
    ratio = results["embedded"]["ratio"]
    results["goal"] = {"ratio": GOAL, "met": ratio >= GOAL}
    print(f"\n{args.sequences} concurrent sequences / one call in flight, embedded router: {ratio:.2f}x "
          f"(goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}); gRPC router {results['batching']['ratio']:.2f}x, "
          f"without micro-batching {results['no_batching']['ratio']:.2f}x")
    write_json("pipeline", results, args.out)
    figures = {}
    for name in ("embedded", "batching", "no_batching"):
        r = results[name]
        figures[f"{name}: one call in flight"] = single(r["one_in_flight"]["tokens_per_s"], "tokens/s")
        figures[f"{name}: {args.sequences} sequences"] = single(r[f"{args.sequences}_sequences"]["tokens_per_s"], "tokens/s")
        figures[f"{name}: ratio"] = single(r["ratio"], "x")
    goals = [goal(f"embedded: {args.sequences} concurrent sequences >= {GOAL}x one call in flight (2 workers, one core each)",
                  ratio, ">=", GOAL, unit="x"),
             goal(f"gRPC: {args.sequences} concurrent sequences >= {GOAL}x one call in flight (2 workers, one core each)",
                  results["batching"]["ratio"], ">=", GOAL, unit="x"),
             goal("attached model = model in process (max abs diff of logits)",
                  max(results[n]["max_abs_diff_vs_local"] for n in ("embedded", "batching", "no_batching")), "<=", 1e-3)]
    flags = " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out")
    write_result("pipeline", title="Pipelined layer calls from concurrent sequences",
                 question="With 8 sequences' calls in flight on one ForwardStream, how much more does a 2-worker fleet serve "
                          "than with one call in flight?",
                 command=f"python benchmarks/bench_pipeline.py {flags}", figures=figures, goals=goals, details=results,
                 elapsed_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
