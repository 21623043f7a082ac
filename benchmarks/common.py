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


def wait_until(pred, timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll ``pred`` until it is true or ``timeout_s`` passed; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


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


# --------------------------------------------------------------------------- the common result schema
#
# Every benchmark writes benchmarks/results/<name>.json (what `make bench` runs and benchmarks/report.py reads):
#
#   {
#     "schema": "moefleet-bench/1",
#     "name": "planner",                       # the file's stem
#     "title": "Planner vs greedy and DeepSeek EPLB",
#     "question": "...",                       # the one question the script answers
#     "command": "python benchmarks/bench_planner.py",
#     "status": "ok" | "not run: no GPU" | "not run: <reason>" | "failed: <reason>",
#     "machine": {"description": "2 vCPUs (Intel Xeon), 23 GiB, no GPU", "cpus": 2, ...},
#     "finished_at": "2026-11-25T17:00:00+00:00", "elapsed_s": 21.7,
#     "figures": {NAME: {"value": x, "unit": "tokens/s", "description": "..."}          # one measurement
#                 NAME: {"min": a, "median": b, "max": c, "n": 3, "unit": ..., ...}},  # repeats
#     "goals": [{"name": ..., "description": ..., "measured": x, "op": ">=", "target": y, "unit": ...,
#                "met": true | false | null}],          # null: not measured (status says why)
#     "plots": ["results/sim_balancedness.png"],        # relative to benchmarks/
#     "details": {...}                                  # the script's own data (tables, timelines)
#   }

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = "moefleet-bench/1"
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
        "==": lambda a, b: a == b}


def machine_description() -> dict:
    """The machine a result was measured on, with a one-line description."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20)
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpus = os.cpu_count()
    desc = f"{cpus} vCPUs ({cpu})" + (f", {mem_gib} GiB" if mem_gib else "") + (f", {gpu}" if gpu else ", no GPU")
    return {"description": desc, "cpu": cpu, "cpus": cpus, "memory_gib": mem_gib, "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def has_gpu() -> bool:
    return torch.cuda.is_available()


def spread(samples, unit: str = "", description: str = "") -> dict:
    """A figure measured several times: min / median / max (and the samples)."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("spread: no samples")
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs), "samples": xs,
            "unit": unit, "description": description}


def single(value, unit: str = "", description: str = "") -> dict:
    """A figure measured once."""
    return {"value": None if value is None else float(value), "unit": unit, "description": description}


def figure_value(fig: dict) -> float | None:
    """The representative value of a figure: its median when repeated."""
    return fig.get("median", fig.get("value"))


def goal(name: str, measured, op: str, target: float, *, unit: str = "", description: str = "", note: str = "") -> dict:
    """A goal with its measured value and whether it is met (None when not measured)."""
    if op not in _OPS:
        raise ValueError(f"op: expected one of {sorted(_OPS)}, got {op!r}")
    value = figure_value(measured) if isinstance(measured, dict) else measured
    met = None if value is None else bool(_OPS[op](float(value), float(target)))
    return {"name": name, "description": description, "measured": None if value is None else float(value), "op": op,
            "target": float(target), "unit": unit, "met": met, "note": note}


def write_result(name: str, *, title: str, question: str, command: str, figures: dict | None = None,
                 goals: list | None = None, status: str = "ok", plots: list | None = None, details: dict | None = None,
                 elapsed_s: float | None = None, results_dir: Path | None = None, tables: dict | None = None) -> Path:
    """Write benchmarks/results/<name>.json in the common schema (see above); returns the path."""
    import datetime

    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": SCHEMA, "name": name, "title": title, "question": question, "command": command, "status": status,
        "machine": machine_description(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": elapsed_s, "figures": figures or {}, "goals": goals or [], "plots": plots or [],
        "details": details or {},
    }
    if tables:
        doc["tables"] = tables
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path}")
    return path


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "model_dump"):
        return x.model_dump()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class ClosedLoopClients:
    """``n`` closed-loop callers taking the requests in order, back to back; each call's (index, start, end)."""

    def __init__(self, address: str, n: int, tokens: int, hidden: int, timeout_s: float = 300.0):
        self.address, self.n, self.timeout_s = address, n, timeout_s
        g = torch.Generator().manual_seed(0)
        self.hidden = [torch.randn(tokens, hidden, generator=g) for _ in range(4)]

    def run(self, requests, total: int | None = None, stop_after_s: float | None = None) -> dict:
        """``requests``: a list of ``(layer, logits)`` or a function of the request index; serve ``total`` of
        them (a list: all), or until ``stop_after_s``. Failed calls' codes in ``failed``."""
        import threading

        from moefleet.router_service.client import FleetClient, FleetError

        if isinstance(requests, list):
            total, items = len(requests), requests
            requests = items.__getitem__
        lock = threading.Lock()
        nxt = [0]
        done: list[tuple[int, float, float]] = []
        failed: list[str] = []
        start_wall, start = time.time(), time.monotonic()

        def loop(seed: int):
            client = FleetClient(self.address, timeout=self.timeout_s)
            j = seed
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if (total is not None and i >= total) or (stop_after_s is not None and time.monotonic() - start > stop_after_s):
                    break
                layer, logits = requests(i)
                j += 1
                t0 = time.monotonic()
                try:
                    client.forward(layer, self.hidden[j % len(self.hidden)], router_logits=logits)
                    done.append((i, t0, time.monotonic()))
                except FleetError as e:
                    failed.append(str(e.code))
            client.close()

        threads = [threading.Thread(target=loop, args=(s,)) for s in range(self.n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        end = max((e for _, _, e in done), default=time.monotonic())
        return {"start": start, "start_wall": start_wall, "done": done, "failed": failed, "makespan_s": end - start}
