"""Skewed, drifting traffic for demos and benchmarks, and the live demo view."""

from __future__ import annotations

import asyncio
import math
import time

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


LEAN = 2.5
"""How far the demo raises the hot experts' router logits: with the built-in model each takes about a fifth of its layer."""


def leaning_logits(gate, num_tokens: int, hot: list[int], lean: float, generator: torch.Generator):
    """Hidden states [T, H] and router logits [T, E] that lean towards the ``hot`` experts.

    The logits are the layer's own gate logits of random hidden states with the
    hot experts' raised by ``lean``, sent as precomputed router logits (as a
    model runner may): the family's routing (softmax or sigmoid, groups,
    correction bias) still picks the experts, so the hot set takes a known
    share whatever the gate's random weights favour.
    """
    hidden = torch.randn(num_tokens, gate.weight.shape[1], generator=generator)
    logits = gate.logits(hidden).float()
    logits[:, hot] += lean
    return hidden, logits


def hot_set(step: int, num_experts: int, size: int) -> list[int]:
    """The hot experts of drift step ``step``: a window that moves by ``size`` each step."""
    return [(step * size + i) % num_experts for i in range(size)]


def terminal():
    """A console at most 100 columns wide (exactly 100 when the output is not a terminal)."""
    from rich.console import Console

    probe = Console()
    return Console(width=min(100, probe.width) if probe.is_terminal else 100)


def time_weighted(samples: list[tuple[float, float | None]]) -> dict[str, float | None]:
    """Mean and 10th percentile of a measured series over time: each sample holds until the next.

    samples: ``(t, value)`` in time order; ``None`` values (nothing measured)
    are left out, with their time. Returns ``{"mean", "p10", "seconds"}``.
    """
    spans = [(v, t1 - t0) for (t0, v), (t1, _) in zip(samples, samples[1:]) if v is not None and t1 > t0]
    total = sum(w for _, w in spans)
    if total <= 0:
        return {"mean": None, "p10": None, "seconds": 0.0}
    mean = sum(v * w for v, w in spans) / total
    acc, p10 = 0.0, None
    for v, w in sorted(spans):
        acc += w
        if acc >= 0.1 * total:
            p10 = v
            break
    return {"mean": mean, "p10": p10, "seconds": total}


class RebalanceTracker:
    """Pairs each rebalance the fleet reports with the balancedness it measured before and after it.

    Fed with the demo's successive snapshots (``observe``); ``rows`` holds one
    entry per rebalance seen since the demo started: the planner's prediction
    (before → after) and the measured mean balancedness in the last snapshot
    taken before it and the first one ``settle_s`` after it.
    """

    def __init__(self, start_t: float, settle_s: float = 4.0):
        self.start_t = start_t
        self.settle_s = settle_s
        self.samples: list[tuple[float, float | None]] = []  # (store time, measured balancedness)
        self.rows: list[dict] = []
        self._seen: set = set()

    def observe(self, snap: dict) -> None:
        from moefleet.views import fmt2

        self.samples.append((snap["t"], snap["balancedness"]))
        for x in snap["rebalance_log"]:
            key = (x["version"], x["at"])
            if x["at"] < self.start_t or key in self._seen:
                continue
            self._seen.add(key)
            before = [b for t, b in self.samples if t <= x["at"] and b is not None]
            self.rows.append({
                "at": x["at"], "at_s": x["at"] - self.start_t, "version": x["version"],
                "planned": f"{fmt2(x['balancedness_before'])} → {fmt2(x['balancedness_after'])}",
                "measured_before": before[-1] if before else None, "measured_after": None,
                "copies": x["loads"], "bytes": x["bytes"], "seconds": x["seconds"],
            })
        logged = {(x["version"], x["at"]): x for x in snap["rebalance_log"]}
        for row in self.rows:
            x = logged.get((row["version"], row["at"]))
            if x is not None:  # the controller's report of the step lands after the placement it published
                row["planned"] = f"{fmt2(x['balancedness_before'])} → {fmt2(x['balancedness_after'])}"
                row["seconds"] = x["seconds"]
            if row["measured_after"] is None:
                after = [b for t, b in self.samples if t >= row["at"] + self.settle_s and b is not None]
                if after:
                    row["measured_after"] = after[0]


