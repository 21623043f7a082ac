"""Client traffic for the fleet benchmarks: threads calling a fleet, every call logged (and some checked).

``Traffic(address, model, hot_at)`` runs ``clients`` threads, each sending
``tokens``-token layer calls aimed at the experts ``hot_at(t)`` names at that
moment (``t``: seconds since start), until stopped. Each call is logged as
``(start, end, error code or None)`` on this host's wall clock (``time.time()``,
comparable with the store's clock on one machine); every ``check_every``-th
answer is compared with the in-process layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import torch


def aimed_hidden(gate: torch.Tensor, tokens: int, hot: list[int], g: torch.Generator, strength: float = 3.0) -> torch.Tensor:
    """Hidden states [T, H] whose router picks among ``hot`` (each token leans towards one or two of them)."""
    h = gate.shape[1]
    pick = torch.tensor(hot)[torch.randint(0, len(hot), (tokens, 2), generator=g)]
    direction = gate[pick[:, 0]] + gate[pick[:, 1]]
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return torch.randn(tokens, h, generator=g) * 0.5 + direction * strength * h**0.5


class Traffic:
    def __init__(self, address: str, model, hot_at: Callable[[float], list[int]], *, clients: int = 4, tokens: int = 32,
                 check_every: int = 20, pool: int = 16, seed: int = 0):
        self.address, self.model, self.hot_at = address, model, hot_at
        self.clients, self.tokens, self.check_every = clients, tokens, check_every
        self.log: list[tuple[float, float, str | None]] = []
        self.max_abs_error = 0.0
        self.wrong = 0
        self._stop = threading.Event()
        self._pool = pool
        self._seed = seed
        self._threads: list[threading.Thread] = []
        self.start_time = None

    def _run(self, seed: int) -> None:
        from moefleet.router_service.client import FleetClient, FleetError

        g = torch.Generator().manual_seed(self._seed * 1000 + seed)
        layers = list(self.model.moe_layers)
        gates = {layer: self.model.layer(layer).gate.weight.float() for layer in layers}
        cache: dict[tuple, list[torch.Tensor]] = {}
        client = FleetClient(self.address, timeout=60)
        i = 0
        while not self._stop.is_set():
            layer = layers[i % len(layers)]
            hot = tuple(self.hot_at(time.time() - self.start_time))
            pool = cache.setdefault((layer, hot), [])
            if len(pool) < self._pool:
                pool.append(aimed_hidden(gates[layer], self.tokens, list(hot), g))
            hidden = pool[i % len(pool)]
            i += 1
            t0 = time.time()
            try:
                out = client.forward(layer, hidden)
            except FleetError as e:
                self.log.append((t0, time.time(), e.code.name))
                continue
            self.log.append((t0, time.time(), None))
            if i % self.check_every == 0:
                err = float((out - self.model.layer(layer)(hidden)).abs().max())
                self.max_abs_error = max(self.max_abs_error, err)
                self.wrong += err > 1e-4
        client.close()

    def start(self) -> "Traffic":
        self.start_time = time.time()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def ok(self, t_from: float = -np.inf, t_to: float = np.inf) -> list[tuple[float, float]]:
        return [(a, b) for a, b, e in self.log if e is None and t_from <= a and b <= t_to]

    def failed(self, t_from: float = -np.inf, t_to: float = np.inf) -> list[tuple[float, float, str]]:
        return [(a, b, e) for a, b, e in self.log if e is not None and t_from <= a <= t_to]


def p99_ms(latencies_s: list[float]) -> float | None:
    return float(np.percentile(latencies_s, 99) * 1000) if latencies_s else None
