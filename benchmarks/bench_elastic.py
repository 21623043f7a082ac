"""Elastic vs static placement on traffic whose hot experts shift every few seconds.

    python benchmarks/bench_elastic.py [--duration 60] [--shift 15] [--zipf 1.2] [--out FILE]

The same fleet (4 workers) serves the same trace three times: with the
placement fixed on the spread placement (static), fixed on a placement the
planner made once from scratch on the load a spread fleet measured over the
trace's first ``--warmup`` seconds, with replicas where memory allows (warm:
the static baseline a careful operator would deploy), and with the controller
stepping every second (elastic). The measured runs replay the trace after
its warm-up window. Each token's expert is drawn from a Zipf distribution over the
experts, and the ranking rotates every ``--shift`` seconds. Reported:
throughput and p99 latency per second, zero failed requests, and, for the
elastic run, the replica count of every expert over time (PNG plot beside the JSON).
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
from common import RESULTS_DIR, goal, single, write_json, write_mixtral_checkpoint, write_result  # noqa: E402


def zipf_probs(n: int, s: float, shift: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    p /= p.sum()
    return np.roll(p, shift)


def client_loop(address, gates, layers, probs_at, tokens, stop, log, seed):
    from moefleet.router_service.client import FleetClient, FleetError

    rng = np.random.default_rng(seed)
    client = FleetClient(address, timeout=60)
    i = 0
    while not stop.is_set():
        layer = layers[i % len(layers)]
        i += 1
        now = time.monotonic()
        experts = rng.choice(len(probs_at(now)), size=tokens, p=probs_at(now))
        gate = gates[layer]
        direction = gate[experts] / gate[experts].norm(dim=-1, keepdim=True)
        hidden = torch.from_numpy(rng.standard_normal((tokens, gate.shape[1])).astype(np.float32)) * 0.3 + direction * 4.0
        t0 = time.monotonic()
        try:
            client.forward(layer, hidden)
            log.append((t0, time.monotonic() - t0, None))
        except FleetError as e:
            log.append((t0, time.monotonic() - t0, e.code.name))
    client.close()


def warm_placement(path: str, args, redis_url: str):
    """The static baseline planned once on a warm-up window: the planner from scratch (replicas where memory allows)
    on the load a spread fleet measured over the trace's first ``--warmup`` seconds."""
    from moefleet.controller.main import held_expert_bytes, load_matrix
    from moefleet.controller.planner import plan
    from moefleet.core.model import MoECheckpoint
    from moefleet.core.placement import Inventory, Placement
    from moefleet.core.state import StateStore

    result = run("warmup", path, args, redis_url, duration=args.warmup)
    ckpt = MoECheckpoint(path)
    store = StateStore(redis_url, namespace=result["namespace"])
    raw = store.read_load(None, 1.0, int(args.warmup) + 2, float("inf"))
    load = load_matrix(raw, list(ckpt.spec.moe_layers), ckpt.spec.layer.num_experts)
    cfg = result["controller_config"]
    knobs = cfg.planner
    expert_bytes = held_expert_bytes(ckpt, list(ckpt.spec.moe_layers), cfg.worker, local=True)
    planned = plan(load, Inventory(devices=cfg.devices), Placement(), knobs, expert_bytes=expert_bytes,
                   layers=list(ckpt.spec.moe_layers)).target
    return planned, load.tolist()


