"""Synthetic routing traffic for the simulator: Zipf-skewed expert choice whose hot set drifts.

``ZipfTraffic(...).trace(rate)`` makes a ``Trace`` (``moefleet.core.trace``):

* each layer's experts are ranked; the expert of rank ``r`` (1-based) has
  weight ``r ** -s``; every ``shift_s`` seconds each layer's ranking is
  redrawn (a seeded random permutation): the hot set moves;
* a token picks ``top_k`` distinct experts, each pick in proportion to the
  weights of the experts not yet picked (what top-k of noisy scores gives);
  an expert's share of a call's ``tokens_per_call * top_k`` assignments is its
  inclusion probability, estimated once by sampling, and a call's counts are
  drawn binomially around it;
* calls arrive as a Poisson process (or evenly, ``arrivals="uniform"``), layers
  in turn, at ``rate`` model tokens per second (each token passes every
  simulated layer, so a layer sees ``rate / tokens_per_call`` calls a second).

As a string (``moe-fleet plan --trace zipf:...``)::

    zipf:s=1.2,experts=64,layers=4,top_k=2,duration=120,shift=15,tokens=4096,load=1.25,seed=0

``load`` is the offered rate as a multiple of the fleet's balanced capacity
(resolved by whoever knows the fleet); ``rate`` is absolute tokens/s; give at
most one (the default is ``load=1.25``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np

from moefleet.core.trace import Trace, TraceError

__all__ = ["MAX_LINES", "ZipfTraffic", "inclusion_probabilities", "parse_traffic"]

MAX_LINES = 2_000_000
"""Most lines a synthetic trace may have (raise ``tokens_per_call`` or lower ``duration`` beyond)."""


def inclusion_probabilities(weights: np.ndarray, top_k: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``[E]`` probability that a token's ``top_k`` distinct experts include each expert (sums to ``top_k``).

    Picks are sequential without replacement in proportion to ``weights``
    (Gumbel top-k), estimated from ``samples`` tokens.
    """
    w = np.asarray(weights, dtype=np.float64)
    if top_k >= len(w):
        return np.ones(len(w))
    keys = np.log(w)[None, :] + rng.gumbel(size=(samples, len(w)))
    picked = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    return np.bincount(picked.ravel(), minlength=len(w)) / samples


