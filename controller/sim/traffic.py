"""Synthetic routing traffic for the simulator: a hot set redrawn at intervals (``zipf:``), popularity that
drifts like real traffic (``drift:``), and a daily rise and fall of volume over any trace (``diurnal:``).

``zipf:``
---------

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

``drift:``
----------
Per-expert popularity that moves with autocorrelation, under a slowly
changing mix of workloads (``DriftTraffic``). At time ``t`` the probability
that a pick in layer ``l`` goes to expert ``e`` is

    p(l, e, t) = sum over workloads w of m_w(t) softmax_e(mu[w, l, :] + x[l, :, t])

* ``mu[w, l, e] = a[l, e] + b[w, l, e]``: a layer's own skew ``a ~ N(0,
  skew^2)`` shared by every workload, plus each workload's difference ``b ~
  N(0, workload^2)``;
* ``x``: log-AR(1) fluctuation of each expert's popularity, stationary std
  ``sigma``, autocorrelation time ``tau`` (``x(t+1) = phi x(t) + sqrt(1 -
  phi^2) sigma eps``, ``phi = exp(-1 / tau)``, one step a second);
* ``m(t) = softmax(y(t))``: the mix of ``workloads`` workloads, ``y`` an
  AR(1) of std ``mix_sigma`` and autocorrelation time ``mix_tau``.

Defaults and where they come from (stated in the README too): ``workloads=4``
(code, math, chat, general: the task families across which Bambhaniya et al.
2026, arXiv 2604.23150, see expert popularity shift in DeepSeek-V3, Qwen3 and
Llama 4); ``skew=0.35`` and ``workload=0.2``: Mixtral-8x7B's per-layer expert
shares on the Pile (Jiang et al. 2024, arXiv 2401.04088, fig. 7) lie within
about 0.6x to 1.6x of uniform, and differ between the Pile's domains by a few
points of the 12.5% mean; ``sigma=0.1``, ``tau=600`` s: in the steady state
expert load shares are predictable to within 1.3-1.8% a thousand steps ahead
(Cong et al. 2024, arXiv 2404.16914): small, slow fluctuation; ``mix_sigma=1``,
``mix_tau=1800`` s: the workload mix turns over within the hour, as in the
expert-count dumps of one model under four workloads that motivated this trace.
A token's ``top_k`` picks are distinct: an expert's inclusion probability is
``min(1, c p)`` with ``c`` such that they sum to ``top_k``.

    drift:experts=64,layers=4,top_k=2,duration=600,tokens=4096,load=1.25,seed=0

with the fields above plus ``skew, workload, sigma, tau, workloads, mix_sigma,
mix_tau``.

``diurnal:``
------------
``diurnal:ratio=5,period=600,phase=0:INNER`` scales the volume of any trace
``INNER`` (a file, ``zipf:...`` or ``drift:...``) by a daily curve: a call at
``t`` is kept with probability ``c(t) = 1/ratio + (1 - 1/ratio) (1 -
cos(2 pi (t / period + phase))) / 2`` -- the trough at ``1/ratio`` of the
inner trace's rate, the peak at its full rate (``ratio``: peak over trough;
``period`` defaults to the inner trace's duration: one day compressed into
it). Thinning keeps each call's own counts, so what a call looks like does
not change, only how many arrive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np

from moefleet.core.trace import Trace, TraceError

__all__ = ["MAX_LINES", "Diurnal", "DriftTraffic", "ZipfTraffic", "inclusion_probabilities", "parse_diurnal", "parse_traffic",
           "topk_inclusion"]

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


def topk_inclusion(p: np.ndarray, top_k: int) -> np.ndarray:
    """``[..., E]`` inclusion probabilities of ``top_k`` distinct picks: ``min(1, c p)`` summing to ``top_k`` per row."""
    p = np.asarray(p, dtype=np.float64)
    num_experts = p.shape[-1]
    if top_k >= num_experts:
        return np.ones_like(p)
    out = np.empty_like(p)
    flat_p, flat_out = p.reshape(-1, num_experts), out.reshape(-1, num_experts)
    for i, row in enumerate(flat_p):
        capped = np.zeros(num_experts, dtype=bool)
        for _ in range(num_experts):
            free = row[~capped].sum()
            c = (top_k - capped.sum()) / free if free > 0 else 0.0
            pi = np.where(capped, 1.0, np.minimum(1.0, c * row))
            newly = (pi >= 1.0) & ~capped
            if not newly.any():
                break
            capped |= newly
        flat_out[i] = pi
    return out


@dataclass(frozen=True)
class DriftTraffic:
    """Popularity on a log-AR(1) walk under a drifting mix of workloads (fields in the module docstring)."""

    experts: int = 64
    layers: int = 4
    top_k: int = 2
    duration_s: float = 600.0
    tokens_per_call: int = 4096
    rate: float | None = None
    load: float | None = None
    seed: int = 0
    arrivals: Literal["poisson", "uniform"] = "poisson"
    skew: float = 0.35
    workload: float = 0.2
    sigma: float = 0.1
    tau_s: float = 600.0
    workloads: int = 4
    mix_sigma: float = 1.0
    mix_tau_s: float = 1800.0

    def __post_init__(self):
        checks = (
            ("experts", self.experts, self.experts >= 1, ">= 1"),
            ("layers", self.layers, self.layers >= 1, ">= 1"),
            ("top_k", self.top_k, 1 <= self.top_k <= self.experts, "in [1, experts]"),
            ("duration", self.duration_s, self.duration_s > 0, "> 0"),
            ("tokens", self.tokens_per_call, self.tokens_per_call >= 1, ">= 1"),
            ("rate", self.rate, self.rate is None or (math.isfinite(self.rate) and self.rate > 0), "> 0"),
            ("load", self.load, self.load is None or (math.isfinite(self.load) and self.load > 0), "> 0"),
            ("arrivals", self.arrivals, self.arrivals in ("poisson", "uniform"), "'poisson' or 'uniform'"),
            ("skew", self.skew, self.skew >= 0, ">= 0"),
            ("workload", self.workload, self.workload >= 0, ">= 0"),
            ("sigma", self.sigma, self.sigma >= 0, ">= 0"),
            ("tau", self.tau_s, self.tau_s > 0, "> 0"),
            ("workloads", self.workloads, self.workloads >= 1, ">= 1"),
            ("mix_sigma", self.mix_sigma, self.mix_sigma >= 0, ">= 0"),
            ("mix_tau", self.mix_tau_s, self.mix_tau_s > 0, "> 0"),
        )
        for name, value, ok, rule in checks:
            if not ok:
                raise TraceError(f"drift: {name} must be {rule}, got {value!r}")
        if self.rate is not None and self.load is not None:
            raise TraceError("drift: give rate (tokens/s) or load (x the fleet's capacity), not both")

    def with_rate(self, rate: float) -> DriftTraffic:
        return replace(self, rate=float(rate), load=None)

    def popularity(self) -> np.ndarray:
        """``[S, L, E]``: per second of the trace, each layer's pick probabilities (rows sum to 1)."""
        rng = np.random.default_rng(self.seed)
        steps = max(1, int(math.ceil(self.duration_s)))
        shape = (self.layers, self.experts)
        mu = rng.normal(0.0, self.skew, shape)[None] + rng.normal(0.0, self.workload, (self.workloads, *shape))
        phi = math.exp(-1.0 / self.tau_s)
        mix_phi = math.exp(-1.0 / self.mix_tau_s)
        x = rng.normal(0.0, self.sigma, shape)
        y = rng.normal(0.0, self.mix_sigma, self.workloads)
        out = np.empty((steps, *shape))
        for step in range(steps):
            m = np.exp(y - y.max())
            m /= m.sum()
            logits = mu + x[None]
            per_workload = np.exp(logits - logits.max(axis=2, keepdims=True))
            per_workload /= per_workload.sum(axis=2, keepdims=True)
            out[step] = np.tensordot(m, per_workload, axes=1)
            x = phi * x + math.sqrt(1 - phi * phi) * self.sigma * rng.standard_normal(shape)
            y = mix_phi * y + math.sqrt(1 - mix_phi * mix_phi) * self.mix_sigma * rng.standard_normal(self.workloads)
        return out

    def trace(self, rate: float | None = None) -> Trace:
        """The trace at ``rate`` model tokens/s (default ``self.rate``)."""
        rate = self.rate if rate is None else rate
        if rate is None or not rate > 0:
            raise TraceError("drift: no rate: pass rate=TOKENS_PER_S, or resolve load against a fleet")
        rng = np.random.default_rng(self.seed + 1)
        t = _arrivals(rng, self.layers * rate / self.tokens_per_call, self.duration_s, self.arrivals, "drift",
                      self.tokens_per_call)
        layer = np.arange(len(t)) % self.layers
        pi = topk_inclusion(self.popularity(), self.top_k)  # [S, L, E]
        second = np.minimum(t.astype(np.int64), pi.shape[0] - 1)
        counts = rng.binomial(self.tokens_per_call, np.clip(pi[second, layer], 0.0, 1.0))
        return Trace(t=t, layer=layer, counts=counts)


