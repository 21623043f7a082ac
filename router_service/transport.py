"""How a layer call's batches reach workers.

``RayTransport``: the call's hidden states go into Ray's object store once
(``ray.put``), and each worker gets the ``ObjectRef`` plus its small row index
arrays (arrays up to Ray's inline limit ride inside the call instead); Ray
hands the worker a zero-copy view. Each worker returns its partial
output (one row per token it served, a numpy array: no torch tensor is
pickled) and its stage times (``ExpertGroupCore.forward_timed``). See ``benchmarks/RESULTS.md`` for the
transport measurements behind this choice.

``LocalTransport``: workers in this process (``ExpertGroupCore``), for the
in-process fleet and tests of the serving path without a cluster.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import grpc
import numpy as np

from moefleet.core.placement import WORKER_PREFIX, worker_actor_name  # noqa: F401  (re-exported)
from moefleet.core.processes import inline_limit

from .dispatch import WorkerBatch
from .router import RequestError, WorkerCallError


class RayTransport:
    """Workers are named ``ExpertGroup`` actors in ``namespace``."""

    def __init__(self, namespace: str):
        import ray

        self._ray = ray
        self.namespace = namespace
        self._handles: dict[str, Any] = {}
        self.inline_bytes = inline_limit()  # what Ray inlines here (raised in serving processes: core/processes.py)

    def handle(self, worker: str):
        h = self._handles.get(worker)
        if h is None:
            h = self._ray.get_actor(worker_actor_name(worker), namespace=self.namespace)
            self._handles[worker] = h
        return h

    def forget(self, worker: str) -> None:
        self._handles.pop(worker, None)

    def share(self, hidden: np.ndarray) -> Any:
        # Small arrays ride inline in each call (no object-store round trip);
        # large ones go into the store once and every worker reads the same copy.
        if hidden.nbytes <= self.inline_bytes:
            return hidden
        return self._ray.put(hidden)

    async def forward(self, worker: str, layer: int, shared: Any, batch: WorkerBatch, deadline: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        try:
            handle = self.handle(worker)
        except ValueError as e:  # no actor of that name: retired, dead and not restarted, or not started yet
            raise WorkerCallError(worker, e, retryable=True, dead=True) from e
        try:
            ref = handle.forward_timed.remote(
                layer, shared, batch.rows, batch.weights, batch.experts, batch.counts, batch.inverse, len(batch.unique_tokens),
                deadline=deadline,
            )
            return await ref
        except RayTaskError as e:
            # The worker ran the call and raised: it is alive. Only a stale placement (it does not
            # hold an expert any more) is worth a retry; anything else is the request's failure.
            # (Checked first: Ray's error type also derives from the cause's type, a ValueError say.)
            cause = e.as_instanceof_cause()
            if isinstance(cause, TimeoutError):  # DeadlineExpiredError: the worker did not start it
                raise _expired(worker) from e
            stale = isinstance(cause, LookupError)  # ExpertNotLoadedError: the placement moved on
            raise WorkerCallError(worker, LookupError(str(cause)) if stale else cause, retryable=stale) from e
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            self.forget(worker)
            raise WorkerCallError(worker, e, retryable=True, dead=True) from e


class LocalTransport:
    """Workers are ``ExpertGroupCore`` objects in this process, run on a thread pool."""

    def __init__(self, workers: dict[str, Any]):
        self.workers = workers

    def share(self, hidden: np.ndarray) -> Any:
        return hidden

    async def forward(self, worker: str, layer: int, shared: Any, batch: WorkerBatch, deadline: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
        w = self.workers.get(worker)
        if w is None:
            raise WorkerCallError(worker, LookupError(f"no worker {worker}"), retryable=True, dead=True)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                None,
                functools.partial(
                    w.forward_timed, layer, shared, batch.rows, batch.weights, batch.experts, batch.counts, batch.inverse,
                    len(batch.unique_tokens), deadline=deadline,
                ),
            )
        except TimeoutError as e:
            raise _expired(worker) from e
        except LookupError as e:
            raise WorkerCallError(worker, e, retryable=True) from e


def _expired(worker: str) -> RequestError:
    return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline expired before worker {worker} started the batch; not computed")
