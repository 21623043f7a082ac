"""How fast is the Triton grouped expert FFN against the torch per-expert loop?

On CUDA: times ``grouped_ffn`` (Triton: one fused gate/up kernel with the
activation in its epilogue, then one grouped down-projection kernel) against
``grouped_ffn_reference`` (a torch loop over experts) on a Mixtral-like layer
(H=4096, F=14336, E=8, top-2, gated SiLU, bf16) for each token count, with
``torch.cuda.Event`` timing, and reports TFLOP/s and the fraction of the peak
passed by ``--peak-tflops`` (default: H100 SXM bf16 dense, 989).

On CPU: the Triton path needs CUDA (the interpreter is for tests, not
timing), so only the torch reference is timed, on a small fp32 shape.

Routing (random logits -> top-k -> rows sorted by expert) is done once per
token count, outside the timed region; so is the check of the offsets
(``validate_offsets=False`` inside the loop, as a serving hot path would).

    python benchmarks/bench_kernels.py [--tokens 256 4096] [--out benchmarks/out/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moefleet.kernels.triton_moe import fused_topk, grouped_ffn, grouped_ffn_reference

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096, help="H")
    p.add_argument("--inter", type=int, default=14336, help="F, expert intermediate size")
    p.add_argument("--experts", type=int, default=8, help="E")
    p.add_argument("--top-k", type=int, default=2, help="K")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 4096], help="T values to time")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--activation", default="silu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the GPU for --dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/kernels.json"))
    return p.parse_args()


def make_layer(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device):
    """Gated expert weights: w13 [E, 2F, H], w2 [E, H, F], scaled to keep activations O(1)."""
    g = torch.Generator(device=device).manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, device=device, dtype=dtype) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g, device=device, dtype=dtype) * inter**-0.5
    return w13, w2


def route(num_tokens: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype, device: torch.device):
    """Random tokens and router logits -> (x_sorted [T*K, H], expert_offsets [E + 1], per-expert counts)."""
    g = torch.Generator(device=device).manual_seed(num_tokens)
    hidden_states = torch.randn(num_tokens, hidden, generator=g, device=device, dtype=dtype)  # [T, H]
    logits = torch.randn(num_tokens, num_experts, generator=g, device=device)  # [T, E]
    if device.type == "cuda":
        topk_ids, _ = fused_topk(logits, top_k, "softmax", renormalize=True)
    else:
        topk_ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1).indices
    flat = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)
    x_sorted = hidden_states[order // top_k]  # [T*K, H]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    return x_sorted, offsets, counts.tolist()


def time_cuda(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, by CUDA events."""
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


def time_cpu(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, by the wall clock."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ffn_flops(rows: int, hidden: int, inter: int) -> float:
    """Gated FFN: x @ [gate; up].T is 2*N*H*2F, h @ w2.T is 2*N*F*H."""
    return 6.0 * rows * hidden * inter


def bench_cuda(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    w13, w2 = make_layer(args.experts, args.hidden, args.inter, dtype, device)
    results = []
    for num_tokens in args.tokens:
        x, offsets, counts = route(num_tokens, args.hidden, args.experts, args.top_k, dtype, device)
        kw = {"gated": True, "activation": args.activation}
        triton_out = grouped_ffn(x, offsets, w13, w2, **kw)  # validates offsets once, compiles
        torch_out = grouped_ffn_reference(x, offsets, w13, w2, **kw)
        err = ((triton_out.float() - torch_out.float()).norm() / torch_out.float().norm()).item()
        flops = ffn_flops(x.shape[0], args.hidden, args.inter)
        row = {"tokens": num_tokens, "rows": x.shape[0], "rows_per_expert": counts, "relative_error": err}
        for name, fn in (
            ("triton", lambda: grouped_ffn(x, offsets, w13, w2, validate_offsets=False, **kw)),
            ("torch_loop", lambda: grouped_ffn_reference(x, offsets, w13, w2, **kw)),
        ):
            ms = time_cuda(fn, args.warmup, args.iters)
            tflops = flops / (ms * 1e-3) / 1e12
            row[name] = {"ms": ms, "tflops": tflops, "fraction_of_peak": tflops / args.peak_tflops}
        row["speedup"] = row["torch_loop"]["ms"] / row["triton"]["ms"]
        results.append(row)
        print(
            f"T={num_tokens:5d} rows={x.shape[0]:5d}  "
            f"triton {row['triton']['ms']:8.3f} ms {row['triton']['tflops']:7.1f} TFLOP/s "
            f"({100 * row['triton']['fraction_of_peak']:4.1f}% of peak)  "
            f"torch loop {row['torch_loop']['ms']:8.3f} ms {row['torch_loop']['tflops']:7.1f} TFLOP/s  "
            f"speedup {row['speedup']:.2f}x  rel err {err:.1e}"
        )
    return results


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu")
    hidden, inter, num_experts, top_k, num_tokens = 256, 512, 8, 2, 64
    print(
        "grouped_ffn's Triton path needs CUDA; timing only the torch reference on a small "
        f"fp32 shape (H={hidden}, F={inter}, E={num_experts}, top-{top_k}, T={num_tokens})."
    )
    w13, w2 = make_layer(num_experts, hidden, inter, torch.float32, device)
    x, offsets, counts = route(num_tokens, hidden, num_experts, top_k, torch.float32, device)
    kw = {"gated": True, "activation": args.activation}
    ms = time_cpu(lambda: grouped_ffn_reference(x, offsets, w13, w2, **kw), args.warmup, args.iters)
    gflops = ffn_flops(x.shape[0], hidden, inter) / (ms * 1e-3) / 1e9
    print(f"T={num_tokens} rows={x.shape[0]}  torch loop {ms:.3f} ms  {gflops:.1f} GFLOP/s")
    return [
        {
            "tokens": num_tokens,
            "rows": x.shape[0],
            "rows_per_expert": counts,
            "shape": {"hidden": hidden, "inter": inter, "experts": num_experts, "top_k": top_k, "dtype": "float32"},
            "torch_loop": {"ms": ms, "gflops": gflops},
        }
    ]


def main() -> None:
    args = parse_args()
    on_cuda = torch.cuda.is_available()
    results = bench_cuda(args) if on_cuda else bench_cpu(args)
    report = {
        "question": "grouped_ffn Triton vs torch per-expert loop",
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": {
            "hidden": args.hidden,
            "inter": args.inter,
            "experts": args.experts,
            "top_k": args.top_k,
            "dtype": args.dtype,
            "activation": args.activation,
            "gated": True,
        }
        if on_cuda
        else None,
        "peak_tflops": args.peak_tflops if on_cuda else None,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    _write_schema(report, on_cuda)


def _write_schema(report: dict, on_cuda: bool) -> None:
    """benchmarks/results/kernels.json in the common schema; the question needs CUDA."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import single, write_result

    figures = {}
    for r in report["results"]:
        for key, value in r.items():
            if isinstance(value, dict) and "ms" in value:
                figures[f"T={r['tokens']} {key} ms"] = single(value["ms"], "ms")
                if "tflops" in value:
                    figures[f"T={r['tokens']} {key} TFLOP/s"] = single(value["tflops"], "TFLOP/s")
                if "gflops" in value:
                    figures[f"T={r['tokens']} {key} GFLOP/s"] = single(value["gflops"], "GFLOP/s")
    write_result("kernels", title="Triton grouped expert FFN", question=report["question"],
                 command="python benchmarks/bench_kernels.py", status="ok" if on_cuda else "not run: no GPU",
                 figures=figures, details=report)


if __name__ == "__main__":
    main()