@dataclass(frozen=True)
class ZipfTraffic:
    """Zipf(s) expert choice over ``experts`` per layer, ``top_k`` per token, hot set redrawn every ``shift_s``."""

    s: float = 1.2
    experts: int = 64
    layers: int = 4
    top_k: int = 2
    duration_s: float = 120.0
    shift_s: float = 15.0
    tokens_per_call: int = 4096
    rate: float | None = None
    load: float | None = None
    seed: int = 0
    arrivals: Literal["poisson", "uniform"] = "poisson"

    def __post_init__(self):
        checks = (
            ("s", self.s, self.s >= 0, ">= 0"),
            ("experts", self.experts, self.experts >= 1, ">= 1"),
            ("layers", self.layers, self.layers >= 1, ">= 1"),
            ("top_k", self.top_k, 1 <= self.top_k <= self.experts, "in [1, experts]"),
            ("duration", self.duration_s, self.duration_s > 0, "> 0"),
            ("shift", self.shift_s, self.shift_s >= 0, ">= 0 (0: the hot set never moves)"),
            ("tokens", self.tokens_per_call, self.tokens_per_call >= 1, ">= 1"),
            ("rate", self.rate, self.rate is None or (math.isfinite(self.rate) and self.rate > 0), "> 0"),
            ("load", self.load, self.load is None or (math.isfinite(self.load) and self.load > 0), "> 0"),
            ("arrivals", self.arrivals, self.arrivals in ("poisson", "uniform"), "'poisson' or 'uniform'"),
        )
        for name, value, ok, rule in checks:
            if not ok:
                raise TraceError(f"zipf: {name} must be {rule}, got {value!r}")
        if self.rate is not None and self.load is not None:
            raise TraceError("zipf: give rate (tokens/s) or load (x the fleet's capacity), not both")

    def with_rate(self, rate: float) -> ZipfTraffic:
        return replace(self, rate=float(rate), load=None)

    def trace(self, rate: float | None = None) -> Trace:
        """The trace at ``rate`` model tokens/s (default ``self.rate``)."""
        rate = self.rate if rate is None else rate
        if rate is None or not rate > 0:
            raise TraceError("zipf: no rate: pass rate=TOKENS_PER_S, or resolve load against a fleet")
        rng = np.random.default_rng(self.seed)
        lines_per_s = self.layers * rate / self.tokens_per_call
        expected = lines_per_s * self.duration_s
        if expected > MAX_LINES:
            raise TraceError(
                f"zipf: {expected:,.0f} calls would be made; raise tokens (per call, now {self.tokens_per_call}) "
                f"or lower duration (now {self.duration_s:g} s) to stay under {MAX_LINES:,}"
            )
        if self.arrivals == "poisson":
            n = max(1, int(expected * 1.1) + 64)
            t = np.cumsum(rng.exponential(1.0 / lines_per_s, n))
            while t[-1] < self.duration_s:  # rare: extend the draw
                t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / lines_per_s, n))])
            t = t[t < self.duration_s]
        else:
            t = np.arange(0.0, self.duration_s, 1.0 / lines_per_s)
        if len(t) == 0:
            raise TraceError("zipf: rate too low for a single call within the duration")
        layer = np.arange(len(t)) % self.layers
        ranks = np.arange(1, self.experts + 1, dtype=np.float64) ** -self.s
        pi_rank = inclusion_probabilities(ranks / ranks.sum(), self.top_k, 8192, rng)  # by rank
        periods = 1 if self.shift_s == 0 else int(math.ceil(self.duration_s / self.shift_s))
        # perm[p, l, r]: the expert holding rank r in period p at layer l
        perm = np.stack([np.stack([rng.permutation(self.experts) for _ in range(self.layers)]) for _ in range(periods)])
        pi = np.zeros((periods, self.layers, self.experts))
        np.put_along_axis(pi, perm, np.broadcast_to(pi_rank, perm.shape), axis=2)
        period = np.zeros(len(t), dtype=np.int64) if self.shift_s == 0 else np.minimum((t // self.shift_s).astype(np.int64), periods - 1)
        probs = pi[period, layer]  # [N, E]
        counts = rng.binomial(self.tokens_per_call, np.clip(probs, 0.0, 1.0))
        return Trace(t=t, layer=layer, counts=counts)


_FIELDS = {
    "s": ("s", float), "experts": ("experts", int), "layers": ("layers", int), "top_k": ("top_k", int),
    "duration": ("duration_s", float), "shift": ("shift_s", float), "tokens": ("tokens_per_call", int),
    "rate": ("rate", float), "load": ("load", float), "seed": ("seed", int), "arrivals": ("arrivals", str),
}


def parse_traffic(text: str) -> ZipfTraffic:
    """``"zipf:s=1.2,experts=64,..."`` -> ``ZipfTraffic`` (fields in the module docstring); ``"zipf"`` alone: defaults."""
    head, _, rest = text.partition(":")
    if head.strip().lower() != "zipf":
        raise TraceError(f"trace: {text!r} is not a synthetic trace (expected 'zipf:FIELD=VALUE,...')")
    kwargs: dict = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _FIELDS:
            raise TraceError(f"trace: zipf field {item!r} is not FIELD=VALUE with FIELD one of {', '.join(_FIELDS)}")
        name, kind = _FIELDS[key]
        try:
            kwargs[name] = kind(value.strip())
        except ValueError:
            raise TraceError(f"trace: zipf {key} must be {kind.__name__}, got {value!r}") from None
    if "rate" not in kwargs and "load" not in kwargs:
        kwargs["load"] = 1.25
    try:
        return ZipfTraffic(**kwargs)
    except TraceError as e:
        raise TraceError(f"trace: {e}") from None


def traffic_fields() -> list[str]:
    return [f.name for f in fields(ZipfTraffic)]
