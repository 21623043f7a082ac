"""Reliability of a local fleet: hostile input, 5x overload, and a soak with a worker killed in the middle.

    python benchmarks/bench_reliability.py [--fuzz 12000] [--overload-s 20] [--soak-s 600] [--quick] [--out FILE]

Three parts, each on a fresh local fleet (real Ray, Redis and gRPC on loopback; 2 workers):

1. Fuzz: requests from the hypothesis strategies over the proto and raw byte mutations of valid
   messages (``tests/fuzz_inputs.py``, the same as the test), sent to ``Forward``; every status
   counted; only the documented ones may appear; valid requests must come back exact; afterwards
   the fleet must be exact and hold nothing in flight.
2. Overload: capacity X (requests/s) is measured with a closed loop at the router's admission limit
   (``max_queued_requests`` = 4); then requests are offered open-loop at 5X for the same
   time. Reported: accepted requests completed / failed / exact, the refusals' status and their
   latency seen by the client (goal: within 50 ms), goodput against X, and the router's resident
   memory (sampled every 50 ms) against the bound its settings give.
3. Soak: mixed traffic (80 % valid, 10 % oversized, 10 % malformed) from 3 clients for --soak-s
   seconds with the controller running and two replicas of every expert; the process of worker-1 is
   killed (SIGKILL) halfway and the controller starts a fresh one. Reported: requests of each kind,
   valid ones answered exact / failed with a status / lost (no answer at all), resident memory of the
   router and workers after warm-up and at the end, and what the router and workers hold in flight
   at the end.

Prints a markdown table, writes benchmarks/results/reliability.json (figures and goals, for
benchmarks/RESULTS.md) and the raw data to benchmarks/out/reliability.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # tests.fuzz_inputs, tests.hf_models

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import goal, percentiles, single, write_json, write_mixtral_checkpoint, write_result  # noqa: E402

MIB = 1 << 20
PER_CALL = 64 << 10  # a call's own bookkeeping in the router (gRPC call state, buffers, task): part of the memory bound


def rss_mib(pid: int, field: str = "RssAnon") -> float:
    """Resident memory of a process in MiB: ``RssAnon`` (its own heap and stacks; default) or ``VmRSS`` (also the
    shared pages it touched, such as Ray's object store)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Samples a process's resident memory every ``period_s`` in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, period_s: float = 0.05):
        self.pid, self.period_s = pid, period_s
        self.start_mib = rss_mib(pid)
        self.peak = self.start_mib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return rss_mib(self.pid)


def _raw_stubs(address: str, max_message: int, aio: bool = False):
    mod = grpc.aio if aio else grpc
    channel = mod.insecure_channel(address, options=[("grpc.max_send_message_length", 4 * max_message),
                                                     ("grpc.max_receive_message_length", 4 * max_message)])
    from moefleet.router_service.proto import fleet_pb2 as pb

    forward = channel.unary_unary("/moefleet.v1.MoEFleet/Forward", request_serializer=None,
                                  response_deserializer=pb.ForwardResponse.FromString)
    return channel, forward


def _fleet(path: str, router, **over):
    from moefleet.core.config import FleetConfig
    from moefleet.local import LocalFleet
    from moefleet.router_service.client import FleetClient

    cfg = dict(checkpoint=path, num_workers=2, router=router, namespace=f"rel-{uuid.uuid4().hex[:8]}", static=True)
    cfg.update(over)
    fleet = LocalFleet(FleetConfig(**cfg))
    fleet.start()
    with FleetClient(fleet.address) as c:
        c.wait_ready(120)
    return fleet


def _held(fleet) -> dict:
    """What the router and the workers still hold (all zero when nothing is in flight)."""
    deadline = time.monotonic() + 10
    while True:
        (r,) = fleet.router_stats()
        w = fleet.worker_stats()
        held = {"router_queued": r["queued"], "router_inflight_tokens": r["inflight_tokens"],
                "router_inflight_bytes": r["inflight_bytes"], "worker_queue_depth": sum(s["queue_depth"] for s in w.values())}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


