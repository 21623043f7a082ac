"""Dispatch planning, pure: which worker serves which (token, slot) assignments of one layer call.

Given the router's choice (``topk_ids [T, K]``), the replicas of each expert,
the speed of each replica's device and the work already outstanding on each
worker, ``plan_dispatch`` splits each expert's rows among its replicas and
lays out each worker's rows in the permuted form the kernels take: rows
grouped by expert, experts ascending, with ``counts`` per expert. Each worker
is called at most once per layer call.

How rows split (``split_rows``): an expert's rows go to its replicas so that
every replica finishes at the same time, counting the rows each worker still
has in flight from earlier calls: with no outstanding work that is in
proportion to the replicas' speeds, exactly the planner's load model
(``controller/planner/``), so the per-device load the planner predicted is
the load achieved. Fractions are rounded by systematic sampling with a random
offset, so no replica is favoured when rows are few.

Each worker sums its experts' weighted outputs per token before replying
(``unique_tokens``), so a token routed to several experts on one worker costs
one returned row, not K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class NoReplicaError(LookupError):
    """An expert the router chose has no replica in the placement."""


@dataclass
class WorkerBatch:
    """The part of one layer call that one worker serves.

    rows: [N] int64 token index of each row, grouped by expert (experts ascending).
    weights: [N] float32 combine weight of each row.
    experts: expert ids present, ascending; counts: [len(experts)] rows per expert.
    unique_tokens: [U] ascending token indices the worker returns a partial output for.
    inverse: [N] position of each row's token in unique_tokens.
    """

    worker: str
    rows: np.ndarray
    weights: np.ndarray
    experts: list[int]
    counts: list[int]
    unique_tokens: np.ndarray
    inverse: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])


def split_rows(
    num_rows: int,
    workers: list[str],
    speeds: dict[str, float] | None = None,
    outstanding: dict[str, float] | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Rows of one expert per replica (same order as ``workers``), summing to ``num_rows``.

    Water-filling: replica ``w`` gets ``max(0, level * speed[w] - outstanding[w])``
    rows, the level chosen so they sum to ``num_rows``; every replica that gets
    rows then finishes at ``level`` (time = rows / speed). Speeds default to 1,
    outstanding work to 0 (then the split is in proportion to speed).
    """
    n = len(workers)
    if n == 1 or num_rows == 0:
        return [num_rows] + [0] * (n - 1)
    sp = np.array([max(float((speeds or {}).get(w, 1.0)), 1e-12) for w in workers])
    out = np.array([max(float((outstanding or {}).get(w, 0.0)), 0.0) for w in workers])
    # replicas sorted by the level at which they start taking rows (their current finish time)
    start = out / sp
    order = np.argsort(start, kind="stable")
    # levels[i]: the level at which the first i+1 replicas absorb all rows; the first that does not reach the
    # next replica's start is the answer (O(n log n): a hot expert may have a replica on every device)
    levels = (num_rows + np.cumsum(out[order])) / np.cumsum(sp[order])
    fits = np.append(levels[:-1] <= start[order][1:], True)
    level = float(levels[int(np.argmax(fits))])
    share = np.maximum(level * sp - out, 0.0)
    share *= num_rows / share.sum()
    # systematic rounding: exact total, unbiased per replica
    u = (rng or np.random.default_rng()).random()
    edges = np.floor(np.concatenate([[0.0], np.cumsum(share)]) + u)
    counts = np.diff(edges).astype(np.int64)
    counts[-1] += num_rows - counts.sum()  # guard float error at the end
    return [int(c) for c in counts]


def plan_dispatch(
    topk_ids: np.ndarray,
    topk_weights: np.ndarray,
    replicas: dict[int, list[str]],
    outstanding: dict[str, float] | None = None,
    speeds: dict[str, float] | None = None,
    rng: np.random.Generator | None = None,
) -> list[WorkerBatch]:
    """Split one layer call's assignments into one batch per worker.

    topk_ids: [T, K] int, ``-1`` for dropped slots; topk_weights: [T, K] float.
    replicas: expert -> workers holding a replica. outstanding: rows in flight
    per worker (not modified). speeds: relative speed per worker (default 1).
    Returns batches sorted by worker id.

    Raises:
        NoReplicaError: an expert chosen by some token has no replica.
    """
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    valid = np.flatnonzero(flat >= 0)
    ids = flat[valid]
    order = np.argsort(ids, kind="stable")
    slots = valid[order]
    ids = ids[order]
    experts, starts, counts = np.unique(ids, return_index=True, return_counts=True)
    # per worker: [(expert, first slot index, rows)]
    per_worker: dict[str, list[tuple[int, int, int]]] = {}
    for e, s0, c in zip(experts.tolist(), starts.tolist(), counts.tolist()):
        workers = replicas.get(e)
        if not workers:
            raise NoReplicaError(f"expert {e} has no replica in the placement")
        parts = split_rows(c, workers, speeds, outstanding, rng) if len(workers) > 1 else [c]
        offset = s0
        for w, n in zip(workers, parts):
            if n:
                per_worker.setdefault(w, []).append((e, offset, n))
                offset += n
    weights_flat = topk_weights.reshape(-1)
    batches = []
    for worker in sorted(per_worker):
        parts = per_worker[worker]
        sel = np.concatenate([slots[s0 : s0 + n] for _, s0, n in parts])
        rows = (sel // k).astype(np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        batches.append(
            WorkerBatch(
                worker=worker,
                rows=rows,
                weights=weights_flat[sel].astype(np.float32),
                experts=[e for e, _, _ in parts],
                counts=[n for _, _, n in parts],
                unique_tokens=uniq.astype(np.int64),
                inverse=inverse.astype(np.int64),
            )
        )
    return batches
