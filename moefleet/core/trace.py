"""Routing traces: tokens routed to each expert of each MoE layer, over time, as JSON Lines.

The file format (one JSON object a line, UTF-8)::

    {"t": 0.25, "layer": 3, "counts": [12, 0, 7, ...]}

* ``t`` -- seconds since the trace began (a number ``>= 0``); lines may come
  in any order and are read back sorted by ``t`` (stable, so lines with equal
  ``t`` keep their file order);
* ``layer`` -- the model layer the counts are for (an int ``>= 0``, numbered
  as in ``transformers``);
* ``counts`` -- ``[E]`` ints ``>= 0``: token-expert assignments routed to each
  expert in that layer call (a token routed to ``K`` experts counts once for
  each of them). Every line has the same ``E``.

Each line is one MoE layer call (or one recording window of a layer). Blank
lines are skipped; any other key is an error, as is a malformed line: the
error names the line number and the field.

``write_trace(path, trace)`` and ``read_trace(path)`` are the pair every tool
uses (the simulator, ``moe-fleet plan``, recorders), with ``Trace`` holding
the lines as arrays: ``t [N]``, ``layer [N]``, ``counts [N, E]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Trace", "TraceError", "TraceLine", "read_trace", "write_trace"]

_KEYS = ("t", "layer", "counts")


class TraceError(ValueError):
    """A trace file or trace data that does not follow the format; the message names the line and field."""


@dataclass(frozen=True)
class TraceLine:
    """One line of a trace: at ``t`` seconds, layer ``layer`` routed ``counts[e]`` tokens to expert ``e``."""

    t: float
    layer: int
    counts: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps({"t": self.t, "layer": self.layer, "counts": list(self.counts)}, separators=(",", ":"))


@dataclass(frozen=True)
class Trace:
    """A routing trace as arrays, lines sorted by time.

    t: ``[N]`` float64 seconds, non-decreasing; layer: ``[N]`` int64;
    counts: ``[N, E]`` int64 token-expert assignments per expert.
    """

    t: np.ndarray
    layer: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        t = np.asarray(self.t, dtype=np.float64)
        layer = np.asarray(self.layer)
        counts = np.asarray(self.counts)
        if t.ndim != 1 or layer.shape != t.shape:
            raise TraceError(f"t, layer: expected two [N] arrays of one length, got shapes {t.shape} and {layer.shape}")
        if counts.ndim != 2 or counts.shape[0] != t.shape[0]:
            raise TraceError(f"counts: expected [N={t.shape[0]}, E], got shape {counts.shape}")
        if t.shape[0] == 0:
            raise TraceError("trace: no lines")
        if counts.shape[1] == 0:
            raise TraceError("counts: a trace needs at least one expert")
        if not np.all(np.isfinite(t)) or np.any(t < 0):
            raise TraceError("t: times must be finite and >= 0")
        if np.any(np.diff(t) < 0):
            raise TraceError("t: lines must be sorted by time (use Trace.from_lines to sort)")
        if not np.issubdtype(layer.dtype, np.integer) and not np.all(layer == np.round(layer)):
            raise TraceError("layer: layers must be integers")
        if np.any(layer < 0):
            raise TraceError("layer: layers must be >= 0")
        if not np.issubdtype(counts.dtype, np.integer):
            if not np.all(np.isfinite(counts)) or not np.all(counts == np.round(counts)):
                raise TraceError("counts: counts must be integers")
        if np.any(counts < 0):
            raise TraceError("counts: counts must be >= 0")
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "layer", layer.astype(np.int64))
        object.__setattr__(self, "counts", counts.astype(np.int64))

    # -- shape ---------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def layers(self) -> list[int]:
        """The layers present, ascending."""
        return sorted({int(x) for x in self.layer})

    @property
    def duration_s(self) -> float:
        """Time from the trace's start (0) to its last line."""
        return float(self.t[-1])

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def lines(self) -> Iterator[TraceLine]:
        for t, layer, counts in zip(self.t, self.layer, self.counts):
            yield TraceLine(float(t), int(layer), tuple(int(c) for c in counts))

    def load(self, t0: float = -math.inf, t1: float = math.inf) -> np.ndarray:
        """``[len(layers), E]`` token counts summed over lines with ``t0 <= t < t1``; row ``i`` is ``layers[i]``."""
        layers = self.layers
        row = np.searchsorted(layers, self.layer)
        sel = (self.t >= t0) & (self.t < t1)
        out = np.zeros((len(layers), self.num_experts))
        np.add.at(out, row[sel], self.counts[sel])
        return out

    @classmethod
    def from_lines(cls, lines: Iterable[TraceLine]) -> Trace:
        """A trace from lines in any order (sorted by time, stably)."""
        items = list(lines)
        if not items:
            raise TraceError("trace: no lines")
        widths = {len(x.counts) for x in items}
        if len(widths) != 1:
            raise TraceError(f"counts: every line needs the same number of experts, found {sorted(widths)}")
        t = np.array([x.t for x in items], dtype=np.float64)
        order = np.argsort(t, kind="stable")
        return cls(
            t=t[order],
            layer=np.array([x.layer for x in items], dtype=np.int64)[order],
            counts=np.array([x.counts for x in items], dtype=np.int64)[order],
        )


def _parse_line(text: str, number: int) -> TraceLine:
    where = f"line {number}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected an object with keys t, layer, counts")
    extra = sorted(set(obj) - set(_KEYS))
    if extra:
        raise TraceError(f"{where}: unknown field {extra[0]!r} (a line has t, layer, counts)")
    for key in _KEYS:
        if key not in obj:
            raise TraceError(f"{where}: missing field {key!r}")
    t, layer, counts = obj["t"], obj["layer"], obj["counts"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise TraceError(f"{where}: t must be a finite number >= 0, got {t!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise TraceError(f"{where}: layer must be an int >= 0, got {layer!r}")
    if not isinstance(counts, list) or not counts:
        raise TraceError(f"{where}: counts must be a non-empty list of ints")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise TraceError(f"{where}: counts[{i}] must be an int >= 0, got {c!r}")
    return TraceLine(float(t), layer, tuple(counts))


def read_trace(path: str | Path) -> Trace:
    """Read a JSONL routing trace (see the module docstring); raises ``TraceError`` naming the line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TraceError(f"trace: cannot read {path}: {e.strerror or e}") from None
    lines = []
    width = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = _parse_line(raw, number)
        if width is None:
            width = len(line.counts)
        elif len(line.counts) != width:
            raise TraceError(f"line {number}: counts has {len(line.counts)} experts, earlier lines {width}")
        lines.append(line)
    if not lines:
        raise TraceError(f"trace: {path} has no lines")
    return Trace.from_lines(lines)


def write_trace(path: str | Path, trace: Trace | Iterable[TraceLine]) -> Path:
    """Write ``trace`` (a ``Trace`` or lines) as JSONL, sorted by time; returns the path."""
    if not isinstance(trace, Trace):
        trace = Trace.from_lines(trace)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for line in trace.lines():
            f.write(line.to_json())
            f.write("\n")
    return path