# -- 1. fuzz ------------------------------------------------------------------------------------
def fuzz(path: str, n: int) -> dict:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from moefleet import MoEModel
    from moefleet.core.config import RouterConfig
    from moefleet.router_service.client import FleetClient
    from tests.fuzz_inputs import FORWARD_CODES, H, LAYERS, check_reply, mutated_requests, requests

    max_message = 256 << 10
    fleet = _fleet(path, RouterConfig(max_message_bytes=max_message, max_request_tokens=512, metrics_port=None))
    model = MoEModel.from_pretrained(path)
    channel, forward = _raw_stubs(fleet.address, max_message)
    seen: Counter = Counter()
    undocumented: list = []

    def send(raws: list[bytes]) -> None:
        futures = [forward.future(raw, timeout=60) for raw in raws]
        for raw, fut in zip(raws, futures):
            try:
                reply, code, details = fut.result(), grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                reply, code, details = None, e.code(), e.details()
            seen[code.name] += 1
            try:
                check_reply(model, raw, code, reply, details)
            except AssertionError as e:
                undocumented.append(str(e)[:300])

    per_example = 40
    half = n // 2

    @settings(max_examples=max(1, half // per_example), deadline=None, database=None, derandomize=True,
              phases=(Phase.generate,), suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(requests(), min_size=per_example, max_size=per_example))
    def from_strategies(batch):
        send([m.SerializeToString() for m in batch])

    t0 = time.monotonic()
    from_strategies()
    by_hypothesis = sum(seen.values())
    mutated = mutated_requests(random.Random(7), n - by_hypothesis)
    for i in range(0, len(mutated), 200):
        send(mutated[i : i + 200])
    elapsed = time.monotonic() - t0
    channel.close()
    with FleetClient(fleet.address) as client:
        x = torch.randn(9, H, generator=torch.Generator().manual_seed(1))
        worst = max((client.forward(layer, x) - model.layer(layer)(x)).abs().max().item() for layer in LAYERS)
    held = _held(fleet)
    fleet.stop()
    return {
        "requests": sum(seen.values()), "from_strategies": by_hypothesis, "mutations": len(mutated), "seconds": elapsed,
        "statuses": dict(seen), "undocumented_or_wrong": undocumented[:20], "undocumented_count": len(undocumented),
        "documented": sorted(c.name for c in FORWARD_CODES), "after_max_abs_err": worst, "held_after": held,
    }


# -- 2. overload --------------------------------------------------------------------------------
def overload(path: str, hidden: int, tokens: int, seconds: float, slots: int = 4) -> dict:
    from moefleet import MoEModel
    from moefleet.core.config import RouterConfig
    from moefleet.router_service import codec
    from moefleet.router_service.proto import fleet_pb2 as pb

    model = MoEModel.from_pretrained(path)
    xs = [torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    wants = [model.layer(0)(x) for x in xs]
    raws = [pb.ForwardRequest(layer=0, hidden=codec.encode(x)).SerializeToString() for x in xs]
    req_bytes = len(raws[0])
    router = RouterConfig(  # admission by count binds (slots); the byte limit bounds memory
        max_queued_requests=slots, max_message_bytes=2 * req_bytes, max_inflight_bytes=slots * 2 * req_bytes,
        max_concurrent_rpcs=64, metrics_port=None,
    )
    fleet = _fleet(path, router)
    router_pid = fleet.router_stats()[0]["pid"]

    async def closed_loop(concurrency: int, duration: float) -> list:
        channel, forward = _raw_stubs(fleet.address, router.max_message_bytes, aio=True)
        out = []
        stop_at = time.monotonic() + duration

        async def client(k: int):
            i = k
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                try:
                    await forward(raws[i % len(raws)], timeout=60)
                    out.append((t0, time.monotonic(), "OK"))
                except grpc.aio.AioRpcError as e:
                    out.append((t0, time.monotonic(), e.code().name))
                i += concurrency

        await asyncio.gather(*(client(k) for k in range(concurrency)))
        await channel.close()
        return out

    async def open_loop(rate: float, duration: float) -> list:
        channel, forward = _raw_stubs(fleet.address, router.max_message_bytes, aio=True)
        out, tasks = [], []

        async def one(i: int):
            t0 = time.monotonic()
            try:
                reply = await forward(raws[i % len(raws)], timeout=60)
                out.append((t0, time.monotonic(), "OK", (i, reply)))  # checked after the run: the client stays light
            except grpc.aio.AioRpcError as e:
                md = dict(e.trailing_metadata() or ())
                out.append((t0, time.monotonic(), e.code().name, md.get("grpc-retry-pushback-ms")))

        start = time.monotonic()
        i = 0
        while time.monotonic() - start < duration:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        await channel.close()
        return out

    asyncio.run(closed_loop(slots, 3.0))  # warm-up
    base = asyncio.run(closed_loop(slots, seconds))
    ok = [r for r in base if r[2] == "OK"]
    capacity = len(ok) / seconds
    sampler = RssSampler(router_pid)
    start_rss = sampler.start_mib
    over = asyncio.run(open_loop(5 * capacity, seconds))
    end_rss = sampler.stop()
    held = _held(fleet)
    fleet.stop()
    # The same offered load on a router that holds its admitted requests in a 5 s batch window: the workers
    # idle, so the refusals' latency is the router's own, without two saturated workers on the same cores.
    fleet = _fleet(path, router.model_copy(update={"batch_window_ms": 5000.0}))
    idle_sampler = RssSampler(fleet.router_stats()[0]["pid"])
    idle = asyncio.run(open_loop(5 * capacity, seconds))
    idle_end = idle_sampler.stop()
    fleet.stop()
    idle_refused = [b - a for a, b, code, _ in idle if code == "RESOURCE_EXHAUSTED"]
    accepted = [r for r in over if r[2] == "OK"]
    accepted = [(a, b, c, (codec.decode(rep.output, "output") - wants[i % len(raws)]).abs().max().item() <= 1e-4)
                for a, b, c, (i, rep) in accepted]
    refused = [r for r in over if r[2] == "RESOURCE_EXHAUSTED"]
    other = Counter(r[2] for r in over if r[2] not in ("OK", "RESOURCE_EXHAUSTED"))
    bound = start_rss + (5 * router.max_inflight_bytes + (3 * router.max_message_bytes + PER_CALL) * router.max_concurrent_rpcs) / MIB
    return {
        "request_bytes": req_bytes, "tokens": tokens, "hidden": hidden, "admission_slots": slots,
        "router": {k: getattr(router, k) for k in ("max_inflight_bytes", "max_message_bytes", "max_concurrent_rpcs")},
        "capacity_rps": capacity, "baseline_latency": percentiles([b - a for a, b, _ in ok]),
        "offered": len(over), "offered_rps": len(over) / seconds, "accepted": len(accepted),
        "accepted_exact": sum(1 for r in accepted if r[3]), "refused": len(refused), "other_statuses": dict(other),
        "goodput_rps": len(accepted) / seconds, "goodput_ratio": (len(accepted) / seconds) / capacity if capacity else 0.0,
        "refusal_latency": percentiles([b - a for a, b, _, _ in refused]),
        "refusal_within_50ms": sum(1 for a, b, _, _ in refused if b - a <= 0.050),
        "refusals_with_retry_hint": sum(1 for r in refused if r[3]),
        "accepted_latency": percentiles([b - a for a, b, _, _ in accepted]),
        "router_rss_mib": {"start": start_rss, "peak": sampler.peak, "end": end_rss, "bound": bound},
        "held_after": held,
        "idle_workers": {"refused": len(idle_refused), "refusal_latency": percentiles(idle_refused),
                         "refusal_within_50ms": sum(1 for d in idle_refused if d <= 0.050),
                         "router_rss_mib": {"start": idle_sampler.start_mib, "peak": idle_sampler.peak, "end": idle_end,
                                            "bound": bound - start_rss + idle_sampler.start_mib},
                         "other_statuses": dict(Counter(code for _, _, code, _ in idle if code not in ("OK", "RESOURCE_EXHAUSTED")))},
    }


# -- 3. soak ------------------------------------------------------------------------------------
def soak(path: str, seconds: float, clients: int = 3) -> dict:
    import ray

    from moefleet import MoEModel
    from moefleet.core.config import RouterConfig
    from moefleet.core.state import StateStore
    from moefleet.router_service import codec
    from moefleet.router_service.proto import fleet_pb2 as pb
    from tests.fuzz_inputs import H, LAYERS, mutated_requests

    max_message, max_tokens = 64 << 10, 256
    fleet = _fleet(path, RouterConfig(max_message_bytes=max_message, max_request_tokens=max_tokens, metrics_port=None,
                                      telemetry_interval_s=0.5),
                   static=False, min_replicas=2)
    store = StateStore(fleet.redis_url, namespace=fleet.config.namespace)
    model = MoEModel.from_pretrained(path)
    malformed = mutated_requests(random.Random(11), 2000)
    counts: Counter = Counter()
    failed: Counter = Counter()
    wrong = [0]
    lost: list = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        channel, forward = _raw_stubs(fleet.address, max_message)
        while not stop.is_set():
            kind = rng.choices(["valid", "oversized", "malformed"], [8, 1, 1])[0]
            layer = rng.choice(LAYERS)
            if kind == "valid":
                x = torch.randn(rng.randint(1, 64), H, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                raw = pb.ForwardRequest(layer=layer, hidden=codec.encode(x)).SerializeToString()
            elif kind == "oversized":  # too many tokens, or a message over max_message_bytes
                t = max_tokens + 1 if rng.random() < 0.5 else max_message // (4 * H) + 1
                raw = pb.ForwardRequest(layer=layer, hidden=codec.encode(torch.randn(t, H))).SerializeToString()
            else:
                raw = rng.choice(malformed)
            try:
                reply = forward(raw, timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                reply = None
            with lock:
                counts[(kind, code)] += 1
                if kind == "valid":
                    if code == "OK":
                        if (codec.decode(reply.output, "output") - model.layer(layer)(x)).abs().max().item() > 1e-5:
                            wrong[0] += 1
                    elif code == "DEADLINE_EXCEEDED":  # accepted or not, no answer within 30 s: lost
                        lost.append(code)
                    else:
                        failed[code] += 1
        channel.close()

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    # warm-up: the controller plans from the traffic's load and gives every expert its second replica
    while not all(len(w) >= 2 for w in store.get_placement().replicas().values()):
        if time.monotonic() - t0 > 120:
            stop.set()
            fleet.stop()
            raise RuntimeError("the controller did not give every expert two replicas within 120 s")
        time.sleep(0.5)
    replicated_after = time.monotonic() - t0
    time.sleep(max(0.0, t0 + min(30.0, seconds / 4) - time.monotonic()))  # first resident-memory reading after it
    router_pid = fleet.router_stats()[0]["pid"]
    wstats = fleet.worker_stats()
    rss_start = {"router": rss_mib(router_pid), **{d: rss_mib(s["pid"]) for d, s in wstats.items()}}
    pids_start = {d: s["pid"] for d, s in wstats.items()}
    time.sleep(max(0.0, t0 + seconds / 2 - time.monotonic()))
    killed_at = time.monotonic() - t0
    os.kill(pids_start["worker-1"], signal.SIGKILL)
    restarted_after = None
    while time.monotonic() - t0 < seconds:
        if restarted_after is None:
            try:
                if ray.get(fleet.worker("worker-1").stats.remote(), timeout=5)["pid"] != pids_start["worker-1"]:
                    restarted_after = time.monotonic() - t0 - killed_at
            except Exception:  # not back yet
                pass
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    wstats = fleet.worker_stats()
    rss_end = {"router": rss_mib(router_pid), **{d: rss_mib(s["pid"]) for d, s in wstats.items()}}
    held = _held(fleet)
    events = [e.kind for e in store.events(500)]
    fleet.stop()
    by_kind = {k: sum(n for (kk, _), n in counts.items() if kk == k) for k in ("valid", "oversized", "malformed")}
    return {
        "seconds": seconds, "clients": clients, "sent": by_kind,
        "statuses": {f"{k}:{c}": n for (k, c), n in sorted(counts.items())},
        "valid_ok": counts[("valid", "OK")], "valid_wrong": wrong[0], "valid_failed": dict(failed), "valid_lost": len(lost),
        "two_replicas_after_s": replicated_after, "worker_killed_at_s": killed_at, "worker_restarted_after_s": restarted_after,
        "worker_pids": {"start": pids_start, "end": {d: s["pid"] for d, s in wstats.items()}},
        "rss_mib": {"start": rss_start, "end": rss_end}, "held_after": held,
        "events": dict(Counter(events)),
    }


def table(res: dict) -> str:
    f, o, s = res.get("fuzz"), res.get("overload"), res.get("soak")
    rows = ["| what | measured |", "| --- | --- |"]
    if f:
        rows.append(f"| fuzzed `Forward` requests (hypothesis over the proto + byte mutations) | {f['requests']:,} in "
                    f"{f['seconds']:.0f} s: {', '.join(f'{k} {v:,}' for k, v in sorted(f['statuses'].items()))}; "
                    f"undocumented or wrong: {f['undocumented_count']} |")
        rows.append(f"| after the fuzz | max abs error {f['after_max_abs_err']:.1e}; in flight: "
                    f"{sum(f['held_after'].values())} |")
    if o:
        lat = o["refusal_latency"]
        rows.append(f"| 5x overload: offered / capacity | {o['offered_rps']:.0f} / {o['capacity_rps']:.1f} requests/s "
                    f"({o['request_bytes'] // 1024} KiB each, admission {o['admission_slots']} requests) |")
        rows.append(f"| accepted requests | {o['accepted']:,}: {o['accepted_exact']:,} exact, "
                    f"{o['accepted'] - o['accepted_exact']} wrong, other statuses {o['other_statuses'] or 'none'}; "
                    f"goodput {o['goodput_ratio']:.2f}x capacity |")
        rows.append(f"| refused (`RESOURCE_EXHAUSTED`) | {o['refused']:,}, {o['refusals_with_retry_hint']:,} with a retry hint; "
                    f"client-side latency p50 {lat['p50_ms']:.1f} / p99 {lat['p99_ms']:.1f} ms; "
                    f"{o['refusal_within_50ms']:,} within 50 ms |")
        idle = o["idle_workers"]
        ir = idle["router_rss_mib"]
        rows.append(f"| refused, workers idle (the router's own refusal path) | {idle['refused']:,}: p50 "
                    f"{idle['refusal_latency']['p50_ms']:.1f} / p99 {idle['refusal_latency']['p99_ms']:.1f} ms; "
                    f"{idle['refusal_within_50ms']:,} within 50 ms; router memory start {ir['start']:.0f}, peak "
                    f"{ir['peak']:.0f} MiB (bound {ir['bound']:.0f}) |")
        r = o["router_rss_mib"]
        rows.append(f"| router resident memory | start {r['start']:.0f}, peak {r['peak']:.0f}, end {r['end']:.0f} MiB; "
                    f"bound {r['bound']:.0f} MiB |")
    if s:
        rows.append(f"| soak: {s['seconds'] / 60:.0f} min, {s['clients']} clients | sent valid {s['sent']['valid']:,}, "
                    f"oversized {s['sent']['oversized']:,}, malformed {s['sent']['malformed']:,} |")
        rows.append(f"| soak: valid requests | {s['valid_ok']:,} exact answers, {s['valid_wrong']} wrong, failed "
                    f"{s['valid_failed'] or 'none'}, lost {s['valid_lost']} |")
        restart = s["worker_restarted_after_s"]
        rows.append(f"| soak: worker-1 killed at {s['worker_killed_at_s']:.0f} s | "
                    f"{'fresh worker after %.1f s' % restart if restart is not None else 'not restarted'} |")
        start, end = s["rss_mib"]["start"], s["rss_mib"]["end"]
        mem = ", ".join(f"{k} {start.get(k, float('nan')):.0f} -> {end.get(k, float('nan')):.0f}" for k in end)
        rows.append(f"| soak: resident memory after warm-up -> end (MiB) | {mem} (worker-1's end is its fresh process) |")
        rows.append(f"| soak: in flight at the end | {', '.join(f'{k} {v}' for k, v in s['held_after'].items())} |")
    return "\n".join(rows)


T0 = time.monotonic()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fuzz", type=int, default=12000, help="fuzzed requests (half from hypothesis, half mutations)")
    p.add_argument("--overload-s", type=float, default=20.0)
    p.add_argument("--soak-s", type=float, default=600.0)
    p.add_argument("--parts", default="fuzz,overload,soak")
    p.add_argument("--overload-tokens", type=int, default=128, help="tokens per overload request (hidden 256, fp32)")
    p.add_argument("--quick", action="store_true", help="2,000 fuzzed, 8 s overload, 60 s soak")
    p.add_argument("--out")
    args = p.parse_args()
    if args.quick:
        args.fuzz, args.overload_s, args.soak_s = 2000, 8.0, 60.0
    parts = set(args.parts.split(","))

    from moefleet.local import init_local_ray
    from tests import hf_models

    init_local_ray(num_cpus=4)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rel-"))
    tiny = tmp / "mixtral"
    hf, _ = hf_models.build("mixtral", num_local_experts=8)
    hf.save_pretrained(tiny)
    res: dict = {"args": vars(args)}
    if "fuzz" in parts:
        res["fuzz"] = fuzz(str(tiny), args.fuzz)
        print(table({"fuzz": res["fuzz"]}), flush=True)
    if "overload" in parts:
        hidden, tokens = 256, args.overload_tokens
        ckpt = write_mixtral_checkpoint(tmp / "overload", hidden=hidden, ffn=2048, experts=8, top_k=2)
        res["overload"] = overload(str(ckpt), hidden, tokens, args.overload_s)
        print(table({"overload": res["overload"]}), flush=True)
    if "soak" in parts:
        res["soak"] = soak(str(tiny), args.soak_s)
    print()
    print(table(res))
    write_json("reliability", res, args.out)
    figures, goals = summary(res)
    flags = "" if (args.fuzz, args.overload_s, args.soak_s, args.parts) == (12000, 20.0, 600.0, "fuzz,overload,soak") else \
        " " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "quick"))
    write_result("reliability", title="Reliability: hostile input, 5x overload, a soak with a worker killed",
                 question="Is every input answered with a documented status, is overload refused at once with memory "
                          "bounded, and does a long mixed soak with a worker killed lose nothing?",
                 command=f"python benchmarks/bench_reliability.py{flags}", figures=figures, goals=goals,
                 details={**res, "markdown": table(res)}, elapsed_s=time.monotonic() - T0)
    return 0


def summary(res: dict) -> tuple[dict, list]:
    """The common schema's figures and goals from the three parts."""
    figures, goals = {}, []
    f, o, s = res.get("fuzz"), res.get("overload"), res.get("soak")
    if f:
        figures["fuzz_requests"] = single(f["requests"], "requests", "fuzzed Forward requests (hypothesis + byte mutations)")
        figures["fuzz_undocumented"] = single(f["undocumented_count"], "requests", "answered with an undocumented status or a wrong output")
        goals.append(goal("fuzzed requests", f["requests"], ">=", 10_000, unit="requests"))
        goals.append(goal("only documented statuses, exact outputs", f["undocumented_count"], "==", 0, unit="requests"))
    if o:
        other = sum(o["other_statuses"].values())
        figures["overload_capacity"] = single(o["capacity_rps"], "requests/s", "closed loop at the admission limit")
        figures["overload_offered"] = single(o["offered_rps"], "requests/s", "open loop, 5x capacity")
        figures["overload_refusal_p50"] = single(o["refusal_latency"]["p50_ms"], "ms", "RESOURCE_EXHAUSTED, client-side")
        figures["overload_refusal_p99"] = single(o["refusal_latency"]["p99_ms"], "ms", "RESOURCE_EXHAUSTED, client-side")
        figures["overload_refusal_p99_idle_workers"] = single(o["idle_workers"]["refusal_latency"]["p99_ms"], "ms",
                                                              "the same load, workers idle: the router's own refusal path")
        figures["overload_goodput"] = single(o["goodput_ratio"], "x", "accepted requests/s over capacity")
        r = o["router_rss_mib"]
        figures["router_rss_growth"] = single(r["peak"] - r["start"], "MiB", "router RssAnon, peak over start")
        goals.append(goal("accepted requests all complete, exact", other + o["accepted"] - o["accepted_exact"], "==", 0,
                          unit="requests"))
        goals.append(goal("refusal p99 within 50 ms (workers saturating both cores)", figures["overload_refusal_p99"], "<=", 50, unit="ms"))
        goals.append(goal("refusal p99 within 50 ms (workers idle)", figures["overload_refusal_p99_idle_workers"], "<=", 50, unit="ms"))
        goals.append(goal("router memory under its bound", r["peak"], "<=", r["bound"], unit="MiB"))
    if s:
        figures["soak_valid"] = single(s["valid_ok"], "requests", "valid requests answered exact")
        figures["soak_lost"] = single(s["valid_lost"], "requests", "valid requests never answered")
        figures["router_rss_end_over_start"] = single(s["rss_mib"]["end"]["router"] / s["rss_mib"]["start"]["router"], "x",
                                                      "router RssAnon, end over after warm-up")
        goals.append(goal("soak: lost accepted requests", s["valid_lost"], "==", 0, unit="requests"))
        goals.append(goal("soak: wrong or failed answers", s["valid_wrong"] + sum(s["valid_failed"].values()), "==", 0,
                          unit="requests"))
        goals.append(goal("soak: router memory flat (end / start)", figures["router_rss_end_over_start"], "<=", 1.1, unit="x"))
        goals.append(goal("soak: nothing in flight at the end", sum(s["held_after"].values()), "==", 0))
    return figures, goals


if __name__ == "__main__":
    sys.exit(main())
