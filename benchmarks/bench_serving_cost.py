"""What serving through the fleet costs over running the layer in process, with the same cores, stage by stage.

    python benchmarks/bench_serving_cost.py [--rounds 3] [--n 20] [--quick] [--out FILE]

One Mixtral-shaped layer (H=1024, F=2816, E=8, top-2, fp32). *fleet*: one
ExpertGroup worker owning both cores (pinned, 2 torch threads), a static
fleet (no controller), the grpc.aio router in a Ray actor, called over gRPC
from this process. *in-process*: the same layer in this process with the
same two cores, measured in the same run with Ray and the fleet up and idle.
Only the serving path differs.

Sequential calls at T = 32 and 256 tokens (p50 of every call; the two
configurations alternate in rounds so drift hits both) and at 4096 tokens
(throughput = T / median call time). For the fleet, every stage of a call
(``moefleet.core.stages``): client encode/decode timed here, the router's and
the worker's read from the router's stage timers, and gRPC as what is left of
the client's round trip. Goals (issue 12): p50 ratio at 32 tokens <= 1.3,
at 256 tokens <= 1.25, throughput ratio at 4096 >= 0.95.
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
from common import goal, percentiles, single, spread, write_json, write_mixtral_checkpoint, write_result  # noqa: E402

GOALS = {"p50_32": 1.3, "p50_256": 1.25, "throughput_4096": 0.95}


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
    ap.add_argument("--rounds", type=int, default=3, help="alternations of in-process and fleet per point")
    ap.add_argument("--n", type=int, default=20, help="calls per round at 32 and 256 tokens")
    ap.add_argument("--n-large", type=int, default=3, help="calls per round at the large size")
    ap.add_argument("--large", type=int, default=4096, help="tokens of the throughput point")
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

    results: dict = {"shape": shape, "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_mixtral_checkpoint(Path(tmp) / "ckpt", **shape))
        model = MoEModel.from_pretrained(path, backend="torch")
        layer = model.layer(0)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        redis = RedisServer()
        router_kw = {} if args.batch_window_ms is None else {"batch_window_ms": args.batch_window_ms}
        cfg = FleetConfig(checkpoint=path, num_workers=1, static=True, redis_url=redis.url,
                          namespace=f"cost-{uuid.uuid4().hex[:6]}", router=RouterConfig(**router_kw))
        fleet = LocalFleet(cfg)
        fleet.start()
        client = FleetClient(fleet.address, timeout=120)
        client.wait_ready(60)
        wstats = next(iter(fleet.worker_stats().values()))
        worker_pid, router_pid = wstats["pid"], fleet.router_stats()[0]["pid"]
        results["worker"] = {"cpus": wstats.get("cpus"), "torch_threads": wstats.get("torch_threads")}
        results["in_process_torch_threads"] = torch.get_num_threads()
        print(f"worker cores {wstats.get('cpus')} ({wstats.get('torch_threads')} torch threads); "
              f"in-process: {torch.get_num_threads()} torch threads", flush=True)
        fleet_call = TimedClient(client)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, shape["hidden"], generator=g)
        results["fleet_max_abs_error"] = float((fleet_call(x) - layer(x)).abs().max())

        for t in points:
            n = args.n if t != args.large else args.n_large
            x = torch.randn(t, shape["hidden"], generator=g)
            layer(x), fleet_call(x)  # warm both
            ip, fl = [], []
            fleet_call.reset()
            before = fleet.router_stats()[0]["stages"]
            procs = {"worker": worker_pid, "router": router_pid, "client": os.getpid()}
            p0 = {k: proc_sample(v) for k, v in procs.items()}
            sys0 = system_busy_s()
            prof = None
            if args.profile_dir:
                prof = start_profiles(fleet, args.profile_dir, f"T{t}")
            round_ratios = []
            for _ in range(args.rounds):
                ip_round = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    layer(x)
                    ip_round.append(time.perf_counter() - t0)
                for _ in range(n):
                    fleet_call(x)
                fl_round = fleet_call.total_s[len(fl):]
                ip.extend(ip_round)
                fl.extend(fl_round)
                round_ratios.append(float(np.median(fl_round) / np.median(ip_round)))
            if prof:
                stop_profiles(prof)
            after = fleet.router_stats()[0]["stages"]
            sys1 = system_busy_s()
            p1 = {k: proc_sample(v) for k, v in procs.items()}
            calls = len(fleet_call.total_s)
            stages = per_call_ms(before, after, calls)
            stages["client_encode"] = 1000 * float(np.mean(fleet_call.encode_s))
            stages["client_decode"] = 1000 * float(np.mean(fleet_call.decode_s))
            total = 1000 * float(np.mean(fleet_call.total_s))
            stages["grpc"] = total - stages["client_encode"] - stages["client_decode"] - stages.get("router_total", 0.0)
            # where the machine's CPU went during this point (in-process calls included: the client's figure)
            cpu = {k: {m: p1[k][m] - p0[k][m] for m in p0[k]} for k in procs}
            cpu["others"] = {"cpu_s": (sys1 - sys0) - sum(c["cpu_s"] for c in cpu.values())}
            results[f"T{t}"] = {
                "in_process": percentiles(ip), "fleet": percentiles(fl), "fleet_mean_ms": total,
                "stages_ms_per_call": {s: stages[s] for s in STAGES if s in stages},
                "processes": cpu, "wall_s": sum(ip) + sum(fl), "round_ratios": round_ratios,
            }
            r = results[f"T{t}"]
            print(f"T={t:5d}: in-process p50 {r['in_process']['p50_ms']:8.1f} ms, fleet p50 {r['fleet']['p50_ms']:8.1f} ms "
                  f"({r['fleet']['p50_ms'] / r['in_process']['p50_ms']:.2f}x)", flush=True)
        client.close()
        fleet.stop()
        ray.shutdown()
        redis.stop()

    def p50(t, who):
        return results[f"T{t}"][who]["p50_ms"]

    ratios = {
        "p50_32": p50(32, "fleet") / p50(32, "in_process"),
        "p50_256": p50(256, "fleet") / p50(256, "in_process"),
        f"throughput_{args.large}": p50(args.large, "in_process") / p50(args.large, "fleet"),
    }
    results["ratios"] = ratios
    results["goals"] = {k: {"goal": GOALS.get(k), "met": (v <= GOALS[k]) if k.startswith("p50") else (v >= GOALS[k])}
                        for k, v in ratios.items() if k in GOALS}

    print(f"\n{'stage (fleet, ms per call)':34s}" + "".join(f"{'T=' + str(t):>10s}" for t in points))
    for s in STAGES:
        row = [results[f"T{t}"]["stages_ms_per_call"].get(s) for t in points]
        if any(v is not None for v in row):
            print(f"{s:34s}" + "".join(f"{v:10.2f}" if v is not None else f"{'-':>10s}" for v in row))
    print(f"{'fleet mean round trip':34s}" + "".join(f"{results[f'T{t}']['fleet_mean_ms']:10.2f}" for t in points))
    print(f"{'in-process p50':34s}" + "".join(f"{p50(t, 'in_process'):10.2f}" for t in points))
    print(f"{'fleet p50':34s}" + "".join(f"{p50(t, 'fleet'):10.2f}" for t in points))
    print("\nCPU during each point (fleet and in-process calls), cores used on average; worker: page faults per fleet call,"
          " ms per fleet call runnable but waiting for a core")
    for name in ("worker", "router", "client", "others"):
        print(f"{name + ' cores':34s}" + "".join(
            f"{results[f'T{t}']['processes'][name]['cpu_s'] / results[f'T{t}']['wall_s']:10.2f}" for t in points))
    nf = {t: results[f"T{t}"]["fleet"]["n"] for t in points}
    print(f"{'worker CPU ms / call':34s}" + "".join(f"{1000 * results[f'T{t}']['processes']['worker']['cpu_s'] / nf[t]:10.1f}" for t in points))
    print(f"{'worker minor faults / call':34s}" + "".join(f"{results[f'T{t}']['processes']['worker']['minflt'] / nf[t]:10.0f}" for t in points))
    print(f"{'worker run-queue wait ms / call':34s}" + "".join(
        f"{1000 * results[f'T{t}']['processes']['worker']['wait_s'] / nf[t]:10.2f}" for t in points))
    print()
    for k, v in ratios.items():
        target = GOALS.get(k)
        met = "" if target is None else ("  goal <= %.2f: %s" % (target, "met" if v <= target else "NOT met") if k.startswith("p50")
                                         else "  goal >= %.2f: %s" % (target, "met" if v >= target else "NOT met"))
        print(f"fleet/in-process {k:18s} {v:6.2f}{met}")
    print(f"fleet max abs error vs in-process: {results['fleet_max_abs_error']:.2e}")
    write_json("serving_cost", results, args.out)

    figures = {}
    for t in points:
        r = results[f"T{t}"]
        figures[f"in-process p50@{t}"] = single(r["in_process"]["p50_ms"], "ms")
        figures[f"fleet p50@{t}"] = single(r["fleet"]["p50_ms"], "ms")
        figures[f"fleet / in-process p50@{t}, per round"] = spread(r["round_ratios"], "x", "rounds alternate in-process and fleet calls")
        for stage, ms in r["stages_ms_per_call"].items():
            figures[f"T={t} {stage}"] = single(ms, "ms", STAGES[stage])
    goals = [
        goal("fleet p50@32 <= 1.3x in-process", ratios["p50_32"], "<=", GOALS["p50_32"], unit="x"),
        goal("fleet p50@256 <= 1.25x in-process", ratios["p50_256"], "<=", GOALS["p50_256"], unit="x"),
        goal(f"fleet throughput@{args.large} >= 0.95x in-process", ratios[f"throughput_{args.large}"], ">=",
             GOALS["throughput_4096"], unit="x", note="throughput = tokens / median call time"),
        goal("fleet output = in-process output (max abs error)", results["fleet_max_abs_error"], "<=", 1e-5),
    ]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if v is not None and k not in ("out", "quick", "profile_dir"))
    write_result("serving_cost", title="Serving cost: one worker owning both cores vs the in-process layer",
                 question="What does a layer call cost through the fleet over the same layer in process on the same cores, "
                          "and where does the difference go?",
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
