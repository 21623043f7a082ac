"""Helpers shared by the benchmark scripts: synthetic checkpoints, timing, percentiles, JSON out."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT_DIR = Path(__file__).resolve().parent / "out"


def write_mixtral_checkpoint(path: Path, *, hidden: int, ffn: int, experts: int, top_k: int, layers: int = 1, seed: int = 0) -> Path:
    """A Mixtral-format checkpoint with seeded random MoE weights (only the MoE tensors)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        p = f"model.layers.{layer}.block_sparse_moe"
        tensors[f"{p}.gate.weight"] = torch.randn(experts, hidden, generator=g) * 0.05
        for e in range(experts):
            tensors[f"{p}.experts.{e}.w1.weight"] = torch.randn(ffn, hidden, generator=g) * 0.02
            tensors[f"{p}.experts.{e}.w3.weight"] = torch.randn(ffn, hidden, generator=g) * 0.02
            tensors[f"{p}.experts.{e}.w2.weight"] = torch.randn(hidden, ffn, generator=g) * 0.02
    save_file(tensors, str(path / "model.safetensors"))
    cfg = {"model_type": "mixtral", "hidden_size": hidden, "intermediate_size": ffn, "num_local_experts": experts,
           "num_experts_per_tok": top_k, "num_hidden_layers": layers, "hidden_act": "silu", "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def percentiles(samples_s: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples_s)

    def pct(p):
        if not ms:
            return float("nan")
        k = min(len(ms) - 1, max(0, round(p / 100 * (len(ms) - 1))))
        return ms[k]

    return {"p50_ms": pct(50), "p99_ms": pct(99), "mean_ms": statistics.fmean(ms) if ms else float("nan"), "n": len(ms)}


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def write_json(name: str, data: dict, out: str | None = None) -> Path:
    path = Path(out) if out else OUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    print(f"wrote {path}")
    return path
