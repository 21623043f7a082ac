"""In-process MoE layer throughput: torch path on CPU; on CUDA also the Triton path and the hardware peak.

    python benchmarks/bench_layer.py [--tokens 2048] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import has_gpu, spread, timed, write_json, write_mixtral_checkpoint, write_result  # noqa: E402

from moefleet import MoEModel  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense, spec sheets


def flops_per_token(spec) -> float:
    mats = 3 if spec.expert_kind == "gated" else 2
    routed = spec.top_k * mats * 2 * spec.hidden_size * spec.intermediate_size
    shared = 3 * 2 * spec.hidden_size * spec.shared_intermediate_size if spec.num_shared_experts else 0
    return routed + shared + 2 * spec.hidden_size * spec.num_experts


def bench(model: MoEModel, layer: int, tokens: int, repeats: int) -> dict:
    spec = model.spec.layer_spec(layer)
    lay = model.layer(layer)
    x = torch.randn(tokens, spec.hidden_size, device=model.device, dtype=model.dtype or torch.float32)

    def run():
        lay(x)
        if x.is_cuda:
            torch.cuda.synchronize()

    times = timed(run, repeats)
    best = min(times)
    med = sorted(times)[len(times) // 2]
    return {
        "backend": lay.backend, "tokens": tokens, "median_s": med, "tokens_per_s": tokens / med,
        "gflops_per_s": flops_per_token(spec) * tokens / med / 1e9, "best_s": best, "times_s": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small shape, few repeats")
    ap.add_argument("--out")
    args = ap.parse_args()
    shapes = {
        "mixtral-like H=1024 F=2816 E=8 top-2": dict(hidden=1024, ffn=2816, experts=8, top_k=2),
        "fine-grained H=1024 F=512 E=64 top-6": dict(hidden=1024, ffn=512, experts=64, top_k=6),
    }
    if args.quick:
        shapes = {"small H=256 F=512 E=8 top-2": dict(hidden=256, ffn=512, experts=8, top_k=2)}
        args.repeats = 3
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in shapes.items():
            path = write_mixtral_checkpoint(Path(tmp) / name.split()[0], **shape)
            cpu = MoEModel.from_pretrained(path, backend="torch")
            r = {"shape": name, **bench(cpu, 0, args.tokens, args.repeats)}
            results.append(r)
            print(f"{name:40s} torch cpu fp32  {r['tokens_per_s']:10,.0f} tokens/s  {r['gflops_per_s']:7.1f} GFLOP/s")
            if torch.cuda.is_available():
                dev = torch.cuda.get_device_name(0)
                peak = next((v for k, v in PEAK_TFLOPS.items() if k in dev), None)
                for backend in ("torch", "triton"):
                    m = MoEModel.from_pretrained(path, device="cuda", dtype=torch.bfloat16, backend=backend)
                    g = {"shape": name, "device": dev, **bench(m, 0, args.tokens, args.repeats)}
                    g["fraction_of_peak"] = g["gflops_per_s"] / 1e3 / peak if peak else None
                    results.append(g)
                    print(f"{name:40s} {backend:6s} cuda bf16 {g['tokens_per_s']:10,.0f} tokens/s  {g['gflops_per_s'] / 1e3:7.2f} TFLOP/s")
    if not torch.cuda.is_available():
        print("no CUDA device: the Triton path runs only under TRITON_INTERPRET=1 here (tests), so it is not timed")
    write_json("layer", {"tokens": args.tokens, "results": results}, args.out)
    figures = {}
    for r in results:
        where = "cpu fp32 torch" if "device" not in r else f"{r['device']} bf16 {r['backend']}"
        figures[f"{r['shape'].split()[0]} {where} tokens/s"] = spread(
            [args.tokens / t for t in r["times_s"]], "tokens/s", f"{r['shape']}, {args.tokens} tokens a call")
    write_result("layer", title="In-process MoE layer", question="How fast is one MoE layer in process (torch on CPU; "
                 "Triton vs torch on CUDA)?", command="python benchmarks/bench_layer.py" + (" --quick" if args.quick else ""),
                 figures=figures, status="ok" if results else "failed: no results",
                 details={"tokens": args.tokens, "results": results, "gpu_part": "ran" if has_gpu() else "not run: no GPU"})


if __name__ == "__main__":
    main()
