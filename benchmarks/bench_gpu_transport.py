"""Router <-> worker hand-off of a layer call's tensors on one GPU node: CUDA IPC handles vs copies through the host.

Two processes on one GPU (``torch.multiprocessing`` spawn, a pipe between
them: what the router and a worker actor do, without Ray, which the GPU
machines lack). One round trip: the router hands [T, H] fp32 hidden states
to the worker, the worker computes ``2 * x`` on its GPU and hands the result
back, the router reads it on its GPU.

- ``cuda_ipc``: handles (``moefleet.core.cuda_ipc``) through the pipe, the
  tensors never leave the GPU;
- ``host_copy``: ``x.cpu().numpy()`` through the pipe, ``.cuda()`` on the other
  side, both ways (what the object-store path costs at least, without Ray);
- ``pipe_only``: a tiny message both ways (the pipe's own latency).

    python benchmarks/bench_gpu_transport.py [--tokens 64 1024] [--hidden 4096] [--iters 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from moefleet.core.cuda_ipc import export_tensor, open_tensor


def worker(conn) -> None:
    held = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, payload = msg
        if kind == "ipc":
            held = open_tensor(payload) * 2
            torch.cuda.synchronize()
            conn.send(export_tensor(held))
        elif kind == "host":
            held = torch.from_numpy(payload).cuda() * 2
            conn.send(held.cpu().numpy())
        else:
            conn.send(payload)


def round_trips(fn, iters: int) -> list[float]:
    fn()
    fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_transport.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_transport needs a CUDA GPU: not run")
        _write_schema(None)
        return
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(child,), daemon=True)
    proc.start()
    results = []
    try:
        for t in args.tokens:
            x = torch.randn(t, args.hidden, device="cuda")
            want = x * 2

            def ipc():
                conn.send(("ipc", export_tensor(x)))
                y = open_tensor(conn.recv())
                torch.cuda.synchronize()
                return y

            def host():
                conn.send(("host", x.cpu().numpy()))
                y = torch.from_numpy(conn.recv()).cuda()
                torch.cuda.synchronize()
                return y

            def pipe():
                conn.send(("pipe", b"x"))
                conn.recv()

            assert torch.equal(ipc(), want) and torch.equal(host(), want)
            row = {"tokens": t, "hidden": args.hidden, "mbytes": x.numel() * 4 / 1e6,
                   "handle_bytes": len(pickle.dumps(export_tensor(x)))}  # fmt: skip
            for name, fn in (("cuda_ipc", ipc), ("host_copy", host), ("pipe_only", pipe)):
                samples = round_trips(fn, args.iters)
                row[name] = {"p50_ms": statistics.median(samples), "p90_ms": sorted(samples)[int(0.9 * len(samples))]}
            results.append(row)
            print(
                f"T={t:5d} ({row['mbytes']:5.1f} MB, handle {row['handle_bytes']} B)  "
                f"cuda_ipc p50 {row['cuda_ipc']['p50_ms']:7.3f} ms  host_copy p50 {row['host_copy']['p50_ms']:7.3f} ms  "
                f"pipe_only p50 {row['pipe_only']['p50_ms']:7.3f} ms",
                flush=True,
            )
    finally:
        conn.send(None)
        proc.join(timeout=30)
    report = {"question": "router-worker hand-off on one GPU node: CUDA IPC vs host copies",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    _write_schema(report)


def _write_schema(report: dict | None) -> None:
    """benchmarks/results/gpu_transport.json in the common schema ('not run: no GPU' without one)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import single, write_result

    figures = {}
    for r in (report or {}).get("results", []):
        for name in ("cuda_ipc", "host_copy", "pipe_only"):
            figures[f"T={r['tokens']} {name} p50"] = single(r[name]["p50_ms"], "ms", f"{r['mbytes']:.1f} MB round trip")
    write_result("gpu_transport", title="CUDA IPC hand-off on one GPU",
                 question="router-worker hand-off on one GPU node: CUDA IPC vs host copies",
                 command="python benchmarks/bench_gpu_transport.py", status="ok" if report else "not run: no GPU",
                 figures=figures, details=report or {})


if __name__ == "__main__":
    main()
