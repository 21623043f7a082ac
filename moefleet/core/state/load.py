"""Load windows: token counts per ``(layer, expert)`` in fixed windows, their
decayed sum, per-source tallies, and the never-expiring totals."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

from moefleet.core.decay import window_weights
from moefleet.core.placement import ExpertKey
from moefleet.core.state.base import StoreBase, _check_positive, _expert_field, _parse_expert_field


class LoadOps(StoreBase):
    """Load window operations of ``StateStore``."""


    @staticmethod
    def _window_index(now: float, window_s: float) -> int:
        return int(now // window_s)

    def record_load(
        self,
        counts: Mapping[ExpertKey, int],
        now: float | None,
        window_s: float = 1.0,
        source: str = "",
    ) -> None:
        """Add token counts per ``(layer, expert)`` to the window ``int(now // window_s)``.

        One round trip (a script of HINCRBYs and PEXPIREs: each count travels once, as ``layer:expert n``). Zero
        counts are skipped; a call with nothing to add sends nothing. With
        ``source`` (e.g. a router id) the call's total is also added to the
        window's per-source tally (``load_sources``). The same counts are added
        to the never-expiring totals (``load_totals``) in the same pipeline.
        """
        window_s = _check_positive("window_s", window_s)
        fields: dict[str, int] = {}
        for key, tokens in counts.items():
            field = _expert_field(key)
            n = operator.index(tokens)
            if n < 0:
                raise ValueError(f"counts: {n} tokens for {key!r} is negative")
            if n:
                fields[field] = fields.get(field, 0) + n
        if not fields:
            return
        index = self._window_index(self._now(now), window_s)
        key = self.keys.load_window(window_s, index)
        ttl_ms = math.ceil(max(self.load_retention_s, window_s) * 1000)
        args: list = [ttl_ms, source, sum(fields.values()) if source else 0]
        for field, n in fields.items():
            args += [field, n]
        with self._redis("record_load") as r:
            self._record_load_script(keys=[key, self.keys.load_total, self.keys.load_sources(window_s, index)], args=args, client=r)

    def _read_hashes(self, op: str, keys: list[str]) -> list[dict[str, str]]:
        with self._redis(op) as r:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute()

    def read_windows(
        self, now: float | None, window_s: float, num_windows: int, cache: dict | None = None
    ) -> list[tuple[float, dict[ExpertKey, int]]]:
        """Raw counts of the last ``num_windows`` windows, the current one included, oldest first.

        Returns ``[(window_start_s, {(layer, expert): tokens}), ...]`` with exactly
        ``num_windows`` entries; windows with no traffic (or already expired)
        have an empty dict. One round trip.

        cache: a dict the caller keeps between reads (one per store and window width): windows two or more
        behind the current one no longer change (routers add to the window of the moment they flush), so they are
        read once and kept there; only the current and the previous window are read again. A table of
        58 x 256 experts is then read once, not at every step.
        """
        window_s = _check_positive("window_s", window_s)
        if num_windows < 1:
            return []
        current = self._window_index(self._now(now), window_s)
        indices = list(range(current - num_windows + 1, current + 1))
        if cache is None:
            hashes = self._read_hashes("read_windows", [self.keys.load_window(window_s, i) for i in indices])
            return [(i * window_s, {_parse_expert_field(f): int(v) for f, v in h.items()}) for i, h in zip(indices, hashes)]
        want = [i for i in indices if i not in cache]
        hashes = self._read_hashes("read_windows", [self.keys.load_window(window_s, i) for i in want]) if want else []
        fresh = {i: {_parse_expert_field(f): int(v) for f, v in h.items()} for i, h in zip(want, hashes)}
        for i, counts in fresh.items():
            if i <= current - 2:
                cache[i] = counts
        for i in [i for i in cache if i < indices[0] - 8]:  # long past every reader's span
            del cache[i]
        return [(i * window_s, cache[i] if i in cache else fresh[i]) for i in indices]

    def read_load(
        self, now: float | None, window_s: float, num_windows: int, half_life_s: float, cache: dict | None = None
    ) -> dict[ExpertKey, float]:
        """Exponentially decayed token counts per ``(layer, expert)`` over the last ``num_windows`` windows.

        Each window weighs ``moefleet.core.decay.window_weights``: ``0.5 **
        (age_s / half_life_s)`` with the age from the middle of the span it
        covered to ``now``, and the current window, still filling, that times
        its filled fraction. ``half_life_s=math.inf`` gives a plain sum of the
        complete windows (plus the filled fraction of the current one's).
        Experts with no tokens are absent. cache: as ``read_windows``'.
        """
        if not half_life_s > 0:
            raise ValueError(f"half_life_s: must be > 0, got {half_life_s}")
        now = self._now(now)
        windows = self.read_windows(now, window_s, num_windows, cache)
        weights = window_weights(now, window_s, [start for start, _ in windows], half_life_s)
        out: dict[ExpertKey, float] = {}
        for weight, (_, counts) in zip(weights, windows):
            for key, tokens in counts.items():
                out[key] = out.get(key, 0.0) + weight * tokens
        return out

    def load_totals(self) -> dict[ExpertKey, int]:
        """Tokens routed to each ``(layer, expert)`` since the store began (what ``record_load`` ever added)."""
        with self._redis("load_totals") as r:
            raw = r.hgetall(self.keys.load_total)
        return {_parse_expert_field(f): int(v) for f, v in raw.items()}

    def load_sources(self, now: float, window_s: float, num_windows: int) -> dict[str, int]:
        """Tokens per ``source`` over the last ``num_windows`` windows (who has been reporting)."""
        window_s = _check_positive("window_s", window_s)
        if num_windows < 1:
            return {}
        current = self._window_index(now, window_s)
        keys = [self.keys.load_sources(window_s, i) for i in range(current - num_windows + 1, current + 1)]
        out: dict[str, int] = {}
        for h in self._read_hashes("load_sources", keys):
            for source, v in h.items():
                out[source] = out.get(source, 0) + int(v)
        return out

