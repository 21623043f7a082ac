"""Skewed, drifting traffic for demos and benchmarks, and the live demo view."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch


def skewed_hidden(gate_weight: torch.Tensor, num_tokens: int, hot: list[int], skew: float, generator: torch.Generator) -> torch.Tensor:
    """Hidden states [T, H] whose router leans towards the ``hot`` experts.

    gate_weight: [E, H] the layer's router weight. Each token is noise plus
    ``skew`` times the (scaled) gate row of one hot expert.
    """
    gate = gate_weight.float()
    h = gate.shape[1]
    x = torch.randn(num_tokens, h, generator=generator)
    pick = torch.randint(0, len(hot), (num_tokens,), generator=generator)
    direction = gate[torch.tensor(hot)[pick]]
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return x + skew * direction * (h**0.5)


def hot_set(step: int, num_experts: int, size: int) -> list[int]:
    """The hot experts of drift step ``step``: a window that moves by ``size`` each step."""
    return [(step * size + i) % num_experts for i in range(size)]


async def run_demo(
    address: str, checkpoint: str | None, *, duration_s: float, concurrency: int, tokens: int, shift_s: float,
    client_kwargs: dict | None = None,
) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from moefleet.core.default_model import default_model_dir
    from moefleet.core.model import MoECheckpoint
    from moefleet.router_service.client import AsyncFleetClient, FleetError

    ckpt = MoECheckpoint(checkpoint or default_model_dir())
    spec = ckpt.spec
    gates = {layer: ckpt.gate(layer)["weight"] for layer in spec.moe_layers}
    num_experts, top_k = spec.layer.num_experts, spec.layer.top_k
    client = AsyncFleetClient(address, timeout=30, **(client_kwargs or {}))
    counts = {layer: np.zeros(num_experts, dtype=np.int64) for layer in spec.moe_layers}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.monotonic()
    done_tokens = 0

    def view() -> Table:
        elapsed = max(time.monotonic() - start, 1e-9)
        step = int(elapsed // shift_s)
        lat = np.array(latencies[-2000:]) * 1000 if latencies else np.zeros(1)
        t = Table(title=f"MoE Fleet demo at {address}: {elapsed:5.1f}s / {duration_s:.0f}s, hot experts {hot_set(step, num_experts, 3)}, "
                        f"{done_tokens / elapsed:,.0f} tokens/s, p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
                        f"errors {sum(errors.values())}")
        t.add_column("expert")
        for layer in counts:
            t.add_column(f"layer {layer} tokens", justify="right")
        peaks = {layer: max(int(c.max()), 1) for layer, c in counts.items()}
        for e in range(num_experts):
            cells = []
            for layer, c in counts.items():
                v = int(c[e])
                bar = "#" * int(12 * v / peaks[layer])
                cells.append(f"{v:>8,} {bar:<12}")
            t.add_row(str(e), *cells)
        return t

    async def worker(wid: int) -> None:
        nonlocal done_tokens
        g = torch.Generator().manual_seed(wid)
        i = 0
        while time.monotonic() - start < duration_s:
            step = int((time.monotonic() - start) // shift_s)
            layer = spec.moe_layers[i % len(spec.moe_layers)]
            i += 1
            hidden = skewed_hidden(gates[layer], tokens, hot_set(step, num_experts, 3), 2.0, g)
            t0 = time.perf_counter()
            try:
                _, ids, _ = await client.forward(layer, hidden, return_routing=True)
            except FleetError as e:
                errors[e.code.name] = errors.get(e.code.name, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)
            flat = ids.numpy().reshape(-1)
            counts[layer] += np.bincount(flat[flat >= 0], minlength=num_experts)
            done_tokens += tokens

    console = Console()
    with Live(view(), console=console, refresh_per_second=4) as live:
        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            live.update(view())
        await asyncio.gather(*tasks)
        live.update(view())
    await client.close()
    n = len(latencies)
    failed = f"{sum(errors.values())} failed" + (f" {errors}" if errors else "")
    console.print(f"{n} requests answered, {failed}; top-{top_k} routing")
    return 0 if n and not errors else 1