def _arrivals(rng: np.random.Generator, lines_per_s: float, duration_s: float, arrivals: str, what: str,
              tokens_per_call: int) -> np.ndarray:
    expected = lines_per_s * duration_s
    if expected > MAX_LINES:
        raise TraceError(
            f"{what}: {expected:,.0f} calls would be made; raise tokens (per call, now {tokens_per_call}) "
            f"or lower duration (now {duration_s:g} s) to stay under {MAX_LINES:,}"
        )
    if arrivals == "poisson":
        n = max(1, int(expected * 1.1) + 64)
        t = np.cumsum(rng.exponential(1.0 / lines_per_s, n))
        while t[-1] < duration_s:  # rare: extend the draw
            t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / lines_per_s, n))])
        t = t[t < duration_s]
    else:
        t = np.arange(0.0, duration_s, 1.0 / lines_per_s)
    if len(t) == 0:
        raise TraceError(f"{what}: rate too low for a single call within the duration")
    return t


@dataclass(frozen=True)
class Diurnal:
    """A daily curve over another trace's volume: keep a call at ``t`` with probability ``c(t)`` (module docstring)."""

    ratio: float = 5.0
    period_s: float | None = None
    phase: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.ratio) and self.ratio >= 1):
            raise TraceError(f"diurnal: ratio must be >= 1 (peak over trough), got {self.ratio!r}")
        if self.period_s is not None and not (math.isfinite(self.period_s) and self.period_s > 0):
            raise TraceError(f"diurnal: period must be > 0 seconds, got {self.period_s!r}")
        if not math.isfinite(self.phase):
            raise TraceError(f"diurnal: phase must be a number, got {self.phase!r}")

    def curve(self, t: np.ndarray, period_s: float) -> np.ndarray:
        """The kept fraction at times ``t``: ``1/ratio`` at the trough, 1 at the peak."""
        low = 1.0 / self.ratio
        return low + (1.0 - low) * (1.0 - np.cos(2 * np.pi * (np.asarray(t) / period_s + self.phase))) / 2

    def apply(self, trace: Trace) -> Trace:
        period = self.period_s or max(trace.duration_s, 1e-9)
        keep = np.random.default_rng(self.seed).random(len(trace)) < self.curve(trace.t - trace.t[0], period)
        if not keep.any():
            raise TraceError("diurnal: no call kept (the trace is too short for its curve)")
        return Trace(t=trace.t[keep], layer=trace.layer[keep], counts=trace.counts[keep])


