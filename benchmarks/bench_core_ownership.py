"""Elastic vs static on a fleet whose workers own their cores: the controller's gain, measured on 2 cores.

    python benchmarks/bench_core_ownership.py [--duration 20] [--tokens 512] [--clients 4] [--out FILE]

Two workers, each owning one core (CPU affinity + one torch thread, as a GPU
worker owns its GPU); the router, the controller and the client run on what
is left (here: the same two cores). The traffic's top-2 experts both live on
worker-0 in the starting placement, so with a static placement worker-0's
core does all the expert math while worker-1's idles. The same fleet is then
run with its controller (the default): it replicates or moves the hot
experts within seconds, and the router splits their rows between the
replicas. Reported: steady tokens/s of both (after the rebalance for the
elastic run), their ratio (the ceiling is 2), the seconds until a hot expert
had a replica on worker-1, failed requests, the CPU each process used, and
the largest difference to the in-process layer.
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
from common import goal, single, write_json, write_mixtral_checkpoint, write_result  # noqa: E402

HOT = (0, 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hot_batches(gate: torch.Tensor, tokens: int, n: int, seed: int) -> list[torch.Tensor]:
    """Hidden states whose router picks experts 0 and 1 for (nearly) every token."""
    g = torch.Generator().manual_seed(seed)
    direction = gate[list(HOT)].sum(0)
    direction = direction / direction.norm()
    h = gate.shape[1]
    return [torch.randn(tokens, h, generator=g) * 0.5 + direction * 3.0 * h**0.5 for _ in range(n)]


def run(mode: str, path: str, args, redis_url: str, batches, model) -> dict:
    import ray

    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.state import StateStore
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient, FleetError

    cfg = FleetConfig(
        checkpoint=path, num_workers=2, redis_url=redis_url, namespace=f"own-{mode}-{uuid.uuid4().hex[:6]}",
        static=(mode == "static"), router=RouterConfig(telemetry_interval_s=0.5),
    )
    fleet = LocalFleet(cfg)
    fleet.start()
    store = StateStore(redis_url, namespace=cfg.namespace)
    cores = {d.device_id: d.cpus for d in fleet.devices}
    layer = model.moe_layers[0]
    with FleetClient(fleet.address) as c:
        c.wait_ready(60)
        worst = max((c.forward(layer, b) - model.layer(layer)(b)).abs().max().item() for b in batches[:2])
    stop = threading.Event()
    log: list = []

    def client(seed: int) -> None:
        cl = FleetClient(fleet.address, timeout=60)
        i = seed
        while not stop.is_set():
            b = batches[i % len(batches)]
            i += 1
            t0 = time.monotonic()
            try:
                cl.forward(layer, b)
                log.append((t0, time.monotonic(), None))
            except FleetError as e:
                log.append((t0, time.monotonic(), e.code.name))
        cl.close()

    threads = [threading.Thread(target=client, args=(s,)) for s in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    replicated_at = None
    if mode == "elastic":  # wait for the controller to put a hot expert on worker-1
        while time.monotonic() - start < 60:
            p = store.get_placement()
            if any((layer, e) in {tuple(k) for k in p.assignments.get("worker-1", [])} for e in HOT):
                replicated_at = time.monotonic() - start
                break
            time.sleep(0.1)
        time.sleep(args.settle)
    else:
        time.sleep(args.settle + 2)
    w_pids = {d: s["pid"] for d, s in fleet.worker_stats().items()}
    r_pid = fleet.router_stats()[0]["pid"]
    pids = {**w_pids, "router": r_pid, "client (this process)": os.getpid()}
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t_from = time.monotonic()
    time.sleep(args.duration)
    t_to = time.monotonic()
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    stop.set()
    for t in threads:
        t.join(timeout=120)
    placement = store.get_placement()
    fleet.stop()
    done = [r for r in log if r[2] is None and t_from <= r[1] <= t_to]
    lat = sorted(r[1] - r[0] for r in done)
    return {
        "mode": mode,
        "tokens_per_s": len(done) * args.tokens / (t_to - t_from),
        "requests_measured": len(done),
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else None,
        "failed": sum(1 for r in log if r[2] is not None),
        "requests": len(log),
        "hot_expert_on_worker_1_after_s": replicated_at,
        "cpu_cores_used": {k: (cpu1[k] - cpu0[k]) / (t_to - t_from) for k in pids},
        "worker_cores": {d: list(c) if c else None for d, c in cores.items()},
        "max_abs_diff_vs_in_process": worst,
        "placement": {d: sorted(map(list, keys)) for d, keys in placement.assignments.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20, help="seconds measured (steady state)")
    ap.add_argument("--settle", type=float, default=3, help="seconds after the rebalance before measuring")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per request")
    ap.add_argument("--clients", type=int, default=4, help="requests in flight")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    from moefleet import MoEModel
    from moefleet.core.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=args.hidden, ffn=args.ffn, experts=8, top_k=2, layers=1))
        model = MoEModel.from_pretrained(path)
        layer = model.moe_layers[0]
        batches = hot_batches(model.layer(layer).gate.weight.float(), args.tokens, 8, 0)
        _, routing = model.layer(layer)(batches[0], return_routing=True)
        on_hot = float((routing.topk_ids.sort(dim=1).values == torch.tensor(HOT)).all(dim=1).float().mean())
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        try:
            static = run("static", path, args, redis.url, batches, model)
            elastic = run("elastic", path, args, redis.url, batches, model)
        finally:
            ray.shutdown()
            redis.stop()
    ratio = elastic["tokens_per_s"] / static["tokens_per_s"]
    result = {"args": vars(args), "tokens_routed_to_both_hot_experts": on_hot, "static": static, "elastic": elastic,
              "ratio_elastic_over_static": ratio}
    for r in (static, elastic):
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores_used"].items())
        print(f"{r['mode']:8s} {r['tokens_per_s']:9,.0f} tokens/s  p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms  "
              f"failed {r['failed']}/{r['requests']}  cores used: {cpu}")
    print(f"hot expert replicated on worker-1 after {elastic['hot_expert_on_worker_1_after_s']} s; "
          f"tokens on both hot experts {on_hot:.0%}")
    print(f"elastic / static = {ratio:.2f} (goal >= 1.5; ceiling 2)")
    print(f"max |fleet - in-process| = {max(static['max_abs_diff_vs_in_process'], elastic['max_abs_diff_vs_in_process']):.2e}")
    write_json("core_ownership", result, args.out)
    figures = {f"{r['mode']} tokens/s": single(r["tokens_per_s"], "tokens/s") for r in (static, elastic)}
    figures["elastic / static"] = single(ratio, "x", "ceiling 2 (two workers, one core each)")
    figures["hot expert on worker-1 after"] = single(elastic["hot_expert_on_worker_1_after_s"], "s")
    goals = [
        goal("elastic >= 1.5x static tokens/s (workers owning their cores)", ratio, ">=", 1.5, unit="x"),
        goal("no failed request", static["failed"] + elastic["failed"], "==", 0, unit="requests"),
    ]
    flags = " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    write_result("core_ownership", title="Elastic vs static with workers owning their cores",
                 question="Does the controller's re-placement pay when each worker owns its core?",
                 command=f"python benchmarks/bench_core_ownership.py {flags}", figures=figures, goals=goals, details=result)


if __name__ == "__main__":
    main()
