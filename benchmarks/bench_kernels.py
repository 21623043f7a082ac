"""How fast is the fused routed-expert path against the torch per-expert loop and the GPU's ceilings?

On CUDA, for Mixtral-like (H=4096, F=14336, E=8, top-2) and DeepSeek-V3-like
(H=7168, F=2048, E=256, top-8, routed experts only) layers in bf16, and each
token count T, it times the whole routed path ``hidden, topk -> [T, H]``:

- ``triton``: ``fused_experts`` (device-side alignment, gate/up GEMM with the
  gather in its loads, down GEMM with the weighted scatter, fixed-order
  combine), eager, and ``triton_graph``: the same captured in a CUDA graph
  and replayed (what a decode loop of fixed T runs);
- ``torch_loop``: ``fused_experts_reference`` (permute, gather, a loop over
  experts of cuBLAS GEMMs, ``index_add_``), the torch path.

and reports TFLOP/s (6 N H F for N kept rows) against the bf16 dense peak, and
the bytes the call must move (the weights of every expert it touches, read
once, plus hidden in and out) per second against the HBM bandwidth. Both
ceilings are given twice: the datasheet's (``--peak-tflops``,
``--peak-gbps``, defaults for the H100 SXM) and measured in the same run (a
8192^3 bf16 ``torch.mm`` and a 4 GiB device-to-device copy, bytes read +
written). Times are medians over CUDA-event-timed repeats after warm-up;
routing is drawn once per T (random logits -> softmax top-K), outside the
timed region.

On CPU only the torch path can run (the interpreter is for tests, not timing):
it is timed on a small fp32 shape so the script still answers something.

    python benchmarks/bench_kernels.py [--shapes mixtral deepseek] [--tokens 1 8 64 256 1024 4096]
        [--label default] [--out benchmarks/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moefleet.kernels import launch_config
from moefleet.kernels.fused_moe import fused_experts, fused_experts_reference
from moefleet.kernels.triton_moe import _device_name, fused_topk

SHAPES = {
    "mixtral": {"hidden": 4096, "inter": 14336, "experts": 8, "top_k": 2},
    "deepseek": {"hidden": 7168, "inter": 2048, "experts": 256, "top_k": 8},
}
# Datasheet bf16 dense TFLOP/s and HBM GB/s (SXM parts).
DATASHEET = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["mixtral", "deepseek"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096])
    p.add_argument("--extra-tokens", type=int, nargs="*", default=[], help="more T for the DeepSeek-like shape only")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--loop-iters", type=int, default=5, help="repeats of the (slow) torch loop")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 dense peak (default by GPU name)")
    p.add_argument("--peak-gbps", type=float, default=None, help="datasheet HBM bandwidth (default by GPU name)")
    p.add_argument("--label", default="", help="a name for this run (e.g. default or tuned configs)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/kernels.json"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def time_cuda(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measured_ceilings() -> dict:
    """bf16 dense TFLOP/s of torch.mm 8192^3 and device-to-device copy GB/s (read + written), this GPU now."""
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(8192, 8192, generator=g, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, generator=g, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: torch.mm(a, b), 10, warmup=5)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.randn(1 << 30, generator=g, device="cuda")  # 4 GiB fp32
    dst = torch.empty_like(src)
    ms_copy = time_cuda(lambda: dst.copy_(src), 10, warmup=3)
    gbps = 2 * src.numel() * 4 / (ms_copy * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return {"bf16_mm_tflops": tflops, "copy_gbps": gbps}


def bench_shape(name: str, shape: dict, tokens: list[int], args, ceilings: dict, peaks: tuple[float, float]) -> list[dict]:
    h, f, e, k = shape["hidden"], shape["inter"], shape["experts"], shape["top_k"]
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    w13 = (torch.randn(e, 2 * f, h, generator=g, device="cuda") * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, f, generator=g, device="cuda") * f**-0.5).to(dtype)
    kw = {"gated": True, "activation": "silu"}
    expert_bytes = 3 * h * f * dtype.itemsize
    _, source = launch_config.moe_config_table(e, f, _device_name(w13), dtype)
    rows_out = []
    for t in tokens:
        x = torch.randn(t, h, generator=g, device="cuda").to(dtype)  # [T, H]
        logits = torch.randn(t, e, generator=g, device="cuda")
        ids, weights = fused_topk(logits, k, "softmax", renormalize=True)  # [T, K]
        touched = int(torch.unique(ids).numel())
        flops = 6.0 * t * k * h * f
        min_bytes = touched * expert_bytes + 2 * t * h * dtype.itemsize

        got = fused_experts(x, ids, weights, w13, w2, **kw)
        want = fused_experts_reference(x, ids, weights, w13, w2, **kw)
        err = float((got.float() - want.float()).norm() / want.float().norm())
        row = {"shape": name, "tokens": t, "rows": t * k, "experts_touched": touched, "relative_error_vs_torch": err}

        triton_ms = time_cuda(lambda: fused_experts(x, ids, weights, w13, w2, **kw), args.iters)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):  # host time to issue one call (the GPU queue absorbs the launches)
            fused_experts(x, ids, weights, w13, w2, **kw)
        row["triton_host_launch_ms"] = (time.perf_counter() - t0) * 1e3 / args.iters
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fused_experts(x, ids, weights, w13, w2, **kw)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_experts(x, ids, weights, w13, w2, **kw)
        graph_ms = time_cuda(graph.replay, args.iters)
        del graph
        loop_ms = time_cuda(lambda: fused_experts_reference(x, ids, weights, w13, w2, **kw), args.loop_iters, warmup=1)

        for key, ms in (("triton", triton_ms), ("triton_graph", graph_ms), ("torch_loop", loop_ms)):
            tflops = flops / (ms * 1e-3) / 1e12
            gbps = min_bytes / (ms * 1e-3) / 1e9
            row[key] = {
                "ms": ms,
                "tflops": tflops,
                "fraction_of_datasheet_peak": tflops / peaks[0],
                "fraction_of_measured_mm": tflops / ceilings["bf16_mm_tflops"],
                "gbps": gbps,
                "fraction_of_datasheet_hbm": gbps / peaks[1],
                "fraction_of_measured_copy": gbps / ceilings["copy_gbps"],
            }
        row["speedup_vs_torch_loop"] = loop_ms / triton_ms
        row["speedup_graph_vs_torch_loop"] = loop_ms / graph_ms
        rows_out.append(row)
        tg = row["triton_graph"]
        print(
            f"{name:8s} T={t:5d} N={t * k:6d} touched={touched:3d}  triton {triton_ms:8.3f} ms  graph {graph_ms:8.3f} ms  "
            f"loop {loop_ms:8.3f} ms  x{row['speedup_vs_torch_loop']:5.2f}  host {row['triton_host_launch_ms']:6.3f} ms  "
            f"{tg['tflops']:6.1f} TFLOP/s ({100 * tg['fraction_of_datasheet_peak']:4.1f}% sheet)  "
            f"{tg['gbps']:7.0f} GB/s ({100 * tg['fraction_of_datasheet_hbm']:4.1f}% sheet, "
            f"{100 * tg['fraction_of_measured_copy']:4.1f}% copy)  err {err:.1e}",
            flush=True,
        )
        del x, logits, ids, weights, got, want
    del w13, w2
    torch.cuda.empty_cache()
    return [{"config_source": Path(source).name, **r} for r in rows_out]


def bench_cpu(args) -> list[dict]:
    hidden, inter, experts, top_k, tokens = 256, 512, 8, 2, 64
    print(f"no CUDA: timing only the torch path, fp32, H={hidden} F={inter} E={experts} top-{top_k} T={tokens}")
    g = torch.Generator().manual_seed(args.seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.topk(torch.randn(tokens, experts, generator=g), top_k, dim=-1).indices
    weights = torch.full((tokens, top_k), 1.0 / top_k)
    kw = {"gated": True, "activation": "silu"}
    fused_experts_reference(x, ids, weights, w13, w2, **kw)
    samples = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        fused_experts_reference(x, ids, weights, w13, w2, **kw)
        samples.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(samples)
    gflops = 6.0 * tokens * top_k * hidden * inter / (ms * 1e-3) / 1e9
    print(f"torch loop {ms:.3f} ms  {gflops:.1f} GFLOP/s")
    return [{"shape": "small-cpu", "tokens": tokens, "torch_loop": {"ms": ms, "gflops": gflops}}]


def main(argv=None) -> None:
    args = parse_args(argv)
    report = {"question": "fused routed experts (Triton) vs the torch per-expert loop vs the GPU's ceilings", "label": args.label}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        sheet = next((v for key, v in DATASHEET.items() if key in name), (float("nan"), float("nan")))
        peaks = (args.peak_tflops or sheet[0], args.peak_gbps or sheet[1])
        ceilings = measured_ceilings()
        print(
            f"{name}: measured bf16 mm {ceilings['bf16_mm_tflops']:.0f} TFLOP/s (sheet {peaks[0]:.0f}), "
            f"copy {ceilings['copy_gbps']:.0f} GB/s (sheet {peaks[1]:.0f})",
            flush=True,
        )
        results = []
        for shape in args.shapes:
            tokens = args.tokens + (args.extra_tokens if shape == "deepseek" else [])
            results += bench_shape(shape, SHAPES[shape], tokens, args, ceilings, peaks)
        report.update(
            device=name, datasheet={"bf16_tflops": peaks[0], "hbm_gbps": peaks[1]}, measured=ceilings,
            shapes={s: SHAPES[s] for s in args.shapes}, dtype="bfloat16", results=results,
        )  # fmt: skip
    else:
        report.update(device=platform.processor() or "cpu", results=bench_cpu(args))
    import triton

    report.update(torch=torch.__version__, triton=triton.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    _write_schema(report, torch.cuda.is_available())


def _write_schema(report: dict, on_cuda: bool) -> None:
    """benchmarks/results/kernels.json in the common schema; the question needs CUDA."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import goal, single, write_result

    figures = {}
    for r in report["results"]:
        for key, value in r.items():
            if isinstance(value, dict) and "ms" in value:
                name = f"{r.get('shape', '')} T={r['tokens']} {key}"
                figures[f"{name} ms"] = single(value["ms"], "ms")
                if "tflops" in value:
                    figures[f"{name} TFLOP/s"] = single(value["tflops"], "TFLOP/s")
                if "gflops" in value:
                    figures[f"{name} GFLOP/s"] = single(value["gflops"], "GFLOP/s")
    rows = [r for r in report["results"] if "triton_graph" in r] if on_cuda else []
    decode = [r["triton_graph"]["fraction_of_datasheet_hbm"] for r in rows if r["tokens"] <= 8]
    largest = {}
    for r in rows:
        if r["tokens"] >= largest.get(r["shape"], {"tokens": -1})["tokens"]:
            largest[r["shape"]] = r
    at_4096 = [r["speedup_vs_torch_loop"] for r in rows if r["tokens"] == 4096]
    note = "" if on_cuda else "not run: no GPU"
    goals = [
        goal(">= 70% of HBM bandwidth at decode sizes (T <= 8, CUDA graph, worst shape)", min(decode) if decode else None,
             ">=", 0.7, note=note),
        goal(">= 60% of the bf16 datasheet peak at the largest batch (worst shape)",
             min(r["triton_graph"]["fraction_of_datasheet_peak"] for r in largest.values()) if largest else None, ">=", 0.6,
             note=note),
        goal("Triton >= 3x the torch loop at 4096 tokens (eager, worst shape)", min(at_4096) if at_4096 else None, ">=", 3.0,
             unit="x", note=note),
    ]
    write_result("kernels", title="Fused routed-expert kernels", question=report["question"],
                 command="python benchmarks/bench_kernels.py", status="ok" if on_cuda else "not run: no GPU",
                 figures=figures, goals=goals, details=report)

if __name__ == "__main__":
    main()
