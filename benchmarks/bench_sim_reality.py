"""The simulator checked against reality: predicted vs measured elastic/static throughput of a local fleet.

    python benchmarks/bench_sim_reality.py [--workers 2] [--clients 4] [--duration 40] [--quick]

One trace, two worlds:

* **measured**: a local fleet (``moefleet.local.LocalFleet``: workers owning
  their cores, routers, Redis) serves the trace twice -- static (no
  controller, the starting placement kept) and elastic (the local controller
  running, as ``moe-fleet up`` starts it). ``--clients`` callers take the
  trace's lines in order, back to back; each line's tokens are sent with
  router logits that pick exactly the line's experts, so the fleet routes the
  counts the trace holds;
* **predicted**: ``controller/sim_local.py`` -- the expert FFN calibrated on
  one core of this machine, the per-call cost measured on the static fleet
  (one-token calls), the same starting placement, the same controller config
  -- replays the same lines in closed mode.

Goal: the predicted elastic/static ratio within 20% of the measured one.
"""

from __future__ import annotations

import argparse
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
from common import goal, single, write_mixtral_checkpoint, write_result  # noqa: E402

HIDDEN, FFN, EXPERTS, TOP_K, LAYERS, TOKENS = 512, 1536, 16, 2, 2, 64


def make_calls(lines: int, lines_per_s: float, shift_s: float, s: float, seed: int):
    """``lines`` calls, layers in turn: (layer, choices [T, K]) and the trace of their counts.

    Zipf(s) expert choice, K distinct experts a token (Gumbel top-k), each layer's ranking redrawn every shift_s.
    """
    from moefleet.core.trace import Trace

    rng = np.random.default_rng(seed)
    weights = np.arange(1, EXPERTS + 1, dtype=np.float64) ** -s
    t = np.arange(lines) / lines_per_s
    layer = np.arange(lines) % LAYERS
    perms: dict[tuple[int, int], np.ndarray] = {}
    calls, counts = [], np.zeros((lines, EXPERTS), dtype=np.int64)
    for i in range(lines):
        key = (int(t[i] // shift_s), int(layer[i]))
        if key not in perms:
            perms[key] = rng.permutation(EXPERTS)
        w = np.empty(EXPERTS)
        w[perms[key]] = weights  # rank r -> expert perm[r]
        keys = np.log(w)[None, :] + rng.gumbel(size=(TOKENS, EXPERTS))
        choices = np.argsort(-keys, axis=1)[:, :TOP_K]
        calls.append((int(layer[i]), choices))
        counts[i] = np.bincount(choices.ravel(), minlength=EXPERTS)
    return calls, Trace(t=t, layer=layer, counts=counts)


def drive(address: str, calls, clients: int) -> dict:
    """Closed loop: ``clients`` callers take the calls in order; returns tokens/s and failures."""
    from moefleet.router_service.client import FleetClient, FleetError

    lock = threading.Lock()
    nxt = [0]
    done: list[tuple[float, float]] = []
    failed = [0]

    def loop(seed: int):
        g = torch.Generator().manual_seed(seed)
        client = FleetClient(address, timeout=120)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(calls):
                break
            layer, choices = calls[i]
            hidden = torch.randn(TOKENS, HIDDEN, generator=g)
            logits = torch.full((TOKENS, EXPERTS), -8.0)
            logits.scatter_(1, torch.from_numpy(choices), 8.0)
            t0 = time.monotonic()
            try:
                client.forward(layer, hidden, router_logits=logits)
                done.append((t0, time.monotonic()))
            except FleetError:
                failed[0] += 1
        client.close()

    start = time.monotonic()
    threads = [threading.Thread(target=loop, args=(s,)) for s in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    makespan = max(e for _, e in done) - start
    tokens = len(done) * TOKENS / LAYERS
    return {"tokens_per_s": tokens / makespan, "makespan_s": makespan, "calls": len(done), "failed": failed[0]}


def call_overhead_s(address: str, n: int = 30) -> float:
    """Median latency of a one-token call (gRPC, router, one worker call): the fixed cost of a call."""
    from moefleet.router_service.client import FleetClient

    client = FleetClient(address, timeout=60)
    x = torch.randn(1, HIDDEN)
    for _ in range(5):
        client.forward(0, x)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.forward(0, x)
        samples.append(time.perf_counter() - t0)
    client.close()
    return statistics.median(samples)


def measure(path: str, redis_url: str, args, calls) -> dict:
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.local import LocalFleet

    out = {}
    for mode in ("static", "elastic"):
        cfg = FleetConfig(checkpoint=path, num_workers=args.workers, redis_url=redis_url, static=mode == "static",
                          namespace=f"reality-{mode}-{uuid.uuid4().hex[:6]}",
                          router=RouterConfig(batch_window_ms=0, telemetry_interval_s=0.25))
        fleet = LocalFleet(cfg)
        fleet.start()
        try:
            if mode == "static":
                out["call_overhead_s"] = call_overhead_s(fleet.address)
            out["controller_config"] = fleet.controller_config()
            out["devices"] = list(fleet.devices)
            out["placement"] = fleet.placement
            out[mode] = drive(fleet.address, calls, args.clients)
        finally:
            fleet.stop()
        print(f"measured {mode}: {out[mode]['tokens_per_s']:,.0f} tokens/s over {out[mode]['makespan_s']:.1f} s, "
              f"{out[mode]['failed']} failed", flush=True)
    return out


def predict(trace, measured: dict, expert_bytes: int, clients: int) -> dict:
    from moefleet.controller.sim_local import calibrate_cpu, local_devices
    from moefleet.controller.simulator import SimConfig, simulate

    cal = calibrate_cpu(HIDDEN, FFN)
    fleet_devices = measured["devices"]
    devices = local_devices(len(fleet_devices), cal, memory_bytes=fleet_devices[0].memory_bytes,
                            call_overhead_s=measured["call_overhead_s"])
    ctl = measured["controller_config"]
    config = SimConfig(controller=ctl, mode="closed", concurrency=clients, top_k=TOP_K)
    start = measured["placement"]
    runs = {mode: simulate(trace, devices, expert_bytes=expert_bytes, config=config, elastic=mode == "elastic",
                           initial=start) for mode in ("static", "elastic")}
    return {"calibration": cal.__dict__, "static": runs["static"].to_dict(timeline=False),
            "elastic": runs["elastic"].to_dict(timeline=False),
            "ratio": runs["elastic"].tokens_per_s / runs["static"].tokens_per_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="local workers (each owns cores // workers cores)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of trace at --rate lines a second")
    ap.add_argument("--rate", type=float, default=40.0, help="trace lines a second (orders the lines; clients go back to back)")
    ap.add_argument("--shift", type=float, default=10.0, help="seconds of trace between hot-set moves")
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--quick", action="store_true", help="a 15 s trace")
    args = ap.parse_args()
    if args.quick:
        args.duration = 15.0
    import ray

    from moefleet.core.redis_server import RedisServer

    t_start = time.perf_counter()
    calls, trace = make_calls(int(args.duration * args.rate), args.rate, args.shift, args.zipf, seed=0)
    expert_bytes = 3 * HIDDEN * FFN * 4
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=HIDDEN, ffn=FFN, experts=EXPERTS, top_k=TOP_K,
                                            layers=LAYERS))
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        redis = RedisServer()
        try:
            measured = measure(path, redis.url, args, calls)
        finally:
            ray.shutdown()
            redis.stop()
    predicted = predict(trace, measured, expert_bytes, args.clients)
    m_ratio = measured["elastic"]["tokens_per_s"] / measured["static"]["tokens_per_s"]
    p_ratio = predicted["ratio"]
    error = abs(p_ratio / m_ratio - 1)
    print(f"elastic/static: measured {m_ratio:.2f}, predicted {p_ratio:.2f} (relative error {error:.1%})")
    figures = {
        "measured static tokens/s": single(measured["static"]["tokens_per_s"], "tokens/s"),
        "measured elastic tokens/s": single(measured["elastic"]["tokens_per_s"], "tokens/s"),
        "predicted static tokens/s": single(predicted["static"]["tokens_per_s"], "tokens/s"),
        "predicted elastic tokens/s": single(predicted["elastic"]["tokens_per_s"], "tokens/s"),
        "measured elastic / static": single(m_ratio, "x"),
        "predicted elastic / static": single(p_ratio, "x"),
        "call overhead (one-token call)": single(measured["call_overhead_s"] * 1000, "ms"),
        "calibrated expert rows/s (one core)": single(1 / predicted["calibration"]["row_s"], "rows/s"),
    }
    goals = [
        goal("predicted elastic/static within 20% of measured", error, "<=", 0.2,
             description=f"{args.workers} workers owning their cores, {args.clients} clients, Zipf {args.zipf:g}, "
                         f"hot set moving every {args.shift:g} s"),
        goal("no failed request", measured["static"]["failed"] + measured["elastic"]["failed"], "==", 0, unit="requests"),
    ]
    flags = " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "quick")
    write_result("sim_reality", title="Simulator vs a measured local fleet",
                 question="Does the simulator predict the local fleet's elastic/static throughput ratio within 20%?",
                 command=f"python benchmarks/bench_sim_reality.py {flags}", figures=figures, goals=goals,
                 details={"measured": {k: measured[k] for k in ("static", "elastic", "call_overhead_s")},
                          "predicted": predicted, "trace_lines": len(trace)},
                 elapsed_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
