"""Tune the grouped-GEMM launch parameters of the routed expert path for the GPU this runs on.

    python -m moefleet.kernels.tune --experts 8 --hidden 4096 --inter 14336 --top-k 2 \\
        [--dtype bfloat16] [--tokens 1 4 16 64 256 1024 4096] [--out-dir kernels/configs] [--budget-s 300]

For each token count T it draws a random softmax top-K routing (N = T * K
rows), then times every candidate of the fused gate/up kernel (gather
included) and of the down kernel with its combine (SPLIT_K changes the
combine's work, so they are timed together) by ``triton.testing.do_bench``
(median of the repeats, L2 flushed before each). The winner of each kernel is
checked against the torch reference, and the table is written as
``E=<E>,N=<F>,device_name=<GPU>,dtype=<dtype>.json`` with one bucket per N
(vLLM's naming; see :mod:`~moefleet.kernels.launch_config`), plus a
``_meta`` note: GPU, versions, the command, the time of each winner.

Candidates depend on the rows per active expert r = N / min(E, N): 16-row
tiles and a split reduction for decode (r <= 16), mid tiles, then large
tiles; a candidate whose accumulators would pass 128 fp32 registers per
thread, or whose pipeline would not fit the GPU's shared memory, is left out.
The whole space of a regime is timed at its first token count (within a
third of ``--budget-s``); later token counts of the same regime re-time its
``--keep`` best. Past the budget, each kernel keeps the best timed so far.

Needs CUDA. Imports nothing of the project outside ``kernels``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from itertools import product
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from . import fused_moe, launch_config, triton_moe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_MAX_ACC_PER_THREAD = 128  # fp32 accumulator registers per thread


def rows_per_expert(rows: int, num_experts: int) -> float:
    """Average rows of an expert that gets any: N / min(E, N)."""
    return rows / max(1, min(num_experts, rows))


def regime(rows: int, num_experts: int) -> str:
    """"decode" (r <= 16 rows per active expert), "mid" (r <= 128) or "large"."""
    r = rows_per_expert(rows, num_experts)
    return "decode" if r <= 16 else "mid" if r <= 128 else "large"


def candidates(kernel: str, rows: int, num_experts: int, elem_bytes: int, smem_bytes: int) -> list[dict[str, int]]:
    """Launch configs worth timing for ``kernel`` ("gate_up" or "down") at N = ``rows``."""
    kind = regime(rows, num_experts)
    if kind == "decode":
        space = [
            {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": 4, "num_stages": st}
            for (bn, bk), st in product([(32, 128), (32, 256), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128)], [3, 4, 5])
        ]
        splits = [1, 2, 4]
    elif kind == "mid":  # largest tiles first: a search cut short by the budget keeps them
        space = [
            {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": st}
            for bn, st in product([128, 256], [3, 4])
        ] + [
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": st}
            for bm, bn, bk, w, st in product([64, 32], [64, 128], [64, 128], [4, 8], [3, 4])
        ]
        splits = [1]
    else:
        space = [
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": w, "num_stages": st}
            for bm, bn, w, st in product([64, 128], [128, 256], [4, 8], [3, 4, 5])
        ]
        splits = [1]
    accs = 2 if kernel == "gate_up" else 1
    kept = []
    for c in space:
        if c["BLOCK_M"] * c["BLOCK_N"] * accs > _MAX_ACC_PER_THREAD * 32 * c["num_warps"]:
            continue
        tile_bytes = (c["BLOCK_M"] * c["BLOCK_K"] + accs * c["BLOCK_K"] * c["BLOCK_N"]) * elem_bytes
        if c["num_stages"] * tile_bytes > smem_bytes:
            continue
        if kernel == "down":
            kept.extend({**c, "SPLIT_K": s} for s in splits)
        else:
            kept.append(c)
    if not kept:  # a GPU with little shared memory: the default table's entry for these rows
        kept.append(launch_config.moe_config(num_experts, 1, rows, None, "default")[kernel])
    return kept


class Problem:
    """One routed-expert call on the GPU, with the buffers every candidate writes into."""

    def __init__(self, w13, w2, num_tokens: int, top_k: int, seed: int):
        self.w13, self.w2 = w13, w2
        num_experts, hidden = w13.shape[0], w13.shape[2]
        device = w13.device
        g = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(num_tokens, hidden, generator=g, device=device).to(w13.dtype)  # [T, H]
        logits = torch.randn(num_tokens, num_experts, generator=g, device=device)
        self.ids, self.weights = triton_moe.fused_topk(logits, top_k, "softmax", renormalize=True)  # [T, K]
        self.top_k = top_k
        self.rows = num_tokens * top_k
        self.slots, self.offsets, _, _ = fused_moe.align_tiles(self.ids, num_experts, 16)
        self.flat_weights = self.weights.reshape(-1).contiguous()
        self.h = torch.empty(self.rows, w2.shape[2], dtype=w13.dtype, device=device)  # [N, F]
        self.out = torch.empty(num_tokens, hidden, dtype=w13.dtype, device=device)
        self._maps: dict[int, tuple] = {}
        self._ys: dict[int, torch.Tensor] = {}

    def tile_map(self, block_m: int):
        if block_m not in self._maps:
            self._maps[block_m] = triton_moe._expert_tile_map(self.offsets, self.rows, block_m)
        return self._maps[block_m]

    def y(self, split_k: int) -> torch.Tensor:
        if split_k not in self._ys:
            self._ys = {split_k: torch.empty(split_k, self.rows, self.w2.shape[1], device=self.w2.device)}  # one at a time
        return self._ys[split_k]

    def gate_up(self, cfg):
        return lambda: triton_moe._launch_gate_up(
            self.x, self.w13, self.offsets, None, self.h, True, triton_moe.ACTIVATIONS["silu"], cfg,
            self.tile_map(cfg["BLOCK_M"]), row_src=self.slots, row_div=self.top_k,
        )  # fmt: skip

    def down(self, cfg):
        y = self.y(cfg["SPLIT_K"])

        def run():
            triton_moe._launch_grouped_gemm(
                self.h, self.w2, self.offsets, None, y, cfg, self.tile_map(cfg["BLOCK_M"]),
                split_k=cfg["SPLIT_K"], row_dst=self.slots, row_weight=self.flat_weights,
            )  # fmt: skip
            fused_moe._launch_combine(y, self.ids, self.w13.shape[0], None, self.out)

        return run


def time_candidates(make_fn, cands, warmup_ms: float, rep_ms: float, deadline: float, log) -> list[tuple[float, dict]]:
    """(median ms, config) of each candidate that compiled and ran, fastest first; stops at the deadline."""
    timed = []
    for cfg in cands:
        if time.monotonic() > deadline and timed:
            log(f"    budget spent: {len(timed)} of {len(cands)} candidates timed")
            break
        try:
            ms = do_bench(make_fn(cfg), warmup=warmup_ms, rep=rep_ms, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile here (shared memory, registers) is skipped
            log(f"    skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        timed.append((ms, cfg))
    return sorted(timed, key=lambda t: t[0])


def verify(problem: Problem, entry: dict, dtype: torch.dtype) -> float:
    """Relative error of the fused path with ``entry`` against the torch loop (same dtype)."""
    got = fused_moe.fused_experts(
        problem.x, problem.ids, problem.weights, problem.w13, problem.w2, gated=True, activation="silu", config=entry
    ).float()
    want = fused_moe.fused_experts_reference(  # the torch loop in the same dtype: no fp32 copy of the weights
        problem.x, problem.ids, problem.weights, problem.w13, problem.w2, gated=True, activation="silu"
    ).float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def tune(args: argparse.Namespace, log=print, device: str = "cuda", device_name: str | None = None) -> tuple[dict, Path]:
    """Run the search of ``args`` (see :func:`parse_args`) and write the table; returns (table, path).

    ``device``/``device_name`` exist for the tuner's own tests (CPU under
    Triton's interpreter, a given name); the command always tunes the current GPU.
    """
    dtype = DTYPES[args.dtype]
    if device_name is None:
        device_name = torch.cuda.get_device_name()
    smem = 99 * 1024
    if torch.device(device).type == "cuda":
        smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) or smem
    elem = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    e, h, f = args.experts, args.hidden, args.inter
    w13 = (torch.randn(e, 2 * f, h, generator=g, device=device) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, f, generator=g, device=device) * f**-0.5).to(dtype)
    start = time.monotonic()
    deadline = start + args.budget_s
    table: dict[str, dict] = {}
    winners = {}
    ranked: dict[tuple[str, str], list[dict]] = {}  # (kernel, regime) -> configs, fastest first
    for num_tokens in args.tokens:
        problem = Problem(w13, w2, num_tokens, args.top_k, seed=num_tokens)
        entry, note = {}, {}
        for kernel in ("gate_up", "down"):
            key = (kernel, regime(problem.rows, e))
            if key in ranked:  # the regime was searched at a smaller T: re-time its best few
                cands, until = ranked[key][: args.keep], deadline
            else:  # first T of the regime: the whole space, within a third of the budget
                cands = candidates(kernel, problem.rows, e, elem, smem)
                until = min(deadline, time.monotonic() + args.budget_s / 3)
            make = problem.gate_up if kernel == "gate_up" else problem.down
            timed = time_candidates(make, cands, args.warmup_ms, args.rep_ms, until, log)
            if not timed:
                raise RuntimeError(f"no {kernel} candidate ran for T={num_tokens}")
            ms, cfg = timed[0]
            entry[kernel], note[kernel] = cfg, {"ms": ms, "timed": len(timed), "of": len(cands)}
            ranked[key] = [c for _, c in timed] + [c for c in ranked.get(key, []) if c not in [t[1] for t in timed]]
        err = verify(problem, entry, dtype)
        if not err < 2e-2:
            raise RuntimeError(f"T={num_tokens}: the winning configs give relative error {err:.2e}: {entry}")
        table[str(problem.rows)] = entry
        winners[str(problem.rows)] = {"tokens": num_tokens, **note, "relative_error": err}
        log(
            f"T={num_tokens:5d} N={problem.rows:6d}  gate_up {note['gate_up']['ms'] * 1e3:9.1f} us {entry['gate_up']}\n"
            f"{'':19s}down+combine {note['down']['ms'] * 1e3:9.1f} us {entry['down']}  rel err {err:.1e}"
        )
        del problem
    table["_meta"] = {
        "device_name": device_name,
        "dtype": args.dtype,
        "shape": {"E": e, "H": h, "F": f, "K": args.top_k},
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m moefleet.kernels.tune " + " ".join(sys.argv[1:]),
        "tuning_s": round(time.monotonic() - start, 1),
        "winners": winners,
    }
    out = Path(args.out_dir) / launch_config.moe_config_file_name(e, f, device_name, dtype)
    if args.merge and out.is_file():  # keep the buckets of the earlier file that this run did not tune
        earlier = json.loads(out.read_text())
        for key, entry in earlier.items():
            if not key.startswith("_") and key not in table:
                table[key] = entry
                winners[key] = earlier.get("_meta", {}).get("winners", {}).get(key, {})
        table["_meta"]["merged_with"] = earlier.get("_meta", {}).get("command")
        table = {k: table[k] for k in sorted((k for k in table if not k.startswith("_")), key=int)} | {"_meta": table["_meta"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    launch_config.clear_caches()
    launch_config.moe_config_table(e, f, device_name, dtype, Path(args.out_dir))  # reads back: raises if malformed
    log(f"wrote {out} ({time.monotonic() - start:.0f} s)")
    return table, out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, required=True, help="E")
    p.add_argument("--hidden", type=int, required=True, help="H")
    p.add_argument("--inter", type=int, required=True, help="F, the intermediate size of one expert")
    p.add_argument("--top-k", type=int, required=True, help="K")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), help="T values: one bucket each")
    p.add_argument("--out-dir", default=str(launch_config.CONFIG_DIR))
    p.add_argument("--budget-s", type=float, default=600.0, help="stop searching after this many seconds")
    p.add_argument("--merge", action="store_true", help="keep the existing file's buckets for rows not tuned now")
    p.add_argument("--keep", type=int, default=6, help="candidates re-timed at later T of a searched regime")
    p.add_argument("--warmup-ms", type=float, default=5.0)
    p.add_argument("--rep-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    for name in ("experts", "hidden", "inter", "top_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.top_k > args.experts:
        p.error("--top-k must be <= --experts")
    if any(t < 1 for t in args.tokens):
        p.error("--tokens must all be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("moefleet.kernels.tune needs a CUDA GPU: the launch parameters are tuned for the GPU it runs on")
    tune(args)


if __name__ == "__main__":
    main()
