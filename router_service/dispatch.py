"""Dispatch planning, pure: which worker serves which (token, slot) assignments of one layer call.

Given the router's choice (``topk_ids [T, K]``), the replicas of each expert and
the work already outstanding on each worker, ``plan_dispatch`` picks one
replica per expert (least outstanding work first, hottest expert first) and
lays out each worker's rows in the permuted form the kernels take: rows grouped
by expert, experts ascending, with ``counts`` per expert. Each worker is
called at most once per layer call.

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


def choose_replicas(
    expert_load: dict[int, int], replicas: dict[int, list[str]], outstanding: dict[str, float]
) -> dict[int, str]:
    """Expert -> worker. Hottest expert first, each to the replica with least outstanding work.

    expert_load: rows per expert in this call. replicas: expert -> workers holding it.
    outstanding: rows already in flight per worker (not modified).
    """
    work = dict(outstanding)
    chosen: dict[int, str] = {}
    for expert in sorted(expert_load, key=lambda e: (-expert_load[e], e)):
        workers = replicas.get(expert)
        if not workers:
            raise NoReplicaError(f"expert {expert} has no replica in the placement")
        best = min(workers, key=lambda w: (work.get(w, 0.0), w))
        chosen[expert] = best
        work[best] = work.get(best, 0.0) + expert_load[expert]
    return chosen


def plan_dispatch(
    topk_ids: np.ndarray,
    topk_weights: np.ndarray,
    replicas: dict[int, list[str]],
    outstanding: dict[str, float] | None = None,
) -> list[WorkerBatch]:
    """Split one layer call's assignments into one batch per worker.

    topk_ids: [T, K] int, ``-1`` for dropped slots; topk_weights: [T, K] float.
    replicas: expert -> workers holding a replica. Returns batches sorted by worker id.
    """
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    valid = np.flatnonzero(flat >= 0)
    ids = flat[valid]
    order = np.argsort(ids, kind="stable")
    slots = valid[order]
    ids = ids[order]
    experts, starts, counts = np.unique(ids, return_index=True, return_counts=True)
    load = {int(e): int(c) for e, c in zip(experts, counts)}
    chosen = choose_replicas(load, replicas, outstanding or {})
    per_worker: dict[str, list[int]] = {}
    for i, e in enumerate(experts):
        per_worker.setdefault(chosen[int(e)], []).append(i)
    weights_flat = topk_weights.reshape(-1)
    batches = []
    for worker in sorted(per_worker):
        idx = per_worker[worker]
        sel = np.concatenate([slots[starts[i] : starts[i] + counts[i]] for i in idx])
        rows = (sel // k).astype(np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        batches.append(
            WorkerBatch(
                worker=worker,
                rows=rows,
                weights=weights_flat[sel].astype(np.float32),
                experts=[int(experts[i]) for i in idx],
                counts=[int(counts[i]) for i in idx],
                unique_tokens=uniq.astype(np.int64),
                inverse=inverse.astype(np.int64),
            )
        )
    return batches
