"""What serving through the fleet costs over running the layer in process, with the same cores, stage by stage.

    python benchmarks/bench_serving_cost.py [--rounds 3] [--n 20] [--quick] [--out FILE]

One Mixtral-shaped layer (H=1024, F=2816, E=8, top-2, fp32). The fleet: one
ExpertGroup worker owning both cores (pinned, 2 torch threads), a static
fleet (no controller), reached two ways — *grpc*: the grpc.aio router in a Ray
actor, called over gRPC from this process; *embedded*: the router core in this
process (``EmbeddedRouter``, what ``moefleet.connect(embedded=True)`` gives).
Both reach the worker the way the product's default (``compiled_graphs:
auto``) does: plain actor calls to a CPU worker, through Ray's shared-memory
object store (``--compiled-graphs on``: each router on its own compiled graph,
whose reader keeps a core of the worker polling). *in-process*: the same layer in this process with the
same two cores, measured in the same run with Ray and the fleet up and idle.
Only the serving path differs.

Sequential calls at T = 32 and 256 tokens (p50 of every call; the two
configurations alternate in rounds so drift hits both) and at 4096 tokens
(throughput = T / median call time). For the fleet, every stage of a call
(``moefleet.core.stages``): client encode/decode timed here, the router's and
the worker's read from the router's stage timers, and gRPC as what is left of
the client's round trip. Goals (issue 16): gRPC p50 ratio at 32 tokens <= 1.15,
at 256 <= 1.10, throughput ratio at 4096 >= 0.95; embedded <= 1.05, <= 1.05, >= 0.97.
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

GOALS = {"grpc": (1.15, 1.10, 0.95), "embedded": (1.05, 1.05, 0.97)}
"""Per path: p50 ratio at 32 tokens, at 256 tokens (at most), throughput ratio at the large size (at least)."""


class TimedClient:
    """``FleetClient.forward`` taken apart: encode, the RPC, decode, each timed."""

    def __init__(self, client):
        from moefleet.router_service import client as client_mod

        self.c = client
        self.mod = client_mod
        self.encode_s: list[float] = []
        self.total_s: list[float] = []
        self.decode_s: list[float] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        req = self.mod.request_bytes(0, x, None, False)
        t1 = time.perf_counter()
        raw = self.c._forward(req, timeout=120)
        t2 = time.perf_counter()
        out = self.mod.result(*self.mod.parse_reply(raw), False)
        t3 = time.perf_counter()
        self.encode_s.append(t1 - t0)
        self.decode_s.append(t3 - t2)
        self.total_s.append(t3 - t0)
        return out

    def reset(self):
        self.encode_s, self.total_s, self.decode_s = [], [], []


def proc_sample(pid: int) -> dict:
    """CPU seconds, minor page faults and seconds spent runnable but waiting for a core (all threads) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                wait += int(f.read().split()[1])
        except OSError:  # a thread that ended
            pass
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / tick, "minflt": int(fields[7]), "wait_s": wait / 1e9}