_FIELDS = {
    "s": ("s", float), "experts": ("experts", int), "layers": ("layers", int), "top_k": ("top_k", int),
    "duration": ("duration_s", float), "shift": ("shift_s", float), "tokens": ("tokens_per_call", int),
    "rate": ("rate", float), "load": ("load", float), "seed": ("seed", int), "arrivals": ("arrivals", str),
}
_DRIFT_FIELDS = {
    "experts": ("experts", int), "layers": ("layers", int), "top_k": ("top_k", int), "duration": ("duration_s", float),
    "tokens": ("tokens_per_call", int), "rate": ("rate", float), "load": ("load", float), "seed": ("seed", int),
    "arrivals": ("arrivals", str), "skew": ("skew", float), "workload": ("workload", float), "sigma": ("sigma", float),
    "tau": ("tau_s", float), "workloads": ("workloads", int), "mix_sigma": ("mix_sigma", float),
    "mix_tau": ("mix_tau_s", float),
}
_DIURNAL_FIELDS = {"ratio": ("ratio", float), "period": ("period_s", float), "phase": ("phase", float),
                   "seed": ("seed", int)}


def _fields(kind: str, rest: str, table: dict) -> dict:
    kwargs: dict = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in table:
            raise TraceError(f"trace: {kind} field {item!r} is not FIELD=VALUE with FIELD one of {', '.join(table)}")
        name, cast = table[key]
        try:
            kwargs[name] = cast(value.strip())
        except ValueError:
            raise TraceError(f"trace: {kind} {key} must be {cast.__name__}, got {value!r}") from None
    return kwargs


def parse_traffic(text: str) -> ZipfTraffic | DriftTraffic:
    """``"zipf:s=1.2,..."`` or ``"drift:experts=64,..."`` -> the generator (fields in the module docstring)."""
    head, _, rest = text.partition(":")
    kind = head.strip().lower()
    if kind not in ("zipf", "drift"):
        raise TraceError(f"trace: {text!r} is not a synthetic trace (expected 'zipf:FIELD=VALUE,...' or 'drift:...')")
    kwargs = _fields(kind, rest, _FIELDS if kind == "zipf" else _DRIFT_FIELDS)
    if "rate" not in kwargs and "load" not in kwargs:
        kwargs["load"] = 1.25
    try:
        return ZipfTraffic(**kwargs) if kind == "zipf" else DriftTraffic(**kwargs)
    except TraceError as e:
        raise TraceError(f"trace: {e}") from None


def parse_diurnal(text: str) -> tuple[Diurnal, str]:
    """``"diurnal:ratio=5,period=600:INNER"`` -> (the curve, the inner trace's text)."""
    head, _, rest = text.partition(":")
    if head.strip().lower() != "diurnal":
        raise TraceError(f"trace: {text!r} does not start with 'diurnal:'")
    fields, sep, inner = rest.partition(":")
    if "=" not in fields and sep:  # no fields: "diurnal:INNER"
        fields, inner = "", rest
    if not inner.strip():
        raise TraceError("trace: diurnal needs a trace to scale: 'diurnal:ratio=5:zipf:...' or 'diurnal:ratio=5:FILE'")
    try:
        return Diurnal(**_fields("diurnal", fields, _DIURNAL_FIELDS)), inner.strip()
    except TraceError as e:
        raise TraceError(f"trace: {e}") from None


def traffic_fields() -> list[str]:
    return [f.name for f in fields(ZipfTraffic)]
