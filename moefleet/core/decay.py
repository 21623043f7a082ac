"""How much each load window counts in the decayed load estimate. Pure.

The routers count tokens per ``(layer, expert)`` into fixed windows of
``window_s`` seconds; the controller plans from a decayed sum of the last few.
A window's counts weigh ``0.5 ** (age_s / half_life_s)``, with ``age_s``
measured from the middle of the span the window has covered to ``now``; the
window still filling (``start <= now < start + window_s``) weighs that times
its filled fraction ``(now - start) / window_s``. So the estimate moves
continuously as time passes: a window just begun, holding a handful of tokens,
counts for almost nothing, and at a window boundary the closing window's
weight equals the weight it keeps as a complete window (no jump each second).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["window_weights"]


def window_weights(now: float, window_s: float, starts: Sequence[float], half_life_s: float) -> list[float]:
    """Weight of each window (by its start time, seconds) in the decayed load at ``now``.

    ``half_life_s=math.inf`` weighs every complete window 1 (the filling one
    its filled fraction). Windows starting after ``now`` weigh 0.
    """
    if not window_s > 0:
        raise ValueError(f"window_s: must be > 0, got {window_s}")
    if not half_life_s > 0:
        raise ValueError(f"half_life_s: must be > 0, got {half_life_s}")
    out = []
    for start in starts:
        covered = min(max(now - start, 0.0), window_s)
        if covered <= 0:
            out.append(0.0)
            continue
        age = now - (start + covered / 2)
        decay = 1.0 if math.isinf(half_life_s) else 0.5 ** (age / half_life_s)
        out.append(decay * covered / window_s)
    return out