def system_busy_s() -> float:
    """CPU seconds every process of the machine has used (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternations of in-process and the fleet paths per point")
    ap.add_argument("--n", type=int, default=20, help="calls per round at 32 and 256 tokens")
    ap.add_argument("--n-large", type=int, default=3, help="calls per round at the large size")
    ap.add_argument("--large", type=int, default=4096, help="tokens of the throughput point")
    ap.add_argument("--paths", nargs="+", default=["grpc", "embedded"], choices=["grpc", "embedded"],
                    help="fleet paths measured against the in-process layer")
    ap.add_argument("--compiled-graphs", choices=["auto", "on", "off"], default="auto",
                    help="the routers' compiled_graphs policy (auto: graphs over GPU workers only, so none here)")
    ap.add_argument("--quick", action="store_true", help="small layer, few calls (a smoke run)")
    ap.add_argument("--batch-window-ms", type=float, default=None, help="router micro-batch window (default: the fleet's default)")
    ap.add_argument("--profile-dir", help="run py-spy on the router and worker at each point; folded stacks go here")
    ap.add_argument("--out")
    args = ap.parse_args()
    t_start = time.perf_counter()
    shape = dict(hidden=1024, ffn=2816, experts=8, top_k=2)
    if args.quick:
        shape = dict(hidden=256, ffn=512, experts=8, top_k=2)
        args.rounds, args.n, args.n_large, args.large = 1, 5, 2, 1024
    points = (32, 256, args.large)

    import ray

    from moefleet import MoEModel
    from moefleet.core.config import FleetConfig, RouterConfig
    from moefleet.core.redis_server import RedisServer
    from moefleet.core.stages import STAGES, per_call_ms
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient
    from moefleet.router_service.embedded import EmbeddedRouter

    results: dict = {"shape": shape, "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", **shape))
        model = MoEModel.from_pretrained(path, backend="torch")
        layer = model.layer(0)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        router_kw = {"compiled_graphs": args.compiled_graphs}
        if args.batch_window_ms is not None:
            router_kw["batch_window_ms"] = args.batch_window_ms
        cfg = FleetConfig(checkpoint=path, num_workers=1, static=True, redis_url=redis.url, http_port=None,
                          namespace=f"cost-{uuid.uuid4().hex[:6]}", router=RouterConfig(**router_kw))
        fleet = LocalFleet(cfg)
        fleet.start()
        client = FleetClient(fleet.address, timeout=120)
        client.wait_ready(60)
        embedded = EmbeddedRouter(path, redis.url, cfg.namespace, compiled_graphs=args.compiled_graphs)
        embedded.wait_ready(60)
        if args.compiled_graphs == "on":  # both routers' graphs compiled before anything is timed
            wait_until(lambda: embedded.core.transport_report().get("graph"), 60)
            wait_until(lambda: fleet.router_stats()[0]["transport"].get("graph"), 60)
        wstats = next(iter(fleet.worker_stats().values()))
        worker_pid, router_pid = wstats["pid"], fleet.router_stats()[0]["pid"]
        results["worker"] = {"cpus": wstats.get("cpus"), "torch_threads": wstats.get("torch_threads")}
        results["in_process_torch_threads"] = torch.get_num_threads()
        print(f"worker cores {wstats.get('cpus')} ({wstats.get('torch_threads')} torch threads); "
              f"in-process: {torch.get_num_threads()} torch threads; transports: gRPC router "
              f"{fleet.router_stats()[0]['transport']['kind']}, embedded {embedded.core.transport_report()['kind']}", flush=True)
        grpc_call = TimedClient(client)
        calls = {"grpc": grpc_call, "embedded": lambda x: embedded.forward(0, x)}
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, shape["hidden"], generator=g)
        want = layer(x)
        results["max_abs_error"] = {p: float((calls[p](x) - want).abs().max()) for p in args.paths}

        for t in points:
            n = args.n if t != args.large else args.n_large
            x = torch.randn(t, shape["hidden"], generator=g)
            layer(x)
            for p in args.paths:
                calls[p](x)  # warm
            samples: dict[str, list[float]] = {"in_process": [], **{p: [] for p in args.paths}}
            grpc_call.reset()
            before = {"grpc": fleet.router_stats()[0]["stages"], "embedded": embedded.core.stages.totals()}
            procs = {"worker": worker_pid, "router": router_pid, "client": os.getpid()}
            p0 = {k: proc_sample(v) for k, v in procs.items()}
            sys0 = system_busy_s()
            prof = start_profiles(fleet, args.profile_dir, f"T{t}") if args.profile_dir else None
            round_ratios: dict[str, list[float]] = {p: [] for p in args.paths}
            for _ in range(args.rounds):
                this = {}
                for name in ("in_process", *args.paths):
                    fn = layer if name == "in_process" else calls[name]
                    this[name] = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        fn(x)
                        this[name].append(time.perf_counter() - t0)
                    samples[name].extend(this[name])
                for p in args.paths:
                    round_ratios[p].append(float(np.median(this[p]) / np.median(this["in_process"])))
            if prof:
                stop_profiles(prof)
            after = {"grpc": fleet.router_stats()[0]["stages"], "embedded": embedded.core.stages.totals()}
            sys1 = system_busy_s()
            p1 = {k: proc_sample(v) for k, v in procs.items()}
            wall = sum(sum(v) for v in samples.values())
            stages = {}
            for p in args.paths:
                st = per_call_ms(before[p], after[p], len(samples[p]))
                if p == "grpc":
                    st["client_encode"] = 1000 * float(np.mean(grpc_call.encode_s))
                    st["client_decode"] = 1000 * float(np.mean(grpc_call.decode_s))
                    total = 1000 * float(np.mean(grpc_call.total_s))
                    st["grpc"] = total - st["client_encode"] - st["client_decode"] - st.get("router_total", 0.0)
                stages[p] = {s: st[s] for s in STAGES if s in st}
            cpu = {k: {m: p1[k][m] - p0[k][m] for m in p0[k]} for k in procs}
            cpu["others"] = {"cpu_s": (sys1 - sys0) - sum(c["cpu_s"] for c in cpu.values())}
            results[f"T{t}"] = {
                **{name: percentiles(v) for name, v in samples.items()},
                "stages_ms_per_call": stages, "processes": cpu, "wall_s": wall, "round_ratios": round_ratios,
            }
            r = results[f"T{t}"]
            line = f"T={t:5d}: in-process p50 {r['in_process']['p50_ms']:8.2f} ms"
            for p in args.paths:
                line += f", {p} p50 {r[p]['p50_ms']:8.2f} ms ({r[p]['p50_ms'] / r['in_process']['p50_ms']:.3f}x)"
            print(line, flush=True)
        results["transport"] = {"grpc": fleet.router_stats()[0]["transport"], "embedded": embedded.core.transport_report()}
        embedded.close()
        client.close()
        fleet.stop()
        ray.shutdown()
        redis.stop()

    def p50(t, who):
        return results[f"T{t}"][who]["p50_ms"]

    ratios = {}
    for p in args.paths:
        ratios[f"{p}_p50_32"] = p50(32, p) / p50(32, "in_process")
        ratios[f"{p}_p50_256"] = p50(256, p) / p50(256, "in_process")
        ratios[f"{p}_throughput_{args.large}"] = p50(args.large, "in_process") / p50(args.large, p)
    results["ratios"] = ratios

    for p in args.paths:
        print(f"\n{p}: {'stage (ms per call)':28s}" + "".join(f"{'T=' + str(t):>10s}" for t in points))
        for s in STAGES:
            row = [results[f"T{t}"]["stages_ms_per_call"][p].get(s) for t in points]
            if any(v is not None for v in row):
                print(f"{'':{len(p) + 2}s}{s:28s}" + "".join(f"{v:10.2f}" if v is not None else f"{'-':>10s}" for v in row))
    print("\nCPU during each point (all paths), cores used on average; worker: ms runnable but waiting for a core per call")
    for name in ("worker", "router", "client", "others"):
        print(f"{name + ' cores':34s}" + "".join(
            f"{results[f'T{t}']['processes'][name]['cpu_s'] / results[f'T{t}']['wall_s']:10.2f}" for t in points))
    print()
    for k, v in ratios.items():
        print(f"{k:28s} {v:6.3f}")
    print(f"max abs error vs in-process: {results['max_abs_error']}")
    write_json("serving_cost", results, args.out)

    figures = {}
    for t in points:
        r = results[f"T{t}"]
        figures[f"in-process p50@{t}"] = single(r["in_process"]["p50_ms"], "ms")
        for p in args.paths:
            figures[f"{p} p50@{t}"] = single(r[p]["p50_ms"], "ms")
            figures[f"{p} / in-process p50@{t}, per round"] = spread(r["round_ratios"][p], "x", "rounds alternate the paths")
            for stage, ms in r["stages_ms_per_call"][p].items():
                figures[f"{p} T={t} {stage}"] = single(ms, "ms", STAGES[stage])
    goals = []
    for p in args.paths:
        g32, g256, gtp = GOALS[p]
        goals += [
            goal(f"{p} p50@32 <= {g32}x in-process", ratios[f"{p}_p50_32"], "<=", g32, unit="x"),
            goal(f"{p} p50@256 <= {g256}x in-process", ratios[f"{p}_p50_256"], "<=", g256, unit="x"),
            goal(f"{p} throughput@{args.large} >= {gtp}x in-process", ratios[f"{p}_throughput_{args.large}"], ">=", gtp,
                 unit="x", note="throughput = tokens / median call time, one call in flight"),
            goal(f"{p} output = in-process output (max abs error)", results["max_abs_error"][p], "<=", 1e-5),
        ]
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
                     if v is not None and k not in ("out", "quick", "profile_dir"))
    write_result("serving_cost", title="Serving cost: one worker owning both cores vs the in-process layer (gRPC and embedded)",
                 question="What does a layer call cost through the fleet, over gRPC and with the router embedded in the caller, "
                          "over the same layer in process on the same cores, and where does the difference go?",
                 command=f"python benchmarks/bench_serving_cost.py {flags}" + (" --quick" if args.quick else ""),
                 figures=figures, goals=goals, details=results, elapsed_s=time.perf_counter() - t_start)


def start_profiles(fleet, out_dir: str, tag: str) -> list:
    """py-spy record on the router and worker processes (``--profile-dir``); returns the running recorders."""
    import subprocess

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    pids = {"router": fleet.router_stats()[0]["pid"], **{d: s["pid"] for d, s in fleet.worker_stats().items()}}
    spy = py_spy_binary()
    procs = []
    for name, pid in pids.items():
        out = Path(out_dir) / f"{name}-{tag}.txt"  # folded stacks (flamegraph.pl / speedscope read them)
        procs.append(subprocess.Popen([spy, "record", "--pid", str(pid), "--output", str(out), "--format", "raw", "--rate", "250",
                                       "--threads", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)
    return procs


def py_spy_binary() -> str:
    """The py-spy executable of the installed ``py-spy`` distribution (or on PATH)."""
    import shutil
    from importlib import metadata

    try:
        dist = metadata.distribution("py-spy")
        for f in dist.files or []:
            if f.name == "py-spy":
                return str(f.locate().resolve())
    except metadata.PackageNotFoundError:
        pass
    found = shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile-dir needs py-spy: pip install py-spy")
    return found


def stop_profiles(procs: list) -> None:
    import signal

    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        p.wait(timeout=60)


if __name__ == "__main__":
    main()