async def run_demo(
    address: str,
    checkpoint: str | None,
    snapshot,
    *,
    duration_s: float,
    concurrency: int,
    tokens: int,
    shift_s: float,
    console=None,
    client_kwargs: dict | None = None,
) -> int:
    """Drive skewed traffic whose hot experts shift, and show what the fleet measured and did about it.

    The screen is read from the fleet's own telemetry (``snapshot()`` returns
    the snapshot the dashboard and ``status`` show), never from this client's
    counts: tokens/s, p50/p99 and errors are the routers', balancedness the
    devices', rebalances the controller's. Returns 1 when the fleet (or this
    client) saw a failed request, or nothing was answered.
    """
    from rich.console import Console
    from rich.live import Live

    from moefleet.controller.telemetry import rates
    from moefleet.core.default_model import default_model_dir
    from moefleet.core.model import MoECheckpoint
    from moefleet.kernels.layer import GateWeights
    from moefleet.router_service.client import AsyncFleetClient, FleetError
    from moefleet.views import demo_view, fmt2, fmt_bytes

    ckpt = MoECheckpoint(checkpoint or default_model_dir())
    spec = ckpt.spec
    gates = {layer: GateWeights(**ckpt.gate(layer)) for layer in spec.moe_layers}
    num_experts = spec.layer.num_experts
    hot_size = max(1, min(3, num_experts // 4))
    client = AsyncFleetClient(address, timeout=30, **(client_kwargs or {}))
    loop = asyncio.get_running_loop()
    read = lambda: loop.run_in_executor(None, snapshot)  # noqa: E731 - the snapshot is a blocking read
    first = await read()
    tracker = RebalanceTracker(first["t"])
    history: list = [first]
    client_errors: dict[str, int] = {}
    start = time.monotonic()

    def driving() -> list[int]:
        return hot_set(int((time.monotonic() - start) // shift_s), num_experts, hot_size)

    def view(snap: dict):
        back = [h for h in history if h["t"] <= snap["t"] - 3.0]
        r = rates(back[-1] if back else history[0], snap)
        return demo_view(snap, r, elapsed_s=min(time.monotonic() - start, duration_s), duration_s=duration_s,
                         driving=driving(), shift_s=shift_s, history=[h["balancedness"] for h in history],
                         rebalances=tracker.rows)

    async def worker(wid: int) -> None:
        g = torch.Generator().manual_seed(wid)
        i = 0
        while time.monotonic() - start < duration_s:
            layer = spec.moe_layers[i % len(spec.moe_layers)]
            i += 1
            hidden, logits = leaning_logits(gates[layer], tokens, driving(), LEAN, g)
            try:
                await client.forward(layer, hidden, router_logits=logits)
            except FleetError as e:  # the fleet counts it too; kept for the exit status
                client_errors[e.code.name] = client_errors.get(e.code.name, 0) + 1

    console = console or terminal()
    with Live(view(first), console=console, refresh_per_second=4) as live:
        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.5)
            snap = await read()
            history.append(snap)
            del history[:-400]
            tracker.observe(snap)
            live.update(view(snap))
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.5)  # the routers' last counts reach the store, and the endpoint samples them
        last = await read()
        history.append(last)
        tracker.observe(last)
        live.update(view(last))
    await client.close()
    console.print()
    before, after = first["requests"], last["requests"]
    codes = {c: n - before["by_code"].get(c, 0) for c, n in after["by_code"].items() if n - before["by_code"].get(c, 0) > 0}
    answered = codes.get("OK", 0)
    failed = sum(n for c, n in codes.items() if c != "OK")
    first_measured = next((b for _, b in tracker.samples if b is not None), None)
    rb = last["rebalances"]["total"] - first["rebalances"]["total"]
    moved = last["rebalances"]["bytes_moved"] - first["rebalances"]["bytes_moved"]
    shifts = max(1, math.ceil(duration_s / shift_s))
    balance = time_weighted(tracker.samples)
    console.print(f"the fleet counted {answered} requests answered, {failed} failed"
                  + (f" {dict(sorted(codes.items()))}" if failed else ""))
    console.print(f"{rb} rebalances over {shifts} hot sets ({rb / shifts:.1f} per shift), {fmt_bytes(moved)} of weights "
                  f"moved; balancedness {fmt2(first_measured)} when first measured, {fmt2(last['balancedness'])} at the "
                  f"end, {fmt2(balance['mean'])} on average over time (10th percentile {fmt2(balance['p10'])})")
    if client_errors:
        console.print(f"this client saw {sum(client_errors.values())} failed requests: {client_errors}")
    return 0 if answered and not failed and not client_errors else 1
