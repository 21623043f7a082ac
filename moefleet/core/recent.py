"""Counts over the last few seconds: what a worker measured it served recently, per layer.

``RecentCounts(window_s, bucket_s)`` keeps one bucket of counts per
``bucket_s`` seconds and answers the sum over the last ``window_s`` seconds of
*complete* buckets, so every answer covers exactly ``window_s`` seconds of
measurement (the bucket still filling is not counted). The clock is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

__all__ = ["RecentCounts"]


class RecentCounts:
    """Sliding-window sums of counts per key (not thread-safe: callers lock).

    Example: ``window_s=5, bucket_s=1``; counts added at t = 10.2 and 14.9 are
    both in ``totals(now=15.0)`` (buckets 10..14), only the second one in
    ``totals(now=16.0)`` (buckets 11..15).
    """

    def __init__(self, window_s: float = 5.0, bucket_s: float = 1.0):
        if not (bucket_s > 0 and math.isfinite(bucket_s)):
            raise ValueError(f"bucket_s: must be finite and > 0, got {bucket_s}")
        if not (window_s >= bucket_s and math.isfinite(window_s)):
            raise ValueError(f"window_s: must be finite and >= bucket_s ({bucket_s}), got {window_s}")
        self.bucket_s = float(bucket_s)
        self.num_buckets = int(round(window_s / bucket_s))
        self.window_s = self.num_buckets * self.bucket_s
        self._buckets: dict[int, dict[Hashable, int]] = {}

    def _index(self, now: float) -> int:
        return int(now // self.bucket_s)

    def add(self, key: Hashable, n: int, now: float) -> None:
        """Count ``n`` for ``key`` at time ``now`` (seconds)."""
        i = self._index(now)
        bucket = self._buckets.get(i)
        if bucket is None:
            bucket = self._buckets[i] = {}
            for old in [j for j in self._buckets if j < i - self.num_buckets]:
                del self._buckets[old]
        bucket[key] = bucket.get(key, 0) + int(n)

    def totals(self, now: float) -> dict[Hashable, int]:
        """Sum per key over the ``window_s`` seconds of complete buckets before ``now``."""
        cur = self._index(now)
        out: dict[Hashable, int] = {}
        for i, bucket in self._buckets.items():
            if cur - self.num_buckets <= i < cur:
                for key, n in bucket.items():
                    out[key] = out.get(key, 0) + n
        return out