def run(mode: str, path: str, args, redis_url: str, duration: float | None = None, placement=None) -> dict:
    import ray

    from moefleet.controller.main import controller_actor_class
    from moefleet.core.config import FleetConfig, RouterConfig, WorkerConfig
    from moefleet.core.model import MoECheckpoint
    from moefleet.core.state import StateStore
    from moefleet.local import LocalFleet

    duration = args.duration if duration is None else duration
    ckpt = MoECheckpoint(path)
    layers = list(ckpt.spec.moe_layers)
    gates = {layer: ckpt.gate(layer)["weight"] for layer in layers}
    n_exp = ckpt.spec.layer.num_experts
    ns = f"elastic-{mode}-{uuid.uuid4().hex[:6]}"
    cfg = FleetConfig(
        checkpoint=path, num_workers=args.workers, redis_url=redis_url, namespace=ns, static=True,
        worker=WorkerConfig(num_cpus=0.5), router=RouterConfig(telemetry_interval_s=0.25, batch_window_ms=1.0),
    )
    fleet = LocalFleet(cfg)
    fleet.start(placement)
    store = StateStore(redis_url, namespace=ns)
    start = time.monotonic()
    # the trace's clock: the warm-up window is its first --warmup seconds, the measured runs follow it
    offset = args.warmup if mode != "warmup" else 0.0

    def probs_at(now):
        return zipf_probs(n_exp, args.zipf, int((now - start + offset) // args.shift) * (n_exp // 4))

    controller = None
    if mode == "elastic":  # the controller steps in a process of its own, as in a deployment, started before traffic
        ccfg = fleet.controller_config(
            interval_s=1.0, load_windows=3, load_half_life_s=1.5, min_tokens=10,
            planner={"max_moves_per_step": args.max_moves, "min_gain": 0.02},
        ).model_dump()
        controller = controller_actor_class().remote(ccfg, f"bench-{mode}", autorun=False)
        ray.get(controller.release.remote())
    stop = threading.Event()
    log: list = []
    threads = [
        threading.Thread(target=client_loop, args=(fleet.address, gates, layers, probs_at, args.tokens, stop, log, s))
        for s in range(args.clients)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    replicas = []  # (t, {expert_key: count})
    try:
        while time.monotonic() - start < duration:
            tick = time.monotonic()
            if controller is not None:
                ray.get(controller.step.remote())
            p = store.get_placement()
            counts = {f"{k[0]}:{k[1]}": len(v) for k, v in p.replicas().items()}
            replicas.append((tick - start, counts))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    fleet.stop()
    if mode == "elastic":  # the controller's detached workers
        from moefleet.core.placement import worker_actor_name

        for d in store.get_placement().assignments:
            try:
                ray.kill(ray.get_actor(worker_actor_name(d), namespace=ns))
            except ValueError:
                pass
    controller_config = fleet.controller_config()
    secs = max(1, int(duration))
    thr = np.zeros(secs)
    p99 = np.full(secs, np.nan)
    by_sec: list[list[float]] = [[] for _ in range(secs)]
    failures = 0
    for t0, dt, err in log:
        s = int(t0 - start)
        if err is not None:
            failures += 1
            continue
        if 0 <= s < secs:
            thr[s] += args.tokens
            by_sec[s].append(dt)
    for s, v in enumerate(by_sec):
        if v:
            p99[s] = np.percentile(v, 99) * 1000
    steady = [np.percentile(v, 99) * 1000 for v in by_sec[2:] if v]
    return {
        "mode": mode, "namespace": ns, "controller_config": controller_config, "tokens_per_s": thr.tolist(), "p99_ms": [None if np.isnan(x) else float(x) for x in p99],
        "mean_tokens_per_s": float(thr[2:].mean()), "failed_requests": failures, "requests": len(log),
        "p99_overall_ms": float(np.percentile([dt for _, dt, e in log if e is None], 99) * 1000),
        "p99_median_second_ms": float(np.median(steady)) if steady else None,
        "replicas": replicas,
    }


def recovery_times(result: dict, shift: float, factor: float = 1.5) -> list[float | None]:
    """Seconds after each shift until a second's p99 is back within ``factor`` x the run's median per-second p99."""
    p99 = result["p99_ms"]
    ref = result["p99_median_second_ms"]
    out = []
    for k in range(1, int(len(p99) // shift) + 1):
        t0 = int(k * shift)
        rec = next((s - t0 for s in range(t0, min(len(p99), t0 + int(shift))) if p99[s] is not None and p99[s] <= factor * ref), None)
        out.append(rec)
    return out


def plot(static: dict, elastic: dict, shift: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    for r in (static, elastic):
        ax[0].plot(r["tokens_per_s"], label=r["mode"])
        ax[1].plot([np.nan if v is None else v for v in r["p99_ms"]], label=r["mode"])
    ax[0].set_ylabel("tokens/s")
    ax[1].set_ylabel("p99 latency (ms)")
    keys = sorted({k for _, c in elastic["replicas"] for k in c}, key=lambda k: tuple(map(int, k.split(":"))))
    grid = np.array([[c.get(k, 0) for _, c in elastic["replicas"]] for k in keys])
    ts = [t for t, _ in elastic["replicas"]]
    im = ax[2].imshow(grid, aspect="auto", interpolation="nearest", extent=(ts[0], ts[-1] + 1, len(keys), 0), cmap="viridis")
    ax[2].set_yticks(np.arange(len(keys)) + 0.5, keys, fontsize=6)
    ax[2].set_ylabel("replicas per (layer:expert)")
    ax[2].set_xlabel("seconds")
    fig.colorbar(im, ax=ax[2], orientation="horizontal", fraction=0.05, pad=0.15)
    for a in ax:
        for k in range(1, int(len(static["tokens_per_s"]) // shift) + 1):
            a.axvline(k * shift, color="grey", linestyle=":", linewidth=0.8)
    ax[0].legend()
    ax[0].set_title("elastic vs static placement; dotted lines: hot-set shifts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--shift", type=float, default=15)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-moves", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=15,
                    help="seconds of the trace's start the warm-planned static baseline is planned on (spread fleet)")
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    from moefleet.core.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", hidden=512, ffn=1536, experts=16, top_k=2, layers=2))
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        try:
            static = run("static", path, args, redis.url)
            planned, warm_load = warm_placement(path, args, redis.url)
            warm = run("warm", path, args, redis.url, placement=planned)
            elastic = run("elastic", path, args, redis.url)
        finally:
            ray.shutdown()
            redis.stop()
    for r in (static, warm, elastic):
        r.pop("controller_config", None)
    warm["placement"] = planned.model_dump(mode="json")
    warm["warmup_load"] = warm_load
    result = {
        "args": vars(args), "static": static, "warm": warm, "elastic": elastic,
        "throughput_ratio_elastic_over_static": elastic["mean_tokens_per_s"] / static["mean_tokens_per_s"],
        "throughput_ratio_elastic_over_warm": elastic["mean_tokens_per_s"] / warm["mean_tokens_per_s"],
        "elastic_recovery_s_after_shifts": recovery_times(elastic, args.shift),
        "static_recovery_s_after_shifts": recovery_times(static, args.shift),
    }
    print(f"static : {static['mean_tokens_per_s']:9,.0f} tokens/s, p99 {static['p99_overall_ms']:.0f} ms, failed {static['failed_requests']}/{static['requests']}")
    print(f"elastic: {elastic['mean_tokens_per_s']:9,.0f} tokens/s, p99 {elastic['p99_overall_ms']:.0f} ms, failed {elastic['failed_requests']}/{elastic['requests']}")
    print(f"warm   : {warm['mean_tokens_per_s']:9,.0f} tokens/s, p99 {warm['p99_overall_ms']:.0f} ms, failed {warm['failed_requests']}/{warm['requests']}")
    print(f"throughput elastic/static: {result['throughput_ratio_elastic_over_static']:.2f}, elastic/warm-planned static: "
          f"{result['throughput_ratio_elastic_over_warm']:.2f}")
    print(f"elastic p99 back within 1.5x steady state after each shift (s): {result['elastic_recovery_s_after_shifts']}")
    write_json("elastic", result, args.out)
    png = Path(args.out).with_suffix(".png") if args.out else RESULTS_DIR / "elastic.png"
    plot(static, elastic, args.shift, png)
    modes = (("static", static), ("warm", warm), ("elastic", elastic))
    figures = {f"{m} tokens/s": single(r["mean_tokens_per_s"], "tokens/s") for m, r in modes}
    figures.update({f"{m} p99 ms": single(r["p99_overall_ms"], "ms") for m, r in modes})
    figures["elastic / static tokens/s"] = single(result["throughput_ratio_elastic_over_static"], "x",
                                                  "static: the spread placement, no replicas")
    figures["elastic / warm-planned static tokens/s"] = single(
        result["throughput_ratio_elastic_over_warm"], "x",
        f"static planned once by the planner on the first {args.warmup:g} s, replicas where memory allows")
    goals = [
        goal("elastic >= 2x static tokens/s", result["throughput_ratio_elastic_over_static"], ">=", 2.0, unit="x"),
        goal("no failed request in any mode", sum(r["failed_requests"] for _, r in modes), "==", 0, unit="requests"),
    ]
    argv = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    write_result("elastic", title="Elastic vs static placement (local fleet)",
                 question="Does the controller's re-placement raise throughput when the hot experts move?",
                 command=f"python benchmarks/bench_elastic.py {argv}", figures=figures, goals=goals,
                 plots=[str(png.relative_to(RESULTS_DIR.parent))] if png.is_relative_to(RESULTS_DIR.parent) else [],
                 details=result)


if __name__ == "__main__":
    main()
